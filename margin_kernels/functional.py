"""Public functions: validate, pick a backend, combine per-row parts into the loss.

Common keyword arguments of every loss:
    reduction: "mean" (over non-ignored rows; 0 when there are none), "sum" or "none" ((B,)).
    ignore_index: rows whose label equals it give loss 0 and gradient 0 (default -100).
    backend: "auto" | "triton" | "cuda" | "torch" (see the README's backend matrix).
    validate: "async" (default) or "sync", how the checks that read tensor values (labels in
        range, ``class_ids`` without repeats, a tensor ``lam`` finite and >= 0) report a bad
        value. "async": on CPU tensors in eager mode they read the values (free there) and raise
        ``IndexError``/``ValueError`` naming the bad value; on CUDA tensors, and anywhere inside
        ``torch.compile``, they are ``torch._assert_async`` (no host sync, no graph break): a
        ``RuntimeError`` under compile on CPU, a device-side assert on CUDA, which leaves the
        CUDA context unusable for the rest of the process. "sync": always read the values back
        (one host sync) and raise the ``IndexError``/``ValueError`` with the bad value, on any
        device; for debugging. It breaks the graph under ``torch.compile``, so
        ``fullgraph=True`` refuses it.

Dtypes: x and weight may be float16, bfloat16, float32 or float64. The loss is float32 (float64
when an input is float64). Under ``torch.autocast`` both operands are cast to the autocast dtype
(the fused kernels then run their GEMMs in it); otherwise operands of different dtypes are
promoted to the common dtype.
"""

from __future__ import annotations

import itertools
import math

import torch

from . import reference
from .ops import resolve
from .spec import MarginSpec
from .validation import check_float_matrix, eager_only, prepare_inputs, reads_back

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


