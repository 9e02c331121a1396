"""Benchmark sweep: margin losses at face-recognition shapes, every provider side by side.

Run from the repository root::

    python bench/run.py                      # full sweep on the visible GPU
    python bench/run.py --providers triton torch gemm --losses arcface --classes 1000000
    TRITON_INTERPRET=1 python bench/run.py --smoke   # tiny CPU sweep (what CI runs)

Every measured (provider, case) appends one row to ``<out>/<device-slug>.csv`` (columns in
``COLUMNS``, meanings in bench/README.md); a provider that cannot run here is skipped with one
line, an out-of-memory is recorded as ``OOM`` and any other failure as ``ERROR`` with its message,
and the sweep goes on. Optional peers are imported lazily, so a missing one costs only its rows.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import itertools
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import margin_kernels as mk

try:
    from tqdm import tqdm

    HAS_TQDM = True
except ImportError:  # the sweep runs without a progress bar
    HAS_TQDM = False

try:
    import triton
    import triton.testing

    HAS_TRITON = True
except ImportError:  # CUDA timing falls back to perf_counter around synchronised steps
    HAS_TRITON = False

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SMOKE_OUT_DIR = REPO_ROOT / "out" / "bench"

COLUMNS = (
    "date",
    "device",
    "torch",
    "triton",
    "cuda",
    "margin_kernels",
    "git_rev",
    "provider",
    "loss",
    "dtype",
    "mode",
    "batch",
    "classes",
    "dim",
    "sample_rate",
    "sampled_classes",
    "input_sets",
    "status",
    "time_ms",
    "time_p20_ms",
    "time_p80_ms",
    "timer",
    "peak_extra_mb",
    "gemm_tflop",
    "tflops",
    "vs_gemm",
    "loss_value",
    "notes",
)

# The margins of the sweep. "ce" is plain softmax cross-entropy, written as CosFace with m = 0 on
# inputs that are pre-normalised and pre-scaled (x = s x/|x|, W = W/|W|), so that CE(x W^T) of
# the fused plain-CE peers is the same number as our cosine loss on the same tensors.
SCALE = 64.0
LOSSES = {
    "arcface": mk.MarginSpec.arcface(s=SCALE, m=0.5),
    "cosface": mk.MarginSpec.cosface(s=SCALE, m=0.35),
    "sphereface": mk.MarginSpec.sphereface(m=4),
    "ce": mk.MarginSpec.cosface(s=SCALE, m=0.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
MODES = ("fwd", "fwd+bwd")
GEMM_PROVIDER = "gemm"

FULL_SWEEP = {
    "batch": (128, 1024, 4096),
    "classes": (10_000, 100_000, 1_000_000, 2_000_000),
    "dim": 512,
    "losses": ("arcface", "cosface", "sphereface", "ce"),
    "dtypes": ("bf16", "fp32"),
    "modes": MODES,
    "sample_rates": (1.0, 0.1),
}
# cosface is left out of the smoke default: "ce" runs the same code path (CosFace, m = 0).
SMOKE_SWEEP = {
    "batch": (8,),
    "classes": (37, 100),
    "dim": 16,
    "losses": ("arcface", "sphereface", "ce"),
    "dtypes": ("fp32", "bf16"),
    "modes": MODES,
    "sample_rates": (1.0, 0.1),
}


# --------------------------------------------------------------------------------------------
# cases and inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the bare GEMMs depend on: one yardstick per shape, shared by all losses."""

    dtype: str
    mode: str
    batch: int
    classes: int
    dim: int
    sample_rate: float


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a loss at a shape."""

    loss: str
    shape: Shape

    @property
    def spec(self) -> mk.MarginSpec:
        return LOSSES[self.loss]

    @property
    def backward(self) -> bool:
        return self.shape.mode == "fwd+bwd"


@dataclass
class Inputs:
    """One input set. x: (B, D), weight: (C, D), target: (B,) int64, class_ids: (S,) int64 or
    None (all classes), all on the bench device; x and weight in the case's dtype."""

    x: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    class_ids: torch.Tensor | None

    @property
    def num_sampled(self) -> int:
        return self.weight.shape[0] if self.class_ids is None else self.class_ids.shape[0]


