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
"""

import glob
import os
import sys

from setuptools import find_packages, setup


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
            "torch is not installed (install torch first, then build with --no-build-isolation)",
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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, skipped = _extension()
if skipped:
    if _env_flag("MARGIN_KERNELS_FORCE_CUDA_BUILD"):
        raise RuntimeError(f"MARGIN_KERNELS_FORCE_CUDA_BUILD is set but {skipped}")
    print(f"margin_kernels: skipping the CUDA extension: {skipped}.")

setup(
    packages=find_packages(include=["margin_kernels", "margin_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
