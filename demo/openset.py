"""Open-set verification: train on some classes, verify pairs of images of classes never seen in
training (``python -m demo --protocol open-set``).

The protocol, per data set and seed, the same for every loss:

- **split**: classes 0-5 are *seen*: the CNN and the loss head train on their training images
  (a class-balanced subset of ``train_size``). Classes 6-9 are *unseen*: only their **test**
  images are used, and only for verification. The seen classes' test images give the closed-set
  accuracy.
- **scores**: embeddings L2-normalised; the score of a pair is the cosine similarity. Every pair
  (i < j) of unseen-class test images is scored; a pair is genuine when both images have the same
  class.
- **metrics** over all those pairs: the equal error rate (EER), the true-accept rate (TAR) at a
  false-accept rate (FAR) of 1e-2 and 1e-3. The LFW protocol's verification accuracy: a balanced
  set of 6,000 pairs (the size of LFW's View 2: 3,000 genuine, 3,000 impostor, drawn with the
  seed) in 10 folds; for each fold the threshold that maximises accuracy on the other 9 is
  applied to it; the mean over folds is reported.
- **verdict** against softmax, per metric: "better" / "worse" only when every seed of the loss
  is on the same side of every seed of softmax (the ranges do not overlap); else
  "no difference".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .data import ImageDataset, load_dataset
from .run import ALL_LOSSES, RunConfig, SmallCNN, _log, _progress, embed, train_and_evaluate

__all__ = [
    "OPENSET_PROTOCOLS",
    "SEEN_CLASSES",
    "UNSEEN_CLASSES",
    "equal_error_rate",
    "pair_scores",
    "roc_points",
    "run_openset",
    "split_open_set",
    "tar_at_far",
    "ten_fold_accuracy",
]

SEEN_CLASSES = (0, 1, 2, 3, 4, 5)
UNSEEN_CLASSES = (6, 7, 8, 9)
VERIFICATION_PAIRS = 6000  # LFW's View 2: 10 folds of 300 genuine + 300 impostor pairs
FOLDS = 10
FAR_LEVELS = (1e-2, 1e-3)
ROC_GRID = torch.logspace(-4, 0, 200, dtype=torch.float64)  # FARs of the ROC figure
STATE_FILE = "demo_openset_state.json"  # what --merge needs besides the CSV
# Training budget per (data set, loss, seed), the same for every loss, sized so that the whole
# protocol (2 data sets x 11 losses x 3 seeds = 66 trainings) ran in about an hour on a 2-core
# machine shared with other jobs: Fashion-MNIST 4,000 of the 36,000 seen-class training images,
# 3 epochs; MNIST 5k all 2,400 seen-class training images, 5 epochs; a half-width CNN (16).
OPENSET_PROTOCOLS = {
    "fashion-mnist": RunConfig("openset", 64, epochs=3, train_size=4_000, test_size=None, width=16),
    "mnist": RunConfig("openset", 64, epochs=5, train_size=None, test_size=None, width=16),
}
METRICS = ("eer", "tar_far_1e-2", "tar_far_1e-3", "lfw_accuracy", "closed_set_accuracy")
LOWER_IS_BETTER = {"eer"}
METRIC_TITLES = {
    "eer": "EER %",
    "tar_far_1e-2": "TAR@FAR=1e-2 %",
    "tar_far_1e-3": "TAR@FAR=1e-3 %",
    "lfw_accuracy": "10-fold acc. %",
    "closed_set_accuracy": "closed-set acc. %",
}


# ---------------------------------------------------------------- the split


@dataclass(frozen=True)
class OpenSetSplit:
    """Seen classes: training images (``train``) and test images (``train.test_*``, closed-set
    accuracy); unseen classes: test images only (``unseen_images``, ``unseen_labels``)."""

    train: ImageDataset
    unseen_images: torch.Tensor
    unseen_labels: torch.Tensor


def split_open_set(
    data: ImageDataset,
    seen: tuple[int, ...] = SEEN_CLASSES,
    unseen: tuple[int, ...] = UNSEEN_CLASSES,
) -> OpenSetSplit:
    """Seen classes relabelled 0..len(seen)-1 for training; unseen classes keep their labels."""
    if set(seen) & set(unseen):
        raise ValueError(f"seen and unseen classes overlap: {sorted(set(seen) & set(unseen))}")
    relabel = torch.full((data.num_classes,), -1, dtype=torch.int64)
    relabel[list(seen)] = torch.arange(len(seen))
    train_rows = relabel[data.train_labels] >= 0
    test_rows = relabel[data.test_labels] >= 0
    unseen_rows = torch.isin(data.test_labels, torch.tensor(unseen))
    train = ImageDataset(
        data.name,
        data.train_images[train_rows],
        relabel[data.train_labels[train_rows]],
        data.test_images[test_rows],
        relabel[data.test_labels[test_rows]],
        tuple(data.class_names[c] for c in seen),
    )
    return OpenSetSplit(train, data.test_images[unseen_rows], data.test_labels[unseen_rows])


# ---------------------------------------------------------------- metrics


def pair_scores(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity (float64) and genuine flag (bool) of every pair i < j of
    ``features (N, D)`` with ``labels (N,)``."""
    unit = nn.functional.normalize(features.double(), dim=1)
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool).triu(diagonal=1)
    scores = (unit @ unit.T)[upper]
    return scores, (labels[:, None] == labels[None, :])[upper]


