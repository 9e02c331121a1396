"""The CUDA kernels' own source, executed on the CPU: ``csrc/epilogue_kernels.cuh`` compiled by
the host compiler over the emulated execution layer of ``csrc/exec.h`` (tests/cuda_emulation.py
builds and loads it), launched with the real geometry (256 threads per block, the epilogue grid
of ``chunk_plan``, the merge kernel when class_splits > 1).

* the whole chunked algorithm of ``ops/cuda.py`` (GEMMs in torch on the CPU) over the emulated
  epilogues and column-chain kernel, loss pieces and dX, dW against the float64 reference, on
  every family and dtype; 16-bit inputs in the CUDA device's flow (dL/dz written by the
  epilogue in the storage dtype), class_splits > 1 on the widest chunks;
* each emulated op against the C++ CPU twin (``margin_ops.cpp``) element by element, on every
  family and storage dtype: odd widths whose rows start at every 16-byte phase (vector packs
  with scalar heads and tails), a gram buffer out of phase with the logits, Partial-FC column
  ids, the 16-bit dL/dz outputs next to fp32 logits, the running LSE merged across chunks;
* the host 16-bit conversions against torch's, and the argument structs' layout.

The library must build wherever the suite runs (CI has g++): a build failure fails these tests.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from cuda_emulation import (
    CSRC,
    STORAGE,
    ColumnChainArgs,
    EmulatedOps,
    EpilogueArgs,
    compiled_layout,
    ctypes_layout,
    emulated_backend,
    from_16bit,
    library,
    to_16bit,
)
from helpers import ALL_SPECS, STRAIGHT_THROUGH_SPECS, rel_error, requires_extension

from margin_kernels import reference
from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.spec import KINDS, NORM_EPS, MarginSpec

# One kind of each non-target family (the kernels are templated on the family).
FAMILY_SPECS = {
    "raw": ALL_SPECS["lsoftmax_m2"],
    "feature_norm": ALL_SPECS["sphereface_m4"],
    "scaled": ALL_SPECS["arcface_exact_fallback"],
    "squared": ALL_SPECS["so_softmax"],
    "weighted": ALL_SPECS["w_softmax"],
}
DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
HALF = (torch.float16, torch.bfloat16)
# Relative bounds (max |got - exact| / max |exact|) against the float64 reference of the same
# (rounded) inputs: the logits are fp32 (fp64) for every storage dtype, so the forward is at fp32
# accuracy; dL/dz and dW are stored in the 16-bit dtype in the CUDA flow.
FORWARD_BOUND = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-6,
    torch.bfloat16: 2e-6,
}
GRAD_BOUND = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module", autouse=True)
def emulated_library():
    """Builds (or finds) the library; a failure is an error of every test here, never a skip."""
    return library()


def test_family_specs_cover_every_family():
    assert {KINDS[s.kind].family for s in FAMILY_SPECS.values()} == set(FAMILY_SPECS)


def test_argument_structs_match_the_compiler_layout():
    assert compiled_layout("epilogue_args") == ctypes_layout(EpilogueArgs)
    assert compiled_layout("column_chain_args") == ctypes_layout(ColumnChainArgs)


def test_host_16bit_conversions_round_like_torch():
    """Every half, the ties between neighbouring halves and the values just past them, the
    overflow threshold, subnormals; bfloat16 on the same probes."""
    every_half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    as_float = every_half.view(torch.float16).float()
    finite = as_float[torch.isfinite(as_float)].unique()
    mids = ((finite[1:].double() + finite[:-1].double()) / 2).float()
    probes = torch.cat(
        [
            as_float,
            mids,
            torch.nextafter(mids, torch.tensor(math.inf)),
            torch.tensor([65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-25, 2.0**-26, 3e-8]),
            torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 1e3,
            torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 1e-6,
        ]
    )
    probes = probes[~torch.isnan(probes)]
    for dtype in HALF:
        got = to_16bit(probes, dtype).view(torch.int16)
        want = probes.to(dtype).view(torch.int16)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, f"{dtype}: {probes[bad[:5, 0]].tolist()}"
        assert torch.isnan(from_16bit(to_16bit(torch.tensor([math.nan]), dtype))).all()
        every = every_half.view(dtype)
        exact = every.float()
        back = from_16bit(every)
        keep = ~torch.isnan(exact)
        assert torch.equal(back[keep], exact[keep]) and torch.isnan(back[~keep]).all()


@pytest.mark.parametrize(
    "which,threads,message",
    [
        (0, 32, "partial mask"),
        (1, 32, "deadlock"),
        (2, 32, "deadlock"),
        (1, 48, "not a whole number of warps"),
    ],
    ids=["partial-mask", "lane-returned", "barrier-vs-shuffle", "partial-warp"],
)
def test_emulation_stops_kernels_that_break_the_execution_model(which, threads, message):
    """What a GPU would hang on or leave undefined stops the launch with an error; the next
    launch runs normally."""
    lib = library()
    out = torch.zeros(threads)
    assert lib.mk_emu_broken_kernel(which, threads, ctypes.c_void_p(out.data_ptr())) == 1
    assert message in lib.mk_emu_last_error().decode()
    inputs = torch.linspace(-1, 1, 10, dtype=torch.float64)
    ones = torch.ones_like(inputs)
    kind, params = ALL_SPECS["cosface"].kernel_args()
    value, _ = EmulatedOps().margin_transform(inputs, ones, ones, None, None, kind, params, True)
    assert torch.allclose(value, 8.0 * (inputs - 0.35))


# --- the chunked algorithm of ops/cuda.py over the emulated kernels ----------------------------
def _data(b, c, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    if dtype not in HALF:
        # a class whose norm the eps clamp holds (column chain coefficient 0); see
        # test_zero_weight_row_16bit_gpu_flow for 16-bit storage
        w[3] = 0.0
    y = torch.randint(0, c, (b,), generator=g)
    y[1] = -100  # a row without a target
    y[0] = c - 1  # a target in the last columns (a scalar tail of the last chunk)
    return x.to(dtype), w.to(dtype), y


def _pieces_and_grads(fn, x, w, y, spec, upstream):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    neg_lse, target_logit = fn(x, w, y, spec)
    (neg_lse * upstream[0] + target_logit * upstream[1]).sum().backward()
    return neg_lse.detach(), target_logit.detach(), x.grad, w.grad


def _emulated_and_exact(x, w, y, spec, chunk_bytes, expected_chunks, expected_splits):
    """(neg_lse, target_logit, dX, dW) of the emulated run and of the float64 reference of the
    same inputs, once the plan is checked to be the one the test means (chunks, class splits)."""
    dtype = x.dtype
    plan = cuda_backend.chunk_plan(
        x.shape[0], w.shape[0], x.shape[1], dtype, spec.kind, None, chunk_bytes,
        device_type="cpu",
    )  # fmt: skip
    assert (plan.num_chunks, plan.epilogue_grid) == (
        expected_chunks,
        (x.shape[0], expected_splits),
    )
    assert plan.threads_per_block == 256
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(2, x.shape[0], generator=g, dtype=torch.float64) + 0.5
    exact = _pieces_and_grads(reference.lse_parts, x.double(), w.double(), y, spec, upstream)

    def emulated(x, w, y, spec):
        return cuda_backend._chunked_lse_parts(x, w, y, spec, chunk_bytes=chunk_bytes)

    with emulated_backend(gpu_flow=dtype in HALF):
        got = _pieces_and_grads(emulated, x, w, y, spec, upstream.to(plan.logits_dtype))
    return got, exact


def _check_against_reference(x, w, y, spec, chunk_bytes, expected_chunks, expected_splits):
    """Loss pieces, dX and dW of the emulated run against the float64 reference."""
    got, exact = _emulated_and_exact(x, w, y, spec, chunk_bytes, expected_chunks, expected_splits)
    dtype = x.dtype
    bounds = (FORWARD_BOUND[dtype],) * 2 + (GRAD_BOUND[dtype],) * 2
    for name, a, e, bound in zip(
        ("neg_lse", "target_logit", "dX", "dW"), got, exact, bounds, strict=True
    ):
        err = rel_error(a, e)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("family", FAMILY_SPECS)
def test_chunked_algorithm_over_emulated_kernels(family, dtype):
    """Three class chunks (128, 128, 45 classes): the running LSE carried across chunks, the
    target terms on one chunk, one row block per row (class_splits 1: the epilogue block
    merges its own row)."""
    spec = FAMILY_SPECS[family]
    x, w, y = _data(5, 301, 20, dtype, seed=2)
    chunk_bytes = 128 * cuda_backend.class_bytes(5, 20, dtype, spec.kind, False, "cpu")
    _check_against_reference(x, w, y, spec, chunk_bytes, expected_chunks=3, expected_splits=1)


@pytest.mark.parametrize(
    "family,dtype",
    [("weighted", torch.float32), ("raw", torch.float64), ("raw", torch.bfloat16)],
    ids=["weighted-fp32", "raw-fp64", "raw-bf16"],
)  # fmt: skip
def test_chunked_algorithm_class_splits(family, dtype):
    """One chunk of 3077 classes: chunk_plan splits each row into 3 class segments (1026, 1026,
    1025 columns: every lane of all 8 warps holds a pack), merged by the second kernel. (The
    column-chain pass is a block per class: the raw family, which has none, keeps the other
    cases cheap; test_epilogue_ops_match_cpu_twin runs every family with 3 splits.)"""
    spec = FAMILY_SPECS[family]
    x, w, y = _data(3, 3077, 12, dtype, seed=4)
    _check_against_reference(x, w, y, spec, None, expected_chunks=1, expected_splits=3)


# --- each emulated op against the C++ CPU twin ---------------------------------------------------
def _twin():
    return torch.ops.margin_kernels


def _close(name, got, want, rtol):
    """Element-wise, relative to the largest magnitude (NaN and inf where the twin has them)."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern"
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    scale = want[finite].abs().max().clamp_min(1e-30) if finite.any() else 1.0
    err = ((got[finite] - want[finite]).abs().max() / scale).item() if finite.any() else 0.0
    assert err <= rtol, f"{name}: relative difference {err:.2e} > {rtol:.0e}"


