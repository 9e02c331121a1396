"""Optional Triton import and the interpreter switch, shared by the kernel modules.

``HAS_TRITON`` is False when Triton is missing (importing margin_kernels never fails for that).
``INTERPRET`` mirrors ``TRITON_INTERPRET=1``, read once at import as Triton itself does.

Triton 3.6's interpreter converts a scalar tensor to a Python int with ``int(handle.data)``
(``tl.tensor.__index__``); its scalars are 1-element 1-D NumPy arrays, which NumPy >= 2.4
refuses to convert, so every ``range(start, D, step)`` over a runtime bound fails there with
"only 0-dimensional arrays can be converted to Python scalars". Triton 3.8 squeezes first. Under
the interpreter only, the patch below gives 3.6 the same conversion; compiled kernels are not
touched.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # importing margin_kernels never fails for lack of Triton
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_squeezes_scalars", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if HAS_TRITON and INTERPRET:
    _patch_interpreter_index()
