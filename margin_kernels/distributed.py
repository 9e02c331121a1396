"""Class-parallel margin loss and Partial-FC class sampling on ``torch.distributed``.

Each rank of a process group owns a contiguous shard ``[class_start, class_end)`` of the C
classes and its ``(C_r, D)`` weight. A forward step

1. all-gathers the local embeddings ``(B_r, D)`` and labels ``(B_r,)`` of every rank into the
   global batch ``(B, D)``, ``B = sum_r B_r``, in rank order (autograd-aware: the backward
   reduce-scatters the embedding gradient, summing every shard's contribution to each row);
2. runs the backend's fused ``lse_parts`` over the local shard (labels shifted into the shard;
   labels owned elsewhere have no target there), giving per row the log-sum-exp of the shard's
   non-target logits and the target logit, which is non-zero only on the owning rank;
3. all-gathers the ``(B, 2)`` per-row statistics of every shard (one small collective) and
   combines them exactly: ``neg_lse = logsumexp_r neg_lse_r``, ``t = sum_r t_r``, then
   :func:`margin_kernels.reference.loss_from_parts`.

Gradient convention: every rank returns the same loss (the single-process loss of the global
batch), and every rank must call ``backward`` on it (or on the same function of it). Backward on
each rank then yields exactly the single-process gradient for its own embedding rows and its own
weight shard, not ``world_size`` times it: the statistics gather passes each rank only its own
slice of the replicated gradient, and the embedding gather sums the shards' partial row
gradients. See ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import struct

import torch
from torch import nn

from . import reference
from .ops import resolve, unavailable_reason
from .spec import GRAD_MODES, KIND_IDS, OVERFLOW_POLICIES, MarginSpec
from .validation import (
    BACKENDS,
    FLOAT_DTYPES,
    REDUCTIONS,
    check_labels,
    check_options,
    float_matrix_problem,
    label_vector_problem,
)

HAS_DISTRIBUTED = torch.distributed.is_available()
if HAS_DISTRIBUTED:
    import torch.distributed as dist

__all__ = ["HAS_DISTRIBUTED", "ClassParallelMarginLoss", "allreduce_sum_hook", "shard_range"]

# Reductions and embedding dtypes travel in the metadata all-gather as indices of
# validation.REDUCTIONS and validation.FLOAT_DTYPES.

# Metadata error codes: what a rank found wrong with its own inputs, so that every rank can
# raise the same ValueError instead of leaving the others waiting in a collective.
_OK, _BAD_EMBEDDINGS, _BAD_DTYPE, _BAD_LABELS, _BAD_DEVICE = range(5)
# Leading fields of a rank's metadata record: (error code, D, embedding dtype code, B_r, backend
# index in BACKENDS, whether that backend can run on the rank: 0 yes, 1 no); the configuration
# fields of _config_fields follow.
_INPUT_FIELDS = 6
# The default bound on how long a rank waits in the step's collectives for the others.
DEFAULT_STEP_TIMEOUT_S = 60.0


def _float_bits(value: float) -> int:
    """A float as the int64 of its IEEE-754 bits: exact in the int64 metadata record."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _name_of(table: dict, code: int) -> str:
    return next((name for name, c in table.items() if c == code), str(code))


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(class_start, class_end)`` of the classes rank ``rank`` owns out of ``num_classes``.

    Contiguous shards in rank order; when ``world_size`` does not divide ``num_classes`` the first
    ``num_classes % world_size`` ranks own one class more (C=11 over 3 ranks: [0, 4), [4, 8),
    [8, 11)). Requires ``num_classes >= world_size`` so that no shard is empty.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world={world_size}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} must be >= world_size={world_size} (one class per rank)"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# No return annotation: DDP rejects a hook whose annotation is not the evaluated
