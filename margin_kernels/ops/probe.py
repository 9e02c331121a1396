"""First-use parity probes: a compiled backend serves a combination only after it matched the
float64 reference there.

A combination is (backend, its ``lse_parts`` function, device, dtype, margin kind with the
hyper-parameters the kernels compile in, the kernel path, with/without ``class_ids``). The kernel
path is what the backend's launch plan picks for the caller's D and layout (:func:`plan_for`):
for Triton the forward and dW tiles, whether D is held on chip in one step, whether D fills the
last tile and whether the operands are aligned; for the CUDA backend whether the chunk of W is
read in place or copied and whether dL/dz gets a separate 16-bit buffer.

What a probe runs (:func:`run_probe`): a small problem on the same device that takes the same
path, spanning several tiles with a tail in every dimension the plan tiles (rows, classes, D
slices, class chunks and epilogue segments), one row without a target, through the backend
module's ``lse_parts`` as the loss calls it; then the per-row loss, dX and dW of a weighted sum
of it are compared element-wise with the float64 reference of the same rounded inputs.

Bound of an element e of a quantity q (loss, dX, dW)::

    |got_e - exact_e| <= OWN_FACTOR * (|own_e - exact_e| + rms(own - exact))
                         + REL[dtype][q] * |exact_e| + ABS[dtype][q] * max|exact|

where ``own`` is PyTorch's own result on the same inputs in that dtype (the reference computes
in float32 for 16-bit inputs and rounds its gradients to the input dtype). At the largest entry
of each quantity this is below 1 % in every dtype, so a 1 % error in that entry (or in the row
or class that holds it) fails (tests/test_probe.py perturbs single entries to show it).

Results are cached per process; ``MARGIN_KERNELS_PROBE`` chooses ``off`` (serve compiled kernels
on availability alone), ``process`` (the default: probe once per combination per process, write
nothing) or ``persistent`` (also keep the results in a JSON file, ``MARGIN_KERNELS_PROBE_CACHE``
or ``~/.cache/margin_kernels/probes.json``, keyed by the GPU name, driver, torch, Triton, this
package's version and the ``_C`` build, so that a change of any of them probes again). The
default writes no file because a result on disk outlives the code that produced it in ways the
key cannot see (an edited source checkout keeps its version number).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType

import torch

from .. import _extension, reference
from .._version import __version__
from ..spec import GRAD_MODES, KINDS, OVERFLOW_POLICIES, MarginSpec
from . import cuda
from .triton import config as triton_config

__all__ = [
    "ABS",
    "CACHE_ENV",
    "MODES",
    "MODE_ENV",
    "OWN_FACTOR",
    "REL",
    "Layout",
    "ProbeFailure",
    "ProbePlan",
    "ProbeResult",
    "ProbeWarning",
    "clear_probes",
    "layout_of",
    "mode",
    "probe_report",
]

MODE_ENV = "MARGIN_KERNELS_PROBE"
CACHE_ENV = "MARGIN_KERNELS_PROBE_CACHE"
MODES = ("off", "process", "persistent")
DEFAULT_MODE = "process"

# The oracle is bound once, here: a test that replaces reference.lse_parts (or a backend that
# calls it) cannot move the yardstick of the probe.
_ORACLE_LSE_PARTS = reference.lse_parts

QUANTITIES = ("loss", "dX", "dW")
OWN_FACTOR = 1.5
# Per dtype and quantity: REL of |exact_e| and ABS of max|exact|. Losses are float32 for every
# non-float64 input; 16-bit gradients are rounded to 11 (fp16) / 8 (bf16) significant bits, half
# a unit in the last place being 2.4e-4 / 2.0e-3. float64: every backend computes in float64
# throughout (the fused kernels' arccos included), so errors stay at rounding level.
REL = {
    torch.float64: {"loss": 1e-12, "dX": 1e-12, "dW": 1e-12},
    torch.float32: {"loss": 1e-5, "dX": 1e-4, "dW": 1e-4},
    torch.float16: {"loss": 1e-4, "dX": 5e-4, "dW": 5e-4},
    torch.bfloat16: {"loss": 1e-4, "dX": 4e-3, "dW": 4e-3},
}
ABS = {
    torch.float64: {"loss": 1e-12, "dX": 1e-12, "dW": 1e-12},
    torch.float32: {"loss": 1e-5, "dX": 2e-5, "dW": 2e-5},
    torch.float16: {"loss": 1e-4, "dX": 5e-4, "dW": 5e-4},
    torch.bfloat16: {"loss": 1e-4, "dX": 4e-3, "dW": 4e-3},
}
# Rows of dX and class rows of dW, as vectors: ||got_r - exact_r|| <= OWN_FACTOR ||own_r - exact_r||
# + ROW_REL ||exact_r|| + ROW_ABS max_r ||exact_r||. Rounding errors of a correct kernel are
# uncorrelated along a row, a wrong row is off as a whole: in bf16, where a 1 % error in one
# entry is one or two units in the last place, as a correct kernel's worst entry can be, this is
# what sees a row or a class 1 % off.
ROW_REL = {
    torch.float64: 1e-12,
    torch.float32: 5e-5,
    torch.float16: 5e-4,
    torch.bfloat16: 3e-3,
}
ROW_ABS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-4,
    torch.bfloat16: 1e-3,
}
DTYPE_NAMES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


class ProbeWarning(RuntimeWarning):
    """A compiled backend failed its first-use probe and "auto" skipped it."""


class ProbeFailure(RuntimeError):
    """An explicitly named backend failed its first-use probe on this machine."""


@dataclass(frozen=True)
class Layout:
    """What of the inputs picks a kernel path: dtype, D, strides, base alignment, Partial FC."""

    dtype: torch.dtype
    dim: int
    x_strides: tuple[int, int]
    w_strides: tuple[int, int]
    ptrs_aligned: bool
    has_ids: bool

    def aligned(self) -> bool:
        """Triton's alignment rule (``config.is_aligned``) on the recorded strides and bases."""
        return (
            self.dim % 16 == 0
            and self.ptrs_aligned
            and all(s[1] == 1 and s[0] % 16 == 0 for s in (self.x_strides, self.w_strides))
        )


