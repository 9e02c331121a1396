"""What a GPU would show and the interpreter hides, emulated on CPU, plus the NaN policy and the
psi margins above m = 4:

* a: a compiled launcher passes a Python float as fp32 (the interpreter keeps a double);
* b: an index times a stride in int32 wraps past 2^31 (on the GPU and in the interpreter);
* c: kernels must be launched under the tensors' device;
* d: fake kernels must return the real ops' strides (see test_ops_pass_opcheck);
* e, f: fp16 second-GEMM operands must neither flush to zero nor lose bits as subnormals.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import margin_kernels as mk
from margin_kernels.spec import MarginSpec

tb = pytest.importorskip("margin_kernels.ops.triton")
if not tb.HAS_TRITON or not tb.INTERPRET:
    pytest.skip("emulates GPU behaviour under TRITON_INTERPRET=1", allow_module_level=True)

from helpers import (  # noqa: E402
    ALL_SPECS,
    assert_backend_parity,
    error_bound,
    lowp_errors,
    make_data,
)
from helpers import loss_and_grads as _loss_and_grads  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


def _wrap_launches(monkeypatch, before):
    """Call ``before(args, kwargs) -> (args, kwargs)`` at every interpreted kernel launch."""
    original = interpreter.InterpretedFunction.run
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__)
        args, kwargs = before(args, kwargs)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return launches


def _fp32(value):
    return float(np.float32(value)) if isinstance(value, float) else value


@pytest.mark.parametrize("name", ["cosface", "arcface_exact_fallback", "so_softmax", "soft_margin"])
def test_a_float64_keeps_fp64_scalars_when_float_arguments_are_rounded_to_fp32(monkeypatch, name):
    """As the GPU launcher does, round every float kernel argument to fp32: the hyper-parameters
    must reach the kernels in an fp64 tensor, or fp64 parity drops to ~1e-8."""

    def round_floats(args, kwargs):
        return tuple(_fp32(a) for a in args), {k: _fp32(v) for k, v in kwargs.items()}

    launches = _wrap_launches(monkeypatch, round_floats)
    x, w, y = make_data()
    assert_backend_parity("triton", x, w, y, ALL_SPECS[name], tol=1e-12, reduction="none")
    assert launches, "no kernel launch went through the rounding wrapper"


def test_b_offsets_past_two_to_the_31_do_not_wrap():
    """A W view whose D stride is 2^29 elements: column k sits at k * 2^29 >= 2^31 for k >= 4.
    The storage (2^32 + 7 * 2^29 fp16 elements, 15 GiB of address space) is allocated lazily
    and only the C x D elements of the view are touched. The view starts 2^32 elements in, so
    a wrapped int32 offset reads the wrong (zero) memory instead of crashing."""
    num_classes, dim, stride = 37, 8, 2**29
    start = 2**32
    storage = torch.empty(start + num_classes + (dim - 1) * stride, dtype=torch.float16)
    x, w, y = make_data(c=num_classes, d=dim, dtype=torch.float16)
    w_view = storage.as_strided((num_classes, dim), (1, stride), start)
    w_view.copy_(w)
    assert w_view.stride(1) * (dim - 1) >= 2**31
    spec = MarginSpec.cosface(8.0, 0.35)
    kind_id, params = spec.kernel_args()
    outputs = []
    # the ops directly: autograd would hand the kernels a contiguous copy of a cloned view
    for weight in (w_view, w):
        fwd = torch.ops.margin_kernels.triton_lse_fwd(x, weight, y, None, kind_id, list(params),
                                                      True)  # fmt: skip
        neg_lse, _, stats, norms, nums = fwd
        grads = (torch.linspace(0.5, 1.5, len(y), dtype=neg_lse.dtype), -torch.ones_like(neg_lse))
        bwd = torch.ops.margin_kernels.triton_lse_bwd(
            *grads, x, weight, y, None, neg_lse, stats, norms, nums, kind_id, list(params),
            True, True,
        )  # fmt: skip
        outputs.append((*fwd, *bwd))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    assert outputs[0][-1].abs().sum() > 0  # dW was computed


def test_c_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Every kernel launch happens inside ``device_context(x.device)``."""
    active = []
    entered = []

    @contextlib.contextmanager
    def recording_context(device):
        entered.append(device)
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(tb.ops, "device_context", recording_context)

    def check_active(args, kwargs):
        assert active, "kernel launched outside device_context"
        return args, kwargs

    launches = _wrap_launches(monkeypatch, check_active)
    x, w, y = make_data()
    _loss_and_grads(x, w, y, MarginSpec.arcface(16.0, 0.5), "triton")
    assert "_fwd_kernel" in launches and "_dw_kernel" in launches
    assert entered and all(device == x.device for device in entered)


