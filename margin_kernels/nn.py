"""Loss modules: each owns its class weight (C, D) and, for L-Softmax/SphereFace, the lambda
annealing schedule; the math lives in :mod:`margin_kernels.functional`.

``forward(embeddings (B, D), labels (B,) int64, class_ids=None) -> loss``. ``scores(embeddings)``
gives the (B, C) prediction scores (cosine, or raw logits for the raw-weight kinds) for
evaluation. Partial FC in one process: ``head(x, y, class_ids=sampler(y))`` with a
:class:`PartialFCSampler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import functional as F
from .spec import MarginSpec
from .validation import check_options

__all__ = [
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "EMSoftmaxLoss",
    "LMSoftmaxLoss",
    "LSoftmaxLoss",
    "LambdaSchedule",
    "PartialFCSampler",
    "SOSoftmaxLoss",
    "SphereFaceLoss",
    "WSoftmaxLoss",
]


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda(iter) = max(lambda_min, base * (1 + gamma * iter) ** (-power)), the psi blending
    schedule of the L-Softmax and SphereFace training recipes. Every field is a finite real
    number >= 0."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0

    def __post_init__(self) -> None:
        for name in ("base", "gamma", "power", "lambda_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LambdaSchedule {name} must be a real number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LambdaSchedule {name} must be finite and >= 0, got {value!r}")

    def __call__(self, iteration: int) -> float:
        return max(self.lambda_min, self.base * (1 + self.gamma * iteration) ** (-self.power))

    def at(self, iteration: torch.Tensor) -> torch.Tensor:
        """The same schedule on a 0-d integer tensor, as a 0-d float64 tensor on its device
        (float32 on MPS): computed on the device, so a compiled step reads the iteration as a
        graph input and never recompiles as lambda anneals."""
        dtype = torch.float32 if iteration.device.type == "mps" else torch.float64
        decayed = self.base * (1 + self.gamma * iteration.to(dtype)) ** (-self.power)
        return decayed.clamp_min(self.lambda_min)

    @classmethod
    def sphereface(cls) -> LambdaSchedule:
        """SphereFace's official Caffe recipe: base 1000, gamma 0.12, power 1, min 5."""
        return cls(1000.0, 0.12, 1.0, 5.0)

    @classmethod
    def lsoftmax_mnist(cls) -> LambdaSchedule:
        """L-Softmax's MNIST recipe: base 1000, gamma 2.5e-5, power 35, min 0."""
        return cls(1000.0, 2.5e-5, 35.0, 0.0)


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be an int > 0, got {value!r}")


class _MarginLoss(nn.Module):
    """Weight (C, D), common options and forward; subclasses only describe their margin.

    Every argument is validated here, at construction (``ValueError`` naming it), not at the
    first forward. ``validate`` is the functions' keyword (see :mod:`margin_kernels.functional`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        deterministic: bool = False,
        validate: str = "async",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_size("in_features", in_features)
        _check_size("num_classes", num_classes)
        check_options(reduction, ignore_index, backend, validate)
        self.in_features = in_features
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        # run-to-run identical gradients from the fused backends (see margin_cross_entropy)
        self.deterministic = bool(deterministic)
        self.validate = validate
        self.weight = nn.Parameter(
            torch.empty(num_classes, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()
        self._init_state()
        self.margin()  # validate the hyper-parameters now, not at the first forward

    def _init_state(self) -> None:
        """Buffers of a subclass, registered before the margin is first validated."""

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation: rows of comparable norm, no class favoured.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def margin(self) -> MarginSpec:
        """The MarginSpec of the current step."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """embeddings: (B, D) float; labels: (B,) int64; class_ids: optional (S,) int64 distinct
        class ids of the denominator (Partial FC, e.g. from :class:`PartialFCSampler`) -> loss
        (scalar, or (B,) for 'none')."""
        return F.margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.margin(),
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            class_ids=class_ids,
            deterministic=self.deterministic,
            validate=self.validate,
        )

    @torch.no_grad()
    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) prediction scores: cosine for normalised-weight kinds, raw logits otherwise;
        ``scores(x).argmax(1)`` is the predicted class."""
        w = self.weight.to(embeddings.dtype)
        if self.margin().normalizes_weight:
            return nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(w, dim=1).T
        return embeddings @ w.T

    def extra_repr(self) -> str:
        spec = self.margin()
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyper().items())
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, {hyper}, "
            f"kind={spec.kind}, reduction={self.reduction!r}, backend={self.backend!r}"
        )

    def _hyper(self) -> dict:
        return {}


