"""Compile every Triton kernel configuration of ``margin_kernels.ops.triton`` ahead of time for
sm_90 (no GPU needed) and report registers, spills and shared memory per configuration.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions):

    python tests/triton_aot.py            # markdown table on stdout
    python tests/triton_aot.py --json     # machine-readable, for tests/test_triton_aot.py

Registers and spill bytes come from the ``ptxas -v`` report of Triton's own build (stack frames
alone are not spills: libdevice's sin/cos keep a small local array for huge arguments); shared
memory is what the launch asks for (Triton's metadata).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.backends.nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from margin_kernels.ops import triton as tb

ARCH = 90
# Hopper: 64K 32-bit registers per SM, at most 255 per thread; 227 KB of shared memory per block.
MAX_SHARED = 232448
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}  # fmt: skip
_INT_ARGS = {"B", "S", "D", "n_rows", "cols_per_split"}
_LABEL_ARGS = {"Y", "IDS"}
_INPUT_ARGS = {"X", "W", "SRC"}
_UNIT_STRIDES = {"stride_xd", "stride_wd", "stride_d"}
_ALIGNED_INTS = {"D", "stride_xb", "stride_wc", "stride_r", "cols_per_split"}


def _signature(kernel, dtype: torch.dtype, acc: str, constexprs: dict, aligned: bool):
    """Argument types, constexprs and specialisation attributes of one build. ``aligned`` is what
    Triton's JIT specialises a contiguous launch with D % 16 == 0 to (D = 512 in face
    recognition): unit inner strides become constants and pointers, D and row strides are known
    multiples of 16, which is what lets the K loop be software-pipelined (cp.async / TMA)."""
    sig, consts, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[(index,)] = constexprs[name]
            continue
        if aligned and name in _UNIT_STRIDES:
            sig[name] = "constexpr"
            consts[(index,)] = 1
            continue
        if name in _INPUT_ARGS:
            sig[name] = "*" + _TL_DTYPE[dtype]
        elif name in _LABEL_ARGS:
            sig[name] = "*i64"
        elif name in _INT_ARGS or name.startswith("stride"):
            sig[name] = "i32"
        elif name.isupper() or name.endswith("_BUF"):
            sig[name] = "*" + acc
        else:
            sig[name] = "fp32"
        if aligned and (sig[name].startswith("*") or name in _ALIGNED_INTS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the ``ptxas -v`` log of Triton's
    own build (its flags, e.g. --regAllocOptLevel, change the allocation)."""
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spill.group(1)), int(spill.group(2))


def configurations() -> list[dict]:
    """Every kernel build the launchers can ask for: dtype x logit family x Partial-FC ids x fp32
    precision for the tile kernels, in the aligned and the generic specialisation; every margin
    kind (psi order, grad mode, overflow policy) for the target kernel; the row-wise kernels."""
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for precision, family, has_ids, aligned in itertools.product(
            precisions, (tb.NT_RAW, tb.NT_XNORM, tb.NT_SCALED, tb.NT_SO, tb.NT_W),
            (False, True), (True, False),
        ):  # fmt: skip
            tiles = tb._tiles(dtype, family, precision)
            common = dict(NT=family, HAS_IDS=has_ids, ACC=acc, UPCAST=False, PRECISION=precision)
            kernels = (
                ("_fwd_kernel", tiles.fwd),
                ("_bwd_fused_kernel", tiles.bwd),
                ("_bwd_rows_kernel", tiles.det),
                ("_bwd_cols_kernel", tiles.det),
            )
            for name, tile in kernels:
                launch = tile.launch()
                opts = {k: launch.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}
                consts = dict(common, **launch)
                if name in ("_bwd_rows_kernel", "_bwd_cols_kernel"):
                    consts["BLOCK_OUT"] = tile.out
                out.append(dict(kernel=name, dtype=dtype, family=family, ids=has_ids,
                                precision=precision, aligned=aligned, consts=consts,
                                opts=opts))  # fmt: skip
        rows, cols = tb._row_tile(dtype)
        row_opts = dict(tb._ROW_LAUNCH)
        for kind_id in range(9):
            psi_ms = (1, 2, 3, 4) if kind_id in (0, 1) else (1,)
            modes = ((0, 0), (1, 1), (0, 2)) if kind_id == 3 else ((0, 1),)
            for psi_m, (grad_mode, overflow) in itertools.product(psi_ms, modes):
                consts = dict(KIND=kind_id, PSI_M=psi_m, GRAD_MODE=grad_mode, OVERFLOW=overflow,
                              ACC=acc, BLOCK_B=rows, BLOCK_D=cols)  # fmt: skip
                out.append(dict(kernel="_target_kernel", dtype=dtype, family=-1, ids=False,
                                precision="", aligned=True, consts=consts,
                                opts=row_opts))  # fmt: skip
        for has_ids in (False, True):
            for name, consts in (
                ("_row_norm_kernel", dict(HAS_IDS=has_ids, ACC=acc, BLOCK_R=rows, BLOCK_D=cols)),
                ("_add_scaled_rows_kernel", dict(HAS_IDS=has_ids, BLOCK_R=rows, BLOCK_D=cols)),
            ):
                out.append(dict(kernel=name, dtype=dtype, family=-1, ids=has_ids, precision="",
                                aligned=True, consts=consts, opts=row_opts))  # fmt: skip
    return out


def _compile_one(index: int) -> dict:
    cfg = configurations()[index]
    kernel = getattr(tb, cfg["kernel"])
    dtype, consts, opts = cfg["dtype"], cfg["consts"], cfg["opts"]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    sig, constexprs, attrs = _signature(kernel, dtype, acc, consts, cfg["aligned"])
    src = ASTSource(kernel, sig, constexprs, attrs)
    # compile afresh (not from the cache) so that ptxas runs and prints its -v report
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=opts)
    regs, spill_st, spill_ld = _ptxas_usage(log.getvalue())
    return dict(
        kernel=cfg["kernel"], dtype=_TL_DTYPE[dtype], family=cfg["family"], ids=cfg["ids"],
        precision=cfg["precision"], aligned=cfg["aligned"],
        extra=",".join(f"{k}={v}" for k, v in consts.items() if k in ("KIND", "PSI_M")),
        blocks="x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK")),
        warps=opts.get("num_warps"), stages=opts.get("num_stages", 1),
        regs=regs, spill_stores=spill_st, spill_loads=spill_ld, shared=compiled.metadata.shared,
    )  # fmt: skip


def report(jobs: int = 1) -> list[dict]:
    count = len(configurations())
    if jobs <= 1:
        return [_compile_one(i) for i in range(count)]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, range(count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    rows = report(args.jobs)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"Triton {triton.__version__}, sm_{ARCH}, {len(rows)} configurations\n")
    print(
        "| kernel | dtype | precision | family | ids | aligned | kind | blocks | warps | stages "
        "| regs | spills | smem |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['precision']} | {r['family']} | {r['ids']} | "
              f"{r['aligned']} | {r['extra']} | "
              f"{r['blocks']} | {r['warps']} | {r['stages']} | {r['regs']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
