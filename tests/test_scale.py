"""bench/scale.py: the peak-memory measurement on a known allocation, the subtraction of the
gradients, the memory prediction that decides skips, the CSV schema of a tiny sweep (one child
process), and the ratio table and plot."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "scale.py"
MIB = 2**20


def _load_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


scale = _load_scale()
needs_proc = pytest.mark.skipif(
    scale.linux_memory_available() is not None, reason="needs Linux /proc/self/clear_refs"
)


@needs_proc
def test_peak_extra_counts_a_known_allocation():
    # 64 MiB, above glibc's largest mmap threshold: mapped on allocation, unmapped on free.
    # Once outside the measurement first: the first fill starts torch's thread pool (stacks).
    torch.ones(16 * MIB).sum()
    with scale.PeakExtra("cpu") as peak:
        buffer = torch.ones(16 * MIB)  # touched: every page resident
        del buffer
    # within 2 MiB below (pages of the process that the kernel dropped meanwhile) and 8 above
    assert 62 * MIB <= peak.extra <= 72 * MIB
    with scale.PeakExtra("cpu") as idle:
        pass
    assert idle.extra < 4 * MIB  # the high-water mark was reset on entry


@needs_proc
def test_measure_point_subtracts_the_gradients(monkeypatch):
    """A loss whose forward holds a 64 MiB temporary and whose gradients are tiny: the point's
    extra memory is the temporary, not the inputs or their gradients."""

    def build_loss(provider, x, weight, target):
        def loss():
            temporary = torch.ones(16 * MIB)
            return x.sum() + weight.sum() + 0.0 * temporary.sum()

        return loss, [x, weight], "test"

    monkeypatch.setattr(scale, "build_loss", build_loss)
    point = scale.Point("linear+ce", 2, 3, 4, "fp32", "cpu", 1, reps=3)
    result = scale.measure_point(point)
    assert len(result["steps_s"]) == 3 and len(result["cpu_steps_s"]) == 3
    assert 60 * MIB <= result["peak_extra_bytes"] <= 72 * MIB


def test_prediction_extrapolates_measured_points():
    point = scale.Point("torch", 64, 1_000_000, 512, "fp32", "cpu", 1, 3)
    measured = {("torch", 64): [(10_000, 40 * MIB), (30_000, 120 * MIB)]}
    assert scale.predict_extra_bytes(point, measured) == 4000 * MIB
    # with fewer than two points the formula's generous guess is used
    formula = scale.formula_extra_bytes("torch", 64, 1_000_000, 512, 4)
    assert scale.predict_extra_bytes(point, {("torch", 64): [(10_000, 1)]}) == formula
    assert formula > 4 * 10**9
    assert scale.input_bytes(point) == 2 * 4 * (64 + 1_000_000) * 512


@needs_proc
def test_tiny_sweep_csv_schema(tmp_path):
    """One measured point (in a fresh process), one over the budget, two not run on CPU."""
    out = tmp_path / "scale.csv"
    base = ["--batch", "4", "--dim", "8", "--classes", "50", "--out"]
    assert scale.main([*base, str(out), "--providers", "linear+ce", "triton", "cce"]) == 0
    skipped = tmp_path / "skipped.csv"
    assert scale.main([*base, str(skipped), "--providers", "torch", "--budget-gb", "1e-3"]) == 0
    with open(out) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == scale.COLUMNS
        rows = {r["provider"]: r for r in reader}
    ok = rows["linear+ce"]
    assert ok["status"] == "ok" and ok["num_classes"] == "50" and ok["batch"] == "4"
    steps = [float(s) for s in ok["steps_s"].split()]
    assert len(steps) == 3 and float(ok["median_s"]) == pytest.approx(sorted(steps)[1], abs=1e-4)
    assert float(ok["median_cpu_s"]) > 0 and ok["threads"] == "1" and ok["dtype"] == "fp32"
    assert ok["memory_method"].startswith("VmHWM")
    assert rows["triton"]["status"].startswith("not run: Triton runs on CPU only")
    assert rows["cce"]["status"].startswith("not run: GPU only")
    with open(skipped) as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"].startswith("skipped: needs ~") and row["median_s"] == ""


def _row(provider, batch, classes, seconds, mb, status="ok"):
    row = dict.fromkeys(scale.COLUMNS, "")
    row.update(
        provider=provider,
        batch=str(batch),
        num_classes=str(classes),
        median_s=str(seconds),
        median_cpu_s=str(seconds / 2),
        peak_extra_mb=str(mb),
        status=status,
        dtype="fp32",
        dim="512",
        machine="m",
        device="d",
        threads="1",
    )
    return row


def test_ratio_table_and_plot(tmp_path):
    rows = [
        _row("cuda", 64, 10_000, 1.0, 2),
        _row("cuda", 64, 100_000, 3.0, 24),
        _row("linear+ce", 64, 100_000, 2.0, 24),
        _row("pml", 64, 100_000, 6.0, 780),
        _row("torch", 64, 100_000, 0, 0, status="skipped: needs ~9.0 GB"),
    ]
    table = scale.ratio_table(rows)
    assert "| 64 | 1e+05 | cuda | 3.000 | 1.500 | 24 | 1.50 | 0.50 | 1.50 |" in table
    assert "| 64 | 1e+05 | pml |" in table and "1e+04" not in table and "torch" not in table
    png = tmp_path / "scale.png"
    scale.plot(rows, png)
    assert png.stat().st_size > 0


def test_interleaved_cpu_times_cover_every_provider_and_the_gemms():
    points = [scale.Point(p, 4, 50, 8, "fp32", "cpu", 1, 1) for p in ("torch", "linear+ce")]
    times = scale.interleaved_cpu_times(points, rounds=2)
    assert set(times) == {"torch", "linear+ce", "gemm"}
    assert all(len(v) == 2 and min(v) >= 0.0 for v in times.values())


def test_readme_documents_every_scale_column():
    text = (REPO / "bench" / "README.md").read_text()
    section = text.split("## Scale", 1)[1].split("\n## ", 1)[0]
    documented = []
    for line in section.splitlines():
        if line.startswith("| `"):
            documented += re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])
    assert documented == list(scale.COLUMNS)


def test_combine_orders_rows_and_explains_missing_points(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    rows_a = [_row("torch", 64, 10_000, 1.0, 100), _row("torch", 64, 30_000, 3.0, 300)]
    scale.write_rows(rows_a, first)
    scale.write_rows([_row("linear+ce", 64, 10_000, 0.5, 2)], second)
    grid = scale.sweep_points(
        ["torch", "linear+ce", "cce"], [64], [10_000, 30_000, 10**7],
        dim=512, dtype="fp32", device="cpu", threads=1, reps=3,
    )  # fmt: skip
    rows = scale.combine([first, second], grid, "not run: time", budget_gb=8)
    assert [(r["provider"], int(r["num_classes"])) for r in rows] == [
        (p.provider, p.num_classes) for p in grid
    ]
    status = {(r["provider"], int(r["num_classes"])): r["status"] for r in rows}
    assert status[("torch", 10_000)] == "ok" and status[("linear+ce", 10_000)] == "ok"
    assert status[("linear+ce", 30_000)] == "not run: time"
    assert status[("cce", 10_000)].startswith("not run: GPU only")
    # torch at C = 10^7: 40 GB of inputs and gradients alone, over the budget
    assert status[("torch", 10**7)].startswith("skipped: needs ~")


def test_status_with_commas_survives_the_csv(tmp_path):
    row = _row("triton", 64, 100, 0, 0, status="not run: a, b, c")
    row.update(median_s="", median_cpu_s="", peak_extra_mb="", predicted_extra_mb="512")
    quoted = tmp_path / "quoted.csv"
    scale.write_rows([row], quoted)
    (back,) = scale.read_rows(quoted)
    assert back["status"] == "not run: a, b, c" and back["predicted_extra_mb"] == "512"
    # an unquoted file of the first sweeps: the status is put back together
    unquoted = tmp_path / "unquoted.csv"
    unquoted.write_text(
        ",".join(scale.COLUMNS) + "\n" + ",".join(str(row[c]) for c in scale.COLUMNS) + "\n"
    )
    (back,) = scale.read_rows(unquoted)
    assert back["status"] == "not run: a, b, c" and back["predicted_extra_mb"] == "512"
    assert back["memory_method"] == ""