def sample_class_ids(
    target: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator
) -> torch.Tensor | None:
    """Partial-FC class ids: every positive of the batch plus random negatives, round(rate C)
    ids in all (more when the batch holds more distinct positives), sorted. None for rate 1."""
    if rate >= 1.0:
        return None
    num_sample = max(1, round(rate * num_classes))
    # Positives get a score above every random one, so top-k keeps them all (insightface's way).
    score = torch.rand(num_classes, generator=generator, device=target.device)
    score[target] = 2.0
    num_positive = int(torch.unique(target).numel())
    chosen = torch.topk(score, max(num_sample, num_positive)).indices
    return chosen.sort().values


def make_inputs(case: Case, device: torch.device, seed: int, requires_grad: bool) -> Inputs:
    """Input set number ``seed`` of ``case``: the same tensors for every provider."""
    shape = case.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.batch, shape.dim, generator=generator, device=device)
    weight = torch.randn(shape.classes, shape.dim, generator=generator, device=device)
    if case.loss == "ce":
        x = SCALE * F.normalize(x, dim=1)
        weight = F.normalize(weight, dim=1)
    dtype = DTYPES[shape.dtype]
    x = x.to(dtype).requires_grad_(requires_grad)
    weight = weight.to(dtype).requires_grad_(requires_grad)
    target = torch.randint(0, shape.classes, (shape.batch,), generator=generator, device=device)
    class_ids = sample_class_ids(target, shape.classes, shape.sample_rate, generator)
    return Inputs(x, weight, target, class_ids)


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------
# A step runs one forward (and backward) on one input set and returns the detached loss, or
# None for the bare GEMMs. A builder turns an input set into (step, tensors whose .grad to
# clear between runs); a provider's factory makes the builder for a case.
Step = Callable[[], torch.Tensor | None]
Builder = Callable[[Inputs], tuple[Step, list[torch.Tensor]]]


@dataclass(frozen=True)
class Provider:
    """A way to compute the loss (or the GEMM yardstick).

    ``unavailable(case, device)`` returns why the provider cannot run that case here (None when
    it can); ``factory(case)`` returns (builder, notes for the CSV row)."""

    name: str
    losses: frozenset[str]
    unavailable: Callable[[Case, torch.device], str | None]
    factory: Callable[[Case], tuple[Builder, str]]
    description: str = ""


def _loss_step(
    loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool
) -> tuple[Step, list[torch.Tensor]]:
    def step() -> torch.Tensor:
        # Clearing grads inside the step too: do_bench's warm-up runs would accumulate them.
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn()
        if backward:
            loss.backward()
        return loss.detach()

    return step, leaves


