"""Launchers, the ``torch.library`` custom ops and :func:`lse_parts` of the Triton backend.

* ``_forward``: row norms, target logits, ``_fwd_kernel`` (online LSE over class splits and,
  when a gradient is needed, the dX numerator), and the fixed-order merge of the splits;
* ``_backward``: ``_dw_kernel`` (dW by ownership), then dX = g * numerator plus the O(B D) norm
  and target terms, and the target rows of dW;
* two custom ops, ``margin_kernels::triton_lse_fwd`` and ``margin_kernels::triton_lse_bwd``, tied
  by ``register_autograd`` (``torch.compile(fullgraph=True)`` traces them as opaque ops).

Every launch runs under ``torch.cuda.device(x.device)`` and passes its arguments by keyword;
tiles, grids, warps and stages come from :mod:`.config`.

Backward algebra (P_ij = g_i exp(f_ij - LSE_i), g = dL/dLSE; the forward saved
``num_i = sum_j exp(f_ij - LSE_i) (df/dd)_ij W_j`` and the row sums ``r_i``):

    dX_i = g_i num_i + (g_i r_nx_i + dL/dnx_i (target)) x_i / nx_i + dL/dd_iy W_y
    dW_j = sum_i (P df/dd)_ij x_i + (sum_i P df/dnw)_ij W_j / nw_j  [+ target rows]
"""

from __future__ import annotations

import contextlib

import torch

from ...spec import KIND_IDS, KINDS, PARAM_INDEX, MarginSpec
from . import config
from ._compat import HAS_TRITON, INTERPRET, triton
from .config import NONTARGET_FAMILY, NT_W
from .margin_math import kernel_params

if HAS_TRITON:
    import triton.language as tl

    from .backward import _dw_kernel, _zero_unsampled_kernel
    from .forward import _fwd_kernel, _row_norm_kernel, _target_kernel

__all__ = ["HAS_TRITON", "INTERPRET", "lse_parts", "unavailable_reason"]

_KIND_NAMES = {v: k for k, v in KIND_IDS.items()}
# row_stats rows: t, a, bx, by, c_y, ny, nx (target kernel), r_nx, r_cy, r_ny (forward merge)
NUM_ROW_STATS = 10