def roc_points(scores: torch.Tensor, genuine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FAR, TAR) at every distinct threshold t (accept when score >= t), from the highest
    threshold down, starting at (0, 0): float64 tensors."""
    genuine = genuine.bool()
    positives, negatives = int(genuine.sum()), int((~genuine).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("need at least one genuine and one impostor pair")
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_genuine = scores[order], genuine[order]
    true_accepts = torch.cumsum(sorted_genuine, 0).double()
    false_accepts = torch.cumsum(~sorted_genuine, 0).double()
    # last index of each run of equal scores: a threshold accepts all of a tie or none of it
    last = torch.ones_like(sorted_genuine)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    far = torch.cat([zero, false_accepts[last] / negatives])
    tar = torch.cat([zero, true_accepts[last] / positives])
    return far, tar


def equal_error_rate(scores: torch.Tensor, genuine: torch.Tensor) -> float:
    """Where the false-accept rate equals the false-reject rate, interpolated linearly between
    the two ROC points that bracket it."""
    return eer_from_roc(*roc_points(scores, genuine))


def eer_from_roc(far: torch.Tensor, tar: torch.Tensor) -> float:
    """:func:`equal_error_rate` from :func:`roc_points`' output."""
    frr = 1.0 - tar
    # far rises and frr falls along the curve; the first point with far >= frr ends the bracket
    k = int(torch.nonzero(far >= frr)[0])
    if k == 0 or far[k] == frr[k]:
        return float(far[k])
    # the segment from point k-1 to k: far - frr goes from negative to positive
    d0 = float(far[k - 1] - frr[k - 1])
    d1 = float(far[k] - frr[k])
    w = d0 / (d0 - d1)
    return float(far[k - 1] + w * (far[k] - far[k - 1]))


def tar_at_far(scores: torch.Tensor, genuine: torch.Tensor, far_level: float) -> float:
    """Highest true-accept rate over the thresholds whose false-accept rate is <= ``far_level``."""
    return tar_at_far_from_roc(*roc_points(scores, genuine), far_level)


def tar_at_far_from_roc(far: torch.Tensor, tar: torch.Tensor, far_level: float) -> float:
    """:func:`tar_at_far` from :func:`roc_points`' output."""
    return float(tar[far <= far_level + 1e-12].max())


def best_threshold(scores: torch.Tensor, genuine: torch.Tensor) -> float:
    """The threshold (accept when score >= it) with the most correct decisions on these pairs;
    +inf (accept none) is a candidate; ties go to the highest threshold."""
    genuine = genuine.bool()
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_genuine = scores[order], genuine[order]
    negatives = int((~genuine).sum())
    correct = torch.cumsum(sorted_genuine, 0) + (negatives - torch.cumsum(~sorted_genuine, 0))
    last = torch.ones_like(sorted_genuine)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    correct = torch.where(last, correct, torch.full_like(correct, -1))
    best = int(torch.argmax(correct))  # first maximum: the highest threshold
    if negatives >= int(correct[best]):
        return math.inf
    return float(sorted_scores[best])


