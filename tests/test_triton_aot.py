"""Every Triton kernel configuration the launchers can pick compiles ahead of time for sm_90
(no GPU needed) without register spills and within Hopper's shared memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from triton_aot import MAX_SHARED

SCRIPT = Path(__file__).with_name("triton_aot.py")


@pytest.fixture(scope="module")
def aot_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_every_configuration_compiles(aot_rows):
    kernels = {row["kernel"] for row in aot_rows}
    assert kernels == {"_fwd_kernel", "_dw_kernel", "_target_kernel", "_row_norm_kernel"}
    assert {row["dtype"] for row in aot_rows} == {"bf16", "fp16", "fp32", "fp64"}


def test_no_register_spills(aot_rows):
    spilled = [r for r in aot_rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "\n".join(
        f"{r['kernel']} {r['dtype']} family={r['family']} ids={r['ids']} {r['extra']} "
        f"blocks={r['blocks']}: {r['regs']} regs, spills {r['spill_stores']}/{r['spill_loads']}"
        for r in spilled
    )
    assert max(r["regs"] for r in aot_rows) <= 255


def test_registers_fit_one_program_per_sm(aot_rows):
    """ptxas does not know the block size: registers x threads must fit the SM's 64K, or the
    launch fails with "too many resources requested"."""
    too_big = [r for r in aot_rows if r["regs"] * r["warps"] * 32 > 65536]
    assert not too_big, [(r["kernel"], r["dtype"], r["blocks"], r["warps"]) for r in too_big]


def test_all_of_d_on_chip_at_d_512_for_16_bit_inputs(aot_rows):
    """The headline shape (D = 512, bf16/fp16) holds all of D on chip in both GEMM kernels."""
    for kernel in ("_fwd_kernel", "_dw_kernel"):
        rows = [r for r in aot_rows if r["kernel"] == kernel and r["dtype"] in ("bf16", "fp16")
                and r["dim"] == 512 and r["family"] != 4 and r["aligned"]]  # fmt: skip
        assert rows and all("ONE_K=True" in r["extra"] for r in rows), kernel


def test_shared_memory_fits_hopper(aot_rows):
    assert max(r["shared"] for r in aot_rows) <= MAX_SHARED


def test_headline_builds_run_both_products_on_wgmma_unserialised(aot_rows):
    """At D = 512 the 16-bit GEMM builds use Hopper's wgmma (HGMMA in their SASS), not the
    legacy mma.sync, and ptxas does not serialise them (advisory C7515: each wgmma waits for
    the previous one, which the two-stage builds of these kernels triggered). The one
    exception is documented in config.gemm_tile: fp16 dW owners with Partial-FC ids take 32
    classes (mma.sync) to stay spill-free."""
    exception = ("_dw_kernel", "fp16", True)
    rows = [r for r in aot_rows if r["kernel"] in ("_fwd_kernel", "_dw_kernel")
            and r["dtype"] in ("bf16", "fp16") and r["dim"] == 512 and r["family"] != 4
            and r["aligned"] and (r["kernel"], r["dtype"], r["ids"]) != exception]  # fmt: skip
    assert rows
    assert not [r for r in rows if r["wgmma_serialized"]], [
        (r["kernel"], r["dtype"], r["family"], r["ids"], r["blocks"], r["stages"])
        for r in rows if r["wgmma_serialized"]
    ]  # fmt: skip
    if rows[0]["mma"] is None:
        pytest.skip("this Triton ships no nvdisasm")
    assert all(r["mma"] == "wgmma" for r in rows), [
        (r["kernel"], r["dtype"], r["family"], r["mma"]) for r in rows
    ]


def test_model_sass_counts_match_these_builds(aot_rows):
    """bench/triton_sass_sm90.json (what bench/model.py costs the loops from) lists every aligned
    GEMM build of this matrix with its tile; on the Triton that wrote it, the same counts."""
    path = Path(__file__).parents[1] / "bench" / "triton_sass_sm90.json"
    data = json.loads(path.read_text())
    import triton

    def key(row):
        num = row["kernel"] == "_dw_kernel" or row.get(
            "needs_num", "NEEDS_NUM=True" in row.get("extra", "")
        )
        return (row["kernel"], row["dtype"], row["family"], row["ids"], bool(num),
                row["blocks"], row["warps"], row["stages"])  # fmt: skip

    saved = {key(row): row for row in data["builds"]}
    built = {key(r): r for r in aot_rows if r["kernel"] in ("_fwd_kernel", "_dw_kernel")
             and r["aligned"] and r["precision"] != "tf32" and r["loop_sass"]}  # fmt: skip
    if not built:
        pytest.skip("this Triton ships no nvdisasm")
    assert set(built) == set(saved), "regenerate with tests/triton_aot.py --sass-json"
    if data["triton"] == triton.__version__:
        assert all(saved[k]["loop_sass"] == built[k]["loop_sass"] for k in built)
