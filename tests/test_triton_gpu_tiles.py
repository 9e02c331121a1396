"""The Triton kernels at the tiles an H100 (sm_90, 132 SMs) gets, run by the interpreter.

The rest of the interpreter suite runs 16-wide tiles at one warp and one stage; here
:func:`config.gpu_tiles` makes the launchers take the GPU's tile table (blocks, warps, stages,
one K step or D slices, ``EVEN_D``, class splits) while the same kernels run on CPU tensors.
Every case checks first that the launches are the ones :func:`config.plan` (or, for unaligned
inputs, the generic table) gives the GPU, then loss, dX and dW against the float64 reference.
Shapes are small but span several row tiles, class tiles, K steps and D slices, each with a
tail. fp16 and fp32/fp64 run their native dots; bf16 keeps the interpreter's upcast (its
native bf16 dot is wrong in the interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LOSS_AND_GRADS, assert_backend_parity, assert_within, loss_and_grads, make_data

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.spec import MarginSpec

tb = pytest.importorskip("margin_kernels.ops.triton")
if not tb.HAS_TRITON or not tb.INTERPRET:
    pytest.skip("runs the GPU's tiles under TRITON_INTERPRET=1", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

from margin_kernels.ops.triton import config  # noqa: E402
from margin_kernels.ops.triton import ops as triton_ops  # noqa: E402

_GEMM_KERNELS = ("_fwd_kernel", "_dw_kernel")
_ROW_KERNELS = ("_row_norm_kernel", "_target_kernel", "_zero_unsampled_kernel")


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted launch as (kernel name, grid, keyword arguments). First-use probes are
    off here: their launches (tested in test_probe.py) would be recorded beside the loss's."""
    monkeypatch.setenv("MARGIN_KERNELS_PROBE", "off")
    seen = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, tuple(grid), kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return seen


def _by_kernel(seen, name):
    return [kw | {"grid": grid} for kernel, grid, kw in seen if kernel == name]


def _check_gemm(launch: dict, tile: config.Tile, dim: int, grid: tuple[int, ...]):
    got = (launch["BLOCK_M"], launch["BLOCK_N"], launch["BLOCK_K"], launch["BLOCK_OUT"])
    assert got == (tile.block_m, tile.block_n, tile.block_k, tile.block_out)
    assert (launch["num_warps"], launch["num_stages"]) == (tile.num_warps, tile.num_stages)
    assert launch["ONE_K"] == tile.one_k(dim)
    assert launch["EVEN_D"] == (dim % tile.block_out == 0)
    assert launch["grid"] == grid


def _check_plan(seen, batch, num_classes, dim, dtype, kind, num_sampled=None):
    """The aligned launches are plan()'s: tiles, warps, stages, grids (class splits included)."""
    plan = {launch.role: launch for launch in config.plan(batch, num_classes, dim, dtype, kind,
                                                          num_sampled=num_sampled)}  # fmt: skip
    family = config.NONTARGET_FAMILY[kind]
    ids = num_sampled is not None
    fwd_tile = config.gemm_tile(dtype, family, dim, interpret=False)
    dw_tile = config.gemm_tile(dtype, family, dim, interpret=False, kernel="dw", has_ids=ids)
    (fwd,) = _by_kernel(seen, "_fwd_kernel")
    _check_gemm(fwd, fwd_tile, dim, plan["forward"].grid)
    assert plan["forward"].block_k == (dim if fwd["ONE_K"] else fwd["BLOCK_K"])
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"]) == (plan["forward"].block_m, plan["forward"].block_n)
    (dw,) = _by_kernel(seen, "_dw_kernel")
    _check_gemm(dw, dw_tile, dim, plan["dw"].grid)
    assert (dw["BLOCK_M"], dw["BLOCK_N"]) == (plan["dw"].block_m, plan["dw"].block_n)
    assert plan["dw"].block_k == (dim if dw["ONE_K"] else dw["BLOCK_K"])
    norms = _by_kernel(seen, "_row_norm_kernel")
    assert [n["grid"] for n in norms] == [plan["row_norms"].grid, plan["col_norms"].grid]
    assert all(n["BLOCK_R"] == plan["row_norms"].block_m for n in norms)
    (target,) = _by_kernel(seen, "_target_kernel")
    assert target["grid"] == plan["target"].grid
    assert (target["BLOCK_B"], target["BLOCK_D"]) == (plan["target"].block_m,
                                                      plan["target"].block_k)  # fmt: skip
    zero = _by_kernel(seen, "_zero_unsampled_kernel")
    if ids:
        assert [z["grid"] for z in zero] == [plan["zero_fill"].grid]
        assert (zero[0]["BLOCK_R"], zero[0]["BLOCK_D"]) == (plan["zero_fill"].block_m,
                                                            plan["zero_fill"].block_k)  # fmt: skip
    else:
        assert not zero
    return fwd, dw


