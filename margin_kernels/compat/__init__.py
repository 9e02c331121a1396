"""Drop-in heads with the signatures, units, parameter names and shapes of the libraries people
migrate from, computed by margin_kernels' fused losses:

* :mod:`margin_kernels.compat.pml` — pytorch-metric-learning's ``ArcFaceLoss``,
  ``CosFaceLoss``, ``LargeMarginSoftmaxLoss`` and ``SphereFaceLoss``;
* :mod:`margin_kernels.compat.insightface` — insightface arcface_torch's ``CombinedMarginLoss``
  and ``PartialFC_V2``.

Neither peer needs to be installed. ``docs/migrating.md`` maps every argument.
"""

from . import insightface, pml

__all__ = ["insightface", "pml"]
