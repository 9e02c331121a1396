"""The CUDA epilogue kernels of ``csrc/epilogue_kernels.cuh`` run on the CPU: the same source
compiled by the system C++ compiler against the emulated execution layer of ``csrc/exec.h``
(fibers for threads, barriers for ``__syncthreads`` and warp shuffles), as a small shared
library with a plain C ABI (``csrc/host/emulated_kernels.cpp``), called here through ctypes.

:func:`library` compiles it once per source state into ``build/emulation/`` (a few seconds; no
torch headers). :class:`EmulatedOps` has the four ops of ``torch.ops.margin_kernels`` with the
same signatures and outputs, their epilogue kernels emulated; :func:`emulated_backend` points
``margin_kernels.ops.cuda`` at them, so that its whole chunked algorithm (GEMMs in torch on the
CPU) runs over the emulated kernels, with the CUDA flow of 16-bit inputs when asked (fp32-output
GEMMs, dL/dz written by the epilogue in the storage dtype).

``MARGIN_KERNELS_EMULATION_COVERAGE=1`` builds it unoptimised with gcov instrumentation into
``build/emulation-coverage/`` (``make coverage``, ``tests/emulation_coverage.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCE = CSRC / "host" / "emulated_kernels.cpp"
COVERAGE_ENV = "MARGIN_KERNELS_EMULATION_COVERAGE"
COVERAGE_DIR = ROOT / "build" / "emulation-coverage"
# -O1: about 7 s of compiler time against 11 s at -O2 (g++ 12), for a library that runs small
# grids; warnings are shown on a failed build, not made errors (another compiler, new warnings)
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]
FLAGS += ["-Wno-unknown-pragmas"]
COVERAGE_FLAGS = [
    "-std=c++20",
    "-O0",
    "-fPIC",
    "-fvisibility=hidden",
    "--coverage",
    "-Wno-unknown-pragmas",
]

STORAGE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class EmulationError(RuntimeError):
    """The emulated launch stopped (a deadlock or an illegal shuffle), or the build failed."""


def _sources() -> list[Path]:
    return sorted([*CSRC.glob("*.h"), *CSRC.glob("*.cuh"), SOURCE])


def _compile(out: Path, flags: list[str]) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise EmulationError("no C++ compiler (g++) to build the emulated CUDA kernels")
    obj = out.with_suffix(".o")
    for cmd in (
        [compiler, *flags, f"-I{CSRC}", "-c", str(SOURCE), "-o", str(obj)],
        [compiler, *flags, "-shared", str(obj), "-o", str(out)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise EmulationError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")


def build() -> Path:
    """Path of the compiled library, built if its sources changed since the last build."""
    if os.environ.get(COVERAGE_ENV, "") == "1":
        out = COVERAGE_DIR / "emulated_kernels.so"
        if not out.is_file():
            COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
            _compile(out, COVERAGE_FLAGS)
        return out
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in _sources():
        digest.update(path.name.encode() + path.read_bytes())
    directory = ROOT / "build" / "emulation" / digest.hexdigest()[:16]
    out = directory / "emulated_kernels.so"
    if not out.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f"partial-{os.getpid()}.so"
        _compile(partial, FLAGS)
        partial.replace(out)
    return out


_LIBRARY: ctypes.CDLL | None = None
_P = ctypes.c_void_p


def library() -> ctypes.CDLL:
    """The loaded library (built on first use)."""
    global _LIBRARY
    if _LIBRARY is None:
        lib = ctypes.CDLL(str(build()))
        lib.mk_emu_last_error.restype = ctypes.c_char_p
        for name in ("mk_emu_epilogue_args_layout", "mk_emu_column_chain_args_layout"):
            getattr(lib, name).restype = ctypes.c_int64
            getattr(lib, name).argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
        lib.mk_emu_margin_transform.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
            *[ctypes.c_void_p] * 7,
        ]
        for name in ("mk_emu_to_16bit", "mk_emu_from_16bit"):
            getattr(lib, name).restype = None
            getattr(lib, name).argtypes = [_P, _P, ctypes.c_int64, ctypes.c_int]
        _LIBRARY = lib
    return _LIBRARY


class EpilogueArgs(ctypes.Structure):
    """csrc/epilogue.h EpilogueArgs (checked against the compiler's layout by the tests)."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("params", _P),
        ("storage", ctypes.c_int),
        ("num_rows", ctypes.c_int64),
        ("num_cols", ctypes.c_int64),
        ("col_offset", ctypes.c_int64),
        ("class_splits", ctypes.c_int64),
        ("with_target", ctypes.c_bool),
        ("logits", _P),
        ("gram", _P),
        ("x_norm", _P),
        ("col_norm", _P),
        ("target", _P),
        ("col_ids", _P),
        ("c_target", _P),
        ("target_norm", _P),
        ("num_classes", ctypes.c_int64),
        ("running_lse", _P),
        ("target_logit", _P),
        ("partial_a", _P),
        ("partial_b", _P),
        ("grad_logits", _P),
        ("grad_gram", _P),
        ("grad_storage", ctypes.c_int),
        ("saved_neg_lse", _P),
        ("grad_neg_lse", _P),
        ("grad_target", _P),
        ("row_d_xnorm", _P),
        ("row_d_ctarget", _P),
        ("row_d_tnorm", _P),
    ]