def _spans(batch, cols, dim, launch):
    """Several row and class tiles, each with a tail; in a D-sliced build several K steps and
    a D slice with a tail (a K step with a tail too where it is wider than 16: aligned D are
    multiples of 16)."""
    assert batch > launch["BLOCK_M"] and batch % launch["BLOCK_M"]
    assert cols > launch["BLOCK_N"] and cols % launch["BLOCK_N"]
    if not launch["ONE_K"]:
        assert dim > launch["BLOCK_K"] and (dim % launch["BLOCK_K"] or launch["BLOCK_K"] == 16)
        assert dim % launch["BLOCK_OUT"]


def _run(x, w, y, spec, dtype, tol, class_ids=None, num_sms=132):
    with config.gpu_tiles(num_sms):
        assert not config.interpreting()
        assert_backend_parity("triton", x, w, y, spec, tol=tol, class_ids=class_ids,
                              reduction="none")  # fmt: skip


# (dtype, kind, B, C, D): every branch of the aligned sm_90 table. fp16/bf16: one K step
# (D <= 512) and D slices of 256 (D > 512), W-Softmax's slices of 128; fp32: one K step
# (D <= 64) and slices of 128; fp64 (and fp32 W-Softmax): D <= 32 and slices; SO-Softmax's
# 16-row dW owner.
ALIGNED = {
    "fp16_full_d": (torch.float16, "cosface", 70, 70, 48),
    "fp16_even_d": (torch.float16, "arcface", 70, 70, 64),
    "fp16_sliced": (torch.float16, "cosface", 70, 70, 528),
    "bf16_full_d": (torch.bfloat16, "arcface", 70, 70, 48),
    "bf16_w_softmax_sliced": (torch.bfloat16, "w_softmax", 70, 40, 144),
    "fp16_so_softmax": (torch.float16, "so_softmax", 70, 70, 48),
    "fp32_full_d": (torch.float32, "cosface", 40, 70, 48),
    "fp32_sliced": (torch.float32, "sphereface", 40, 40, 272),
    "fp32_w_softmax": (torch.float32, "w_softmax", 20, 40, 48),
    "fp64_full_d": (torch.float64, "combined", 20, 40, 32),
    "fp64_sliced": (torch.float64, "lsoftmax", 20, 40, 80),
}
SPECS = {
    "cosface": MarginSpec.cosface(16.0, 0.35),
    "arcface": MarginSpec.arcface(16.0, 0.5),
    "combined": MarginSpec.combined(16.0, 1.2, 0.3, 0.1),
    "sphereface": MarginSpec.sphereface(3, lam=2.0),
    "lsoftmax": MarginSpec.lsoftmax(2, lam=0.5),
    "w_softmax": MarginSpec.w_softmax(1.5),
    "so_softmax": MarginSpec.so_softmax(),
    "lm_softmax": MarginSpec.lm_softmax(5.0),
}
# fp64 against the reference; fp16/bf16/fp32 by the rule of helpers (2x torch's own error plus
# the dtype's floor)
_TOL = {torch.float64: 1e-12}


def _data(batch, num_classes, dim, dtype, seed=0):
    x, w, y = make_data(batch, num_classes, dim, seed, torch.float64, (3,))
    # moderate cosines: the low-precision comparisons measure the kernels, not saturation
    return x.to(dtype), (w * 0.5).to(dtype), y


