"""Targets outside the local classes, through each CPU backend's ``lse_parts``.

In the class-parallel loss each rank calls ``lse_parts`` on its weight shard with the global
labels shifted into the shard, so a label owned by another rank arrives as a value >= C or < 0
(not only the ignore marker -1). The contract: such a row has no target here, its target logit is
0 and no column is masked, so ``neg_lse`` is the log-sum-exp of all its logits. Checked against
a direct computation of those logits (not only against the reference), with gradients, and with
Partial-FC class ids.
"""

from __future__ import annotations

import math

import pytest
import torch
from cpu_backends import CPU_BACKENDS, loss_and_grads, lse_parts_or_skip
from helpers import ALL_SPECS

from margin_kernels import reference

B, C, D = 10, 6, 5
OUTSIDE = {1: C, 3: C + 3, 4: 10**6, 6: -1, 7: -7, 9: -(10**6)}

SPECS = {
    name: ALL_SPECS[name]
    for name in ("cosface", "arcface_exact_fallback", "sphereface_m4", "lsoftmax_m2", "so_softmax")
}


def shard_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    for row, label in OUTSIDE.items():
        y[row] = label
    return x.to(dtype), w.to(dtype), y


def all_logits(x, w, spec):
    """Every non-target logit N(c_ij) of the rows, unmasked."""
    nx = x.norm(dim=1).clamp_min(1e-12)
    nw = w.norm(dim=1).clamp_min(1e-12)
    cos = (x @ w.T) / (nx[:, None] * nw[None, :])
    return reference.nontarget_transform(cos, nx[:, None], nw[None, :], spec)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_with_targets_outside_the_shard(backend, name):
    fn = lse_parts_or_skip(backend)
    spec = SPECS[name]
    x, w, y = shard_problem()
    outside = torch.tensor(sorted(OUTSIDE))
    neg_lse, t = fn(x, w, y, spec, None)
    assert (t[outside] == 0).all(), f"target logit of rows without a target: {t[outside]}"
    expected = torch.logsumexp(all_logits(x, w, spec), dim=1)
    torch.testing.assert_close(neg_lse[outside].double(), expected[outside], rtol=1e-10, atol=1e-10)
    # rows with a local target: the reference (target column masked, T applied)
    got = loss_and_grads(fn, x, w, y, spec)
    want = loss_and_grads(reference.lse_parts, x, w, y, spec)
    tol = 1e-10
    for part, value in got.items():
        torch.testing.assert_close(value, want[part], rtol=tol, atol=tol, msg=part)
    # a row without a target puts no gradient into any weight row through its target logit:
    # moving every outside row's label to another outside value changes nothing
    y2 = y.clone()
    y2[outside] = torch.where(y[outside] >= C, -3, C + 11)
    moved = loss_and_grads(fn, x, w, y2, spec)
    for part, value in got.items():
        torch.testing.assert_close(moved[part], value, rtol=0, atol=0, msg=part)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outside_targets_with_partial_fc_ids(backend):
    fn = lse_parts_or_skip(backend)
    spec = ALL_SPECS["cosface"]
    x, w, y = shard_problem()
    ids = torch.tensor([0, 2, 3, 5])
    neg_lse, t = fn(x, w, y, spec, ids)
    outside = torch.tensor(sorted(OUTSIDE))
    assert (t[outside] == 0).all()
    expected = torch.logsumexp(all_logits(x, w, spec)[:, ids], dim=1)
    torch.testing.assert_close(neg_lse[outside].double(), expected[outside], rtol=1e-10, atol=1e-10)
    got = loss_and_grads(fn, x, w, y, spec, ids)
    want = loss_and_grads(reference.lse_parts, x, w, y, spec, ids)
    for part, value in got.items():
        torch.testing.assert_close(value, want[part], rtol=1e-10, atol=1e-10, msg=part)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_row_outside_gives_plain_lse_of_all_columns(backend):
    fn = lse_parts_or_skip(backend)
    spec = ALL_SPECS["arcface_exact_fallback"]
    x, w, _ = shard_problem()
    y = torch.full((B,), C)
    neg_lse, t = fn(x, w, y, spec, None)
    assert (t == 0).all()
    torch.testing.assert_close(
        neg_lse.double(), torch.logsumexp(all_logits(x, w, spec), dim=1), rtol=1e-10, atol=1e-10
    )
    assert math.isfinite(neg_lse.sum().item())
