"""The install self-test: its table, its bounds, and that a wrong backend makes it fail.

These run the torch backend only (and one Triton case where Triton can run), so they stay cheap;
CI also runs ``python -m margin_kernels.selftest --quick`` with every backend."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels import selftest as st

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ROW = re.compile(
    r"^(?P<device>\S+)\s+(?P<backend>torch|cuda|triton)\s+(?P<dtype>fp16|bf16|fp32|fp64)\s+"
    r"(?P<cases>\d+)\s+(?P<case>\S+)\s+(?P<qty>loss|dX|dW)\s+(?P<err>\S+)\s+(?P<bound>\S+)\s+"
    r"(?P<status>ok|FAIL \(\d+\))$"
)


def _perturbed(scale: float):
    """reference.lse_parts with every row's negative LSE off by ``scale`` relative: what a wrong
    online rescaling or a dropped column would look like."""
    original = reference.lse_parts

    def lse_parts(*args, **kwargs):
        neg_lse, t = original(*args, **kwargs)
        return neg_lse * (1.0 + scale), t

    return lse_parts


def _rows(text: str) -> list[dict]:
    return [m.groupdict() for line in text.splitlines() if (m := ROW.match(line))]


def test_quick_table_has_a_row_per_dtype_within_bounds():
    results = st.run_cases(quick=True, devices=[CPU], backends=["torch"])
    assert len(results) == len(st.cases(CPU, quick=True))
    assert all(r.ok for r in results), [r.case.label for r in results if not r.ok]
    rows = _rows("\n".join(st.format_table(results)))
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32", "fp64"}
    assert sum(int(r["cases"]) for r in rows) == len(results)
    for row in rows:
        assert float(row["err"]) <= float(row["bound"]), row
        assert row["status"] == "ok"


def test_quick_cases_cover_every_kind_layout_and_partial_fc():
    quick = st.cases(CPU, quick=True)
    assert {c.spec.kind for c in quick} == set(st.KIND_SPECS)
    assert {c.dtype for c in quick} == set(st.DTYPE_NAMES)
    assert any(c.column_major for c in quick) and any(c.partial_fc for c in quick)
    full = st.cases(CPU, quick=False)
    assert len(full) > len(quick)
    assert all(c.shape == st.SMALL for c in full), "the large case is for GPUs only"


def test_inputs_have_the_promised_layout_ignored_rows_and_ids():
    case = st.Case("arcface", st.KIND_SPECS["arcface"], torch.float16, column_major=True,
                   partial_fc=True)  # fmt: skip
    x, w, y, ids = st._inputs(case, CPU)
    assert x.dtype == w.dtype == torch.float16
    assert w.stride() == (1, w.shape[0])
    assert (y == st.IGNORE_INDEX).sum() == 2
    assert ids is not None and (ids[1:] > ids[:-1]).all() and ids.numel() < w.shape[0]


def test_bounds_follow_pytorchs_own_error_in_each_dtype():
    results = st.run_cases(quick=True, devices=[CPU], backends=["torch"])
    for r in results:
        floors = st.FLOORS[r.case.dtype]
        for qty, bound in r.bounds.items():
            assert bound >= floors[qty]
            if r.case.dtype == torch.float64:
                assert bound == floors[qty]  # PyTorch in float64 is the reference itself
    bf16 = [r for r in results if r.case.dtype == torch.bfloat16]
    assert any(r.bounds["dX"] > st.FLOORS[torch.bfloat16]["dX"] for r in bf16)


@pytest.mark.parametrize("scale", [1e-3, 1e-2])
def test_perturbed_backend_exits_1(monkeypatch, capsys, scale):
    monkeypatch.setattr(reference, "lse_parts", _perturbed(scale))
    assert st.main(["--quick", "--no-restart", "--backends", "torch"]) == 1
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows and any(r["status"].startswith("FAIL") for r in rows)
    assert "failed cases:" in out and "selftest FAILED" in out


def test_unperturbed_backend_exits_0(capsys):
    assert st.main(["--quick", "--no-restart", "--backends", "torch"]) == 0
    assert "selftest passed" in capsys.readouterr().out


def test_a_backend_that_raises_is_a_failed_case(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(reference, "lse_parts", raising)
    case = st.Case("cosface", st.KIND_SPECS["cosface"], torch.float32)
    (result,) = st.run_case(case, CPU, ["torch"])
    assert not result.ok and "kernel launch failed" in result.failure


def test_broken_triton_backend_is_caught():
    triton_ops = pytest.importorskip("margin_kernels.ops.triton")
    if st.backend_status(CPU)["triton"] is not None:
        pytest.skip(f"Triton cannot run on CPU here: {st.backend_status(CPU)['triton']}")
    case = st.Case("arcface", st.KIND_SPECS["arcface"], torch.float32)
    (good,) = st.run_case(case, CPU, ["triton"])
    assert good.ok, good.errors
    with pytest.MonkeyPatch.context() as mp:
        original = triton_ops.lse_parts
        mp.setattr(triton_ops, "lse_parts",
                   lambda *a, **k: tuple(v * 1.001 for v in original(*a, **k)))  # fmt: skip
        (bad,) = st.run_case(case, CPU, ["triton"])
    assert not bad.ok


def test_public_name_is_callable_and_the_module():
    assert callable(mk.selftest)
    assert mk.selftest.run_cases is st.run_cases
    out = io.StringIO()
    assert mk.selftest(quick=True, file=out, backends=["torch"]) is True
    text = out.getvalue()
    assert f"torch {torch.__version__}" in text
    assert "extension margin_kernels._C:" in text and "backends on cpu:" in text


def test_command_line_prints_versions_and_exits_0():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "margin_kernels.selftest", "--quick", "--no-restart",
         "--backends", "torch"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr  # not half-imported by the package
    assert "Triton" in proc.stdout and "selftest passed" in proc.stdout
    assert _rows(proc.stdout)


def test_a_backend_that_cannot_run_a_spec_is_skipped_with_its_reason(monkeypatch):
    from margin_kernels import ops

    def reason(name, device, spec):
        return "no W-Softmax kernel" if spec.kind == "w_softmax" else None

    monkeypatch.setattr(ops, "_reason", reason)
    case = st.Case("w_softmax", st.KIND_SPECS["w_softmax"], torch.float32)
    (result,) = st.run_case(case, CPU, ["cuda"])
    assert result.ok and result.skipped == "no W-Softmax kernel" and not result.errors
    table = "\n".join(st.format_table([result]))
    assert "skipped (1 cases):" in table and "no W-Softmax kernel" in table
    assert not _rows(table)


def test_error_metric_sees_a_single_wrong_entry():
    """One wrong entry of dW (one class, one feature) counts in full: the metric is the largest
    entry error relative to the largest exact magnitude, not an average that a (C, D) tensor
    would dilute by 1 / (C D)."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(37, 64, generator=g, dtype=torch.float64)
    got = exact.clone()
    got[11, 5] += 1e-3 * exact.abs().max()
    assert st._rel(got, exact) == pytest.approx(1e-3, rel=1e-9)
    assert st._rel(exact.float(), exact) < 1e-7
    bound = st.FLOORS[torch.float64]["dW"]
    got = exact.clone()
    got[0, 0] += 10 * bound * exact.abs().max()
    assert st._rel(got, exact) > bound
