"""bench/model.py: the performance model's counts, W re-read rule, tables and labels.

Fast: no kernel runs; the model is pure arithmetic over launch configurations."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("bench_model", REPO / "bench" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _shape(model, batch=1024, classes=2**20, dim=512, rate=1.0):
    # tile-aligned class count, so that no padding enters the FLOP counts
    return model.Shape("test", batch, classes, dim, torch.bfloat16, "arcface", rate)


def _gemm_launch(model, role, grid, block_m, block_n, row_tiles, col_tiles, order):
    return model.Launch("backward" if role == "dw" else "forward", f"k_{role}", role, grid,
                        block_m, block_n, 512, 8, 2, row_tiles, col_tiles, order)  # fmt: skip


def test_gemm_shaped_flops_are_two_bsd_per_product(model):
    shape = _shape(model)
    h100 = model.MACHINES["h100"]
    B, S, D = shape.batch, shape.sampled, shape.dim
    fwd = _gemm_launch(model, "forward", (16, 16), 64, 64, 1, S // 64 // 16, "row tiles fastest")
    dw = _gemm_launch(model, "dw", (S // 64,), 64, 64, B // 64, 1, "class tiles")
    one_gemm = 2.0 * B * S * D
    # forward: logits, plus the dX numerator only when x needs a gradient
    assert model.cost_of_launch(fwd, shape, h100, needs_dx=False).mma_flops == one_gemm
    assert model.cost_of_launch(fwd, shape, h100, needs_dx=True).mma_flops == 2 * one_gemm
    # dW owner: logits recomputed + P^T X
    assert model.cost_of_launch(dw, shape, h100, needs_dx=True).mma_flops == 2 * one_gemm
    # a plan that splits D into 4 slices recomputes the logits 4 times, writes dW once
    sliced = _gemm_launch(model, "dw", (4 * S // 64,), 64, 64, B // 64, 1, "D slices fastest")
    assert model.cost_of_launch(sliced, shape, h100, needs_dx=True).mma_flops == 5 * one_gemm


def test_new_triton_plan_is_four_gemms_and_writes_dw_once(model):
    shape = _shape(model)
    for machine in model.MACHINES.values():
        costs = model.new_triton_costs(shape, machine, backward=True)
        gemm = [c for c in costs if c.role in model.GEMM_ROLES]
        flops = sum(c.mma_flops for c in gemm)
        assert flops == pytest.approx(4 * 2.0 * shape.batch * shape.sampled * shape.dim)
        assert sum(c.atomics for c in costs) == 0
        assert sum(c.dw_passes for c in costs) == 1
        assert all(c.time_s > 0 and math.isfinite(c.time_s) for c in costs)


def test_every_w_pass_reads_at_least_all_of_w(model):
    h100 = model.MACHINES["h100"]
    for shape in model.SHAPES:
        w_bytes = shape.sampled * shape.dim * shape.itemsize
        for provider, design, _ in model.ROWS:
            for cost in model.kernel_costs(provider, design, shape, h100, True):
                if cost.role == "gemm" or not cost.w_passes:
                    continue  # cuBLAS rows count their own operands; chunks count fractions
                assert cost.hbm_bytes >= cost.w_passes * w_bytes * (1 - 1e-9), (
                    provider, design, cost.kernel,
                )  # fmt: skip


@pytest.mark.parametrize("batch", [256, 1024, 2048])
def test_old_fused_backward_streams_w_once_per_row_tile(model, batch):
    h100 = model.MACHINES["h100"]
    shape = _shape(model, batch=batch, classes=1_000_000)
    fused = next(
        c
        for c in model.old_triton_costs(shape, h100, True, deterministic=False)
        if c.role == "fused_bwd"
    )
    row_tiles = math.ceil(batch / model.OLD_BWD_TILE[0])
    assert fused.w_passes == row_tiles
    assert fused.dw_passes == row_tiles
    assert fused.hbm_bytes >= row_tiles * shape.sampled * shape.dim * (2 + 2 * 4)
    # atomics: dX per column tile, dW per row tile
    col_tiles = math.ceil(shape.sampled / model.OLD_BWD_TILE[1])
    assert fused.atomics >= col_tiles * batch * shape.dim + row_tiles * shape.sampled * shape.dim


def test_old_fused_backward_hits_l2_when_w_fits(model):
    h100 = model.MACHINES["h100"]
    small = _shape(model, classes=10_000)  # W = 10 MB < half of the 50 MB L2
    fused = next(
        c for c in model.old_triton_costs(small, h100, True, False) if c.role == "fused_bwd"
    )
    assert fused.w_passes == 1


def test_launch_order_decides_w_rereads(model):
    shape = _shape(model, classes=1_000_000)
    h100 = model.MACHINES["h100"]
    rows_first = _gemm_launch(model, "forward", (16, 33), 64, 64, 1, 474, "row tiles fastest")
    cols_first = _gemm_launch(model, "forward", (33, 16), 64, 64, 1, 474,
                              "class splits fastest, row tiles on axis 1")  # fmt: skip
    grouped = _gemm_launch(model, "forward", (528,), 64, 64, 1, 474,
                           "class splits fastest within groups of 8 row tiles")  # fmt: skip
    assert model.w_stream_passes(rows_first, shape, h100, sharers=16) == 1
    assert model.w_stream_passes(cols_first, shape, h100, sharers=16) == 16
    assert model.w_stream_passes(grouped, shape, h100, sharers=16) == 2
    # one wave of programs: all sharers resident, W read once whatever the order
    one_wave = _gemm_launch(model, "forward", (8, 16), 64, 64, 1, 1000, "class splits fastest")
    assert model.w_stream_passes(one_wave, shape, h100, sharers=16) == 1


def test_wave_efficiency(model):
    assert model.wave_efficiency(16, 1, 132) == (pytest.approx(16 / 132), 1)
    assert model.wave_efficiency(264, 1, 132) == (1.0, 2)
    assert model.wave_efficiency(133, 1, 132) == (pytest.approx(133 / 264), 2)
    assert model.wave_efficiency(264, 2, 132) == (1.0, 1)


def test_gemm_baseline_is_compute_bound_near_four_ms(model):
    shape = model.SHAPES[0]
    for machine in model.MACHINES.values():
        costs = model.gemm_baseline_costs(shape, machine, backward=True)
        assert [c.bound for c in costs] == ["compute"] * 3
        flops = sum(c.mma_flops for c in costs)
        assert flops >= 3 * 2.0 * shape.batch * shape.sampled * shape.dim
        # three GEMMs of 1.05 TFLOP at the GEMM rate, plus launch terms
        floor = 3 * 2.0 * shape.batch * shape.sampled * shape.dim / machine.gemm_rate
        assert floor <= model.total_ms(costs) / 1e3 < 1.1 * floor


def test_old_designs_reproduce_the_issues_ranges(model):
    """Issue 11 read the old Triton default at 8-12x and the deterministic path at 10-16x of the
    three GEMMs at the headline shape; issue 12 the old CUDA backend at 15-18x (roughly)."""
    shape = model.SHAPES[0]
    h100 = model.MACHINES["h100"]
    gemm = model.total_ms(model.gemm_baseline_costs(shape, h100, True))

    def ratio(provider, design):
        return model.total_ms(model.kernel_costs(provider, design, shape, h100, True)) / gemm

    assert 8 <= ratio("triton", "old") <= 12
    assert 10 <= ratio("triton-deterministic", "old") <= 16
    assert 10 <= ratio("cuda", "old") <= 20
    old_cuda = model.kernel_costs("cuda", "old", shape, h100, True)
    assert sum(c.w_passes for c in old_cuda) == 3 * math.ceil(shape.batch / 134)


def test_new_cuda_reads_each_chunk_of_w_once_per_gemm(model):
    shape = model.SHAPES[0]
    costs = model.new_cuda_costs(shape, model.MACHINES["h200"], backward=True)
    gemm_w = sum(c.w_passes for c in costs if c.role == "gemm")
    assert gemm_w == pytest.approx(3.0)  # forward, recompute, dX: each chunk of W once
    plan, _ = model.new_cuda_plan(shape)
    assert plan.classes_per_chunk * plan.num_chunks >= shape.sampled


def test_new_cuda_costs_the_merged_backward(model):
    """W's norms once (forward), dz written once in bf16 by the epilogue (no cast pass), W_c
    normalised once for the dX GEMM (the 16-bit dz carries max(||W_j||, eps)), one fused
    column-norm pass that writes dW once: W is streamed by exactly three non-GEMM passes."""
    shape = model.SHAPES[0]
    costs = model.new_cuda_costs(shape, model.MACHINES["h200"], backward=True)
    B, S, D = shape.batch, shape.sampled, shape.dim
    assert sum(c.w_passes for c in costs if c.role != "gemm") == pytest.approx(3.0)
    normalise = next(c for c in costs if "dX operand" in c.kernel)
    assert normalise.hbm_bytes == pytest.approx(S * D * (2 + 2))  # read W_c, write W_c / norm
    assert sum(c.dw_passes for c in costs) == pytest.approx(1.0)
    assert not [c for c in costs if "cast dz" in c.kernel]
    bwd = next(c for c in costs if c.role == "epilogue_bwd")
    assert bwd.hbm_bytes == pytest.approx(B * S * (4 + 2))  # read fp32 z, write bf16 dz
    chain = next(c for c in costs if "column_chain" in c.kernel)
    assert chain.hbm_bytes == pytest.approx(S * D * (4 + 2 + 2))  # H_c fp32, W_c, dW_c


def test_mma_fraction_follows_the_instruction_and_its_operands(model):
    h100 = model.MACHINES["h100"]
    a = model.ASSUMPTIONS
    best = a.wgmma_ceiling * a.triton_loop_fraction
    # a 64 x 128 tile at 8 warps: wgmma of N = 64 per warpgroup, shared memory keeps up
    assert model.mma_fraction(64, 128, 64, 8, False, h100) == pytest.approx(best)
    # 64 x 32: N = 16 per warpgroup, the A fragment re-read per instruction starves it
    forward = model.mma_fraction(64, 32, 512, 8, False, h100)
    assert forward < 0.6 * best
    # 32 rows: no wgmma; mma.sync's ceiling caps it below the forward's logits
    dw = model.mma_fraction(32, 32, 512, 8, False, h100)
    assert dw <= a.mma_sync_ceiling * a.triton_loop_fraction and dw < forward
    # the second product takes P from registers: only B is read from shared memory
    assert model.mma_fraction(64, 512, 64, 8, True, h100) == pytest.approx(best)
    assert model.mma_fraction(64, 512, 32, 8, True, h100) == pytest.approx(best * a.narrow_k_factor)


def test_single_stage_one_program_exposes_every_tile_load(model):
    shape = _shape(model)
    h100 = model.MACHINES["h100"]
    S, B, D = shape.sampled, shape.batch, shape.dim
    one = model.Launch("backward", "k_dw", "dw", (S // 32,), 32, 32, D, 8, 1, B // 32, 1, "cls")
    two = model.Launch("backward", "k_dw", "dw", (S // 32,), 32, 32, D, 8, 2, B // 32, 1, "cls")
    four_warps = model.Launch("backward", "k_dw", "dw", (S // 32,), 32, 32, D, 4, 1, B // 32,
                              1, "cls")  # fmt: skip
    stalled = model.cost_of_launch(one, shape, h100, needs_dx=True)
    piped = model.cost_of_launch(two, shape, h100, needs_dx=True)
    a = model.ASSUMPTIONS
    steps = (S // 32) * (B // 32)
    per_step = a.l2_latency_s + 32 * D * 2 / (a.l2_port_bytes_per_clk * h100.clock_hz)
    assert stalled.stall_s == pytest.approx(steps * per_step / h100.num_sms)
    assert piped.stall_s == 0
    # two resident programs per SM (4 warps) hide each other's loads
    assert model.cost_of_launch(four_warps, shape, h100, needs_dx=True).stall_s == 0
    # one 8-warp program per SM issues the epilogue at half rate
    assert stalled.issue_efficiency == pytest.approx(8 / a.warps_to_hide_alu)
    # every owner re-reads all of x from L2
    assert stalled.l2_bytes == pytest.approx((S // 32) * B * D * 2)
    ev = model.evaluate(stalled, h100)
    assert ev.time_s > model.evaluate(piped, h100).time_s


def test_new_triton_costs_the_plans_tiles(model):
    """The costs follow the launchers' plan: exposed loads exactly where a GEMM-shaped launch has
    one stage (one program per SM at 8 warps), mma.sync rates for tiles under 64 rows/classes."""
    shape = model.SHAPES[0]
    h200 = model.MACHINES["h200"]
    launches, source = model.new_triton_launches(shape, True, True, h200)
    if source != "margin_kernels.ops.triton.config.plan":
        pytest.skip("the Triton launch configuration is not importable")
    costs = model.new_triton_costs(shape, h200, True)
    gemm = [
        (launch, cost)
        for launch, cost in zip(launches, costs, strict=True)
        if cost.role in ("forward", "dw")
    ]
    assert len(gemm) == 2
    for launch, cost in gemm:
        assert cost.role == launch.role
        single = (
            launch.num_stages <= 1 and model.programs_per_sm(launch.role, launch.num_warps) == 1
        )
        assert (cost.stall_s > 0) == single
        assert cost.mma_rate < h200.bf16_peak * model.ASSUMPTIONS.triton_loop_fraction
        if min(launch.block_m, launch.block_n) < 64:
            m1 = launch.block_n if launch.role == "dw" else launch.block_m
            ceiling = model.ASSUMPTIONS.mma_sync_ceiling if m1 < 64 else 1.0
            assert cost.mma_rate < ceiling * h200.bf16_peak


def test_triton_what_ifs_each_lower_the_prediction(model):
    shape = model.SHAPES[0]
    h100 = model.MACHINES["h100"]
    base = model.total_ms(model.new_triton_costs(shape, h100, True))
    alone = []
    for what_if in model.TRITON_WHAT_IFS:
        ms = model.total_ms(model.new_triton_costs(shape, h100, True, [what_if]))
        assert ms < base, what_if
        alone.append(ms)
    both = model.total_ms(model.new_triton_costs(shape, h100, True, model.TRITON_WHAT_IFS))
    assert both <= min(alone)
    with pytest.raises(ValueError, match="what-ifs"):
        model.new_triton_costs(shape, h100, True, ["magic"])


def test_partial_fc_triton_writes_dw_in_one_pass(model):
    """Zero fill of the C - S unsampled rows, then the owners' S rows: no memset of all C."""
    shape = model.SHAPES[2]
    assert shape.sampled < shape.num_classes
    costs = model.new_triton_costs(shape, model.MACHINES["h100"], True)
    assert not [c for c in costs if c.kernel.startswith("zeros dW")]
    fill = [c for c in costs if c.role == "zero_fill"]
    assert len(fill) == 1
    unsampled = (shape.num_classes - shape.sampled) * shape.dim * shape.itemsize
    assert fill[0].hbm_bytes == unsampled + shape.num_classes
    dw = next(c for c in costs if c.role == "dw")
    assert dw.hbm_bytes < shape.num_classes * shape.dim * shape.itemsize
    assert sum(c.dw_passes for c in costs) == pytest.approx(1.0 + 0.9)