def layout_of(x: torch.Tensor, weight: torch.Tensor, class_ids: torch.Tensor | None) -> tuple:
    """The fields of the :class:`Layout` of a call, as a tuple (torch.compile passes plain
    constants to the dispatcher). Under torch.compile the tensors are fake and have no address:
    their bases are taken as aligned (the allocator's, for every fresh tensor)."""
    compiling = torch.compiler.is_compiling()
    ptrs = compiling or (x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)
    return (
        weight.dtype,
        int(x.shape[1]),
        (int(x.stride(0)), int(x.stride(1))),
        (int(weight.stride(0)), int(weight.stride(1))),
        bool(ptrs),
        class_ids is not None,
    )


@dataclass(frozen=True)
class ProbePlan:
    """The probe problem of one kernel path.

    ``path`` names the path (hashable); ``batch``/``num_classes``/``dim`` the problem,
    ``num_sampled`` the Partial-FC ids (None: all classes); ``layout`` of x and W: "contiguous",
    "padded" (rows of an odd stride, unaligned) or "column_major" (W only); ``options``: extra
    keywords for this probe's ``lse_parts`` call."""

    path: tuple
    batch: int
    num_classes: int
    dim: int
    num_sampled: int | None = None
    x_layout: str = "contiguous"
    w_layout: str = "contiguous"
    options: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class ProbeResult:
    """One probed combination, as :func:`probe_report` lists it."""

    backend: str
    function: str
    device: str
    gpu: str
    dtype: str
    kind: str
    path: str
    class_ids: bool
    ok: bool
    detail: str  # worst quantity against its bound, or the exception
    worst_ratio: float  # largest error / bound over the quantities (inf when it raised or NaN)
    seconds: float
    source: str  # "run" or "disk"
    problem: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.backend} ({self.function}) on {self.device} [{self.gpu}] {self.dtype} "
            f"{self.kind} path {self.path} class_ids={self.class_ids}: {status}, {self.detail} "
            f"({self.source}, {self.seconds:.3f} s)"
        )


