"""The CUDA C++ backend (``backend="cuda"``): cuBLAS GEMMs on row chunks + fused epilogues.

Per chunk of R rows of ``x`` the raw dots ``z = x_chunk @ W_cols^T`` (R, S) come from cuBLAS
through ``torch.mm``, in the inputs' dtype, and the epilogues of ``csrc/`` do the rest in one
pass each:

* forward (``torch.ops.margin_kernels.margin_lse_fwd``): cosines ``c = z / (||x|| ||W_j||)``,
  the margin transform of ``csrc/margin_math.h``, the target column masked out and an online
  log-sum-exp per row -> ``neg_lse`` (R,) and the target logit (R,);
* backward (``margin_lse_bwd``): overwrites the chunk's logits buffer with ``dL/dz`` in place,
  then ``dX_chunk = dz @ W_cols`` and ``dW_cols += dz^T @ x_chunk`` (cuBLAS again).

The GEMMs run on the raw ``x`` and ``W`` rather than on normalised copies: a normalised copy of
W would double the largest tensor (C can be 10^6 or more), while dividing by the two norms in
the epilogue is free. The normalisation chain rule is applied outside the GEMMs in O((B + C) D):
the epilogue returns per row ``dL/d||x||`` (raw dots held), and the column side uses the
identity ``sum_i dL/dc_ij c_ij = w_j . sum_i dL/dc_ij x_i`` (a scale-invariant function of W_j
has a gradient orthogonal to W_j), so no column reduction is needed inside a kernel:
``dW_j = H_j - (W_j . H_j) W_j / ||W_j||^2`` with ``H = dz^T X``. The target logit reads
``W[target]`` (an (B, D) gather), W-Softmax's non-target logits also read the raw gram
``W[y] W_cols^T`` (a second GEMM per chunk, also overwritten by its gradient).

Memory is bounded by the chunk: ``rows_per_chunk = chunk_bytes // (S * itemsize)`` (halved for
W-Softmax), ``chunk_bytes`` from the keyword, else ``$MARGIN_KERNELS_CUDA_CHUNK_BYTES``, else
256 MiB. The same chunked algorithm runs over the C++ CPU twin of the epilogues
(:func:`_chunked_lse_parts`), which is how CI tests this backend without a GPU.
"""

from __future__ import annotations

import os

import torch

from .. import _extension
from ..spec import KIND_IDS, NORM_EPS, MarginSpec

# _extension loads margin_kernels._C (registering torch.ops.margin_kernels.*) after checking that
# it was built against the installed torch; otherwise it says why not (never raises).
HAS_CUDA_EXT = _extension.HAS_CUDA_EXT
_EXT_IMPORT_ERROR: str | None = _extension.LOAD_ERROR

__all__ = [
    "AUTO_CROSSOVER_MEASURED",
    "CHUNK_BYTES_ENV",
    "DEFAULT_CHUNK_BYTES",
    "HAS_CUDA_EXT",
    "lse_parts",
    "margin_transform",
    "rows_per_chunk",
    "unavailable_reason",
]

# Where "auto" should prefer this backend over triton has not been measured (no GPU was available
# while it was written), so ops.resolve keeps trying triton first and takes cuda only when triton
# cannot run.
AUTO_CROSSOVER_MEASURED = False

DEFAULT_CHUNK_BYTES = 256 * 2**20
CHUNK_BYTES_ENV = "MARGIN_KERNELS_CUDA_CHUNK_BYTES"

_BUILD_HINT = (
    "install the CUDA build of torch and nvcc, then build with "
    "`pip install --no-build-isolation -e .` (set MARGIN_KERNELS_FORCE_CUDA_BUILD=1 to make the "
    "build fail loudly instead of being skipped)"
)


def unavailable_reason(device: torch.device, spec: MarginSpec) -> str | None:
    """Why ``backend="cuda"`` cannot run ``spec`` on ``device`` (None when it can)."""
    if not HAS_CUDA_EXT:
        return f"margin_kernels._C cannot be used: {_EXT_IMPORT_ERROR}; " + _BUILD_HINT
    if torch.device(device).type != "cuda":
        return f"it runs on CUDA tensors only, got device {torch.device(device)}"
    return _extension.arch_reason(torch.device(device))


