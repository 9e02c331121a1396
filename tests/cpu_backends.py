"""The backends that run on CPU tensors in CI, behind one ``lse_parts`` signature.

* ``torch``: the reference (:func:`margin_kernels.reference.lse_parts`);
* ``triton``: the Triton kernels under the interpreter (``TRITON_INTERPRET=1`` set before
  ``margin_kernels`` is imported), through :func:`margin_kernels.ops.triton.lse_parts`;
* ``cuda_cpu``: the CUDA backend's chunked algorithm over the C++ CPU twin of its epilogues. Its
  public ``lse_parts`` refuses CPU tensors, so this is the one place a test reaches past the
  public API: the module's CPU entry point (``_chunked_lse_parts``), the same function the CUDA
  backend's own tests call.

Every test that loops over backends asks :func:`lse_parts_or_skip`, which skips with the reason
when a backend cannot run here (no Triton, no interpreter, extension not built).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from margin_kernels import reference
from margin_kernels.spec import MarginSpec

CPU_BACKENDS = ("torch", "triton", "cuda_cpu")
# The fused backends: the ones whose code is not the oracle itself.
FUSED_CPU_BACKENDS = ("triton", "cuda_cpu")


def cpu_lse_parts(name: str) -> tuple[Callable | None, str | None]:
    """``(lse_parts, None)`` of backend ``name`` on CPU tensors, or ``(None, why not)``."""
    if name == "torch":
        return reference.lse_parts, None
    if name == "triton":
        try:
            from margin_kernels.ops import triton as triton_backend
        except ImportError as exc:
            return None, f"margin_kernels.ops.triton does not import ({exc})"
        if not triton_backend.HAS_TRITON:
            return None, "Triton is not installed"
        if not triton_backend.INTERPRET:
            return None, "the Triton backend runs on CPU tensors only with TRITON_INTERPRET=1"
        return triton_backend.lse_parts, None
    if name == "cuda_cpu":
        from margin_kernels.ops import cuda as cuda_backend

        if not cuda_backend.HAS_CUDA_EXT:
            return None, "margin_kernels._C is not built (needs the CUDA build of torch and nvcc)"
        fn = getattr(cuda_backend, "_chunked_lse_parts", None)
        if fn is None:
            return None, "margin_kernels.ops.cuda has no CPU entry point _chunked_lse_parts"
        return fn, None
    raise ValueError(f"unknown CPU backend {name!r}")


def lse_parts_or_skip(name: str) -> Callable:
    fn, reason = cpu_lse_parts(name)
    if fn is None:
        pytest.skip(f"{name}: {reason}")
    return fn


def loss_and_grads(
    fn: Callable,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    seed: int = 5,
) -> dict[str, torch.Tensor]:
    """Per-row parts, per-row loss and the gradients of a probe that weighs every row's loss,
    neg_lse and target logit with independent random weights (so a wrong gradient of any one
    of them shows). ``y`` outside [0, C) means "no target" (the lse_parts contract)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    neg_lse, t = fn(x, w, y, spec, class_ids)
    valid = (y >= 0) & (y < w.shape[0])
    loss = reference.loss_from_parts(neg_lse, t, valid, spec, "none")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, loss.shape[0], generator=g, dtype=torch.float64).to(loss.dtype)
    finite_lse = torch.where(torch.isfinite(neg_lse), neg_lse, torch.zeros_like(neg_lse))
    probe = (loss * u[0]).sum() + (finite_lse * u[1]).sum() + (t * u[2]).sum()
    probe.backward()
    return {
        "loss": loss.detach(),
        "neg_lse": neg_lse.detach(),
        "target_logit": t.detach(),
        "dX": x.grad,
        "dW": w.grad,
    }
