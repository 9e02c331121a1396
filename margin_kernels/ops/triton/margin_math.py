"""Margin math of the Triton kernels (``@triton.jit`` helpers, inlined into the kernels).

Every logit is a function of the raw dot ``d_ij = x_i . W_j`` and of the norms
``nx_i = max(||x_i||, eps)``, ``nw_j = max(||W_j||, eps)`` (eps = spec.NORM_EPS); W-Softmax also
reads ``c_iy`` and ``e_ij = W_y . W_j``. Float hyper-parameters reach the kernels in a small tensor
of the accumulation dtype (``PARAMS``, laid out by :func:`kernel_params`): a Python float argument
would be rounded to fp32 by the compiled launcher, an fp64 tensor keeps fp64 precision.
"""

from __future__ import annotations

import math

from ...spec import (
    FAMILY_IDS,
    GRAD_MODES,
    KIND_IDS,
    MAX_PSI_M,
    NORM_EPS,
    OVERFLOW_POLICIES,
    PARAM_INDEX,
    SIN2_EPS,
)
from ._compat import HAS_TRITON, tl, triton

# PARAMS layout: spec.PARAM_LAYOUT up to sin(m) (s, m, m1, m2, m3, lam, lambda_p, lambda_n, alpha,
# cos m, sin m), then the psi thresholds cos(j pi / m), j = 1..15 (unused entries -2: c is never
# below them).
NUM_FLOAT_PARAMS = PARAM_INDEX["sin_m"] + 1
MAX_THRESHOLDS = MAX_PSI_M - 1
NUM_PARAMS = NUM_FLOAT_PARAMS + MAX_THRESHOLDS


def kernel_params(params: list[float], psi_m: int) -> list[float]:
    """The PARAMS vector of :meth:`MarginSpec.kernel_args` ``params`` (13 floats)."""
    head = list(params[:NUM_FLOAT_PARAMS])
    ths = [math.cos(j * math.pi / psi_m) for j in range(1, psi_m)] if psi_m > 1 else []
    return head + ths + [-2.0] * (MAX_THRESHOLDS - len(ths))