def test_c_device_context_selects_the_cuda_device():
    ctx = tb.ops.device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


def test_e_fp16_second_gemm_operands_of_1e_8_do_not_flush_to_zero():
    """||x|| = 3e4, unit weights, s = 64: dL/dd = g P s / (nx nw) spans 1e-11..2e-3 over the
    columns, much of it under fp16's smallest normal (6e-5) and subnormal (6e-8), while the dW
    rows (x is large) are 3e-3 and up, inside fp16. Cast to fp16 unscaled, those operands
    flush or keep a few bits (row errors of 2.6e-2); per-tile power-of-two scales keep every
    row to fp16's own precision."""
    x, w, y = make_data(ignored=())
    x = x / x.norm(dim=1, keepdim=True) * 3e4
    w = w / w.norm(dim=1, keepdim=True)
    spec = MarginSpec.cosface(64.0, 0.35)
    x16, w16 = x.half(), w.half()
    _, _, dw = _loss_and_grads(x16, w16, y, spec, "triton", reduction="none")
    _, _, exact = _loss_and_grads(x16.double(), w16.double(), y, spec, "torch",
                                  reduction="none")  # fmt: skip
    scale = exact.abs().amax(dim=1)
    rows = scale >= 1e-4  # dW rows that fp16 holds with full precision
    rows[y] = False  # non-target rows only: the target terms do not go through the GEMM
    assert rows.sum() >= 5
    row_err = (dw.double() - exact).abs().amax(dim=1) / scale
    assert row_err[rows].max() < 5e-3, row_err[rows]


@pytest.mark.parametrize("name", ["so_softmax", "lm_softmax"])
def test_f_fp16_gradients_at_feature_norm_5_7e4(name):
    """||x|| = 5.7e4 (fp16's max is 65504): dL/dd = dL/dc / (nx nw) ~ 1e-5 is subnormal in
    fp16 unless scaled. Our error stays within twice torch's own fp16 error."""
    errors = lowp_errors("triton", torch.float16, ALL_SPECS[name], x_norm=5.7e4)
    for part, (ours, theirs) in zip(("loss", "dX", "dW"), errors, strict=True):
        bound = error_bound(torch.float16, theirs)
        assert ours <= bound, f"{part}: {ours:.2e} vs torch's {theirs:.2e}"


@pytest.mark.parametrize("name", ["cosface", "w_softmax", "lsoftmax_m4"])
def test_nan_policy(name):
    """A NaN in a feature row makes that row's loss NaN and only that row's; a NaN in a weight
    row of the denominator makes every row's loss NaN; never 0, -inf or finite instead."""
    spec = ALL_SPECS[name]
    x, w, y = make_data(ignored=())
    x[4, 2] = float("nan")
    loss = mk.margin_cross_entropy(x, w, y, spec, backend="triton", reduction="none")
    ref = mk.margin_cross_entropy(x, w, y, spec, backend="torch", reduction="none")
    assert torch.isnan(loss[4]) and torch.isfinite(loss[torch.arange(len(y)) != 4]).all()
    keep = torch.arange(len(y)) != 4
    assert torch.allclose(loss[keep], ref[keep], rtol=1e-12, atol=0)
    x, w, y = make_data(ignored=())
    w[int(y[0]) - 1 if int(y[0]) > 0 else 1, 5] = float("nan")
    loss = mk.margin_cross_entropy(x, w, y, spec, backend="triton", reduction="none")
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("m", range(5, 11))
@pytest.mark.parametrize("kind", ["lsoftmax", "sphereface"])
def test_psi_margins_above_four(kind, m):
    spec = getattr(MarginSpec, kind)(m, lam=0.5)
    x, w, y = make_data()
    assert_backend_parity("triton", x, w, y, spec, tol=1e-12, reduction="none")
