"""float64 inputs are computed in float64 throughout, on every backend that runs on CPU: every
margin kind (and every overflow policy, grad mode and psi order of ALL_SPECS and the
straight-through specs) within 1e-13 relative of the float64 reference, for both loss pieces
(negative LSE, target logit) and both gradients. The Triton kernels run with every float kernel
argument rounded to fp32, as a compiled launcher passes Python floats (the interpreter would
keep a double)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_backends import lse_parts_or_skip
from helpers import ALL_SPECS, STRAIGHT_THROUGH_SPECS, make_data, rel_error

from margin_kernels import reference
from margin_kernels.spec import KINDS

TOL = 1e-13
SPECS = {**ALL_SPECS, **STRAIGHT_THROUGH_SPECS}


def test_every_registered_kind_is_checked():
    assert {spec.kind for spec in SPECS.values()} == set(KINDS)
    combined = [s for s in SPECS.values() if s.kind == "combined"]
    assert any(s.kernel_args()[1][2] != 1.0 for s in combined)  # m1 != 1


def _parts_and_grads(fn, x, w, y, spec):
    """(neg_lse, target_logit, dX, dW) under distinct upstream weights for both pieces."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    neg_lse, t = fn(x, w, y, spec)
    grad = torch.linspace(0.5, 1.5, neg_lse.numel(), dtype=torch.float64)
    (neg_lse * grad + t * grad.flip(0)).sum().backward()
    return neg_lse.detach(), t.detach(), x.grad, w.grad


def _fp32(value):
    return float(np.float32(value)) if isinstance(value, float) else value


@pytest.fixture
def fp32_float_arguments(monkeypatch):
    """Round every float argument of an interpreted launch to fp32 (a compiled launcher's
    Python-float convention; the interpreter keeps a double)."""
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.run
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__)
        args = tuple(_fp32(a) for a in args)
        kwargs = {k: _fp32(v) for k, v in kwargs.items()}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return launches


def _check(backend_fn, spec):
    # the interpreter's 16-wide tiles: two row tiles, two class tiles (two class splits,
    # merged), two D slices
    x, w, y = make_data(b=17, c=20, d=40, seed=2)
    got = _parts_and_grads(backend_fn, x, w, y, spec)
    exact = _parts_and_grads(reference.lse_parts, x, w, y, spec)
    for name, a, e in zip(("neg_lse", "target_logit", "dX", "dW"), got, exact, strict=True):
        assert a.dtype == torch.float64
        err = rel_error(a, e)
        assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("backend", ["torch", "cuda_cpu"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_float64_within_1e13_of_the_reference(name, backend):
    _check(lse_parts_or_skip(backend), SPECS[name])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float64_triton_within_1e13_with_fp32_float_arguments(name, fp32_float_arguments):
    fn = lse_parts_or_skip("triton")
    _check(fn, SPECS[name])
    assert "_target_kernel" in fp32_float_arguments