@pytest.mark.parametrize("case", sorted(ALIGNED))
def test_plan_tiles_against_the_reference(case, launches):
    dtype, kind, batch, num_classes, dim = ALIGNED[case]
    x, w, y = _data(batch, num_classes, dim, dtype)
    _run(x, w, y, SPECS[kind], dtype, _TOL.get(dtype))
    fwd, dw = _check_plan(launches, batch, num_classes, dim, dtype, kind)
    _spans(batch, num_classes, dim, fwd)
    _spans(num_classes, batch, dim, dw | {"BLOCK_M": dw["BLOCK_N"], "BLOCK_N": dw["BLOCK_M"]})
    assert fwd["UPCAST"] == (dtype == torch.bfloat16)
    assert fwd["grid"][1] > 1  # class splits, merged by the launcher


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_partial_fc_ids_and_zero_fill_at_plan_tiles(dtype, launches):
    """Gathered class ids: the 16-row dW owner (fp16: 32 classes), and the zero fill of the
    unsampled rows at 16 rows x 256 elements (D = 48: a tail in both)."""
    batch, num_classes, dim, sampled = 40, 300, 48, 70
    x, w, y = _data(batch, num_classes, dim, dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randperm(num_classes, generator=g)[:sampled].sort().values
    y[:5] = ids[:5]
    _run(x, w, y, SPECS["arcface"], dtype, _TOL.get(dtype), class_ids=ids)
    fwd, dw = _check_plan(launches, batch, num_classes, dim, dtype,
                          "arcface", num_sampled=sampled)  # fmt: skip
    assert dw["HAS_IDS"] and fwd["HAS_IDS"]
    assert sampled % dw["BLOCK_N"] and num_classes % config.zero_tile(interpret=False).block_r


def test_one_split_walks_several_class_tiles(launches):
    """A GPU with few SMs: one class split per row block walks every class tile in one program
    (the online LSE and the reference-point rescale across tiles, at the GPU's tiles)."""
    batch, num_classes, dim = 70, 150, 48
    x, w, y = _data(batch, num_classes, dim, torch.float16)
    _run(x, w, y, SPECS["lm_softmax"], torch.float16, None, num_sms=1)
    (fwd,) = _by_kernel(launches, "_fwd_kernel")
    assert fwd["grid"][1] == 1
    assert fwd["cols_per_split"] >= 3 * fwd["BLOCK_N"]


# The generic table (D % 16 != 0, or strided inputs): D slices of a narrow accumulator.
GENERIC = {
    "fp16_d72": (torch.float16, "cosface", 70, 40, 72, False),
    "fp32_d40": (torch.float32, "arcface", 40, 40, 40, False),
    "fp64_d20": (torch.float64, "combined", 20, 40, 20, False),
    "fp64_strided": (torch.float64, "w_softmax", 20, 40, 48, True),
}


@pytest.mark.parametrize("case", sorted(GENERIC))
def test_generic_tiles_against_the_reference(case, launches):
    dtype, kind, batch, num_classes, dim, strided = GENERIC[case]
    x, w, y = _data(batch, num_classes, dim, dtype)
    if strided:  # column-major views: unit row stride, D stride = rows
        x = x.t().contiguous().t()
        w = w.t().contiguous().t()
    assert not config.is_aligned(dim, x, w)
    _run(x, w, y, SPECS[kind], dtype, _TOL.get(dtype))
    family = config.NONTARGET_FAMILY[kind]
    for name, kernel in (("_fwd_kernel", "forward"), ("_dw_kernel", "dw")):
        (launch,) = _by_kernel(launches, name)
        tile = config.gemm_tile(dtype, family, dim, interpret=False, aligned=False, kernel=kernel)
        if kernel == "forward":
            grid = (math.ceil(batch / tile.block_m) * tile.slices(dim), launch["grid"][1])
        else:
            grid = (math.ceil(num_classes / tile.block_n) * tile.slices(dim),)
        _check_gemm(launch, tile, dim, grid)
        assert not launch["ONE_K"] and tile.slices(dim) > 1
        assert launch["stride_xd"] == (batch if strided else 1)
        assert launch["stride_wd"] == (num_classes if strided else 1)


def test_gpu_tiles_is_scoped():
    """Outside the block the interpreter's tiles and SM count are back."""
    with config.gpu_tiles(7):
        assert config.gpu_tiles_sms() == 7
        assert triton_ops._num_sms(torch.device("cpu")) == 7
    assert config.interpreting() and config.gpu_tiles_sms() is None
    assert triton_ops._num_sms(torch.device("cpu")) == 2
    with pytest.raises(ValueError), config.gpu_tiles(0):
        pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_no_load_reaches_past_a_row(dtype, launches):
    """Rows of D = 48 in buffers 64 wide (still aligned: row strides multiples of 16) whose
    last 16 columns are NaN: the GPU tiles hold D in a 64-wide slice, and an unmasked load
    (EVEN_D where D is not a multiple of the slice) would read the NaNs into the logits, dX and
    dW."""
    batch, num_classes, dim, width = 70, 70, 48, 64
    x, w, y = _data(batch, num_classes, dim, dtype)
    spec = SPECS["cosface"]
    bufs = []
    for t in (x, w):
        buf = torch.full((t.shape[0], width), float("nan"), dtype=dtype)
        buf[:, :dim] = t
        bufs.append(buf.requires_grad_())
    xv, wv = (buf[:, :dim] for buf in bufs)
    assert config.is_aligned(dim, xv, wv) and xv.stride(0) == wv.stride(0) == width
    with config.gpu_tiles():
        loss = mk.margin_cross_entropy(xv, wv, y, spec, backend="triton", reduction="none")
        weights = torch.linspace(0.5, 1.5, batch, dtype=loss.dtype)
        (loss * weights).sum().backward()
    got = (loss.detach(), bufs[0].grad[:, :dim], bufs[1].grad[:, :dim])
    assert all(torch.all(buf.grad[:, dim:] == 0) for buf in bufs)
    exact = loss_and_grads(x.double(), w.double(), y, spec, "torch", reduction="none")
    lowp = loss_and_grads(x, w, y, spec, "torch", reduction="none")
    assert_within(LOSS_AND_GRADS, got, exact, lowp, dtype)
    for name in _GEMM_KERNELS:
        (launch,) = _by_kernel(launches, name)
        assert launch["BLOCK_OUT"] > dim and not launch["EVEN_D"]
        assert launch["stride_xb"] == width and launch["stride_wc"] == width


def test_forward_without_the_dx_numerator_at_plan_tiles(launches):
    """x needs no gradient: the forward keeps no numerator and takes one D slice per row block
    (plan's needs_dx=False grid); dW alone is checked against the reference."""
    batch, num_classes, dim = 40, 40, 272
    x, w, y = _data(batch, num_classes, dim, torch.float32)
    spec = SPECS["cosface"]
    wg = w.clone().requires_grad_()
    with config.gpu_tiles():
        neg_lse, t = tb.lse_parts(x, wg, y, spec)
        weights = torch.linspace(0.5, 1.5, batch, dtype=neg_lse.dtype)
        (neg_lse * weights + t * weights.flip(0)).sum().backward()
    we = w.double().requires_grad_()
    ne, te = reference.lse_parts(x.double(), we, y, spec)
    (ne * weights.double() + te * weights.double().flip(0)).sum().backward()
    wl = w.clone().requires_grad_()
    nl, tl_ = reference.lse_parts(x, wl, y, spec)
    (nl * weights.to(nl.dtype) + tl_ * weights.to(nl.dtype).flip(0)).sum().backward()
    assert_within(("neg_lse", "dW"), (neg_lse, wg.grad), (ne, we.grad), (nl, wl.grad),
                  torch.float32)  # fmt: skip
    plan = {launch.role: launch for launch in config.plan(batch, num_classes, dim, torch.float32,
                                                          "cosface", needs_dx=False)}  # fmt: skip
    (fwd,) = _by_kernel(launches, "_fwd_kernel")
    assert not fwd["NEEDS_NUM"] and not fwd["ONE_K"]
    assert fwd["grid"] == plan["forward"].grid and fwd["grid"][0] == math.ceil(batch / 32)
    (dw,) = _by_kernel(launches, "_dw_kernel")
    assert dw["grid"] == plan["dw"].grid
