"""Backend selection. One module per backend in this package; each exposes

* ``unavailable_reason(device: torch.device, spec: MarginSpec) -> str | None`` — why it cannot
  run for this device and spec (None when it can), naming the fix; and
* ``lse_parts(x, weight, target, spec, class_ids=None, deterministic=False)`` — the contract of
  :func:`margin_kernels.reference.lse_parts`, differentiable w.r.t. ``x`` and ``weight``.

Backend modules are imported with this package; each guards its optional dependencies into
``HAS_*`` flags, so ``import margin_kernels`` never fails.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from .. import _extension
from ..spec import MarginSpec

BACKENDS = ("auto", "triton", "cuda", "torch")

# Module paths of the compiled backends ("auto" tries them in `_AUTO_GPU_ORDER` on a CUDA device).
_COMPILED = {"triton": "margin_kernels.ops.triton", "cuda": "margin_kernels.ops.cuda"}


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_COMPILED[name]), None
    except ImportError as exc:  # a backend module that cannot import is simply unavailable
        return None, f"the {name} backend could not be imported ({exc})"


# Each backend module guards its own optional dependencies (so this cannot fail); importing
# them here, once, keeps `resolve` free of imports, which torch.compile cannot trace.
_LOADED = {name: _import(name) for name in _COMPILED}


# The order "auto" tries the compiled backends in on a CUDA device: the one the performance
# model predicts faster at the headline shape first (ops.cuda.AUTO_PREFERRED_ON_GPU, with the
# predicted numbers), until a GPU measurement replaces the prediction.
_cuda_module = _LOADED["cuda"][0]
_PREFERRED_ON_GPU = getattr(_cuda_module, "AUTO_PREFERRED_ON_GPU", "triton")
_AUTO_GPU_ORDER = [_PREFERRED_ON_GPU] + [n for n in _COMPILED if n != _PREFERRED_ON_GPU]


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    return _LOADED[name]


def _reason(name: str, device: torch.device, spec: MarginSpec) -> str | None:
    module, reason = _load(name)
    return reason if module is None else module.unavailable_reason(device, spec)


def available_backends(device: torch.device | str, spec: MarginSpec) -> list[str]:
    """Names of the backends that can run ``spec`` on ``device`` ("torch" always can)."""
    device = torch.device(device)
    return [n for n in _COMPILED if _reason(n, device, spec) is None] + ["torch"]


def resolve(backend: str, device: torch.device, spec: MarginSpec) -> tuple[str, Callable]:
    """``(name, lse_parts)`` of the backend to run. "auto" never raises: on a CUDA device it
    takes the first compiled backend that can run, in ``_AUTO_GPU_ORDER`` (the model-predicted
    faster one first: cuda, then triton), else the reference. A
    named compiled backend that cannot run raises ``RuntimeError`` saying what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _extension.warn_if_unusable(device)  # once per process: a CUDA tensor met an unusable _C
    if backend == "auto" and device.type == "cpu":
        # On CPU the cuda backend's C++ kernels are taken where they measured no slower than the
        # reference (ops.cuda.CPU_AUTO_NO_SLOWER, from bench/results/cpu_chunks.csv).
        module = _load("cuda")[0]
        if (
            module is not None
            and module.CPU_AUTO_NO_SLOWER
            and module.unavailable_reason(device, spec) is None
        ):
            return "cuda", module.lse_parts
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        from .. import reference

        return "torch", reference.lse_parts
    candidates = _AUTO_GPU_ORDER if backend == "auto" else [backend]
    for name in candidates:
        reason = _reason(name, device, spec)
        if reason is None:
            return name, _load(name)[0].lse_parts
        if backend != "auto":
            raise RuntimeError(f"backend={name!r} cannot run here: {reason}")
    from .. import reference

    return "torch", reference.lse_parts
