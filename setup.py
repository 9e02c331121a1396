"""Build script: the Python package always; the compiled extension ``margin_kernels._C`` from
``csrc/`` when torch is a CUDA build and nvcc is found.

Environment knobs (all optional):
    MARGIN_KERNELS_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install).
    MARGIN_KERNELS_FORCE_CUDA_BUILD=1  build it or fail loudly (instead of skipping quietly).
    MARGIN_KERNELS_CUDA_ARCHS="9.0"    compute capabilities to build for (default:
                                       TORCH_CUDA_ARCH_LIST, else the visible GPU's, else 9.0).
    MAX_JOBS=N                         parallel compile jobs (read by torch's ninja build).

The .cpp sources (op schemas, the CPU twin of the epilogues, Meta kernels) go through the host
compiler and the .cu source (the CUDA epilogues) through nvcc; ptxas prints registers and spills
per kernel (-Xptxas=-v; csrc/PTXAS.md records them).

Every build writes ``margin_kernels/_build_info.py`` next to where ``_C`` goes (into the wheel, or
into the source tree for ``build_ext --inplace`` and editable installs): whether the extension
was built, why not, or the torch version, CUDA version, C++ ABI and GPU architectures it was
compiled for. ``margin_kernels._extension`` checks it before loading ``_C``. The version comes
from ``margin_kernels/_version.py`` (pyproject.toml reads it).
"""

import glob
import os
import platform
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

BUILD_INFO_FILE = "_build_info.py"


def _write_build_info(directory: str, fields: dict) -> None:
    """Writes the build record ``margin_kernels._extension`` reads (plain literals only)."""
    lines = [
        '"""How margin_kernels._C was built; written by setup.py at build time, do not edit."""',
        "",
        *(f"{name} = {value!r}" for name, value in fields.items()),
    ]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, BUILD_INFO_FILE), "w") as out:
        out.write("\n".join(lines) + "\n")


def _skipped_fields(reason: str) -> dict:
    return {"EXTENSION_BUILT": False, "SKIP_REASON": reason}


def _built_fields() -> dict:
    """The torch this build compiles against and the GPU code it generates (the -gencode flags
    torch derives from TORCH_CUDA_ARCH_LIST: code=sm_XY is machine code, code=compute_XY PTX)."""
    import torch
    from torch.utils import cpp_extension

    gencode = " ".join(cpp_extension._get_cuda_arch_flags())
    return {
        "EXTENSION_BUILT": True,
        "SKIP_REASON": None,
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "CXX11_ABI": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        "SASS_ARCHS": sorted(set(re.findall(r"code=(sm_\w+)", gencode))),
        "PTX_ARCHS": sorted(set(re.findall(r"code=(compute_\w+)", gencode))),
        "PYTHON_VERSION": platform.python_version(),
    }


def _build_py_recording(skip_reason):
    """build_py that also writes the build record when the extension is skipped (when it is
    built, build_ext writes it after compiling, which runs after build_py)."""

    class BuildPy(build_py):
        def run(self):
            super().run()
            if skip_reason is None:
                return
            fields = _skipped_fields(skip_reason)
            _write_build_info(os.path.join(self.build_lib, "margin_kernels"), fields)
            if self.editable_mode:  # the package is imported from the source tree
                _write_build_info(self.get_package_dir("margin_kernels"), fields)

    return BuildPy


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_toolkit_dirs(cuda_home: str) -> tuple[list[str], list[str]]:
    """(include dirs, library dirs) that hold cuda_runtime.h and libcudart. torch infers
    CUDA_HOME from the nvcc on PATH, which can be /usr/local when nvcc sits in /usr/local/bin
    while the headers live in /usr/local/cuda or in the nvidia-cuda-runtime wheel."""
    roots = [cuda_home, os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += glob.glob(
        os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu*")
    )
    includes, libs = [], []
    for root in filter(None, roots):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            includes.append(os.path.join(root, "include"))
            libs += [
                d
                for d in (os.path.join(root, "lib64"), os.path.join(root, "lib"))
                if os.path.isdir(d)
            ]
            break
    return includes, libs


def _extension():
    """Returns (ext_modules, cmdclass, reason_skipped)."""
    if _env_flag("MARGIN_KERNELS_SKIP_CUDA_BUILD"):
        return [], {}, "MARGIN_KERNELS_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return (
            [],
            {},
            "torch is not importable in the build environment (pip's default build isolation "
            "hides the installed torch: install torch first, then build with "
            "--no-build-isolation)",
        )
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return [], {}, "nvcc was not found (set CUDA_HOME)"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}, "csrc/ has no sources"
    archs = os.environ.get("MARGIN_KERNELS_CUDA_ARCHS")
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's arch detection indexes the visible GPUs and crashes when there are none.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    here = os.path.dirname(os.path.abspath(__file__))
    cuda_includes, cuda_libs = _cuda_toolkit_dirs(CUDA_HOME)
    ext = CUDAExtension(
        name="margin_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc"), *cuda_includes],
        library_dirs=cuda_libs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v"],
        },
    )

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # Next to the built _C: the build tree, or the source tree when built in place.
            directory = os.path.dirname(self.get_ext_fullpath("margin_kernels._C"))
            _write_build_info(directory, _built_fields())

    return [ext], {"build_ext": BuildExt}, None


ext_modules, cmdclass, skipped = _extension()
if skipped:
    if _env_flag("MARGIN_KERNELS_FORCE_CUDA_BUILD"):
        raise RuntimeError(f"MARGIN_KERNELS_FORCE_CUDA_BUILD is set but {skipped}")
    # pip shows this only with -v; the package says it again at run time, the first time a CUDA
    # tensor reaches it (margin_kernels._extension reads the reason from the build record).
    print(f"margin_kernels: skipping the CUDA extension: {skipped}.")

setup(
    packages=find_packages(include=["margin_kernels", "margin_kernels.*"]),
    package_data={"margin_kernels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": _build_py_recording(skipped)},
)
