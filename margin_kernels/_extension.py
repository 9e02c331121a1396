"""Loading the compiled extension ``margin_kernels._C`` safely, and saying why it cannot be used.

``setup.py`` writes ``margin_kernels/_build_info.py`` next to ``_C`` at build time (into the wheel,
or into the source tree for in-place and editable builds). It records whether the extension was
built and, if so, against which torch (version, CUDA version, C++ ABI) and for which GPU
architectures; if not, why the build skipped it. Importing this module reads that record first
and loads ``_C`` only when the installed torch is the one it was built against: a C++ extension
is bound to the exact libtorch ABI it was compiled with, and loading it into another torch fails
with an undefined symbol at best. Importing never raises; instead

* :data:`HAS_CUDA_EXT` is False and :data:`LOAD_ERROR` says why (not built, built without the
  extension and the reason, built for another torch - naming both versions -, or not loadable);
* the first time a CUDA tensor reaches the package (:func:`warn_if_unusable`, called by
  ``margin_kernels.ops.resolve``) a :class:`ExtensionWarning` says the same, with the fix;
* ``backend="cuda"`` raises with that text (``margin_kernels.ops.cuda.unavailable_reason``).

A source checkout whose ``_C`` was built by hand without the record (an older build) is loaded
as it is: there is nothing to check it against.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import warnings
from typing import Any

import torch

__all__ = [
    "BUILD_INFO",
    "HAS_CUDA_EXT",
    "LOAD_ERROR",
    "REBUILD_HINT",
    "ExtensionWarning",
    "arch_reason",
    "build_info",
    "runs_on",
    "warn_if_unusable",
]

REBUILD_HINT = (
    "rebuild it from a source checkout or the sdist with the CUDA build of torch and nvcc "
    "installed and without build isolation, so that it compiles against the installed torch: "
    "`pip install --no-build-isolation --no-deps --force-reinstall <checkout or sdist>` "
    "(`pip install --no-build-isolation -e .` in a checkout); set "
    "MARGIN_KERNELS_FORCE_CUDA_BUILD=1 to make a build that cannot compile it fail instead of "
    "skipping it, and TORCH_CUDA_ARCH_LIST to choose the GPU architectures"
)


class ExtensionWarning(UserWarning):
    """The compiled extension cannot be used on this machine (issued once per process)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _read_build_info() -> dict[str, Any] | None:
    """The fields of ``margin_kernels/_build_info.py``, or None where no build wrote one."""
    try:
        module = importlib.import_module("margin_kernels._build_info")
    except ImportError:
        return None
    return {name: getattr(module, name) for name in dir(module) if name.isupper()}


def _torch_mismatch(info: dict[str, Any]) -> str | None:
    """Why the recorded build does not match the installed torch (None when it does)."""
    built = (info.get("TORCH_VERSION"), info.get("TORCH_CUDA_VERSION"))
    installed = (torch.__version__, torch.version.cuda)
    if built == installed:
        return None
    return (
        f"margin_kernels._C was built against torch {built[0]} (CUDA {built[1]}) but torch "
        f"{installed[0]} (CUDA {installed[1]}) is installed; a compiled extension only works "
        "with the torch it was compiled against, so it was not loaded"
    )


def _load() -> tuple[bool, str | None]:
    """(loaded, why not). Loads ``_C`` (which registers ``torch.ops.margin_kernels.*``)."""
    if BUILD_INFO is not None and not BUILD_INFO.get("EXTENSION_BUILT", False):
        return False, (
            "this margin_kernels was built without its compiled CUDA extension "
            f"margin_kernels._C: at build time {BUILD_INFO.get('SKIP_REASON')}"
        )
    if BUILD_INFO is not None:
        mismatch = _torch_mismatch(BUILD_INFO)
        if mismatch is not None:
            return False, mismatch
    # Only this package's own directory: a meta-path finder (an editable install of another
    # checkout) must not supply a _C built from other sources.
    if importlib.machinery.PathFinder.find_spec("margin_kernels._C", [_PACKAGE_DIR]) is None:
        return False, (
            "the compiled CUDA extension margin_kernels._C is not in this installation (it was "
            "installed or checked out without building it)"
        )
    try:
        importlib.import_module("margin_kernels._C")
    except (ImportError, OSError, RuntimeError) as exc:  # unloadable: wrong ABI, missing library
        return False, f"margin_kernels._C is present but could not be loaded ({exc})"
    return True, None