def unavailable_reason(device: torch.device, spec: MarginSpec) -> str | None:
    """Why the Triton backend cannot run ``spec`` on ``device`` (None when it can)."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton; it ships with Linux CUDA torch)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (
        f"it runs on CUDA tensors, not {device.type} (on CPU only under Triton's interpreter: "
        "set TRITON_INTERPRET=1 before importing margin_kernels)"
    )


def device_context(device: torch.device):
    """The context every launch runs in: ``torch.cuda.device(device)`` for CUDA tensors, so that
    kernels run on the tensors' device and its current stream whatever device is current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's matmul setting (TF32 only when the user allowed it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    forced = config.gpu_tiles_sms()
    # interpreter: a few programs, so that splits and the merge are exercised
    return 2 if forced is None else forced


def _gemm_common(dtype: torch.dtype, family: int, has_ids: bool, tile: config.Tile, dim: int):
    """Constexprs and launch options shared by the forward and the dW kernel."""
    return dict(
        NT=family, HAS_IDS=has_ids, ACC=_tl_acc(dtype),
        UPCAST=INTERPRET and dtype == torch.bfloat16,  # the interpreter's bf16 dot is wrong
        PRECISION=_precision(dtype), ONE_K=tile.one_k(dim),
        SCALE_OPS=dtype == torch.float16,  # fp16's range, not bf16's: scale second-GEMM operands
        EVEN_D=dim % tile.block_out == 0,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        BLOCK_OUT=tile.block_out, num_warps=tile.num_warps, num_stages=tile.num_stages,
        maxnreg=config.MAX_REGISTERS,
    )  # fmt: skip


def _row_norms(src: torch.Tensor, ids: torch.Tensor | None, acc_dtype: torch.dtype):
    n_rows = src.shape[0] if ids is None else ids.shape[0]
    out = torch.empty(n_rows, device=src.device, dtype=acc_dtype)
    if n_rows == 0:
        return out
    rt = config.row_tile(src.dtype)
    _row_norm_kernel[(triton.cdiv(n_rows, rt.block_r),)](
        SRC=src, IDS=ids if ids is not None else src, OUT=out, n_rows=n_rows, D=src.shape[1],
        stride_r=src.stride(0), stride_d=src.stride(1),
        HAS_IDS=ids is not None, ACC=_tl_acc(src.dtype), BLOCK_R=rt.block_r, BLOCK_D=rt.block_k,
        num_warps=rt.num_warps, maxnreg=config.MAX_REGISTERS,
    )  # fmt: skip
    return out


def _columns(target, class_ids, num_classes):
    """(labels with -1 where the row has no target in this weight, contiguous ids or None,
    number of columns in the denominator)."""
    # labels outside this weight's classes (ignored, or another shard's) have no target
    y = torch.where((target >= 0) & (target < num_classes), target, -1).contiguous()
    ids = class_ids.contiguous() if class_ids is not None else None
    return y, ids, num_classes if ids is None else ids.shape[0]


def _psi_m(kind: str, params: list[float]) -> int:
    return int(params[PARAM_INDEX["m"]]) if KINDS[kind].psi else 1


def _num_count(family: int, needs_num: bool) -> int:
    """Numerators the forward keeps: dX (and W-Softmax's dW_y)."""
    return 0 if not needs_num else (2 if family == NT_W else 1)


def _forward(x, weight, target, class_ids, kind_id, params, needs_num):
    """(neg_lse (B,), target_logit (B,), row_stats (10, B), col_norms (S,), nums (k, B, D))."""
    batch, dim = x.shape
    kind = _KIND_NAMES[kind_id]
    family = NONTARGET_FAMILY[kind]
    acc_t = _acc_dtype(x.dtype)
    y, ids, n_cols = _columns(target, class_ids, weight.shape[0])
    psi_m = _psi_m(kind, params)
    pvec = torch.tensor(kernel_params(params, psi_m), dtype=acc_t).to(x.device)
    row_stats = torch.zeros(NUM_ROW_STATS, batch, device=x.device, dtype=acc_t)
    nums = torch.zeros(_num_count(family, needs_num), batch, dim, device=x.device, dtype=acc_t)
    nx = _row_norms(x, None, acc_t)
    nw = _row_norms(weight, ids, acc_t)
    if batch == 0:
        return row_stats[0].clone(), row_stats[0].clone(), row_stats, nw, nums
    rt = config.row_tile(x.dtype)
    _target_kernel[(triton.cdiv(batch, rt.block_r),)](
        X=x, W=weight, Y=y, NX=nx, PARAMS=pvec, OUT=row_stats, B=batch, D=dim,
        stride_xb=x.stride(0), stride_xd=x.stride(1),
        stride_wc=weight.stride(0), stride_wd=weight.stride(1),
        KIND=kind_id, PSI_M=psi_m, GRAD_MODE=int(params[PARAM_INDEX["grad_mode"]]),
        OVERFLOW=int(params[PARAM_INDEX["overflow"]]),
        ACC=_tl_acc(x.dtype), BLOCK_B=rt.block_r, BLOCK_D=rt.block_k,
        num_warps=rt.num_warps, maxnreg=config.MAX_REGISTERS,
    )  # fmt: skip
    tile = config.gemm_tile(x.dtype, family, dim, aligned=config.is_aligned(dim, x, weight))
    slices = tile.slices(dim) if needs_num else 1
    row_blocks = triton.cdiv(batch, tile.block_m)
    splits = config.forward_splits(batch, n_cols, tile, slices, _num_sms(x.device))
    per_split = config.cols_per_split(n_cols, splits, tile)
    part_m = torch.empty(splits, batch, device=x.device, dtype=acc_t)
    part_s = torch.empty_like(part_m)
    k = _num_count(family, needs_num)
    part_num = torch.empty(splits, k, batch, dim, device=x.device, dtype=acc_t)
    part_row = torch.empty(splits, 3, batch, device=x.device, dtype=acc_t)
    _fwd_kernel[(row_blocks * slices, splits)](
        X=x, W=weight, Y=y, IDS=ids if ids is not None else y, NX=nx, NW=nw,
        CY=row_stats[4], NY=row_stats[5], PARAMS=pvec, PART_M=part_m, PART_S=part_s,
        PART_NUM=part_num, PART_ROW=part_row, B=batch, S=n_cols, D=dim,
        cols_per_split=per_split, row_blocks=row_blocks,
        stride_xb=x.stride(0), stride_xd=x.stride(1),
        stride_wc=weight.stride(0), stride_wd=weight.stride(1),
        NEEDS_NUM=needs_num, **_gemm_common(x.dtype, family, ids is not None, tile, dim),
    )  # fmt: skip
    # deterministic merge of the splits, in split order: LSE = M + log sum_k s_k exp(m_k - M)
    top = part_m.max(dim=0).values
    weight_k = torch.exp(part_m - top)
    total = (part_s * weight_k).sum(dim=0)
    neg_lse = top + torch.log(total)
    if needs_num:
        # exp(m_k - LSE) per split; 0 where the row has no column (LSE = -inf)
        coef = torch.where(total > 0, weight_k / total, torch.zeros_like(weight_k))
        nums = torch.einsum("sb,skbd->kbd", coef, part_num)
        row_stats[7:] = torch.einsum("sb,srb->rb", coef, part_row)
    return neg_lse, row_stats[0].clone(), row_stats, nw, nums


def _backward(grad_lse, grad_t, x, weight, target, class_ids, neg_lse, row_stats, nw, nums,
              kind_id, params, needs_dx, needs_dw):  # fmt: skip
    """(dX, dW) of sum(grad_lse * neg_lse + grad_t * t), in the inputs' dtypes (contiguous)."""
    batch, dim = x.shape
    num_classes = weight.shape[0]
    kind = _KIND_NAMES[kind_id]
    family = NONTARGET_FAMILY[kind]
    acc_t = row_stats.dtype
    y, ids, n_cols = _columns(target, class_ids, num_classes)
    _, a, bx, by, cy, ny, nx, r_nx, r_cy, r_ny = row_stats
    g = grad_lse.to(acc_t).contiguous()
    grad_t = grad_t.to(acc_t)
    if needs_dw and n_cols and batch:
        # every row is written once by a kernel: the owners the sampled (or all) classes,
        # _zero_unsampled_kernel the others (Partial-FC); no memset beforehand
        dw = torch.empty(num_classes, dim, device=weight.device, dtype=weight.dtype)
        pvec = torch.tensor(kernel_params(params, _psi_m(kind, params)), dtype=acc_t)
        aligned = config.is_aligned(dim, x, weight)
        tile = config.gemm_tile(
            x.dtype, family, dim, aligned=aligned, kernel="dw", has_ids=ids is not None
        )
        slices = tile.slices(dim)
        if ids is not None:
            sampled = torch.zeros(num_classes, device=weight.device, dtype=torch.int8)
            sampled[ids] = 1
            zt = config.zero_tile()
            _zero_unsampled_kernel[(triton.cdiv(num_classes, zt.block_r),)](
                DW=dw, SAMPLED=sampled, C=num_classes, D=dim,
                BLOCK_R=zt.block_r, BLOCK_D=zt.block_k, num_warps=zt.num_warps,
            )  # fmt: skip
        _dw_kernel[(triton.cdiv(n_cols, tile.block_n) * slices,)](
            X=x, W=weight, Y=y, IDS=ids if ids is not None else y, NX=nx, NW=nw, CY=cy, NY=ny,
            PARAMS=pvec.to(x.device), LSE=neg_lse, GLSE=g, DW=dw, B=batch, S=n_cols, D=dim,
            slices=slices, stride_xb=x.stride(0), stride_xd=x.stride(1),
            stride_wc=weight.stride(0), stride_wd=weight.stride(1),
            **_gemm_common(x.dtype, family, ids is not None, tile, dim),
        )  # fmt: skip
    else:
        dw = torch.zeros(num_classes, dim, device=weight.device, dtype=weight.dtype)
    # Row terms, O(B D): the target logit and W-Softmax's c_y, ny enter through the target dot
    # d_y = x . W_y and the norms nx, ny. With r = dL/dc_y and c_y = d_y / (nx ny):
    coef_dy = grad_t * a + g * r_cy / (nx * ny)  # dL/dd_y
    coef_nx = grad_t * bx + g * r_nx - g * r_cy * cy / nx  # dL/dnx
    coef_ny = grad_t * by + g * r_ny - g * r_cy * cy / ny  # dL/dny
    y_safe = y.clamp_min(0)
    w_y = weight[y_safe].to(acc_t)
    xf = x.to(acc_t)
    if needs_dx:
        if nums.shape[0] == 0 and batch and n_cols:
            raise RuntimeError("the forward ran without the dX numerator (x needed no grad)")
        dx = coef_dy[:, None] * w_y + (coef_nx / nx)[:, None] * xf
        if nums.shape[0]:
            dx = dx + g[:, None] * nums[0]
    else:
        dx = torch.zeros(batch, dim, device=x.device, dtype=acc_t)
    if needs_dw:
        dw_rows = coef_dy[:, None] * xf + (coef_ny / ny)[:, None] * w_y
        if family == NT_W and nums.shape[0]:
            dw_rows = dw_rows + g[:, None] * nums[1]
        # sort-based accumulation on CUDA: deterministic for repeated labels
        dw.index_put_((y_safe,), dw_rows.to(dw.dtype), accumulate=True)
    return dx.to(x.dtype).contiguous(), dw


def _run_forward(x, weight, target, class_ids, kind_id, params, needs_num):
    with device_context(x.device):
        return _forward(x, weight, target, class_ids, kind_id, params, needs_num)


def _run_backward(*args):
    with device_context(args[2].device):
        return _backward(*args)


# ------------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @torch.library.custom_op("margin_kernels::triton_lse_fwd", mutates_args=())
    def _lse_fwd_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        class_ids: torch.Tensor | None,
        kind_id: int,
        params: list[float],
        needs_num: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neg_lse (B,), target_logit (B,), row_stats (10, B), col_norms (S,), nums (k, B, D));
        fp32 (fp64 for fp64 inputs); k = 0 without ``needs_num``, 2 for W-Softmax, else 1."""
        return _run_forward(x, weight, target, class_ids, kind_id, params, needs_num)

    @_lse_fwd_op.register_fake
    def _(x, weight, target, class_ids, kind_id, params, needs_num):
        acc_t = _acc_dtype(x.dtype)
        batch, dim = x.shape
        n_cols = weight.shape[0] if class_ids is None else class_ids.shape[0]
        k = _num_count(NONTARGET_FAMILY[_KIND_NAMES[kind_id]], needs_num)
        return (
            x.new_empty(batch, dtype=acc_t),
            x.new_empty(batch, dtype=acc_t),
            x.new_empty(NUM_ROW_STATS, batch, dtype=acc_t),
            x.new_empty(n_cols, dtype=acc_t),
            x.new_empty(k, batch, dim, dtype=acc_t),
        )

    @torch.library.custom_op("margin_kernels::triton_lse_bwd", mutates_args=())
    def _lse_bwd_op(
        grad_lse: torch.Tensor,
        grad_t: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        class_ids: torch.Tensor | None,
        neg_lse: torch.Tensor,
        row_stats: torch.Tensor,
        col_norms: torch.Tensor,
        nums: torch.Tensor,
        kind_id: int,
        params: list[float],
        needs_dx: bool,
        needs_dw: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dX (B, D), dW (C, D)), contiguous, in the dtypes of x and weight."""
        return _run_backward(grad_lse, grad_t, x, weight, target, class_ids, neg_lse,
                             row_stats, col_norms, nums, kind_id, params, needs_dx,
                             needs_dw)  # fmt: skip

    @_lse_bwd_op.register_fake
    def _(grad_lse, grad_t, x, weight, target, class_ids, neg_lse, row_stats, col_norms, nums,
          kind_id, params, needs_dx, needs_dw):  # fmt: skip
        # the real op returns fresh contiguous tensors whatever the inputs' strides
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _setup_context(ctx, inputs, output):
        x, weight, target, class_ids, kind_id, params, _needs_num = inputs
        neg_lse, _, row_stats, col_norms, nums = output
        ctx.save_for_backward(x, weight, target, class_ids, neg_lse, row_stats, col_norms, nums)
        ctx.kind_id, ctx.params = kind_id, params

    def _lse_backward(ctx, grad_lse, grad_t, _grad_stats, _grad_norms, _grad_nums):
        x, weight, target, class_ids, neg_lse, row_stats, col_norms, nums = ctx.saved_tensors
        if grad_lse is None:
            grad_lse = torch.zeros_like(neg_lse)
        if grad_t is None:
            grad_t = torch.zeros_like(neg_lse)
        dx, dw = _lse_bwd_op(grad_lse, grad_t, x, weight, target, class_ids, neg_lse,
                             row_stats, col_norms, nums, ctx.kind_id, ctx.params,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])  # fmt: skip
        return dx, dw, None, None, None, None, None

    _lse_fwd_op.register_autograd(_lse_backward, setup_context=_setup_context)