def test_headline_epilogue_is_costed_from_the_compiled_sass(model):
    """The GEMM kernels of the headline plan are found in bench/triton_sass_sm90.json, and their
    issue term is tile steps x loop SASS x warps."""
    shape = model.SHAPES[0]
    launches, _ = model.new_triton_launches(shape, True, True, model.MACHINES["h100"])
    for launch in (one for one in launches if one.role in ("forward", "dw")):
        row = model.sass_row(launch, shape, True)
        assert row is not None and row["mma"] == "wgmma", launch
        cost = model.cost_of_launch(launch, shape, model.MACHINES["h100"], True)
        steps = math.prod(launch.grid) * launch.row_tiles_per_program * launch.col_tiles_per_program
        assert cost.issue_warp_instructions == steps * row["loop_sass"] * launch.num_warps


def test_tables_build_for_every_shape_and_machine(model):
    for machine in model.MACHINES.values():
        rows = model.summary_rows(machine)
        assert {r["shape"] for r in rows} == {s.name for s in model.SHAPES}
        assert len(rows) == len(model.SHAPES) * len(model.ROWS)
        for row in rows:
            assert row["predicted_ms"] > 0 and math.isfinite(row["predicted_ms"])
        gemm_rows = [r for r in rows if r["design"].startswith("3 bare GEMMs")]
        assert all(r["predicted_vs_gemm"] == pytest.approx(1.0) for r in gemm_rows)
        assert model.what_if_rows(machine)


