"""The CUDA C++ backend: its C++ math (the CPU twin of the CUDA epilogues, compiled from the same
csrc/margin_math.h) against the torch reference, the chunked algorithm of ops/cuda.py on CPU
tensors against the float64 reference, op registration (opcheck, torch.compile), the errors, and
GPU parity (skipped without a GPU)."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
from cpu_backends import loss_and_grads
from helpers import (
    ALL_SPECS,
    PSI_VALUES,
    STRAIGHT_THROUGH_SPECS,
    assert_parity,
    assert_within,
    requires_cuda_extension,
    requires_extension,
)

import margin_kernels as mk

# the allocation tracker of the benchmark harness (bench/ is a folder of scripts, not a package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from harness import LiveBytes

from margin_kernels import reference
from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.spec import KINDS, MarginSpec

needs_ext = requires_extension
needs_gpu = requires_cuda_extension

TRANSFORM_SPECS = {**ALL_SPECS, **STRAIGHT_THROUGH_SPECS}

# Cosines covering every psi branch, the thresholds cos(j pi/m), |c| -> 1 and theta + m > pi.
COSINES = sorted(
    {round(v, 6) for v in torch.linspace(-1, 1, 41).tolist()}
    | {1.0, -1.0, 0.99999, -0.99999, 0.7, -0.7, 0.49, 0.51, -0.49, -0.51, 0.0, 0.9, -0.9, -0.95}
)


def _reference_transform(spec, c, x_norm, w_norm, target, c_target=None, gram=None):
    """Value and autograd d/dc of the reference transform."""
    c = c.clone().requires_grad_()
    if target:
        value = reference.target_transform(c, x_norm, w_norm, spec)
    else:
        value = reference.nontarget_transform(c, x_norm, w_norm, spec, c_target, gram)
    (deriv,) = torch.autograd.grad(value.sum(), c)
    return value.detach(), deriv


@needs_ext
@pytest.mark.parametrize("target", [True, False], ids=["target", "nontarget"])
@pytest.mark.parametrize("name", sorted(TRANSFORM_SPECS))
def test_margin_transform_matches_reference(name, target):
    spec = TRANSFORM_SPECS[name]
    g = torch.Generator().manual_seed(0)
    c = torch.tensor(COSINES, dtype=torch.float64)
    x_norm = torch.rand(c.shape, generator=g, dtype=torch.float64) * 3 + 0.5
    w_norm = torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 + 0.5
    c_target = torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1
    gram = torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1
    value, deriv = cuda_backend.margin_transform(c, spec, target, x_norm, w_norm, c_target, gram)
    ref_value, ref_deriv = _reference_transform(spec, c, x_norm, w_norm, target, c_target, gram)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(deriv).all()


@needs_ext
@pytest.mark.parametrize("name", ["cosface", "arcface_exact_fallback", "combined", "lsoftmax_m4"])
def test_margin_transform_float32(name):
    spec = ALL_SPECS[name]
    c = torch.tensor(COSINES, dtype=torch.float32)
    ones = torch.ones_like(c)
    value, deriv = cuda_backend.margin_transform(c, spec, True)
    ref_value, ref_deriv = _reference_transform(spec, c, ones, ones, True)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("m", sorted(PSI_VALUES))
def test_psi_reference_values_in_cpp(m):
    degrees = sorted(PSI_VALUES[m])
    c = torch.tensor([math.cos(math.radians(d)) for d in degrees], dtype=torch.float64)
    value, _ = cuda_backend.margin_transform(c, MarginSpec.sphereface(m), True)
    expected = torch.tensor([PSI_VALUES[m][d] for d in degrees], dtype=torch.float64)
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-9)


@needs_ext
def test_arc_margins_at_unit_cosine_and_past_pi():
    c = torch.tensor([1.0, -1.0, 0.999999, -0.999999, -0.95], dtype=torch.float64)
    m = 0.5
    fallback, fallback_d = cuda_backend.margin_transform(c, MarginSpec.arcface(1.0, m), True)
    assert torch.isfinite(fallback_d).all()
    # theta > pi - m: c - m sin m with slope 1 (fallback), c itself for c <= 0 (easy)
    past = c < -math.cos(m)
    torch.testing.assert_close(fallback[past], c[past] - m * math.sin(m))
    torch.testing.assert_close(fallback_d[past], torch.ones_like(c[past]))
    easy, _ = cuda_backend.margin_transform(c, MarginSpec.arcface(1.0, m, overflow="easy"), True)
    torch.testing.assert_close(easy[c <= 0], c[c <= 0])
    plain, _ = cuda_backend.margin_transform(c, MarginSpec.arcface(1.0, m, overflow="none"), True)
    theta = torch.acos(c)
    torch.testing.assert_close(plain, torch.cos(theta + m))
    # exact derivative at |c| -> 1: cos m + sin m c / sqrt(max(1 - c^2, 1e-6)), finite
    _, exact_d = cuda_backend.margin_transform(c, MarginSpec.arcface(1.0, m, overflow="none"), True)
    expected = math.cos(m) + math.sin(m) * c / (1 - c * c).clamp_min(1e-6).sqrt()
    torch.testing.assert_close(exact_d, expected)
    _, st_d = cuda_backend.margin_transform(
        c, MarginSpec.arcface(2.0, m, grad_mode="straight_through"), True
    )
    torch.testing.assert_close(st_d, torch.full_like(c, 2.0))


def _problem(dtype, b=11, c=13, d=6, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2 * d if noncontiguous else d, generator=g, dtype=dtype)
    if noncontiguous:
        x = x[:, ::2]
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[2] = -1  # ignored row (no target)
    y[7] = c + 4  # target owned by another shard
    return x, w, y


PARTS = ("loss", "neg_lse", "target", "dX", "dW")


def _parts_and_grads(fn, x, w, y, spec, class_ids, **kwargs):
    """(loss, neg_lse, target logit, dX, dW) of the shared probe (cpu_backends.loss_and_grads)."""
    parts = loss_and_grads(functools.partial(fn, **kwargs), x, w, y, spec, class_ids)
    return tuple(parts[name] for name in ("loss", "neg_lse", "target_logit", "dX", "dW"))


@needs_ext
@pytest.mark.parametrize("partial_fc", [False, True], ids=["all_classes", "class_ids"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_chunked_lse_parts_matches_fp64_reference(name, dtype, partial_fc):
    spec = ALL_SPECS[name]
    x, w, y = _problem(dtype, noncontiguous=name.startswith(("arcface", "w_")))
    class_ids = torch.tensor([0, 3, 4, 7, 8, 12, 5]) if partial_fc else None
    num_cols = w.shape[0] if class_ids is None else class_ids.numel()
    # 3 classes per chunk: chunk boundaries that do not divide the columns (13 or 7)
    sampled = class_ids is not None
    per_class = cuda_backend.class_bytes(x.shape[0], x.shape[1], dtype, spec.kind, sampled, "cpu")
    chunk_bytes = 3 * per_class + per_class // 2
    plan = cuda_backend.chunk_plan(
        x.shape[0],
        w.shape[0],
        x.shape[1],
        dtype,
        spec.kind,
        num_cols if sampled else None,
        chunk_bytes,
    )
    assert plan.classes_per_chunk == 3 and plan.num_chunks == math.ceil(num_cols / 3)
    got = assert_parity(
        functools.partial(
            _parts_and_grads, cuda_backend._chunked_lse_parts, chunk_bytes=chunk_bytes
        ),
        functools.partial(_parts_and_grads, reference.lse_parts),
        PARTS,
        x,
        w,
        y,
        spec,
        class_ids,
        # this file's element-wise bounds, kept in addition to the shared rule
        close={"rtol": 1e-10, "atol": 1e-10}
        if dtype == torch.float64
        else {"rtol": 2e-4, "atol": 2e-4},
    )
    for label, a in zip(PARTS, got, strict=True):
        assert a.dtype == dtype, label
    if class_ids is not None:
        # dW is zero outside the sampled classes and the rows' targets
        touched = torch.zeros(w.shape[0], dtype=torch.bool)
        touched[class_ids] = True
        touched[y[(y >= 0) & (y < w.shape[0])]] = True
        if spec.kind == "w_softmax":
            touched[0] = True  # rows without a target read W[0] (reference semantics)
        assert got[4][~touched].abs().max() == 0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["arcface_exact_fallback", "lsoftmax_m4", "w_softmax"])
def test_chunked_lse_parts_half_storage(name, dtype):
    """float16/bfloat16 logits buffers with float32 math (the CPU twin of the GPU dtypes)."""
    spec = ALL_SPECS[name]
    x, w, y = _problem(torch.float32)
    x, w = x.to(dtype), w.to(dtype)
    got = _parts_and_grads(cuda_backend._chunked_lse_parts, x, w, y, spec, None, chunk_bytes=64)
    want = _parts_and_grads(reference.lse_parts, x.double(), w.double(), y, spec, None)
    torch_lowp = _parts_and_grads(reference.lse_parts, x, w, y, spec, None)
    # The shared rule, and this file's element-wise bound (atol scaled by the largest value).
    # The logits buffer is stored in bf16 here (the reference keeps fp32 logits): one more
    # rounding of 2^-8 relative, so the bf16 floor is one bf16 ulp at 1.
    floor = 2.0**-8 if dtype == torch.bfloat16 else None
    assert_within(PARTS, got, want, torch_lowp, dtype, floor=floor)
    rel = 2e-2 if dtype == torch.float16 else 8e-2
    for label, a, b in zip(PARTS, got, want, strict=True):
        assert a.dtype == (torch.float32 if label in ("loss", "neg_lse", "target") else dtype)
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=rel, atol=rel * scale, msg=label)


@needs_ext
def test_deterministic_mode_matches():
    spec = ALL_SPECS["w_softmax"]
    x, w, y = _problem(torch.float64)
    class_ids = torch.tensor([1, 2, 5, 9])
    plain = _parts_and_grads(cuda_backend._chunked_lse_parts, x, w, y, spec, class_ids)
    det = _parts_and_grads(
        cuda_backend._chunked_lse_parts, x, w, y, spec, class_ids, deterministic=True
    )
    for a, b in zip(plain, det, strict=True):
        torch.testing.assert_close(a, b)


@needs_ext
def test_rows_with_only_the_target_column_give_minus_inf():
    x, w, _ = _problem(torch.float64)
    x, w, y = x[:3], w[:4], torch.tensor([1, 1, 2])
    class_ids = torch.tensor([1])
    spec = MarginSpec.cosface(8.0)
    got = _parts_and_grads(cuda_backend._chunked_lse_parts, x, w, y, spec, class_ids)
    want = _parts_and_grads(reference.lse_parts, x, w, y, spec, class_ids)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.isneginf(got[1][:2]).all()


@needs_ext
def test_empty_batch():
    x = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    neg_lse, t = cuda_backend._chunked_lse_parts(
        x, w, torch.zeros(0, dtype=torch.long), ALL_SPECS["cosface"]
    )
    assert neg_lse.shape == t.shape == (0,)
    (neg_lse.sum() + t.sum()).backward()
    assert w.grad.abs().sum() == 0


def test_chunk_plan_budget(monkeypatch):
    monkeypatch.delenv(cuda_backend.CHUNK_BYTES_ENV, raising=False)
    # fp32, B = 1024: 4 B of fp32 logits per class; 256 MiB holds 65,536 classes
    plan = cuda_backend.chunk_plan(1024, 10**6, 512, torch.float32, "arcface")
    assert plan.classes_per_chunk == 256 * 2**20 // (4 * 1024) == 65536
    assert plan.num_chunks == math.ceil(10**6 / 65536)
    assert plan.logits_dtype == torch.float32
    # bf16: + 2 B (dL/dz in bf16) + 4 D (H_c in fp32) per class
    bf16 = cuda_backend.chunk_plan(1024, 10**6, 512, torch.bfloat16, "arcface")
    assert bf16.classes_per_chunk == 256 * 2**20 // (4 * 1024 + 2 * 1024 + 4 * 512) == 32768
    assert bf16.logits_dtype == torch.float32
    # W-Softmax holds a second (gram) buffer
    w_soft = cuda_backend.chunk_plan(1024, 10**6, 512, torch.float32, "w_softmax")
    assert w_soft.classes_per_chunk == plan.classes_per_chunk // 2
    assert cuda_backend.chunk_plan(4, 10, 8, torch.float64, "cosface").logits_dtype == torch.float64
    monkeypatch.setenv(cuda_backend.CHUNK_BYTES_ENV, str(8 * 10**6))
    assert cuda_backend.chunk_plan(1000, 10**6, 8, torch.float32, "cosface").classes_per_chunk == (
        2000
    )
    assert cuda_backend.chunk_plan(10, 10**6, 8, torch.float32, "cosface", None, 1).num_chunks == (
        10**6
    )
    monkeypatch.setenv(cuda_backend.CHUNK_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=cuda_backend.CHUNK_BYTES_ENV):
        cuda_backend.chunk_plan(4, 10, 8, torch.float32, "cosface")
    with pytest.raises(ValueError, match="chunk_bytes"):
        cuda_backend.chunk_plan(4, 10, 8, torch.float32, "cosface", None, 0)


@pytest.mark.parametrize("batch", [128, 1024, 32])
def test_epilogue_grid_fills_the_sms(batch):
    """At least BLOCKS_PER_SM blocks per SM when the chunk is long enough to split rows, and no
    segment shorter than MIN_SEGMENT columns."""
    plan = cuda_backend.chunk_plan(batch, 10**6, 512, torch.bfloat16, "arcface")
    rows, splits = plan.epilogue_grid
    assert rows == batch
    assert rows * splits >= 132 * cuda_backend.BLOCKS_PER_SM
    assert plan.classes_per_chunk // splits >= cuda_backend.MIN_SEGMENT
    assert plan.threads_per_block == 256
    short = cuda_backend.chunk_plan(batch, 3000, 512, torch.bfloat16, "arcface")
    assert short.epilogue_grid[1] == max(1, min(3000 // cuda_backend.MIN_SEGMENT, splits))


def _op_args(spec, dtype=torch.float64, rows=5, cols=7):
    g = torch.Generator().manual_seed(3)
    kind, params = spec.kernel_args()
    weighted = spec.kind == "w_softmax"
    return {
        "logits": torch.randn(rows, cols, generator=g, dtype=dtype),
        "gram": torch.randn(rows, cols, generator=g, dtype=dtype) if weighted else None,
        "x_norm": torch.rand(rows, generator=g, dtype=dtype) + 1,
        "col_norm": torch.rand(cols, generator=g, dtype=dtype) + 1,
        "target": torch.tensor([0, 3, -1, 6, 9])[:rows],
        "col_ids": torch.arange(cols) * 2 if spec.kind == "cosface" else None,
        "col_offset": 2,
        "c_target": torch.rand(rows, generator=g, dtype=dtype) * 2 - 1,
        "target_norm": torch.rand(rows, generator=g, dtype=dtype) + 1,
        "num_classes": 9,
        "running_lse": torch.randn(rows, generator=g, dtype=dtype),
        "class_splits": 3,
        "kind": kind,
        "params": list(params),
    }


@needs_ext
@pytest.mark.parametrize("name", ["cosface", "w_softmax", "lsoftmax_m4"])
def test_opcheck_every_op(name):
    spec = ALL_SPECS[name]
    ops = torch.ops.margin_kernels
    a = _op_args(spec)
    fwd_args = tuple(a.values())
    torch.library.opcheck(ops.margin_lse_fwd.default, fwd_args)
    neg_lse = a["running_lse"].clone()
    ops.margin_lse_fwd(*fwd_args[:10], neg_lse, *fwd_args[11:])
    rows = a["logits"].shape[0]
    g = torch.Generator().manual_seed(4)
    bwd_args = (
        *list(fwd_args[:10]),
        neg_lse,
        torch.randn(rows, generator=g, dtype=torch.float64),
        torch.randn(rows, generator=g, dtype=torch.float64),
        a["class_splits"],
        True,
        None,
        None,
        a["kind"],
        a["params"],
    )
    torch.library.opcheck(ops.margin_lse_bwd.default, bwd_args)
    c = torch.linspace(-1, 1, 9, dtype=torch.float64)
    ones = torch.ones_like(c)
    transform_args = (c, ones, ones, c.flip(0), c * 0.5, a["kind"], a["params"], True)
    torch.library.opcheck(ops.margin_transform.default, transform_args)
    torch.library.opcheck(ops.margin_transform.default, (*transform_args[:-1], False))


@needs_ext
def test_ops_reject_bad_arguments():
    ops = torch.ops.margin_kernels
    a = _op_args(MarginSpec.cosface())
    with pytest.raises(ValueError, match="kind id"):
        ops.margin_lse_fwd(*{**a, "kind": 42}.values())
    with pytest.raises(ValueError, match="params"):
        ops.margin_lse_fwd(*{**a, "params": [1.0]}.values())
    with pytest.raises(ValueError, match="x_norm"):
        ops.margin_lse_fwd(*{**a, "x_norm": a["x_norm"].float()}.values())
    with pytest.raises(ValueError, match="gram"):
        w_args = _op_args(MarginSpec.w_softmax())
        ops.margin_lse_fwd(*{**w_args, "gram": None}.values())
    with pytest.raises(ValueError, match="class_splits"):
        ops.margin_lse_fwd(*{**a, "class_splits": 0}.values())
    with pytest.raises(ValueError, match="running_lse"):
        ops.margin_lse_fwd(*{**a, "running_lse": a["running_lse"][:2]}.values())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["cosface", "w_softmax", "lsoftmax_m4"])
def test_backward_writes_16bit_grad_buffers(name, dtype):
    """With grad_logits (grad_gram) the backward epilogue writes there dL/dz (dL/dh) times
    max(||W_j||, eps) (kinds with raw W_j: dL/dz), and, in the scaled and squared families, dL/dz
    also times max(||x_i||, eps), rounded to the 16-bit dtype, and leaves the fp32 logits
    unchanged: the in-place run's values times those norms, to within one rounding. Column 5 is
    a zero weight row, row 2 a zero feature row (norms held at eps): their dL/dz, up to 1e12
    times the softmax gradient, is past fp16's range, while the buffer holds finite values."""
    spec = ALL_SPECS[name]
    ops = torch.ops.margin_kernels
    a = _op_args(spec, dtype=torch.float32, cols=19)
    a["col_ids"] = None
    a["col_norm"][5] = 1e-12
    a["logits"][:, 5] = 0.0
    a["x_norm"][2] = 1e-12
    a["logits"][2] = 0.0
    if a["gram"] is not None:
        a["gram"][:, 5] = 0.0
    rows = a["logits"].shape[0]
    grads = (torch.ones(rows), torch.full((rows,), 0.5))
    neg_lse = a["running_lse"].clone()
    ops.margin_lse_fwd(*{**a, "running_lse": neg_lse}.values())
    head = list(a.values())[:10]
    in_place = [t.clone() if isinstance(t, torch.Tensor) else t for t in head]
    want = ops.margin_lse_bwd(
        *in_place, neg_lse, *grads, 3, True, None, None, a["kind"], a["params"]
    )
    dz = torch.empty(a["logits"].shape, dtype=dtype)
    dh = torch.empty(a["logits"].shape, dtype=dtype) if a["gram"] is not None else None
    logits_before = a["logits"].clone()
    bwd_args = (*head, neg_lse, *grads, 3, True, dz, dh, a["kind"], a["params"])
    got = ops.margin_lse_bwd(*bwd_args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.equal(a["logits"], logits_before)
    family = KINDS[spec.kind].family
    scale = a["col_norm"] if spec.normalizes_weight else torch.ones_like(a["col_norm"])
    dz_scale = scale * a["x_norm"][:, None] if family in ("scaled", "squared") else scale
    eps = torch.finfo(dtype).eps
    if spec.kind != "lsoftmax":
        assert in_place[0][:, 5].abs().max() > 1e6  # past fp16 range (65504)
    if family == "scaled":
        assert in_place[0][2].abs().max() > 1e6
    for buffer, exact, factor in ((dz, in_place[0], dz_scale), (dh, in_place[1], scale)):
        if buffer is None:
            continue
        assert torch.isfinite(buffer[:, 5]).all() and torch.isfinite(buffer[2]).all()
        # one rounding apart: eps relative, or the subnormal spacing below the smallest normal
        subnormal = torch.finfo(dtype).smallest_normal * eps
        rounded = (exact * factor).to(dtype).float()
        torch.testing.assert_close(buffer.float(), rounded, rtol=eps, atol=subnormal)
    torch.library.opcheck(ops.margin_lse_bwd.default, bwd_args)
    with pytest.raises(ValueError, match="grad_logits"):
        ops.margin_lse_bwd(*head, neg_lse, *grads, 3, True, dz.float(), dh, a["kind"], a["params"])


@needs_ext
@pytest.mark.parametrize("name", ["cosface", "w_softmax", "sphereface_m4"])
def test_split_segments_match_one_segment(name):
    """The (rows, class_splits) partials merged in split order equal the one-segment epilogue,
    forward (the merged running LSE) and backward (dL/dz in place and the row terms)."""
    spec = ALL_SPECS[name]
    ops = torch.ops.margin_kernels
    a = _op_args(spec, cols=23)
    results = []
    for splits in (1, 4, 7):
        args = {**a, "class_splits": splits, "logits": a["logits"].clone()}
        if args["gram"] is not None:
            args["gram"] = a["gram"].clone()
        running = a["running_lse"].clone()
        t = ops.margin_lse_fwd(*{**args, "running_lse": running}.values())
        grads = ops.margin_lse_bwd(
            args["logits"],
            args["gram"],
            *list(args.values())[2:9],
            args["num_classes"],
            running,
            torch.ones_like(running),
            torch.full_like(running, 0.5),
            splits,
            True,
            None,
            None,
            args["kind"],
            args["params"],
        )
        results.append((running, t, args["logits"], *grads))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the running LSE really merged the previous value in: logaddexp(previous, chunk)
    chunk = a["running_lse"].new_full(a["running_lse"].shape, float("-inf"))
    ops.margin_lse_fwd(*{**a, "running_lse": chunk, "logits": a["logits"].clone()}.values())
    torch.testing.assert_close(results[0][0], torch.logaddexp(a["running_lse"], chunk))


@needs_ext
def test_torch_compile_fullgraph_cpu_twin():
    torch._dynamo.reset()
    spec = ALL_SPECS["arcface_exact_fallback"]
    x, w, y = _problem(torch.float32)

    def loss_fn(x, w):
        neg_lse, t = cuda_backend._chunked_lse_parts(x, w, y, spec, chunk_bytes=4 * 13 * 4)
        return reference.loss_from_parts(neg_lse, t, y >= 0, spec, "mean")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    compiled(xa, wa).backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss_fn(xb, wb).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)