class ColumnChainArgs(ctypes.Structure):
    """csrc/epilogue.h ColumnChainArgs."""

    _fields_ = [
        ("storage", ctypes.c_int),
        ("rows", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("h", _P),
        ("h_stride", ctypes.c_int64),
        ("w", _P),
        ("w_stride", ctypes.c_int64),
        ("raw_norm", _P),
        ("out", _P),
        ("out_stride", ctypes.c_int64),
        ("h_scaled", ctypes.c_bool),
    ]


def compiled_layout(name: str) -> list[int]:
    """[sizeof, offsets of the fields in order] of a struct as the C++ compiler lays it out."""
    fn = getattr(library(), f"mk_emu_{name}_layout")
    out = (ctypes.c_int64 * 64)()
    n = fn(out, 64)
    return list(out[:n])


def ctypes_layout(struct: type[ctypes.Structure]) -> list[int]:
    """The same list for the ctypes mirror."""
    return [ctypes.sizeof(struct)] + [getattr(struct, f[0]).offset for f in struct._fields_]


def to_16bit(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values converted by the emulation's host __float2half_rn / __float2bfloat16_rn,
    as ``dtype``."""
    values = values.to(torch.float32).contiguous()
    out = torch.empty(values.shape, dtype=torch.int16)
    library().mk_emu_to_16bit(_ptr(values), _ptr(out), values.numel(), dtype == torch.bfloat16)
    return out.view(dtype)


def from_16bit(values: torch.Tensor) -> torch.Tensor:
    """float32 of 16-bit values by the emulation's __half2float / __bfloat162float."""
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=torch.float32)
    bf16 = values.dtype == torch.bfloat16
    library().mk_emu_from_16bit(_ptr(values), _ptr(out), values.numel(), bf16)
    return out


def _call(fn, *args) -> None:
    if fn(*args) != 0:
        raise EmulationError(library().mk_emu_last_error().decode())


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("the emulated kernels take contiguous tensors")
    return t.data_ptr()


def _math_dtype(storage: torch.dtype) -> torch.dtype:
    return torch.float64 if storage == torch.float64 else torch.float32


class EmulatedOps:
    """``torch.ops.margin_kernels`` with the CUDA epilogues emulated on CPU tensors (the same
    signatures and outputs; the argument checks are the extension's, not repeated here)."""

    @staticmethod
    def _epilogue(
        logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
        num_classes, class_splits, kind, params,
    ) -> tuple[EpilogueArgs, ctypes.Array]:  # fmt: skip
        param_array = (ctypes.c_double * len(params))(*params)
        a = EpilogueArgs()
        a.kind = kind
        a.params = ctypes.cast(param_array, _P)
        a.storage = STORAGE[logits.dtype]
        a.num_rows, a.num_cols = logits.shape
        a.col_offset = col_offset
        a.class_splits = class_splits
        a.logits = _ptr(logits)
        a.gram = _ptr(gram)
        a.x_norm = _ptr(x_norm)
        a.col_norm = _ptr(col_norm)
        a.target = _ptr(target)
        a.col_ids = _ptr(col_ids)
        a.c_target = _ptr(c_target)
        a.target_norm = _ptr(target_norm)
        a.num_classes = num_classes
        return a, param_array

    def margin_lse_fwd(
        self, logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
        num_classes, running_lse, class_splits, kind, params,
    ) -> torch.Tensor:  # fmt: skip
        a, keep = self._epilogue(
            logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
            num_classes, class_splits, kind, params,
        )  # fmt: skip
        md = _math_dtype(logits.dtype)
        rows = logits.shape[0]
        target_logit = torch.empty(rows, dtype=md)
        part_max = torch.empty(rows, class_splits, dtype=md)
        part_sum = torch.empty(rows, class_splits, dtype=md)
        a.running_lse = _ptr(running_lse)
        a.target_logit = _ptr(target_logit)
        a.partial_a, a.partial_b = _ptr(part_max), _ptr(part_sum)
        _call(library().mk_emu_lse_forward, ctypes.byref(a))
        del keep
        return target_logit

    def margin_lse_bwd(
        self, logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
        num_classes, neg_lse, grad_neg_lse, grad_target_logit, class_splits, with_target,
        grad_logits, grad_gram, kind, params,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        a, keep = self._epilogue(
            logits, gram, x_norm, col_norm, target, col_ids, col_offset, c_target, target_norm,
            num_classes, class_splits, kind, params,
        )  # fmt: skip
        md = _math_dtype(logits.dtype)
        rows = logits.shape[0]
        outputs = [torch.empty(rows, dtype=md) for _ in range(3)]
        part_xn = torch.empty(rows, class_splits, dtype=md)
        part_cy = torch.empty(rows, class_splits, dtype=md)
        a.with_target = with_target
        a.grad_logits = _ptr(grad_logits)
        a.grad_gram = _ptr(grad_gram)
        a.grad_storage = STORAGE[(logits if grad_logits is None else grad_logits).dtype]
        a.saved_neg_lse = _ptr(neg_lse)
        a.grad_neg_lse = _ptr(grad_neg_lse)
        a.grad_target = _ptr(grad_target_logit)
        a.partial_a, a.partial_b = _ptr(part_xn), _ptr(part_cy)
        a.row_d_xnorm, a.row_d_ctarget, a.row_d_tnorm = (_ptr(t) for t in outputs)
        _call(library().mk_emu_lse_backward, ctypes.byref(a))
        del keep
        return tuple(outputs)

    def margin_column_chain(self, h, w, raw_norm, out, h_scaled=False) -> None:
        target = h if out is None else out
        a = ColumnChainArgs()
        a.storage = STORAGE[w.dtype]
        a.rows, a.dim = w.shape
        for name, t in (("h", h), ("w", w), ("out", target)):
            if t.shape[0] > 1 and t.shape[1] > 1 and t.stride(1) != 1:
                raise ValueError("unit stride along D")
            setattr(a, name, t.data_ptr())
            setattr(a, f"{name}_stride", t.stride(0) if t.shape[0] > 1 else w.shape[1])
        a.raw_norm = _ptr(raw_norm)
        a.h_scaled = h_scaled
        _call(library().mk_emu_column_chain, ctypes.byref(a))

    def margin_transform(
        self, cos, x_norm, w_norm, c_target, gram, kind, params, target
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = cos.contiguous()
        value, deriv = torch.empty_like(cos), torch.empty_like(cos)
        param_array = (ctypes.c_double * len(params))(*params)
        _call(
            library().mk_emu_margin_transform,
            kind,
            ctypes.cast(param_array, _P),
            int(target),
            STORAGE[cos.dtype],
            cos.numel(),
            *(_ptr(t) for t in (cos, x_norm.contiguous(), w_norm.contiguous())),
            _ptr(None if c_target is None else c_target.contiguous()),
            _ptr(None if gram is None else gram.contiguous()),
            _ptr(value),
            _ptr(deriv),
        )
        return value, deriv


def _mm_fp32_output(a: torch.Tensor, b: torch.Tensor, *, out_dtype=None, out=None):
    """torch.mm, with cuBLAS's fp32-output GEMM of 16-bit operands done on the CPU as an fp32
    GEMM of the (exactly) widened operands."""
    if out_dtype is not None and a.dtype != out_dtype:
        return torch.mm(a.to(out_dtype), b.to(out_dtype))
    if out is not None:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b)


class _TorchWithEmulatedOps:
    """torch, except ``ops.margin_kernels`` (the emulated kernels) and ``mm`` (fp32 output)."""

    def __init__(self, ops: EmulatedOps, gpu_flow: bool) -> None:
        self.ops = SimpleNamespace(margin_kernels=ops)
        if gpu_flow:
            self.mm = _mm_fp32_output

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def emulated_backend(gpu_flow: bool = False) -> Iterator[EmulatedOps]:
    """``margin_kernels.ops.cuda`` on CPU tensors over the emulated kernels. ``gpu_flow``: the
    CUDA device's flow for 16-bit inputs (fp32-output GEMMs of the 16-bit operands, dL/dz in
    the storage dtype written by the epilogue) instead of the CPU's upcast."""
    from margin_kernels.ops import cuda as cuda_backend

    ops = EmulatedOps()
    saved = (cuda_backend.torch, cuda_backend.HAS_CUDA_EXT, cuda_backend._fp32_output_gemm)
    cuda_backend.torch = _TorchWithEmulatedOps(ops, gpu_flow)
    cuda_backend.HAS_CUDA_EXT = True
    if gpu_flow:
        cuda_backend._fp32_output_gemm = lambda device: True
    try:
        yield ops
    finally:
        cuda_backend.torch, cuda_backend.HAS_CUDA_EXT, cuda_backend._fp32_output_gemm = saved