def lse_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`margin_kernels.reference.lse_parts`.

    Args:
        x: (B, D) float16/bfloat16/float32/float64 features (any strides).
        weight: (C, D) class weights of the same dtype (any strides).
        target: (B,) int64; entries outside [0, C) mean "no target in this weight".
        spec: the margin.
        class_ids: optional (S,) int64 distinct ids in [0, C) of the classes in the
            denominator (Partial FC samples without replacement), read indirectly (no gathered
            copy of W); dW is non-zero only on those rows and targets, each sampled row of dW
            written by the one program that owns it.
        deterministic: accepted for the backend contract; this backend is always bitwise
            deterministic run to run (every output is owned by one program; the splits merge in
            a fixed order), at no extra cost.

    Returns:
        ``(neg_lse, target_logit)``, (B,) float32 (float64 for float64 inputs).
    """
    reason = unavailable_reason(x.device, spec)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    del deterministic
    kind_id, params = spec.kernel_args()
    grad = torch.is_grad_enabled()
    # W-Softmax's dW also needs the forward's dW_y numerator
    needs_num = grad and (
        x.requires_grad or (NONTARGET_FAMILY[spec.kind] == NT_W and weight.requires_grad)
    )
    neg_lse, t, _, _, _ = _lse_fwd_op(
        x, weight, target.long(), class_ids, kind_id, list(params), bool(needs_num)
    )
    return neg_lse, t
