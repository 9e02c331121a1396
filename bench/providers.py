"""What the benchmark compares: the losses, the inputs of each case, and every provider.

A provider is one way to compute the loss at a case (our backends, the torch reference eager and
compiled, pytorch-metric-learning, cut-cross-entropy, Liger, torch's linear_cross_entropy) or the
bare GEMMs of the same shape as a yardstick. Optional peers are imported lazily, when a case of
theirs is built, so a missing one costs only its rows. Timing, memory and the CSV are in
harness.py; the command line is run.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import margin_kernels as mk

# The margins of the sweep. "ce" is plain softmax cross-entropy, written as CosFace with m = 0 on
# inputs that are pre-normalised and pre-scaled (x = s x/|x|, W = W/|W|), so that CE(x W^T) of
# the fused plain-CE peers is the same number as our cosine loss on the same tensors.
SCALE = 64.0
LOSSES = {
    "arcface": mk.MarginSpec.arcface(s=SCALE, m=0.5),
    "cosface": mk.MarginSpec.cosface(s=SCALE, m=0.35),
    "sphereface": mk.MarginSpec.sphereface(m=4),
    "ce": mk.MarginSpec.cosface(s=SCALE, m=0.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
MODES = ("fwd", "fwd+bwd")
GEMM_PROVIDER = "gemm"


# --------------------------------------------------------------------------------------------
# cases and inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the bare GEMMs depend on: one yardstick per shape, shared by all losses."""

    dtype: str
    mode: str
    batch: int
    classes: int
    dim: int
    sample_rate: float


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a loss at a shape."""

    loss: str
    shape: Shape

    @property
    def spec(self) -> mk.MarginSpec:
        return LOSSES[self.loss]

    @property
    def backward(self) -> bool:
        return self.shape.mode == "fwd+bwd"


@dataclass
class Inputs:
    """One input set. x: (B, D), weight: (C, D), target: (B,) int64, class_ids: (S,) int64 or
    None (all classes), all on the bench device; x and weight in the case's dtype."""

    x: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    class_ids: torch.Tensor | None

    @property
    def num_sampled(self) -> int:
        return self.weight.shape[0] if self.class_ids is None else self.class_ids.shape[0]


def sample_class_ids(
    target: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator
) -> torch.Tensor | None:
    """Partial-FC class ids: every positive of the batch plus random negatives, round(rate C)
    ids in all (more when the batch holds more distinct positives), sorted. None for rate 1."""
    if rate >= 1.0:
        return None
    num_sample = max(1, round(rate * num_classes))
    # Positives get a score above every random one, so top-k keeps them all (insightface's way).
    score = torch.rand(num_classes, generator=generator, device=target.device)
    score[target] = 2.0
    num_positive = int(torch.unique(target).numel())
    chosen = torch.topk(score, max(num_sample, num_positive)).indices
    return chosen.sort().values


def make_inputs(case: Case, device: torch.device, seed: int, requires_grad: bool) -> Inputs:
    """Input set number ``seed`` of ``case``: the same tensors for every provider."""
    shape = case.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.batch, shape.dim, generator=generator, device=device)
    weight = torch.randn(shape.classes, shape.dim, generator=generator, device=device)
    if case.loss == "ce":
        x = SCALE * F.normalize(x, dim=1)
        weight = F.normalize(weight, dim=1)
    dtype = DTYPES[shape.dtype]
    x = x.to(dtype).requires_grad_(requires_grad)
    weight = weight.to(dtype).requires_grad_(requires_grad)
    target = torch.randint(0, shape.classes, (shape.batch,), generator=generator, device=device)
    class_ids = sample_class_ids(target, shape.classes, shape.sample_rate, generator)
    return Inputs(x, weight, target, class_ids)


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------
# A step runs one forward (and backward) on one input set and returns the detached loss, or
# None for the bare GEMMs. A builder turns an input set into (step, tensors whose .grad to
# clear between runs); a provider's factory makes the builder for a case.
Step = Callable[[], torch.Tensor | None]
Builder = Callable[[Inputs], tuple[Step, list[torch.Tensor]]]


@dataclass(frozen=True)
class Provider:
    """A way to compute the loss (or the GEMM yardstick).

    ``unavailable(case, device)`` returns why the provider cannot run that case here (None when
    it can); ``factory(case)`` returns (builder, notes for the CSV row)."""

    name: str
    losses: frozenset[str]
    unavailable: Callable[[Case, torch.device], str | None]
    factory: Callable[[Case], tuple[Builder, str]]
    description: str = ""


