"""Compile every Triton kernel configuration the launchers of ``margin_kernels.ops.triton`` can
produce ahead of time for sm_90 (no GPU needed) and report registers, spills and shared memory.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions):

    python tests/triton_aot.py            # markdown table on stdout
    python tests/triton_aot.py --json     # machine-readable, for tests/test_triton_aot.py

Registers and spill bytes come from the ``ptxas -v`` report of Triton's own build (stack frames
alone are not spills: libdevice's sin/cos keep a small local array for huge arguments); shared
memory is what the launch asks for (Triton's metadata).

The matrix is what the launchers can ask for, trimmed where a dimension cannot change the
build's register or shared-memory footprint upward:

* ``_fwd_kernel`` and ``_dw_kernel``: storage dtype (fp32 in both GEMM precisions) x logit
  family x {all of D on chip at the largest D it is chosen for, D slices}; with the dX
  numerator (forward) in the aligned specialisation with and without Partial-FC ids and in the
  generic one; the forward without the numerator (inference) aligned only. Smaller D with all
  of D on chip are the same kernel with smaller tiles.
* ``_target_kernel``: every margin kind, grad mode and overflow policy; psi orders 1-4 and 16
  (the longest unrolled recurrence; 5-15 lie in between).
* ``_row_norm_kernel``: with and without ids.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.backends.nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from margin_kernels.ops.triton import backward, config, forward

ARCH = 90
# Hopper: 64K 32-bit registers per SM, at most 255 per thread; 227 KB of shared memory per block.
MAX_SHARED = 232448
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}  # fmt: skip
_KERNELS = {
    "_fwd_kernel": forward._fwd_kernel,
    "_dw_kernel": backward._dw_kernel,
    "_target_kernel": forward._target_kernel,
    "_row_norm_kernel": forward._row_norm_kernel,
}
_INT_ARGS = {"B", "S", "D", "n_rows", "cols_per_split", "row_blocks", "slices"}
_LABEL_ARGS = {"Y", "IDS"}
_INPUT_ARGS = {"X", "W", "SRC", "DW"}  # storage dtype (dW is written in W's dtype)
_UNIT_STRIDES = {"stride_xd", "stride_wd", "stride_d"}
_ALIGNED_INTS = {"D", "stride_xb", "stride_wc", "stride_r", "cols_per_split"}
_FAMILIES = (config.NT_RAW, config.NT_XNORM, config.NT_SCALED, config.NT_SO, config.NT_W)
_PSI_ORDERS = (1, 2, 3, 4, 16)


def _signature(kernel, dtype: torch.dtype, acc: str, constexprs: dict, aligned: bool):
    """Argument types, constexprs and specialisation attributes of one build. ``aligned`` is what
    Triton's JIT specialises a contiguous launch with D % 16 == 0 to (D = 512 in face
    recognition): unit inner strides become constants and pointers, D and row strides are known
    multiples of 16, which is what lets the loads be vectorised and pipelined."""
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
        else:
            sig[name] = "*" + acc
        if aligned and (sig[name].startswith("*") or name in _ALIGNED_INTS):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_usage(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the ``ptxas -v`` log of Triton's
    own build (its flags, e.g. --regAllocOptLevel, change the allocation)."""
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spill.group(1)), int(spill.group(2))


def _gemm_builds(dtype, precision, family):
    """(kernel, dim, ids, aligned, needs_num) of the GEMM-shaped kernels for one dtype/family."""
    limit = max(config.full_d_limit(dtype, family, interpret=False), 64)
    out = []
    for dim in (limit, 2 * limit):  # all of D on chip at its largest; D slices
        for kernel in ("_fwd_kernel", "_dw_kernel"):
            out.append((kernel, dim, False, True, True))
            out.append((kernel, dim, True, True, True))
        out.append(("_fwd_kernel", dim, False, True, False))
    # strided or D % 16 != 0: one tile for every D (narrow D slices)
    out += [("_fwd_kernel", limit, False, False, True), ("_dw_kernel", limit, False, False, True)]
    return out