def check_nonnegative(name: str, value: object) -> None:
    """A finite real number >= 0 (a Python int or float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@eager_only
def _raise_bad_lam(lam: torch.Tensor) -> None:
    value = lam.item()
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {value}")


def _check_lam(lam: object, device: torch.device, validate: str) -> float | torch.Tensor:
    """``lam`` as a float (validated by MarginSpec) or a 0-d floating tensor on ``device`` or
    the CPU (its value checked like the labels, see ``validate``)."""
    if not isinstance(lam, torch.Tensor):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ValueError(f"lam must be a float or a 0-d float tensor, got {lam!r}")
        if not torch.compiler.is_compiling():
            return float(lam)
        # under torch.compile a Python float may reach here as a symbolic value; as a tensor
        # it is a graph input, so a changing lam never recompiles
        lam = torch.tensor(lam, dtype=torch.float64, device=device)
    if lam.dim() != 0 or not lam.dtype.is_floating_point:
        raise ValueError(
            f"lam must be a float or a 0-d float tensor, got shape {tuple(lam.shape)} "
            f"dtype {lam.dtype}"
        )
    if lam.device != device and lam.device.type != "cpu":
        raise ValueError(f"lam must be on x's device ({device}) or the CPU, got {lam.device}")
    if reads_back(lam, validate):
        _raise_bad_lam(lam)
    else:
        torch._assert_async(torch.isfinite(lam) & (lam >= 0), "lam must be finite and >= 0")
    return lam


def _check_negatives(margin: MarginSpec, num_classes: int, class_ids: torch.Tensor | None) -> None:
    """LM-Softmax's denominator holds the negatives only: with fewer than two classes (or two
    sampled ids; they are distinct, so then every row keeps a negative) a row has none and its
    loss would be -inf."""
    if not margin.excludes_target:
        return
    if num_classes < 2:
        raise ValueError(
            f"{margin.kind} needs C >= 2 classes (its denominator holds only the non-target "
            f"classes), got weight with C={num_classes}"
        )
    if class_ids is not None and class_ids.shape[0] < 2:
        raise ValueError(
            f"{margin.kind} needs class_ids with at least 2 classes (its denominator holds only "
            f"the non-target classes), got {class_ids.shape[0]}"
        )


@reference._no_autocast
def _blend_psi_target(
    t0: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    lam: torch.Tensor,
) -> torch.Tensor:
    """Target logit of lsoftmax/sphereface at a tensor ``lam`` from the backend's lam = 0 one.

    T_lam = scale (lam c + psi(c)) / (1 + lam) = (lam f_y + T_0) / (1 + lam), where T_0 is the
    target logit at lam = 0 and f_y = scale c_iy is the plain target logit: z_iy = W_y . x_i
    (lsoftmax, scale ||W_y|| ||x||) or ||x|| c_iy = W_y . x_i / ||W_y|| (sphereface). O(B D),
    differentiable; rows without a target keep 0.
    """
    cd = t0.dtype
    has_target = (target >= 0) & (target < weight.shape[0])
    w_y = weight[torch.where(has_target, target, 0)].to(cd)
    f_y = (x.to(cd) * w_y).sum(-1)
    if kind == "sphereface":
        f_y = f_y / reference.row_norm(w_y)
    lam = lam.to(device=t0.device, dtype=cd)
    blended = (lam * f_y + t0) / (1 + lam)
    return torch.where(has_target, blended, torch.zeros_like(blended))


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
    validate: str = "async",
) -> torch.Tensor:
    """Margin-based softmax cross-entropy of ``x`` against the classes ``weight``.

    Args:
        x: (B, D) features, float16/bfloat16/float32/float64.
        weight: (C, D) class weights (the ``nn.Linear`` layout).
        target: (B,) int64 labels in [0, C) or ``ignore_index``.
        margin: a :class:`MarginSpec` (kind and hyper-parameters).
        reduction, ignore_index, backend, validate: see the module docstring.
        class_ids: optional (S,) int64 distinct class ids (Partial FC): only these classes, plus
            each row's target, enter the denominator. The target logit is always computed from
            ``weight[target]``, so a sampled set need not list the positives. LM-Softmax needs
            S >= 2 (and C >= 2), so that every row keeps a non-target class.
        deterministic: ask the fused backends for bitwise run-to-run identical gradients.

    Returns:
        The loss: a float32 scalar (float64 for float64 inputs), or (B,) with
        ``reduction="none"``.
    """
    return _margin_cross_entropy(
        x, weight, target, margin, reduction, ignore_index, backend, class_ids, deterministic,
        validate, None,
    )  # fmt: skip


def _margin_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    margin: MarginSpec,
    reduction: str,
    ignore_index: int,
    backend: str,
    class_ids: torch.Tensor | None,
    deterministic: bool,
    validate: str,
    psi_lam: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`margin_cross_entropy`; with ``psi_lam`` (a 0-d tensor) the lsoftmax/sphereface
    ``margin`` must carry lam = 0 and the target logit is blended at ``psi_lam`` outside the
    backend (:func:`_blend_psi_target`), so that lam is a graph input under torch.compile."""
    if not isinstance(margin, MarginSpec):
        raise ValueError(f"margin must be a MarginSpec, got {type(margin).__name__}")
    x, weight, target, class_ids = prepare_inputs(
        x, weight, target, reduction, ignore_index, backend, class_ids, validate
    )
    _check_negatives(margin, weight.shape[0], class_ids)
    _, lse_parts = resolve(backend, x.device, margin, x, weight, class_ids)
    valid = target != ignore_index
    local_target = torch.where(valid, target, torch.full_like(target, -1))
    neg_lse, t = lse_parts(x, weight, local_target, margin, class_ids, deterministic=deterministic)
    if psi_lam is not None:
        t = _blend_psi_target(t, x, weight, local_target, margin.kind, psi_lam)
    return reference.loss_from_parts(neg_lse, t, valid, margin, reduction)


def _psi_loss(kind, x, weight, target, m, lam, common) -> torch.Tensor:
    """lsoftmax/sphereface with ``lam`` a float (in the MarginSpec, as the kernels take it) or
    a 0-d tensor (blended outside the backend: changing it never recompiles)."""
    options = {
        "reduction": "mean",
        "ignore_index": -100,
        "backend": "auto",
        "class_ids": None,
        "deterministic": False,
        "validate": "async",
    }
    options.update(common)
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    lam = _check_lam(lam, device, options["validate"])
    if not isinstance(lam, torch.Tensor):
        return margin_cross_entropy(x, weight, target, MarginSpec(kind, m=m, lam=lam), **options)
    spec = MarginSpec(kind, m=m, lam=0.0)
    return _margin_cross_entropy(x, weight, target, spec, psi_lam=lam, **options)


def lsoftmax_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    m: int = 4,
    lam: float | torch.Tensor = 0.0,
    **common,
) -> torch.Tensor:
    """L-Softmax (Liu et al. 2016): T = ||W_y|| ||x|| (lam c + psi_m(c)) / (1 + lam),
    non-target logits are the raw W_j . x. ``m`` in 1..16; ``lam`` >= 0 is the annealed blend
    (see :class:`margin_kernels.nn.LambdaSchedule`), a float or a 0-d float tensor: pass a
    tensor when lam changes between calls of a ``torch.compile``-d step, so that it is a graph
    input and never recompiles. Shapes as in :func:`margin_cross_entropy`."""
    return _psi_loss("lsoftmax", x, weight, target, m, lam, common)