def test_predict_is_labelled_and_validates(model):
    out = model.predict("triton", 1024, 100_000, 512, "bf16", "arcface", 1.0, "fwd+bwd")
    assert out["label"] == "predicted"
    assert out["predicted_vs_gemm"] == pytest.approx(out["predicted_ms"] / out["gemm_predicted_ms"])
    assert all("predicted_ms" in k for k in out["kernels"])
    fwd = model.predict("triton", 1024, 100_000, 512, "bf16", "arcface", 1.0, "fwd")
    assert 0 < fwd["predicted_ms"] < out["predicted_ms"]
    sampled = model.predict("cuda", 1024, 100_000, 512, torch.bfloat16, "cosface", 0.1, "fwd+bwd")
    assert sampled["predicted_ms"] > 0
    for bad in (dict(mode="bwd"), dict(machine="a100"), dict(provider="torch")):
        args = dict(provider="triton", batch=8, num_classes=16, dim=8, mode="fwd")
        with pytest.raises(ValueError):
            model.predict(**{**args, **bad})
    with pytest.raises(ValueError, match="dtype"):
        model.predict("gemm", 8, 16, 8, "int8")


def test_cli_labels_every_number_predicted(model, tmp_path, capsys):
    md, table = tmp_path / "model.md", tmp_path / "model.csv"
    assert model.main(["--machine", "h200", "--markdown", str(md), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("All times are predicted")
    headers = [line for line in printed.splitlines() if line.startswith("### ")]
    assert headers and all("predicted" in line for line in headers)
    assert md.read_text().strip() == printed.strip()
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["label"] == "predicted" for r in rows)
    assert {r["machine"] for r in rows} == {"H200"}


def test_bench_run_puts_predictions_beside_h100_and_h200_rows():
    spec = importlib.util.spec_from_file_location("bench_run_for_model", REPO / "bench" / "run.py")
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run
    spec.loader.exec_module(run)
    case = run.Case("arcface", run.Shape("bf16", "fwd+bwd", 1024, 100_000, 512, 1.0))
    assert run.predicted_for("triton", case, "cpu") is None
    assert run.predicted_for("torch", case, "NVIDIA H100 80GB HBM3") is None
    out = run.predicted_for("triton", case, "NVIDIA H100 80GB HBM3")
    assert out["label"] == "predicted" and out["machine"] == "H100 SXM"
    h200 = run.predicted_for("gemm", case, "NVIDIA H200")
    assert h200["machine"] == "H200" and h200["predicted_vs_gemm"] == pytest.approx(1.0)