# --- modes and environment ---------------------------------------------------------------------
def mode() -> str:
    """``MARGIN_KERNELS_PROBE``: "off", "process" (default) or "persistent"."""
    value = os.environ.get(MODE_ENV, DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {value!r}")
    return value


def _triton_version() -> str:
    module = sys.modules.get("triton")
    return getattr(module, "__version__", "not installed") if module else "not installed"


def _driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version") as handle:
            first = handle.readline()
    except OSError:
        return "unknown"
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else "unknown"


def _extension_build() -> str:
    """The ``_C`` build: its record (torch, CUDA, archs) and the file's size and mtime."""
    info = _extension.build_info() or {}
    module = sys.modules.get("margin_kernels._C")
    stamp = "not loaded"
    path = getattr(module, "__file__", None)
    if path:
        stat = os.stat(path)
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    record = ",".join(f"{k}={info.get(k)}" for k in ("TORCH_VERSION", "CUDA_ARCH_LIST"))
    return f"{record},{stamp}"


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def versions() -> str:
    """torch, Triton, CUDA runtime and driver, this package: as the warning names them."""
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, driver "
        f"{_driver_version()}), Triton {_triton_version()}, margin_kernels {__version__}"
    )


def _fingerprint(device: torch.device) -> str:
    """What a persistent result is valid for: a change of any part probes again."""
    return "|".join(
        (
            gpu_name(device),
            _driver_version(),
            torch.__version__,
            _triton_version(),
            __version__,
            _extension_build(),
        )
    )


def _cache_path() -> str:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "margin_kernels", "probes.json")


def _read_disk() -> dict:
    try:
        with open(_cache_path()) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_disk(key: str, result: ProbeResult) -> None:
    """Add one result to the JSON file (written to a temporary file, then renamed)."""
    path = _cache_path()
    data = _read_disk()
    data[key] = asdict(result)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training
        warnings.warn(f"margin_kernels could not write its probe cache {path}: {exc}", stacklevel=3)


# --- kernel paths and probe problems -----------------------------------------------------------
def spec_key(spec: MarginSpec) -> tuple:
    """The margin as the kernels compile it: kind, psi order, gradient and overflow conventions
    (s, m and the other real parameters are runtime values of one compiled kernel)."""
    psi_m = int(spec.m) if KINDS[spec.kind].psi else 0
    return (spec.kind, psi_m, GRAD_MODES[spec.grad_mode], OVERFLOW_POLICIES[spec.overflow])


def _triton_path(layout: Layout, dim: int, family: int, aligned: bool) -> tuple:
    fwd = triton_config.gemm_tile(layout.dtype, family, dim, aligned=aligned)
    dw = triton_config.gemm_tile(
        layout.dtype, family, dim, aligned=aligned, kernel="dw", has_ids=layout.has_ids
    )
    return (
        ("fwd", *asdict(fwd).values(), fwd.one_k(dim), dim % fwd.block_out == 0),
        ("dw", *asdict(dw).values(), dw.one_k(dim), dim % dw.block_out == 0),
        ("aligned", aligned),
    )


def _triton_plan(layout: Layout, spec: MarginSpec) -> ProbePlan:
    """The smallest D with the caller's Triton path (tiles, one K step or D slices, D filling the
    last tile or not, alignment); rows over one tile plus a tail, classes over two plus a tail."""
    family = KINDS[spec.kind].family_id
    aligned = layout.aligned()
    path = _triton_path(layout, layout.dim, family, aligned)
    dim = layout.dim
    # not below 8 (or D): at D = 1 a normalised W has no tangent space and dW is exactly 0
    for candidate in range(min(layout.dim, 8), layout.dim + 1):
        if aligned and candidate % 16:
            continue
        if _triton_path(layout, candidate, family, aligned) == path:
            dim = candidate
            break
    fwd = triton_config.gemm_tile(layout.dtype, family, dim, aligned=aligned)
    dw = triton_config.gemm_tile(
        layout.dtype, family, dim, aligned=aligned, kernel="dw", has_ids=layout.has_ids
    )
    rows = max(fwd.block_m, dw.block_m) + 3
    cols = 2 * max(fwd.block_n, dw.block_n) + 5
    return ProbePlan(
        path=path,
        batch=rows,
        num_classes=cols + 7 if layout.has_ids else cols,
        dim=dim,
        num_sampled=cols if layout.has_ids else None,
        x_layout="contiguous" if aligned else "padded",
        w_layout="contiguous" if aligned else "padded",
    )


