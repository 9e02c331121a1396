"""Triton backend: fused margin softmax that never materialises the (B, C) logits.

One module per concern:

* :mod:`.config` — tiles, grids and launch order (pure Python; ``plan`` lists every launch);
* :mod:`.margin_math` — the margin math as ``@triton.jit`` helpers;
* :mod:`.forward` — row norms, target logits, the online-LSE forward with the dX numerator;
* :mod:`.backward` — the dW-owner kernel;
* :mod:`.ops` — launchers, the ``torch.library`` custom ops and :func:`lse_parts`.

Four GEMM-equivalents per training step (forward: logits and the dX numerator; backward: the
logits again and dW), no atomics on B x D or C x D tensors, no (B, C) or (C, D) fp32 buffer.
Under ``TRITON_INTERPRET=1`` (set before importing) the kernels run on CPU tensors; bf16
operands are then upcast after loading because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

from ._compat import HAS_TRITON, INTERPRET
from .ops import lse_parts, unavailable_reason

__all__ = ["HAS_TRITON", "INTERPRET", "lse_parts", "unavailable_reason"]