# torch.futures.Future[torch.Tensor], and this module's annotations are strings.
def allreduce_sum_hook(process_group, bucket):
    """DDP communication hook that sums gradients over the ranks instead of averaging them.

    Register it on the backbone's ``DistributedDataParallel`` wrapper when the head is a
    :class:`ClassParallelMarginLoss`: ``model.register_comm_hook(None, allreduce_sum_hook)``.
    Every rank's loss is the loss of the whole global batch and each rank's backbone gradient
    holds its own rows' share of it, so the sum over ranks is the single-process gradient; DDP's
    default mean would give the backbone 1/world_size of it (an effective learning rate of
    lr/world_size) while the head gets the full gradient.

    Args:
        process_group: the group DDP passes as hook state (``None``: the default group).
        bucket: DDP's ``GradBucket``; its flat buffer is summed in place.

    Returns:
        ``torch.futures.Future[torch.Tensor]`` holding the summed flat gradient buffer, as DDP's
        hook contract requires.
    """
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _stream_seed(*parts: object) -> int:
    """A 63-bit generator seed from a tuple such as (purpose, seed, step, rank): host-only
    arithmetic (no device sync), and well-mixed so neighbouring steps give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _all_gather_flat(
    local: torch.Tensor, world_size: int, group, timeout_s: float | None = None, what: str = ""
) -> torch.Tensor:
    """Equal-size all-gather into one (world * n, ...) tensor, rank order (the concatenated
    form, which every backend accepts; gloo refuses the stacked one). With ``timeout_s`` the
    wait is bounded: ``RuntimeError`` naming ``what`` when not every rank arrived in time."""
    output = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
    # all_gather_single replaces the deprecated all_gather_into_tensor from torch 2.13 on.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if timeout_s is None:
        gather(output, local.contiguous(), group=group)
        return output
    work = gather(output, local.contiguous(), group=group, async_op=True)
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise RuntimeError(
            f"ClassParallelMarginLoss: not every rank reached the {what} all-gather within "
            f"step_timeout={timeout_s:g} s: another rank failed or left the step before it "
            "(a rank that fails inside the step reports itself and every rank raises naming it; "
            "this is a failure outside that part, e.g. a rank that raised between steps and "
            f"did not call forward). Original error: {exc}"
        ) from exc
    return output


def _reduce_scatter_flat(output: torch.Tensor, concatenated: torch.Tensor, group) -> None:
    """Sum over ranks of (world * n, ...) blocks; rank r receives the sum of block r."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, concatenated, group=group)