# elementwise tolerance of each stored dtype (fp32 row sums are reduced in another order)
TWIN_RTOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _epilogue_inputs(storage, spec, *, rows=3, cols=3077, dim=8, col_ids=False, gram_shift=0):
    g = torch.Generator().manual_seed(5)
    md = torch.float64 if storage == torch.float64 else torch.float32
    num_classes, offset = 5000, 1000
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w = torch.randn(cols, dim, generator=g, dtype=torch.float64)
    ids = torch.randperm(num_classes, generator=g)[:cols] if col_ids else None
    class_of = ids if col_ids else torch.arange(offset, offset + cols)
    # targets: inside the first segment, the last column (scalar tail), none
    target = torch.tensor([class_of[17].item(), class_of[cols - 1].item(), -1])[:rows]
    in_chunk = torch.tensor([17, cols - 1, 0])[:rows]
    w_y = w[in_chunk]
    x_norm = x.norm(dim=1)
    wy_norm = w_y.norm(dim=1)
    c_target = (x * w_y).sum(1) / (x_norm * wy_norm)
    logits = (x @ w.T).to(storage)
    if rows > 2:
        logits[2, 500] = math.nan  # the NaN policy: row 2's LSE is NaN, never finite or -inf
    gram = None
    if KINDS[spec.kind].family == "weighted":
        flat = torch.empty(rows * cols + gram_shift, dtype=storage)
        gram = flat[gram_shift:].view(rows, cols)  # contiguous, out of phase when shifted
        gram.copy_(w_y @ w.T)
    return dict(
        logits=logits,
        gram=gram,
        x_norm=x_norm.to(md),
        col_norm=w.norm(dim=1).clamp_min(NORM_EPS).to(md),
        target=target,
        col_ids=ids,
        col_offset=offset,
        c_target=c_target.to(md),
        target_norm=wy_norm.to(md),
        num_classes=num_classes,
    )