class _PsiLoss(_MarginLoss):
    """L-Softmax / SphereFace: integer margin m and a lambda that is fixed or annealed.

    With a ``schedule``, the iteration counter is a 0-d int64 buffer on the weight's device and
    lambda is computed from it on the device (:meth:`LambdaSchedule.at`) and passed to the loss
    as a 0-d tensor: a ``torch.compile``-d training step reads both as graph inputs, so
    annealing never recompiles. The counter advances once per forward in training mode with
    gradients enabled: not in ``eval()``, nor under ``torch.no_grad()`` / ``inference_mode``
    (an evaluation loop that forgot ``.eval()`` does not move the schedule). It is saved in the
    state_dict (extra state), so a checkpoint resumes the schedule where it stopped.
    """

    _kind = ""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        lam: float = 0.0,
        schedule: LambdaSchedule | None = None,
        **common,
    ) -> None:
        if schedule is not None and not isinstance(schedule, LambdaSchedule):
            raise ValueError(f"schedule must be a LambdaSchedule or None, got {schedule!r}")
        self.m = m
        self.lam = lam
        self.schedule = schedule
        super().__init__(in_features, num_classes, **common)

    def _init_state(self) -> None:
        # non-persistent: the state_dict carries it as extra state (a plain int), as before
        self.register_buffer(
            "_iteration",
            torch.zeros((), dtype=torch.int64, device=self.weight.device),
            persistent=False,
        )

    @property
    def iteration(self) -> int:
        """Training forwards done so far (reading it syncs with the device)."""
        return int(self._iteration)

    @iteration.setter
    def iteration(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"iteration must be an int >= 0, got {value!r}")
        self._iteration.fill_(value)

    @property
    def current_lambda(self) -> float:
        return self.lam if self.schedule is None else self.schedule(self.iteration)

    def get_extra_state(self) -> dict:
        return {"iteration": self.iteration}

    def set_extra_state(self, state: dict) -> None:
        self.iteration = int(state["iteration"])

    def margin(self) -> MarginSpec:
        return MarginSpec(self._kind, m=self.m, lam=self.current_lambda)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`_MarginLoss.forward`, with lambda of the current iteration."""
        lam = self.lam if self.schedule is None else self.schedule.at(self._iteration)
        loss_fn = F.lsoftmax_loss if self._kind == "lsoftmax" else F.sphereface_loss
        loss = loss_fn(
            embeddings,
            self.weight,
            labels,
            m=self.m,
            lam=lam,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            class_ids=class_ids,
            deterministic=self.deterministic,
            validate=self.validate,
        )
        if self.schedule is not None and self.training and torch.is_grad_enabled():
            self._iteration = self._iteration + 1
        return loss

    def _hyper(self) -> dict:
        out = {"m": self.m, "lam": self.current_lambda}
        if self.schedule is not None:
            out["schedule"] = self.schedule
        return out


class LSoftmaxLoss(_PsiLoss):
    """L-Softmax (raw logits, psi_m target). ``schedule=LambdaSchedule.lsoftmax_mnist()``
    anneals lambda as the paper's recipe; otherwise ``lam`` is fixed."""

    _kind = "lsoftmax"


class SphereFaceLoss(_PsiLoss):
    """A-Softmax / SphereFace (normalised weights, psi_m target scaled by ||x||).
    ``schedule=LambdaSchedule.sphereface()`` anneals lambda as the official recipe."""

    _kind = "sphereface"


class CosFaceLoss(_MarginLoss):
    """CosFace / AM-Softmax: s (c - m)."""

    def __init__(
        self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.35, **common
    ) -> None:
        self.s, self.m = s, m
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.cosface(self.s, self.m)

    def _hyper(self) -> dict:
        return {"s": self.s, "m": self.m}