def _gather_rows_padded(
    local: torch.Tensor, sizes: tuple[int, ...], group
) -> tuple[torch.Tensor, int]:
    """All-gather row blocks whose lengths ``sizes`` differ per rank: every rank pads its block
    to ``max(sizes)`` rows so that one equal-size collective suffices. Returns the concatenated
    rows (sum(sizes), ...) in rank order and the padded length."""
    max_rows = max(sizes)
    if local.shape[0] < max_rows:
        pad = local.new_zeros((max_rows - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    gathered = _all_gather_flat(local, len(sizes), group)
    if all(n == max_rows for n in sizes):
        return gathered, max_rows
    blocks = gathered.view(len(sizes), max_rows, *local.shape[1:])
    return torch.cat([blocks[r, :n] for r, n in enumerate(sizes)]), max_rows


class _GatherRows(torch.autograd.Function):
    """All-gather of the ranks' embedding rows (lengths may differ), differentiable.

    Each rank's loss graph touches every gathered row through its own weight shard only, so its
    backward holds a partial gradient for all rows; the true gradient of a row is the sum of the
    shards' partials, which the backward delivers to the row's owner by one reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...], rank: int, group):
        rows, max_rows = _gather_rows_padded(local, sizes, group)
        ctx.sizes, ctx.rank, ctx.group, ctx.max_rows = sizes, rank, group, max_rows
        return rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, max_rows = ctx.sizes, ctx.max_rows
        grad = grad.contiguous()
        if any(n != max_rows for n in sizes):
            padded = grad.new_zeros((len(sizes), max_rows, *grad.shape[1:]))
            for r, block in enumerate(torch.split(grad, list(sizes))):
                padded[r, : sizes[r]] = block
            grad = padded.view(len(sizes) * max_rows, *grad.shape[1:])
        local = grad.new_empty((max_rows, *grad.shape[1:]))
        _reduce_scatter_flat(local, grad, ctx.group)
        return local[: sizes[ctx.rank]], None, None, None


class _GatherReplicated(torch.autograd.Function):
    """All-gather ``(world, ...)`` of a per-rank tensor that feeds a loss every rank computes
    identically. Each rank's backward already holds the full gradient of that replicated loss,
    so the gradient of the local block is its own slice, with no communication (summing over
    ranks, as a plain differentiable all-gather does, would count it ``world_size`` times)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, world_size: int, rank: int, group, timeout_s=None):
        ctx.rank = rank
        gathered = _all_gather_flat(local, world_size, group, timeout_s, "statistics")
        return gathered.view(world_size, *local.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank], None, None, None, None


class ClassParallelMarginLoss(nn.Module):
    """Margin softmax loss with the C classes sharded over a process group (class parallelism),
    with optional Partial-FC class sampling.

    Args:
        in_features: D, the embedding size.
        num_classes: C, the total number of classes (>= world size); shards by
            :func:`shard_range` (the first ``C % world`` ranks own one class more).
        margin: a shardable :class:`MarginSpec` (every kind but W-Softmax, whose non-target
            logits read ``W_y`` from another rank). For EM-Softmax use one module per head with
            ``MarginSpec.soft_margin``. Assign ``module.margin`` to anneal hyper-parameters.
        process_group: the group to shard over (default: the default group, which must be
            initialised).
        sample_rate: Partial FC rate r in (0, 1]. r = 1 is the exact loss; r < 1 changes the
            loss: in training mode each rank keeps the positive classes of the global batch that
            fall in its shard plus a uniform sample of its other classes,
            ``S = min(C_r, max(ceil(r C_r), B))`` classes in all (see
            :meth:`sampled_class_ids`). Evaluation mode always computes the exact loss.
        seed: seeds the sampling stream (with the step and the rank) and the default init.
        reduction: "mean" (over the non-ignored rows of the global batch), "sum", or "none":
            the (B,) per-row losses of the global batch, rank 0's rows first; every rank returns
            the same tensor.
        ignore_index: label of rows that give loss 0 and gradient 0.
        backend: "auto" | "triton" | "cuda" | "torch", resolved per step for the weight's device.
        validate: all-gather a tiny int64 record per rank before the step (one small
            collective and one device-to-host read of ``21 world`` int64): error code, D, dtype,
            B_r, whether this rank's backend can run here, and the settings that must agree
            across ranks (num_classes, the margin's kind and every hyper-parameter, reduction,
            ignore_index, sample_rate, the weight dtype, the training flag and the sampling
            step counter).
            It lets local batch sizes differ and makes a rank's bad input, or settings that
            differ between ranks, raise the same ``ValueError`` on every rank instead of hanging
            the others or silently computing a different loss per rank. ``validate=False``
            skips it (no host sync) and requires the same B_r, D, dtype and settings on every
            rank, unchecked. ``seed``, ``backend`` and ``deterministic`` may differ on purpose:
            each rank samples its own shard with its own stream, and a backend only changes how
            a shard's statistics are computed, not what they are. ``validate`` itself must agree
            (one rank gathering metadata while another gathers embeddings cannot be detected).
        deterministic: ask the fused backends for run-to-run identical gradients.
        step_timeout: seconds a rank waits in the step's metadata and statistics all-gathers
            for the others (default 60; None: the process group's own timeout). A rank whose
            backend fails inside the step (it cannot run, fails its first-use probe, runs out
            of memory) still enters the statistics all-gather with a failure flag, and every
            rank raises ``RuntimeError`` naming it (with ``validate=False``: a
            ``torch._assert_async`` without the rank, no host sync); a rank that never arrives
            (it failed outside the step) makes the others raise after ``step_timeout``. See
            ``docs/distributed.md`` for what is bounded where.
        device, dtype: of the weight shard.

    Attributes:
        class_start, class_end, num_local_classes: this rank's shard ``[start, end)``, C_r.
        weight: (C_r, D) Parameter, rows ``class_start:class_end`` of the full classifier.
        step: training forwards done so far (saved in the state_dict; it drives sampling).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: MarginSpec,
        *,
        process_group: torch.distributed.ProcessGroup | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
        validate: bool = True,
        deterministic: bool = False,
        step_timeout: float | None = DEFAULT_STEP_TIMEOUT_S,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not HAS_DISTRIBUTED:
            raise RuntimeError("ClassParallelMarginLoss needs a torch build with torch.distributed")
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call dist.init_process_group first"
            )
        if in_features <= 0:
            raise ValueError(f"in_features must be > 0, got {in_features}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        check_options(reduction, ignore_index, backend)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if step_timeout is not None and (
            isinstance(step_timeout, bool)
            or not isinstance(step_timeout, (int, float))
            or not 0 < step_timeout < math.inf
        ):
            raise ValueError(
                f"step_timeout must be a positive number or None, got {step_timeout!r}"
            )
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        self.num_local_classes = self.class_end - self.class_start
        self.in_features = in_features
        self.num_classes = num_classes
        self.margin = margin
        self.sample_rate = float(sample_rate)
        self.seed = seed
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend
        self.validate = validate
        self.deterministic = deterministic
        # A host-side int, so reading it never syncs the device; saved as extra state.
        self.step = 0
        self.weight = nn.Parameter(
            torch.empty(self.num_local_classes, in_features, device=device, dtype=dtype)
        )
        self.reset_parameters()

    # --- parameters and state -------------------------------------------------------------
    @property
    def margin(self) -> MarginSpec:
        """The MarginSpec in use; assignable (e.g. to anneal lambda), shardable kinds only."""
        return self._margin

    @margin.setter
    def margin(self, spec: MarginSpec) -> None:
        if not isinstance(spec, MarginSpec):
            raise ValueError(f"margin must be a MarginSpec, got {type(spec).__name__}")
        if not spec.shardable:
            raise ValueError(
                f"margin kind {spec.kind!r} cannot be class-parallel: its non-target logits "
                "read the target class's weight W_y, which lives on another rank"
            )
        if spec.excludes_target and getattr(self, "num_classes", 2) < 2:
            raise ValueError(
                f"{spec.kind} needs num_classes >= 2 (its denominator holds only the non-target "
                f"classes), got {self.num_classes}"
            )
        self._margin = spec

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s init (kaiming-uniform, bound 1/sqrt(D)) drawn from a generator
        seeded by (seed, rank), so shards differ even when every rank seeded torch alike. For
        values identical to a single-process model use :meth:`init_from_full_weight`."""
        if self.weight.device.type == "meta":
            return
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(_stream_seed("init", self.seed, self.rank))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)

    @torch.no_grad()
    def init_from_full_weight(self, full_weight: torch.Tensor) -> None:
        """Copy this rank's rows ``class_start:class_end`` of a full ``(C, D)`` classifier.

        With the same ``full_weight`` on every rank (e.g. a single-process model's weight, or one
        initialised from the same seed), the shards together equal that classifier exactly.
        """
        expected = (self.num_classes, self.in_features)
        if not isinstance(full_weight, torch.Tensor) or tuple(full_weight.shape) != expected:
            shape = tuple(full_weight.shape) if isinstance(full_weight, torch.Tensor) else None
            raise ValueError(f"full_weight must have shape (C, D) = {expected}, got {shape}")
        self.weight.copy_(full_weight[self.class_start : self.class_end])

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole ``(C, D)`` classifier, all-gathered on every rank (a collective: call it
        on every rank). For evaluation or export to a single-process model; memory C x D."""
        sizes = tuple(
            shard_range(self.num_classes, r, self.world_size)[1]
            - shard_range(self.num_classes, r, self.world_size)[0]
            for r in range(self.world_size)
        )
        rows, _ = _gather_rows_padded(self.weight.detach(), sizes, self.process_group)
        return rows

    def get_extra_state(self) -> dict:
        return {
            "step": self.step,
            "num_classes": self.num_classes,
            "class_range": (self.class_start, self.class_end),
        }

    def set_extra_state(self, state: dict) -> None:
        saved = (state["num_classes"], tuple(state["class_range"]))
        if saved != (self.num_classes, (self.class_start, self.class_end)):
            raise ValueError(
                f"checkpoint shard holds classes {saved[1]} of {saved[0]} but this rank owns "
                f"[{self.class_start}, {self.class_end}) of {self.num_classes}: load each rank's "
                "own checkpoint with the same world size"
            )
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_end}), rank={self.rank}/{self.world_size}, "
            f"kind={self.margin.kind}, sample_rate={self.sample_rate}, seed={self.seed}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )

    # --- Partial FC -------------------------------------------------------------------------
    def num_sampled(self, global_batch: int) -> int:
        """S, the number of this shard's classes a sampled step keeps:
        ``min(C_r, max(ceil(r C_r), B))``. Bounding by B (the global batch, the most positives a
        shard can hold) keeps every positive with a static size, so no host sync is needed;
        where Partial FC pays off (r C_r >= B) it is exactly ceil(r C_r)."""
        # round() first: r * C_r = 3.0000000000000004 must not become 4
        wanted = math.ceil(round(self.sample_rate * self.num_local_classes, 9))
        return min(self.num_local_classes, max(wanted, global_batch))

    def sampled_class_ids(self, labels: torch.Tensor, step: int) -> torch.Tensor:
        """The local class ids (S,) int64, ascending, that step ``step`` samples on this rank.

        Args:
            labels: (B,) int64 global labels of the gathered batch (``ignore_index`` allowed).
            step: the step number; the stream is seeded by (seed, step, rank), so the same
                inputs always give the same ids and a resumed checkpoint continues the sequence.

        Every positive of the shard (a non-ignored label in ``[class_start, class_end)``) is
        kept; the rest are a uniform sample of the other classes.
        """
        num_local = self.num_local_classes
        device = self.weight.device
        labels = labels.to(device)
        in_shard = (
            (labels != self.ignore_index) & (labels >= self.class_start) & (labels < self.class_end)
        )
        # positives scatter into their slot; other rows into a spare slot num_local, dropped
        slots = torch.where(in_shard, labels - self.class_start, num_local)
        positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device)
        positive = positive.index_fill_(0, slots, True)[:num_local]
        generator = torch.Generator(device=device)
        generator.manual_seed(_stream_seed("sample", self.seed, step, self.rank))
        # uniform keys in [0, 1) rank the negatives at random; positives get key 2: taken first
        keys = torch.rand(num_local, generator=generator, device=device)
        keys = keys.masked_fill(positive, 2.0)
        chosen = keys.topk(self.num_sampled(labels.shape[0]), sorted=False).indices
        return chosen.sort().values

    # --- forward ----------------------------------------------------------------------------
    def _config_fields(self) -> list[tuple[str, int, object]]:
        """``(name, int64 code, decoder)`` of every setting that must agree across ranks: the
        class count, the margin (kind and every hyper-parameter), reduction, ignore_index,
        the sampling rate, the weight dtype, the training flag and the step counter. Floats travel
        as their exact bits. The seed and the backend may differ on purpose (see the class
        docstring)."""
        spec = self.margin
        weight_dtype = self.weight.dtype
        fields = [
            ("num_classes", self.num_classes, int),
            ("margin kind", KIND_IDS[spec.kind], lambda c: _name_of(KIND_IDS, c)),
        ]
        for name in ("s", "m", "m1", "m2", "m3", "lam", "lambda_p", "lambda_n", "alpha"):
            fields.append((f"margin {name}", _float_bits(getattr(spec, name)), _bits_float))
        fields += [
            ("margin grad_mode", GRAD_MODES[spec.grad_mode], lambda c: _name_of(GRAD_MODES, c)),
            (
                "margin overflow",
                OVERFLOW_POLICIES[spec.overflow],
                lambda c: _name_of(OVERFLOW_POLICIES, c),
            ),
            ("reduction", REDUCTIONS.index(self.reduction), lambda c: REDUCTIONS[c]),
            ("ignore_index", self.ignore_index, int),
            ("sample_rate", _float_bits(self.sample_rate), _bits_float),
            (
                "weight dtype",
                FLOAT_DTYPES.index(weight_dtype) if weight_dtype in FLOAT_DTYPES else -1,
                lambda c: str(FLOAT_DTYPES[c]) if c >= 0 else "other",
            ),
            # a rank in eval mode would use its full shard while the others sample (a hybrid
            # loss), and the step counters that seed the sampling would drift apart
            ("training", int(self.training), lambda c: "train" if c else "eval"),
            ("step", self.step, int),
        ]
        return fields

    def _exchange_metadata(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[tuple[int, ...], torch.dtype]:
        """All-gather every rank's (error code, D, dtype code, B_r) and configuration, and raise
        the same ValueError on every rank if the configurations differ or any rank's inputs are
        bad; returns the batch sizes and the common embedding dtype."""
        device = self.weight.device
        code, width, dtype_code, rows = _OK, -1, -1, -1
        problem = float_matrix_problem(embeddings)
        if problem in ("type", "dim"):
            code = _BAD_EMBEDDINGS
        elif problem == "dtype":
            code = _BAD_DTYPE
        else:
            rows, width = embeddings.shape
            dtype_code = FLOAT_DTYPES.index(embeddings.dtype)
            if label_vector_problem(labels, rows) is not None:
                code = _BAD_LABELS
            elif embeddings.device != device or labels.device != device:
                code = _BAD_DEVICE
        backend_reason = self._backend_reason()
        config = self._config_fields()
        record = torch.tensor(
            [code, width, dtype_code, rows, BACKENDS.index(self.backend),
             int(backend_reason is not None), *(c for _, c, _ in config)],
            dtype=torch.int64,
            device=device,
        )  # fmt: skip
        table = _all_gather_flat(
            record, self.world_size, self.process_group, self.step_timeout, "metadata"
        )
        table = table.view(self.world_size, record.numel()).tolist()
        differing = []
        for k, (name, _, decode) in enumerate(config):
            column = [row[_INPUT_FIELDS + k] for row in table]
            if len(set(column)) > 1:
                values = ", ".join(f"rank {r} {decode(c)}" for r, c in enumerate(column))
                differing.append(f"{name}: {values}")
        if differing:
            raise ValueError(
                "ClassParallelMarginLoss settings differ across ranks (every rank must build it "
                "alike): " + "; ".join(differing)
            )
        messages = {
            _BAD_EMBEDDINGS: "local_embeddings must be a 2-D tensor (B_r, D)",
            _BAD_DTYPE: "local_embeddings must be float16, bfloat16, float32 or float64",
            _BAD_LABELS: "local_labels must be a 1-D integer tensor (B_r,) int64 with one "
            "label per row of local_embeddings",
            _BAD_DEVICE: f"local_embeddings and local_labels must be on the weight's device "
            f"({device})",
        }
        cannot = [(r, BACKENDS[row[4]]) for r, row in enumerate(table) if row[5]]
        if cannot:
            listing = ", ".join(f"rank {r} backend={name!r}" for r, name in cannot)
            error = ValueError(
                f"ClassParallelMarginLoss: the backend of {listing} cannot run on that rank "
                f"(device {device.type}); pass a backend every rank can run, e.g. 'auto'"
            )
            if backend_reason is not None:
                raise error from RuntimeError(f"rank {self.rank}: {backend_reason}")
            raise error
        for r, (code_r, width_r, *_) in enumerate(table):
            if code_r != _OK:
                raise ValueError(f"rank {r}: {messages[code_r]}")
            if width_r != self.in_features:
                raise ValueError(
                    f"rank {r}: local_embeddings have D={width_r} features but in_features="
                    f"{self.in_features}"
                )
        dtype_codes = [row[2] for row in table]
        if len(set(dtype_codes)) > 1:
            listing = ", ".join(f"rank {r} {FLOAT_DTYPES[c]}" for r, c in enumerate(dtype_codes))
            raise ValueError(f"local_embeddings dtypes differ across ranks: {listing}")
        return tuple(row[3] for row in table), FLOAT_DTYPES[dtype_codes[0]]

    def _backend_reason(self) -> str | None:
        """Why this rank's named backend cannot run on the weight's device (None when it can,
        or for "auto" and "torch", which always can)."""
        return unavailable_reason(self.backend, self.weight.device, self.margin)

    def _check_global_labels(self, labels: torch.Tensor) -> None:
        """Labels of the gathered batch lie in [0, C) or equal ignore_index. Every rank sees
        the same labels, so every rank raises the same IndexError (CPU); on accelerators the
        check is ``torch._assert_async`` (no host sync)."""
        check_labels("label", labels, None, self.num_classes, self.ignore_index)

    def _raise_if_failed(self, status: torch.Tensor, failure: Exception | None) -> None:
        """Raise on every rank when a rank's backend failed in this step (``status`` (world,):
        1 where it did). validate=True reads the flags (the step already reads the metadata);
        validate=False checks them without a host sync (``torch._assert_async``)."""
        if failure is not None and not self.validate:
            raise RuntimeError(
                f"ClassParallelMarginLoss: rank {self.rank} failed inside the step: {failure}"
            ) from failure
        if not self.validate:
            torch._assert_async(
                (status == 0).all(), "ClassParallelMarginLoss: a rank failed inside the step"
            )
            return
        failed = [r for r, flag in enumerate(status.tolist()) if flag]
        if not failed:
            return
        ranks = ", ".join(str(r) for r in failed)
        message = (
            f"ClassParallelMarginLoss: rank {ranks} failed inside the step (the backend raised "
            "there; that rank's error says why); every rank raises, so the ranks stay in step"
        )
        if failure is not None:
            raise RuntimeError(f"{message}. Rank {self.rank}: {failure}") from failure
        raise RuntimeError(message)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Loss of the global batch (identical on every rank); a collective: every rank calls it.

        Args:
            local_embeddings: (B_r, D) float16/bfloat16/float32/float64, this rank's rows.
            local_labels: (B_r,) int64 global class ids in [0, C) or ``ignore_index``.

        Returns:
            The loss: a scalar (float32, float64 for float64 inputs), or with
            ``reduction="none"`` the (B,) per-row losses of the global batch in rank order.
        """
        if self.validate:
            sizes, _ = self._exchange_metadata(local_embeddings, local_labels)
        else:
            sizes = (local_embeddings.shape[0],) * self.world_size
        group = self.process_group
        embeddings = _GatherRows.apply(local_embeddings, sizes, self.rank, group)
        labels, _ = _gather_rows_padded(local_labels.long(), sizes, group)
        self._check_global_labels(labels)

        valid = labels != self.ignore_index
        owned = valid & (labels >= self.class_start) & (labels < self.class_end)
        # lse_parts contract: a target outside [0, C_r) (ignored or owned elsewhere) masks
        # nothing and gives target logit 0 on this shard
        local_target = torch.where(owned, labels - self.class_start, -1)
        class_ids = None
        if self.training and self.sample_rate < 1:
            class_ids = self.sampled_class_ids(labels, self.step)

        weight = self.weight
        device_type = embeddings.device.type
        if torch.is_autocast_enabled(device_type):
            amp_dtype = torch.get_autocast_dtype(device_type)
            embeddings, weight = embeddings.to(amp_dtype), weight.to(amp_dtype)
        elif embeddings.dtype != weight.dtype:
            common = torch.promote_types(embeddings.dtype, weight.dtype)
            embeddings, weight = embeddings.to(common), weight.to(common)
        failure = None
        try:
            _, lse_parts = resolve(
                self.backend, weight.device, self.margin, embeddings, weight, class_ids
            )
            neg_lse, target_logit = lse_parts(
                embeddings,
                weight,
                local_target,
                self.margin,
                class_ids,
                deterministic=self.deterministic,
            )
            local = torch.stack([neg_lse, target_logit], dim=1)
        except Exception as exc:  # re-raised below, once every rank knows (no rank left waiting)
            failure = exc
            compute = reference.compute_dtype(embeddings, weight)
            local = torch.zeros(labels.shape[0], 2, dtype=compute, device=weight.device)
        # one collective for the combination: (world, B + 1, 2) of every shard's statistics,
        # the last row the shard's status (1: its backend failed in this step)
        status = local.new_tensor([[float(failure is not None), 0.0]])
        stats = _GatherReplicated.apply(
            torch.cat([local, status]), self.world_size, self.rank, group, self.step_timeout
        )
        self._raise_if_failed(stats[:, -1, 0], failure)
        stats = stats[:, :-1]
        # LSE over all classes' non-target logits = logsumexp over the shards' LSEs
        neg_lse = torch.logsumexp(stats[..., 0], dim=0)
        # only the owning shard's target logit is non-zero
        target_logit = stats[..., 1].sum(dim=0)
        loss = reference.loss_from_parts(neg_lse, target_logit, valid, self.margin, self.reduction)
        if self.training:
            self.step += 1
        return loss