EPILOGUE_CASES = [
    # (storage, grad dtype (None: dL/dz in place), Partial-FC column ids, gram phase shift)
    (torch.float32, None, False, 0),
    (torch.float32, torch.float16, False, 0),
    (torch.float32, torch.bfloat16, True, 1),
    (torch.float64, None, True, 1),
    (torch.float16, None, False, 0),
    (torch.bfloat16, None, False, 3),
]


def _case_id(case):
    storage, grad, ids, shift = case
    name = str(storage).split(".")[1]
    name += "" if grad is None else f"-grad_{str(grad).split('.')[1]}"
    return name + ("-col_ids" if ids else "") + (f"-gram_shift{shift}" if shift else "")


@requires_extension
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=[_case_id(c) for c in EPILOGUE_CASES])
@pytest.mark.parametrize("family", FAMILY_SPECS)
def test_epilogue_ops_match_cpu_twin(family, case):
    storage, grad_dtype, col_ids, shift = case
    spec = FAMILY_SPECS[family]
    kind, params = spec.kernel_args()
    params = list(params)
    inputs = _epilogue_inputs(storage, spec, col_ids=col_ids, gram_shift=shift)
    rows, cols = inputs["logits"].shape
    splits = cuda_backend.chunk_plan(rows, cols, 8, storage, spec.kind).epilogue_grid[1]
    assert splits == 3  # 1026, 1026 and 1025 columns
    md = inputs["x_norm"].dtype
    rtol = TWIN_RTOL[md]
    emulated = EmulatedOps()

    def copies():
        out = dict(inputs)
        out["logits"] = inputs["logits"].clone()
        if inputs["gram"] is not None:
            flat = torch.empty(inputs["gram"].numel() + shift, dtype=storage)
            out["gram"] = flat[shift:].view_as(inputs["gram"]).copy_(inputs["gram"])
        return out

    # forward: the chunk's LSE merged into a running LSE (finite, empty, finite)
    running = torch.tensor([0.5, -math.inf, 7.0], dtype=md)
    results = {}
    for name, ops in (("emulated", emulated), ("twin", _twin())):
        run = running.clone()
        t = ops.margin_lse_fwd(**copies(), running_lse=run, class_splits=splits, kind=kind,
                               params=params)  # fmt: skip
        results[name] = (run, t)
    _close("running_lse", results["emulated"][0], results["twin"][0], rtol)
    _close("target_logit", results["emulated"][1], results["twin"][1], rtol)

    # backward: row 2's saved LSE -inf (no unmasked column: no softmax term)
    neg_lse = results["twin"][0].clone()
    neg_lse[2] = -math.inf
    g = torch.Generator().manual_seed(6)
    grad_neg_lse = torch.rand(rows, generator=g, dtype=md) + 0.5
    grad_target = torch.rand(rows, generator=g, dtype=md) - 0.5
    outs = {}
    for name, ops in (("emulated", emulated), ("twin", _twin())):
        bufs = copies()
        grad_logits = grad_gram = None
        if grad_dtype is not None:
            grad_logits = torch.full((rows, cols), math.nan, dtype=grad_dtype)
            if bufs["gram"] is not None:
                grad_gram = torch.full((rows, cols), math.nan, dtype=grad_dtype)
        rows_out = ops.margin_lse_bwd(
            **bufs, neg_lse=neg_lse, grad_neg_lse=grad_neg_lse, grad_target_logit=grad_target,
            class_splits=splits, with_target=True, grad_logits=grad_logits, grad_gram=grad_gram,
            kind=kind, params=params,
        )  # fmt: skip
        dz = bufs["logits"] if grad_logits is None else grad_logits
        dh = bufs["gram"] if grad_gram is None else grad_gram
        outs[name] = (*rows_out, dz, dh)
    names = ("d_xnorm", "d_ctarget", "d_tnorm", "dL/dz", "dL/dh")
    for name, a, b in zip(names, outs["emulated"], outs["twin"], strict=True):
        if b is None:
            assert a is None
            continue
        tol = rtol if name.startswith("d_") else TWIN_RTOL[a.dtype]
        _close(name, a, b, tol)