def _loss_step(
    loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool
) -> tuple[Step, list[torch.Tensor]]:
    def step() -> torch.Tensor:
        # Clearing grads inside the step too: do_bench's warm-up runs would accumulate them.
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn()
        if backward:
            loss.backward()
        return loss.detach()

    return step, leaves


def _import_error(module: str, pip_name: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # any import failure (missing, or broken on this torch) skips it
        return f"{pip_name} is not importable ({type(exc).__name__}: {exc})"
    return None


def _margin_backend_provider(backend: str) -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        available = mk.available_backends(device, case.spec)
        if backend in available:
            return None
        try:
            mk.ops.resolve(backend, device, case.spec)
        except RuntimeError as exc:
            return str(exc)
        return f"backend {backend!r} is not among {available} on {device.type}"

    def factory(case: Case) -> tuple[Builder, str]:
        notes = ""
        if backend == "triton" and _interpreted():
            notes = "TRITON_INTERPRET=1"

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return mk.margin_cross_entropy(
                    inputs.x,
                    inputs.weight,
                    inputs.target,
                    case.spec,
                    backend=backend,
                    class_ids=inputs.class_ids,
                )

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, notes

    return Provider(
        backend,
        frozenset(LOSSES),
        unavailable,
        factory,
        f"margin_kernels backend={backend!r}",
    )


def _torch_compile_provider(compile_backend: str) -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return None if hasattr(torch, "compile") else "torch.compile needs torch >= 2.0"

    def factory(case: Case) -> tuple[Builder, str]:
        # A fresh compile per case: dynamo's per-function cache would otherwise hit its
        # recompile limit over the sweep and fall back to eager without a word.
        torch._dynamo.reset()

        def reference_loss(x, weight, target, class_ids):
            return mk.margin_cross_entropy(
                x, weight, target, case.spec, backend="torch", class_ids=class_ids
            )

        compiled = torch.compile(reference_loss, backend=compile_backend)

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return compiled(inputs.x, inputs.weight, inputs.target, inputs.class_ids)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, f"compile backend={compile_backend}"

    return Provider(
        "torch-compile",
        frozenset(LOSSES),
        unavailable,
        factory,
        "the torch reference under torch.compile",
    )


def _full_classes_only(case: Case) -> str | None:
    if case.shape.sample_rate < 1.0:
        return "it has no class sampling (Partial FC)"
    return None


def _pml_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return _import_error("pytorch_metric_learning.losses", "pytorch-metric-learning") or (
            _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from pytorch_metric_learning import losses

        spec = case.spec
        if case.loss == "arcface":
            # PML's ArcFace margin is in degrees; same s, same theta + m > pi fallback.
            make = lambda c, d: losses.ArcFaceLoss(  # noqa: E731
                c, d, margin=math.degrees(spec.m), scale=spec.s, collect_stats=False
            )
            notes = f"ArcFaceLoss(margin={math.degrees(spec.m):.4f} deg, scale={spec.s:g})"
        elif case.loss == "cosface":
            make = lambda c, d: losses.CosFaceLoss(  # noqa: E731
                c, d, margin=spec.m, scale=spec.s, collect_stats=False
            )
            notes = f"CosFaceLoss(margin={spec.m:g}, scale={spec.s:g})"
        else:
            # PML's SphereFace: |x| (psi_m(c)) with normalised W, i.e. ours with lambda = 0.
            make = lambda c, d: losses.SphereFaceLoss(  # noqa: E731
                c, d, margin=int(spec.m), scale=1, collect_stats=False
            )
            notes = f"SphereFaceLoss(margin={int(spec.m)}, scale=1)"

        def build(inputs: Inputs):
            num_classes, dim = inputs.weight.shape
            # Built with one class so that PML does not allocate and initialise its own C x D
            # matrix; then handed our W in its (D, C) layout (a transposed view, no copy).
            loss_module = make(1, dim)
            loss_module.num_classes = num_classes
            loss_module.W = torch.nn.Parameter(inputs.weight.detach().t())
            leaves = [inputs.x, loss_module.W]

            def loss_fn() -> torch.Tensor:
                return loss_module(inputs.x, inputs.target)

            return _loss_step(loss_fn, leaves, case.backward)

        return build, notes

    return Provider(
        "pml",
        frozenset({"arcface", "cosface", "sphereface"}),
        unavailable,
        factory,
        "pytorch-metric-learning's unfused ArcFaceLoss / CosFaceLoss / SphereFaceLoss",
    )


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "it needs a CUDA device"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_cuda_or_interpreter(device: torch.device) -> str | None:
    if device.type == "cuda" or _interpreted():
        return None
    return "it needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"


def _cce_provider(filtering: bool) -> Provider:
    name = "cce-filter" if filtering else "cce"

    def unavailable(case: Case, device: torch.device) -> str | None:
        return (
            _import_error("cut_cross_entropy", "cut-cross-entropy")
            or _needs_cuda(device)
            or _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from cut_cross_entropy import linear_cross_entropy

        # "auto": CCE's default threshold eps(dtype)/32 below which softmax entries are skipped
        # in the backward; None computes every gradient entry.
        filter_eps = "auto" if filtering else None

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return linear_cross_entropy(
                    inputs.x, inputs.weight, inputs.target, filter_eps=filter_eps
                )

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, f"filter_eps={filter_eps}"

    return Provider(
        name,
        frozenset({"ce"}),
        unavailable,
        factory,
        "cut-cross-entropy's linear_cross_entropy, gradient filtering "
        + ("on" if filtering else "off"),
    )


def _liger_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        return (
            _import_error("liger_kernel.transformers.functional", "liger-kernel")
            or _needs_cuda_or_interpreter(device)
            or _full_classes_only(case)
        )

    def factory(case: Case) -> tuple[Builder, str]:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return liger_fused_linear_cross_entropy(inputs.x, inputs.weight, inputs.target)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        # Liger computes the gradients inside its forward when inputs require grad.
        notes = "gradients computed in the forward"
        if _interpreted():
            notes += "; TRITON_INTERPRET=1"
        return build, notes

    return Provider(
        "liger",
        frozenset({"ce"}),
        unavailable,
        factory,
        "Liger's fused linear cross-entropy",
    )


def _torch_lce_provider() -> Provider:
    def unavailable(case: Case, device: torch.device) -> str | None:
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
        return _full_classes_only(case)

    def factory(case: Case) -> tuple[Builder, str]:
        options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        # The chunked path (no B x C logits) exists only with an options object.
        options = {"options": options_cls()} if options_cls is not None else {}
        notes = "chunked (LinearCrossEntropyOptions())" if options else "reference path"

        def build(inputs: Inputs):
            def loss_fn() -> torch.Tensor:
                return F.linear_cross_entropy(inputs.x, inputs.weight, inputs.target, **options)

            return _loss_step(loss_fn, [inputs.x, inputs.weight], case.backward)

        return build, notes

    return Provider(
        "torch-lce",
        frozenset({"ce"}),
        unavailable,
        factory,
        "torch.nn.functional.linear_cross_entropy",
    )


def _gemm_provider() -> Provider:
    def factory(case: Case) -> tuple[Builder, str]:
        backward = case.backward

        def build(inputs: Inputs):
            x = inputs.x.detach()
            # The sampled classes as one contiguous (S, D) matrix: the GEMMs a fused Partial-FC
            # kernel does, without the gather.
            w = inputs.weight.detach()
            if inputs.class_ids is not None:
                w = w[inputs.class_ids].contiguous()
            dz = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

            def step() -> None:
                torch.mm(x, w.t())  # Z = X W^T: (B, S)
                if backward:
                    torch.mm(dz, w)  # dX = dZ W: (B, D)
                    torch.mm(dz.t(), x)  # dW = dZ^T X: (S, D)

            return step, []

        return build, "X W^T" + (", dZ W, dZ^T X" if backward else "")

    return Provider(
        GEMM_PROVIDER,
        frozenset(LOSSES),
        lambda case, device: None,
        factory,
        "the bare GEMMs of the same shapes through torch.mm (cuBLAS on GPU)",
    )


def all_providers(compile_backend: str) -> dict[str, Provider]:
    """Every provider the harness knows, by name, in the order of the CSV rows."""
    providers = [
        _gemm_provider(),
        _margin_backend_provider("triton"),
        _margin_backend_provider("cuda"),
        _margin_backend_provider("torch"),
        _torch_compile_provider(compile_backend),
        _pml_provider(),
        _cce_provider(filtering=False),
        _cce_provider(filtering=True),
        _liger_provider(),
        _torch_lce_provider(),
    ]
    return {p.name: p for p in providers}
