"""The benchmark harness (bench/) does not rot: its CPU smoke sweep writes the CSV it documents,
the providers agree on the loss, plot.py draws the figures and the markdown table, failures become
OOM/ERROR rows, and the wheel check tells pure-Python wheels from the rest."""

import csv
import importlib.util
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import requires_cuda

import margin_kernels as mk
from margin_kernels.ops.cuda import HAS_CUDA_EXT

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

SMOKE_LOSSES = ("arcface", "sphereface", "ce")
SMOKE_CLASSES = (37, 100)


def _load(name: str):
    """Import bench/<name>.py: bench/ is a folder of scripts that import each other by name, as
    they do when one runs (its folder is then first on sys.path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


@pytest.fixture(scope="module")
def run():
    """bench/run.py (the command line and the sweep) imported in this process."""
    return _load("run")


@pytest.fixture(scope="module")
def harness():
    """bench/harness.py: timing, memory, the CSV and its columns."""
    return _load("harness")


@pytest.fixture(scope="module")
def providers():
    """bench/providers.py: the losses, cases, inputs and providers."""
    return _load("providers")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, harness):
    """One `bench/run.py --smoke` into a temporary directory: (csv path, rows, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    proc = _run("bench/run.py", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = list(out.glob("*.csv"))
    assert len(paths) == 1, paths
    header, rows = _read(paths[0])
    assert header == list(harness.COLUMNS)
    return paths[0], rows, proc.stdout + proc.stderr


def test_readme_documents_every_csv_column(harness):
    # The table under "## CSV columns" in bench/README.md: one row per column or group of
    # columns, their names in backticks in the first cell.
    text = (BENCH / "README.md").read_text()
    section = text.split("## CSV columns", 1)[1].split("\n## ", 1)[0]
    documented = []
    for line in section.splitlines():
        if line.startswith("| `"):
            documented += re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])
    assert documented == list(harness.COLUMNS)


def test_smoke_rows_cover_the_grid(smoke):
    _, rows, _ = smoke
    ran = {
        (r["provider"], r["loss"], r["dtype"], r["mode"], int(r["classes"]), r["sample_rate"])
        for r in rows
    }
    expected_providers = ["torch", "gemm"]
    if "triton" in mk.available_backends("cpu", mk.MarginSpec.arcface()):
        expected_providers.append("triton")
    for provider in expected_providers:
        for loss in ("gemm",) if provider == "gemm" else SMOKE_LOSSES:
            for dtype in ("fp32", "bf16"):
                for mode in ("fwd", "fwd+bwd"):
                    for classes in SMOKE_CLASSES:
                        for rate in ("1", "0.1"):
                            assert (provider, loss, dtype, mode, classes, rate) in ran
    assert {r["provider"] for r in rows} >= set(expected_providers)
    assert "torch-compile" not in {r["provider"] for r in rows}  # smoke leaves it out


def test_smoke_rows_hold_measurements(smoke):
    _, rows, _ = smoke
    for row in rows:
        assert row["status"] == "ok", (row["provider"], row["loss"], row["notes"])
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__
        assert row["date"].endswith("Z") and row["margin_kernels"] == mk.__version__
        assert row["timer"] == "perf_counter" and row["input_sets"] == "2"
        p20, median, p80 = (float(row[k]) for k in ("time_p20_ms", "time_ms", "time_p80_ms"))
        assert 0 < p20 <= median <= p80
        assert math.isnan(float(row["peak_extra_mb"]))  # not measured on CPU
        batch, classes, dim = int(row["batch"]), int(row["classes"]), int(row["dim"])
        sampled = int(row["sampled_classes"])
        if row["sample_rate"] == "1":
            assert sampled == classes
        else:
            assert 0 < sampled < classes
        flop = 2 * batch * sampled * dim * (3 if row["mode"] == "fwd+bwd" else 1)
        assert float(row["gemm_tflop"]) == pytest.approx(flop / 1e12, rel=1e-5)
        assert float(row["tflops"]) == pytest.approx(flop / 1e12 / (median * 1e-3), rel=1e-4)
        if row["provider"] == "gemm":
            assert row["loss"] == "gemm" and math.isnan(float(row["loss_value"]))
            assert float(row["vs_gemm"]) == pytest.approx(1.0, rel=1e-4)
        else:
            assert math.isfinite(float(row["loss_value"])) and float(row["vs_gemm"]) > 0


def test_smoke_providers_agree_on_the_loss(smoke):
    _, rows, _ = smoke
    reference = {
        (r["loss"], r["dtype"], r["mode"], r["classes"], r["sample_rate"]): float(r["loss_value"])
        for r in rows
        if r["provider"] == "torch"
    }
    compared = 0
    for row in rows:
        if row["provider"] in ("torch", "gemm"):
            continue
        key = (row["loss"], row["dtype"], row["mode"], row["classes"], row["sample_rate"])
        rel = 1e-4 if row["dtype"] == "fp32" else 2e-2
        assert float(row["loss_value"]) == pytest.approx(reference[key], rel=rel), row["provider"]
        compared += 1
    if "triton" in {r["provider"] for r in rows}:
        assert compared >= 48