def rows_per_chunk(num_cols: int, itemsize: int, spec: MarginSpec, chunk_bytes: int | None) -> int:
    """Rows of x per chunk so that the (R, S) logits buffer (and W-Softmax's gram buffer) fit in
    ``chunk_bytes`` (keyword, else ``$MARGIN_KERNELS_CUDA_CHUNK_BYTES``, else 256 MiB)."""
    if chunk_bytes is None:
        env = os.environ.get(CHUNK_BYTES_ENV)
        if env is None:
            chunk_bytes = DEFAULT_CHUNK_BYTES
        else:
            try:
                chunk_bytes = int(env)
            except ValueError:
                raise ValueError(f"{CHUNK_BYTES_ENV} must be an integer, got {env!r}") from None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    buffers = 2 if spec.kind == "w_softmax" else 1
    return max(1, chunk_bytes // max(1, num_cols * itemsize * buffers))


def _norm_and_direction(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(||v_i||, eps), d||v_i||_clamped / dv_i): the direction v_i / ||v_i|| where the norm
    is above eps, 0 where the clamp holds it constant."""
    raw = torch.linalg.vector_norm(v, dim=-1)
    norm = raw.clamp_min(NORM_EPS)
    direction = torch.where((raw >= NORM_EPS)[:, None], v / norm[:, None], torch.zeros_like(v))
    return norm, direction


class _ChunkedMarginLSE(torch.autograd.Function):
    """lse_parts over row chunks: forward and backward epilogues from the extension (CPU twin or
    CUDA kernels, by the tensors' device), GEMMs through torch."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        class_ids: torch.Tensor | None,
        kind: int,
        params: list[float],
        chunk_rows: int,
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        num_classes = weight.shape[0]
        has_target = (target >= 0) & (target < num_classes)
        safe_target = torch.where(has_target, target, torch.zeros_like(target))
        cols = weight if class_ids is None else weight.index_select(0, class_ids)
        w_y = weight.index_select(0, safe_target)
        x_norm = torch.linalg.vector_norm(x, dim=-1, dtype=compute).clamp_min(NORM_EPS)
        col_norm = torch.linalg.vector_norm(cols, dim=-1, dtype=compute).clamp_min(NORM_EPS)
        wy_norm = torch.linalg.vector_norm(w_y, dim=-1, dtype=compute).clamp_min(NORM_EPS)
        # c_y = x_i . W_y / (||x_i|| ||W_y||), in the compute dtype (O(B D))
        c_y = (x.to(compute) * w_y.to(compute)).sum(-1) / (x_norm * wy_norm)
        weighted = kind == KIND_IDS["w_softmax"]
        neg_lse_parts, target_parts = [], []
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, min(start + chunk_rows, x.shape[0]))
            logits = torch.mm(x[rows], cols.T)
            gram = torch.mm(w_y[rows], cols.T) if weighted else None
            neg_lse, t = torch.ops.margin_kernels.margin_lse_fwd(
                logits,
                gram,
                x_norm[rows],
                col_norm,
                target[rows],
                class_ids,
                c_y[rows],
                wy_norm[rows],
                num_classes,
                kind,
                params,
            )
            neg_lse_parts.append(neg_lse)
            target_parts.append(t)
        if neg_lse_parts:
            neg_lse, target_logit = torch.cat(neg_lse_parts), torch.cat(target_parts)
        else:
            neg_lse = target_logit = x.new_empty(0, dtype=compute)
        ctx.save_for_backward(x, weight, target, class_ids, neg_lse, c_y)
        ctx.params = (kind, params, chunk_rows, deterministic)
        return neg_lse, target_logit

    @staticmethod
    def backward(ctx, grad_neg_lse: torch.Tensor, grad_target: torch.Tensor):
        x, weight, target, class_ids, neg_lse, c_y = ctx.saved_tensors
        kind, params, chunk_rows, deterministic = ctx.params
        compute = neg_lse.dtype
        grad_neg_lse = grad_neg_lse.to(compute).contiguous()
        grad_target = grad_target.to(compute).contiguous()
        num_classes = weight.shape[0]
        has_target = (target >= 0) & (target < num_classes)
        safe_target = torch.where(has_target, target, torch.zeros_like(target))
        cols = weight if class_ids is None else weight.index_select(0, class_ids)
        w_y = weight.index_select(0, safe_target)
        x_norm, x_dir = _norm_and_direction(x.to(compute))
        col_norm, col_dir = _norm_and_direction(cols.to(compute))
        wy_norm, wy_dir = _norm_and_direction(w_y.to(compute))
        weighted = kind == KIND_IDS["w_softmax"]
        # lsoftmax and soft_margin read raw W_j . x: no ||W_j|| term
        normalizes_weight = kind not in (KIND_IDS["lsoftmax"], KIND_IDS["soft_margin"])
        # H_j = sum_i dL/dz_ij x_i (+ sum_i dL/dh_ij W_{y_i}), accumulated over the chunks
        grad_cols = torch.zeros(cols.shape, dtype=compute, device=x.device)
        same_dtype = x.dtype == compute
        grad_x_parts, grad_wy_parts = [], []
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, min(start + chunk_rows, x.shape[0]))
            logits = torch.mm(x[rows], cols.T)
            gram = torch.mm(w_y[rows], cols.T) if weighted else None
            # logits := dL/dz, gram := dL/dh, in place
            d_xnorm, d_ctarget, d_tnorm = torch.ops.margin_kernels.margin_lse_bwd(
                logits,
                gram,
                x_norm[rows],
                col_norm,
                target[rows],
                class_ids,
                c_y[rows],
                wy_norm[rows],
                num_classes,
                neg_lse[rows],
                grad_neg_lse[rows],
                grad_target[rows],
                kind,
                params,
            )
            xn, wyn, cy = x_norm[rows, None], wy_norm[rows, None], c_y[rows, None]
            xf, wyf = x[rows].to(compute), w_y[rows].to(compute)
            # dX_i = dz_i W + dL/d||x|| x_hat + dL/dc_y (W_y / (||x|| ||W_y||) - c_y x_hat / ||x||)
            grad_x = torch.mm(logits, cols).to(compute)
            grad_x += d_xnorm[:, None] * x_dir[rows]
            grad_x += d_ctarget[:, None] * (wyf / (xn * wyn) - cy * x_dir[rows] / xn)
            # the target row's W_y: via c_y, ||W_y|| and (W-Softmax) the gram
            grad_wy = d_ctarget[:, None] * (xf / (xn * wyn) - cy * wy_dir[rows] / wyn)
            grad_wy += d_tnorm[:, None] * wy_dir[rows]
            _accumulate_mm(grad_cols, logits.T, x[rows], same_dtype)
            if weighted:
                k = torch.mm(gram, cols).to(compute)
                grad_wy += k - (wyf * k).sum(-1, keepdim=True) / wyn * wy_dir[rows]
                _accumulate_mm(grad_cols, gram.T, w_y[rows], same_dtype)
            grad_x_parts.append(grad_x)
            grad_wy_parts.append(grad_wy)
        if normalizes_weight:
            # d||W_j|| term at fixed dots: -(W_j . H_j) / ||W_j||, along d||W_j||/dW_j
            radial = (cols.to(compute) * grad_cols).sum(-1, keepdim=True) / col_norm[:, None]
            grad_cols -= radial * col_dir
        if class_ids is None:
            grad_weight = grad_cols
        else:
            grad_weight = torch.zeros(weight.shape, dtype=compute, device=x.device)
            _accumulate_rows(grad_weight, class_ids, grad_cols, deterministic)
        if grad_x_parts:
            grad_input = torch.cat(grad_x_parts)
            _accumulate_rows(grad_weight, safe_target, torch.cat(grad_wy_parts), deterministic)
        else:
            grad_input = torch.zeros(x.shape, dtype=compute, device=x.device)
        return (
            grad_input.to(x.dtype),
            grad_weight.to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, same_dtype: bool) -> None:
    """out += a @ b; in place through cuBLAS when the storage dtype is the compute dtype, else
    through one product in the storage dtype (out is float32 for float16/bfloat16 storage)."""
    if same_dtype:
        out.addmm_(a, b)
    else:
        out += torch.mm(a, b).to(out.dtype)


