"""Zero-length feature and weight rows in every backend that runs on CPU.

Norms are taken as max(||v||, 1e-12), so a zero row has cosine 0 with everything: its loss is
finite and equals the loss of a row at c = 0. Here a zero feature row, a zero weight row that is
some rows' target, and a zero weight row that is a non-target for every row are checked for
finite loss and gradients; the torch reference against the closed form of c = 0, the fused
backends element-wise against the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from cpu_backends import CPU_BACKENDS, loss_and_grads, lse_parts_or_skip
from helpers import ALL_SPECS

from margin_kernels import reference
from margin_kernels.spec import MarginSpec

B, C, D = 9, 7, 5
ZERO_ROW = 2  # feature row of length 0 (its target is a normal class)
ZERO_TARGET_CLASS = 3  # weight row of length 0, the target of rows 4 and 6
ZERO_OTHER_CLASS = 5  # weight row of length 0, nobody's target

SPECS = {
    name: ALL_SPECS[name]
    for name in (
        "cosface",
        "arcface_exact_fallback",
        "arcface_exact_easy",
        "combined",
        "sphereface_m4",
        "lsoftmax_m3",
        "so_softmax",
        "w_softmax",
        "lm_softmax",
        "soft_margin",
    )
}


def degenerate_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    x[ZERO_ROW] = 0.0
    w[ZERO_TARGET_CLASS] = 0.0
    w[ZERO_OTHER_CLASS] = 0.0
    y = torch.tensor([0, 1, 6, 2, ZERO_TARGET_CLASS, 4, ZERO_TARGET_CLASS, 1, 0])
    assert y[ZERO_ROW] not in (ZERO_TARGET_CLASS, ZERO_OTHER_CLASS)
    return x.to(dtype), w.to(dtype), y


def test_reference_zero_rows_have_cosine_zero():
    """Closed form for CosFace: every logit of the zero feature row is at c = 0, so its loss is
    log(exp(-s m) + (C - 1)) + s m; a zero weight column contributes exp(0) to every row."""
    spec = MarginSpec.cosface(8.0, 0.35)
    x, w, y = degenerate_problem()
    neg_lse, t = reference.lse_parts(x, w, y, spec)
    s, m = spec.s, spec.m
    assert t[ZERO_ROW].item() == pytest.approx(-s * m, abs=1e-12)
    assert neg_lse[ZERO_ROW].item() == pytest.approx(math.log(C - 1), abs=1e-12)
    for row in (4, 6):  # target weight of length 0: c_iy = 0
        assert t[row].item() == pytest.approx(-s * m, abs=1e-12)
    # the zero non-target column enters each row's LSE as a logit s * 0 = 0
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logits = s * xn @ wn.T
    logits[torch.arange(B), y] = -math.inf
    assert (logits[:, ZERO_OTHER_CLASS] == 0).all()
    torch.testing.assert_close(neg_lse, torch.logsumexp(logits, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_length_rows_are_finite_and_match_the_reference(backend, name, dtype):
    fn = lse_parts_or_skip(backend)
    spec = SPECS[name]
    x, w, y = degenerate_problem(dtype)
    got = loss_and_grads(fn, x, w, y, spec)
    want = loss_and_grads(reference.lse_parts, x.double(), w.double(), y, spec)
    for part, value in got.items():
        assert torch.isfinite(value).all(), f"{part} is not finite: {value}"
    if backend == "torch" and dtype == torch.float64:
        return  # the oracle itself: its values are checked by the closed form above
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for part in ("loss", "neg_lse", "target_logit"):
        torch.testing.assert_close(
            got[part].double(), want[part], rtol=tol, atol=tol, msg=lambda m, p=part: f"{p}: {m}"
        )
    # Gradients w.r.t. a zero row scale like 1/eps = 1e12 (the clamp holds ||v|| at eps while the
    # dot grows linearly): compare relative to each row's largest reference entry.
    for part in ("dX", "dW"):
        a, b = got[part].double(), want[part]
        row_scale = b.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
        err = ((a - b).abs() / row_scale).max().item()
        assert err <= 10 * tol, f"{part}: per-row relative error {err:.3e}"