def ten_fold_accuracy(
    scores: torch.Tensor, genuine: torch.Tensor, folds: torch.Tensor
) -> tuple[float, list[float]]:
    """LFW-style accuracy: for each fold id in ``folds`` (one per pair), the threshold that is
    best on the other folds, applied to it. Returns (mean accuracy, per-fold accuracies)."""
    genuine = genuine.bool()
    per_fold = []
    for fold in torch.unique(folds).tolist():
        held_out = folds == fold
        threshold = best_threshold(scores[~held_out], genuine[~held_out])
        accepted = scores[held_out] >= threshold
        per_fold.append(float((accepted == genuine[held_out]).double().mean()))
    return statistics.fmean(per_fold), per_fold


def balanced_folds(
    genuine: torch.Tensor, num_pairs: int, num_folds: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of ``num_pairs`` pairs, half genuine and half impostor, drawn without
    replacement; their fold ids, each fold holding the same number of each kind)."""
    gen = torch.Generator().manual_seed(seed)
    half = num_pairs // 2
    picked, fold_ids = [], []
    for flag in (True, False):
        pool = torch.nonzero(genuine == flag).squeeze(1)
        take = min(half, len(pool))
        picked.append(pool[torch.randperm(len(pool), generator=gen)[:take]])
        fold_ids.append(torch.arange(take) % num_folds)
    return torch.cat(picked), torch.cat(fold_ids)


def verification_metrics(
    features: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """EER, TAR@FAR and 10-fold accuracy (fractions) of every pair of ``features``; with the
    ROC's (FAR, TAR) points."""
    scores, genuine = pair_scores(features, labels)
    finite = torch.isfinite(scores)
    scores = torch.where(finite, scores, torch.full_like(scores, -2.0))  # NaN: reject
    index, folds = balanced_folds(genuine, VERIFICATION_PAIRS, FOLDS, seed)
    accuracy, _ = ten_fold_accuracy(scores[index], genuine[index], folds)
    far, tar = roc_points(scores, genuine)
    metrics = {"eer": eer_from_roc(far, tar), "lfw_accuracy": accuracy}
    for level in FAR_LEVELS:
        key = f"tar_far_{level:.0e}".replace("e-0", "e-")
        metrics[key] = tar_at_far_from_roc(far, tar, level)
    return metrics, far, tar


# ---------------------------------------------------------------- verdicts and tables


def verdict(values: list[float], baseline: list[float], lower_is_better: bool) -> str:
    """'better' / 'worse' when every value is on one side of every baseline value, else
    'no difference'."""
    if not values or not baseline:
        return "n/a"
    sign = -1.0 if lower_is_better else 1.0
    if min(sign * v for v in values) > max(sign * b for b in baseline):
        return "better"
    if max(sign * v for v in values) < min(sign * b for b in baseline):
        return "worse"
    return "no difference"


def _mean_std(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "nan"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f}"


def summary_table(rows: list[dict], dataset: str) -> str:
    """Markdown: mean ± std over seeds per loss, verdicts on EER and TAR@FAR=1e-3."""
    by_loss: dict[str, list[dict]] = {}
    for row in rows:
        if row["dataset"] == dataset:
            by_loss.setdefault(row["loss"], []).append(row)
    softmax = by_loss.get("softmax", [])
    header = "| loss | seeds | " + " | ".join(METRIC_TITLES[m] for m in METRICS)
    header += " | vs softmax (EER) | vs softmax (TAR@1e-3) |\n|---|---:|"
    header += "---:|" * len(METRICS) + "---|---|\n"
    lines = []
    for loss in ALL_LOSSES:
        if loss not in by_loss:
            continue
        seeds = by_loss[loss]
        cells = [_mean_std([float(r[m]) for r in seeds]) for m in METRICS]
        verdicts = []
        for metric in ("eer", "tar_far_1e-3"):
            if loss == "softmax":
                verdicts.append("baseline")
                continue
            verdicts.append(
                verdict(
                    [float(r[metric]) for r in seeds],
                    [float(r[metric]) for r in softmax],
                    metric in LOWER_IS_BETTER,
                )
            )
        lines.append(f"| {loss} | {len(seeds)} | " + " | ".join(cells + verdicts) + " |")
    return header + "\n".join(lines) + "\n"