class ArcFaceLoss(_MarginLoss):
    """ArcFace: s cos(theta + m) with ``grad_mode`` and ``overflow`` as in
    :func:`margin_kernels.arcface_loss`."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        grad_mode: str = "exact",
        overflow: str = "fallback",
        **common,
    ) -> None:
        self.s, self.m, self.grad_mode, self.overflow = s, m, grad_mode, overflow
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.arcface(self.s, self.m, self.grad_mode, self.overflow)

    def _hyper(self) -> dict:
        return {"s": self.s, "m": self.m, "grad_mode": self.grad_mode, "overflow": self.overflow}


class CombinedMarginLoss(_MarginLoss):
    """Combined margin: s (cos(m1 theta + m2) - m3)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        grad_mode: str = "exact",
        **common,
    ) -> None:
        self.s, self.m1, self.m2, self.m3, self.grad_mode = s, m1, m2, m3, grad_mode
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.combined(self.s, self.m1, self.m2, self.m3, self.grad_mode)

    def _hyper(self) -> dict:
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3}


class SOSoftmaxLoss(_MarginLoss):
    """SO-Softmax (third-party form): lambda_p (m^2 - (c - 1)^2) vs lambda_n (c^2 - m^2)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        lambda_p: float = 2.0,
        lambda_n: float = 2.0,
        m: float = 0.3,
        **common,
    ) -> None:
        self.lambda_p, self.lambda_n, self.m = lambda_p, lambda_n, m
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.so_softmax(self.lambda_p, self.lambda_n, self.m)

    def _hyper(self) -> dict:
        return {"lambda_p": self.lambda_p, "lambda_n": self.lambda_n, "m": self.m}


class WSoftmaxLoss(_MarginLoss):
    """W-Softmax (third-party form) with target-direction weight ``alpha``."""

    def __init__(self, in_features: int, num_classes: int, alpha: float = 1.5, **common) -> None:
        self.alpha = alpha
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.w_softmax(self.alpha)

    def _hyper(self) -> dict:
        return {"alpha": self.alpha}


class LMSoftmaxLoss(_MarginLoss):
    """LM-Softmax (target left out of the denominator, so ``num_classes`` >= 2) plus its
    optional regularisers: ``sample_margin_weight * R_sm + zero_centroid_weight * R_w``.

    Reductions with regularisers: "mean" adds both terms to the mean loss; "sum" adds them
    once to the summed loss; "none" gives each non-ignored row
    ``loss_i + sample_margin_weight * margin_i + zero_centroid_weight * R_w`` (``margin_i`` its
    own sample margin) and each ignored row 0, so that the mean of the non-ignored rows is the
    "mean" loss.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 5.0,
        sample_margin_weight: float = 0.0,
        zero_centroid_weight: float = 0.0,
        **common,
    ) -> None:
        F.check_nonnegative("sample_margin_weight", sample_margin_weight)
        F.check_nonnegative("zero_centroid_weight", zero_centroid_weight)
        if not isinstance(num_classes, bool) and isinstance(num_classes, int) and num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 for LM-Softmax (its denominator holds only the "
                f"non-target classes), got {num_classes}"
            )
        self.s = s
        self.sample_margin_weight = sample_margin_weight
        self.zero_centroid_weight = zero_centroid_weight
        super().__init__(in_features, num_classes, **common)

    def margin(self) -> MarginSpec:
        return MarginSpec.lm_softmax(self.s)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = super().forward(embeddings, labels, class_ids)
        per_row = self.reduction == "none"
        if self.sample_margin_weight:
            # per row under "none" (0 on ignored rows), else the mean over valid rows, R_sm
            loss = loss + self.sample_margin_weight * F.sample_margin_regularization(
                embeddings,
                self.weight,
                labels,
                self.ignore_index,
                reduction="none" if per_row else "mean",
                validate=self.validate,
            )
        if self.zero_centroid_weight:
            centroid = self.zero_centroid_weight * F.zero_centroid_regularization(self.weight)
            if per_row:
                # a property of the weight: every non-ignored row carries it, ignored rows 0
                centroid = torch.where(labels != self.ignore_index, centroid, 0.0)
            loss = loss + centroid
        return loss

    def _hyper(self) -> dict:
        return {
            "s": self.s,
            "sample_margin_weight": self.sample_margin_weight,
            "zero_centroid_weight": self.zero_centroid_weight,
        }