# every kind, and psi margins past the closed forms (the Chebyshev recurrence of m >= 5)
TRANSFORM_SPECS = {
    **ALL_SPECS,
    **STRAIGHT_THROUGH_SPECS,
    "lsoftmax_m6": MarginSpec.lsoftmax(6),
    "sphereface_m5": MarginSpec.sphereface(5),
}


@requires_extension
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_margin_transform_kernel_matches_cpu_twin(dtype):
    """Every kind, both transforms, 600 elements (three blocks of 256, the last one partial)."""
    g = torch.Generator().manual_seed(7)
    n = 600
    cos = torch.cat([torch.linspace(-1, 1, 41, dtype=torch.float64),
                     torch.rand(n - 41, generator=g, dtype=torch.float64) * 2 - 1])  # fmt: skip
    x_norm = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5
    w_norm = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    c_target = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    gram = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    tensors = [t.to(dtype) for t in (cos, x_norm, w_norm, c_target, gram)]
    emulated = EmulatedOps()
    for name, spec in TRANSFORM_SPECS.items():
        kind, params = spec.kernel_args()
        for target in (True, False):
            args = (*tensors, kind, list(params), target)
            got = emulated.margin_transform(*args)
            want = _twin().margin_transform(*args)
            for what, a, b in zip(("value", "deriv"), got, want, strict=True):
                _close(f"{name} target={target} {what}", a, b, TWIN_RTOL[dtype])