def tar_on_grid(far: torch.Tensor, tar: torch.Tensor) -> list[float]:
    """TAR at each FAR of ``ROC_GRID``: the best ROC point at or below it (a step ROC)."""
    at = torch.searchsorted(far, ROC_GRID, right=True) - 1
    return torch.cummax(tar, 0).values[at.clamp(min=0)].tolist()


def plot_roc(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> None:
    """One panel per data set: TAR against FAR (log axis), the mean over seeds of
    :func:`tar_on_grid`, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5.2), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, (dataset, by_loss) in zip(axes[0], curves.items(), strict=True):
        for k, loss in enumerate(name for name in ALL_LOSSES if name in by_loss):
            mean = torch.tensor(by_loss[loss]).mean(0)
            style = "-" if loss == "softmax" else ("--" if k % 2 else ":")
            width = 2.4 if loss == "softmax" else 1.3
            ax.plot(ROC_GRID, mean, style, color=colours(k), lw=width, label=loss)
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("false-accept rate (unseen-class impostor pairs)")
        ax.set_ylabel("true-accept rate")
        ax.set_title(f"{dataset}: pairs of unseen classes {UNSEEN_CLASSES}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Open-set verification ROC (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the protocol


def run_openset(
    datasets: list[str],
    losses: tuple[str, ...],
    seeds: list[int],
    data_dir: str | None,
    data_root: str,
    out: Path,
    checkpoint_dir: Path,
    device: torch.device,
    command: str,
    overrides: dict | None = None,
) -> list[Path]:
    """Trains every (data set, seed, loss) under ``OPENSET_PROTOCOLS`` (with ``overrides`` of
    RunConfig fields, None entries ignored), writes ``demo_openset.md``, ``.csv`` and
    ``demo_openset_roc.png`` under ``out``; returns the paths."""
    started = time.perf_counter()
    rows: list[dict] = []
    curves: dict[str, dict[str, list]] = {}
    protocols: dict[str, tuple[RunConfig, OpenSetSplit]] = {}
    for dataset in datasets:
        config = OPENSET_PROTOCOLS.get(dataset, OPENSET_PROTOCOLS["mnist"])
        config = replace(config, **{k: v for k, v in (overrides or {}).items() if v is not None})
        split = split_open_set(load_dataset(dataset, data_dir, data_root))
        protocols[dataset] = (config, split)
        curves[dataset] = {}
        for seed in seeds:
            train = split.train.subset(config.train_size, None, seed=seed)
            ckpt = checkpoint_dir / f"{dataset}-seed{seed}"
            for loss in _progress(losses, desc=f"{dataset} seed {seed}", unit="loss"):
                result = train_and_evaluate(loss, config, train, device, ckpt, seed)
                model = SmallCNN(config.embedding_dim, train.image_size, config.width)
                saved = torch.load(ckpt / f"{config.name}-{loss}.pt", weights_only=True)
                model.load_state_dict(saved["model"])
                features = embed(model.to(device), split.unseen_images.to(device)).cpu()
                metrics, far, tar = verification_metrics(features, split.unseen_labels, seed)
                curves[dataset].setdefault(loss, []).append(tar_on_grid(far, tar))
                row = {
                    "dataset": dataset,
                    "loss": loss,
                    "seed": seed,
                    **{k: round(v, 6) for k, v in metrics.items()},
                    "closed_set_accuracy": round(1.0 - result.test_error, 6),
                    "epochs": result.epochs_done,
                    "diverged_at_epoch": result.diverged_at_epoch or "",
                    "train_seconds": round(result.train_seconds, 1),
                }
                rows.append(row)
                _log(
                    f"[open-set {dataset} seed {seed}] {loss}: EER {100 * metrics['eer']:.2f}%, "
                    f"TAR@1e-3 {100 * metrics['tar_far_1e-3']:.2f}%, "
                    f"10-fold {100 * metrics['lfw_accuracy']:.2f}%, "
                    f"closed-set {100 * (1 - result.test_error):.2f}%"
                )
    wall = time.perf_counter() - started
    descriptions = {}
    for dataset, (config, split) in protocols.items():
        train_rows = min(config.train_size or 10**9, int(split.train.train_labels.numel()))
        unseen = len(split.unseen_labels)
        descriptions[dataset] = (
            f"Training: {train_rows} seen-class images (classes {SEEN_CLASSES}), "
            f"{config.epochs} epochs, batch {config.batch_size}, Adam lr {config.lr} (cosine), "
            f"weight decay {config.weight_decay}, {config.embedding_dim}-D embedding, CNN width "
            f"{config.width}. Verification: {unseen} test images of unseen "
            f"classes {UNSEEN_CLASSES}, {unseen * (unseen - 1) // 2} pairs. Closed-set accuracy: "
            f"{int(split.train.test_labels.numel())} seen-class test images."
        )
    run = (
        f"`{command}` (device: {device}, {torch.get_num_threads()} thread(s)): wall time "
        f"{wall / 60:.1f} min for {len(rows)} trainings; training time summed over them "
        f"{sum(r['train_seconds'] for r in rows) / 60:.1f} min"
    )
    state = {"runs": [run], "descriptions": descriptions, "curves": curves}
    return write_report(rows, state, out)


def write_report(rows: list[dict], state: dict, out: Path) -> list[Path]:
    """``demo_openset.md``, ``.csv``, ``_roc.png`` and the state file under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "demo_openset.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    state_path = out / STATE_FILE
    state_path.write_text(json.dumps(state))
    written = [csv_path, state_path]
    try:
        roc_path = out / "demo_openset_roc.png"
        plot_roc(state["curves"], roc_path)
        written.append(roc_path)
    except ImportError:
        _log("matplotlib is not installed: skipping the ROC figure")
    sections = [
        "# Open-set verification\n",
        "Produced by " + "; ".join(state["runs"]) + ". A rerun resumes finished trainings "
        "from their checkpoints instead of training them again.\n",
        __doc__.split("\n\n", 1)[1].strip() + "\n",
    ]
    for dataset, description in state["descriptions"].items():
        seeds = sorted({int(r["seed"]) for r in rows if r["dataset"] == dataset})
        sections.append(
            f"## {dataset}\n\n{description} Seeds {seeds}; mean ± std over seeds, in %.\n\n"
            + summary_table(rows, dataset)
        )
    md_path = out / "demo_openset.md"
    md_path.write_text("\n".join(sections))
    return [md_path, *written]


def merge_reports(parts: list[Path], out: Path, command: str) -> list[Path]:
    """One report from the outputs of several runs (e.g. one process per data set or seed, run
    side by side): their CSV rows and figure curves, concatenated in order; a data set's
    description is taken from the first run that has it (runs of one data set share it)."""
    rows: list[dict] = []
    state: dict = {"runs": [], "descriptions": {}, "curves": {}}
    for part in parts:
        with (part / "demo_openset.csv").open() as f:
            rows.extend(csv.DictReader(f))
        saved = json.loads((part / STATE_FILE).read_text())
        state["runs"] += saved["runs"]
        for dataset, description in saved["descriptions"].items():
            state["descriptions"].setdefault(dataset, description)
        for dataset, by_loss in saved["curves"].items():
            for loss, tars in by_loss.items():
                state["curves"].setdefault(dataset, {}).setdefault(loss, []).extend(tars)
    state["runs"].append(f"merged by `{command}`")
    return write_report(rows, state, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The open-set protocol's flags on ``python -m demo``."""
    parser.add_argument(
        "--seeds", type=int, default=3, help="open-set: seeds SEED .. SEED+N-1 (default 3)"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="open-set: write one report into --out from these runs' --out directories",
    )