def configurations() -> list[dict]:
    """Every kernel build of the matrix described in the module docstring."""
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for precision, family in itertools.product(precisions, _FAMILIES):
            for name, dim, ids, aligned, needs_num in _gemm_builds(dtype, precision, family):
                tile = config.gemm_tile(
                    dtype,
                    family,
                    dim,
                    interpret=False,
                    aligned=aligned,
                    kernel="dw" if name == "_dw_kernel" else "forward",
                    has_ids=ids,
                )
                consts = dict(
                    NT=family, HAS_IDS=ids, ACC=acc, UPCAST=False, PRECISION=precision,
                    ONE_K=tile.one_k(dim), SCALE_OPS=dtype == torch.float16,
                    EVEN_D=aligned and dim % tile.block_out == 0,
                    BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                    BLOCK_OUT=tile.block_out,
                )  # fmt: skip
                if name == "_fwd_kernel":
                    consts["NEEDS_NUM"] = needs_num
                opts = dict(num_warps=tile.num_warps, num_stages=tile.num_stages,
                            maxnreg=config.MAX_REGISTERS)  # fmt: skip
                out.append(dict(kernel=name, dtype=dtype, family=family, ids=ids,
                                precision=precision, aligned=aligned, dim=dim,
                                consts=consts, opts=opts))  # fmt: skip
        rt = config.row_tile(dtype, interpret=False)
        row_opts = dict(num_warps=rt.num_warps, maxnreg=config.MAX_REGISTERS)
        for kind_id in range(9):
            psi_ms = _PSI_ORDERS if kind_id in (0, 1) else (1,)
            modes = ((0, 0), (1, 1), (0, 2)) if kind_id == 3 else ((0, 1),)
            for psi_m, (grad_mode, overflow) in itertools.product(psi_ms, modes):
                consts = dict(KIND=kind_id, PSI_M=psi_m, GRAD_MODE=grad_mode, OVERFLOW=overflow,
                              ACC=acc, BLOCK_B=rt.block_r, BLOCK_D=rt.block_k)  # fmt: skip
                out.append(dict(kernel="_target_kernel", dtype=dtype, family=-1, ids=False,
                                precision="", aligned=True, dim=0, consts=consts,
                                opts=row_opts))  # fmt: skip
        for has_ids in (False, True):
            consts = dict(HAS_IDS=has_ids, ACC=acc, BLOCK_R=rt.block_r, BLOCK_D=rt.block_k)
            out.append(dict(kernel="_row_norm_kernel", dtype=dtype, family=-1, ids=has_ids,
                            precision="", aligned=True, dim=0, consts=consts,
                            opts=row_opts))  # fmt: skip
    return _unique(out)


def _unique(builds: list[dict]) -> list[dict]:
    """Builds that differ (D slices of the same tile at two D are one build)."""
    seen, out = set(), []
    for cfg in builds:
        key = (cfg["kernel"], cfg["dtype"], cfg["aligned"], cfg["precision"],
               tuple(sorted((k, str(v)) for k, v in cfg["consts"].items())))  # fmt: skip
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def _nvdisasm() -> str | None:
    path = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "nvdisasm")
    return path if os.path.exists(path) else None


def sass_facts(cubin: bytes) -> dict:
    """From the SASS of a build: ``loop_sass``, the instructions in its largest loop (the body
    between the target of its longest backward branch and that branch, i.e. what each thread
    issues per tile step, every branch of the body counted), and ``mma``, the tensor-core
    instruction the build uses ("wgmma" for HGMMA, "mma.sync" for HMMA, "none"). Both None when
    nvdisasm is not shipped."""
    tool = _nvdisasm()
    if tool is None:
        return dict(loop_sass=None, mma=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([tool, "-c", fh.name], capture_output=True, text=True).stdout
    labels, ops, loops = {}, [], []
    for line in text.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        inst = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if inst:
            ops.append(inst.group(1))
    for index, inst in enumerate(ops):
        target = re.search(r"BRA\s.*`\(\.(L_x_\d+)\)", inst)
        if target and labels.get(target.group(1), index + 1) <= index:
            loops.append(index + 1 - labels[target.group(1)])
    mma = "wgmma" if "HGMMA" in text else "mma.sync" if "HMMA" in text else "none"
    return dict(loop_sass=max(loops) if loops else None, mma=mma)


def _compile_one(index: int) -> dict:
    cfg = configurations()[index]
    kernel = _KERNELS[cfg["kernel"]]
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
    # ptxas advisory C7515: it serialises the build's wgmma (each waits for the previous one)
    serialized = "C7515" in log.getvalue()
    return dict(
        kernel=cfg["kernel"], dtype=_TL_DTYPE[dtype], family=cfg["family"], ids=cfg["ids"],
        precision=cfg["precision"], aligned=cfg["aligned"], dim=cfg["dim"],
        extra=",".join(f"{k}={v}" for k, v in consts.items()
                       if k in ("KIND", "PSI_M", "ONE_K", "NEEDS_NUM")),
        blocks="x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK")),
        warps=opts.get("num_warps"), stages=opts.get("num_stages", 1),
        regs=regs, spill_stores=spill_st, spill_loads=spill_ld, shared=compiled.metadata.shared,
        wgmma_serialized=serialized,
        logits_per_thread=(consts["BLOCK_M"] * consts["BLOCK_N"] // (32 * opts["num_warps"])
                           if "BLOCK_M" in consts else None),
        **(sass_facts(compiled.asm["cubin"]) if "BLOCK_M" in consts
           else dict(loop_sass=None, mma=None)),
    )  # fmt: skip


