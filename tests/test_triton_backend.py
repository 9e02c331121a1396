"""The Triton backend against the float64 reference: every loss kind with all of D on chip and with
D slices, awkward shapes, saturation, |cos| -> 1, theta + m > pi, Partial FC, low precision, op
registration. The GPU-only defects (fp32 scalars, int32 offsets, device, fake strides, fp16
range) are tested in test_triton_defects.py.

CI runs these under ``TRITON_INTERPRET=1`` on CPU tensors (the interpreter uses 16-wide tiles, so
the small shapes below still cross several row tiles, column tiles, splits and K slices). On a
machine with a GPU and without the interpreter they run on CUDA tensors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ALL_SPECS,
    TRITON_DEVICE,
    assert_backend_parity,
    error_bound,
    lowp_errors,
    make_data,
    requires_triton_interpreter,
)
from helpers import loss_and_grads as _loss_and_grads

import margin_kernels as mk
from margin_kernels.ops import resolve
from margin_kernels.spec import MarginSpec

tb = pytest.importorskip("margin_kernels.ops.triton")
if TRITON_DEVICE is None:
    pytest.skip("needs Triton with TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
DEVICE = TRITON_DEVICE

from margin_kernels.ops.triton import config  # noqa: E402
from margin_kernels.ops.triton.margin_math import NUM_PARAMS, kernel_params  # noqa: E402

B, C, D = 19, 37, 24  # B not a multiple of the tile, C prime, D not a power of two


def _data(b=B, c=C, d=D, seed=0, dtype=torch.float64, ignored=(3,)):
    return make_data(b, c, d, seed, dtype, ignored, DEVICE)


def _assert_parity(x, w, y, spec, tol, **kwargs):
    return assert_backend_parity("triton", x, w, y, spec, tol=tol, **kwargs)


# D = 24: one K step, x and the W tile on chip (interpreter tiles hold D <= 32); D = 48: the
# logits over K steps and the dX numerator / dW accumulators over two D slices
@pytest.mark.parametrize("dim", [D, 2 * D], ids=["full_d", "d_slices"])
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_float64_parity_every_kind(name, dim):
    spec = ALL_SPECS[name]
    x, w, y = _data(d=dim)
    _assert_parity(x, w, y, spec, 1e-12, reduction="none")


@pytest.mark.parametrize(
    "name", ["cosface", "arcface_exact_fallback", "sphereface_m4", "lsoftmax_m4"]
)
def test_noncontiguous_inputs(name):
    x, w, y = _data(d=2 * D)
    x_nc, w_nc = x[:, ::2], w.t().contiguous().t()[:, :D]  # strided rows, column-major weight
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    _assert_parity(x_nc, w_nc, y, ALL_SPECS[name], 1e-12)


@pytest.mark.parametrize("name", ["cosface", "arcface_exact_fallback", "w_softmax", "lsoftmax_m2"])
def test_partial_fc_class_ids(name):
    spec = ALL_SPECS[name]
    x, w, y = _data()
    g = torch.Generator().manual_seed(1)
    ids = torch.randperm(C, generator=g)[:13].sort().values.to(DEVICE)
    got = _assert_parity(x, w, y, spec, 1e-12, class_ids=ids)
    touched = torch.zeros(C, dtype=torch.bool, device=DEVICE)
    touched[ids] = True
    if spec.kind != "w_softmax":  # W-Softmax also reads W_0 for the ignored row (no target)
        touched[y[y >= 0]] = True
        assert (got[2][~touched] == 0).all(), "dW must be zero outside the sampled ids and targets"


def test_empty_class_ids_leave_only_the_target():
    x, w, y = _data(ignored=())
    ids = torch.empty(0, dtype=torch.long, device=DEVICE)
    loss, _, _ = _loss_and_grads(x, w, y, MarginSpec.cosface(8.0, 0.2), "triton", class_ids=ids)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # LSE over nothing is -inf


def test_saturated_softmax_s64_features_copied_into_weight():
    x, w, y = _data(ignored=())
    w[y] = x * 3.0  # c_iy = 1 exactly: the target dominates at s = 64
    for spec in (MarginSpec.cosface(64.0, 0.35), MarginSpec.arcface(64.0, 0.5)):
        _assert_parity(x, w, y, spec, 1e-11, reduction="none")
        _assert_parity(x.float(), w.float(), y, spec, 2e-4, reduction="none")


@pytest.mark.parametrize("overflow", ["fallback", "none", "easy"])
@pytest.mark.parametrize("grad_mode", ["exact", "straight_through"])
def test_arcface_at_cos_plus_minus_one_and_theta_plus_m_above_pi(overflow, grad_mode):
    x, w, y = _data(ignored=())
    w[y[:6]] = x[:6] * 2.0  # c = +1
    w[y[6:12]] = -x[6:12]  # c = -1: theta + m > pi
    other = (y[12] + 1) % C
    w[other] = -x[12]  # a non-target at c = -1
    spec = MarginSpec.arcface(16.0, 0.5, grad_mode=grad_mode, overflow=overflow)
    # sin(theta) = sqrt(1 - c^2) turns a rounding-level difference in c = 1 - O(eps) into
    # O(sqrt(eps)) ~ 1e-8: both sides are right to the conditioning of the formula
    _assert_parity(x, w, y, spec, 1e-7, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignored_rows(reduction):
    x, w, y = _data(ignored=(0, 5, 18))
    _, dx, _ = _assert_parity(x, w, y, ALL_SPECS["arcface_exact_fallback"], 1e-12,
                                 reduction=reduction)  # fmt: skip
    assert (dx[[0, 5, 18]] == 0).all()


def test_all_rows_ignored_and_empty_batch():
    x, w, y = _data(ignored=range(B))
    loss, dx, dw = _loss_and_grads(x, w, y, MarginSpec.cosface(), "triton")
    assert loss.item() == 0.0 and (dx == 0).all() and (dw == 0).all()
    x0, y0 = x[:0], y[:0]
    loss, dx, dw = _loss_and_grads(x0, w, y0, MarginSpec.cosface(), "triton")
    assert loss.item() == 0.0 and dx.shape == (0, D) and (dw == 0).all()


def test_gradients_are_bitwise_identical_with_and_without_the_deterministic_flag():
    """One path: every output has one owner and the splits merge in a fixed order, so
    ``deterministic=True`` costs nothing and changes nothing."""
    x, w, y = _data(dtype=torch.float32)
    spec = MarginSpec.arcface(30.0, 0.5)
    runs = [_loss_and_grads(x, w, y, spec, "triton", deterministic=flag) for flag in (True, False)]
    runs.append(_loss_and_grads(x, w, y, spec, "triton", deterministic=True))
    for first, *others in zip(*runs, strict=True):
        assert all(torch.equal(first, other) for other in others)


def test_more_classes_than_a_grid_dimension(monkeypatch):
    """More than 65535 class tiles (CUDA's limit on grid axes 1 and 2): the dW kernel's class
    tiles sit on axis 0 (the forward's splits on axis 1 stay few). The interpreter takes
    2048-wide tiles to keep the step count small, so C > 65536 there; on a GPU the real tiles
    need C > 65535 class tiles."""
    if tb.INTERPRET:
        wide = config.Tile(16, 2048, 16, 16, 1, 1)
        monkeypatch.setattr(config, "gemm_tile", lambda *args, **kwargs: wide)
        num_classes = 65537 + 2048
    else:
        tile = config.gemm_tile(torch.float64, config.NT_SCALED, 8)
        num_classes = 65536 * tile.block_n + 17
    x, w, y = _data(b=5, c=num_classes, d=8, ignored=())
    y[0] = num_classes - 100  # a target beyond 2^16
    _assert_parity(x, w, y, MarginSpec.cosface(30.0, 0.35), 1e-12, reduction="none")


LOWP_DTYPES = [torch.float32, torch.float16]
if not tb.INTERPRET:  # the interpreter's bf16 arithmetic is unreliable; GPUs run bf16 natively
    LOWP_DTYPES.append(torch.bfloat16)


@pytest.mark.parametrize("dtype", LOWP_DTYPES, ids=str)
@pytest.mark.parametrize(
    "name", ["cosface", "arcface_exact_fallback", "sphereface_m4", "w_softmax", "lm_softmax"]
)
def test_low_precision_error_is_bounded_by_torchs_own(name, dtype):
    errors = lowp_errors("triton", dtype, ALL_SPECS[name], device=DEVICE)
    for part, (ours, theirs) in zip(("loss", "dX", "dW"), errors, strict=True):
        bound = error_bound(dtype, theirs)
        assert ours <= bound, f"{part}: {ours:.2e} vs torch's {theirs:.2e}"


@requires_triton_interpreter
def test_bfloat16_runs_with_the_interpreter_upcast():
    errors = lowp_errors("triton", torch.bfloat16, MarginSpec.cosface(16.0, 0.3), device=DEVICE)
    for part, (ours, theirs) in zip(("loss", "dX", "dW"), errors, strict=True):
        # the interpreter's bf16 arithmetic is coarser than a GPU's: this file's floor of 1e-2
        bound = error_bound(torch.bfloat16, theirs, floor=1e-2)
        assert ours <= bound, f"{part}: {ours:.2e} vs torch's {theirs:.2e}"


def test_autocast_casts_operands_and_the_loss_stays_float32():
    x, w, y = _data(dtype=torch.float32)
    spec = MarginSpec.cosface(16.0, 0.3)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = mk.margin_cross_entropy(x, w, y, spec, backend="triton")
    assert loss.dtype == torch.float32
    ref = mk.margin_cross_entropy(x.half(), w.half(), y, spec, backend="torch")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_em_softmax_heads_match_the_reference():
    x, w, y = _data()
    heads = torch.stack([w, w.flip(0) * 0.5])
    got = mk.em_softmax_loss(x, heads, y, m=0.2, hsic_weight=0.1, backend="triton")
    ref = mk.em_softmax_loss(x, heads, y, m=0.2, hsic_weight=0.1, backend="torch")
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


def test_modules_run_on_the_triton_backend():
    head = mk.nn.SphereFaceLoss(D, C, m=4, schedule=mk.nn.LambdaSchedule.sphereface(),
                                backend="triton", dtype=torch.float64, device=DEVICE)  # fmt: skip
    ref = mk.nn.SphereFaceLoss(D, C, m=4, schedule=mk.nn.LambdaSchedule.sphereface(),
                               backend="torch", dtype=torch.float64, device=DEVICE)  # fmt: skip
    ref.load_state_dict(head.state_dict())
    x, _, y = _data()
    for _ in range(2):
        assert head(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-12)
    assert head.iteration == 2


@pytest.mark.parametrize("layout", ["contiguous", "column_major"])
def test_ops_pass_opcheck(layout):
    """The fake kernels match the real ops' shapes, dtypes and strides; with column-major x and
    W the real backward still returns contiguous gradients, and so must the fake one."""
    x, w, y = _data(b=7, c=11, d=8, ignored=())
    if layout == "column_major":
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
    for spec in (MarginSpec.arcface(16.0, 0.5), MarginSpec.w_softmax(1.5)):
        kind_id, params = spec.kernel_args()
        args = (x, w, y, None, kind_id, list(params), True)
        torch.library.opcheck(torch.ops.margin_kernels.triton_lse_fwd, args)
        neg_lse, _, stats, norms, nums = torch.ops.margin_kernels.triton_lse_fwd(*args)
        grads = (torch.ones_like(neg_lse), torch.ones_like(neg_lse))
        bwd_args = (*grads, x, w, y, None, neg_lse, stats, norms, nums, kind_id, list(params),
                    True, True)  # fmt: skip
        torch.library.opcheck(torch.ops.margin_kernels.triton_lse_bwd, bwd_args)


def test_torch_compile_fullgraph_with_backward():
    x, w, y = _data(dtype=torch.float32, ignored=())

    def step(x, w, y):
        return mk.arcface_loss(x, w, y, s=16.0, m=0.5, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    compiled(xa, wa, y).backward()
    step(xb, wb, y).backward()
    assert torch.allclose(xa.grad, xb.grad) and torch.allclose(wa.grad, wb.grad)


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    from margin_kernels import ops
    from margin_kernels.ops import cuda

    # the model-predicted faster backend first (ops.AUTO_PREFERRED_ON_GPU), triton where
    # the cuda backend cannot run
    assert ops.AUTO_PREFERRED_ON_GPU == "cuda" and ops._AUTO_GPU_ORDER == ["cuda", "triton"]
    gpu = torch.device("cuda")
    expected = "cuda" if cuda.unavailable_reason(gpu, MarginSpec.cosface()) is None else "triton"
    assert resolve("auto", gpu, MarginSpec.cosface())[0] == expected
    monkeypatch.setattr(cuda, "HAS_CUDA_EXT", False)
    assert resolve("auto", gpu, MarginSpec.cosface())[0] == "triton"
    # on CPU tensors the C++ kernels of the cuda backend when built (measured no slower)
    on_cpu = "cuda" if cuda.HAS_CUDA_EXT and ops.CPU_AUTO_NO_SLOWER else "torch"
    assert resolve("auto", torch.device("cpu"), MarginSpec.cosface())[0] == on_cpu


def test_unavailable_reason_names_the_fix(monkeypatch):
    monkeypatch.setattr(tb.ops, "INTERPRET", False)
    reason = tb.unavailable_reason(torch.device("cpu"), MarginSpec.cosface())
    assert "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    monkeypatch.setattr(tb.ops, "HAS_TRITON", False)
    assert "pip install triton" in tb.unavailable_reason(torch.device("cuda"), MarginSpec.cosface())


def test_psi_thresholds_and_acos_polynomial():
    params = list(MarginSpec.lsoftmax(4).kernel_args()[1])
    vec = kernel_params(params, 4)
    assert len(vec) == NUM_PARAMS and vec[:11] == params[:11]
    assert vec[11:14] == pytest.approx(
        [math.cos(math.pi / 4), 0.0, math.cos(3 * math.pi / 4)], abs=1e-15
    )
    assert vec[14:] == [-2.0] * 12
    # the combined margin's arccos: its value through the kernel at c across [-1, 1]
    c = torch.linspace(-1, 1, 41, dtype=torch.float64)
    x = torch.stack([c, (1 - c * c).clamp_min(0).sqrt()], dim=1).to(DEVICE)
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    spec = MarginSpec.combined(1.0, 1.0, 0.0, 0.0)
    _, t = tb.lse_parts(x, w, torch.zeros(41, dtype=torch.long, device=DEVICE), spec)
    assert torch.allclose(t.cpu(), c, rtol=0, atol=1e-15)
