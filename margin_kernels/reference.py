"""Pure-torch reference of every loss: the test oracle, the CPU fallback, the benchmark baseline.

Every backend implements the same primitive, :func:`lse_parts`, which returns per row the
log-sum-exp of the non-target logits and the target logit. Loss and LSE are O(B) functions of
those two vectors (:func:`loss_from_parts`), and that split is what lets the class-parallel loss
combine shards exactly. The reference materialises the (B, C) logits; the fused backends never do.

Computation runs in float32 (float64 when an input is float64), whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .spec import KINDS, NORM_EPS, SIN2_EPS, MarginSpec

__all__ = [
    "chebyshev",
    "hsic",
    "loss_from_parts",
    "lse_parts",
    "margin_cross_entropy",
    "nontarget_transform",
    "psi",
    "sample_margin_regularization",
    "target_transform",
    "zero_centroid_regularization",
]


def _no_autocast(fn):
    """Run ``fn`` with autocast off on its first tensor's device: the reference computes in
    float32/float64 even inside an autocast region (the inputs were cast by the caller)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_norm(v: torch.Tensor) -> torch.Tensor:
    """max(||v_i||, NORM_EPS) over the last dimension."""
    return torch.linalg.vector_norm(v, dim=-1).clamp_min(NORM_EPS)


def chebyshev(c: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) as the Chebyshev polynomial T_m(c), any integer m >= 1: the closed forms for
    m <= 4, the recurrence T_{k+1} = 2 c T_k - T_{k-1} above."""
    if m == 1:
        return c
    c2 = c * c
    if m == 2:
        return 2 * c2 - 1
    if m == 3:
        return (4 * c2 - 3) * c
    if m == 4:
        return (8 * c2 - 8) * c2 + 1
    prev, cur = (4 * c2 - 3) * c, (8 * c2 - 8) * c2 + 1
    for _ in range(4, m):
        prev, cur = cur, 2 * c * cur - prev
    return cur


def psi(c: torch.Tensor, m: int) -> torch.Tensor:
    """psi_m(theta) = (-1)^k cos(m theta) - 2k on theta in [k pi/m, (k+1) pi/m].

    k is the number of thresholds cos(j pi/m), j = 1..m-1, that c lies below (sign tests, no
    arccos); it is piecewise constant, so the gradient is (-1)^k T_m'(c).
    """
    k = torch.zeros_like(c)
    for j in range(1, m):
        k = k + (c < math.cos(j * math.pi / m)).to(c.dtype)
    sign = 1 - 2 * torch.remainder(k, 2)
    return sign * chebyshev(c, m) - 2 * k


class _ArcMargin(torch.autograd.Function):
    """cos(m1 theta + m2) - m3 of c = cos(theta), with the two documented gradient conventions
    and (arcface) the three theta + m > pi policies. Returns the unscaled margin cosine."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, spec: MarginSpec) -> torch.Tensor:
        cc = c.clamp(-1.0, 1.0)
        sin_theta = (1 - cc * cc).clamp_min(0).sqrt()
        if spec.kind == "arcface":
            cos_m, sin_m = math.cos(spec.m), math.sin(spec.m)
            # cos(theta + m) = c cos m - sin(theta) sin m
            value = cc * cos_m - sin_theta * sin_m
            if spec.overflow == "fallback":
                # theta > pi - m  <=>  c < cos(pi - m) = -cos m: use c - m sin m (monotone)
                plain = c > -cos_m
                value = torch.where(plain, value, c - spec.m * sin_m)
            elif spec.overflow == "easy":
                plain = c > 0
                value = torch.where(plain, value, c)
            else:
                plain = torch.ones_like(c, dtype=torch.bool)
        else:
            theta = torch.acos(cc)
            value = torch.cos(spec.m1 * theta + spec.m2) - spec.m3
            plain = torch.ones_like(c, dtype=torch.bool)
        ctx.save_for_backward(c, plain)
        ctx.spec = spec
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c, plain = ctx.saved_tensors
        spec = ctx.spec
        if spec.grad_mode == "straight_through":
            return grad, None
        # sin(theta) guarded in the denominator only: finite at |c| -> 1.
        sin_theta = (1 - c * c).clamp_min(SIN2_EPS).sqrt()
        if spec.kind == "arcface":
            # d cos(theta + m)/dc = cos m + sin m * c / sin(theta)
            deriv = math.cos(spec.m) + math.sin(spec.m) * c / sin_theta
        else:
            # d cos(m1 theta + m2)/dc = m1 sin(m1 theta + m2) / sin(theta)
            theta = torch.acos(c.clamp(-1.0, 1.0))
            deriv = spec.m1 * torch.sin(spec.m1 * theta + spec.m2) / sin_theta
        deriv = torch.where(plain, deriv, torch.ones_like(deriv))
        return grad * deriv, None


