"""Public functions: validate, pick a backend, combine per-row parts into the loss.

Common keyword arguments of every loss:
    reduction: "mean" (over non-ignored rows; 0 when there are none), "sum" or "none" ((B,)).
    ignore_index: rows whose label equals it give loss 0 and gradient 0 (default -100).
    backend: "auto" | "triton" | "cuda" | "torch" (see the README's backend matrix).

Dtypes: x and weight may be float16, bfloat16, float32 or float64. The loss is float32 (float64
when an input is float64). Under ``torch.autocast`` both operands are cast to the autocast dtype
(the fused kernels then run their GEMMs in it); otherwise operands of different dtypes are
promoted to the common dtype.
"""

from __future__ import annotations

import itertools

import torch

from . import reference
from .ops import BACKENDS, resolve
from .spec import MarginSpec

__all__ = [
    "arcface_loss",
    "combined_margin_loss",
    "cosface_loss",
    "em_softmax_loss",
    "hsic",
    "lm_softmax_loss",
    "lsoftmax_loss",
    "margin_cross_entropy",
    "sample_margin_regularization",
    "so_softmax_loss",
    "sphereface_loss",
    "w_softmax_loss",
    "zero_centroid_regularization",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _check_float_matrix(name: str, t: object, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_labels(
    name: str, labels: object, length: int | None, num_classes: int, ignore_index: int | None
) -> torch.Tensor:
    """Validate an integer label/id vector; returns it as int64. Range errors raise IndexError
    (on CUDA through ``torch._assert_async``, so there is no host sync)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (int64), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if length is not None and labels.shape[0] != length:
        raise ValueError(f"{name} has {labels.shape[0]} entries but x has {length} rows")
    labels = labels.long()
    in_range = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        in_range |= labels == ignore_index
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        # no host sync on accelerators, and no graph break under torch.compile
        torch._assert_async(in_range.all(), f"{name} out of range [0, {num_classes})")
    elif labels.numel() and not bool(in_range.all()):
        bad = labels[~in_range][0].item()
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise IndexError(f"{name} value {bad} is out of range [0, {num_classes}){extra}")
    return labels


def _prepare(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    reduction: str,
    ignore_index: int,
    backend: str,
    class_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Shared validation of the margin losses' inputs; returns (x, weight, target, class_ids)
    with matching dtypes and int64 labels. Raises before touching any data."""
    _check_float_matrix("x", x, "(B, D)")
    _check_float_matrix("weight", weight, "(C, D)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"feature dims differ: x is {tuple(x.shape)} (B, D) but weight is "
            f"{tuple(weight.shape)} (C, D)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C >= 1)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    tensors = {"x": x, "weight": weight, "target": target}
    if class_ids is not None:
        tensors["class_ids"] = class_ids
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listing}")
    num_classes = weight.shape[0]
    target = _check_labels("target", target, x.shape[0], num_classes, ignore_index)
    if class_ids is not None:
        class_ids = _check_labels("class_ids", class_ids, None, num_classes, None)
    if torch.is_autocast_enabled(x.device.type):
        amp_dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(amp_dtype), weight.to(amp_dtype)
    elif x.dtype != weight.dtype:
        common = torch.promote_types(x.dtype, weight.dtype)
        x, weight = x.to(common), weight.to(common)
    return x, weight, target, class_ids


def margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    margin: MarginSpec,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Margin-based softmax cross-entropy of ``x`` against the classes ``weight``.

    Args:
        x: (B, D) features, float16/bfloat16/float32/float64.
        weight: (C, D) class weights (the ``nn.Linear`` layout).
        target: (B,) int64 labels in [0, C) or ``ignore_index``.
        margin: a :class:`MarginSpec` (kind and hyper-parameters).
        reduction, ignore_index, backend: see the module docstring.
        class_ids: optional (S,) int64 class ids (Partial FC): only these classes, plus each
            row's target, enter the denominator. The target logit is always computed from
            ``weight[target]``, so a sampled set need not list the positives.
        deterministic: ask the fused backends for bitwise run-to-run identical gradients.

    Returns:
        The loss: a float32 scalar (float64 for float64 inputs), or (B,) with
        ``reduction="none"``.
    """
    if not isinstance(margin, MarginSpec):
        raise ValueError(f"margin must be a MarginSpec, got {type(margin).__name__}")
    x, weight, target, class_ids = _prepare(
        x, weight, target, reduction, ignore_index, backend, class_ids
    )
    _, lse_parts = resolve(backend, x.device, margin)
    valid = target != ignore_index
    local_target = torch.where(valid, target, torch.full_like(target, -1))
    neg_lse, t = lse_parts(x, weight, local_target, margin, class_ids, deterministic=deterministic)
    return reference.loss_from_parts(neg_lse, t, valid, margin, reduction)


def lsoftmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    m: int = 4,
    lam: float = 0.0,
    **common,
) -> torch.Tensor:
    """L-Softmax (Liu et al. 2016): T = ||W_y|| ||x|| (lam c + psi_m(c)) / (1 + lam),
    non-target logits are the raw W_j . x. ``m`` in 1..16; ``lam`` is the annealed blend
    (see :class:`margin_kernels.nn.LambdaSchedule`). Shapes as in :func:`margin_cross_entropy`."""
    return margin_cross_entropy(x, weight, target, MarginSpec.lsoftmax(m, lam), **common)


def sphereface_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    m: int = 4,
    lam: float = 0.0,
    **common,
) -> torch.Tensor:
    """A-Softmax / SphereFace (Liu et al. 2017): weights normalised, features not:
    T = ||x|| (lam c + psi_m(c)) / (1 + lam), N = ||x|| c_ij."""
    return margin_cross_entropy(x, weight, target, MarginSpec.sphereface(m, lam), **common)


def cosface_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    s: float = 64.0,
    m: float = 0.35,
    **common,
) -> torch.Tensor:
    """CosFace / AM-Softmax: T = s (c - m), N = s c_ij."""
    return margin_cross_entropy(x, weight, target, MarginSpec.cosface(s, m), **common)


def arcface_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    grad_mode: str = "exact",
    overflow: str = "fallback",
    **common,
) -> torch.Tensor:
    """ArcFace: T = s cos(theta + m), N = s c_ij. ``grad_mode`` "exact" (true derivative,
    guarded at |c| -> 1) or "straight_through" (dT/dc = s, as insightface trains); ``overflow``
    for theta + m > pi: "fallback" (c - m sin m), "none" (plain), "easy" (margin only where
    c > 0)."""
    spec = MarginSpec.arcface(s, m, grad_mode=grad_mode, overflow=overflow)
    return margin_cross_entropy(x, weight, target, spec, **common)


def combined_margin_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.3,
    m3: float = 0.2,
    grad_mode: str = "exact",
    **common,
) -> torch.Tensor:
    """Combined margin (insightface): T = s (cos(m1 theta + m2) - m3), N = s c_ij. No
    theta + m > pi policy: the plain formula, as insightface computes it."""
    spec = MarginSpec.combined(s, m1, m2, m3, grad_mode=grad_mode)
    return margin_cross_entropy(x, weight, target, spec, **common)


def so_softmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    lambda_p: float = 2.0,
    lambda_n: float = 2.0,
    m: float = 0.3,
    **common,
) -> torch.Tensor:
    """SO-Softmax, third-party form (the paper's exact form is unconfirmed):
    T = lambda_p (m^2 - (c - 1)^2), N = lambda_n (c_ij^2 - m^2)."""
    spec = MarginSpec.so_softmax(lambda_p, lambda_n, m)
    return margin_cross_entropy(x, weight, target, spec, **common)


def w_softmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.5,
    **common,
) -> torch.Tensor:
    """W-Softmax, third-party form (alpha's default is unconfirmed): T = ||x|| c,
    N = ||x|| (alpha c_iy + c_ij) / sqrt(1 + alpha^2 + 2 alpha w_y.w_j) with unit w; the
    denominator is clamped at 1e-12 before the sqrt."""
    return margin_cross_entropy(x, weight, target, MarginSpec.w_softmax(alpha), **common)


def lm_softmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    s: float = 5.0,
    **common,
) -> torch.Tensor:
    """LM-Softmax: loss = LSE_{j != y}(s c_ij) - s c_iy (target left out of the denominator).
    Its regularisers are :func:`sample_margin_regularization` and
    :func:`zero_centroid_regularization` (or :class:`margin_kernels.nn.LMSoftmaxLoss`)."""
    return margin_cross_entropy(x, weight, target, MarginSpec.lm_softmax(s), **common)


def em_softmax_loss(
    x: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor,
    m: float = 0.1,
    hsic_weight: float = 0.1,
    **common,
) -> torch.Tensor:
    """EM-Softmax (ensemble soft-margin softmax; only the abstract could be confirmed): mean over
    the K heads of the soft-margin CE (T = z_iy - m on raw logits z = x W_k^T) plus
    ``hsic_weight`` times the mean of :func:`hsic` over head pairs (diversity; 0 for K = 1).

    Args:
        x: (B, D) shared features.
        weights: (K, C, D) one classifier per head.
        target: (B,) int64.

    With ``reduction="none"`` the (B,) per-row head-mean CE is returned and the HSIC term, a
    property of the weights rather than of a row, is left out.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights)
        raise ValueError(f"weights must be a (K, C, D) tensor, got {shape}")
    if weights.shape[0] == 0:
        raise ValueError("weights must hold at least one head (K >= 1)")
    if not isinstance(hsic_weight, (int, float)) or hsic_weight < 0:
        raise ValueError(f"hsic_weight must be >= 0, got {hsic_weight!r}")
    spec = MarginSpec.soft_margin(m)
    num_heads = weights.shape[0]
    ce = sum(margin_cross_entropy(x, weights[k], target, spec, **common) for k in range(num_heads))
    ce = ce / num_heads
    if common.get("reduction", "mean") == "none" or num_heads == 1 or hsic_weight == 0:
        return ce
    pairs = list(itertools.combinations(range(num_heads), 2))
    diversity = sum(reference.hsic(weights[a], weights[b]) for a, b in pairs) / len(pairs)
    return ce + hsic_weight * diversity


def sample_margin_regularization(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """LM-Softmax sample-margin regulariser R_sm = mean_i (max_{j != y} c_ij - c_iy), over
    non-ignored rows. x: (B, D), weight: (C, D), target: (B,) int64. O(B C) memory (torch)."""
    x, weight, target, _ = _prepare(x, weight, target, "mean", ignore_index, "torch")
    return reference.sample_margin_regularization(x, weight, target, ignore_index)


def zero_centroid_regularization(weight: torch.Tensor) -> torch.Tensor:
    """LM-Softmax zero-centroid regulariser R_w = ||sum_j W_j/||W_j|| ||^2; weight: (C, D)."""
    _check_float_matrix("weight", weight, "(C, D)")
    return reference.zero_centroid_regularization(weight)


def hsic(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear-kernel HSIC between two classifiers over the same C classes:
    ``||(H u)^T (H v)||_F^2 / (C - 1)^2``. u: (C, D1), v: (C, D2); no C x C matrix is formed."""
    _check_float_matrix("u", u, "(C, D1)")
    _check_float_matrix("v", v, "(C, D2)")
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"u and v must have the same classes, got {u.shape[0]} and {v.shape[0]}")
    return reference.hsic(u, v)
