"""setup.py's build switches, and that the extension is really built where it can be (so that the
CPU-twin tests of the CUDA backend cannot be skipped silently in CI)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import torch

from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.spec import MarginSpec

ROOT = pathlib.Path(__file__).parents[1]


def _setup_py(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MARGIN_KERNELS_")}
    return subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skip_switch_prints_why():
    run = _setup_py(MARGIN_KERNELS_SKIP_CUDA_BUILD="1")
    assert run.returncode == 0, run.stderr
    assert "skipping the CUDA extension: MARGIN_KERNELS_SKIP_CUDA_BUILD is set" in run.stdout


def test_force_switch_fails_instead_of_skipping():
    run = _setup_py(MARGIN_KERNELS_SKIP_CUDA_BUILD="1", MARGIN_KERNELS_FORCE_CUDA_BUILD="1")
    assert run.returncode != 0
    assert "MARGIN_KERNELS_FORCE_CUDA_BUILD is set but" in run.stderr


def test_extension_is_built_where_it_can_be():
    buildable = (
        torch.version.cuda is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("MARGIN_KERNELS_SKIP_CUDA_BUILD", "") in ("", "0")
    )
    if buildable:
        assert cuda_backend.HAS_CUDA_EXT, cuda_backend._EXT_IMPORT_ERROR
        ops = torch.ops.margin_kernels
        for name in ("margin_transform", "margin_lse_fwd", "margin_lse_bwd"):
            assert hasattr(ops, name)
    else:
        spec = MarginSpec.cosface()
        assert cuda_backend.unavailable_reason(torch.device("cuda"), spec) is not None


def _source_record() -> str | None:
    path = ROOT / "margin_kernels" / "_build_info.py"
    return path.read_text() if path.exists() else None


def test_build_without_extension_records_why(tmp_path):
    source_before = _source_record()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MARGIN_KERNELS_")}
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        env={**clean, "MARGIN_KERNELS_SKIP_CUDA_BUILD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    record = tmp_path / "margin_kernels" / "_build_info.py"
    fields: dict = {}
    exec(record.read_text(), fields)
    assert fields["EXTENSION_BUILT"] is False
    assert fields["SKIP_REASON"] == "MARGIN_KERNELS_SKIP_CUDA_BUILD is set"
    assert (tmp_path / "margin_kernels" / "py.typed").exists()
    # Only in-place and editable builds write the record into the source tree.
    assert _source_record() == source_before