def _import_error(module: str, pip_name: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # any import failure (missing, or broken on this torch) skips it
        return f"{pip_name} is not importable ({type(exc).__name__}: {exc})"
    return None


def _margin_backend_provider(backend: str) -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        available = mk.available_backends(device, case.spec)
        if backend in available:
            return None
        try:
            mk.ops.resolve(backend, device, case.spec)
        except RuntimeError as exc:
            return str(exc)
        return f"backend {backend!r} is not among {available} on {device.type}"

    def factory(case: Case) -> tuple[Builder, str]:
        notes = ""
        if backend == "triton" and _interpreted():
            notes = "TRITON_INTERPRET=1"

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return mk.margin_cross_entropy(
                    inputs.x,
                    inputs.weight,
                    inputs.target,
                    case.spec,
                    backend=backend,
                    class_ids=inputs.class_ids,
                )

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, notes

    return Provider(
        backend,
        frozenset(LOSSES),
        unavailable,
        factory,
        f"margin_kernels backend={backend!r}",
    )


def _torch_compile_provider(compile_backend: str) -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return None if hasattr(torch, "compile") else "torch.compile needs torch >= 2.0"

    def factory(case: Case) -> tuple[Builder, str]:
        # A fresh compile per case: dynamo's per-function cache would otherwise hit its
        # recompile limit over the sweep and fall back to eager without a word.
        torch._dynamo.reset()

        def reference_loss(x, weight, target, class_ids):
            return mk.margin_cross_entropy(
                x, weight, target, case.spec, backend="torch", class_ids=class_ids
            )

        compiled = torch.compile(reference_loss, backend=compile_backend)

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return compiled(inputs.x, inputs.weight, inputs.target, inputs.class_ids)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, f"compile backend={compile_backend}"

    return Provider(
        "torch-compile",
        frozenset(LOSSES),
        unavailable,
        factory,
        "the torch reference under torch.compile",
    )


def _full_classes_only(case: Case) -> str | None:
    if case.shape.sample_rate < 1.0:
        return "it has no class sampling (Partial FC)"
    return None


def _pml_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return _import_error("pytorch_metric_learning.losses", "pytorch-metric-learning") or (
            _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from pytorch_metric_learning import losses

        spec = case.spec
        if case.loss == "arcface":
            # PML's ArcFace margin is in degrees; same s, same theta + m > pi fallback.
            make = lambda c, d: losses.ArcFaceLoss(  # noqa: E731
                c, d, margin=math.degrees(spec.m), scale=spec.s, collect_stats=False
            )
            notes = f"ArcFaceLoss(margin={math.degrees(spec.m):.4f} deg, scale={spec.s:g})"
        elif case.loss == "cosface":
            make = lambda c, d: losses.CosFaceLoss(  # noqa: E731
                c, d, margin=spec.m, scale=spec.s, collect_stats=False
            )
            notes = f"CosFaceLoss(margin={spec.m:g}, scale={spec.s:g})"
        else:
            # PML's SphereFace: |x| (psi_m(c)) with normalised W, i.e. ours with lambda = 0.
            make = lambda c, d: losses.SphereFaceLoss(  # noqa: E731
                c, d, margin=int(spec.m), scale=1, collect_stats=False
            )
            notes = f"SphereFaceLoss(margin={int(spec.m)}, scale=1)"

        def build(inputs: Inputs):
            num_classes, dim = inputs.weight.shape
            # Built with one class so that PML does not allocate and initialise its own C x D
            # matrix; then handed our W in its (D, C) layout (a transposed view, no copy).
            loss_module = make(1, dim)
            loss_module.num_classes = num_classes
            loss_module.W = torch.nn.Parameter(inputs.weight.detach().t())
            leaves = [inputs.x, loss_module.W]

            def loss_fn() -> torch.Tensor:
                return loss_module(inputs.x, inputs.target)

            return _loss_step(loss_fn, leaves, case.backward)

        return build, notes

    return Provider(
        "pml",
        frozenset({"arcface", "cosface", "sphereface"}),
        unavailable,
        factory,
        "pytorch-metric-learning's unfused ArcFaceLoss / CosFaceLoss / SphereFaceLoss",
    )


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "it needs a CUDA device"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_cuda_or_interpreter(device: torch.device) -> str | None:
    if device.type == "cuda" or _interpreted():
        return None
    return "it needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"


def _cce_provider(filtering: bool) -> Provider:
    name = "cce-filter" if filtering else "cce"

    def unavailable(case: Case, device: torch.device) -> str | None:
        return (
            _import_error("cut_cross_entropy", "cut-cross-entropy")
            or _needs_cuda(device)
            or _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from cut_cross_entropy import linear_cross_entropy

        # "auto": CCE's default threshold eps(dtype)/32 below which softmax entries are skipped
        # in the backward; None computes every gradient entry.
        filter_eps = "auto" if filtering else None

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return linear_cross_entropy(
                    inputs.x, inputs.weight, inputs.target, filter_eps=filter_eps
                )

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, f"filter_eps={filter_eps}"

    return Provider(
        name,
        frozenset({"ce"}),
        unavailable,
        factory,
        "cut-cross-entropy's linear_cross_entropy, gradient filtering "
        + ("on" if filtering else "off"),
    )


def _liger_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return (
            _import_error("liger_kernel.transformers.functional", "liger-kernel")
            or _needs_cuda_or_interpreter(device)
            or _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return liger_fused_linear_cross_entropy(inputs.x, inputs.weight, inputs.target)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        # Liger computes the gradients inside its forward when inputs require grad.
        notes = "gradients computed in the forward"
        if _interpreted():
            notes += "; TRITON_INTERPRET=1"
        return build, notes

    return Provider(
        "liger",
        frozenset({"ce"}),
        unavailable,
        factory,
        "Liger's fused linear cross-entropy",
    )


def _torch_lce_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
        return _full_classes_only(case)

    def factory(case: Case) -> tuple[Builder, str]:
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        # The chunked path (no B x C logits) exists only with an options object.
        options = {"options": options_cls()} if options_cls is not None else {}
        notes = "chunked (LinearCrossEntropyOptions())" if options else "reference path"

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return F.linear_cross_entropy(inputs.x, inputs.weight, inputs.target, **options)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, notes

    return Provider(
        "torch-lce",
        frozenset({"ce"}),
        unavailable,
        factory,
        "torch.nn.functional.linear_cross_entropy",
    )


def _gemm_provider() -> Provider:
    def factory(case: Case) -> tuple[Builder, str]:
        backward = case.backward

        def build(inputs: Inputs):
            x = inputs.x.detach()
            # The sampled classes as one contiguous (S, D) matrix: the GEMMs a fused Partial-FC
            # kernel does, without the gather.
            w = inputs.weight.detach()
            if inputs.class_ids is not None:
                w = w[inputs.class_ids].contiguous()
            dz = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

            def step() -> None:
                torch.mm(x, w.t())  # Z = X W^T: (B, S)
                if backward:
                    torch.mm(dz, w)  # dX = dZ W: (B, D)
                    torch.mm(dz.t(), x)  # dW = dZ^T X: (S, D)

            return step, []

        return build, "X W^T" + (", dZ W, dZ^T X" if backward else "")

    return Provider(
        GEMM_PROVIDER,
        frozenset(LOSSES),
        lambda case, device: None,
        factory,
        "the bare GEMMs of the same shapes through torch.mm (cuBLAS on GPU)",
    )


def all_providers(compile_backend: str) -> dict[str, Provider]:
    """Every provider the harness knows, by name, in the order of the CSV rows."""
    providers = [
        _gemm_provider(),
        _margin_backend_provider("triton"),
        _margin_backend_provider("cuda"),
        _margin_backend_provider("torch"),
        _torch_compile_provider(compile_backend),
        _pml_provider(),
        _cce_provider(filtering=False),
        _cce_provider(filtering=True),
        _liger_provider(),
        _torch_lce_provider(),
    ]
    return {p.name: p for p in providers}


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    status: str = "ok"
    time_ms: float = math.nan
    time_p20_ms: float = math.nan
    time_p80_ms: float = math.nan
    timer: str = ""
    peak_extra_mb: float = math.nan
    loss_value: float = math.nan
    sampled_classes: int = 0
    input_sets: int = 0
    notes: list[str] = field(default_factory=list)


def _quantiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    q = torch.tensor(list(times_ms), dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    )
    return float(q[0]), float(q[1]), float(q[2])


def time_step(
    step: Callable[[], object], leaves: list[torch.Tensor], device: torch.device, args
) -> tuple[float, float, float, str]:
    """(median, p20, p80) milliseconds of ``step`` and the name of the timer used."""
    if device.type == "cuda" and HAS_TRITON:
        median, p20, p80 = triton.testing.do_bench(
            step,
            warmup=args.warmup_ms,
            rep=args.rep_ms,
            grad_to_none=leaves or None,
            quantiles=[0.5, 0.2, 0.8],
        )
        return median, p20, p80, "triton.do_bench"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.cpu_warmup):
        step()
    sync()
    times = []
    for _ in range(args.cpu_reps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return (*_quantiles(times), "perf_counter")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def num_input_sets(case: Case, device: torch.device, args) -> int:
    """How many input sets to cycle through so that the cycled inputs exceed ``args.rotate_mb``
    (a few times the L2 cache): small cases would otherwise run with warm caches."""
    if args.input_sets:
        return args.input_sets
    shape = case.shape
    itemsize = torch.empty((), dtype=DTYPES[shape.dtype]).element_size()
    set_bytes = (shape.batch + shape.classes) * shape.dim * itemsize
    return max(1, min(args.max_input_sets, math.ceil(args.rotate_mb * 2**20 / set_bytes)))


def _release(device: torch.device) -> None:
    # Only the GPU's memory figures depend on returning everything between providers.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def measure(provider: Provider, case: Case, device: torch.device, args) -> Measurement:
    """Time one provider on one case; OOM and other failures become the row's status."""
    result = Measurement()
    steps: list[Step] = []
    leaves: list[torch.Tensor] = []
    try:
        builder, notes = provider.factory(case)
        if notes:
            result.notes.append(notes)
        # Both modes run a training forward (inputs require grad); "fwd" stops before backward.
        requires_grad = provider.name != GEMM_PROVIDER
        result.input_sets = num_input_sets(case, device, args)
        for index in range(result.input_sets):
            inputs = make_inputs(case, device, args.seed + index, requires_grad)
            result.sampled_classes = inputs.num_sampled
            step, set_leaves = builder(inputs)
            steps.append(step)
            leaves.extend(set_leaves)
        cycle = itertools.cycle(steps)

        def rotating_step():
            return next(cycle)()

        # Warm-up (autotuning, compilation) first; on CUDA a second step is the memory probe.
        loss = steps[0]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            loss = steps[0]()
            torch.cuda.synchronize(device)
            result.peak_extra_mb = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        if loss is not None:
            result.loss_value = float(loss)
        result.time_ms, result.time_p20_ms, result.time_p80_ms, result.timer = time_step(
            rotating_step, leaves, device, args
        )
    except Exception as exc:  # recorded in the row; the sweep goes on
        result.status = "OOM" if _is_oom(exc) else "ERROR"
        result.notes.append(_one_line(exc))
    finally:
        del steps, leaves
        _release(device)
    return result


# --------------------------------------------------------------------------------------------
# environment and output
# --------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()}"


def slug(text: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(device: torch.device) -> dict[str, str]:
    """The columns every row repeats: where and with what it was measured."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__ if HAS_TRITON else "",
        "cuda": torch.version.cuda or "",
        "margin_kernels": mk.__version__,
        "git_rev": _git_rev(),
    }


class CsvSink:
    """Appends rows to a CSV, writing the header when the file is new; one flush per row so an
    interrupted sweep keeps what it measured."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            if tuple(header) != COLUMNS:
                raise ValueError(
                    f"{path} has other columns than this harness writes; "
                    "move it away or pass another --out"
                )
        self._handle = path.open("a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS)
        if new:
            self._writer.writeheader()

    def write(self, row: dict[str, object]) -> None:
        self._writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


# --------------------------------------------------------------------------------------------
# predictions of bench/model.py beside the measurements
# --------------------------------------------------------------------------------------------
MODELLED_PROVIDERS = ("triton", "cuda", GEMM_PROVIDER)
_MODEL_CACHE: list = []


def _performance_model():
    """bench/model.py, loaded by path once (bench/ is not a package); None if it fails to load."""
    if not _MODEL_CACHE:
        try:
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "bench_performance_model", Path(__file__).with_name("model.py")
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        except (ImportError, OSError, AttributeError):
            module = None
        _MODEL_CACHE.append(module)
    return _MODEL_CACHE[0]


def predicted_for(provider: str, case: Case, device: str) -> dict | None:
    """bench/model.py's prediction for a measured row, when the provider is modelled and the
    device is an H100 or H200 (None otherwise, e.g. on CPU)."""
    name = device.lower()
    machine = "h200" if "h200" in name else "h100" if "h100" in name else None
    model = _performance_model() if machine and provider in MODELLED_PROVIDERS else None
    if model is None:
        return None
    shape = case.shape
    try:
        return model.predict(
            provider,
            shape.batch,
            shape.classes,
            shape.dim,
            shape.dtype,
            case.spec.kind,
            shape.sample_rate,
            shape.mode,
            machine=machine,
        )
    except ValueError:
        return None


def gemm_tflop(case: Case, sampled_classes: int) -> float:
    """Useful GEMM work in TFLOP: 2 B S D for the forward logits, 3x that with the backward
    (dX and dW are GEMMs of the same size); recomputation inside a provider is not counted."""
    shape = case.shape
    flop = 2.0 * shape.batch * sampled_classes * shape.dim
    return (3.0 if case.backward else 1.0) * flop / 1e12


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------
def shapes(config: dict) -> list[Shape]:
    return [
        Shape(dtype, mode, batch, classes, config["dim"], rate)
        for dtype, mode, batch, classes, rate in itertools.product(
            config["dtypes"],
            config["modes"],
            config["batch"],
            config["classes"],
            config["sample_rates"],
        )
    ]


def plan(
    config: dict, providers: dict[str, Provider], device: torch.device, say: Callable[[str], None]
) -> list[tuple[Provider, Case]]:
    """The (provider, case) pairs to measure, GEMM yardstick first in every shape group. Pairs
    that cannot run here are announced once per (provider, reason) and left out."""
    work = []
    announced = set()
    for shape in shapes(config):
        for provider in providers.values():
            losses = ["gemm"] if provider.name == GEMM_PROVIDER else config["losses"]
            for loss in losses:
                if provider.name != GEMM_PROVIDER and loss not in provider.losses:
                    continue
                # the GEMM yardstick is loss-independent; any loss spec builds its inputs
                case = Case(config["losses"][0] if loss == "gemm" else loss, shape)
                reason = provider.unavailable(case, device)
                if reason is not None:
                    key = (provider.name, reason)
                    if key not in announced:
                        announced.add(key)
                        say(f"skipping {provider.name}: {reason}")
                    continue
                work.append((provider, case))
    return work


def sweep(config: dict, providers: dict[str, Provider], device: torch.device, args) -> Path:
    """Measure every planned pair and append the rows; returns the CSV path."""
    env = environment(device)
    out_dir = Path(args.out) if args.out else (SMOKE_OUT_DIR if args.smoke else RESULTS_DIR)
    sink = CsvSink(out_dir / f"{slug(env['device'])}.csv")
    say = tqdm.write if HAS_TQDM else print
    work = plan(config, providers, device, say)
    gemm_ms: dict[Shape, float] = {}
    # In a log (no terminal) one progress line every 30 s instead of one per run.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(work, desc="bench", unit="run", mininterval=interval) if HAS_TQDM else work
    try:
        for provider, case in bar:
            is_gemm = provider.name == GEMM_PROVIDER
            label = "gemm" if is_gemm else case.loss
            if HAS_TQDM:
                bar.set_postfix_str(
                    f"{provider.name} {label} {_shape_label(case.shape)}", refresh=False
                )
            result = measure(provider, case, device, args)
            if is_gemm and result.status == "ok":
                gemm_ms[case.shape] = result.time_ms
            work_tflop = gemm_tflop(case, result.sampled_classes or case.shape.classes)
            seconds = result.time_ms * 1e-3
            predicted = predicted_for(provider.name, case, env["device"])
            if predicted is not None:
                ratio = result.time_ms / predicted["predicted_ms"]
                result.notes.append(
                    f"predicted {predicted['predicted_ms']:.4g} ms by bench/model.py "
                    f"({predicted['machine']}), measured/predicted {ratio:.2f}"
                )
                if result.status == "ok":
                    say(
                        f"{provider.name} {label} {_shape_label(case.shape)}: measured "
                        f"{result.time_ms:.4g} ms, predicted {predicted['predicted_ms']:.4g} ms"
                    )
            sink.write(
                {
                    **env,
                    "provider": provider.name,
                    "loss": label,
                    "dtype": case.shape.dtype,
                    "mode": case.shape.mode,
                    "batch": case.shape.batch,
                    "classes": case.shape.classes,
                    "dim": case.shape.dim,
                    "sample_rate": case.shape.sample_rate,
                    "sampled_classes": result.sampled_classes,
                    "input_sets": result.input_sets,
                    "status": result.status,
                    "time_ms": result.time_ms,
                    "time_p20_ms": result.time_p20_ms,
                    "time_p80_ms": result.time_p80_ms,
                    "timer": result.timer,
                    "peak_extra_mb": result.peak_extra_mb,
                    "gemm_tflop": work_tflop,
                    "tflops": work_tflop / seconds if seconds > 0 else math.nan,
                    "vs_gemm": result.time_ms / gemm_ms.get(case.shape, math.nan),
                    "loss_value": result.loss_value,
                    "notes": "; ".join(result.notes),
                }
            )
            if result.status != "ok":
                say(f"{result.status}: {provider.name} {label} {_shape_label(case.shape)}")
    finally:
        sink.close()
    return sink.path


def _shape_label(shape: Shape) -> str:
    rate = "" if shape.sample_rate >= 1 else f" r={shape.sample_rate:g}"
    return f"{shape.dtype} {shape.mode} B={shape.batch} C={shape.classes}{rate}"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _split(values: Iterable[str] | None) -> list[str] | None:
    """Accept both ``--x a b`` and ``--x a,b``."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def _ints(values: list[str]) -> tuple[int, ...]:
    # "1e6" and "1_000_000" both mean one million
    return tuple(int(float(v.replace("_", ""))) for v in values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    multi = {"nargs": "+", "default": None}
    parser.add_argument("--smoke", action="store_true", help="tiny CPU sweep (CI)")
    parser.add_argument("--providers", **multi, help="subset of providers (default: all)")
    parser.add_argument("--losses", **multi, help=f"subset of {list(LOSSES)}")
    parser.add_argument("--dtypes", **multi, help=f"subset of {list(DTYPES)}")
    parser.add_argument("--modes", **multi, help=f"subset of {list(MODES)}")
    parser.add_argument("--batch", **multi, help="batch sizes B")
    parser.add_argument("--classes", **multi, help="class counts C (1e6 is accepted)")
    parser.add_argument("--dim", type=int, default=None, help="feature dim D")
    parser.add_argument(
        "--sample-rates", **multi, help="Partial-FC rates r (1 = all classes; default 1 0.1)"
    )
    parser.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    parser.add_argument("--out", default=None, help="output directory of the CSV")
    parser.add_argument(
        "--results",
        action="store_true",
        help="with --smoke: write into bench/results/ instead of out/bench/",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time")
    parser.add_argument(
        "--cpu-warmup", type=int, default=None, help="extra untimed runs, CPU timer (1; smoke 0)"
    )
    parser.add_argument(
        "--cpu-reps", type=int, default=None, help="timed runs, CPU timer (5; smoke 2)"
    )
    parser.add_argument(
        "--rotate-mb",
        type=float,
        default=None,
        help="cycle input sets until they exceed this many MiB (default 4x L2, CPU 64)",
    )
    parser.add_argument("--max-input-sets", type=int, default=4)
    parser.add_argument(
        "--input-sets", type=int, default=None, help="fixed number of input sets (smoke 2)"
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager in --smoke)",
    )
    parser.add_argument("--list", action="store_true", help="list providers and exit")
    args = parser.parse_args(argv)
    for name in ("providers", "losses", "dtypes", "modes", "batch", "classes", "sample_rates"):
        setattr(args, name, _split(getattr(args, name)))
    if args.results:
        args.out = str(RESULTS_DIR)
    smoke_or_full = (lambda smoke, full: smoke) if args.smoke else (lambda smoke, full: full)
    if args.cpu_warmup is None:
        args.cpu_warmup = smoke_or_full(0, 1)
    if args.cpu_reps is None:
        args.cpu_reps = smoke_or_full(2, 5)
    if args.input_sets is None:
        args.input_sets = smoke_or_full(2, 0)
    return args


def sweep_config(args: argparse.Namespace) -> dict:
    """The sweep's axes: the full (or smoke) defaults narrowed by the flags; validates them."""
    config = dict(SMOKE_SWEEP if args.smoke else FULL_SWEEP)
    if args.losses:
        unknown = sorted(set(args.losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"--losses: unknown {unknown}; choose from {list(LOSSES)}")
        config["losses"] = tuple(args.losses)
    if args.dtypes:
        dtypes = tuple(DTYPE_ALIASES.get(d, d) for d in args.dtypes)
        unknown = sorted(set(dtypes) - set(DTYPES))
        if unknown:
            raise ValueError(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
        config["dtypes"] = dtypes
    if args.modes:
        unknown = sorted(set(args.modes) - set(MODES))
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; choose from {list(MODES)}")
        config["modes"] = tuple(args.modes)
    if args.batch:
        config["batch"] = _ints(args.batch)
    if args.classes:
        config["classes"] = _ints(args.classes)
    if args.dim:
        config["dim"] = args.dim
    if args.sample_rates:
        rates = tuple(float(r) for r in args.sample_rates)
        if any(not 0 < r <= 1 for r in rates):
            raise ValueError(f"--sample-rates must lie in (0, 1], got {rates}")
        config["sample_rates"] = rates
    if min(config["batch"]) < 1 or min(config["classes"]) < 2 or config["dim"] < 1:
        raise ValueError("--batch, --classes and --dim must be positive (C >= 2)")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if args.compile_backend is None:
        # inductor's first CPU compile costs ~25 s; aot_eager keeps the smoke run's wiring
        # check fast (CPU timings mean nothing anyway)
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.rotate_mb is None:
        l2_bytes = (
            torch.cuda.get_device_properties(device).L2_cache_size
            if device.type == "cuda"
            else 16 * 2**20
        )
        args.rotate_mb = 4 * l2_bytes / 2**20
    providers = all_providers(args.compile_backend)
    if args.list:
        for provider in providers.values():
            print(f"{provider.name:14s} {provider.description}")
        return 0
    if args.providers:
        unknown = sorted(set(args.providers) - set(providers))
        if unknown:
            raise ValueError(f"--providers: unknown {unknown}; choose from {list(providers)}")
        providers = {n: p for n, p in providers.items() if n in args.providers}
    elif args.smoke:
        # inductor or not, compiling every smoke case would dominate CI's time
        del providers["torch-compile"]
        print("--smoke leaves torch-compile out; name it in --providers to include it")
    config = sweep_config(args)
    if device.type == "cpu" and not args.smoke:
        print("note: CPU timings use perf_counter and record no memory (peak_extra_mb = nan)")
    path = sweep(config, providers, device, args)
    print(f"results appended to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:  # bad command line: the message, not a traceback
        sys.exit(f"error: {exc}")
