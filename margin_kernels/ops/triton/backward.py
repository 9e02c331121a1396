"""Backward kernel: dW by ownership. dX needs no kernel of its own: the forward accumulated its
numerator, and the launcher scales it by the upstream gradient (O(B D))."""

from __future__ import annotations

from ._compat import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .forward import _logits_k_loop
    from .margin_math import (
        NT_RAW,
        NT_WEIGHTED,
        P_ALPHA,
        P_LAMBDA_N,
        P_M,
        P_S,
        _accumulate_rows,
        _add_scaled_rows,
        _gated_operands,
        _logit_grads,
        _nontarget_logits,
    )

    @triton.jit
    def _dw_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, PARAMS, LSE, GLSE, DW,
        B, S, D, slices, stride_xb, stride_xd, stride_wc, stride_wd,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, ONE_K: tl.constexpr, SCALE_OPS: tl.constexpr,
        EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
    ):  # fmt: skip
        """dW of the non-target columns, one program per (class tile, D slice).

        The program walks every row tile in order with a (BLOCK_N, BLOCK_OUT) accumulator,
        recomputes the logits with the final LSE, P_ij = g_i exp(f_ij - LSE_i), and adds

            dW_j += sum_i (P df/dd)_ij x_i  [+ sum_i (P df/de)_ij W_y(i)]       (GEMM)
            dW_j += (sum_i (P df/dnw)_ij / nw_j) W_j                           (epilogue)

        then writes dW once in W's dtype (contiguous rows; with Partial-FC ids, the sampled
        rows of a zeroed dW). No atomics: deterministic."""
        pid = tl.program_id(0)
        dslice = pid % slices
        col_tile = pid // slices
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < S
        if HAS_IDS:
            cls = tl.load(IDS + cols, mask=col_mask, other=0).to(tl.int64)
        else:
            cls = cols.to(tl.int64)
        cls32 = cls.to(tl.int32)
        nw = tl.load(NW + cols, mask=col_mask, other=1.0)
        rnw = 1.0 / nw
        s = tl.load(PARAMS + P_S)
        marg = tl.load(PARAMS + P_M)
        lambda_n = tl.load(PARAMS + P_LAMBDA_N)
        alpha = tl.load(PARAMS + P_ALPHA)
        op_dtype = X.dtype.element_ty
        kk_out = dslice.to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT).to(tl.int64)
        out_kmask = kk_out < D
        if ONE_K:
            # the class tile's W stays on chip for the whole row walk
            w_t = tl.load(W + cls[:, None] * stride_wc + kk_out[None, :] * stride_wd,
                          mask=col_mask[:, None] & out_kmask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                w_t = w_t.to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=ACC)
        acc_nw = tl.zeros((BLOCK_N,), dtype=ACC)
        for r0 in range(0, B, BLOCK_M):
            # Class-major tiles, (BLOCK_N classes, BLOCK_M rows): the logits come out of the
            # MMA with the classes as M (W's tile is the A operand, wgmma's 64-row side), and
            # P^T is then already the A operand of dW += P^T x (no transpose through shared
            # memory), as flash attention feeds P to its second product.
            rows = r0 + tl.arange(0, BLOCK_M)
            rows64 = rows.to(tl.int64)
            row_mask = rows < B
            y = tl.load(Y + rows, mask=row_mask, other=-1)
            y_safe = tl.where(y >= 0, y, 0).to(tl.int64)
            # labels held as int32 (classes < 2^31): these row vectors lie along the tile's
            # columns, where every thread holds many of them
            y32 = y.to(tl.int32)
            nx = tl.load(NX + rows, mask=row_mask, other=1.0)
            cy = tl.zeros_like(nx)
            ny = tl.zeros_like(nx) + 1.0
            if NT == NT_WEIGHTED:
                cy = tl.load(CY + rows, mask=row_mask, other=0.0)
                ny = tl.load(NY + rows, mask=row_mask, other=1.0)
            lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
            glse = tl.load(GLSE + rows, mask=row_mask, other=0.0)
            live = col_mask[:, None] & row_mask[None, :] & (cls32[:, None] != y32[None, :])
            x_ptrs = X + rows64[:, None] * stride_xb + kk_out[None, :] * stride_xd
            if EVEN_D:
                x_out = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            else:
                x_out = tl.load(x_ptrs, mask=row_mask[:, None] & out_kmask[None, :], other=0.0)
            if UPCAST:
                x_out = x_out.to(tl.float32)
            y_out = x_out
            if NT == NT_WEIGHTED:
                y_out = tl.load(W + y_safe[:, None] * stride_wc + kk_out[None, :] * stride_wd,
                                mask=row_mask[:, None] & out_kmask[None, :],
                                other=0.0)  # fmt: skip
                if UPCAST:
                    y_out = y_out.to(tl.float32)
            if ONE_K:
                d = tl.dot(w_t, tl.trans(x_out), input_precision=PRECISION, out_dtype=ACC)
                e = d
                if NT == NT_WEIGHTED:
                    e = tl.dot(w_t, tl.trans(y_out), input_precision=PRECISION, out_dtype=ACC)
            else:
                d, e = _logits_k_loop(
                    X, W, rows64, row_mask, cls, col_mask, y_safe, D,
                    stride_xb, stride_xd, stride_wc, stride_wd,
                    NT, ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, True,
                )  # fmt: skip
            nx2 = nx[None, :]
            rnx2 = (1.0 / nx)[None, :]
            rnw2 = rnw[:, None]
            cy2 = cy[None, :]
            rny2 = (1.0 / ny)[None, :]
            f = _nontarget_logits(d, e, nx2, rnx2, rnw2, cy2, rny2, s, marg, lambda_n, alpha, NT)
            # P = dL/df = g_i softmax_j(f) over the live columns, from the final LSE
            p = tl.where(live, glse[None, :] * tl.exp(f - lse[None, :]), 0.0)
            dd, de, _g_nx, _g_cy, _g_ny, g_nw = _logit_grads(
                p, d, e, tl.where(live, f, 0.0), nx2, rnx2, rnw2, cy2, rny2, s, lambda_n, alpha, NT
            )
            dd = tl.where(live, dd, 0.0)
            # rows without an upstream gradient (ignored, g = 0) add nothing: zero operands
            # (a condition independent of the logits: see _gated_operands)
            de = tl.where(live, de, 0.0)
            op, op_scale, op_y, op_y_scale = _gated_operands(
                dd, de, tl.max(tl.abs(glse), axis=0) > 0, op_dtype, UPCAST, SCALE_OPS
            )
            acc = _accumulate_rows(acc, op, op_scale, x_out, ACC, UPCAST, SCALE_OPS, PRECISION)
            if NT != NT_RAW:
                acc_nw += tl.sum(tl.where(live, g_nw, 0.0), axis=1)
            if NT == NT_WEIGHTED:
                acc = _accumulate_rows(
                    acc, op_y, op_y_scale, y_out, ACC, UPCAST, SCALE_OPS, PRECISION
                )
        if NT != NT_RAW:
            # column-norm chain term: dW_j += (dL/dnw_j / nw_j) W_j, W's tile reloaded (an L2
            # hit: the program read it when it started) rather than kept live across the walk
            coef = acc_nw / nw
            w_e = tl.load(W + cls[:, None] * stride_wc + kk_out[None, :] * stride_wd,
                          mask=col_mask[:, None] & out_kmask[None, :], other=0.0)  # fmt: skip
            if op_dtype == tl.bfloat16 or op_dtype == tl.float16:
                # as MMAs into the accumulator's own layout: an element-wise add would need
                # the tile in that layout as fp32, 128 more registers per thread (spills)
                acc = _add_scaled_rows(acc, coef, w_e, op_dtype, ACC, UPCAST, PRECISION,
                                       BLOCK_N)  # fmt: skip
            else:
                acc += coef[:, None] * w_e.to(ACC)
        # one owner per row of dW (Partial-FC ids are distinct): a plain store
        tl.store(DW + cls[:, None] * D + kk_out[None, :], acc.to(DW.dtype.element_ty),
                 mask=col_mask[:, None] & out_kmask[None, :])  # fmt: skip

    @triton.jit
    def _zero_unsampled_kernel(
        DW, SAMPLED, C, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Partial-FC: zeros in the rows of dW whose class was not sampled (SAMPLED[c] == 0).
        The dW owners write the sampled rows, so every row of dW is written once, in W's dtype,
        with no memset of the whole C x D gradient beforehand."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        in_range = rows < C
        sampled = tl.load(SAMPLED + rows, mask=in_range, other=1)
        write = in_range & (sampled == 0)
        zero = tl.zeros((BLOCK_R, BLOCK_D), dtype=DW.dtype.element_ty)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
            tl.store(DW + rows[:, None] * D + kk[None, :], zero,
                     mask=write[:, None] & (kk[None, :] < D))  # fmt: skip
