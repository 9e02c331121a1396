"""Compile every Triton kernel configuration of ``margin_kernels.ops.triton`` ahead of time for
sm_90 (no GPU needed) and report registers, spills and shared memory per configuration.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions):

    python tests/triton_aot.py            # markdown table on stdout
    python tests/triton_aot.py --json     # machine-readable, for tests/test_triton_aot.py

Registers and spills come from ptxas (``-v``) on the PTX Triton produced; shared memory is what
the launch asks for (Triton's metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

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


def _signature(kernel, dtype: torch.dtype, acc: str, constexprs: dict):
    sig, consts = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            consts[(index,)] = constexprs[name]
        elif name in _INPUT_ARGS:
            sig[name] = "*" + _TL_DTYPE[dtype]
        elif name in _LABEL_ARGS:
            sig[name] = "*i64"
        elif name in _INT_ARGS or name.startswith("stride"):
            sig[name] = "i32"
        elif name.isupper() or name.endswith("_BUF"):
            sig[name] = "*" + acc
        else:
            sig[name] = "fp32"
    return sig, consts


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, f"-arch=sm_{ARCH}a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return regs, int(spill.group(1)), int(spill.group(2))


def configurations():
    """Every (kernel, dtype, family, constexprs, launch options) the launchers can produce."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        precision = tb._precision(dtype)
        for family in (tb.NT_RAW, tb.NT_XNORM, tb.NT_SCALED, tb.NT_SO, tb.NT_W):
            for has_ids in (False, True):
                tiles = tb._tiles(dtype, family, precision)
                common = dict(NT=family, HAS_IDS=has_ids, ACC=acc, UPCAST=False,
                              PRECISION=precision)  # fmt: skip
                for name, tile in (("_fwd_kernel", tiles.fwd), ("_bwd_fused_kernel", tiles.bwd),
                                   ("_bwd_rows_kernel", tiles.det),
                                   ("_bwd_cols_kernel", tiles.det)):  # fmt: skip
                    launch = tile.launch()
                    opts = dict(num_warps=launch.pop("num_warps"),
                                num_stages=launch.pop("num_stages"))  # fmt: skip
                    consts = dict(common, **launch)
                    if name in ("_bwd_rows_kernel", "_bwd_cols_kernel"):
                        consts["BLOCK_OUT"] = tile.out
                    yield name, dtype, family, has_ids, consts, opts
        tb_, td = 16, 128
        for kind_id in range(9):
            psi_ms = (1, 2, 3, 4) if kind_id in (0, 1) else (1,)
            for psi_m in psi_ms:
                for grad_mode, overflow in ((0, 0), (1, 1), (0, 2)) if kind_id == 3 else ((0, 1),):
                    cons = dict(KIND=kind_id, PSI_M=psi_m, GRAD_MODE=grad_mode, OVERFLOW=overflow,
                                ACC=acc, BLOCK_B=tb_, BLOCK_D=td)  # fmt: skip
                    yield "_target_kernel", dtype, -1, False, cons, dict(num_warps=4)
        for has_ids in (False, True):
            cons = dict(HAS_IDS=has_ids, ACC=acc, BLOCK_R=32, BLOCK_D=128)
            yield "_row_norm_kernel", dtype, -1, has_ids, cons, dict(num_warps=4)
            cons = dict(HAS_IDS=has_ids, BLOCK_R=32, BLOCK_D=128)
            yield "_add_scaled_rows_kernel", dtype, -1, has_ids, cons, dict(num_warps=4)


def report() -> list[dict]:
    rows = []
    target = GPUTarget("cuda", ARCH, 32)
    for name, dtype, family, has_ids, consts, opts in configurations():
        kernel = getattr(tb, name)
        acc = "fp64" if dtype == torch.float64 else "fp32"
        sig, constexprs = _signature(kernel, dtype, acc, consts)
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target, options=opts)
        regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"])
        blocks = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
        rows.append(dict(
            kernel=name, dtype=_TL_DTYPE[dtype], family=family, ids=has_ids,
            extra=",".join(f"{k}={v}" for k, v in consts.items() if k in ("KIND", "PSI_M")),
            blocks=blocks, warps=opts.get("num_warps"), stages=opts.get("num_stages", 1),
            regs=regs, spill_stores=spill_st, spill_loads=spill_ld,
            shared=compiled.metadata.shared,
        ))  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    rows = report()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"Triton {triton.__version__}, sm_{ARCH}, {len(rows)} configurations\n")
    print(
        "| kernel | dtype | family | ids | kind | blocks | warps | stages | regs | spills | smem |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['family']} | {r['ids']} | {r['extra']} | "
              f"{r['blocks']} | {r['warps']} | {r['stages']} | {r['regs']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
