"""bench/gpu_check.sh on a CPU machine: its --dry-run resolves every command, asks every script
for --help, keeps the steps' time caps within 8 minutes and lists at most 8 output files; the
flags it passes to bench/run.py and the self-test are ones they accept."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "out"
    return out, _dry_run(out)


def _section(stdout: str, title: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return block


def test_dry_run_checks_pass_and_write_nothing(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [line for line in proc.stdout.splitlines() if re.match(r"^(ok|FAIL|skip) ", line)]
    assert not [line for line in checks if line.startswith("FAIL")]
    for name in ("selftest --help", "bench/run.py --help", "bench/plot.py --help", "timeout"):
        assert any(name in line for line in checks if line.startswith("ok")), name
    if (REPO / "bench" / "model.py").exists():
        assert any("bench/model.py --help" in line for line in checks if line.startswith("ok"))
    assert not out.exists(), "a dry run must not create the output directory"


def test_dry_run_lists_at_most_eight_files(dry_run):
    _, proc = dry_run
    files = _section(proc.stdout, "files it would write")
    assert 1 <= len(files) <= 8
    assert {"table.md", "device.txt", "selftest.log"} <= set(files)


def test_caps_add_up_to_at_most_eight_minutes(dry_run):
    _, proc = dry_run
    caps = re.search(r"^caps: (.*) = (\d+) s", proc.stdout, re.M)
    parts = [int(v) for v in re.findall(r"(\d+)", caps.group(1))]
    assert sum(parts) == int(caps.group(2)) <= 480
    assert len(parts) == 7  # one cap per step


def test_missing_output_directory_is_a_usage_error():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _load_bench_run():
    spec = importlib.util.spec_from_file_location("bench_run_for_gpu_check", REPO / "bench/run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_benchmark_steps_use_flags_bench_run_accepts(dry_run):
    _, proc = dry_run
    steps = _section(proc.stdout, "steps:")
    bench_steps = [s for s in steps if "bench/run.py" in s]
    assert len(bench_steps) == 2
    run = _load_bench_run()
    seen_providers = set()
    for step in bench_steps:
        argv = shlex.split(step.split("bench/run.py", 1)[1])
        args = run.parse_args(argv)
        config = run.sweep_config(args)
        assert list(config["batch"]) == [1024]
        assert sorted(int(c) for c in config["classes"]) == [100_000, 1_000_000]
        assert config["dim"] == 512
        seen_providers |= set(args.providers)
    known = set(run.all_providers("inductor"))
    assert seen_providers <= known
    assert {"triton", "cuda", "torch", "torch-compile", "gemm"} <= seen_providers


def test_selftest_step_uses_flags_the_selftest_accepts(dry_run):
    _, proc = dry_run
    (step,) = [s for s in _section(proc.stdout, "steps:") if "margin_kernels.selftest" in s]
    flags = shlex.split(step.split("margin_kernels.selftest", 1)[1])
    from margin_kernels import selftest as st

    with pytest.raises(SystemExit) as info:
        st.main([*flags, "--help"])
    assert info.value.code == 0