def test_smoke_skips_missing_providers_with_one_line(smoke):
    _, rows, output = smoke
    # backend="cuda" runs on CPU tensors through the extension's C++ kernels when it is built
    if "cuda" in mk.available_backends("cpu", mk.MarginSpec.arcface()):
        assert "skipping cuda:" not in output and "cuda" in {r["provider"] for r in rows}
    else:
        assert output.count("skipping cuda:") == 1
    for peer, module in (("pml", "pytorch_metric_learning"), ("liger", "liger_kernel")):
        if importlib.util.find_spec(module) is None:
            assert output.count(f"skipping {peer}:") == 1
            assert peer not in {r["provider"] for r in rows}


def test_plot_and_table_from_smoke(smoke, tmp_path, capsys):
    path, _, _ = smoke
    table = tmp_path / "table.md"
    plots = tmp_path / "plots"
    argv = [str(path), "--out", str(plots), "--table", "--table-out", str(table)]
    assert _load("plot").main(argv) == 0
    pngs = sorted(p.name for p in plots.glob("*.png"))
    # one figure per metric (time, memory) and Partial-FC rate (1, 0.1)
    assert len(pngs) == 4, pngs
    for metric in ("time", "memory"):
        for rate in ("r1", "r0p1"):
            assert any(
                p.startswith(f"{metric}_cpu") and p.endswith(f"_B8_D16_{rate}.png") for p in pngs
            ), (metric, rate)
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = table.read_text()
    assert text in capsys.readouterr().out
    # 2 dtypes x 2 modes x 2 rates tables; 3 losses x 2 class counts rows in each
    assert text.count("#### ") == 8
    assert text.count("| arcface | 37 |") == 8 and text.count("| ce | 100 |") == 8
    header = next(line for line in text.splitlines() if line.startswith("| loss | C |"))
    assert "torch" in header and header.rstrip(" |").endswith("gemm")


def test_torch_compile_provider_appends_to_existing_csv(smoke, run, harness, tmp_path):
    path, _, _ = smoke
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    before = len(_read(target)[1])
    argv = ["--smoke", "--out", str(tmp_path), "--providers", "torch-compile,torch"]
    argv += ["--losses", "arcface", "--dtypes", "fp32", "--modes", "fwd+bwd"]
    assert run.main([*argv, "--classes", "37", "--sample-rates", "1"]) == 0
    header, rows = _read(target)
    assert header == list(harness.COLUMNS) and len(rows) == before + 2
    new = {r["provider"]: r for r in rows[before:]}
    assert new["torch-compile"]["status"] == "ok"
    assert new["torch-compile"]["notes"] == "compile backend=aot_eager"
    assert float(new["torch-compile"]["loss_value"]) == pytest.approx(
        float(new["torch"]["loss_value"]), rel=1e-5
    )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--losses", "nope"], r"--losses: unknown \['nope'\]"),
        (["--providers", "nope"], r"--providers: unknown \['nope'\]"),
        (["--dtypes", "int8"], r"--dtypes: unknown \['int8'\]"),
        (["--modes", "bwd"], r"--modes: unknown \['bwd'\]"),
        (["--sample-rates", "0"], "--sample-rates must lie in"),
        (["--batch", "0"], "must be positive"),
    ],
)
def test_bad_command_line_raises_value_error(run, argv, match):
    with pytest.raises(ValueError, match=match):
        run.main(["--smoke", "--out", "/nonexistent", *argv])


# --- in-process pieces -------------------------------------------------------------------------
def test_partial_fc_ids_keep_every_positive(providers):
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 1000, (64,), generator=g)
    ids = providers.sample_class_ids(target, 1000, 0.1, g)
    assert ids.shape == (100,) and torch.equal(ids, ids.sort().values)
    assert torch.isin(target, ids).all() and ids.unique().numel() == 100
    few = torch.tensor([3, 30, 7, 3, 11])  # more distinct positives than r C = 4
    assert torch.equal(providers.sample_class_ids(few, 37, 0.1, g), few.unique())
    assert providers.sample_class_ids(target, 1000, 1.0, g) is None


