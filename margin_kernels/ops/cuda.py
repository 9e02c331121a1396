"""The CUDA C++ backend (``backend="cuda"``): cuBLAS GEMMs on class chunks + fused epilogues.

The classes are cut into chunks of ``S_c`` classes (:func:`chunk_plan`); every chunk takes all B
rows, so each GEMM is (B x D) by (D x S_c) and W is read once per pass:

* forward, per chunk: ``z = x W_c^T`` (B, S_c) by cuBLAS through ``torch.mm`` with **fp32
  output** (16-bit inputs: fp32 accumulate and store, ``out_dtype``), then the forward epilogue
  (``torch.ops.margin_kernels.margin_lse_fwd``): cosines ``c = z / (||x|| ||W_j||)``, the margin
  transform of ``csrc/margin_math.h``, the target column masked out, an online log-sum-exp over
  the chunk, merged into each row's running LSE carried across chunks;
* backward, per chunk: ``z`` recomputed, the backward epilogue (``margin_lse_bwd``) overwrites it
  with ``dL/dz`` in place; ``dX += dz W_c`` accumulated in fp32 across chunks;
  ``H_c = dz^T x`` and the column-norm chain term of the chunk
  ``dW_j = H_j - (W_j . H_j) W_j / ||W_j||^2`` (a scale-invariant function of W_j has a gradient
  orthogonal to W_j) applied at once by one pass (``margin_column_chain``: a block per row reads
  H_j and W_j and writes dW_j), so ``dW_c`` is written once, in W's dtype.
  16-bit inputs on CUDA: the epilogue writes ``u_ij = dL/dz_ij max(||W_j||, eps) r_i`` once, in
  the input dtype, into the buffer the tensor-core GEMMs read (``dL/dz`` itself reaches
  1/eps = 1e12 on a zero weight or feature row, past fp16's range), with ``r_i = max(||x_i||,
  eps)`` in the scaled and squared families (whose dL/dz carries 1/||x_i||), else 1;
  ``dX += u Ŵ_c`` with ``Ŵ_j = W_j / max(||W_j||, eps)`` (0 on a zero row), dX divided by r_i
  after the last chunk, and ``H_c = u^T (x / r)`` divided row by row by ``max(||W_j||, eps)``
  in the chain pass, in fp32: the same quantities as above (kinds with raw W_j: ``u = dL/dz``).

The epilogues run on a (B, class_splits) grid: rows are split into class segments when B alone
would not give several blocks per SM, and the split partials are merged in a fixed order, so the
result is run-to-run identical (``deterministic`` only changes the two row scatters: Partial-FC
columns and the target rows). The same ops have C++ CPU kernels with the same segments and merge
order: on CPU tensors this backend runs the same algorithm (GEMMs through torch on CPU).

NaN policy (all backends): a NaN or inf in a feature row makes that row's loss NaN; a NaN in a
weight row that takes part in the denominator makes every row's loss NaN; a NaN never becomes 0,
-inf or a finite loss.

Memory: peak extra memory of forward + backward, beyond the inputs, the (B,) outputs and the
gradients, is at most ``ChunkPlan.extra_bytes`` = ``S_c * per_class + per_rows`` with

* ``per_class`` (bytes per class of a chunk, :func:`chunk_plan`) =
  ``n B L`` (the fp32 logits buffer, L = 4, 8 for float64; n = 2 for W-Softmax's gram buffer,
  else 1) + for 16-bit inputs ``n B 2`` (dL/dz in the storage dtype for the tensor-core GEMMs,
  CUDA) and ``4 D`` (the chunk's H_c in fp32) (+ ``4 D`` on CPU: the chunk of W in fp32, CPU
  has no fp32-output 16-bit GEMM) + with ``class_ids`` ``2 e D`` (the gathered W_c and H_c,
  e = itemsize); the 16-bit Ŵ_c (``e D`` per class) lives only while the fp32 logits are freed
  and H_c is not yet allocated, so it stays inside that bound;
* ``per_rows`` = ``L (10 B D + 24 B + 2 S + 4 B class_splits)`` (+ ``e B D`` for 16-bit inputs
  on CUDA: the rows x_i / max(||x_i||, eps) of the dW GEMM) (norms, ||W_j|| of the S classes
  kept from the forward, the target rows W_y and
  the fp32 dX accumulators: O(B D + C)).

``S_c = clamp(chunk_bytes // per_class, 1, S)``; ``chunk_bytes`` from the keyword, else
``$MARGIN_KERNELS_CUDA_CHUNK_BYTES``, else 256 MiB. There is no full-W fp32 temporary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import _extension
from ..spec import FAMILY_IDS, KINDS, NORM_EPS, MarginSpec
from ..validation import check_label_vector, check_matrices

# _extension loads margin_kernels._C (registering torch.ops.margin_kernels.*) after checking that
# it was built against the installed torch; otherwise it says why not (never raises).
HAS_CUDA_EXT = _extension.HAS_CUDA_EXT
_EXT_IMPORT_ERROR: str | None = _extension.LOAD_ERROR

__all__ = [
    "CHUNK_BYTES_ENV",
    "DEFAULT_CHUNK_BYTES",
    "HAS_CUDA_EXT",
    "ChunkPlan",
    "chunk_plan",
    "lse_parts",
    "margin_transform",
    "unavailable_reason",
]

DEFAULT_CHUNK_BYTES = 256 * 2**20
CHUNK_BYTES_ENV = "MARGIN_KERNELS_CUDA_CHUNK_BYTES"

# Epilogue launch shape: 256-thread blocks; rows are split into class segments until the grid
# has about BLOCKS_PER_SM blocks per SM (8 resident 256-thread blocks fill an H100/H200 SM), but
# never into segments shorter than MIN_SEGMENT columns.
EPILOGUE_THREADS = 256
BLOCKS_PER_SM = 8
MIN_SEGMENT = 1024
MAX_CLASS_SPLITS = 65535

_BUILD_HINT = (
    "install the CUDA build of torch and nvcc, then build with "
    "`pip install --no-build-isolation -e .` (set MARGIN_KERNELS_FORCE_CUDA_BUILD=1 to make the "
    "build fail loudly instead of being skipped)"
)

# kernel id -> the registry record of that kind
_KIND_INFO = {info.kind_id: info for info in KINDS.values()}
_HALF = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device, spec: MarginSpec) -> str | None:
    """Why ``backend="cuda"`` cannot run ``spec`` on ``device`` (None when it can). It runs on
    CUDA tensors (CUDA epilogues) and on CPU tensors (the C++ CPU kernels of the same ops)."""
    if not HAS_CUDA_EXT:
        return f"margin_kernels._C cannot be used: {_EXT_IMPORT_ERROR}; " + _BUILD_HINT
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"it runs on CUDA and CPU tensors only, got device {device}"
    return _extension.arch_reason(device) if device.type == "cuda" else None


@dataclass(frozen=True)
class ChunkPlan:
    """How one forward + backward of this backend is cut (see :func:`chunk_plan`)."""

    classes_per_chunk: int  # S_c
    num_chunks: int
    logits_dtype: torch.dtype  # dtype of the chunk's logits buffer
    epilogue_grid: tuple[int, int]  # (row blocks, class splits per row) per epilogue launch
    threads_per_block: int
    extra_bytes: int  # peak extra memory of forward + backward beyond inputs and outputs


def _resolve_chunk_bytes(chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        env = os.environ.get(CHUNK_BYTES_ENV)
        if env is None:
            return DEFAULT_CHUNK_BYTES
        try:
            chunk_bytes = int(env)
        except ValueError:
            raise ValueError(f"{CHUNK_BYTES_ENV} must be an integer, got {env!r}") from None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return chunk_bytes


def class_bytes(
    batch: int,
    dim: int,
    dtype: torch.dtype,
    kind: str,
    sampled: bool,
    device_type: str = "cuda",
) -> int:
    """Extra bytes per class of a chunk (the module docstring's ``per_class``)."""
    logit_size = 8 if dtype == torch.float64 else 4
    buffers = 2 if KINDS[kind].family == "weighted" else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_class = buffers * batch * logit_size
    if dtype in _HALF:
        per_class += 4 * dim  # H_c in fp32
        if device_type == "cuda":
            per_class += buffers * batch * itemsize  # dL/dz (dL/dh) in the storage dtype
        else:
            per_class += 4 * dim  # W_c in fp32 (no fp32-output 16-bit GEMM on CPU)
    if sampled:
        per_class += 2 * itemsize * dim  # gathered W_c and H_c before the row scatter
    return per_class


def chunk_plan(
    batch: int,
    num_classes: int,
    dim: int,
    dtype: torch.dtype,
    kind: str,
    num_sampled: int | None = None,
    chunk_bytes: int | None = None,
    *,
    num_sms: int = 132,
    device_type: str = "cuda",
) -> ChunkPlan:
    """The class chunks and epilogue launch of one forward + backward; the launcher uses it.

    Args:
        batch: B rows. num_classes: C. dim: D. dtype: storage dtype of x and W.
        kind: a MarginSpec kind name. num_sampled: Partial-FC class count (None: all C).
        chunk_bytes: byte budget of the chunk-proportional buffers (keyword, else
            ``$MARGIN_KERNELS_CUDA_CHUNK_BYTES``, else 256 MiB).
        num_sms: SMs the epilogue grid should fill. device_type: "cuda" or "cpu" (the CPU run
            holds the chunk of W in fp32 for 16-bit inputs, see :func:`class_bytes`).
    """
    budget = _resolve_chunk_bytes(chunk_bytes)
    num_cols = num_classes if num_sampled is None else num_sampled
    per_class = class_bytes(batch, dim, dtype, kind, num_sampled is not None, device_type)
    classes = max(1, min(budget // max(1, per_class), max(1, num_cols)))
    num_chunks = max(1, math.ceil(num_cols / classes))
    # rows split into class segments until the grid holds ~BLOCKS_PER_SM blocks per SM
    wanted = math.ceil(num_sms * BLOCKS_PER_SM / max(1, batch))
    splits = max(1, min(wanted, classes // MIN_SEGMENT, MAX_CLASS_SPLITS))
    logit_size = 8 if dtype == torch.float64 else 4
    per_rows = logit_size * (10 * batch * dim + 24 * batch + 2 * num_cols + 4 * batch * splits)
    if dtype in _HALF and device_type == "cuda":
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_rows += itemsize * batch * dim  # x / max(||x||, eps), the dW GEMM's operand
    return ChunkPlan(
        classes_per_chunk=classes,
        num_chunks=num_chunks,
        logits_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        epilogue_grid=(batch, splits),
        threads_per_block=EPILOGUE_THREADS,
        extra_bytes=classes * per_class + per_rows,
    )


def _norm_and_direction(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(||v_i||, eps), d||v_i||_clamped / dv_i) of an O(B D) tensor: the direction
    v_i / ||v_i|| where the norm is above eps, 0 where the clamp holds it constant."""
    raw = torch.linalg.vector_norm(v, dim=-1)
    norm = raw.clamp_min(NORM_EPS)
    direction = torch.where((raw >= NORM_EPS)[:, None], v / norm[:, None], torch.zeros_like(v))
    return norm, direction


def _fp32_output_gemm(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for 16-bit operands on
    ``device`` (cuBLAS on CUDA, torch 2.11 and 2.14; CPU has no such kernel)."""
    return device.type == "cuda"


class _Chunks:
    """The class chunks of one call: the columns of chunk k, their W rows, the fp32 GEMMs."""

    def __init__(self, x, weight, class_ids, classes_per_chunk, compute):
        self.x, self.weight, self.class_ids = x, weight, class_ids
        self.compute = compute
        self.num_cols = weight.shape[0] if class_ids is None else class_ids.shape[0]
        self.size = classes_per_chunk
        self.starts = range(0, max(1, self.num_cols), classes_per_chunk)
        # CPU has no fp32-output 16-bit GEMM: x (O(B D)) and each chunk of W go up to fp32.
        self.upcast = x.dtype != compute and not _fp32_output_gemm(x.device)
        self.x_mm = x.to(compute) if self.upcast else x

    def columns(self, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_c, class ids of the chunk or None) of the chunk starting at column ``start``."""
        stop = min(start + self.size, self.num_cols)
        if self.class_ids is None:
            w_c = self.weight[start:stop]
            # unit stride along D for the chain pass (a copy of the chunk only for odd layouts)
            return (w_c if w_c.stride(-1) == 1 else w_c.contiguous()), None
        ids = self.class_ids[start:stop]
        return self.weight.index_select(0, ids), ids

    def operand(self, w_c: torch.Tensor) -> torch.Tensor:
        """W_c as the GEMMs take it (fp32 on CPU for 16-bit storage)."""
        return w_c.to(self.compute) if self.upcast else w_c

    def raw_norms(self, w_op: torch.Tensor) -> torch.Tensor:
        """||W_j|| of the chunk (unclamped), in the compute dtype."""
        return torch.linalg.vector_norm(w_op, dim=-1, dtype=self.compute)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b in the compute dtype: cuBLAS with fp32 output for 16-bit operands on CUDA."""
        if a.dtype == self.compute:
            return torch.mm(a, b)
        return torch.mm(a, b, out_dtype=self.compute)


class _ChunkedMarginLSE(torch.autograd.Function):
    """lse_parts over class chunks: epilogues from the extension (CPU kernels or CUDA kernels,
    by the tensors' device), GEMMs through torch."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        class_ids: torch.Tensor | None,
        kind: int,
        params: list[float],
        plan: ChunkPlan,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = plan.logits_dtype
        num_classes = weight.shape[0]
        has_target = (target >= 0) & (target < num_classes)
        safe_target = torch.where(has_target, target, torch.zeros_like(target))
        chunks = _Chunks(x, weight, class_ids, plan.classes_per_chunk, compute)
        w_y = weight.index_select(0, safe_target)
        w_y_mm = w_y.to(compute) if chunks.upcast else w_y
        x_norm = torch.linalg.vector_norm(x, dim=-1, dtype=compute).clamp_min(NORM_EPS)
        wy_norm = torch.linalg.vector_norm(w_y, dim=-1, dtype=compute).clamp_min(NORM_EPS)
        # c_y = x_i . W_y / (||x_i|| ||W_y||), in the compute dtype (O(B D))
        c_y = torch.einsum("ij,ij->i", x.to(compute), w_y.to(compute)) / (x_norm * wy_norm)
        weighted = _KIND_INFO[kind].family_id == FAMILY_IDS["weighted"]
        splits = plan.epilogue_grid[1]
        neg_lse = torch.full_like(x_norm, -math.inf)
        # ||W_j|| of every participating class (O(C)), kept for the backward: W is read once
        # for them, here, not again per backward chunk
        col_raw = torch.empty(chunks.num_cols, dtype=compute, device=x.device)
        target_logit = None
        for start in chunks.starts:
            w_c, ids = chunks.columns(start)
            w_op = chunks.operand(w_c)
            raw = col_raw[start : start + w_c.shape[0]]
            raw.copy_(chunks.raw_norms(w_op))
            logits = chunks.mm(chunks.x_mm, w_op.T)
            gram = chunks.mm(w_y_mm, w_op.T) if weighted else None
            # neg_lse := logaddexp(neg_lse, LSE of this chunk), in place
            t = torch.ops.margin_kernels.margin_lse_fwd(
                logits,
                gram,
                x_norm,
                raw.clamp_min(NORM_EPS),
                target,
                ids,
                start,
                c_y,
                wy_norm,
                num_classes,
                neg_lse,
                splits,
                kind,
                params,
            )
            if target_logit is None:
                target_logit = t
            del logits, gram
        ctx.save_for_backward(x, weight, target, class_ids, neg_lse, c_y, col_raw)
        ctx.params = (kind, params, plan, deterministic)
        return neg_lse, target_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_neg_lse: torch.Tensor, grad_target: torch.Tensor):
        x, weight, target, class_ids, neg_lse, c_y, col_raw = ctx.saved_tensors
        kind, params, plan, deterministic = ctx.params
        compute = neg_lse.dtype
        grad_neg_lse = grad_neg_lse.to(compute).contiguous()
        grad_target = grad_target.to(compute).contiguous()
        num_classes = weight.shape[0]
        has_target = (target >= 0) & (target < num_classes)
        safe_target = torch.where(has_target, target, torch.zeros_like(target))
        chunks = _Chunks(x, weight, class_ids, plan.classes_per_chunk, compute)
        w_y = weight.index_select(0, safe_target)
        w_y_mm = w_y.to(compute) if chunks.upcast else w_y
        x_norm, x_dir = _norm_and_direction(x.to(compute))
        wy_norm, wy_dir = _norm_and_direction(w_y.to(compute))
        weighted = _KIND_INFO[kind].family_id == FAMILY_IDS["weighted"]
        # kinds with raw W_j (lsoftmax, soft_margin) read W_j . x: no ||W_j|| term
        normalizes_weight = _KIND_INFO[kind].normalizes_weight
        splits = plan.epilogue_grid[1]
        # fp32 (fp64) accumulators across chunks: dz W (dX), dh W (W_y), and the row terms
        grad_x = torch.zeros(x.shape, dtype=compute, device=x.device)
        grad_wy_gram = torch.zeros(x.shape, dtype=compute, device=x.device) if weighted else None
        d_xnorm = torch.zeros_like(x_norm)
        d_ctarget = torch.zeros_like(x_norm)
        d_tnorm = None
        # every row of dW is written by its chunk; Partial FC scatters into zeros
        # (contiguous, whatever W's layout: the chain pass writes rows of unit stride)
        new_grad = torch.empty if class_ids is None else torch.zeros
        grad_weight = new_grad(weight.shape, dtype=weight.dtype, device=weight.device)
        in_place_dw = class_ids is None and weight.dtype == compute
        # separate 16-bit dL/dz buffers (fp32-output GEMMs of 16-bit operands): they hold
        # u = dL/dz max(||W_j||, eps) (dL/dh likewise) where the kind normalises W, and also
        # times max(||x_i||, eps) where dL/dz carries 1/||x_i|| (see the module docstring)
        separate = chunks.x_mm.dtype != compute
        unscale_cols = separate and normalizes_weight
        unscale_rows = separate and _KIND_INFO[kind].family in ("scaled", "squared")
        # the dW GEMM's x operand: x / max(||x_i||, eps) where u carries the row factor
        x_dw = _normalized_rows(x, x_norm) if unscale_rows else chunks.x_mm
        for start in chunks.starts:
            w_c, ids = chunks.columns(start)
            w_op = chunks.operand(w_c)
            raw = col_raw[start : start + w_c.shape[0]]
            col_norm = raw.clamp_min(NORM_EPS)
            logits = chunks.mm(chunks.x_mm, w_op.T)
            gram = chunks.mm(w_y_mm, w_op.T) if weighted else None
            # dL/dz (dL/dh): in place over the fp32 logits (gram), or, for 16-bit GEMM operands
            # (CUDA), written by the epilogue straight into buffers in the storage dtype
            d_z = torch.empty(logits.shape, dtype=w_op.dtype, device=x.device) if separate else None
            d_h = None
            if separate and weighted:
                d_h = torch.empty(gram.shape, dtype=w_op.dtype, device=x.device)
            dxn, dcy, dtn = torch.ops.margin_kernels.margin_lse_bwd(
                logits,
                gram,
                x_norm,
                col_norm,
                target,
                ids,
                start,
                c_y,
                wy_norm,
                num_classes,
                neg_lse,
                grad_neg_lse,
                grad_target,
                splits,
                d_tnorm is None,
                d_z,
                d_h,
                kind,
                params,
            )
            d_xnorm += dxn
            d_ctarget += dcy
            if d_tnorm is None:
                d_tnorm = dtn
            if not separate:
                d_z, d_h = logits, gram
            del logits, gram
            # u carries max(||W_j||, eps): the dX GEMMs read W_c normalised, and the chain pass
            # divides H_c's rows by it
            w_dx = _normalized_rows(w_op, col_norm) if unscale_cols else w_op
            _accumulate(grad_x, chunks, d_z, w_dx)
            if weighted:
                _accumulate(grad_wy_gram, chunks, d_h, w_dx)
            del w_dx
            # H_c = dz^T x (+ dh^T W_y): in place in dW's rows when dtypes allow, else fp32
            stop = start + w_c.shape[0]
            h_c = grad_weight[start:stop] if in_place_dw else None
            h_c = _mm_into(h_c, chunks, d_z.T, x_dw)
            if weighted:
                h_c += chunks.mm(d_h.T, w_y_mm)
            del d_z, d_h
            # the rows of dW_c, in W's dtype: dW's own rows, or (Partial FC) rows to scatter
            if in_place_dw or (class_ids is not None and h_c.dtype == weight.dtype):
                rows = h_c
            elif class_ids is None:
                rows = grad_weight[start:stop]
            else:
                rows = torch.empty_like(w_c)
            if normalizes_weight:
                # dW_j = H_j - (W_j . H_j) W_j / ||W_j||^2 (0 where the eps clamp holds ||W_j||),
                # one pass over H_c and W_c that writes the rows (and divides them by
                # max(||W_j||, eps) where u carried it)
                torch.ops.margin_kernels.margin_column_chain(
                    h_c, w_c, raw, None if rows is h_c else rows, unscale_cols
                )
            elif rows is not h_c:
                rows.copy_(h_c)
            if class_ids is not None:
                _accumulate_rows(grad_weight, ids, rows, deterministic)
            del h_c, rows
        del x_dw
        xn, wyn, cy = x_norm[:, None], wy_norm[:, None], c_y[:, None]
        if unscale_rows:
            grad_x /= xn
        xf, wyf = x.to(compute), w_y.to(compute)
        # dX_i = dz_i W + dL/d||x|| x_hat + dL/dc_y (W_y / (||x|| ||W_y||) - c_y x_hat / ||x||)
        grad_x += d_xnorm[:, None] * x_dir
        grad_x += d_ctarget[:, None] * (wyf / (xn * wyn) - cy * x_dir / xn)
        # the target row's W_y: via c_y, ||W_y|| and (W-Softmax) the gram
        grad_wy = d_ctarget[:, None] * (xf / (xn * wyn) - cy * wy_dir / wyn)
        grad_wy += d_tnorm[:, None] * wy_dir
        if weighted:
            k = grad_wy_gram
            grad_wy += k - (wyf * k).sum(-1, keepdim=True) / wyn * wy_dir
        if x.shape[0]:
            _accumulate_rows(grad_weight, safe_target, grad_wy.to(weight.dtype), deterministic)
        return (grad_x.to(x.dtype), grad_weight, None, None, None, None, None, None)


def _accumulate(out: torch.Tensor, chunks: _Chunks, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out in the compute dtype: in place through the GEMM when the operands
    are in it, else one fp32-output 16-bit GEMM (an O(B D) temporary)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += chunks.mm(a, b)


def _normalized_rows(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """w_j / norm_j in w's dtype (the quotient taken in norm's dtype: the clamped 1e-12 of a zero
    row is not representable in fp16), without a temporary of w's shape in norm's dtype."""
    out = torch.empty_like(w)
    return torch.div(w, norm[:, None], out=out)


def _mm_into(out: torch.Tensor | None, chunks: _Chunks, a: torch.Tensor, b: torch.Tensor):
    """a @ b in the compute dtype, written into ``out`` when given (dW's own rows)."""
    if out is None:
        return chunks.mm(a, b)
    return torch.mm(a, b, out=out)


def _accumulate_rows(
    out: torch.Tensor,
    index: torch.Tensor,
    rows: torch.Tensor,
    deterministic: bool,
    device_type: str | None = None,
) -> None:
    """out[index[k]] += rows[k] (out (N, D), index (K,) int64 with repeats, rows (K, D) in out's
    dtype); ``index_put_(accumulate=True)`` sorts the indices on CUDA, so it is run-to-run
    identical where ``index_add_``'s atomics are not. On CPU it is always taken: CPU
    ``index_add_`` went through a parallel scatter that cost ~100 ms for 8 rows on a loaded
    2-core machine (index_put_: microseconds). ``device_type`` (default ``out``'s) picks the
    branch: the tests run the CUDA one on CPU tensors."""
    if deterministic or (device_type or out.device.type) != "cuda":
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    class_ids: torch.Tensor | None,
) -> None:
    """The shared structural checks, plus lse_parts's int64 labels (no conversion here)."""
    check_matrices(x, weight)
    check_label_vector("target", target, x.shape[0])
    if class_ids is not None:
        check_label_vector("class_ids", class_ids, None)
    for name, labels in (("target", target), ("class_ids", class_ids)):
        if labels is not None and labels.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {labels.dtype}")


def _chunked_lse_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
    *,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's algorithm on whatever device the extension has kernels for (CUDA, or the
    CPU kernels on CPU tensors), without the device check of :func:`lse_parts`. Same contract
    as :func:`lse_parts`."""
    if not HAS_CUDA_EXT:
        raise RuntimeError(unavailable_reason(x.device, spec))
    _check_inputs(x, weight, target, class_ids)
    return _run(x, weight, target, spec, class_ids, deterministic, chunk_bytes)


def _run(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None,
    deterministic: bool,
    chunk_bytes: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked forward on inputs already checked by the caller (once)."""
    storage = torch.promote_types(x.dtype, weight.dtype)
    x, weight = x.to(storage), weight.to(storage)
    plan = chunk_plan(
        x.shape[0],
        weight.shape[0],
        x.shape[1],
        storage,
        spec.kind,
        None if class_ids is None else class_ids.shape[0],
        chunk_bytes,
        device_type=x.device.type,
    )
    kind, params = spec.kernel_args()
    target = target.contiguous()
    class_ids = None if class_ids is None else class_ids.contiguous()
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedMarginLSE.apply(
            x, weight, target, class_ids, kind, list(params), plan, deterministic
        )


def lse_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
    *,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(neg_lse, target_logit)`` with the contract of
    :func:`margin_kernels.reference.lse_parts`, on CUDA or CPU tensors.

    Args:
        x: (B, D) float16/bfloat16/float32/float64 features, on a CUDA device or the CPU.
        weight: (C, D) class weights, same device.
        target: (B,) int64; a value outside [0, C) means the row has no target.
        spec: the margin.
        class_ids: optional (S,) int64 participating classes (Partial FC).
        deterministic: scatter dW rows (Partial-FC columns, target rows) with a sort-based
            accumulation instead of atomics; everything else is run-to-run identical anyway.
        chunk_bytes: byte budget of the chunk-proportional buffers (see :func:`chunk_plan`).

    Returns:
        Both (B,), float32 (float64 for float64 inputs), differentiable once w.r.t. x and weight
        (a double backward raises).
    """
    reason = unavailable_reason(x.device, spec)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run here: {reason}")
    _check_inputs(x, weight, target, class_ids)
    return _run(x, weight, target, spec, class_ids, deterministic, chunk_bytes)


def margin_transform(
    cos: torch.Tensor,
    spec: MarginSpec,
    target: bool,
    x_norm: torch.Tensor | None = None,
    w_norm: torch.Tensor | None = None,
    c_target: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and d/dcos of the compiled target (``target=True``) or non-target transform,
    element-wise over ``cos`` (any shape, float dtype); the other tensors broadcast to it
    (norms default to 1; ``c_target`` and ``gram`` = w_y . w_j are read by W-Softmax only)."""
    if not HAS_CUDA_EXT:
        raise RuntimeError(unavailable_reason(cos.device, spec))
    ones = torch.ones_like(cos)

    def like(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.broadcast_to(t.to(cos.dtype), cos.shape).contiguous()

    kind, params = spec.kernel_args()
    return torch.ops.margin_kernels.margin_transform(
        cos.contiguous(),
        ones if x_norm is None else like(x_norm),
        ones if w_norm is None else like(w_norm),
        like(c_target),
        like(gram),
        kind,
        list(params),
        target,
    )