@requires_extension
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("dim", [5, 300])
@pytest.mark.parametrize("h_scaled", [False, True], ids=["h", "h-scaled"])
def test_column_chain_kernel_matches_cpu_twin(dtype, dim, h_scaled):
    """Rows of 5 and of 300 elements (more than the block's 256 threads), row strides wider
    than the row, a zero row (coefficient 0); in place over h for fp32/fp64; with h_scaled the
    rows divided by max(||W_j||, eps)."""
    g = torch.Generator().manual_seed(8)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    rows = 6
    w_wide = torch.randn(rows, dim + 3, generator=g, dtype=torch.float64).to(dtype)
    w = w_wide[:, :dim]
    w[2] = 0
    raw = torch.linalg.vector_norm(w.to(md), dim=1)
    h = torch.randn(rows, dim, generator=g, dtype=md) + 0.3 * w.to(md)
    in_place = dtype == md
    outs = []
    for ops in (EmulatedOps(), _twin()):
        h_run = h.clone()
        out = None if in_place else torch.full((rows, dim), math.nan, dtype=dtype)
        ops.margin_column_chain(h_run, w, raw, out, h_scaled)
        outs.append(h_run if in_place else out)
    _close("dW rows", outs[0], outs[1], TWIN_RTOL[dtype])
    if h_scaled:
        assert outs[0][2].double().abs().max() > 1e11  # the zero row divided by eps


def test_storage_ids_match_epilogue_header():
    """STORAGE mirrors the Storage enum of csrc/epilogue.h."""
    text = (CSRC / "epilogue.h").read_text()
    for dtype, name in ((torch.float32, "kFloat32"), (torch.float16, "kFloat16"),
                        (torch.bfloat16, "kBFloat16"), (torch.float64, "kFloat64")):  # fmt: skip
        assert f"{name} = {STORAGE[dtype]}" in text


def _check_with_zero_row(got, exact, dtype, grad: int, row: int) -> None:
    """Loss pieces and gradients within the usual bounds, except row ``row`` of gradient
    ``grad`` (2: dX, 3: dW), a zero row's own gradient, which scales like 1/eps (1e9-1e13 here,
    a scale the float64 reference computes too): in bf16 it is compared like the rest, in fp16
    it must be the float64 reference rounded to fp16 (+-inf)."""
    others = torch.ones(exact[grad].shape[0], dtype=torch.bool)
    others[row] = False
    pairs = [(a, e) for a, e in zip(got, exact, strict=True)]
    pairs[grad] = (got[grad][others], exact[grad][others])
    bounds = (FORWARD_BOUND[dtype],) * 2 + (GRAD_BOUND[dtype],) * 2
    names = ("neg_lse", "target_logit", "dX", "dW")
    for name, (a, e), bound in zip(names, pairs, bounds, strict=True):
        err = rel_error(a, e)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e}"
    zero_row, exact_row = got[grad][row], exact[grad][row]
    assert exact_row.abs().max() > 1e9
    if dtype == torch.float16:
        assert torch.isinf(exact_row.to(dtype)).all()
        assert torch.equal(zero_row, exact_row.to(dtype))
    else:
        err = rel_error(zero_row, exact_row)
        assert err <= GRAD_BOUND[dtype], f"{names[grad]} zero row: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["feature_norm", "scaled", "weighted"])
def test_zero_weight_row_16bit_gpu_flow(family, dtype):
    """A zero weight row (||W_j|| held at eps = 1e-12) in the CUDA flow of 16-bit inputs: dL/dz
    of its column is ~1/eps, past fp16's range, so the epilogue writes dL/dz max(||W_j||, eps)
    and the host divides by max(||W_j||, eps) in the dX operand (W_j normalised: 0 here) and in
    dW's rows (before the fix: dX NaN in fp16, and for W-Softmax every row of dW)."""
    spec = FAMILY_SPECS[family]
    x, w, y = _data(5, 301, 20, dtype, seed=2)
    w[3] = 0.0
    chunk_bytes = 128 * cuda_backend.class_bytes(5, 20, dtype, spec.kind, False, "cpu")
    got, exact = _emulated_and_exact(x, w, y, spec, chunk_bytes, 3, 1)
    _check_with_zero_row(got, exact, dtype, grad=3, row=3)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["scaled", "squared"])
def test_zero_feature_row_16bit_gpu_flow(family, dtype):
    """A zero feature row (||x_i|| held at eps) in the CUDA flow of 16-bit inputs: in the
    families whose dL/dz carries 1/||x_i|| the epilogue writes it times max(||x_i||, eps) too, and
    the host divides dX's rows by max(||x_i||, eps) and reads x normalised (0 here) in the dW
    GEMM (before: inf x 0 in that GEMM made every row of dW NaN in fp16)."""
    spec = FAMILY_SPECS[family]
    x, w, y = _data(5, 301, 20, dtype, seed=2)
    x[2] = 0.0
    chunk_bytes = 128 * cuda_backend.class_bytes(5, 20, dtype, spec.kind, False, "cpu")
    got, exact = _emulated_and_exact(x, w, y, spec, chunk_bytes, 3, 1)
    _check_with_zero_row(got, exact, dtype, grad=2, row=2)
