"""The Triton design's moving parts that the parity sweeps would pass by chance:

* the forward's lazily moved reference point (the dX numerator is rescaled only when a logit
  passes the reference by more than the slack, and then must be);
* Partial-FC's single pass over dW (the owners write the sampled rows, a zero-fill kernel the
  others, nothing is zeroed beforehand);
* the dW kernel's column-norm term added by MMAs of a diagonal split into 16-bit parts.
"""

from __future__ import annotations

import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.spec import MarginSpec

tb = pytest.importorskip("margin_kernels.ops.triton")
if not tb.HAS_TRITON or not tb.INTERPRET:
    pytest.skip("runs the Triton kernels under TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from helpers import assert_backend_parity  # noqa: E402

from margin_kernels.ops.triton import config  # noqa: E402
from margin_kernels.ops.triton import ops as triton_ops  # noqa: E402
from margin_kernels.ops.triton.margin_math import _add_scaled_rows  # noqa: E402


@triton.jit
def _scaled_rows_kernel(ACC_IN, COEF, V, OUT, OP: tl.constexpr, UPCAST: tl.constexpr,
                        N: tl.constexpr, K: tl.constexpr):  # fmt: skip
    rows = tl.arange(0, N)
    cols = tl.arange(0, K)
    acc = tl.load(ACC_IN + rows[:, None] * K + cols[None, :])
    coef = tl.load(COEF + rows)
    v = tl.load(V + rows[:, None] * K + cols[None, :])
    out = _add_scaled_rows(acc, coef, v, OP, tl.float32, UPCAST, "ieee", N)
    tl.store(OUT + rows[:, None] * K + cols[None, :], out)


def _fan(batch: int, num_classes: int, dim: int, order: torch.Tensor | None = None):
    """x near e1; class j at angle pi (1 - j / C) from e1 in the (e1, e2) plane, so that the
    cosines rise from -1 to 1 along the class index (or along ``order``)."""
    g = torch.Generator().manual_seed(5)
    angles = math.pi * (1.0 - torch.arange(num_classes, dtype=torch.float64) / num_classes)
    w = torch.zeros(num_classes, dim, dtype=torch.float64)
    w[:, 0], w[:, 1] = torch.cos(angles), torch.sin(angles)
    w += 0.01 * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    if order is not None:
        w = w[order]
    x = torch.zeros(batch, dim, dtype=torch.float64)
    x[:, 0] = 1.0
    x += 0.05 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, w, y


def test_interpreter_tiles_give_each_split_many_class_tiles():
    """The premise of the next tests: every class split walks many 16-class tiles."""
    tile = config.gemm_tile(torch.float64, config.NT_SCALED, 32)
    splits = config.forward_splits(16, 1024, tile, 1, 2)
    assert config.cols_per_split(1024, splits, tile) // tile.block_n >= 8


@pytest.mark.parametrize("order", ["rising", "shuffled"])
def test_reference_point_moves_and_the_numerator_is_rescaled(order):
    """s = 64 over cosines rising along the classes: in every split the row's logits pass the
    reference point by far more than the slack, tile after tile (rising), or at random tiles
    (shuffled). Loss, dX and dW stay at float64 accuracy, so every move rescaled the numerator
    and the row sums; a stale reference within the slack changes nothing."""
    perm = None
    if order == "shuffled":
        perm = torch.randperm(1024, generator=torch.Generator().manual_seed(1))
    x, w, y = _fan(16, 1024, 32, perm)
    assert _reference_moves(x, w, 64.0) > (16 * 8 if order == "rising" else 16)
    assert_backend_parity("triton", x, w, y, MarginSpec.arcface(64.0, 0.5), tol=1e-10)


def _reference_moves(x, w, s):
    """How often the forward's reference point moves after a split's first tile (the kernel's
    rule replayed on s cos, the target column included: an upper bound on its moves)."""
    tile = config.gemm_tile(torch.float64, config.NT_SCALED, x.shape[1])
    splits = config.forward_splits(x.shape[0], w.shape[0], tile, 1, 2)
    per_split = config.cols_per_split(w.shape[0], splits, tile)
    f = s * torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    moves = 0
    for start in range(0, w.shape[0], per_split):
        tiles = f[:, start : start + per_split].split(tile.block_n, dim=1)
        ref = tiles[0].amax(dim=1)
        for t in tiles[1:]:
            top = t.amax(dim=1)
            moved = top > ref + config.RESCALE_SLACK_NATS
            moves += int(moved.sum())
            ref = torch.where(moved, top, ref)
    return moves


def test_slack_bounds_the_exponentials():
    """p = exp(f - M) <= e^slack: finite in fp32 and bf16 summed over 10^8 classes."""
    assert math.exp(config.RESCALE_SLACK_NATS) * 1e8 < torch.finfo(torch.float32).max
    assert config.RESCALE_SLACK_NATS > 0


class _NaNEmpty:
    """``torch`` as the launchers see it, except that ``empty`` returns NaN-filled memory: a row
    of dW that no kernel writes stays NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_partial_fc_writes_every_row_of_dw_once_without_a_memset(monkeypatch, dtype):
    monkeypatch.setattr(triton_ops, "torch", _NaNEmpty())
    g = torch.Generator().manual_seed(2)
    num_classes, dim = 200, 32
    x = torch.randn(12, dim, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (12,), generator=g)
    ids = torch.cat([y.unique(), torch.tensor([1, 5, 77, 150])]).unique()
    spec = MarginSpec.cosface(30.0, 0.35)

    def grads(backend, xx, ww):
        xx = xx.detach().clone().requires_grad_()
        ww = ww.detach().clone().requires_grad_()
        mk.margin_cross_entropy(xx, ww, y, spec, class_ids=ids, backend=backend).backward()
        return xx.grad, ww.grad

    _, dw = grads("triton", x.to(dtype), w.to(dtype))
    _, dw_ref = grads("torch", x, w)
    assert torch.isfinite(dw).all()
    unsampled = torch.ones(num_classes, dtype=torch.bool)
    unsampled[ids] = False
    assert (dw[unsampled] == 0).all()
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(dw.double(), dw_ref, rtol=tol, atol=tol * dw_ref.abs().max().item())


def test_partial_fc_plan_has_one_pass_over_dw():
    launches = config.plan(1024, 10**6, 512, torch.bfloat16, "arcface", num_sampled=10**5)
    roles = [launch.role for launch in launches if launch.phase == "backward"]
    assert roles == ["zero_fill", "dw", "rowwise"]
    assert config.plan(1024, 10**6, 512, torch.bfloat16, "arcface")[-2].role == "dw"


@pytest.mark.parametrize("op_dtype", [torch.bfloat16, torch.float16])
def test_column_norm_term_by_split_diagonal_mmas_keeps_fp32_accuracy(op_dtype):
    """The dW kernel adds its column-norm term, coef_j W_j, as diag(c1 + c2 + c3) @ W with coef
    split into parts of the 16-bit operand dtype (the accumulator's layout, no conversion). A
    single part would leave the operand dtype's rounding (2^-9 bf16, 2^-12 fp16) in that term;
    the split keeps fp32's, over coefficients spanning 2^-40 to 2^40 (fp16: its range handled
    by a power-of-two scaling per row)."""
    g = torch.Generator().manual_seed(6)
    n, k = 16, 32
    coef = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.linspace(-40, 40, n)
    coef = coef.float()
    v = torch.randn(n, k, generator=g, dtype=torch.float64).to(op_dtype)
    acc = torch.randn(n, k, generator=g, dtype=torch.float64).float() * 1e-3
    acc = acc * coef.abs()[:, None].double().float()
    out = torch.empty(n, k, dtype=torch.float32)
    tl_op = tl.bfloat16 if op_dtype == torch.bfloat16 else tl.float16
    # the interpreter's bf16 dot is wrong: bf16 runs its dots in fp32, as the launchers do
    _scaled_rows_kernel[(1,)](acc, coef, v, out, OP=tl_op, UPCAST=op_dtype == torch.bfloat16,
                              N=n, K=k)  # fmt: skip
    exact = acc.double() + coef.double()[:, None] * v.double()
    rel = ((out.double() - exact).abs() / exact.abs().amax(dim=1, keepdim=True)).max()
    assert rel < 2**-20
