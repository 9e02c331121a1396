"""Compatibility of Triton's interpreter (``TRITON_INTERPRET=1``) with NumPy >= 2.4.

The interpreter holds every scalar (a kernel's int arguments such as ``D``, ``tl.program_id``,
values computed from them) as a one-element, one-dimensional NumPy array. Python's ``range()``
asks such a scalar for ``__index__``, which Triton 3.6's interpreter implements as
``int(self.handle.data)``. NumPy 2.4 turned the conversion of an array with ``ndim > 0`` to a
Python scalar from a deprecation warning into ``TypeError: only 0-dimensional arrays can be
converted to Python scalars``, so every ``for k0 in range(0, D, BLOCK_D)`` over a runtime bound
fails there. Later Triton releases read ``int(self.handle.data.squeeze())`` instead; this module
installs that same ``__index__`` on the interpreters that lack it. Compiled kernels (a GPU) never
take this path.
"""

from __future__ import annotations

import inspect

__all__ = ["fix_scalar_index"]

_BROKEN_INDEX = "int(self.handle.data)"


def _scalar_index(self) -> int:
    # a scalar is a one-element array: read its element whatever its rank
    return int(self.handle.data.reshape(-1)[0])


def fix_scalar_index() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` accept its one-element scalar arrays.

    Returns True when the installed interpreter needed (and received) the fix, False when it
    already reads scalars safely or has no such hook (then nothing is changed). Idempotent."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_margin_kernels_fixed", False):
        return False
    try:
        source = inspect.getsource(patch_tensor)
    except (OSError, TypeError):
        return False
    if _BROKEN_INDEX not in source:
        return False

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        # the scope restores the original attribute after the launch, as for Triton's own patches
        scope.set_attr(tensor, "__index__", _scalar_index)

    patched._margin_kernels_fixed = True
    interpreter._patch_lang_tensor = patched
    return True
