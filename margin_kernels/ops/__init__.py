"""Backend selection. One module per backend in this package; each exposes

* ``unavailable_reason(device: torch.device, spec: MarginSpec) -> str | None`` — why it cannot
  run for this device and spec (None when it can), naming the fix; and
* ``lse_parts(x, weight, target, spec, class_ids=None, deterministic=False)`` — the contract of
  :func:`margin_kernels.reference.lse_parts`, differentiable w.r.t. ``x`` and ``weight``.

Backend modules are imported with this package; each guards its optional dependencies into
``HAS_*`` flags, so ``import margin_kernels`` never fails.

Trust: a compiled backend serves a combination (device, dtype, margin kind, kernel path,
with/without ``class_ids``) only after its first-use probe matched the float64 reference there
(:mod:`margin_kernels.ops.probe`). "auto" skips a backend that failed, with one
:class:`~margin_kernels.ops.probe.ProbeWarning`; a backend named explicitly raises
``RuntimeError`` with the same text. After the first call of a combination, choosing costs a few
dictionary lookups; under ``torch.compile`` the choice (and a first probe) runs eagerly at trace
time and the graph holds only the chosen backend's ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import torch

from .. import _extension, reference
from ..spec import MarginSpec
from ..validation import BACKENDS
from . import cuda as cuda_backend
from . import probe
from . import triton as triton_backend
from .probe import ProbeFailure, ProbeWarning, clear_probes, probe_report

__all__ = [
    "AUTO_CROSSOVER_MEASURED",
    "AUTO_PREFERRED_ON_GPU",
    "BACKENDS",
    "CPU_AUTO_NO_SLOWER",
    "DOUBLE_BACKWARD_ERROR",
    "ProbeFailure",
    "ProbeWarning",
    "available_backends",
    "clear_probes",
    "probe_report",
    "resolve",
    "unavailable_reason",
]

_MODULES: dict[str, ModuleType] = {"triton": triton_backend, "cuda": cuda_backend}

# Where "auto" should prefer the cuda backend over triton on a GPU has not been measured (no GPU
# was available while it was written); until it is, the order follows the performance model.
AUTO_CROSSOVER_MEASURED = False

# "auto" on a CUDA device tries this backend first where both can run. bench/model.py predicts
# (no GPU ran) forward + backward at the headline shape, bf16 ArcFace B=1024 D=512 C=10^6:
# cuda 10.9 ms (2.7x the three bare GEMMs) against triton 18.9 ms (4.7x) on an H200, 12.7 ms
# against 19.0 ms on an H100 (docs/performance_model.md). Replace by a measurement.
AUTO_PREFERRED_ON_GPU = "cuda"

# On CPU, bench/results/cpu_chunks.csv measured the cuda backend's C++ kernels (forward +
# backward) against the torch reference at B=256, D=512, C=10^5 float32 ArcFace (2 shared cores,
# three runs): no slower in every run (3.3 s vs 3.5 s in the last), 100 MB vs 684 MB peak extra
# memory; see bench/results/README.md. "auto" on a CPU tensor takes it because of that.
CPU_AUTO_NO_SLOWER = True

# The order "auto" tries the compiled backends in on a CUDA device.
_AUTO_GPU_ORDER = [AUTO_PREFERRED_ON_GPU] + [n for n in _MODULES if n != AUTO_PREFERRED_ON_GPU]


def unavailable_reason(name: str, device: torch.device, spec: MarginSpec) -> str | None:
    """Why backend ``name`` cannot run ``spec`` on ``device`` (None when it can; "auto" and
    "torch" always can). Probes are not run here."""
    if name in ("auto", "torch"):
        return None
    return _MODULES[name].unavailable_reason(device, spec)


_reason = unavailable_reason


def available_backends(device: torch.device | str, spec: MarginSpec) -> list[str]:
    """Names of the backends that can run ``spec`` on ``device`` ("torch" always can). Probes
    are not run here: a listed compiled backend may still fail its first-use probe."""
    device = torch.device(device)
    return [n for n in _MODULES if _reason(n, device, spec) is None] + ["torch"]


def _candidates(backend: str, device: torch.device) -> list[str]:
    """The backends to try, in order ("torch" last for "auto")."""
    if backend != "auto":
        return [backend]
    if device.type == "cuda":
        return [*_AUTO_GPU_ORDER, "torch"]
    if device.type == "cpu" and CPU_AUTO_NO_SLOWER:
        return ["cuda", "torch"]
    return ["torch"]


def _choose(backend: str, device: torch.device, spec: MarginSpec, layout: tuple | None) -> str:
    """The name of the backend that serves: the first candidate that can run here and (with a
    ``layout``, the fields of a :class:`probe.Layout`) passed its probe. "auto" never raises;
    a named backend that cannot run or fails its probe raises ``RuntimeError``."""
    for name in _candidates(backend, device):
        if name == "torch":
            return name
        reason = _reason(name, device, spec)
        if reason is not None:
            if backend != "auto":
                raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
            continue
        if layout is None:
            return name
        result = probe.verdict(name, _MODULES[name], device, spec, layout)
        if result is None or result.ok:
            return name
        if backend != "auto":
            raise ProbeFailure(probe.failure_text(result))
        probe.warn_once(result)
    return "torch"


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(MarginSpec))


def _choose_traced(
    backend: str, device: torch.device, spec_values: tuple, layout: tuple | None
) -> str:
    """:func:`_choose` from plain constants (the spec's field values), as torch.compile calls
    it."""
    return _choose(
        backend, device, MarginSpec(**dict(zip(_SPEC_FIELDS, spec_values, strict=True))), layout
    )


# Under torch.compile, dynamo calls a function marked so at trace time, eagerly, and keeps its
# result as a constant: the probe runs outside the traced graph, once. This is the marker that
# torch.compiler.assume_constant_result sets; setting it here keeps torch._dynamo (and sympy) out
# of `import margin_kernels`. Its arguments must be constants dynamo can rebuild: tuples, not
# dataclasses.
_choose_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


DOUBLE_BACKWARD_ERROR = (
    "margin_kernels: cannot differentiate twice (double backward, or create_graph=True through "
    "the loss): its losses are differentiable once on every backend, the reference included, "
    "so that a model behaves alike whichever backend serves it (the fused kernels' backward is "
    "not itself differentiable). For higher-order gradients compute the loss with "
    "margin_kernels.reference.margin_cross_entropy."
)


class _SecondOrderError(torch.autograd.Function):
    """Identity whose backward raises: it stands on the gradients of a backward run with
    create_graph=True, so that differentiating them raises before any backend's own node."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on (x, weight) before a backend's lse_parts (views, no copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor):
        return x.view_as(x), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_w: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            grad_x = None if grad_x is None else _SecondOrderError.apply(grad_x)
            grad_w = None if grad_w is None else _SecondOrderError.apply(grad_w)
        return grad_x, grad_w


def first_order_only(fn: Callable) -> Callable:
    """``fn`` (an ``lse_parts``) behind :class:`_FirstOrderOnly`: a double backward through
    it raises :data:`DOUBLE_BACKWARD_ERROR`, whatever the backend."""

    def lse_parts(x, weight, *args, **kwargs):
        if x.requires_grad or weight.requires_grad:
            x, weight = _FirstOrderOnly.apply(x, weight)
        return fn(x, weight, *args, **kwargs)

    return lse_parts


def resolve(
    backend: str,
    device: torch.device,
    spec: MarginSpec,
    x: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    class_ids: torch.Tensor | None = None,
) -> tuple[str, Callable]:
    """``(name, lse_parts)`` of the backend to run.

    "auto" never raises: on a CUDA device it takes the first compiled backend that can run and
    passed its probe, in ``_AUTO_GPU_ORDER`` (the model-predicted faster one first: cuda, then
    triton); on a CPU tensor the cuda backend's C++ kernels (``CPU_AUTO_NO_SLOWER``); else the
    reference. A named compiled backend that cannot run, or fails its probe, raises
    ``RuntimeError``. The returned function is the backend's ``lse_parts`` behind
    :func:`first_order_only` (a double backward raises on every backend). With ``x`` and
    ``weight`` (the call's (B, D) and (C, D) operands, as the kernels will receive them) the
    first-use probe of the combination runs (once); without
    them only availability is checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _extension.warn_if_unusable(device)  # once per process: a CUDA tensor met an unusable _C
    layout = None
    if x is not None and weight is not None and backend != "torch":
        layout = probe.layout_of(x, weight, class_ids)
    if torch.compiler.is_compiling():
        values = tuple(getattr(spec, f) for f in _SPEC_FIELDS)
        name = _choose_traced(backend, device, values, layout)
    else:
        name = _choose(backend, device, spec, layout)
    if name == "torch":
        return name, first_order_only(reference.lse_parts)
    return name, first_order_only(_MODULES[name].lse_parts)