def _cuda_plan(layout: Layout, spec: MarginSpec, device: torch.device) -> ProbePlan:
    """Two class chunks (the second short), the first cut into two epilogue segments (the
    second short): the per-row LSE merge across chunks and across segments, with a small B and
    D (the GEMMs are torch's)."""
    row_major = layout.w_strides[1] == 1
    separate = layout.dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
    path = ("w rows in place" if row_major else "w chunk copied", ("separate dz", separate))
    batch, dim = 9, 20
    per_chunk = 2 * cuda.MIN_SEGMENT + 77
    cols = per_chunk + 131
    per_class = cuda.class_bytes(batch, dim, layout.dtype, spec.kind, layout.has_ids, device.type)
    return ProbePlan(
        path=path,
        batch=batch,
        num_classes=cols + 40 if layout.has_ids else cols,
        dim=dim,
        num_sampled=cols if layout.has_ids else None,
        w_layout="contiguous" if row_major else "column_major",
        options=(("chunk_bytes", per_chunk * per_class),),
    )


def _default_plan(layout: Layout, spec: MarginSpec) -> ProbePlan:
    cols = 53
    return ProbePlan(
        path=("default",),
        batch=37,
        num_classes=cols + 7 if layout.has_ids else cols,
        dim=min(layout.dim, 40),
        num_sampled=cols if layout.has_ids else None,
    )


def plan_for(name: str, layout: Layout, spec: MarginSpec, device: torch.device) -> ProbePlan:
    """The probe problem that takes the kernel path of ``layout`` on backend ``name``."""
    if name == "triton":
        return _triton_plan(layout, spec)
    if name == "cuda":
        return _cuda_plan(layout, spec, device)
    return _default_plan(layout, spec)


# --- the probe ---------------------------------------------------------------------------------
def _matrix(rows: int, cols: int, layout: str, gen: torch.Generator, dtype, device):
    values = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "padded":
        stride = cols + 1 if (cols + 1) % 16 else cols + 2
        base = torch.zeros(rows, stride, dtype=dtype)
        base[:, :cols] = values
        return base.to(device)[:, :cols]
    if layout == "column_major":
        return values.to(device).t().contiguous().t()
    return values.to(device)