def report(jobs: int = 1, only: str | None = None) -> list[dict]:
    indices = [
        i for i, c in enumerate(configurations()) if only is None or re.search(only, _key(c))
    ]
    if jobs <= 1:
        return [_compile_one(i) for i in indices]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, indices))


def _key(cfg: dict) -> str:
    return (f"{cfg['kernel']} {_TL_DTYPE[cfg['dtype']]} {cfg['precision']} nt={cfg['family']} "
            f"ids={cfg['ids']} aligned={cfg['aligned']} dim={cfg['dim']} "
            + " ".join(f"{k}={v}" for k, v in cfg["consts"].items()))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", help="regular expression over the build's description")
    parser.add_argument("--from-json", help="print the tables of a saved --json report")
    parser.add_argument(
        "--sass-json",
        help="also write the GEMM builds' SASS loop counts here (bench/triton_sass_sm90.json, "
        "read by bench/model.py)",
    )
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as fh:
            rows = json.load(fh)
        if args.sass_json:
            write_sass_json(rows, args.sass_json)
        return _print_tables(rows)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    rows = report(args.jobs, args.only)
    if args.sass_json:
        write_sass_json(rows, args.sass_json)
    if args.json:
        print(json.dumps(rows))
        return 0
    return _print_tables(rows)


def _per_logit(row: dict) -> str:
    if not row.get("loop_sass") or not row.get("logits_per_thread"):
        return ""
    return f"{row['loop_sass'] / row['logits_per_thread']:.0f}"


def write_sass_json(rows: list[dict], path: str) -> None:
    """The aligned GEMM builds' SASS facts, keyed as bench/model.py looks them up."""
    builds = [
        dict(kernel=r["kernel"], dtype=r["dtype"], family=r["family"], ids=r["ids"],
             needs_num=r["kernel"] == "_dw_kernel" or "NEEDS_NUM=True" in r["extra"],
             blocks=r["blocks"], warps=r["warps"], stages=r["stages"],
             loop_sass=r["loop_sass"], logits_per_thread=r["logits_per_thread"], mma=r["mma"],
             regs=r["regs"], precision=r["precision"])
        for r in rows
        if r["kernel"] in ("_fwd_kernel", "_dw_kernel") and r["aligned"] and r["loop_sass"]
        and r["precision"] != "tf32"
    ]  # fmt: skip
    payload = dict(
        triton=triton.__version__, arch=f"sm_{ARCH}",
        note="per-thread SASS instructions in each build's main loop (one tile step), written "
             "by tests/triton_aot.py --sass-json; read by bench/model.py",
        builds=builds,
    )  # fmt: skip
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")


def _print_tables(rows: list[dict]) -> int:
    print(f"Triton {triton.__version__}, sm_{ARCH}, {len(rows)} configurations\n")
    print("| kernel | dtype | builds | registers (min-max) | spilling builds | max shared memory |")
    print("|---|---|---:|---|---:|---:|")
    for kernel, dtype in sorted({(r["kernel"], r["dtype"]) for r in rows}):
        group = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype]
        regs = [r["regs"] for r in group]
        spilling = sum(1 for r in group if r["spill_stores"] or r["spill_loads"])
        print(f"| {kernel} | {dtype} | {len(group)} | {min(regs)}-{max(regs)} | {spilling} | "
              f"{max(r['shared'] for r in group)} |")  # fmt: skip
    print()
    print(
        "| kernel | dtype | precision | family | ids | aligned | D | flags | blocks | warps "
        "| stages | regs | spills | smem | MMA | loop SASS | per logit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['precision']} | {r['family']} | {r['ids']} | "
              f"{r['aligned']} | {r['dim'] or ''} | {r['extra']} | "
              f"{r['blocks']} | {r['warps']} | {r['stages']} | {r['regs']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r.get('mma') or ''} | "
              f"{r.get('loop_sass') or ''} | {_per_logit(r)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
