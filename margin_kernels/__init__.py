"""margin_kernels: fused margin-based softmax losses (L-Softmax, SphereFace, CosFace, ArcFace,
combined margins, SO-/W-/LM-/EM-Softmax) that never materialise the B x C logits on GPU and fall
back to a pure-torch reference elsewhere. Importing never fails for lack of a GPU, Triton or the
compiled extension; see ``margin_kernels.ops`` for what each backend needs."""

from . import distributed, nn, ops, reference
from ._version import __version__
from .functional import (
    arcface_loss,
    combined_margin_loss,
    cosface_loss,
    em_softmax_loss,
    hsic,
    lm_softmax_loss,
    lsoftmax_loss,
    margin_cross_entropy,
    sample_margin_regularization,
    so_softmax_loss,
    sphereface_loss,
    w_softmax_loss,
    zero_centroid_regularization,
)
from .ops import available_backends, probe_report
from .spec import MarginSpec


def __getattr__(name: str):
    # `selftest` is imported on first use, so that `python -m margin_kernels.selftest` does not
    # find it half-imported; the module is callable: mk.selftest(quick=False) -> bool
    if name == "selftest":
        import importlib

        return importlib.import_module(f"{__name__}.selftest")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MarginSpec",
    "__version__",
    "arcface_loss",
    "available_backends",
    "combined_margin_loss",
    "cosface_loss",
    "distributed",
    "em_softmax_loss",
    "hsic",
    "lm_softmax_loss",
    "lsoftmax_loss",
    "margin_cross_entropy",
    "nn",
    "ops",
    "probe_report",
    "reference",
    "sample_margin_regularization",
    "selftest",
    "so_softmax_loss",
    "sphereface_loss",
    "w_softmax_loss",
    "zero_centroid_regularization",
]