def test_cpu_tensors_run_the_cpu_kernels():
    """backend="cuda" on CPU tensors runs the C++ CPU kernels of the same ops (when built) and is
    listed by available_backends; without the extension it names the fix."""
    from margin_kernels.ops import available_backends

    x, w, y = _problem(torch.float32)
    y = y.clamp(0, 12)
    spec = MarginSpec.cosface()
    reason = cuda_backend.unavailable_reason(torch.device("cpu"), spec)
    if not cuda_backend.HAS_CUDA_EXT:
        assert reason is not None
        assert "cuda" not in available_backends("cpu", spec)
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            mk.cosface_loss(x, w, y, backend="cuda")
        return
    assert reason is None
    assert "cuda" in available_backends("cpu", spec)
    got = mk.cosface_loss(x, w, y, backend="cuda")
    torch.testing.assert_close(got, mk.cosface_loss(x, w, y, backend="torch"))
    assert cuda_backend.unavailable_reason(torch.device("meta"), spec) is not None


def test_missing_extension_names_the_fix(monkeypatch):
    monkeypatch.setattr(cuda_backend, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(cuda_backend, "_EXT_IMPORT_ERROR", "No module named 'margin_kernels._C'")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"), MarginSpec.cosface())
    assert "margin_kernels._C" in reason
    assert "pip install --no-build-isolation -e ." in reason
    assert "MARGIN_KERNELS_FORCE_CUDA_BUILD=1" in reason
    assert "nvcc" in reason
    x, w, y = _problem(torch.float32)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        cuda_backend._chunked_lse_parts(x, w, y, MarginSpec.cosface())
    assert "cuda" not in mk.ops.available_backends("cpu", MarginSpec.cosface())


def test_auto_order_on_gpu_follows_the_model_until_measured():
    """No GPU measurement has replaced the performance model's prediction yet: "auto" on CUDA
    tensors tries the backend the model predicts faster at the headline shape first."""
    from margin_kernels import ops
    from margin_kernels.ops import _AUTO_GPU_ORDER

    assert ops.AUTO_CROSSOVER_MEASURED is False
    assert _AUTO_GPU_ORDER[0] == ops.AUTO_PREFERRED_ON_GPU == "cuda"
    assert set(_AUTO_GPU_ORDER) == {"cuda", "triton"}


def _tolerance(dtype: torch.dtype, reference: torch.Tensor, label: str) -> dict:
    """Per-element tolerance from the dtype: the logits are fp32 (fp64) whatever the inputs, so
    loss, LSE and target logit carry fp32 rounding; the gradients go through dL/dz and the dW
    store in the input dtype: a few of its ulps, relative to the tensor's magnitude."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    eps = torch.finfo(torch.float32 if label in ("loss", "neg_lse", "target") else dtype).eps
    scale = max(1.0, reference.abs().max().item())
    return {"rtol": 64 * eps, "atol": 64 * eps * scale}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_cuda_matches_reference(name, dtype, deterministic):
    spec = ALL_SPECS[name]
    g = torch.Generator().manual_seed(0)
    b, c, d = 37, 4099, 64
    x = torch.randn(b, d, generator=g).to("cuda", dtype)
    w = torch.randn(c, d, generator=g).to("cuda", dtype)
    y = torch.randint(0, c, (b,), generator=g).cuda()
    y[3] = -1
    class_ids = torch.randperm(c, generator=g)[:2500].cuda()
    for ids in (None, class_ids):
        # small chunks: several chunks, and class splits of the rows (B = 37 < 132 SMs)
        per_class = cuda_backend.class_bytes(b, d, dtype, spec.kind, ids is not None)
        plan = cuda_backend.chunk_plan(b, c, d, dtype, spec.kind, None, 1500 * per_class)
        assert plan.num_chunks >= 2 and plan.epilogue_grid[1] >= 1
        got = _parts_and_grads(
            cuda_backend.lse_parts,
            x,
            w,
            y,
            spec,
            ids,
            deterministic=deterministic,
            chunk_bytes=1500 * per_class,
        )
        want = _parts_and_grads(reference.lse_parts, x.double(), w.double(), y, spec, ids)
        for label, a, b_ in zip(("loss", "neg_lse", "target", "dX", "dW"), got, want, strict=True):
            a = a.double().cpu()
            b_ = b_.cpu()
            torch.testing.assert_close(a, b_, **_tolerance(dtype, b_, label), msg=label)
        if deterministic:
            again = _parts_and_grads(
                cuda_backend.lse_parts,
                x,
                w,
                y,
                spec,
                ids,
                deterministic=True,
                chunk_bytes=1500 * per_class,
            )
            for a, b_ in zip(got, again, strict=True):
                assert torch.equal(a, b_)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gemm_logits_are_fp32(dtype):
    """B2 on the GPU path: 16-bit dots above 65504 stay finite (cuBLAS with fp32 output)."""
    x, w, y = _large_norm_problem(dtype, "cuda")
    for spec in (MarginSpec.lsoftmax(4), MarginSpec.sphereface(4), MarginSpec.cosface()):
        got = mk.margin_cross_entropy(x, w, y, spec, reduction="none", backend="cuda")
        want = mk.margin_cross_entropy(x, w, y, spec, reduction="none", backend="torch")
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@needs_gpu
def test_cuda_margin_transform_matches_cpu_twin():
    c = torch.tensor(COSINES, dtype=torch.float32)
    for spec in TRANSFORM_SPECS.values():
        for target in (True, False):
            cpu = cuda_backend.margin_transform(c, spec, target, c_target=c, gram=c.flip(0))
            gpu = cuda_backend.margin_transform(
                c.cuda(), spec, target, c_target=c.cuda(), gram=c.flip(0).cuda()
            )
            for a, b in zip(cpu, gpu, strict=True):
                torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-5)


def _large_norm_problem(dtype, device="cpu"):
    """x = W[rows] with ||W_j|| = 320: valid 16-bit inputs whose dots x_i . W_j (1e5 where j is
    the row's own class, a non-target) overflow fp16."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(10, 64, generator=g)
    w = 320 * w / w.norm(dim=1, keepdim=True)
    y = torch.tensor([1, 2, 3, 4])
    return w[[5, 6, 7, 8]].to(device, dtype), w.to(device, dtype), y.to(device)


@needs_ext
@pytest.mark.parametrize("name", ["lsoftmax", "sphereface", "cosface", "arcface"])
def test_fp16_large_norms_give_the_reference_loss(name):
    """B2: finite losses equal to the reference for fp16 inputs whose dots exceed 65504."""
    x, w, y = _large_norm_problem(torch.float16)
    spec = getattr(MarginSpec, name)()
    if name == "arcface":
        x = (x.float() * (1e4 / 320)).half()  # ||x|| = 1e4
    got = mk.margin_cross_entropy(x, w, y, spec, reduction="none", backend="cuda")
    want = mk.margin_cross_entropy(x, w, y, spec, reduction="none", backend="torch")
    assert torch.isfinite(got).all(), got
    assert (got > 0).all(), got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("name", ["cosface", "lsoftmax_m4", "w_softmax"])
def test_double_backward_raises(name):
    """B3: the backward is not itself differentiable; asking for a second derivative raises
    instead of returning a wrong Hessian."""
    x, w, y = _problem(torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    loss = mk.margin_cross_entropy(x, w, y.clamp(0, 12), ALL_SPECS[name], backend="cuda")
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


def _psi_sweep(m: int) -> torch.Tensor:
    """Cosines on both sides of every psi threshold cos(j pi / m), the thresholds, +-1, a grid."""
    points = set(torch.linspace(-1, 1, 81).tolist())
    for j in range(1, m):
        t = math.cos(j * math.pi / m)
        points |= {t, t - 1e-9, t + 1e-9, t - 1e-4, t + 1e-4}
    return torch.tensor(sorted(points), dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("m", [*range(5, 11), 16])
@pytest.mark.parametrize("kind", ["lsoftmax", "sphereface"])
def test_psi_large_m_cosine_sweep_matches_reference(kind, m):
    """m = 5..10 and 16 (the largest): T_m and dT_m/dc by recurrence, k by m - 1 sign tests, in
    C++ against the reference (value and autograd derivative) over a sweep through every
    branch."""
    spec = getattr(MarginSpec, kind)(m, lam=0.5)
    c = _psi_sweep(m)
    g = torch.Generator().manual_seed(m)
    x_norm = torch.rand(c.shape, generator=g, dtype=torch.float64) * 3 + 0.5
    w_norm = torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 + 0.5
    value, deriv = cuda_backend.margin_transform(c, spec, True, x_norm, w_norm)
    ref_value, ref_deriv = _reference_transform(spec, c, x_norm, w_norm, True)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(deriv, ref_deriv, rtol=1e-10, atol=1e-8)


@needs_ext
@pytest.mark.parametrize("m", range(5, 11))
def test_psi_large_m_chunked_matches_reference(m):
    """The chunked algorithm on the CPU kernels at m = 5..10 against the float64 reference."""
    spec = MarginSpec.sphereface(m, lam=1.0) if m % 2 else MarginSpec.lsoftmax(m, lam=1.0)
    x, w, y = _problem(torch.float64)
    got = _parts_and_grads(cuda_backend._chunked_lse_parts, x, w, y, spec, None, chunk_bytes=200)
    want = _parts_and_grads(reference.lse_parts, x, w, y, spec, None)
    for label, a, b in zip(("loss", "neg_lse", "target", "dX", "dW"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=label)


def _peak_extra_bytes(fn, x, w, y, spec, class_ids, **kwargs) -> int:
    """Peak memory of forward + backward beyond the outputs (the two (B,) parts and the two
    gradients, which a caller keeps)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    with LiveBytes() as tracker:
        neg_lse, t = fn(x, w, y, spec, class_ids, **kwargs)
        (torch.where(torch.isfinite(neg_lse), neg_lse, 0).sum() + t.sum()).backward()
    outputs = x.grad.nbytes + w.grad.nbytes + neg_lse.nbytes + t.nbytes
    return tracker.peak - outputs


@needs_ext
@pytest.mark.parametrize(
    ("name", "dtype", "sampled"),
    [
        ("arcface_exact_fallback", torch.float32, False),
        ("cosface", torch.bfloat16, False),
        ("w_softmax", torch.float32, False),
        ("lsoftmax_m4", torch.float32, True),
        ("sphereface_m4", torch.float16, True),
    ],
)
def test_peak_memory_bounded_by_the_chunk(name, dtype, sampled):
    """Measured peak extra memory of forward + backward <= ChunkPlan.extra_bytes (the documented
    bound S_c * per_class + per_rows), far below the (B, C) logits that the reference holds."""
    spec = ALL_SPECS[name]
    b, c, d = 48, 6000, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g).to(dtype)
    w = torch.randn(c, d, generator=g).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    class_ids = torch.randperm(c, generator=g)[:4000] if sampled else None
    num_cols = c if class_ids is None else 4000
    chunk_bytes = 96 * 1024
    plan = cuda_backend.chunk_plan(
        b, c, d, dtype, spec.kind, num_cols if sampled else None, chunk_bytes, device_type="cpu"
    )
    assert plan.num_chunks >= 8
    got = _peak_extra_bytes(
        cuda_backend._chunked_lse_parts, x, w, y, spec, class_ids, chunk_bytes=chunk_bytes
    )
    assert got <= plan.extra_bytes, (got, plan)
    logits_bytes = b * num_cols * 4
    assert plan.extra_bytes < logits_bytes / 2
    # the tracker sees a full-logits algorithm: the reference holds several (B, C) tensors
    ref = _peak_extra_bytes(reference.lse_parts, x, w, y, spec, class_ids)
    assert ref > logits_bytes


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("partial_fc", [False, True], ids=["all_classes", "class_ids"])
@pytest.mark.parametrize("name", ["arcface_exact_fallback", "w_softmax", "lsoftmax_m4"])
def test_gpu_path_for_16bit_inputs_emulated_on_cpu(monkeypatch, name, partial_fc, dtype):
    """The CUDA path of 16-bit inputs, run on CPU: 16-bit GEMM operands with fp32 output (cuBLAS
    out_dtype, emulated by an fp32 product of the 16-bit values), dL/dz written by the epilogue
    into 16-bit buffers, the chain pass writing 16-bit dW rows. Against the float64 reference."""

    def fp32_output_mm(self, a, b):
        # cuBLAS multiplies the 16-bit values exactly and accumulates in fp32
        return torch.mm(a.to(self.compute), b.to(self.compute))

    monkeypatch.setattr(cuda_backend, "_fp32_output_gemm", lambda device: True)
    monkeypatch.setattr(cuda_backend._Chunks, "mm", fp32_output_mm)
    spec = ALL_SPECS[name]
    x, w, y = _problem(torch.float32)
    x, w = x.to(dtype), w.to(dtype)
    class_ids = torch.tensor([0, 3, 4, 7, 8, 12, 5]) if partial_fc else None
    got = _parts_and_grads(cuda_backend._chunked_lse_parts, x, w, y, spec, class_ids, chunk_bytes=1)
    want = _parts_and_grads(reference.lse_parts, x.double(), w.double(), y, spec, class_ids)
    for label, a, b in zip(("loss", "neg_lse", "target", "dX", "dW"), got, want, strict=True):
        assert a.dtype == (torch.float32 if label in ("loss", "neg_lse", "target") else dtype)
        # fp32 logits: loss and LSE to fp32 rounding; gradients through dL/dz in the 16-bit dtype
        eps = torch.finfo(torch.float32 if label in ("loss", "neg_lse", "target") else dtype).eps
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=16 * eps, atol=16 * eps * scale, msg=label)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_column_chain_pass(dtype):
    """margin_column_chain: dW_j = H_j - (W_j . H_j) W_j / ||W_j||^2 in one pass, 0 coefficient
    where the eps clamp holds ||W_j|| (a zero row), written in W's dtype; in place over H for
    fp32/fp64; a NaN row of W stays NaN. With h_scaled (H_j came times max(||W_j||, eps)) each
    row is divided by max(||W_j||, eps): the zero row by 1e-12."""
    ops = torch.ops.margin_kernels
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(11)
    w = torch.randn(9, 37, generator=g).to(dtype)
    w[4] = 0
    w[6, 3] = float("nan")
    h = torch.randn(9, 37, generator=g, dtype=math_dtype)
    raw = torch.linalg.vector_norm(w.to(math_dtype), dim=-1)
    wf = w.to(math_dtype)
    coef = torch.where(raw >= 1e-12, (wf * h).sum(-1) / raw.square(), 0)
    coef[6] = float("nan")
    want = (h - coef[:, None] * wf).to(dtype)
    out = torch.empty_like(w)
    ops.margin_column_chain(h, w, raw, out)
    torch.testing.assert_close(out, want, equal_nan=True)
    torch.testing.assert_close(out[4], h[4].to(dtype))
    assert torch.isnan(out[6]).all()
    torch.library.opcheck(ops.margin_column_chain.default, (h, w, raw, out))
    scaled_out = torch.empty_like(w)
    ops.margin_column_chain(h, w, raw, scaled_out, True)
    divided = (h - coef[:, None] * wf) / raw.clamp_min(1e-12)[:, None]
    torch.testing.assert_close(scaled_out, divided.to(dtype), equal_nan=True)
    torch.library.opcheck(ops.margin_column_chain.default, (h, w, raw, scaled_out, True))
    if dtype == math_dtype:
        in_place = h.clone()
        ops.margin_column_chain(in_place, w, raw, None)
        torch.testing.assert_close(in_place, want, equal_nan=True)
    else:
        with pytest.raises(ValueError, match="out must be like w"):
            ops.margin_column_chain(h, w, raw, None)
    with pytest.raises(ValueError, match="unit stride"):
        ops.margin_column_chain(h, w, raw, torch.empty(37, 9, dtype=dtype).T)