def _problem(plan: ProbePlan, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(20261207)
    x = _matrix(plan.batch, plan.dim, plan.x_layout, gen, dtype, device)
    w = _matrix(plan.num_classes, plan.dim, plan.w_layout, gen, dtype, device)
    y = torch.randint(0, plan.num_classes, (plan.batch,), generator=gen)
    y[plan.batch // 2] = -1  # a row without a target (ignored, or owned by another shard)
    ids = None
    if plan.num_sampled is not None:
        ids = torch.randperm(plan.num_classes, generator=gen)[: plan.num_sampled].sort().values
        ids = ids.to(device)
    return x, w, y.to(device), ids


def _loss_and_grads(lse_parts: Callable, x, w, y, spec, ids, options=()):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    neg_lse, t = lse_parts(x, w, y, spec, ids, **dict(options))
    loss = reference.loss_from_parts(neg_lse, t, y >= 0, spec, "none")
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss * weights).sum().backward()
    return {"loss": loss.detach(), "dX": x.grad, "dW": w.grad}


def _scale(exact: dict, q: str) -> torch.Tensor:
    """The magnitude the ABS terms of ``q`` are relative to: the loss's own largest entry; for
    a gradient the largest entry of either gradient (a gradient can cancel to 0 while the terms
    it sums, which set its rounding, do not)."""
    parts = [exact[q]] if q == "loss" else [exact["dX"], exact["dW"]]
    values = [p.abs().max() for p in parts if p.numel()]
    return torch.stack(values).max() if values else torch.zeros((), dtype=torch.float64)


def bounds(exact: dict, own: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Element-wise bounds of every quantity (module docstring)."""
    out = {}
    for q in QUANTITIES:
        e = exact[q]
        own_err = (own[q].double() - e).abs()
        rms = own_err.square().mean().sqrt() if own_err.numel() else own_err.sum()
        scale = _scale(exact, q)
        out[q] = OWN_FACTOR * (own_err + rms) + REL[dtype][q] * e.abs() + ABS[dtype][q] * scale
    return out


def row_check(got: dict, exact: dict, own: dict, dtype: torch.dtype) -> tuple[float, str]:
    """(worst row error / row bound, description) over the rows of dX and dW."""
    worst, text = 0.0, ""
    for q in ("dX", "dW"):
        e = exact[q]
        if e.numel() == 0:
            continue
        norm = torch.linalg.vector_norm(e, dim=1)
        err = torch.linalg.vector_norm(got[q].double() - e, dim=1)
        own_err = torch.linalg.vector_norm(own[q].double() - e, dim=1)
        largest = max(
            float(torch.linalg.vector_norm(exact[g], dim=1).max())
            for g in ("dX", "dW")
            if exact[g].numel()
        )
        bound = OWN_FACTOR * own_err + ROW_REL[dtype] * norm + ROW_ABS[dtype] * largest
        ratio = err / bound.clamp_min(1e-300)
        r = int(ratio.argmax())
        if float(ratio[r]) > worst:
            worst = float(ratio[r])
            text = (
                f"{q} row {r}: error norm {float(err[r]):.2e} against bound {float(bound[r]):.2e}"
                f" (row norm {float(norm[r]):.4g})"
            )
    return worst, text


def compare(
    got: dict, exact: dict, bound: dict, own: dict | None = None, dtype: torch.dtype | None = None
) -> tuple[bool, str, float]:
    """(ok, worst quantity and element (or row) against its bound, worst error/bound ratio).
    With ``own`` and ``dtype`` the rows of dX and dW are checked as vectors too."""
    worst_ratio, worst_text = -1.0, "no element"
    for q in QUANTITIES:
        value = got.get(q)
        if value is None:
            return False, f"{q} is missing", math.inf
        value = value.double()
        if value.shape != exact[q].shape:
            return (
                False,
                f"{q} has shape {tuple(value.shape)}, expected {tuple(exact[q].shape)}",
                math.inf,
            )
        if not torch.isfinite(value).all():
            where = (~torch.isfinite(value)).nonzero()[0].tolist()
            return False, f"{q}{where} is not finite ({value[tuple(where)].item()})", math.inf
        if value.numel() == 0:
            continue
        err = (value - exact[q]).abs()
        ratio = err / bound[q].clamp_min(1e-300)
        flat = int(ratio.argmax())
        r = float(ratio.flatten()[flat])
        if r > worst_ratio:
            index = list(torch.unravel_index(torch.tensor(flat), ratio.shape))
            index = [int(i) for i in index]
            worst_ratio = r
            worst_text = (
                f"worst {q}{index}: error {float(err.flatten()[flat]):.2e} against bound "
                f"{float(bound[q].flatten()[flat]):.2e} "
                f"(exact {float(exact[q].flatten()[flat]):.4g})"
            )
    if own is not None and dtype is not None:
        row_ratio, row_text = row_check(got, exact, own, dtype)
        if row_ratio > worst_ratio:
            worst_ratio, worst_text = row_ratio, "worst " + row_text
    return worst_ratio <= 1.0, worst_text, max(worst_ratio, 0.0)


def run_probe(
    lse_parts: Callable, plan: ProbePlan, spec: MarginSpec, dtype: torch.dtype, device
) -> tuple[bool, str, float]:
    """Run ``lse_parts`` on the probe problem of ``plan`` and compare with the float64
    reference: (ok, detail, worst error/bound ratio). An exception is a failure."""
    x, w, y, ids = _problem(plan, dtype, device)
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        exact = _loss_and_grads(_ORACLE_LSE_PARTS, x.double(), w.double(), y, spec, ids)
        exact = {k: v.double() for k, v in exact.items()}
        own = _loss_and_grads(_ORACLE_LSE_PARTS, x, w, y, spec, ids)
        try:
            got = _loss_and_grads(lse_parts, x, w, y, spec, ids, plan.options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # a backend that raises fails its probe
            first = (str(exc).splitlines() or [""])[0][:300]
            return False, f"raised {type(exc).__name__}: {first}", math.inf
    return compare(got, exact, bounds(exact, own, dtype), own, dtype)


# --- the cache ---------------------------------------------------------------------------------
_LOCK = threading.RLock()
_VERDICTS: dict[tuple, ProbeResult] = {}
_PLANS: dict[tuple, ProbePlan] = {}
_WARNED: set[ProbeResult] = set()


def _function_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def clear_probes() -> None:
    """Forget every probe result of this process (the persistent file is left as it is)."""
    with _LOCK:
        _VERDICTS.clear()
        _PLANS.clear()
        _WARNED.clear()


def probe_report() -> list[ProbeResult]:
    """The combinations probed (or read from the persistent cache) in this process, in order."""
    with _LOCK:
        return list(_VERDICTS.values())


def failure_text(result: ProbeResult) -> str:
    """The warning / error text of a failed probe."""
    return (
        f"margin_kernels: backend={result.backend!r} ({result.function}) failed its first-use "
        f"parity probe on {result.device} ({result.gpu}; {versions()}): case {result.dtype} "
        f"{result.kind}, "
        f"kernel path {result.path}, class_ids={result.class_ids}, problem {result.problem}: "
        f"{result.detail}. Run `python -m margin_kernels.selftest` for the full parity report "
        f"(and report it); set {MODE_ENV}=off to serve the kernel unchecked."
    )


def verdict(
    name: str,
    module: ModuleType,
    device: torch.device,
    spec: MarginSpec,
    layout_items: tuple,
) -> ProbeResult | None:
    """The probe result of backend ``name`` for this combination (``layout_items``: the fields
    of a :class:`Layout`): from the cache, from the persistent file, or by running the probe now
    (once). None when probes are off."""
    current = mode()
    if current == "off":
        return None
    fn = module.lse_parts
    skey = spec_key(spec)
    plan_key = (name, device, skey, layout_items)
    with _LOCK:
        plan = _PLANS.get(plan_key)
        if plan is None:
            plan = _PLANS[plan_key] = plan_for(name, Layout(*layout_items), spec, device)
        dtype, has_ids = layout_items[0], layout_items[-1]
        key = (name, fn, device, dtype, skey, plan.path, has_ids)
        found = _VERDICTS.get(key)
        if found is not None:
            return found
        disk_key = None
        if current == "persistent":
            disk_key = repr(
                (_fingerprint(device), name, _function_name(fn), str(device), str(dtype),
                 skey, plan.path, has_ids)
            )  # fmt: skip
            stored = _read_disk().get(disk_key)
            if isinstance(stored, dict):
                try:
                    result = ProbeResult(**{**stored, "source": "disk"})
                except TypeError:
                    result = None
                if result is not None:
                    _VERDICTS[key] = result
                    return result
        start = time.perf_counter()
        ok, detail, ratio = run_probe(fn, plan, spec, dtype, device)
        shape = f"B={plan.batch} C={plan.num_classes} D={plan.dim}"
        if plan.num_sampled is not None:
            shape += f" S={plan.num_sampled}"
        result = ProbeResult(
            backend=name,
            function=_function_name(fn),
            device=str(device),
            gpu=gpu_name(device),
            dtype=DTYPE_NAMES.get(dtype, str(dtype)),
            kind=spec.kind,
            path=repr(plan.path),
            class_ids=has_ids,
            ok=ok,
            detail=detail,
            worst_ratio=ratio,
            seconds=time.perf_counter() - start,
            source="run",
            problem=shape,
        )
        _VERDICTS[key] = result
        if disk_key is not None:
            _write_disk(disk_key, result)
        return result


def warn_once(result: ProbeResult) -> None:
    """The one warning of a failed combination that "auto" skips."""
    with _LOCK:
        if result in _WARNED:
            return
        _WARNED.add(result)
    warnings.warn(failure_text(result), ProbeWarning, stacklevel=4)