def sphereface_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    m: int = 4,
    lam: float | torch.Tensor = 0.0,
    **common,
) -> torch.Tensor:
    """A-Softmax / SphereFace (Liu et al. 2017): weights normalised, features not:
    T = ||x|| (lam c + psi_m(c)) / (1 + lam), N = ||x|| c_ij. ``lam`` as in
    :func:`lsoftmax_loss` (a float or a 0-d tensor)."""
    return _psi_loss("sphereface", x, weight, target, m, lam, common)


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

    With ``reduction="none"`` each non-ignored row gets its head-mean CE plus the whole
    diversity term (a property of the weights, not of a row) and ignored rows 0, so that the
    mean of the non-ignored rows is the "mean" loss (the rule of
    :class:`margin_kernels.nn.LMSoftmaxLoss`'s regularisers too); "sum" adds it once.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights)
        raise ValueError(f"weights must be a (K, C, D) tensor, got {shape}")
    if weights.shape[0] == 0:
        raise ValueError("weights must hold at least one head (K >= 1)")
    check_nonnegative("hsic_weight", hsic_weight)
    spec = MarginSpec.soft_margin(m)
    num_heads = weights.shape[0]
    ce = sum(margin_cross_entropy(x, weights[k], target, spec, **common) for k in range(num_heads))
    ce = ce / num_heads
    if num_heads == 1 or hsic_weight == 0:
        return ce
    pairs = list(itertools.combinations(range(num_heads), 2))
    diversity = hsic_weight * sum(reference.hsic(weights[a], weights[b]) for a, b in pairs)
    diversity = diversity / len(pairs)
    if common.get("reduction", "mean") == "none":
        diversity = torch.where(target != common.get("ignore_index", -100), diversity, 0.0)
    return ce + diversity


def sample_margin_regularization(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    *,
    reduction: str = "mean",
    validate: str = "async",
) -> torch.Tensor:
    """LM-Softmax sample-margin regulariser R_sm = mean_i (max_{j != y} c_ij - c_iy), over
    non-ignored rows. x: (B, D), weight: (C, D) with C >= 2 (a row needs a class j != y),
    target: (B,) int64. ``reduction``: "mean" (the regulariser; 0 when every row is ignored),
    "sum", or "none" for the (B,) per-row margins, 0 on ignored rows. O(B C) memory (torch)."""
    x, weight, target, _ = prepare_inputs(
        x, weight, target, reduction, ignore_index, "torch", None, validate
    )
    if weight.shape[0] < 2:
        raise ValueError(
            "sample_margin_regularization needs C >= 2 classes (max over j != y of an empty "
            f"set), got weight with C={weight.shape[0]}"
        )
    if reduction == "mean":
        return reference.sample_margin_regularization(x, weight, target, ignore_index)
    rows = _sample_margins(x, weight, target, ignore_index)
    return rows if reduction == "none" else rows.sum()


@reference._no_autocast
def _sample_margins(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """(B,) max_{j != y} c_ij - c_iy per row, 0 on ignored rows; their mean over the valid rows
    is :func:`margin_kernels.reference.sample_margin_regularization`."""
    cos = reference.cosine_matrix(x, weight)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    c_y = cos.gather(1, safe[:, None]).squeeze(1)
    hardest = cos.scatter(1, safe[:, None], -math.inf).max(dim=1).values
    return torch.where(valid, hardest - c_y, torch.zeros_like(c_y))


def zero_centroid_regularization(weight: torch.Tensor) -> torch.Tensor:
    """LM-Softmax zero-centroid regulariser R_w = ||sum_j W_j/||W_j|| ||^2; weight: (C, D)."""
    check_float_matrix("weight", weight, "(C, D)")
    return reference.zero_centroid_regularization(weight)


def hsic(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear-kernel HSIC between two classifiers over the same C classes:
    ``||(H u)^T (H v)||_F^2 / (C - 1)^2``. u: (C, D1), v: (C, D2); no C x C matrix is formed."""
    check_float_matrix("u", u, "(C, D1)")
    check_float_matrix("v", v, "(C, D2)")
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"u and v must have the same classes, got {u.shape[0]} and {v.shape[0]}")
    return reference.hsic(u, v)
