"""insightface arcface_torch compatible heads, computed by the fused class-parallel loss.

``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False)`` and
``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)`` take arcface_torch's
arguments and follow its conventions:

* **Sharding and checkpoints.** Rank r of the default process group owns the classes
  ``[class_start, class_start + num_local)`` (the first ``num_classes % world_size`` ranks one
  more), in a parameter ``weight`` of shape ``(num_local, embedding_size)`` initialised
  ``N(0, 0.01)`` from the global generator, exactly as arcface_torch draws it. The state_dict
  holds ``weight`` only, so arcface_torch's per-rank checkpoints load with ``strict=True``.
* **Margins.** arcface_torch's ``CombinedMarginLoss`` has two branches. With ``m1 == 1`` and
  ``m3 == 0`` it is ArcFace: target ``s cos(theta + m2)`` with no theta + m2 > pi policy and a
  straight-through gradient (the margin is applied under ``no_grad``, so every logit's derivative
  with respect to its cosine is ``s``): ``MarginSpec.insightface_arcface(s, m2)``. With
  ``m3 > 0`` it is CosFace, ``s (c - m3)``, and m1, m2 are ignored: ``MarginSpec.cosface(s, m3)``.
  Any other combination raises (arcface_torch raises at the first forward; here it is a
  ``ValueError`` at construction).
* **Loss value.** The mean over the global batch of ``-log p_target``, with ``p_target`` clamped
  at 1e-30 as arcface_torch's ``DistCrossEntropy`` does: a row's loss never exceeds
  ``-log(1e-30) = 69.0776``. The clamp acts on the value only (arcface_torch's backward is the
  plain softmax gradient, and so is this one); it is matched so that loss curves and logged
  values agree with arcface_torch's even on rows whose target probability underflows.
* **Gradients.** The weight shard gets the gradient of the global loss. The embeddings get
  ``world_size`` times it, as arcface_torch's all-gather backward multiplies it to undo DDP's
  averaging: wrap the backbone in plain ``DistributedDataParallel`` (no comm hook) as
  arcface_torch's ``train_v2.py`` does.
* **Partial FC.** With ``sample_rate < 1`` each rank keeps every positive class of its shard and
  fills up to ``num_sample = int(sample_rate * num_local)`` classes with a uniform sample of the
  others, drawn (like arcface_torch) with ``torch.rand`` from the global CPU generator; when the
  positives outnumber ``num_sample`` all of them, and only them, are kept. The same global seed
  therefore samples the same classes as arcface_torch. Sampling happens in training and
  evaluation mode alike, as in arcface_torch.
* **fp16.** ``fp16=True`` runs the head's GEMMs in float16 (what arcface_torch's autocast region
  does to its ``linear``); the margin and the softmax statistics are float32.
* **Labels.** ``(B,)`` or ``(B, 1)``, integers in ``[0, num_classes)``; the caller's tensor is
  not modified (arcface_torch squeezes it in place).
* **One process.** Without an initialised ``torch.distributed`` the head owns every class and
  needs no collectives. The process group (the default one) is read at construction: create
  the head after ``init_process_group``, as arcface_torch requires.

The loss is computed by the fused backends (``lse_parts`` per shard, then one all-gather of
two floats per row), so no B x C logits exist on a GPU. Interclass filtering
(``interclass_filtering_threshold > 0``) zeroes the cosines of non-target classes above the
threshold (value 0, gradient 0) before the margin, as arcface_torch defines it; the fused
kernels have no such transform, so that case runs a torch path that forms the local (B, S)
cosines, as arcface_torch itself does.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .. import reference
from ..distributed import (
    HAS_DISTRIBUTED,
    _all_gather_flat,
    _gather_rows_padded,
    _GatherReplicated,
    _GatherRows,
    shard_range,
)
from ..ops import BACKENDS, resolve
from ..spec import MarginSpec

if HAS_DISTRIBUTED:
    import torch.distributed as dist

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]

# arcface_torch clamps each row's target probability at this floor in the loss value.
TARGET_PROB_FLOOR = 1e-30
_MAX_ROW_LOSS = -math.log(TARGET_PROB_FLOOR)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What a rank found wrong with its own inputs, exchanged so that every rank raises the same error.
_OK, _BAD_EMBEDDINGS, _BAD_LABELS, _BAD_DEVICE = range(4)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


class CombinedMarginLoss(nn.Module):
    """arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``.

    Called on cosine logits it behaves like the original: ``forward(logits (B, C), labels (B,)
    or (B, 1))`` with ``-1`` for rows that have no target among these classes returns the
    (B, C) logits ``s * margin(cos)``. Unlike the original it does not modify ``logits`` in
    place. :class:`PartialFC_V2` reads :attr:`spec` instead and never forms the logits.

    Args:
        s: scale (> 0).
        m1, m2, m3: ``m1 == 1, m3 == 0``: ArcFace with angular margin m2 (straight-through
            gradient, plain cos(theta + m2)); ``m3 > 0``: CosFace with margin m3 (m1, m2
            ignored, as in arcface_torch).
        interclass_filtering_threshold: when > 0, non-target cosines above it become 0 (value
            and gradient) before the margin.
    """

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        interclass_filtering_threshold: float = 0,
    ) -> None:
        super().__init__()
        self.s = _real("s", s)
        self.m1 = _real("m1", m1)
        self.m2 = _real("m2", m2)
        self.m3 = _real("m3", m3)
        self.interclass_filtering_threshold = _real(
            "interclass_filtering_threshold", interclass_filtering_threshold
        )
        if self.m1 == 1.0 and self.m3 == 0.0:
            self.branch = "arcface"
            self._spec = MarginSpec.insightface_arcface(self.s, self.m2)
        elif self.m3 > 0:
            self.branch = "cosface"
            self._spec = MarginSpec.cosface(self.s, self.m3)
        else:
            raise ValueError(
                "CombinedMarginLoss supports arcface_torch's two branches: m1 == 1 and m3 == 0 "
                f"(ArcFace), or m3 > 0 (CosFace); got m1={m1}, m2={m2}, m3={m3}"
            )

    @property
    def spec(self) -> MarginSpec:
        """The :class:`MarginSpec` of the branch: ``insightface_arcface(s, m2)`` or
        ``cosface(s, m3)``."""
        return self._spec

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (B, C) cosines in [-1, 1]; labels: (B,) or (B, 1) int64 in [0, C) or -1 ->
        (B, C) margin logits, scaled by s."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError("logits must be a 2-D tensor (B, C) of cosines")
        labels = _flat_labels(labels, logits.shape[0])
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        threshold = self.interclass_filtering_threshold
        if threshold > 0:
            with torch.no_grad():
                dirty = logits > threshold
                dirty[rows, cols] = False
            # filtered cosines become 0 with zero gradient
            logits = logits.masked_fill(dirty, 0.0)
        target = logits[rows, cols]
        if self.branch == "arcface":
            # value cos(theta + m2), no theta + m2 > pi policy; gradient straight through
            angle = torch.acos(target.detach().clamp(-1.0, 1.0)) + self.m2
            target = target + (torch.cos(angle) - target).detach()
        else:
            target = target - self.m3
        return logits.index_put((rows, cols), target) * self.s

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, "
            f"branch={self.branch!r}"
        )


def _as_combined(margin_loss: object) -> CombinedMarginLoss:
    """Our CombinedMarginLoss from ours or from an arcface_torch margin module (read through its
    attributes: CombinedMarginLoss s/m1/m2/m3, ArcFace s/margin, CosFace s/m)."""
    if isinstance(margin_loss, CombinedMarginLoss):
        return margin_loss
    attrs = vars(margin_loss) if hasattr(margin_loss, "__dict__") else {}
    if {"s", "m1", "m2", "m3"} <= attrs.keys():
        threshold = attrs.get("interclass_filtering_threshold", 0)
        return CombinedMarginLoss(attrs["s"], attrs["m1"], attrs["m2"], attrs["m3"], threshold)
    if {"s", "margin"} <= attrs.keys():
        return CombinedMarginLoss(attrs["s"], 1.0, attrs["margin"], 0.0)
    if {"s", "m"} <= attrs.keys():
        return CombinedMarginLoss(attrs["s"], 1.0, 0.0, attrs["m"])
    raise ValueError(
        "margin_loss must be a CombinedMarginLoss (this module's or arcface_torch's) or "
        "arcface_torch's ArcFace/CosFace: the fused head needs the margin's parameters, not an "
        f"arbitrary function of the logits; got {type(margin_loss).__name__}"
    )


def _flat_labels(labels: object, rows: int) -> torch.Tensor:
    """(B,) or (B, 1) integer labels -> (B,) int64 (a view when possible, never in place)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor (B,) or (B, 1), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integers (int64), got {labels.dtype}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(
            f"labels must have shape ({rows},) or ({rows}, 1), got {tuple(labels.shape)}"
        )
    return labels.long()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