def _accumulate_rows(
    out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, deterministic: bool
) -> None:
    """out[index[k]] += rows[k]; ``index_put_(accumulate=True)`` sorts the indices on CUDA, so it
    is run-to-run identical where ``index_add_``'s atomics are not."""
    if deterministic:
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    class_ids: torch.Tensor | None,
) -> None:
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t, layout in (("x", x, "(B, D)"), ("weight", weight, "(C, D)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in floats:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{name} must be a 2-D float tensor {layout}, got {got}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in D")
    if target.dtype != torch.int64 or target.shape != (x.shape[0],):
        raise ValueError(f"target must be (B,) int64, got {tuple(target.shape)} {target.dtype}")
    if class_ids is not None and (class_ids.dtype != torch.int64 or class_ids.dim() != 1):
        raise ValueError(
            f"class_ids must be (S,) int64, got {tuple(class_ids.shape)} {class_ids.dtype}"
        )


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
    CPU twin on CPU tensors, which is what CI tests). Same contract as :func:`lse_parts`."""
    if not HAS_CUDA_EXT:
        raise RuntimeError(unavailable_reason(x.device, spec))
    _check_inputs(x, weight, target, class_ids)
    storage = torch.promote_types(x.dtype, weight.dtype)
    x, weight = x.to(storage), weight.to(storage)
    num_cols = weight.shape[0] if class_ids is None else class_ids.shape[0]
    chunk_rows = rows_per_chunk(num_cols, x.element_size(), spec, chunk_bytes)
    kind, params = spec.kernel_args()
    target = target.contiguous()
    class_ids = None if class_ids is None else class_ids.contiguous()
    with torch.autocast(x.device.type, enabled=False):
        return _ChunkedMarginLSE.apply(
            x, weight, target, class_ids, kind, list(params), chunk_rows, deterministic
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
    :func:`margin_kernels.reference.lse_parts`, on CUDA tensors.

    Args:
        x: (B, D) float16/bfloat16/float32/float64 features, on a CUDA device.
        weight: (C, D) class weights, same device.
        target: (B,) int64; a value outside [0, C) means the row has no target.
        spec: the margin.
        class_ids: optional (S,) int64 participating classes (Partial FC).
        deterministic: accumulate dW rows with a sort-based scatter instead of atomics.
        chunk_bytes: byte budget of one chunk's logits buffer (see :func:`rows_per_chunk`).

    Returns:
        Both (B,), float32 (float64 for float64 inputs), differentiable w.r.t. x and weight.
    """
    reason = unavailable_reason(x.device, spec)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run here: {reason}")
    return _chunked_lse_parts(
        x, weight, target, spec, class_ids, deterministic, chunk_bytes=chunk_bytes
    )


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