def target_transform(
    c: torch.Tensor, x_norm: torch.Tensor, w_norm: torch.Tensor, spec: MarginSpec
) -> torch.Tensor:
    """Target logit T(c, ||x||, ||W_y||) of docs/design.md section 2 (element-wise)."""
    kind = spec.kind
    if kind in ("lsoftmax", "sphereface"):
        blended = (spec.lam * c + psi(c, int(spec.m))) / (1 + spec.lam)
        scale = x_norm * w_norm if kind == "lsoftmax" else x_norm
        return scale * blended
    if kind == "cosface":
        return spec.s * (c - spec.m)
    if kind in ("arcface", "combined"):
        return spec.s * _ArcMargin.apply(c, spec)
    if kind == "so_softmax":
        return spec.lambda_p * (spec.m * spec.m - (c - 1) ** 2)
    if kind == "w_softmax":
        return x_norm * c
    if kind == "lm_softmax":
        return spec.s * c
    # soft_margin: raw logit minus the margin
    return x_norm * w_norm * c - spec.m


def nontarget_transform(
    c: torch.Tensor,
    x_norm: torch.Tensor,
    w_norm: torch.Tensor,
    spec: MarginSpec,
    c_target: torch.Tensor | None = None,
    gram_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-target logits N(c_ij, ...) (element-wise; broadcasts ``x_norm`` (B, 1) against
    ``w_norm`` (1, C)). W-Softmax also reads ``c_target`` (B, 1) = c_iy and ``gram_target``
    (B, C) = w_y . w_j (unit vectors)."""
    family = KINDS[spec.kind].family
    if family == "raw":
        return x_norm * w_norm * c
    if family == "feature_norm":
        return x_norm * c
    if family == "squared":
        return spec.lambda_n * (c * c - spec.m * spec.m)
    if family == "weighted":
        alpha = spec.alpha
        denom = (1 + alpha * alpha + 2 * alpha * gram_target).clamp_min(NORM_EPS).sqrt()
        return x_norm * (alpha * c_target + c) / denom
    return spec.s * c


@_no_autocast
def lse_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row pieces of every margin loss; the primitive each backend implements.

    Args:
        x: (B, D) features, any float dtype.
        weight: (C, D) class weights.
        target: (B,) int64 class of each row in [0, C); a row whose target lies outside [0, C)
            (ignored, or owned by another shard) has no target: no column is masked and its
            target logit is 0.
        spec: the margin.
        class_ids: optional (S,) int64 ids in [0, C) of the classes that take part in the
            denominator (Partial FC); None means all C classes.
        deterministic: accepted for signature parity with the fused backends; the reference is
            deterministic on its own.

    Returns:
        ``(neg_lse, target_logit)``, both (B,) in the compute dtype: the log-sum-exp of the
        non-target logits over the participating classes with the target column left out, and
        T of the target class (0 where the row has no target).
    """
    cd = compute_dtype(x, weight)
    xf, wf = x.to(cd), weight.to(cd)
    num_classes = wf.shape[0]
    has_target = (target >= 0) & (target < num_classes)
    safe_target = torch.where(has_target, target, torch.zeros_like(target))

    cols = wf if class_ids is None else wf[class_ids]
    col_ids = torch.arange(num_classes, device=wf.device) if class_ids is None else class_ids
    x_norm = row_norm(xf)
    col_norm = row_norm(cols)
    cos = (xf @ cols.T) / (x_norm[:, None] * col_norm[None, :])

    w_y = wf[safe_target]
    w_y_norm = row_norm(w_y)
    c_y = (xf * w_y).sum(-1) / (x_norm * w_y_norm)
    t = target_transform(c_y, x_norm, w_y_norm, spec)

    gram = None
    if KINDS[spec.kind].family == "weighted":
        gram = (w_y / w_y_norm[:, None]) @ (cols / col_norm[:, None]).T
    f = nontarget_transform(cos, x_norm[:, None], col_norm[None, :], spec, c_y[:, None], gram)
    is_target_col = col_ids[None, :] == target[:, None]
    neg_lse = torch.logsumexp(f.masked_fill(is_target_col, -math.inf), dim=1)
    return neg_lse, torch.where(has_target, t, torch.zeros_like(t))


def loss_from_parts(
    neg_lse: torch.Tensor,
    target_logit: torch.Tensor,
    valid: torch.Tensor,
    spec: MarginSpec,
    reduction: str,
) -> torch.Tensor:
    """Per-row loss from :func:`lse_parts` and the reduction, shared by every backend.

    ``loss_i = logaddexp(neg_lse_i, t_i) - t_i = softplus(neg_lse_i - t_i)`` (written as
    ``max(d, 0) + log1p(exp(-|d|))`` so that a saturated row loses no precision), or
    ``neg_lse_i - t_i`` for LM-Softmax. Rows with ``valid`` false give 0; "mean" divides by the
    number of valid rows (0 when there are none), without a host sync.
    """
    d = neg_lse - target_logit
    rows = d if spec.excludes_target else d.clamp_min(0) + torch.log1p(torch.exp(-d.abs()))
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    margin: MarginSpec,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    class_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference margin cross-entropy; same contract as :func:`margin_kernels.margin_cross_entropy`
    with ``backend="torch"`` but without input validation (the public function validates)."""
    valid = target != ignore_index
    neg_lse, t = lse_parts(x, weight, torch.where(valid, target, -1), margin, class_ids)
    return loss_from_parts(neg_lse, t, valid, margin, reduction)


@_no_autocast
def cosine_matrix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C) cosines between rows of x and rows of weight, in the compute dtype."""
    cd = compute_dtype(x, weight)
    xf, wf = x.to(cd), weight.to(cd)
    return (xf / row_norm(xf)[:, None]) @ (wf / row_norm(wf)[:, None]).T


@_no_autocast
def sample_margin_regularization(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """R_sm = mean_i (max_{j != y_i} c_ij - c_iy) over non-ignored rows (0 when none)."""
    cos = cosine_matrix(x, weight)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    c_y = cos.gather(1, safe[:, None]).squeeze(1)
    others = cos.scatter(1, safe[:, None], -math.inf)
    margins = torch.where(valid, others.max(dim=1).values - c_y, torch.zeros_like(c_y))
    return margins.sum() / valid.sum().clamp_min(1).to(margins.dtype)


@_no_autocast
def zero_centroid_regularization(weight: torch.Tensor) -> torch.Tensor:
    """R_w = || sum_j W_j / ||W_j|| ||^2 for weight (C, D)."""
    wf = weight.to(compute_dtype(weight))
    return (wf / row_norm(wf)[:, None]).sum(0).pow(2).sum()


@_no_autocast
def hsic(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear-kernel HSIC over classes: ||(H u)^T (H v)||_F^2 / (C - 1)^2.

    u: (C, D1), v: (C, D2); H = I - 11^T/C centres over the C classes. The (D1, D2) product is
    formed instead of the C x C Gram matrices, so memory is O(C D)."""
    cd = compute_dtype(u, v)
    uc = u.to(cd) - u.to(cd).mean(0, keepdim=True)
    vc = v.to(cd) - v.to(cd).mean(0, keepdim=True)
    denom = max(u.shape[0] - 1, 1) ** 2
    return (uc.T @ vc).pow(2).sum() / denom


def softmax_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Plain softmax CE on raw logits x W^T, for tests and comparisons."""
    cd = compute_dtype(x, weight)
    return F.cross_entropy(x.to(cd) @ weight.to(cd).T, target, ignore_index=ignore_index)