@reference._no_autocast
def _filtered_lse_parts(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    spec: MarginSpec,
    class_ids: torch.Tensor | None = None,
    deterministic: bool = False,
    *,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_parts`` (contract of :func:`margin_kernels.reference.lse_parts`) with arcface_torch's
    interclass filtering: non-target cosines above ``threshold`` become 0, value and gradient.
    Torch code on the (B, S) cosines: the fused kernels have no filtered transform."""
    cd = reference.compute_dtype(x, weight)
    xf, wf = x.to(cd), weight.to(cd)
    num_classes = wf.shape[0]
    has_target = (target >= 0) & (target < num_classes)
    safe_target = torch.where(has_target, target, torch.zeros_like(target))
    cols = wf if class_ids is None else wf[class_ids]
    col_ids = torch.arange(num_classes, device=wf.device) if class_ids is None else class_ids
    x_norm = reference.row_norm(xf)
    cos = (xf @ cols.T) / (x_norm[:, None] * reference.row_norm(cols)[None, :])
    is_target = col_ids[None, :] == target[:, None]
    with torch.no_grad():
        dirty = (cos > threshold) & ~is_target
    logits = spec.s * cos.masked_fill(dirty, 0.0)
    neg_lse = torch.logsumexp(logits.masked_fill(is_target, -math.inf), dim=1)
    w_y = wf[safe_target]
    w_y_norm = reference.row_norm(w_y)
    c_y = (xf * w_y).sum(-1) / (x_norm * w_y_norm)
    t = reference.target_transform(c_y, x_norm, w_y_norm, spec)
    return neg_lse, torch.where(has_target, t, torch.zeros_like(t))


class PartialFC_V2(nn.Module):
    """arcface_torch's ``PartialFC_V2`` head on the fused class-parallel loss; see the module
    docstring for the conventions it keeps.

    Args:
        margin_loss: a :class:`CombinedMarginLoss` (this module's or arcface_torch's), or
            arcface_torch's ``ArcFace``/``CosFace``.
        embedding_size: D.
        num_classes: C, over all ranks (>= world size).
        sample_rate: Partial FC rate in (0, 1].
        fp16: run the head's GEMMs in float16.
        backend: "auto" | "triton" | "cuda" | "torch" (margin_kernels' keyword).

    Attributes:
        rank, world_size, class_start, num_local, num_sample: as in arcface_torch.
        weight: (num_local, embedding_size) Parameter, this rank's classes.
        margin_softmax: the :class:`CombinedMarginLoss`.
        weight_index: the local class ids the last sampled step used (sample_rate < 1).
    """

    def __init__(
        self,
        margin_loss: Callable,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if HAS_DISTRIBUTED and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.margin_softmax = _as_combined(margin_loss)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.backend = backend
        self.class_start, class_end = shard_range(num_classes, self.rank, self.world_size)
        self.num_local = class_end - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight_index: torch.Tensor | None = None
        self._warned_empty_sample = False
        # arcface_torch's draw: N(0, 0.01) from the global CPU generator, float32
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    # --- Partial FC ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_class_ids(self, local_target: torch.Tensor) -> torch.Tensor:
        """The local class ids (S,) int64, ascending, of one sampled step: every positive
        (``local_target`` entries >= 0, shard-local ids) plus uniformly drawn others up to
        ``num_sample``; only the positives when they are more. Draws ``torch.rand(num_local)``
        from the global CPU generator, as arcface_torch does."""
        device = self.weight.device
        positive = torch.unique(local_target[local_target >= 0], sorted=True).to(device)
        if self.num_sample >= positive.numel():
            keys = torch.rand(self.num_local).to(device)
            keys[positive] = 2.0  # positives first
            index = torch.topk(keys, k=self.num_sample).indices.sort().values
        else:
            index = positive
        if index.numel() == 0 and not self._warned_empty_sample:
            # int(sample_rate * num_local) == 0 and no positive here: this rank's classes leave
            # the denominator entirely (arcface_torch does the same, silently)
            self._warned_empty_sample = True
            warnings.warn(
                f"PartialFC_V2 on rank {self.rank} sampled 0 of its {self.num_local} classes "
                f"(int(sample_rate * num_local) = int({self.sample_rate} * {self.num_local}) = 0 "
                "and no label of the batch lies in its shard): its classes leave the softmax "
                "denominator for this step, and the loss is 0 when every label sits on one "
                "rank. Raise sample_rate so that each rank samples at least one class. "
                "(warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.weight_index = index
        return index

    # --- forward ----------------------------------------------------------------------------
    def _exchange(self, code: int, rows: int, width: int) -> tuple[int, ...]:
        """All-gather every rank's (error code, B_r, D_r); raise the same ValueError on every
        rank when one rank's inputs are bad. Returns the local batch sizes."""
        record = torch.tensor([code, rows, width], dtype=torch.int64, device=self.weight.device)
        table = _all_gather_flat(record, self.world_size, None).view(self.world_size, 3).tolist()
        for r, (code_r, _, width_r) in enumerate(table):
            self._raise_for(code_r, width_r, f"rank {r}: ")
        return tuple(row[1] for row in table)

    def _raise_for(self, code: int, width: int, prefix: str = "") -> None:
        messages = {
            _BAD_EMBEDDINGS: "local_embeddings must be a 2-D float tensor (B, embedding_size)",
            _BAD_LABELS: "local_labels must be integer labels of shape (B,) or (B, 1)",
            _BAD_DEVICE: f"local_embeddings and local_labels must be on the weight's device "
            f"({self.weight.device})",
        }
        if code != _OK:
            raise ValueError(prefix + messages[code])
        if width != self.embedding_size:
            raise ValueError(
                f"{prefix}local_embeddings have {width} features but embedding_size="
                f"{self.embedding_size}"
            )

    def _local_code(self, embeddings: object, labels: object) -> tuple[int, int, int]:
        if (
            not isinstance(embeddings, torch.Tensor)
            or embeddings.dim() != 2
            or embeddings.dtype not in _FLOAT_DTYPES
        ):
            return _BAD_EMBEDDINGS, -1, -1
        rows, width = embeddings.shape
        try:
            labels = _flat_labels(labels, rows)
        except ValueError:
            return _BAD_LABELS, rows, width
        if embeddings.device != self.weight.device or labels.device != self.weight.device:
            return _BAD_DEVICE, rows, width
        return _OK, rows, width

    def _check_global_labels(self, labels: torch.Tensor) -> None:
        in_range = (labels >= 0) & (labels < self.num_classes)
        if labels.device.type != "cpu":
            torch._assert_async(in_range.all(), f"labels out of range [0, {self.num_classes})")
        elif labels.numel() and not bool(in_range.all()):
            bad = labels[~in_range][0].item()
            raise IndexError(f"label {bad} is out of range [0, {self.num_classes})")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch (the same on every rank; every rank must call it).

        Args:
            local_embeddings: (B_r, embedding_size) float16/bfloat16/float32/float64.
            local_labels: (B_r,) or (B_r, 1) integer global class ids in [0, num_classes).

        Returns:
            The scalar mean loss, float32 (float64 for float64 inputs).
        """
        code, rows, width = self._local_code(local_embeddings, local_labels)
        sharded = self.world_size > 1
        if sharded:
            sizes = self._exchange(code, rows, width)
        else:
            self._raise_for(code, width)
        labels = _flat_labels(local_labels, rows)
        embeddings = local_embeddings
        if sharded:
            # arcface_torch's all-gather backward multiplies the embedding gradient by the
            # world size, to cancel DDP's averaging of the backbone's gradients
            embeddings = _ScaleGrad.apply(embeddings, float(self.world_size))
            embeddings = _GatherRows.apply(embeddings, sizes, self.rank, None)
            labels, _ = _gather_rows_padded(labels, sizes, None)
        self._check_global_labels(labels)
        # lse_parts contract: a target outside [0, num_local) (another rank's) masks nothing
        owned = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_target = torch.where(owned, labels - self.class_start, -1)
        class_ids = self.sample_class_ids(local_target) if self.sample_rate < 1 else None

        spec = self.margin_softmax.spec
        weight = self.weight
        if self.fp16:
            embeddings, weight = embeddings.to(torch.float16), weight.to(torch.float16)
        elif embeddings.dtype != weight.dtype:
            common = torch.promote_types(embeddings.dtype, weight.dtype)
            embeddings, weight = embeddings.to(common), weight.to(common)
        threshold = self.margin_softmax.interclass_filtering_threshold
        if threshold > 0:
            lse_parts = functools.partial(_filtered_lse_parts, threshold=threshold)
        else:
            _, lse_parts = resolve(self.backend, weight.device, spec, embeddings, weight, class_ids)
        # the operands are cast explicitly above; a surrounding autocast must not recast them
        with torch.autocast(weight.device.type, enabled=False):
            neg_lse, target_logit = lse_parts(embeddings, weight, local_target, spec, class_ids)

        if sharded:
            stats = _GatherReplicated.apply(
                torch.stack([neg_lse, target_logit], dim=1), self.world_size, self.rank, None
            )
            # LSE over every shard's non-target logits; only the owner's target logit is non-zero
            neg_lse = torch.logsumexp(stats[..., 0], dim=0)
            target_logit = stats[..., 1].sum(dim=0)
        valid = torch.ones_like(labels, dtype=torch.bool)
        row_loss = reference.loss_from_parts(neg_lse, target_logit, valid, spec, "none")
        # arcface_torch's value clamp p_target >= 1e-30, i.e. loss <= 69.0776; value only
        row_loss = row_loss - (row_loss - row_loss.clamp_max(_MAX_ROW_LOSS)).detach()
        return row_loss.sum() / max(row_loss.shape[0], 1)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_start + self.num_local}), "
            f"rank={self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
            f"fp16={self.fp16}, backend={self.backend!r}"
        )
