"""Forward kernels: row norms, the per-row target logit, and the online log-sum-exp over class
tiles that also accumulates the dX numerator.

All offsets where an index meets a stride are int64: a column-major W of C > 2^31 / D classes
(or any view with large strides) would wrap an int32 product.
"""

from __future__ import annotations

from ._compat import HAS_TRITON, tl, triton
from .config import RESCALE_SLACK_NATS

if HAS_TRITON:
    RESCALE_SLACK = tl.constexpr(RESCALE_SLACK_NATS)
    from .margin_math import (
        EPS_NORM,
        K_ARCFACE,
        K_COMBINED,
        K_COSFACE,
        K_LM_SOFTMAX,
        K_LSOFTMAX,
        K_SO_SOFTMAX,
        K_SPHEREFACE,
        K_W_SOFTMAX,
        NT_RAW,
        NT_WEIGHTED,
        P_ALPHA,
        P_COS_M,
        P_LAM,
        P_LAMBDA_N,
        P_LAMBDA_P,
        P_M,
        P_M1,
        P_M2,
        P_M3,
        P_S,
        P_SIN_M,
        _accumulate_rows,
        _arc_margin,
        _gated_operands,
        _logit_grads,
        _nontarget_logits,
        _psi_blend,
    )

    @triton.jit
    def _row_norm_kernel(
        SRC, IDS, OUT, n_rows, D, stride_r, stride_d,
        HAS_IDS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """OUT[r] = max(||SRC[ids[r]]||, eps) in the accumulation dtype."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        if HAS_IDS:
            src_rows = tl.load(IDS + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src_rows = rows.to(tl.int64)
        sq = tl.zeros((BLOCK_R,), dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
            v = tl.load(
                SRC + src_rows[:, None] * stride_r + kk[None, :] * stride_d,
                mask=row_mask[:, None] & (kk[None, :] < D),
                other=0.0,
            ).to(ACC)
            sq += tl.sum(v * v, axis=1)
        tl.store(OUT + rows, tl.maximum(tl.sqrt(sq), EPS_NORM), mask=row_mask)

    @triton.jit
    def _target_kernel(
        X, W, Y, NX, PARAMS, OUT, B, D, stride_xb, stride_xd, stride_wc, stride_wd,
        KIND: tl.constexpr, PSI_M: tl.constexpr, GRAD_MODE: tl.constexpr,
        OVERFLOW: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Per row: target logit t = T(c, nx, ny) of c = d/(nx ny), d = x . W_y, and the chain
        coefficients a = dt/dd, bx = dt/dnx, by = dt/dny (total derivatives through c).

        OUT rows 0..6 of (10, B): t, a, bx, by, c_y, ny, nx. Rows without a target (y < 0) get
        t = a = bx = by = 0; their c_y, ny are those of class 0 (what W-Softmax reads)."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        has = y >= 0
        y_safe = tl.where(has, y, 0).to(tl.int64)
        rows64 = rows.to(tl.int64)
        dot = tl.zeros((BLOCK_B,), dtype=ACC)
        sq = tl.zeros((BLOCK_B,), dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_mask[:, None] & (kk[None, :] < D)
            xv = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd, mask=mask,
                         other=0.0).to(ACC)  # fmt: skip
            wv = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd, mask=mask,
                         other=0.0).to(ACC)  # fmt: skip
            dot += tl.sum(xv * wv, axis=1)
            sq += tl.sum(wv * wv, axis=1)
        s = tl.load(PARAMS + P_S)
        marg = tl.load(PARAMS + P_M)
        lam = tl.load(PARAMS + P_LAM)
        lambda_p = tl.load(PARAMS + P_LAMBDA_P)
        nx = tl.load(NX + rows, mask=row_mask, other=1.0)
        ny = tl.maximum(tl.sqrt(sq), EPS_NORM)
        c = dot / (nx * ny)
        zero = tl.zeros((BLOCK_B,), dtype=ACC)
        # T(c, nx, ny) and its partials T_c, T_nx, T_ny
        t_nx = zero
        t_ny = zero
        if KIND == K_LSOFTMAX:  # lsoftmax: nx ny (lam c + psi(c)) / (1 + lam)
            blend, dblend = _psi_blend(c, lam, PARAMS, PSI_M)
            t = nx * ny * blend
            t_c = nx * ny * dblend
            t_nx = ny * blend
            t_ny = nx * blend
        elif KIND == K_SPHEREFACE:  # sphereface: nx (lam c + psi(c)) / (1 + lam)
            blend, dblend = _psi_blend(c, lam, PARAMS, PSI_M)
            t = nx * blend
            t_c = nx * dblend
            t_nx = blend
        elif KIND == K_COSFACE:  # cosface: s (c - m)
            t = s * (c - marg)
            t_c = zero + s
        elif KIND == K_ARCFACE or KIND == K_COMBINED:  # noqa: SIM109 (no `in` under jit)
            t, t_c = _arc_margin(
                c, s, tl.load(PARAMS + P_M1), tl.load(PARAMS + P_M2),
                tl.load(PARAMS + P_M3), tl.load(PARAMS + P_COS_M), tl.load(PARAMS + P_SIN_M),
                marg, KIND, GRAD_MODE, OVERFLOW,
            )  # fmt: skip
        elif KIND == K_SO_SOFTMAX:  # so_softmax: lambda_p (m^2 - (c - 1)^2)
            t = lambda_p * (marg * marg - (c - 1.0) * (c - 1.0))
            t_c = -2.0 * lambda_p * (c - 1.0)
        elif KIND == K_W_SOFTMAX:  # w_softmax: nx c
            t = nx * c
            t_c = nx
            t_nx = c
        elif KIND == K_LM_SOFTMAX:  # lm_softmax: s c
            t = s * c
            t_c = zero + s
        else:  # soft_margin: d - m
            t = nx * ny * c - marg
            t_c = nx * ny
            t_nx = ny * c
            t_ny = nx * c
        # chain rule through c = d / (nx ny)
        a = t_c / (nx * ny)
        bx = t_nx - t_c * c / nx
        by = t_ny - t_c * c / ny
        tl.store(OUT + rows, tl.where(has, t, 0.0), mask=row_mask)
        tl.store(OUT + B + rows, tl.where(has, a, 0.0), mask=row_mask)
        tl.store(OUT + 2 * B + rows, tl.where(has, bx, 0.0), mask=row_mask)
        tl.store(OUT + 3 * B + rows, tl.where(has, by, 0.0), mask=row_mask)
        tl.store(OUT + 4 * B + rows, c, mask=row_mask)
        tl.store(OUT + 5 * B + rows, ny, mask=row_mask)
        tl.store(OUT + 6 * B + rows, nx, mask=row_mask)

    @triton.jit
    def _logits_k_loop(
        X, W, rows64, row_mask, cls, col_mask, y_safe, D,
        stride_xb, stride_xd, stride_wc, stride_wd,
        NT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        CLASS_MAJOR: tl.constexpr,
    ):  # fmt: skip
        """Raw dots d = X[rows] W[cls]^T (and for W-Softmax e = W[y] W[cls]^T) over BLOCK_K
        steps of D, for tiles that do not hold all of D: (BLOCK_M, BLOCK_N), or with
        CLASS_MAJOR their transposes (BLOCK_N, BLOCK_M), W[cls] as the A operand."""
        if CLASS_MAJOR:
            d = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
            e = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        else:
            d = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            e = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            kmask = kk < D
            xt = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd,
                         mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            # W slice loaded transposed, (BLOCK_K, BLOCK_N): the B operand of the MMA
            wt = tl.load(W + cls[None, :] * stride_wc + kk[:, None] * stride_wd,
                         mask=kmask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            if CLASS_MAJOR:
                d = tl.dot(tl.trans(wt), tl.trans(xt), d, input_precision=PRECISION,
                           out_dtype=ACC)  # fmt: skip
            else:
                d = tl.dot(xt, wt, d, input_precision=PRECISION, out_dtype=ACC)
            if NT == NT_WEIGHTED:
                yt = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd,
                             mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
                if UPCAST:
                    yt = yt.to(tl.float32)
                if CLASS_MAJOR:
                    e = tl.dot(tl.trans(wt), tl.trans(yt), e, input_precision=PRECISION,
                               out_dtype=ACC)  # fmt: skip
                else:
                    e = tl.dot(yt, wt, e, input_precision=PRECISION, out_dtype=ACC)
        return d, e

    @triton.jit
    def _fwd_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, PARAMS, PART_M, PART_S, PART_NUM, PART_ROW,
        B, S, D, cols_per_split, row_blocks, stride_xb, stride_xd, stride_wc, stride_wd,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, NEEDS_NUM: tl.constexpr, ONE_K: tl.constexpr,
        SCALE_OPS: tl.constexpr, EVEN_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
    ):  # fmt: skip
        """Online log-sum-exp of the non-target logits of BLOCK_M rows over one class split,
        and (NEEDS_NUM) the split's dX numerator on one D slice.

        Grid: (row blocks x D slices, splits); axis 0 runs the row blocks of one split
        together, so each W tile is read from HBM once. With M the running row max:

            PART_M, PART_S[split, i]   = M_i, sum_j exp(f_ij - M_i)
            PART_NUM[split, 0, i, k]   = sum_j exp(f_ij - M_i) (df/dd)_ij W_jk      (dX)
            PART_NUM[split, 1, i, k]   = sum_j exp(f_ij - M_i) (df/de)_ij W_jk      (W-Softmax dW_y)
            PART_ROW[split, 0..2, i]   = sum_j exp(f_ij - M_i) df/d{nx, c_y, ny}_ij

        each rescaled by exp(M_old - M_new) when the reference point M moves (it lags the
        running max by at most RESCALE_SLACK nats), as flash attention rescales its output.
        ONE_K: all of D in one tile (x and W_y stay on chip across the class tiles, one load of
        the W tile feeds both GEMMs)."""
        pid0 = tl.program_id(0)
        rb = pid0 % row_blocks
        dslice = pid0 // row_blocks
        split = tl.program_id(1)
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        row_mask = rows < B
        rows_live = rb * BLOCK_M < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        y_safe = tl.where(y >= 0, y, 0).to(tl.int64)
        nx = tl.load(NX + rows, mask=row_mask, other=1.0)
        cy = tl.zeros_like(nx)
        ny = tl.zeros_like(nx) + 1.0
        if NT == NT_WEIGHTED:
            cy = tl.load(CY + rows, mask=row_mask, other=0.0)
            ny = tl.load(NY + rows, mask=row_mask, other=1.0)
        rnx = 1.0 / nx
        rny = 1.0 / ny
        s = tl.load(PARAMS + P_S)
        marg = tl.load(PARAMS + P_M)
        lambda_n = tl.load(PARAMS + P_LAMBDA_N)
        alpha = tl.load(PARAMS + P_ALPHA)
        op_dtype = W.dtype.element_ty
        kk_out = dslice.to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT).to(tl.int64)
        out_kmask = kk_out < D
        if ONE_K:
            # x (and W_y) of the row block stay on chip across all class tiles
            x_t = tl.load(X + rows64[:, None] * stride_xb + kk_out[None, :] * stride_xd,
                          mask=row_mask[:, None] & out_kmask[None, :], other=0.0)  # fmt: skip
            wy_t = x_t
            if NT == NT_WEIGHTED:
                wy_t = tl.load(W + y_safe[:, None] * stride_wc + kk_out[None, :] * stride_wd,
                               mask=row_mask[:, None] & out_kmask[None, :],
                               other=0.0)  # fmt: skip
            if UPCAST:
                x_t = x_t.to(tl.float32)
                wy_t = wy_t.to(tl.float32)
        col_start = split * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, S)
        # finite start, so that a fully masked tile rescales by exp(0), never exp(nan); the
        # first live tile always moves it
        run_max = tl.full((BLOCK_M,), -1e30, ACC)
        run_sum = tl.zeros((BLOCK_M,), dtype=ACC)
        r_nx = tl.zeros((BLOCK_M,), dtype=ACC)
        r_cy = tl.zeros((BLOCK_M,), dtype=ACC)
        r_ny = tl.zeros((BLOCK_M,), dtype=ACC)
        acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=ACC)
        acc_y = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=ACC)
        y32 = y.to(tl.int32)  # classes < 2^31: int32 compares in the per-logit mask
        for c0 in range(col_start, col_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_mask = cols < col_end
            if HAS_IDS:
                cls = tl.load(IDS + cols, mask=col_mask, other=0).to(tl.int64)
                cls32 = cls.to(tl.int32)
            else:
                cls = cols.to(tl.int64)
                cls32 = cols
            nw = tl.load(NW + cols, mask=col_mask, other=1.0)
            # a column takes part unless it is padding or the row's own target
            live = row_mask[:, None] & col_mask[None, :] & (cls32[None, :] != y32[:, None])
            if ONE_K:
                w_ptrs = W + cls[:, None] * stride_wc + kk_out[None, :] * stride_wd
                if EVEN_D:
                    w_t = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
                else:
                    w_t = tl.load(w_ptrs, mask=col_mask[:, None] & out_kmask[None, :], other=0.0)
                if UPCAST:
                    w_t = w_t.to(tl.float32)
                d = tl.dot(x_t, tl.trans(w_t), input_precision=PRECISION, out_dtype=ACC)
                e = d
                if NT == NT_WEIGHTED:
                    e = tl.dot(wy_t, tl.trans(w_t), input_precision=PRECISION, out_dtype=ACC)
            else:
                d, e = _logits_k_loop(
                    X, W, rows64, row_mask, cls, col_mask, y_safe, D,
                    stride_xb, stride_xd, stride_wc, stride_wd,
                    NT, ACC, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, False,
                )  # fmt: skip
            nx2 = nx[:, None]
            rnx2 = rnx[:, None]
            rnw2 = (1.0 / nw)[None, :]
            f = _nontarget_logits(d, e, nx2, rnx2, rnw2, cy[:, None], rny[:, None], s, marg,
                                  lambda_n, alpha, NT)  # fmt: skip
            # the target column is masked out: LSE over j != y only
            f = tl.where(live, f, float("-inf"))
            # The reference point M_i only has to keep exp(f - M_i) finite, not to be the max:
            # it moves only when a logit passes it by more than RESCALE_SLACK nats (p <= e^8,
            # exact either way). After the first tiles it rarely moves, and a row whose
            # reference stays is rescaled by exactly 1: its sums take no rounding from rescales.
            tile_max = tl.max(f, axis=1)
            new_max = tl.where(tile_max > run_max + RESCALE_SLACK, tile_max, run_max)
            rescale = tl.exp(run_max - new_max)
            p = tl.exp(f - new_max[:, None])  # 0 on masked columns
            run_sum = run_sum * rescale + tl.sum(p, axis=1)
            if NEEDS_NUM:
                # f on the masked columns is -inf (p = 0 there): pass 0 so that no 0 * inf
                dd, de, g_nx, g_cy, g_ny, _g_nw = _logit_grads(
                    p, d, e, tl.where(live, f, 0.0), nx2, rnx2, rnw2, cy[:, None], rny[:, None],
                    s, lambda_n, alpha, NT,
                )  # fmt: skip
                dd = tl.where(live, dd, 0.0)
                de = tl.where(live, de, 0.0)
                if ONE_K:
                    w_out = w_t
                else:
                    w_out = tl.load(W + cls[:, None] * stride_wc + kk_out[None, :] * stride_wd,
                                    mask=col_mask[:, None] & out_kmask[None, :],
                                    other=0.0)  # fmt: skip
                # rows_live holds in every launched program (its row block has rows): the
                # branches exist so that the logits reach the second MMA only through their
                # yields (see _gated_operands: no chained-dot layout, no duplicated logits MMA)
                if rows_live:
                    # flash-attention rescale of the numerators (by exactly 1 on the rows whose
                    # reference did not move; a branch that skips it made Triton 3.6 spill)
                    acc = acc * rescale[:, None]
                    if NT == NT_WEIGHTED:
                        acc_y = acc_y * rescale[:, None]
                op, op_scale, op_y, op_y_scale = _gated_operands(
                    dd, de, rows_live, op_dtype, UPCAST, SCALE_OPS
                )
                # dX numerator: sum_j P_ij (df/dd)_ij W_j
                acc = _accumulate_rows(acc, op, op_scale, w_out, ACC, UPCAST, SCALE_OPS, PRECISION)
                if NT != NT_RAW:
                    r_nx = r_nx * rescale + tl.sum(tl.where(live, g_nx, 0.0), axis=1)
                if NT == NT_WEIGHTED:
                    acc_y = _accumulate_rows(
                        acc_y, op_y, op_y_scale, w_out, ACC, UPCAST, SCALE_OPS, PRECISION
                    )
                    r_cy = r_cy * rescale + tl.sum(tl.where(live, g_cy, 0.0), axis=1)
                    r_ny = r_ny * rescale + tl.sum(tl.where(live, g_ny, 0.0), axis=1)
            run_max = new_max
        split64 = split.to(tl.int64)
        first = dslice == 0
        out = split64 * B + rows64
        tl.store(PART_M + out, run_max, mask=row_mask & first)
        tl.store(PART_S + out, run_sum, mask=row_mask & first)
        if NEEDS_NUM:
            row_out = split64 * 3 * B + rows64
            tl.store(PART_ROW + row_out, r_nx, mask=row_mask & first)
            tl.store(PART_ROW + row_out + B, r_cy, mask=row_mask & first)
            tl.store(PART_ROW + row_out + 2 * B, r_ny, mask=row_mask & first)
            out_mask = row_mask[:, None] & out_kmask[None, :]
            if NT == NT_WEIGHTED:
                num_rows = split64 * 2 * B + rows64
                tl.store(PART_NUM + (num_rows + B)[:, None] * D + kk_out[None, :], acc_y,
                         mask=out_mask)  # fmt: skip
            else:
                num_rows = split64 * B + rows64
            tl.store(PART_NUM + num_rows[:, None] * D + kk_out[None, :], acc, mask=out_mask)