BUILD_INFO: dict[str, Any] | None = _read_build_info()
HAS_CUDA_EXT, LOAD_ERROR = _load()


def build_info() -> dict[str, Any] | None:
    """How ``margin_kernels._C`` was built, as recorded by ``setup.py``: ``EXTENSION_BUILT``
    (bool), ``SKIP_REASON`` (str or None), ``TORCH_VERSION``, ``TORCH_CUDA_VERSION``,
    ``CXX11_ABI``, ``CUDA_ARCH_LIST`` (the TORCH_CUDA_ARCH_LIST used), ``SASS_ARCHS`` and
    ``PTX_ARCHS`` (e.g. ``["sm_90"]``, ``["compute_90"]``), ``PYTHON_VERSION``. None where the
    package was not installed by a build that records it (e.g. a hand-built source checkout)."""
    return None if BUILD_INFO is None else dict(BUILD_INFO)


def _arch_number(name: str) -> tuple[int, bool]:
    """("sm_90a" or "compute_90a") -> (90, True): the capability as major * 10 + minor, and
    whether it is an architecture-specific target (runs on exactly that capability only)."""
    match = re.fullmatch(r"(?:sm|compute)_(\d+)([af]?)", name)
    if match is None:
        raise ValueError(f"not a CUDA architecture name: {name!r}")
    return int(match.group(1)), bool(match.group(2))


def runs_on(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> bool:
    """Whether code built with these targets runs on a GPU of ``capability`` (major, minor):
    machine code for sm_XY runs on the same major version with minor >= Y (sm_XYa only on
    X.Y itself); PTX for compute_XY is compiled by the driver for any capability >= X.Y."""
    major, minor = capability
    device = 10 * major + minor
    for name in sass:
        arch, specific = _arch_number(name)
        if device == arch or (not specific and arch // 10 == major and arch <= device):
            return True
    for name in ptx:
        arch, specific = _arch_number(name)
        if device == arch or (not specific and arch <= device):
            return True
    return False


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def arch_reason(device: torch.device) -> str | None:
    """Why the loaded ``_C`` has no kernels for the GPU ``device`` (None when it has, when the
    device is not a GPU or no GPU is visible, or when the build recorded no architectures).
    Not checked while torch.compile traces: there a missing architecture surfaces as CUDA's own
    "no kernel image" error at the launch."""
    if not HAS_CUDA_EXT or device.type != "cuda" or BUILD_INFO is None:
        return None
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return None
    sass, ptx = BUILD_INFO.get("SASS_ARCHS") or [], BUILD_INFO.get("PTX_ARCHS") or []
    if not sass and not ptx:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    capability = _CAPABILITIES[index]
    if runs_on(capability, sass, ptx):
        return None
    built = ", ".join([*sass, *ptx])
    wanted = f"{capability[0]}.{capability[1]}"
    return (
        f"margin_kernels._C was built for {built} only, and cuda:{index} is sm_"
        f"{capability[0]}{capability[1]}; rebuild it with TORCH_CUDA_ARCH_LIST={wanted} (or add "
        f"{wanted} to the list; see the README's Install section)"
    )


_warned: set[str] = set()


def warn_if_unusable(device: torch.device) -> None:
    """Warn once per process (and once per unsupported GPU) that a CUDA tensor met a package
    whose extension cannot run it. Called on every resolve of a CUDA device, so it is cheap
    after the first call and skipped while torch.compile traces (warnings break graphs)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return
    problem = LOAD_ERROR if not HAS_CUDA_EXT else arch_reason(device)
    if problem is None or problem in _warned:
        return
    _warned.add(problem)
    warnings.warn(
        f"{problem}. backend='auto' runs the other backends instead and "
        f"backend='cuda' raises; to use it, {REBUILD_HINT}.",
        ExtensionWarning,
        stacklevel=4,
    )
