"""pytorch-metric-learning compatible margin heads, computed by the fused losses.

``ArcFaceLoss``, ``CosFaceLoss``, ``LargeMarginSoftmaxLoss`` and ``SphereFaceLoss`` take
pytorch-metric-learning's (PML's) arguments in its order, units (degrees for ArcFace) and
defaults, own its parameter ``W`` of shape ``(embedding_size, num_classes)`` with its
initialisation (``torch.nn.init.normal_``, mean 0, std 1), so a PML ``state_dict`` loads
strictly, and return PML's loss: the mean over the batch of the per-row margin cross-entropy.

The loss is :func:`margin_kernels.margin_cross_entropy` on ``W.t()`` (a transposed view, no copy;
every backend accepts the column-major weight), so on a GPU it runs the fused kernels and never
forms the B x C logits. The margins map exactly onto :class:`margin_kernels.MarginSpec`:

* ``ArcFaceLoss(margin=deg, scale=s)``: ``MarginSpec.arcface(s, radians(deg))`` with the exact
  gradient and PML's theta + m > pi fallback ``c - m sin m``;
* ``CosFaceLoss(margin=m, scale=s)``: ``MarginSpec.cosface(s, m)``;
* ``LargeMarginSoftmaxLoss(margin=m, scale=s)``: PML multiplies every logit by ``s``, which is
  L-Softmax (``MarginSpec.lsoftmax(m)``) of the features ``s x`` (both its target
  ``||W_y|| ||x|| psi_m(c)`` and its raw non-target logits ``W_j . x`` are linear in ``||x||``
  at fixed cosines);
* ``SphereFaceLoss(margin=m, scale=s)``: likewise ``MarginSpec.sphereface(m)`` of ``s x``.

Like PML, every forward casts ``W`` in place (``W.data``) to the embeddings' dtype and device, so
float16 embeddings make ``W`` float16, and the loss comes back in the embeddings' dtype.

What is not honoured raises ``ValueError`` at construction or call: reducers, distances,
weight and embedding regularisers, ``collect_stats``, ``ref_emb``/``ref_labels`` (PML's
classification losses refuse them too), margins outside margin_kernels' range (L-Softmax and
SphereFace m in 1..16, ArcFace in [0, 180) degrees, CosFace >= 0) and scales <= 0.
``indices_tuple`` (a miner's output) is honoured as PML does: each row's loss is weighted by how
often the row appears in the tuple, divided by the largest count.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

from .. import functional as F
from ..ops import BACKENDS
from ..spec import MAX_PSI_M, MarginSpec

__all__ = ["ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss"]

# PML keyword arguments this module cannot honour, with the value that means "not used": passing
# that value is accepted, anything else raises.
_UNSUPPORTED_DEFAULTS = {
    "reducer": None,
    "distance": None,
    "weight_regularizer": None,
    "weight_reg_weight": 1,
    "embedding_regularizer": None,
    "embedding_reg_weight": 1,
    "collect_stats": False,
}


def _check_kwargs(name: str, kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key not in _UNSUPPORTED_DEFAULTS:
            raise ValueError(f"{name} got an unexpected keyword argument {key!r}")
        if value is not _UNSUPPORTED_DEFAULTS[key] and value != _UNSUPPORTED_DEFAULTS[key]:
            raise ValueError(
                f"{name}: {key}={value!r} is not supported by margin_kernels.compat.pml (the "
                "fused loss computes the plain mean of the per-row losses with the cosine "
                "similarity); leave it at its default or keep using pytorch-metric-learning"
            )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _miner_weights(
    indices_tuple: object, batch: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """PML's per-row weights from a miner's ``indices_tuple``: count of each row's appearances
    over the largest count (0 for rows that never appear); None means every row weighs 1."""
    if indices_tuple is None:
        return None
    if not isinstance(indices_tuple, (tuple, list)) or not all(
        isinstance(t, torch.Tensor) for t in indices_tuple
    ):
        raise ValueError("indices_tuple must be a tuple of index tensors (a miner's output)")
    if all(t.numel() == 0 for t in indices_tuple):
        return None
    indices = torch.cat([t.reshape(-1).to(device=device, dtype=torch.int64) for t in indices_tuple])
    rows, counts = torch.unique(indices, return_counts=True)
    weights = torch.zeros(batch, dtype=dtype, device=device)
    weights[rows] = counts.to(dtype) / counts.max()
    return weights


class _PMLClassifierLoss(nn.Module):
    """Shared machinery; subclasses give PML's margin conversion and logit scaling."""

    # True when PML's ``scale`` multiplies logits that are linear in ||x||, so that it is
    # applied as a scale of the features (L-Softmax, SphereFace); else it is the spec's s.
    _scale_features = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float,
        scale: float,
        *,
        weight_init_func: Callable[[torch.Tensor], object] | None = None,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_kwargs(name, kwargs)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0:
            raise ValueError(f"{name}: scale must be a number > 0, got {scale!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.scale = float(scale)
        self.backend = backend
        self.margin = self._init_margin(margin)
        self._spec = self._make_spec()
        # PML's parameter: (embedding_size, num_classes), default init normal_(mean 0, std 1),
        # drawn in the same order from the same generator as PML does
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        self.weight_init_func = (
            weight_init_func if weight_init_func is not None else nn.init.normal_
        )
        self.weight_init_func(self.W)

    def _init_margin(self, margin: float) -> float:
        return margin

    def _make_spec(self) -> MarginSpec:
        raise NotImplementedError

    @property
    def spec(self) -> MarginSpec:
        """The :class:`MarginSpec` this head computes."""
        return self._spec

    def _cast_weight(self, embeddings: torch.Tensor) -> None:
        # PML casts its parameter in place on every call; code written against PML relies on W
        # following the embeddings (e.g. float16 embeddings make W float16)
        if self.W.dtype != embeddings.dtype or self.W.device != embeddings.device:
            self.W.data = self.W.data.to(device=embeddings.device, dtype=embeddings.dtype)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: tuple[torch.Tensor, ...] | None = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PML's loss: the mean over the batch of the rows' margin cross-entropy.

        Args:
            embeddings: (B, embedding_size) float16/bfloat16/float32/float64.
            labels: (B,) integer classes in [0, num_classes) (required).
            indices_tuple: optional miner output; rows are weighted as PML weights them.
            ref_emb, ref_labels: not supported (PML's classification losses refuse them too).

        Returns:
            The scalar loss in the embeddings' dtype.
        """
        name = type(self).__name__
        if labels is None:
            raise ValueError(f"{name}: labels are required")
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(f"{name}: ref_emb and ref_labels are not supported for this loss")
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D tensor (batch_size, embedding_size)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError("labels must be a 1D tensor of shape (batch_size,)")
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError("Number of embeddings must equal number of labels")
        labels = labels.to(embeddings.device)
        self._cast_weight(embeddings)
        weights = _miner_weights(
            indices_tuple, embeddings.shape[0], embeddings.dtype, embeddings.device
        )
        features = embeddings
        if self._scale_features and self.scale != 1:
            features = embeddings * self.scale
        loss = F.margin_cross_entropy(
            features,
            self.W.t(),
            labels,
            self._spec,
            reduction="mean" if weights is None else "none",
            backend=self.backend,
        )
        if weights is not None:
            loss = (loss * weights).mean()
        return loss.to(embeddings.dtype)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """PML's ``get_logits``: the (B, num_classes) scaled logits without the margin (these
        are B x C by nature: use them for evaluation, not for the training loss)."""
        weight = self.W.to(device=embeddings.device, dtype=embeddings.dtype)
        cosine = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(weight, dim=0)
        return self._scale_logits(cosine, embeddings, weight)

    def _scale_logits(
        self, cosine: torch.Tensor, embeddings: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        return cosine * self.scale

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"margin={self.margin}, scale={self.scale}, backend={self.backend!r}"
        )


class LargeMarginSoftmaxLoss(_PMLClassifierLoss):
    """PML's ``LargeMarginSoftmaxLoss`` (L-Softmax): integer ``margin`` m (PML truncates it with
    ``int``; here m must then lie in 1..16), every logit multiplied by ``scale``.

    Args:
        num_classes, embedding_size: C and D; ``W`` is (D, C).
        margin: m of psi_m (default 4).
        scale: multiplies every logit (default 1).
        weight_init_func: initialises ``W`` in place (default ``torch.nn.init.normal_``).
        backend: "auto" | "triton" | "cuda" | "torch" (margin_kernels' keyword).
    """

    _scale_features = True

    def __init__(
        self, num_classes: int, embedding_size: int, margin: int = 4, scale: float = 1, **kwargs
    ) -> None:
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin: float) -> int:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
            raise ValueError(f"margin must be a number, got {margin!r}")
        m = int(margin)  # PML truncates the margin to an int
        if not 1 <= m <= MAX_PSI_M:
            raise ValueError(
                f"{type(self).__name__}: margin must be an integer in 1..{MAX_PSI_M} here, "
                f"got {margin!r}"
            )
        return m

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.lsoftmax(self.margin)

    def _scale_logits(self, cosine, embeddings, weight):
        # logits = cos * ||W_j|| * ||x|| * scale (raw dots times scale)
        x_norm = torch.linalg.vector_norm(embeddings, dim=1)
        w_norm = torch.linalg.vector_norm(weight, dim=0)
        return cosine * w_norm[None, :] * x_norm[:, None] * self.scale


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """PML's ``SphereFaceLoss`` (A-Softmax): normalised W, logits ``||x|| psi_m(c)`` and
    ``||x|| c_j``, all multiplied by ``scale``. Arguments as :class:`LargeMarginSoftmaxLoss`."""

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.sphereface(self.margin)

    def _scale_logits(self, cosine, embeddings, weight):
        x_norm = torch.linalg.vector_norm(embeddings, dim=1)
        return cosine * x_norm[:, None] * self.scale


class ArcFaceLoss(_PMLClassifierLoss):
    """PML's ``ArcFaceLoss``: ``margin`` in **degrees** (default 28.6), ``scale`` s (64).
    Computes ``MarginSpec.arcface(s, radians(margin))`` with the exact gradient and, for
    theta > pi - m, PML's fallback ``c - m sin m``. Like PML, the attribute ``margin`` holds the
    margin in radians after construction.

    Args:
        num_classes, embedding_size: C and D; ``W`` is (D, C).
        margin: angular margin in degrees, in [0, 180).
        scale: s > 0.
        weight_init_func: initialises ``W`` in place (default ``torch.nn.init.normal_``).
        backend: "auto" | "triton" | "cuda" | "torch" (margin_kernels' keyword).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        **kwargs,
    ) -> None:
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin: float) -> float:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
            raise ValueError(f"margin must be a number of degrees, got {margin!r}")
        if not 0 <= margin < 180:
            raise ValueError(f"ArcFaceLoss: margin must lie in [0, 180) degrees, got {margin}")
        return math.radians(float(margin))

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.arcface(self.scale, self.margin, grad_mode="exact", overflow="fallback")


class CosFaceLoss(_PMLClassifierLoss):
    """PML's ``CosFaceLoss``: additive cosine ``margin`` (default 0.35), ``scale`` s (64); the
    target logit is ``s (c - margin)``. Arguments as :class:`ArcFaceLoss`, margin >= 0."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64,
        **kwargs,
    ) -> None:
        super().__init__(num_classes, embedding_size, margin, scale, **kwargs)

    def _init_margin(self, margin: float) -> float:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or margin < 0:
            raise ValueError(f"CosFaceLoss: margin must be a number >= 0, got {margin!r}")
        return float(margin)

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.cosface(self.scale, self.margin)