def test_failures_become_rows_not_crashes(run, harness, providers):
    def raising(exc):
        def factory(case):
            raise exc

        return providers.Provider("fake", frozenset(providers.LOSSES), lambda c, d: None, factory)

    args = run.parse_args(["--smoke"])
    case = providers.Case("arcface", providers.Shape("fp32", "fwd", 4, 10, 8, 1.0))
    cpu = torch.device("cpu")
    oom = harness.measure(
        raising(torch.cuda.OutOfMemoryError("CUDA out of memory")), case, cpu, args
    )
    assert oom.status == "OOM" and math.isnan(oom.time_ms)
    err = harness.measure(raising(KeyError("boom")), case, cpu, args)
    assert err.status == "ERROR" and err.notes == ["KeyError: 'boom'"]


def test_input_rotation_and_names(run, harness, providers):
    args = run.parse_args([])
    args.rotate_mb, args.input_sets = 200.0, 0
    big = providers.Case("arcface", providers.Shape("bf16", "fwd", 4096, 1_000_000, 512, 1.0))
    small = providers.Case("arcface", providers.Shape("bf16", "fwd", 128, 10_000, 512, 1.0))
    assert harness.num_input_sets(big, torch.device("cpu"), args) == 1
    assert harness.num_input_sets(small, torch.device("cpu"), args) == args.max_input_sets
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    config = run.sweep_config(
        run.parse_args(["--classes", "1e6,2_000_000", "--dtypes", "bfloat16"])
    )
    assert config["classes"] == (1_000_000, 2_000_000) and config["dtypes"] == ("bf16",)


def test_markdown_table_marks_oom_and_errors():
    plot = _load("plot")
    base = {
        "device": "GPU X",
        "batch": "128",
        "dim": "512",
        "dtype": "bf16",
        "mode": "fwd",
        "sample_rate": "1",
        "loss": "arcface",
        "classes": "1000000",
        "vs_gemm": "nan",
    }
    rows = [
        {**base, "provider": "gemm", "loss": "gemm", "status": "ok", "time_ms": "0.5"},
        {**base, "provider": "triton", "status": "ok", "time_ms": "1.25", "vs_gemm": "2.5"},
        {**base, "provider": "torch", "status": "OOM", "time_ms": "nan"},
        {**base, "provider": "pml", "status": "ERROR", "time_ms": "nan"},
    ]
    text = plot.markdown_tables(rows, "time")
    assert "| loss | C | triton | torch | pml | gemm |" in text
    assert "| arcface | 1,000,000 | 1.25 (2.5x) | OOM | ERROR | 0.5 |" in text


def test_wheel_check_tells_pure_from_compiled(tmp_path):
    wheels = _load("wheels")

    def make(name, purelib=True, extra=()):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("pkg/__init__.py", "")
            archive.writestr("pkg-1.0.dist-info/WHEEL", f"Root-Is-Purelib: {str(purelib).lower()}")
            for member in extra:
                archive.writestr(member, b"")
        return path

    assert wheels.impure_reason(make("pkg-1.0-py3-none-any.whl")) is None
    assert "platform" in wheels.impure_reason(make("pkg-1.0-cp312-cp312-manylinux_x86_64.whl"))
    assert "Purelib" in wheels.impure_reason(make("pkg-1.0-py3-none-any.whl", purelib=False))
    assert "compiled" in wheels.impure_reason(make("pkg-1.0-py3-none-any.whl", extra=["a.so"]))


@pytest.mark.gpu
@requires_cuda
def test_gpu_sweep_times_with_do_bench_and_measures_memory(run, harness, tmp_path):
    argv = ["--device", "cuda", "--out", str(tmp_path), "--providers", "torch,gemm,triton,cuda"]
    argv += ["--losses", "arcface", "--dtypes", "bf16", "--modes", "fwd+bwd", "--batch", "128"]
    argv += ["--classes", "10000", "--dim", "64", "--warmup-ms", "5", "--rep-ms", "20"]
    assert run.main(argv) == 0
    (path,) = tmp_path.glob("*.csv")
    header, rows = _read(path)
    assert header == list(harness.COLUMNS)
    by_provider = {(r["provider"], r["sample_rate"]): r for r in rows}
    for rate in ("1", "0.1"):
        # our backends must run on the GPU: a missing, ERROR or OOM row fails the test (cuda
        # is required where the extension is built; without it the harness skips the provider)
        for provider in ("torch", "gemm", "triton", *(("cuda",) if HAS_CUDA_EXT else ())):
            assert (provider, rate) in by_provider, f"no {provider} row at sample rate {rate}"
            row = by_provider[(provider, rate)]
            assert row["status"] == "ok", (provider, rate, row["notes"])
            assert row["timer"] == "triton.do_bench"
            assert float(row["peak_extra_mb"]) > 0 and float(row["time_ms"]) > 0
    for (provider, _), row in by_provider.items():
        if provider != "gemm":
            reference = by_provider[("torch", row["sample_rate"])]["loss_value"]
            assert float(row["loss_value"]) == pytest.approx(float(reference), rel=2e-2)
