"""GPU parity of both fused backends against the float64 reference, at shapes that cross the real
tiles: several row tiles, class tiles, C splits and K slices in every dtype (B = 300, C = 5000,
D = 600), float64, TF32, ``deterministic=True``, Partial-FC class ids and a column-major weight.

Tolerances are per element and derived from the dtype. The exact result is the float64
reference on the float64 originals; torch's own error is that of the reference backend on the
same inputs stored in the dtype (input rounding included; with TF32 GEMMs for the TF32 case).
Entry e of ours may differ from the exact one by ``4 u |exact_e| + |torch_e - exact_e| +
8 max|torch - exact|``, u the unit roundoff of the output dtype. A tile, split or K slice that
is dropped, doubled or misaligned moves its entries by O(|value|), far past that (the previous
bound, ``rel * max(1, max|ref|)``, allowed 8 % of the largest entry in bf16). The factors were
calibrated by running these cases with the CUDA backend's chunked algorithm on its C++ CPU twin
at the same shapes (every case passes there; W-Softmax's fp32 dX needed the 8).

Marked ``gpu``; skipped with the reason where there is no CUDA device (or no Triton outside the
interpreter, or no built extension)."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import ALL_SPECS

import margin_kernels as mk
from margin_kernels.spec import MarginSpec

pytestmark = pytest.mark.gpu

B, C, D = 300, 5000, 600
NUM_SAMPLED = 2000


def _skip_reason(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if backend == "triton":
        from margin_kernels.ops import triton as triton_backend

        if not triton_backend.HAS_TRITON:
            return "Triton is not installed"
        if triton_backend.INTERPRET:
            return "TRITON_INTERPRET=1 runs the kernels on CPU, not on the GPU"
    if backend == "cuda":
        from margin_kernels.ops import cuda as cuda_backend

        if not cuda_backend.HAS_CUDA_EXT:
            return "margin_kernels._C is not built"
    return None


def _require(backend: str) -> None:
    reason = _skip_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _inputs(dtype, seed=0, column_major=False):
    """(x, w, y, x64, w64): the inputs in ``dtype`` and the float64 originals they round."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(B, D, generator=g, dtype=torch.float64).cuda()
    w64 = torch.randn(C, D, generator=g, dtype=torch.float64).cuda()
    y = torch.randint(0, C, (B,), generator=g).cuda()
    y[::37] = -100  # ignored rows
    x, w = x64.to(dtype), w64.to(dtype)
    if column_major:
        w = w.t().contiguous().t()
    return x, w, y, x64, w64


def _run(x, w, y, spec, backend, **kwargs):
    """Per-row loss and the gradients of a row-weighted sum of it."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = mk.margin_cross_entropy(x, w, y, spec, reduction="none", backend=backend, **kwargs)
    g = torch.Generator(device="cuda").manual_seed(3)
    weights = torch.rand(loss.shape, generator=g, device="cuda", dtype=torch.float64)
    (loss * weights.to(loss.dtype)).sum().backward()
    return {"loss": loss.detach(), "dX": x.grad, "dW": w.grad}


def _unit_roundoff(dtype: torch.dtype, tf32: bool) -> float:
    if tf32:
        return 2.0**-11  # 10 explicit mantissa bits
    return torch.finfo(dtype).eps / 2


def _assert_parity(got, exact, torch_own, dtype, spec, tf32=False):
    for part in ("loss", "dX", "dW"):
        a, e = got[part].double(), exact[part].double()
        assert torch.isfinite(a).all(), f"{part}: non-finite entries"
        if dtype == torch.float64:
            rel = 1e-9
            tol = rel * (e.abs() + e.abs().max() * 1e-3)
        else:
            # unit roundoff of the stored result (float32 for the loss)
            u = _unit_roundoff(a.dtype if part != "loss" else torch.float32, tf32)
            own = (torch_own[part].double() - e).abs()
            tol = 4 * u * e.abs() + own + 8 * own.max() + 1e-30
        err = (a - e).abs()
        bad = err > tol
        if bad.any():
            idx = torch.nonzero(bad)[0].tolist()
            raise AssertionError(
                f"{part}: {int(bad.sum())} of {bad.numel()} entries out of tolerance; first at "
                f"{idx}: got {a[tuple(idx)].item():.6g}, exact {e[tuple(idx)].item():.6g}, "
                f"tolerance {tol[tuple(idx)].item():.3g}"
            )


REPRESENTATIVE = ["cosface", "arcface_exact_fallback", "lsoftmax_m4", "w_softmax", "combined"]
CASES = [(name, dt) for name in sorted(ALL_SPECS) for dt in ("fp32", "bf16")]
CASES += [(name, dt) for name in REPRESENTATIVE for dt in ("fp64", "fp16", "tf32")]
DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@pytest.fixture
def tf32_matmul(request):
    """Allow TF32 GEMMs (torch's and the Triton kernels' fp32 precision) for one test."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def _parity_case(backend, name, dtype_name, request, **kwargs):
    _require(backend)
    spec = ALL_SPECS[name]
    dtype = DTYPES[dtype_name]
    tf32 = dtype_name == "tf32"
    if tf32:
        request.getfixturevalue("tf32_matmul")
    x, w, y, x64, w64 = _inputs(dtype, column_major=kwargs.pop("column_major", False))
    exact = _run(x64, w64, y, spec, "torch", **kwargs)
    torch_own = _run(x, w, y, spec, "torch", **kwargs)
    got = _run(x, w, y, spec, backend, **kwargs)
    _assert_parity(got, exact, torch_own, dtype, spec, tf32)
    return x, w, y, spec, got


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(("name", "dtype_name"), CASES)
def test_parity_beyond_the_tiles(backend, name, dtype_name, request):
    _parity_case(backend, name, dtype_name, request)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype_name", ["fp64", "fp32", "bf16"])
