"""Triton backend: fused margin softmax that never materialises the (B, C) logits.

Layering, bottom to top:

* ``@triton.jit`` kernels — row norms, the per-row target logit, the forward (online log-sum-exp
  over class tiles, split over C), and the backward (one fused kernel with atomics, or two
  deterministic kernels that own their output rows);
* launchers (``_forward`` / ``_backward``) — allocate, pick blocks and grids, merge split partials;
* two ``torch.library.custom_op`` ops, ``margin_kernels::triton_lse_fwd`` and
  ``margin_kernels::triton_lse_bwd``, tied together by ``register_autograd`` (compile-safe:
  ``torch.compile(fullgraph=True)`` traces them as opaque ops);
* :func:`lse_parts`, the backend contract of :func:`margin_kernels.reference.lse_parts`.

Math (notation of DESIGN.md section 2). Every logit is a function of the raw dot
``d_ij = x_i . W_j`` and of the norms ``nx_i = max(||x_i||, eps)``, ``nw_j = max(||W_j||, eps)``
(eps = 1e-12, ``spec.NORM_EPS``; the arc derivative's sin(theta) floor is ``spec.SIN2_EPS`` =
1e-6); W-Softmax also reads ``c_iy`` and ``e_ij = W_y . W_j``. The GEMMs run on the raw x and W
(no normalised copies); the norms enter the epilogue. With ``P_ij = g_i exp(f_ij - LSE_i)``
(``g = dL/dLSE``), the backward is

    dX_i = sum_j (P df/dd)_ij W_j + (sum_j P df/dnx)_ij x_i / nx_i    [+ target terms]
    dW_j = sum_i (P df/dd)_ij x_i + (sum_i P df/dnw)_ij W_j / nw_j    [+ target terms]

so the kernels produce the two GEMM-shaped sums and the row/column scalars; an O(B D + C D) pass
adds the norm terms and the target rows. The backward recomputes the logits tile by tile from the
saved LSE; nothing of size B x C is ever allocated.

Under ``TRITON_INTERPRET=1`` (set before importing this module) the kernels run on CPU tensors;
bf16 operands are then upcast after loading because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..spec import KIND_IDS, MarginSpec

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # importing margin_kernels never fails for lack of Triton
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAS_TRITON and INTERPRET:
    from ._interpreter_compat import fix_scalar_index

    fix_scalar_index()  # Triton 3.6's interpreter under NumPy >= 2.4: see that module

__all__ = ["HAS_TRITON", "INTERPRET", "lse_parts", "unavailable_reason"]

# Non-target logit families: every kind's f_ij is one of these functions of (d, nx, nw).
NT_RAW = 0  # f = d                                   (lsoftmax, soft_margin)
NT_XNORM = 1  # f = ||x|| c = d / nw                  (sphereface)
NT_SCALED = 2  # f = s c                              (cosface, arcface, combined, lm_softmax)
NT_SO = 3  # f = lambda_n (c^2 - m^2)                 (so_softmax)
NT_W = 4  # f = nx (alpha c_iy + c) / sqrt(1 + alpha^2 + 2 alpha w_y.w_j)   (w_softmax)

_NONTARGET_FAMILY = {
    "lsoftmax": NT_RAW,
    "soft_margin": NT_RAW,
    "sphereface": NT_XNORM,
    "cosface": NT_SCALED,
    "arcface": NT_SCALED,
    "combined": NT_SCALED,
    "lm_softmax": NT_SCALED,
    "so_softmax": NT_SO,
    "w_softmax": NT_W,
}
_KIND_NAMES = {v: k for k, v in KIND_IDS.items()}


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


if HAS_TRITON:

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
            kk = k0 + tl.arange(0, BLOCK_D)
            v = tl.load(
                SRC + src_rows[:, None] * stride_r + kk[None, :] * stride_d,
                mask=row_mask[:, None] & (kk[None, :] < D),
                other=0.0,
            ).to(ACC)
            sq += tl.sum(v * v, axis=1)
        tl.store(OUT + rows, tl.maximum(tl.sqrt(sq), 1e-12), mask=row_mask)

    @triton.jit
    def _acos(x):
        """arccos on [-1, 1] to ~1 ulp of float32, without libdevice (which the interpreter
        lacks): asin by its odd minimax polynomial on [0, 0.5], and the half-angle identity
        asin(a) = pi/2 - 2 asin(sqrt((1 - a)/2)) above 0.5."""
        ax = tl.abs(x)
        big = ax > 0.5
        z = tl.where(big, 0.5 * (1.0 - ax), ax * ax)
        r = tl.where(big, tl.sqrt(z), ax)
        poly = (
            ((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2
        ) * z + 1.6666752422e-1
        asin_r = r + r * z * poly
        asin_ax = tl.where(big, 1.5707963267948966 - 2.0 * asin_r, asin_r)
        # acos(x) = pi/2 - asin(x), asin odd
        return tl.where(x >= 0, 1.5707963267948966 - asin_ax, 1.5707963267948966 + asin_ax)

    @triton.jit
    def _psi_blend(c, lam, th1, th2, th3, PSI_M: tl.constexpr):
        """(lam c + psi_m(c)) / (1 + lam) and its derivative in c. psi_m = (-1)^k T_m(c) - 2k with
        k = number of thresholds cos(j pi/m), j = 1..m-1, that c lies below (sign tests)."""
        c2 = c * c
        if PSI_M == 1:
            cheb = c
            dcheb = tl.full(c.shape, 1.0, c.dtype)
            k = tl.zeros(c.shape, c.dtype)
        elif PSI_M == 2:
            cheb = 2.0 * c2 - 1.0  # T2
            dcheb = 4.0 * c
            k = (c < th1).to(c.dtype)
        elif PSI_M == 3:
            cheb = (4.0 * c2 - 3.0) * c  # T3
            dcheb = 12.0 * c2 - 3.0
            k = (c < th1).to(c.dtype) + (c < th2).to(c.dtype)
        else:
            cheb = (8.0 * c2 - 8.0) * c2 + 1.0  # T4
            dcheb = (32.0 * c2 - 16.0) * c
            k = (c < th1).to(c.dtype) + (c < th2).to(c.dtype) + (c < th3).to(c.dtype)
        odd = (k - 2.0 * tl.floor(k * 0.5)) == 1.0
        sign = tl.where(odd, -1.0, 1.0)
        value = (lam * c + sign * cheb - 2.0 * k) / (1.0 + lam)
        deriv = (lam + sign * dcheb) / (1.0 + lam)  # k is piecewise constant
        return value, deriv

    @triton.jit
    def _arc_margin(
        c, s, m1, m2, m3, cos_m, sin_m, marg,
        KIND: tl.constexpr, GRAD_MODE: tl.constexpr, OVERFLOW: tl.constexpr,
    ):  # fmt: skip
        """s * margin-cosine and its derivative in c for arcface (KIND 3) and combined (4)."""
        cc = tl.minimum(tl.maximum(c, -1.0), 1.0)
        # guarded sin(theta) for the derivative only: finite at |c| -> 1
        sin_guard = tl.sqrt(tl.maximum(1.0 - c * c, 1e-6))
        if KIND == 3:
            sin_theta = tl.sqrt(tl.maximum(1.0 - cc * cc, 0.0))
            value = cc * cos_m - sin_theta * sin_m  # cos(theta + m)
            deriv = cos_m + sin_m * c / sin_guard
            if OVERFLOW == 0:
                plain = c > -cos_m  # theta <= pi - m; beyond it c - m sin m keeps T monotone
                value = tl.where(plain, value, c - marg * sin_m)
                deriv = tl.where(plain, deriv, 1.0)
            elif OVERFLOW == 2:
                plain = c > 0.0  # "easy margin": the margin only where c > 0
                value = tl.where(plain, value, c)
                deriv = tl.where(plain, deriv, 1.0)
        else:
            angle = m1 * _acos(cc) + m2
            value = tl.cos(angle) - m3  # cos(m1 theta + m2) - m3
            deriv = m1 * tl.sin(angle) / sin_guard
        if GRAD_MODE == 1:
            deriv = tl.full(c.shape, 1.0, c.dtype)  # straight-through: dT/dc = s
        return s * value, s * deriv

    @triton.jit
    def _target_kernel(
        X, W, Y, NX, OUT, B, D, stride_xb, stride_xd, stride_wc, stride_wd,
        s, marg, m1, m2, m3, lam, lambda_p, cos_m, sin_m, th1, th2, th3,
        KIND: tl.constexpr, PSI_M: tl.constexpr, GRAD_MODE: tl.constexpr,
        OVERFLOW: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Per row: target logit t = T(c, nx, ny) of c = d/(nx ny), d = x . W_y, and the chain
        coefficients a = dt/dd, bx = dt/dnx, by = dt/dny (total derivatives through c).

        OUT is (7, B): t, a, bx, by, c_y, ny, nx. Rows without a target (y < 0) get
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
            kk = k0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (kk[None, :] < D)
            xv = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd, mask=mask,
                         other=0.0).to(ACC)  # fmt: skip
            wv = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd, mask=mask,
                         other=0.0).to(ACC)  # fmt: skip
            dot += tl.sum(xv * wv, axis=1)
            sq += tl.sum(wv * wv, axis=1)
        nx = tl.load(NX + rows, mask=row_mask, other=1.0)
        ny = tl.maximum(tl.sqrt(sq), 1e-12)
        c = dot / (nx * ny)
        zero = tl.zeros((BLOCK_B,), dtype=ACC)
        # T(c, nx, ny) and its partials T_c, T_nx, T_ny
        t_nx = zero
        t_ny = zero
        if KIND == 0:  # lsoftmax: nx ny (lam c + psi(c)) / (1 + lam)
            blend, dblend = _psi_blend(c, lam, th1, th2, th3, PSI_M)
            t = nx * ny * blend
            t_c = nx * ny * dblend
            t_nx = ny * blend
            t_ny = nx * blend
        elif KIND == 1:  # sphereface: nx (lam c + psi(c)) / (1 + lam)
            blend, dblend = _psi_blend(c, lam, th1, th2, th3, PSI_M)
            t = nx * blend
            t_c = nx * dblend
            t_nx = blend
        elif KIND == 2:  # cosface: s (c - m)
            t = s * (c - marg)
            t_c = zero + s
        elif KIND == 3 or KIND == 4:  # arcface / combined
            t, t_c = _arc_margin(c, s, m1, m2, m3, cos_m, sin_m, marg, KIND, GRAD_MODE, OVERFLOW)
        elif KIND == 5:  # so_softmax: lambda_p (m^2 - (c - 1)^2)
            t = lambda_p * (marg * marg - (c - 1.0) * (c - 1.0))
            t_c = -2.0 * lambda_p * (c - 1.0)
        elif KIND == 6:  # w_softmax: nx c
            t = nx * c
            t_c = nx
            t_nx = c
        elif KIND == 7:  # lm_softmax: s c
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
    def _dots_tile(
        X, W, rows64, row_mask, cls, col_mask, y_safe, D,
        stride_xb, stride_xd, stride_wc, stride_wd,
        NT: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """(BLOCK_B, BLOCK_C) raw dots d = X[rows] W[cls]^T (and for W-Softmax e = W[y] W[cls]^T),
        accumulated in ACC over BLOCK_D slices of the feature dimension."""
        d = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
        e = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            kmask = kk < D
            xt = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd,
                         mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            # W slice loaded transposed, (BLOCK_D, BLOCK_C): the B operand of the MMA
            wt = tl.load(W + cls[None, :] * stride_wc + kk[:, None] * stride_wd,
                         mask=kmask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            d = tl.dot(xt, wt, d, input_precision=PRECISION, out_dtype=ACC)
            if NT == 4:
                yt = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd,
                             mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
                if UPCAST:
                    yt = yt.to(tl.float32)
                e = tl.dot(yt, wt, e, input_precision=PRECISION, out_dtype=ACC)
        return d, e

    @triton.jit
    def _nontarget_logits(d, e, nx, nw, cy, ny, s, marg, lambda_n, alpha, NT: tl.constexpr):
        """f_ij from the raw dot d; nx, cy, ny are (BLOCK_B, 1), nw is (1, BLOCK_C)."""
        if NT == 0:
            f = d  # raw logit W_j . x
        elif NT == 1:
            f = d / nw  # ||x|| c = x . W_j / ||W_j||
        elif NT == 2:
            f = s * (d / (nx * nw))  # s c
        elif NT == 3:
            c = d / (nx * nw)
            f = lambda_n * (c * c - marg * marg)
        else:
            c = d / (nx * nw)
            g = e / (ny * nw)  # w_y . w_j of unit vectors
            q = tl.sqrt(tl.maximum(1.0 + alpha * alpha + 2.0 * alpha * g, 1e-12))
            f = nx * (alpha * cy + c) / q
        return f

    @triton.jit
    def _tile_setup(
        Y, NX, CY, NY, IDS, NW, rows, cols, B, col_end, NT: tl.constexpr, HAS_IDS: tl.constexpr
    ):
        """Row and column data of one (rows, cols) tile."""
        row_mask = rows < B
        col_mask = cols < col_end
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        nx = tl.load(NX + rows, mask=row_mask, other=1.0)
        cy = tl.zeros_like(nx)
        ny = tl.zeros_like(nx) + 1.0
        if NT == 4:
            cy = tl.load(CY + rows, mask=row_mask, other=0.0)
            ny = tl.load(NY + rows, mask=row_mask, other=1.0)
        if HAS_IDS:
            cls = tl.load(IDS + cols, mask=col_mask, other=0).to(tl.int64)
        else:
            cls = cols.to(tl.int64)
        nw = tl.load(NW + cols, mask=col_mask, other=1.0)
        # a column takes part unless it is padding or the row's own target
        live = row_mask[:, None] & col_mask[None, :] & (cls[None, :] != y[:, None])
        y_safe = tl.where(y >= 0, y, 0).to(tl.int64)
        return row_mask, col_mask, y_safe, nx, cy, ny, cls, nw, live

    @triton.jit
    def _fwd_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, PART_M, PART_S,
        B, S, D, cols_per_split, stride_xb, stride_xd, stride_wc, stride_wd,
        s, marg, lambda_n, alpha,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Online LSE of the non-target logits of BLOCK_B rows over one split of the columns.
        Writes the split's running max and sum of exp(f - max): PART_M/PART_S[split, row]."""
        pid_b = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        rows64 = rows.to(tl.int64)
        col_start = split * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, S)
        # finite start, so that a fully masked tile rescales by exp(0), never exp(nan)
        run_max = tl.full((BLOCK_B,), -1e30, ACC)
        run_sum = tl.zeros((BLOCK_B,), dtype=ACC)
        for c0 in range(col_start, col_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            row_mask, col_mask, y_safe, nx, cy, ny, cls, nw, live = _tile_setup(
                Y, NX, CY, NY, IDS, NW, rows, cols, B, col_end, NT, HAS_IDS
            )
            d, e = _dots_tile(
                X, W, rows64, row_mask, cls, col_mask, y_safe, D,
                stride_xb, stride_xd, stride_wc, stride_wd,
                NT, ACC, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
            )  # fmt: skip
            f = _nontarget_logits(
                d, e, nx[:, None], nw[None, :], cy[:, None], ny[:, None],
                s, marg, lambda_n, alpha, NT,
            )  # fmt: skip
            # the target column is masked out: LSE over j != y only
            f = tl.where(live, f, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(f, axis=1))
            # sum exp(f - M) rescaled to the new running max M
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
                tl.exp(f - new_max[:, None]), axis=1
            )
            run_max = new_max
        out = split.to(tl.int64) * B + rows
        tl.store(PART_M + out, run_max, mask=rows < B)
        tl.store(PART_S + out, run_sum, mask=rows < B)

    @triton.jit
    def _dlogits_tile(
        X, W, rows, cols, B, col_end, D, Y, IDS, NX, NW, CY, NY, LSE, GLSE,
        stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Recompute one tile and return the loss's derivatives with respect to its pieces:
        dd = dL/dd (BLOCK_B, BLOCK_C); de = dL/de (W-Softmax); row sums dL/dnx, dL/dc_y,
        dL/dny (BLOCK_B,); column sums dL/dnw (BLOCK_C,); plus the tile's indices."""
        row_mask, col_mask, y_safe, nx, cy, ny, cls, nw, live = _tile_setup(
            Y, NX, CY, NY, IDS, NW, rows, cols, B, col_end, NT, HAS_IDS
        )
        rows64 = rows.to(tl.int64)
        d, e = _dots_tile(
            X, W, rows64, row_mask, cls, col_mask, y_safe, D,
            stride_xb, stride_xd, stride_wc, stride_wd,
            NT, ACC, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
        )  # fmt: skip
        nx2 = nx[:, None]
        nw2 = nw[None, :]
        cy2 = cy[:, None]
        ny2 = ny[:, None]
        f = _nontarget_logits(d, e, nx2, nw2, cy2, ny2, s, marg, lambda_n, alpha, NT)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        glse = tl.load(GLSE + rows, mask=row_mask, other=0.0)
        # P = dL/df = g_i softmax_j(f) over the live columns
        p = tl.where(live, glse[:, None] * tl.exp(f - lse[:, None]), 0.0)
        zero = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
        de = zero
        d_nx = zero
        d_nw = zero
        d_cy = zero
        d_ny = zero
        if NT == 0:
            dd = p  # df/dd = 1
        elif NT == 1:
            dd = p / nw2  # f = d / nw
            d_nw = -p * f / nw2
        elif NT == 2 or NT == 3:
            c = d / (nx2 * nw2)
            h = p * s  # f = s c
            if NT == 3:
                h = p * 2.0 * lambda_n * c  # f = lambda_n (c^2 - m^2)
            dd = h / (nx2 * nw2)  # c = d / (nx nw)
            d_nx = -h * c / nx2
            d_nw = -h * c / nw2
        else:
            c = d / (nx2 * nw2)
            g = e / (ny2 * nw2)
            q = tl.sqrt(tl.maximum(1.0 + alpha * alpha + 2.0 * alpha * g, 1e-12))
            # f = (alpha nx c_y + d / nw) / q,  q = sqrt(1 + alpha^2 + 2 alpha e / (ny nw))
            dq = -p * f * alpha / (q * q)  # dL/dg through q
            dd = p / (nw2 * q)
            de = dq / (ny2 * nw2)
            d_nw = -p * d / (nw2 * nw2 * q) - dq * g / nw2
            d_nx = p * alpha * cy2 / q
            d_cy = p * alpha * nx2 / q
            d_ny = -dq * g / ny2
        return (
            dd, de, tl.sum(d_nx, axis=1), tl.sum(d_cy, axis=1), tl.sum(d_ny, axis=1),
            tl.sum(d_nw, axis=0), rows64, row_mask, cls, col_mask, y_safe,
        )  # fmt: skip

    @triton.jit
    def _accumulate(ptr, value, mask):
        # relaxed ordering: a pure sum that nothing reads before the kernel ends
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")

    @triton.jit
    def _bwd_fused_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, LSE, GLSE, DX, DW, DWY, ROWSC, COLSC,
        B, S, D, stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per (row tile, column tile): recompute the tile once, then add its share
        of dX (B, D), dW (S, D), dWY (B, D) and the row/column scalars with atomics. Three GEMMs'
        worth of work in all; the order of the atomic adds is not fixed (not bitwise
        deterministic)."""
        # column tiles on grid axis 0: C / BLOCK_C can exceed the 65535 limit of axes 1 and 2
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        dd, de, r_nx, r_cy, r_ny, c_nw, rows64, row_mask, cls, col_mask, y_safe = _dlogits_tile(
            X, W, rows, cols, B, S, D, Y, IDS, NX, NW, CY, NY, LSE, GLSE,
            stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
            NT, HAS_IDS, ACC, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
        )  # fmt: skip
        cols64 = cols.to(tl.int64)
        if NT != 0:
            _accumulate(ROWSC + rows64, r_nx, mask=row_mask)
            _accumulate(COLSC + cols64, c_nw, mask=col_mask)
        if NT == 4:
            _accumulate(ROWSC + B + rows64, r_cy, mask=row_mask)
            _accumulate(ROWSC + 2 * B + rows64, r_ny, mask=row_mask)
        # second-GEMM operands in the storage dtype (tensor cores), accumulated in ACC
        dd_op = dd.to(X.dtype.element_ty)
        de_op = de.to(X.dtype.element_ty)
        if UPCAST:
            dd_op = dd
            de_op = de
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            kmask = kk < D
            wt = tl.load(W + cls[:, None] * stride_wc + kk[None, :] * stride_wd,
                         mask=col_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            xt = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd,
                         mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                wt = wt.to(tl.float32)
                xt = xt.to(tl.float32)
            # dX_i += sum_j dd_ij W_j ;  dW_j += sum_i dd_ij x_i
            dx = tl.dot(dd_op, wt, input_precision=PRECISION, out_dtype=ACC)
            dw = tl.dot(tl.trans(dd_op), xt, input_precision=PRECISION, out_dtype=ACC)
            _accumulate(DX + rows64[:, None] * D + kk[None, :], dx,
                          mask=row_mask[:, None] & kmask[None, :])  # fmt: skip
            if NT == 4:
                yt = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd,
                             mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
                if UPCAST:
                    yt = yt.to(tl.float32)
                # e_ij = W_y . W_j: dW_y += sum_j de_ij W_j ;  dW_j += sum_i de_ij W_y
                dwy = tl.dot(de_op, wt, input_precision=PRECISION, out_dtype=ACC)
                _accumulate(DWY + rows64[:, None] * D + kk[None, :], dwy,
                              mask=row_mask[:, None] & kmask[None, :])  # fmt: skip
                dw += tl.dot(tl.trans(de_op), yt, input_precision=PRECISION, out_dtype=ACC)
            _accumulate(DW + cols64[:, None] * D + kk[None, :], dw,
                          mask=col_mask[:, None] & kmask[None, :])  # fmt: skip

    @triton.jit
    def _bwd_rows_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, LSE, GLSE, DX, DWY, ROWSC,
        B, S, D, stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
    ):  # fmt: skip
        """Deterministic dX: one program per (row tile, feature slice of BLOCK_OUT) walks all
        columns in order and owns its outputs (plain stores, no atomics). Each feature slice
        recomputes the logits, so this costs D / BLOCK_OUT extra GEMMs over the fused kernel."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        kk = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        kmask = kk < D
        acc_dx = tl.zeros((BLOCK_B, BLOCK_OUT), dtype=ACC)
        acc_dwy = tl.zeros((BLOCK_B, BLOCK_OUT), dtype=ACC)
        acc_nx = tl.zeros((BLOCK_B,), dtype=ACC)
        acc_cy = tl.zeros((BLOCK_B,), dtype=ACC)
        acc_ny = tl.zeros((BLOCK_B,), dtype=ACC)
        for c0 in range(0, S, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            dd, de, r_nx, r_cy, r_ny, _c_nw, rows64, row_mask, cls, col_mask, _y_safe = (
                _dlogits_tile(
                    X, W, rows, cols, B, S, D, Y, IDS, NX, NW, CY, NY, LSE, GLSE,
                    stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
                    NT, HAS_IDS, ACC, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
                )
            )  # fmt: skip
            acc_nx += r_nx
            acc_cy += r_cy
            acc_ny += r_ny
            wt = tl.load(W + cls[:, None] * stride_wc + kk[None, :] * stride_wd,
                         mask=col_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                wt = wt.to(tl.float32)
                dd_op = dd
                de_op = de
            else:
                dd_op = dd.to(W.dtype.element_ty)
                de_op = de.to(W.dtype.element_ty)
            acc_dx = tl.dot(dd_op, wt, acc_dx, input_precision=PRECISION, out_dtype=ACC)
            if NT == 4:
                acc_dwy = tl.dot(de_op, wt, acc_dwy, input_precision=PRECISION, out_dtype=ACC)
        rows64 = rows.to(tl.int64)
        row_mask = rows < B
        out_mask = row_mask[:, None] & kmask[None, :]
        tl.store(DX + rows64[:, None] * D + kk[None, :], acc_dx, mask=out_mask)
        if NT == 4:
            tl.store(DWY + rows64[:, None] * D + kk[None, :], acc_dwy, mask=out_mask)
        first = tl.program_id(1) == 0
        if NT != 0:
            tl.store(ROWSC + rows64, acc_nx, mask=row_mask & first)
        if NT == 4:
            tl.store(ROWSC + B + rows64, acc_cy, mask=row_mask & first)
            tl.store(ROWSC + 2 * B + rows64, acc_ny, mask=row_mask & first)

    @triton.jit
    def _bwd_cols_kernel(
        X, W, Y, IDS, NX, NW, CY, NY, LSE, GLSE, DW, COLSC,
        B, S, D, stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
        NT: tl.constexpr, HAS_IDS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
    ):  # fmt: skip
        """Deterministic dW: one program per (column tile, feature slice) walks all rows in
        order and owns its (S, D) outputs."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        kk = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        kmask = kk < D
        acc_dw = tl.zeros((BLOCK_C, BLOCK_OUT), dtype=ACC)
        acc_nw = tl.zeros((BLOCK_C,), dtype=ACC)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            dd, de, _r_nx, _r_cy, _r_ny, c_nw, rows64, row_mask, _cls, col_mask, y_safe = (
                _dlogits_tile(
                    X, W, rows, cols, B, S, D, Y, IDS, NX, NW, CY, NY, LSE, GLSE,
                    stride_xb, stride_xd, stride_wc, stride_wd, s, marg, lambda_n, alpha,
                    NT, HAS_IDS, ACC, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
                )
            )  # fmt: skip
            acc_nw += c_nw
            xt = tl.load(X + rows64[:, None] * stride_xb + kk[None, :] * stride_xd,
                         mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                xt = xt.to(tl.float32)
                dd_op = dd
                de_op = de
            else:
                dd_op = dd.to(X.dtype.element_ty)
                de_op = de.to(X.dtype.element_ty)
            acc_dw = tl.dot(tl.trans(dd_op), xt, acc_dw, input_precision=PRECISION,
                            out_dtype=ACC)  # fmt: skip
            if NT == 4:
                yt = tl.load(W + y_safe[:, None] * stride_wc + kk[None, :] * stride_wd,
                             mask=row_mask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
                if UPCAST:
                    yt = yt.to(tl.float32)
                acc_dw = tl.dot(tl.trans(de_op), yt, acc_dw, input_precision=PRECISION,
                                out_dtype=ACC)  # fmt: skip
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < S
        cols64 = cols.to(tl.int64)
        tl.store(DW + cols64[:, None] * D + kk[None, :], acc_dw,
                 mask=col_mask[:, None] & kmask[None, :])  # fmt: skip
        if NT != 0:
            tl.store(COLSC + cols64, acc_nw, mask=col_mask & (tl.program_id(1) == 0))

    @triton.jit
    def _add_scaled_rows_kernel(
        ACC_BUF, SRC, IDS, SCALE, n_rows, D, stride_r, stride_d,
        HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """ACC_BUF[r] += SCALE[r] * SRC[ids[r]]: the column-norm term of dW, one pass over
        (S, D) without a float32 copy of W."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        if HAS_IDS:
            src_rows = tl.load(IDS + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src_rows = rows.to(tl.int64)
        scale = tl.load(SCALE + rows, mask=row_mask, other=0.0)
        rows64 = rows.to(tl.int64)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (kk[None, :] < D)
            src = tl.load(SRC + src_rows[:, None] * stride_r + kk[None, :] * stride_d, mask=mask,
                          other=0.0)  # fmt: skip
            ptr = ACC_BUF + rows64[:, None] * D + kk[None, :]
            acc = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, acc + scale[:, None] * src.to(acc.dtype), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


# Every launch states the full per-thread register budget. Left to itself, ptxas 13 (as Triton
# drives it) caps some of these kernels at 96-128 registers to raise occupancy and spills to
# local memory instead; the tiles below are sized to fit in 255 without spilling.
MAX_REGISTERS = 255


@dataclass(frozen=True)
class _Tile:
    """Tile of one kernel launch: rows x columns x K slice (and, for the deterministic backward,
    the feature slice each program owns), warps and software-pipeline stages."""

    b: int
    c: int
    d: int
    warps: int
    stages: int
    out: int = 0

    def launch(self) -> dict:
        return dict(BLOCK_B=self.b, BLOCK_C=self.c, BLOCK_D=self.d, num_warps=self.warps,
                    num_stages=self.stages, maxnreg=MAX_REGISTERS)  # fmt: skip


@dataclass(frozen=True)
class _Tiles:
    fwd: _Tile
    bwd: _Tile  # the fused (atomic) backward
    det: _Tile  # the deterministic row and column kernels


def _tiles(dtype: torch.dtype, family: int, precision: str) -> _Tiles:
    """Tile shapes per dtype and logit family: the largest shapes whose sm_90 build has no
    register spills (tests/triton_aot.py compiles each one and checks; the numbers are in
    docs/triton_aot.md). 16-bit inputs run on tensor cores with fp32 accumulators; W-Softmax
    carries a second accumulator (e = W_y . W_j), hence its narrower tiles. fp32 with
    precision "ieee" (torch's default, TF32 off) and fp64 take the FMA path, which holds both
    operand slices in registers, hence 16-deep K slices. The interpreter uses 16-wide tiles so
    that small test shapes still cross several row tiles, column tiles, splits and K slices."""
    if INTERPRET:
        tile = _Tile(16, 16, 16, 1, 1, out=16)
        return _Tiles(tile, tile, tile)
    wide = family == NT_W
    if dtype in (torch.float16, torch.bfloat16):
        if wide:
            return _Tiles(_Tile(32, 128, 64, 8, 3), _Tile(32, 64, 32, 8, 2),
                          _Tile(32, 64, 32, 8, 2, out=64))  # fmt: skip
        return _Tiles(_Tile(64, 128, 64, 8, 3), _Tile(64, 64, 64, 8, 2),
                      _Tile(64, 64, 32, 8, 2, out=128))  # fmt: skip
    if dtype == torch.float32:
        if wide:
            det = _Tile(32, 64 if precision == "tf32" else 32, 16, 8, 2, out=32)
            return _Tiles(_Tile(32, 32, 16, 8, 2), _Tile(32, 64, 16, 8, 2), det)
        return _Tiles(_Tile(32, 64, 16, 4, 2), _Tile(32, 64, 16, 4, 2),
                      _Tile(32, 32, 16, 4, 2, out=32))  # fmt: skip
    if wide:
        tile = _Tile(16, 32, 16, 4, 2, out=16)
        # one stage: with two, Triton 3.6's build of the deterministic pair spills at 255 registers
        return _Tiles(tile, tile, _Tile(16, 32, 16, 4, 1, out=16))
    return _Tiles(_Tile(32, 32, 16, 4, 2), _Tile(32, 32, 16, 4, 2),
                  _Tile(32, 16, 16, 4, 2, out=16))  # fmt: skip


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's matmul setting (TF32 only when the user allowed it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two splits, so that the merge is exercised


def _row_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, K slice) of the row-wise kernels (norms, target logits, dW's norm term), launched
    with ``_ROW_LAUNCH``: spill-free on sm_90 (fp64 needs the narrower tile for the combined
    margin's arccos)."""
    if INTERPRET:
        return 256, 16
    return (8, 64) if dtype == torch.float64 else (16, 64)


_ROW_LAUNCH = dict(num_warps=4, maxnreg=MAX_REGISTERS)


def _row_norms(src: torch.Tensor, ids: torch.Tensor | None, acc_dtype: torch.dtype):
    n_rows = src.shape[0] if ids is None else ids.shape[0]
    out = torch.empty(n_rows, device=src.device, dtype=acc_dtype)
    block_r, block_d = _row_tile(src.dtype)
    _row_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        src, ids if ids is not None else src, out, n_rows, src.shape[1],
        src.stride(0), src.stride(1),
        HAS_IDS=ids is not None, ACC=_acc_dtype(src.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
        **_ROW_LAUNCH,
    )  # fmt: skip
    return out


def _scalar_args(params: list[float]) -> dict:
    s, m, m1, m2, m3, lam, lambda_p, lambda_n, alpha, cos_m, sin_m, _, _ = params
    return dict(s=s, marg=m, m1=m1, m2=m2, m3=m3, lam=lam, lambda_p=lambda_p,
                lambda_n=lambda_n, alpha=alpha, cos_m=cos_m, sin_m=sin_m)  # fmt: skip


def _psi_thresholds(kind_id: int, m: float) -> tuple[float, float, float]:
    """cos(j pi / m), j = 1..3, the sign-test thresholds of psi (unused entries: -2)."""
    if kind_id not in (KIND_IDS["lsoftmax"], KIND_IDS["sphereface"]):
        return -2.0, -2.0, -2.0
    ths = [math.cos(j * math.pi / m) for j in range(1, int(m))]
    return tuple(ths + [-2.0] * (3 - len(ths)))


def _columns(target, class_ids, num_classes):
    """(labels with -1 where the row has no target in this weight, contiguous ids or None,
    number of columns in the denominator)."""
    # labels outside this weight's classes (ignored, or another shard's) have no target
    y = torch.where((target >= 0) & (target < num_classes), target, -1).contiguous()
    ids = class_ids.contiguous() if class_ids is not None else None
    return y, ids, num_classes if ids is None else ids.shape[0]


def _forward(x, weight, target, class_ids, kind_id, params):
    """Returns (neg_lse (B,), target_logit (B,), row_stats (7, B), col_norms (S,))."""
    batch, dim = x.shape
    num_classes = weight.shape[0]
    kind = _KIND_NAMES[kind_id]
    family = _NONTARGET_FAMILY[kind]
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc = _acc_dtype(x.dtype)
    fwd = _tiles(x.dtype, family, _precision(x.dtype)).fwd
    sc = _scalar_args(params)
    y, ids, n_cols = _columns(target, class_ids, num_classes)
    nx = _row_norms(x, None, acc_t)
    nw = _row_norms(weight, ids, acc_t)
    row_stats = torch.empty(7, batch, device=x.device, dtype=acc_t)
    if batch == 0:
        return row_stats[0].clone(), row_stats[1].clone(), row_stats, nw
    th1, th2, th3 = _psi_thresholds(kind_id, sc["marg"])
    tb, td = _row_tile(x.dtype)
    _target_kernel[(triton.cdiv(batch, tb),)](
        x, weight, y, nx, row_stats, batch, dim,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        sc["s"], sc["marg"], sc["m1"], sc["m2"], sc["m3"], sc["lam"], sc["lambda_p"],
        sc["cos_m"], sc["sin_m"], th1, th2, th3,
        KIND=kind_id, PSI_M=int(sc["marg"]) if kind in ("lsoftmax", "sphereface") else 1,
        GRAD_MODE=int(params[11]), OVERFLOW=int(params[12]), ACC=acc,
        BLOCK_B=tb, BLOCK_D=td, **_ROW_LAUNCH,
    )  # fmt: skip
    row_blocks = triton.cdiv(batch, fwd.b)
    col_tiles = max(triton.cdiv(n_cols, fwd.c), 1)
    # split C so that the grid has ~4 programs per SM; each split owns whole column tiles
    splits = max(1, min(col_tiles, triton.cdiv(4 * _num_sms(x.device), row_blocks)))
    cols_per_split = triton.cdiv(col_tiles, splits) * fwd.c
    splits = max(1, triton.cdiv(n_cols, cols_per_split))
    part_m = torch.empty(splits, batch, device=x.device, dtype=acc_t)
    part_s = torch.empty_like(part_m)
    _fwd_kernel[(row_blocks, splits)](
        x, weight, y, ids if ids is not None else y, nx, nw, row_stats[4], row_stats[5],
        part_m, part_s, batch, n_cols, dim, cols_per_split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        sc["s"], sc["marg"], sc["lambda_n"], sc["alpha"],
        NT=family, HAS_IDS=ids is not None, ACC=acc, UPCAST=_upcast(x.dtype),
        PRECISION=_precision(x.dtype), **fwd.launch(),
    )  # fmt: skip
    # deterministic merge of the splits: LSE = M + log sum_k s_k exp(m_k - M)
    top = part_m.max(dim=0).values
    neg_lse = top + torch.log((part_s * torch.exp(part_m - top)).sum(dim=0))
    return neg_lse, row_stats[0].clone(), row_stats, nw


def _backward(grad_lse, grad_t, x, weight, target, class_ids, neg_lse, row_stats, nw,
              kind_id, params, deterministic):  # fmt: skip
    """(dX, dW) of sum(grad_lse * neg_lse + grad_t * t), in the inputs' dtypes."""
    batch, dim = x.shape
    num_classes = weight.shape[0]
    family = _NONTARGET_FAMILY[_KIND_NAMES[kind_id]]
    acc_t = row_stats.dtype
    acc = _acc_dtype(x.dtype)
    tiles = _tiles(x.dtype, family, _precision(x.dtype))
    sc = _scalar_args(params)
    y, ids, n_cols = _columns(target, class_ids, num_classes)
    _, a, bx, by, cy, ny, nx = row_stats
    grad_lse = grad_lse.to(acc_t).contiguous()
    grad_t = grad_t.to(acc_t)
    dx = torch.zeros(batch, dim, device=x.device, dtype=acc_t)
    dw_cols = torch.zeros(n_cols, dim, device=x.device, dtype=acc_t)
    dwy = torch.zeros(batch, dim, device=x.device, dtype=acc_t)
    row_sc = torch.zeros(3, batch, device=x.device, dtype=acc_t)  # dL/dnx, dL/dc_y, dL/dny
    col_sc = torch.zeros(n_cols, device=x.device, dtype=acc_t)  # dL/dnw
    common = dict(
        NT=family, HAS_IDS=ids is not None, ACC=acc, UPCAST=_upcast(x.dtype),
        PRECISION=_precision(x.dtype),
    )  # fmt: skip
    head = (x, weight, y, ids if ids is not None else y, nx, nw, cy, ny, neg_lse, grad_lse)
    tail = (
        batch, n_cols, dim, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        sc["s"], sc["marg"], sc["lambda_n"], sc["alpha"],
    )  # fmt: skip
    if n_cols and batch:
        if deterministic:
            det = tiles.det
            _bwd_rows_kernel[(triton.cdiv(batch, det.b), triton.cdiv(dim, det.out))](
                *head, dx, dwy, row_sc, *tail, BLOCK_OUT=det.out, **common, **det.launch()
            )
            _bwd_cols_kernel[(triton.cdiv(n_cols, det.c), triton.cdiv(dim, det.out))](
                *head, dw_cols, col_sc, *tail, BLOCK_OUT=det.out, **common, **det.launch()
            )
        else:
            bwd = tiles.bwd
            _bwd_fused_kernel[(triton.cdiv(n_cols, bwd.c), triton.cdiv(batch, bwd.b))](
                *head, dx, dw_cols, dwy, row_sc, col_sc, *tail, **common, **bwd.launch()
            )
        # column-norm term: dW_j += (dL/dnw_j / nw_j) W_j
        if family != NT_RAW:
            block_r, block_d = _row_tile(weight.dtype)
            _add_scaled_rows_kernel[(triton.cdiv(n_cols, block_r),)](
                dw_cols, weight, ids if ids is not None else y, col_sc / nw, n_cols, dim,
                weight.stride(0), weight.stride(1),
                HAS_IDS=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d, **_ROW_LAUNCH,
            )  # fmt: skip
    # Row terms, O(B D): the target logit and W-Softmax's c_y, ny enter through the target dot
    # d_y = x . W_y and the norms nx, ny. With r = dL/dc_y and c_y = d_y / (nx ny):
    r_nx, r_cy, r_ny = row_sc
    coef_dy = grad_t * a + r_cy / (nx * ny)  # dL/dd_y
    coef_nx = grad_t * bx + r_nx - r_cy * cy / nx  # dL/dnx
    coef_ny = grad_t * by + r_ny - r_cy * cy / ny  # dL/dny
    y_safe = y.clamp_min(0)
    w_y = weight[y_safe].to(acc_t)
    xf = x.to(acc_t)
    dx += coef_dy[:, None] * w_y + (coef_nx / nx)[:, None] * xf
    dw_rows = coef_dy[:, None] * xf + (coef_ny / ny)[:, None] * w_y + dwy
    if ids is None:
        dw = dw_cols
    else:
        dw = torch.zeros(num_classes, dim, device=x.device, dtype=acc_t)
        dw.index_put_((ids,), dw_cols, accumulate=True)
    # sort-based accumulation on CUDA: deterministic for repeated labels
    dw.index_put_((y_safe,), dw_rows, accumulate=True)
    return dx.to(x.dtype), dw.to(weight.dtype)


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
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neg_lse (B,), target_logit (B,), row_stats (7, B), col_norms (S,)); fp32 (fp64)."""
        return _forward(x, weight, target, class_ids, kind_id, params)

    @_lse_fwd_op.register_fake
    def _(x, weight, target, class_ids, kind_id, params, deterministic):
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        batch = x.shape[0]
        n_cols = weight.shape[0] if class_ids is None else class_ids.shape[0]
        return (
            x.new_empty(batch, dtype=acc_t),
            x.new_empty(batch, dtype=acc_t),
            x.new_empty(7, batch, dtype=acc_t),
            x.new_empty(n_cols, dtype=acc_t),
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
        kind_id: int,
        params: list[float],
        deterministic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dX (B, D), dW (C, D)) in the dtypes of x and weight."""
        return _backward(grad_lse, grad_t, x, weight, target, class_ids, neg_lse, row_stats,
                         col_norms, kind_id, params, deterministic)  # fmt: skip

    @_lse_bwd_op.register_fake
    def _(grad_lse, grad_t, x, weight, target, class_ids, neg_lse, row_stats, col_norms,
          kind_id, params, deterministic):  # fmt: skip
        return torch.empty_like(x), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        x, weight, target, class_ids, kind_id, params, deterministic = inputs
        neg_lse, _, row_stats, col_norms = output
        ctx.save_for_backward(x, weight, target, class_ids, neg_lse, row_stats, col_norms)
        ctx.kind_id, ctx.params, ctx.deterministic = kind_id, params, deterministic

    def _lse_backward(ctx, grad_lse, grad_t, _grad_stats, _grad_norms):
        x, weight, target, class_ids, neg_lse, row_stats, col_norms = ctx.saved_tensors
        if grad_lse is None:
            grad_lse = torch.zeros_like(neg_lse)
        if grad_t is None:
            grad_t = torch.zeros_like(neg_lse)
        dx, dw = _lse_bwd_op(grad_lse, grad_t, x, weight, target, class_ids, neg_lse,
                             row_stats, col_norms, ctx.kind_id, ctx.params,
                             ctx.deterministic)  # fmt: skip
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
        class_ids: optional (S,) int64 ids in [0, C) of the classes in the denominator, read
            indirectly (no gathered copy of W); dW is non-zero only on those rows and targets.
        deterministic: bitwise run-to-run identical gradients (two backward kernels that own
            their outputs instead of one with atomics; about twice the backward's GEMM work).

    Returns:
        ``(neg_lse, target_logit)``, (B,) float32 (float64 for float64 inputs).
    """
    reason = unavailable_reason(x.device, spec)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    kind_id, params = spec.kernel_args()
    neg_lse, t, _, _ = _lse_fwd_op(
        x, weight, target.long(), class_ids, kind_id, list(params), bool(deterministic)
    )
    return neg_lse, t