if HAS_TRITON:
    # The registry's facts as compile-time constants of the kernels (spec.py is their source).
    EPS_NORM = tl.constexpr(NORM_EPS)
    EPS_SIN2 = tl.constexpr(SIN2_EPS)
    K_LSOFTMAX = tl.constexpr(KIND_IDS["lsoftmax"])
    K_SPHEREFACE = tl.constexpr(KIND_IDS["sphereface"])
    K_COSFACE = tl.constexpr(KIND_IDS["cosface"])
    K_ARCFACE = tl.constexpr(KIND_IDS["arcface"])
    K_COMBINED = tl.constexpr(KIND_IDS["combined"])
    K_SO_SOFTMAX = tl.constexpr(KIND_IDS["so_softmax"])
    K_W_SOFTMAX = tl.constexpr(KIND_IDS["w_softmax"])
    K_LM_SOFTMAX = tl.constexpr(KIND_IDS["lm_softmax"])
    NT_SCALED = tl.constexpr(FAMILY_IDS["scaled"])
    NT_RAW = tl.constexpr(FAMILY_IDS["raw"])
    NT_FEATURE_NORM = tl.constexpr(FAMILY_IDS["feature_norm"])
    NT_SQUARED = tl.constexpr(FAMILY_IDS["squared"])
    NT_WEIGHTED = tl.constexpr(FAMILY_IDS["weighted"])
    GRAD_STRAIGHT_THROUGH = tl.constexpr(GRAD_MODES["straight_through"])
    OVERFLOW_FALLBACK = tl.constexpr(OVERFLOW_POLICIES["fallback"])
    OVERFLOW_EASY = tl.constexpr(OVERFLOW_POLICIES["easy"])
    P_S = tl.constexpr(PARAM_INDEX["s"])
    P_M = tl.constexpr(PARAM_INDEX["m"])
    P_M1 = tl.constexpr(PARAM_INDEX["m1"])
    P_M2 = tl.constexpr(PARAM_INDEX["m2"])
    P_M3 = tl.constexpr(PARAM_INDEX["m3"])
    P_LAM = tl.constexpr(PARAM_INDEX["lam"])
    P_LAMBDA_P = tl.constexpr(PARAM_INDEX["lambda_p"])
    P_LAMBDA_N = tl.constexpr(PARAM_INDEX["lambda_n"])
    P_ALPHA = tl.constexpr(PARAM_INDEX["alpha"])
    P_COS_M = tl.constexpr(PARAM_INDEX["cos_m"])
    P_SIN_M = tl.constexpr(PARAM_INDEX["sin_m"])
    P_THRESHOLDS = tl.constexpr(NUM_FLOAT_PARAMS)

    @triton.jit
    def _acos(x):
        """arccos on [-1, 1] to ~1 ulp of its dtype, without libdevice (which the interpreter
        lacks): asin by its odd minimax polynomial on [0, 0.5], and the half-angle identity
        asin(a) = pi/2 - 2 asin(sqrt((1 - a)/2)) above 0.5; fp64 refines the polynomial's
        asin by one Newton step."""
        ax = tl.abs(x)
        big = ax > 0.5
        z = tl.where(big, 0.5 * (1.0 - ax), ax * ax)
        r = tl.where(big, tl.sqrt(z), ax)
        poly = (
            ((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2
        ) * z + 1.6666752422e-1
        asin_r = r + r * z * poly
        if x.dtype == tl.float64:
            # the polynomial is fp32's (~1e-7): one Newton step on sin(a) = r squares that error
            # (cos(a) >= cos(pi/4) on r <= sqrt(1/2): well conditioned everywhere)
            asin_r = asin_r - (tl.sin(asin_r) - r) / tl.cos(asin_r)
        asin_ax = tl.where(big, 1.5707963267948966 - 2.0 * asin_r, asin_r)
        # acos(x) = pi/2 - asin(x), asin odd
        return tl.where(x >= 0, 1.5707963267948966 - asin_ax, 1.5707963267948966 + asin_ax)

    @triton.jit
    def _chebyshev(c, PSI_M: tl.constexpr):
        """T_m(c) = cos(m theta) and its derivative T_m'(c): the closed forms for m <= 4, the
        recurrence T_{k+1} = 2 c T_k - T_{k-1} (T'_{k+1} = 2 T_k + 2 c T'_k - T'_{k-1}) above,
        unrolled over the constexpr m, in the reference's order of operations."""
        c2 = c * c
        if PSI_M == 1:
            cheb = c
            dcheb = tl.full(c.shape, 1.0, c.dtype)
        elif PSI_M == 2:
            cheb = 2.0 * c2 - 1.0
            dcheb = 4.0 * c
        elif PSI_M == 3:
            cheb = (4.0 * c2 - 3.0) * c
            dcheb = 12.0 * c2 - 3.0
        else:
            prev = (4.0 * c2 - 3.0) * c
            dprev = 12.0 * c2 - 3.0
            cheb = (8.0 * c2 - 8.0) * c2 + 1.0
            dcheb = (32.0 * c2 - 16.0) * c
            for _ in tl.static_range(4, PSI_M):
                nxt = 2.0 * c * cheb - prev
                dnxt = 2.0 * cheb + 2.0 * c * dcheb - dprev
                prev = cheb
                dprev = dcheb
                cheb = nxt
                dcheb = dnxt
        return cheb, dcheb

    @triton.jit
    def _psi_blend(c, lam, PARAMS, PSI_M: tl.constexpr):
        """(lam c + psi_m(c)) / (1 + lam) and its derivative in c. psi_m = (-1)^k T_m(c) - 2k
        with k = number of thresholds cos(j pi/m), j = 1..m-1, that c lies below."""
        cheb, dcheb = _chebyshev(c, PSI_M)
        k = tl.zeros(c.shape, c.dtype)
        for j in tl.static_range(1, PSI_M):
            k += (c < tl.load(PARAMS + P_THRESHOLDS - 1 + j)).to(c.dtype)
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
        sin_guard = tl.sqrt(tl.maximum(1.0 - c * c, EPS_SIN2))
        if KIND == K_ARCFACE:
            sin_theta = tl.sqrt(tl.maximum(1.0 - cc * cc, 0.0))
            value = cc * cos_m - sin_theta * sin_m  # cos(theta + m)
            deriv = cos_m + sin_m * c / sin_guard
            if OVERFLOW == OVERFLOW_FALLBACK:
                plain = c > -cos_m  # theta <= pi - m; beyond it c - m sin m keeps T monotone
                value = tl.where(plain, value, c - marg * sin_m)
                deriv = tl.where(plain, deriv, 1.0)
            elif OVERFLOW == OVERFLOW_EASY:
                plain = c > 0.0  # "easy margin": the margin only where c > 0
                value = tl.where(plain, value, c)
                deriv = tl.where(plain, deriv, 1.0)
        else:
            angle = m1 * _acos(cc) + m2
            value = tl.cos(angle) - m3  # cos(m1 theta + m2) - m3
            deriv = m1 * tl.sin(angle) / sin_guard
        if GRAD_MODE == GRAD_STRAIGHT_THROUGH:
            deriv = tl.full(c.shape, 1.0, c.dtype)  # straight-through: dT/dc = s
        return s * value, s * deriv

    @triton.jit
    def _nontarget_logits(d, e, nx, rnx, rnw, cy, rny, s, marg, lambda_n, alpha,
                          NT: tl.constexpr):  # fmt: skip
        """f_ij from the raw dot d. nx, rnx = 1/nx, cy and rny = 1/ny broadcast along the row
        axis of the tile and rnw = 1/nw along its class axis (rows x classes in the forward,
        classes x rows in the dW kernel). Reciprocals, not divisions: an IEEE division is a
        ~10-instruction sequence per element, the reciprocals cost one per row or class."""
        if NT == NT_RAW:
            f = d  # raw logit W_j . x
        elif NT == NT_FEATURE_NORM:
            f = d * rnw  # ||x|| c = x . W_j / ||W_j||
        elif NT == NT_SCALED:
            f = s * (d * (rnx * rnw))  # s c
        elif NT == NT_SQUARED:
            c = d * (rnx * rnw)
            f = lambda_n * (c * c - marg * marg)
        else:
            c = d * (rnx * rnw)
            g = e * (rny * rnw)  # w_y . w_j of unit vectors
            q = tl.sqrt(tl.maximum(1.0 + alpha * alpha + 2.0 * alpha * g, EPS_NORM))
            f = nx * (alpha * cy + c) / q
        return f

    @triton.jit
    def _logit_grads(p, d, e, f, nx, rnx, rnw, cy, rny, s, lambda_n, alpha, NT: tl.constexpr):
        """Given p = dL/df on a tile, the loss's derivatives with respect to the tile's pieces:
        dd = dL/dd, de = dL/de (W-Softmax), and the per-element terms of dL/dnx, dL/dc_y,
        dL/dny (summed over columns by the caller) and dL/dnw (summed over rows). Arguments as
        in :func:`_nontarget_logits`; terms a caller does not use are dead code to Triton."""
        zero = tl.zeros(p.shape, p.dtype)
        de = zero
        d_nx = zero
        d_nw = zero
        d_cy = zero
        d_ny = zero
        if NT == NT_RAW:
            dd = p  # df/dd = 1
        elif NT == NT_FEATURE_NORM:
            dd = p * rnw  # f = d / nw
            d_nw = -p * f * rnw
        elif NT == NT_SCALED or NT == NT_SQUARED:  # noqa: SIM109 (no `in` under jit)
            u = rnx * rnw
            c = d * u
            h = p * s  # f = s c
            if NT == NT_SQUARED:
                h = p * 2.0 * lambda_n * c  # f = lambda_n (c^2 - m^2)
            dd = h * u  # c = d / (nx nw)
            hc = h * c
            d_nx = -hc * rnx
            d_nw = -hc * rnw
        else:
            c = d * (rnx * rnw)
            g = e * (rny * rnw)
            rq = 1.0 / tl.sqrt(tl.maximum(1.0 + alpha * alpha + 2.0 * alpha * g, EPS_NORM))
            # f = (alpha nx c_y + d / nw) / q,  q = sqrt(1 + alpha^2 + 2 alpha e / (ny nw))
            dq = -p * f * alpha * (rq * rq)  # dL/dg through q
            dd = p * rnw * rq
            de = dq * (rny * rnw)
            d_nw = -p * d * (rnw * rnw) * rq - dq * g * rnw
            d_nx = p * alpha * cy * rq
            d_cy = p * alpha * nx * rq
            d_ny = -dq * g * rny
        return dd, de, d_nx, d_cy, d_ny, d_nw

    @triton.jit
    def _pow2_scale(big):
        """A power of two that brings ``big`` (>= 0) into [1, 2): fp16 second-GEMM operands
        scaled by it neither flush to zero nor lose bits as subnormals; undoing it is exact.
        1 where big is 0 or not finite (NaN stays NaN); at most 2^60, so that an accumulator
        scaled by it stays finite."""
        expo = tl.maximum(tl.floor(tl.log2(tl.maximum(big, 1e-30))), -60.0)
        return tl.where((big > 0) & (big < float("inf")), tl.exp2(-expo), 1.0)

    @triton.jit
    def _mma_operand(h, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr, SCALE_OPS: tl.constexpr):
        """(A operand, row scale) of the second product ``h @ v``: h cast to the operand dtype;
        with SCALE_OPS each row scaled by a power of two into [1, 2) first (``_pow2_scale``)."""
        if UPCAST:
            op = h
            scale = tl.full((h.shape[0],), 1.0, h.dtype)
        elif SCALE_OPS:
            scale = _pow2_scale(tl.max(tl.abs(h), axis=1))
            op = (h * scale[:, None]).to(OP_DTYPE)
        else:
            op = h.to(OP_DTYPE)
            scale = tl.full((h.shape[0],), 1.0, h.dtype)
        return op, scale

    @triton.jit
    def _gated_operands(dd, de, gate, OP_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                        SCALE_OPS: tl.constexpr):  # fmt: skip
        """(op, scale, op_y, scale_y): the second products' A operands of dd and de from
        :func:`_mma_operand` where ``gate`` holds, zeros and unit scales where it does not.

        ``gate`` must not depend on the logits: a value that leaves an ``scf.if`` through its
        yield ends the forward slice Triton inspects for chained dots. Seen as a chain, the
        logits MMA gets all warps along M, and a 64-row tile with two warpgroups then has both
        compute the same logits (half the tensor-core work wasted); instead the warpgroups
        split the logits along N and the operand crosses between them through shared memory
        (BLOCK_M x BLOCK_N values). (W-Softmax alone uses de; elsewhere it is dead code.)"""
        if gate:
            op, scale = _mma_operand(dd, OP_DTYPE, UPCAST, SCALE_OPS)
            op_y, scale_y = _mma_operand(de, OP_DTYPE, UPCAST, SCALE_OPS)
        else:
            scale = tl.full((dd.shape[0],), 1.0, dd.dtype)
            scale_y = scale
            if UPCAST:  # noqa: SIM108 (constexpr branches under jit)
                op = tl.zeros(dd.shape, dd.dtype)
            else:
                op = tl.zeros(dd.shape, OP_DTYPE)
            op_y = op
        return op, scale, op_y, scale_y

    @triton.jit
    def _accumulate_rows(acc, op, scale, v, ACC: tl.constexpr, UPCAST: tl.constexpr,
                         SCALE_OPS: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """acc + (op / scale[:, None]) @ v, (M, N) x (N, K) -> (M, K) in ACC, for an operand from
        :func:`_mma_operand`. The product accumulates into acc in place (no second (M, K) tile
        of registers); with SCALE_OPS the accumulator is scaled along and unscaled after,
        exactly (powers of two). The forward rescales acc itself before the call."""
        if UPCAST:
            out = tl.dot(op, v.to(tl.float32), acc, input_precision=PRECISION, out_dtype=ACC)
        elif SCALE_OPS:
            out = tl.dot(op, v, acc * scale[:, None], input_precision=PRECISION, out_dtype=ACC)
            out = out * (1.0 / scale)[:, None]
        else:
            out = tl.dot(op, v, acc, input_precision=PRECISION, out_dtype=ACC)
        return out

    @triton.jit
    def _add_scaled_rows(acc, coef, v, OP_DTYPE: tl.constexpr, ACC: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
        """acc + coef[:, None] * v for a 16-bit (BLOCK_N, K) tile v, as three MMAs
        diag(c_1 + c_2 + c_3) @ v: coef split into parts of the operand dtype (bf16: 8 + 8 + 8
        bits, the whole fp32 significand; fp16: 11 + 11 + a few, after each row is scaled by a
        power of two into [1, 2) so that the parts stay in fp16's range), each product exact
        and summed in the fp32 accumulator (scaled along with the row and unscaled after)."""
        eye = tl.arange(0, BLOCK_N)[:, None] == tl.arange(0, BLOCK_N)[None, :]
        if tl.float16 == OP_DTYPE:
            scale = _pow2_scale(tl.abs(coef))
            acc = acc * scale[:, None]
            rest = coef * scale
        else:
            rest = coef
        # a loop, not unrolled: three dots in a row would make Triton lay the first two out for
        # a chain (all warps along M) and convert the accumulator between layouts
        for _ in range(3):
            part = rest.to(OP_DTYPE).to(ACC)  # round to nearest: rest - part is exact
            rest = rest - part
            diag = tl.where(eye, part[:, None], 0.0)
            if UPCAST:
                acc = tl.dot(diag, v.to(tl.float32), acc, input_precision=PRECISION,
                             out_dtype=ACC)  # fmt: skip
            else:
                acc = tl.dot(diag.to(OP_DTYPE), v, acc, input_precision=PRECISION,
                             out_dtype=ACC)  # fmt: skip
        if tl.float16 == OP_DTYPE:
            acc = acc * (1.0 / scale)[:, None]
        return acc
