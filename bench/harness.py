"""How the benchmark measures and records: timing, memory, one CSV row per measurement.

``measure`` times one provider on one case (triton.testing.do_bench on a GPU, perf_counter
elsewhere) and probes its peak extra GPU memory; a failure becomes the row's status (``OOM`` or
``ERROR``), never a crash. ``CsvSink`` appends rows under ``COLUMNS`` (meanings in
bench/README.md); ``environment`` is what every row repeats about where it was measured;
``predicted_for`` puts bench/model.py's prediction beside a GPU measurement. ``LiveBytes`` counts
the peak bytes operators allocate, for CPU memory figures (bench/cpu_chunks.py).
"""

from __future__ import annotations

import csv
import datetime
import gc
import importlib.util
import itertools
import math
import platform
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from providers import DTYPES, GEMM_PROVIDER, Case, Provider, Step, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import margin_kernels as mk

try:
    import triton
    import triton.testing

    HAS_TRITON = True
except ImportError:  # CUDA timing falls back to perf_counter around synchronised steps
    HAS_TRITON = False

REPO_ROOT = Path(__file__).resolve().parents[1]

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


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """What one measurement found: ``status`` "ok", "OOM" or "ERROR"; median, p20 and p80 step
    times in ms and the timer's name; peak memory above the inputs in MiB (NaN on CPU); the loss
    of the first input set (NaN for the GEMMs); S and the number of input sets; notes for the
    row (provider settings, error message). Figures not measured stay NaN."""

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
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = perf_counter_ms(step, args.cpu_warmup, args.cpu_reps, sync)
    return (*_quantiles(times), "perf_counter")


def perf_counter_ms(
    step: Callable[[], object],
    warmup: int,
    reps: int,
    sync: Callable[[], object] | None = None,
) -> list[float]:
    """Wall time in ms of each of ``reps`` calls of ``step`` after ``warmup`` untimed ones;
    ``sync`` (e.g. torch.cuda.synchronize) runs inside every timed region so that queued
    device work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


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
    interrupted sweep keeps what it measured. ``columns``: the header (the sweep's ``COLUMNS``
    unless a script writes its own table); an existing file must have exactly that header."""

    def __init__(self, path: Path, columns: Sequence[str] = COLUMNS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.columns = tuple(columns)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            if tuple(header) != self.columns:
                raise ValueError(
                    f"{path} has other columns than this harness writes; "
                    "move it away or pass another --out"
                )
        self._handle = path.open("a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns)
        if new:
            self._writer.writeheader()

    def write(self, row: dict[str, object]) -> None:
        self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> CsvSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def gemm_tflop(case: Case, sampled_classes: int) -> float:
    """Useful GEMM work in TFLOP: 2 B S D for the forward logits, 3x that with the backward
    (dX and dW are GEMMs of the same size); recomputation inside a provider is not counted."""
    shape = case.shape
    flop = 2.0 * shape.batch * sampled_classes * shape.dim
    return (3.0 if case.backward else 1.0) * flop / 1e12


def measurement_row(
    env: dict[str, str],
    provider: str,
    loss: str,
    case: Case,
    result: Measurement,
    gemm_ms: float,
) -> dict[str, object]:
    """The CSV row of one measurement: ``env`` (from ``environment``), the case, the timings, and
    the derived work figures; ``gemm_ms`` is the bare GEMMs' time at the same shape (NaN when
    not measured), ``loss`` the row's loss label ("gemm" for the yardstick)."""
    shape = case.shape
    work_tflop = gemm_tflop(case, result.sampled_classes or shape.classes)
    seconds = result.time_ms * 1e-3
    return {
        **env,
        "provider": provider,
        "loss": loss,
        "dtype": shape.dtype,
        "mode": shape.mode,
        "batch": shape.batch,
        "classes": shape.classes,
        "dim": shape.dim,
        "sample_rate": shape.sample_rate,
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
        "vs_gemm": result.time_ms / gemm_ms,
        "loss_value": result.loss_value,
        "notes": "; ".join(result.notes),
    }


# --------------------------------------------------------------------------------------------
# predictions of bench/model.py beside the measurements
# --------------------------------------------------------------------------------------------
MODELLED_PROVIDERS = ("triton", "cuda", GEMM_PROVIDER)
_MODEL_CACHE: list = []


def _performance_model():
    """bench/model.py, loaded by path once (bench/ is not a package); None if it fails to load."""
    if not _MODEL_CACHE:
        try:
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


def prediction_note(predicted: dict, measured_ms: float) -> str:
    """A row's note on a ``predicted_for`` prediction: predicted ms and measured/predicted."""
    ratio = measured_ms / predicted["predicted_ms"]
    return (
        f"predicted {predicted['predicted_ms']:.4g} ms by bench/model.py "
        f"({predicted['machine']}), measured/predicted {ratio:.2f}"
    )


# --------------------------------------------------------------------------------------------
# CPU memory
# --------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated by operators while the mode is on (``peak``), counted
    from allocation until Python frees the storage; storages an operator returns from its inputs
    (views, in-place results) are not counted again. torch's CPU allocator is invisible to
    tracemalloc, so this is how CPU memory is measured."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key in self._sizes or key in inputs:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


# --------------------------------------------------------------------------------------------
# command lines of the bench scripts
# --------------------------------------------------------------------------------------------
def split_values(values: Iterable[str] | None) -> list[str] | None:
    """The values of a multi-valued flag, accepting both ``--x a b`` and ``--x a,b``."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]