def test_deterministic_is_bitwise_repeatable_and_accurate(backend, dtype_name, request):
    x, w, y, spec, got = _parity_case(
        backend, "arcface_exact_fallback", dtype_name, request, deterministic=True
    )
    again = _run(x, w, y, spec, backend, deterministic=True)
    for part in got:
        assert torch.equal(got[part], again[part]), f"{part} differs between two runs"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["cosface", "w_softmax", "lsoftmax_m2"])
def test_partial_fc_class_ids(backend, name, dtype_name, request):
    _require(backend)
    g = torch.Generator().manual_seed(9)
    ids = torch.randperm(C, generator=g)[:NUM_SAMPLED].sort().values.cuda()
    _, _, y, spec, got = _parity_case(backend, name, dtype_name, request, class_ids=ids)
    touched = torch.zeros(C, dtype=torch.bool, device="cuda")
    touched[ids] = True
    touched[y[y >= 0]] = True
    if spec.kind == "w_softmax":
        touched[0] = True  # rows without a target read W_0
    assert (got["dW"][~touched] == 0).all(), "dW outside the sampled ids and targets"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_column_major_weight(backend, dtype_name, request):
    _parity_case(backend, "arcface_exact_fallback", dtype_name, request, column_major=True)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_saturated_softmax_at_s64(backend):
    """s = 64 with targets copied into the weight (c = 1): the float32 softmax saturates."""
    _require(backend)
    x, w, y, _, _ = _inputs(torch.float32, seed=4)
    valid = y >= 0
    w[y[valid]] = x[valid] * 2.0
    spec = MarginSpec.arcface(64.0, 0.5)
    exact = _run(x.double(), w.double(), y, spec, "torch")
    torch_own = _run(x, w, y, spec, "torch")
    _assert_parity(_run(x, w, y, spec, backend), exact, torch_own, torch.float32, spec)


def test_shapes_cross_several_tiles_of_the_launch_plan():
    """The shapes above are larger than the Triton tiles in every dtype: at least 2 row tiles,
    2 class tiles and 2 K slices per launch that has them (read from the launch plan)."""
    try:
        config = importlib.import_module("margin_kernels.ops.triton.config")
    except ImportError:  # the launch-plan module arrives with the Triton rewrite
        pytest.skip("margin_kernels.ops.triton.config (the launch plan) is not in this tree")
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for kind in ("cosface", "w_softmax"):
            for launch in config.plan(B, C, D, dtype, kind):
                if launch.role not in ("forward", "dw", "dx"):
                    continue
                where = f"{dtype} {kind} {launch.kernel}"
                if launch.block_m:
                    assert 2 * launch.block_m <= B, f"{where}: one row tile"
                if launch.block_n:
                    assert 2 * launch.block_n <= C, f"{where}: one class tile"
                # a kernel that holds all of D in one tile has no K slices to cross
                assert launch.block_k >= D or 2 * launch.block_k <= D, f"{where}: one K slice"