class EMSoftmaxLoss(_MarginLoss):
    """EM-Softmax: ``num_heads`` soft-margin classifiers on one shared feature, weight
    (K, C, D), with the HSIC diversity term. ``scores`` averages the heads' raw logits."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_heads: int = 2,
        m: float = 0.1,
        hsic_weight: float = 0.1,
        **common,
    ) -> None:
        _check_size("num_heads", num_heads)
        F.check_nonnegative("hsic_weight", hsic_weight)
        self.num_heads, self.m, self.hsic_weight = num_heads, m, hsic_weight
        super().__init__(in_features, num_classes, **common)
        self.weight = nn.Parameter(
            torch.empty(
                num_heads,
                num_classes,
                in_features,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.dim() == 3:
            for head in self.weight:
                nn.init.kaiming_uniform_(head, a=math.sqrt(5))

    def margin(self) -> MarginSpec:
        return MarginSpec.soft_margin(self.m)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.em_softmax_loss(
            embeddings,
            self.weight,
            labels,
            m=self.m,
            hsic_weight=self.hsic_weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            class_ids=class_ids,
            deterministic=self.deterministic,
            validate=self.validate,
        )

    @torch.no_grad()
    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,kcd->bc", embeddings, self.weight.to(embeddings.dtype)) / (
            self.num_heads
        )

    def _hyper(self) -> dict:
        return {"num_heads": self.num_heads, "m": self.m, "hsic_weight": self.hsic_weight}


class PartialFCSampler(nn.Module):
    """Partial FC class sampling in one process, for the loss modules' ``class_ids``:
    ``loss = head(x, y, class_ids=sampler(y))``.

    Each training call keeps every positive class of ``labels`` (labels other than
    ``ignore_index``) plus a uniform sample of the other classes,
    ``S = min(C, max(ceil(r C), B))`` ids in all (the rule of
    :class:`margin_kernels.distributed.ClassParallelMarginLoss` with one shard): bounding by the
    batch size B keeps every positive with a size known on the host, so sampling never syncs the
    device. In eval mode it returns None, and the head computes the exact loss.

    The stream is seeded by ``(seed, step)``; ``step`` counts training calls and is saved in
    the state_dict, so a resumed run draws the same classes as an uninterrupted one.

    Args:
        num_classes: C, the head's number of classes.
        sample_rate: r in (0, 1]; 1 keeps every class.
        seed: seeds the stream.
        ignore_index: the label of rows that have no positive class.
    """

    def __init__(
        self, num_classes: int, sample_rate: float, *, seed: int = 0, ignore_index: int = -100
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.seed = seed
        self.ignore_index = ignore_index
        # a host-side int (no device sync to read it), saved as extra state
        self.step = 0

    def num_sampled(self, batch: int) -> int:
        """S = min(C, max(ceil(r C), B)) for a batch of B rows."""
        # round() first: r * C = 3.0000000000000004 must not become 4
        wanted = math.ceil(round(self.sample_rate * self.num_classes, 9))
        return min(self.num_classes, max(wanted, batch))

    def forward(self, labels: torch.Tensor) -> torch.Tensor | None:
        """labels: (B,) int64 in [0, C) or ``ignore_index`` -> (S,) int64 class ids, ascending,
        on the labels' device; None in eval mode."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError("labels must be a 1-D integer tensor (B,)")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must hold integers (int64), got {labels.dtype}")
        if not self.training:
            return None
        from .distributed import _stream_seed

        device = labels.device
        labels = labels.long()
        valid = labels != self.ignore_index
        # positives scatter into their slot; ignored rows into a spare slot C, dropped
        slots = torch.where(valid, labels, self.num_classes).clamp(0, self.num_classes)
        positive = torch.zeros(self.num_classes + 1, dtype=torch.bool, device=device)
        positive = positive.index_fill_(0, slots, True)[: self.num_classes]
        generator = torch.Generator(device=device)
        generator.manual_seed(_stream_seed("partial_fc_sampler", self.seed, self.step))
        # uniform keys in [0, 1) rank the negatives at random; positives get key 2: taken first
        keys = torch.rand(self.num_classes, generator=generator, device=device)
        keys = keys.masked_fill(positive, 2.0)
        chosen = keys.topk(self.num_sampled(labels.shape[0]), sorted=False).indices
        self.step += 1
        return chosen.sort().values

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, sample_rate={self.sample_rate}, seed={self.seed}, "
            f"step={self.step}"
        )
