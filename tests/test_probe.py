"""First-use parity probes in dispatch (margin_kernels.ops.probe): fault injection against the
backends that run on CPU (the cuda backend's C++ kernels; Triton under TRITON_INTERPRET=1), the
bounds' power to see a 1 % error in one entry, the cache and its modes, torch.compile, and the
one double-backward error of every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import HAS_EXTENSION, HAS_TRITON, TRITON_INTERPRET

import margin_kernels as mk
from margin_kernels import ops, reference
from margin_kernels.ops import cuda_backend, probe, triton_backend
from margin_kernels.spec import MarginSpec

needs_ext = pytest.mark.skipif(not HAS_EXTENSION, reason="margin_kernels._C is not built")
needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and TRITON_INTERPRET), reason="needs Triton's interpreter (TRITON_INTERPRET=1)"
)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    monkeypatch.delenv(probe.MODE_ENV, raising=False)
    ops.clear_probes()
    yield
    ops.clear_probes()


def _data(dim: int = 24, dtype=torch.float32, column_major: bool = False):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, dim, generator=gen).to(dtype)
    w = torch.randn(29, dim, generator=gen).to(dtype)
    if column_major:
        w = w.t().contiguous().t()
    return x, w, torch.randint(0, 29, (11,), generator=gen)


class _Fault:
    """A backend entry point wrapping ``inner`` with a fault, counting its calls."""

    def __init__(self, inner, fault: str, when=lambda x, w, spec: True):
        self.inner, self.fault, self.when, self.calls = inner, fault, when, 0
        self.__module__, self.__qualname__ = "tests.test_probe", f"fault_{fault}"

    def __call__(self, x, w, target, spec, class_ids=None, deterministic=False, **options):
        self.calls += 1
        active = self.when(x, w, spec)
        if active and self.fault == "raises":
            raise RuntimeError("illegal memory access (injected)")
        x_in, w_in = x, w
        if active and self.fault in ("one_entry_dx", "one_entry_dw"):
            # a 1 % error in the largest-magnitude entry of the gradient only
            scale = _OneEntryScale.apply
            if self.fault == "one_entry_dx":
                x_in = scale(x)
            else:
                w_in = scale(w)
        neg_lse, t = self.inner(x_in, w_in, target, spec, class_ids, deterministic, **options)
        if active and self.fault == "nan":
            neg_lse = torch.where(torch.arange(len(neg_lse)) == 1, math.nan, neg_lse)
        if active and self.fault == "one_entry_loss":
            bump = torch.zeros_like(neg_lse)
            bump[0] = 0.01 * (t[0] - neg_lse[0]).detach()  # row 0's loss off by 1 %
            neg_lse = neg_lse + bump
        return neg_lse, t


class _OneEntryScale(torch.autograd.Function):
    """Identity forward; the backward scales the largest-magnitude gradient entry by 1.01."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        flat = grad.view(-1)
        k = int(flat.abs().argmax())
        flat[k] = flat[k] * 1.01
        return grad


FAULTS = ("raises", "nan", "one_entry_loss", "one_entry_dx", "one_entry_dw")


@needs_ext
@pytest.mark.parametrize("fault", FAULTS)
def test_faulty_cuda_backend_auto_falls_back_with_one_warning(monkeypatch, fault):
    faulty = _Fault(cuda_backend.lse_parts, fault)
    monkeypatch.setattr(cuda_backend, "lse_parts", faulty)
    x, w, y = _data()
    spec = MarginSpec.arcface(16.0, 0.5)
    want = reference.margin_cross_entropy(x, w, y, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = mk.margin_cross_entropy(x, w, y, spec, backend="auto")
            torch.testing.assert_close(got, want)  # the reference served
    probe_warnings = [c for c in caught if issubclass(c.category, probe.ProbeWarning)]
    assert len(probe_warnings) == 1, [str(c.message) for c in caught]
    text = str(probe_warnings[0].message)
    for part in ("backend='cuda'", "on cpu", probe.gpu_name(CPU), torch.__version__, "fp32",
                 "arcface", "python -m margin_kernels.selftest", "margin_kernels 0."):  # fmt: skip
        assert part in text, (part, text)
    assert ("raised RuntimeError" in text) == (fault == "raises")
    assert ("not finite" in text) == (fault == "nan")
    assert faulty.calls == 1  # probed once; never served
    [result] = mk.probe_report()
    assert not result.ok and result.backend == "cuda" and result.kind == "arcface"


@needs_ext
@pytest.mark.parametrize("fault", FAULTS)
def test_faulty_cuda_backend_named_explicitly_raises(monkeypatch, fault):
    faulty = _Fault(cuda_backend.lse_parts, fault)
    monkeypatch.setattr(cuda_backend, "lse_parts", faulty)
    x, w, y = _data()
    spec = MarginSpec.cosface(16.0, 0.35)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="failed its first-use parity probe") as info:
            mk.margin_cross_entropy(x, w, y, spec, backend="cuda")
        assert "python -m margin_kernels.selftest" in str(info.value)
        assert isinstance(info.value, ops.ProbeFailure)
    assert faulty.calls == 1  # the failure is cached: no second probe, never served


@needs_ext
def test_fault_in_one_family_only_fails_that_family(monkeypatch):
    """Wrong for the "weighted" family (W-Softmax) only: the other kinds keep the kernel."""
    faulty = _Fault(cuda_backend.lse_parts, "one_entry_dw", lambda x, w, s: s.kind == "w_softmax")
    monkeypatch.setattr(cuda_backend, "lse_parts", faulty)
    x, w, _ = _data()
    assert ops.resolve("auto", CPU, MarginSpec.cosface(), x, w)[0] == "cuda"
    with pytest.warns(probe.ProbeWarning, match="w_softmax"):
        assert ops.resolve("auto", CPU, MarginSpec.w_softmax(), x, w)[0] == "torch"
    with pytest.raises(RuntimeError, match="w_softmax"):
        ops.resolve("cuda", CPU, MarginSpec.w_softmax(), x, w)
    assert ops.resolve("cuda", CPU, MarginSpec.lm_softmax(), x, w)[0] == "cuda"
    ok = {(r.kind, r.ok) for r in mk.probe_report()}
    assert ok == {("cosface", True), ("w_softmax", False), ("lm_softmax", True)}


@needs_ext
def test_fault_in_one_layout_path_only(monkeypatch):
    """Wrong only where the chunk of a column-major W is copied: the row-major path serves."""
    faulty = _Fault(cuda_backend.lse_parts, "nan", lambda x, w, s: w.stride(1) != 1)
    monkeypatch.setattr(cuda_backend, "lse_parts", faulty)
    spec = MarginSpec.arcface()
    x, w, _ = _data()
    assert ops.resolve("auto", CPU, spec, x, w)[0] == "cuda"
    x, w, _ = _data(column_major=True)
    with pytest.warns(probe.ProbeWarning, match="w chunk copied"):
        assert ops.resolve("auto", CPU, spec, x, w)[0] == "torch"
    with pytest.raises(RuntimeError, match="w chunk copied"):
        ops.resolve("cuda", CPU, spec, x, w)


@needs_interpreter
def test_triton_fault_in_one_d_path_only(monkeypatch):
    """Triton under the interpreter: D <= 32 holds D on chip in one step, D > 32 takes D slices.
    A kernel wrong only on the sliced path fails there and only there (explicit backend: auto
    does not take Triton on CPU)."""
    faulty = _Fault(triton_backend.lse_parts, "one_entry_dx", lambda x, w, s: x.shape[1] > 32)
    monkeypatch.setattr(triton_backend, "lse_parts", faulty)
    spec = MarginSpec.cosface(16.0, 0.35)
    x, w, y = _data(dim=24)
    mk.margin_cross_entropy(x, w, y, spec, backend="triton")
    x, w, y = _data(dim=40)
    with pytest.raises(RuntimeError, match=r"failed its first-use\s+parity probe.*D=33"):
        mk.margin_cross_entropy(x, w, y, spec, backend="triton")
    results = mk.probe_report()
    assert [r.ok for r in results] == [True, False]
    assert results[0].problem.endswith("D=17")  # the smallest D with D = 24's path
    assert faulty.calls == 3  # probe, served call, probe


@needs_interpreter
@pytest.mark.parametrize("fault", ["raises", "one_entry_dw"])
def test_triton_named_explicitly_raises_on_fault(monkeypatch, fault):
    monkeypatch.setattr(triton_backend, "lse_parts", _Fault(triton_backend.lse_parts, fault))
    x, w, y = _data()
    with pytest.raises(RuntimeError, match=r"backend='triton'.*failed its first-use parity probe"):
        mk.margin_cross_entropy(x, w, y, MarginSpec.sphereface(), backend="triton")


# --- the bounds see a 1 % error in one entry -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["arcface", "w_softmax"])
def test_one_percent_in_one_entry_fails_and_exact_passes(dtype, kind):
    """A perfect kernel (the float64 result rounded as a kernel returns it: the loss in float32,
    the gradients in the input dtype) passes; the same with the largest entry of one quantity,
    or the row of dX / the class row of dW holding it, 1 % off fails. In bf16 a single gradient
    entry 1 % off is one or two units in its last place after rounding, as a correct kernel's
    worst entry can be: there the single entry fails at 2 %, a row or class at 1 %."""
    spec = MarginSpec.arcface() if kind == "arcface" else MarginSpec.w_softmax()
    layout = probe.Layout(*probe.layout_of(*_data(dtype=dtype)[:2], None))
    plan = probe.plan_for("triton", layout, spec, CPU)
    x, w, y, ids = probe._problem(plan, dtype, CPU)
    exact = probe._loss_and_grads(probe._ORACLE_LSE_PARTS, x.double(), w.double(), y, spec, ids)
    exact = {k: v.double() for k, v in exact.items()}
    own = probe._loss_and_grads(probe._ORACLE_LSE_PARTS, x, w, y, spec, ids)
    bound = probe.bounds(exact, own, dtype)
    out_dtype = {"loss": torch.float64 if dtype == torch.float64 else torch.float32}
    perfect = {q: exact[q].to(out_dtype.get(q, dtype)) for q in probe.QUANTITIES}
    assert probe.compare(perfect, exact, bound, own, dtype)[0]
    for q in probe.QUANTITIES:
        for what in ("entry", "row"):
            if what == "row" and q == "loss":
                continue
            got = dict(perfect)
            value = exact[q].clone()
            k = int(value.abs().argmax())
            if what == "entry":
                value.view(-1)[k] *= 1.02 if dtype == torch.bfloat16 and q != "loss" else 1.01
            else:
                row = k // value.shape[1]
                value[row] *= 1.01
            got[q] = value.to(perfect[q].dtype)
            ok, detail, _ = probe.compare(got, exact, bound, own, dtype)
            assert not ok, (q, what, detail)
            if what == "entry":  # the element-wise bounds alone see it, without the row check
                ok, detail, _ = probe.compare(got, exact, bound)
                assert not ok, (q, what, detail)


# --- cache, modes, report -----------------------------------------------------------------------
@needs_ext
def test_probe_runs_once_per_combination_and_never_on_the_hot_path(monkeypatch):
    counting = _Fault(cuda_backend.lse_parts, "none")
    monkeypatch.setattr(cuda_backend, "lse_parts", counting)
    x, w, y = _data()
    for s in (16.0, 32.0, 64.0):  # s is a runtime value of one compiled kernel: one probe
        mk.arcface_loss(x, w, y, s=s)
    assert counting.calls == 1 + 3
    mk.arcface_loss(x, w, y, class_ids=torch.tensor([0, 3, 5]))  # with class_ids: a new probe
    mk.arcface_loss(x.double(), w.double(), y)  # another dtype: a new probe
    mk.arcface_loss(x, w, y, grad_mode="straight_through")  # another compiled variant
    assert counting.calls == 4 + 3 * 2
    report = mk.probe_report()
    assert len(report) == 4 and all(r.ok and r.source == "run" for r in report)
    assert [r.class_ids for r in report] == [False, True, False, False]
    assert "ok" in report[0].line()
    ops.clear_probes()
    assert mk.probe_report() == []
    mk.arcface_loss(x, w, y)
    assert counting.calls == 10 + 2


@needs_ext
def test_replacing_lse_parts_probes_the_replacement(monkeypatch):
    x, w, y = _data()
    mk.cosface_loss(x, w, y, backend="cuda")
    replacement = _Fault(cuda_backend.lse_parts, "nan")
    monkeypatch.setattr(cuda_backend, "lse_parts", replacement)
    with pytest.raises(RuntimeError, match="fault_nan"):
        mk.cosface_loss(x, w, y, backend="cuda")
    assert replacement.calls == 1


@needs_ext
def test_mode_off_serves_unchecked(monkeypatch):
    monkeypatch.setenv(probe.MODE_ENV, "off")
    faulty = _Fault(cuda_backend.lse_parts, "one_entry_dw")
    monkeypatch.setattr(cuda_backend, "lse_parts", faulty)
    x, w, y = _data()
    mk.cosface_loss(x, w, y, backend="cuda")
    assert faulty.calls == 1 and mk.probe_report() == []
    monkeypatch.setenv(probe.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="MARGIN_KERNELS_PROBE must be one of"):
        mk.cosface_loss(x, w, y, backend="cuda")


@needs_ext
def test_persistent_mode_keys_results_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(probe.MODE_ENV, "persistent")
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path / "probes.json"))
    counting = _Fault(cuda_backend.lse_parts, "none")
    monkeypatch.setattr(cuda_backend, "lse_parts", counting)
    x, w, y = _data()
    mk.cosface_loss(x, w, y, backend="cuda")
    assert counting.calls == 2 and (tmp_path / "probes.json").exists()
    ops.clear_probes()  # a new process, as far as the cache knows
    mk.cosface_loss(x, w, y, backend="cuda")
    assert counting.calls == 3  # served from the file's verdict, no probe
    assert [r.source for r in mk.probe_report()] == ["disk"]
    for part in ("__version__", "_driver_version", "_extension_build", "_triton_version"):
        ops.clear_probes()
        original = getattr(probe, part)
        changed = "0.0.0-other" if part == "__version__" else lambda: "changed"
        monkeypatch.setattr(probe, part, changed)
        mk.cosface_loss(x, w, y, backend="cuda")
        assert mk.probe_report()[0].source == "run", part
        monkeypatch.setattr(probe, part, original)
    # a failed verdict read from disk raises just the same
    ops.clear_probes()
    monkeypatch.setattr(cuda_backend, "lse_parts", _Fault(cuda_backend.lse_parts, "raises"))
    with pytest.raises(RuntimeError, match="first-use parity probe"):
        mk.cosface_loss(x, w, y, backend="cuda")
    ops.clear_probes()
    with pytest.raises(RuntimeError, match="first-use parity probe"):
        mk.cosface_loss(x, w, y, backend="cuda")
    assert mk.probe_report()[0].source == "disk"


# --- torch.compile ------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("fault", ["none", "nan"])
def test_probe_runs_eagerly_once_under_compile_fullgraph(monkeypatch, fault):
    torch._dynamo.reset()
    counting = _Fault(cuda_backend.lse_parts, fault)
    monkeypatch.setattr(cuda_backend, "lse_parts", counting)
    x, w, y = _data()
    spec = MarginSpec.arcface(16.0, 0.5)

    def step(x, w):
        return mk.margin_cross_entropy(x, w, y, spec, backend="auto")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
            compiled(xa, wa).backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference.margin_cross_entropy(xb, wb, y, spec).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-4, atol=1e-5)
    [result] = mk.probe_report()
    assert result.ok == (fault == "none")
    # the probe's own call, then (ok) the calls the graph makes: the probe never re-ran
    assert counting.calls == (1 + 3 if fault == "none" else 1)
    assert sum(issubclass(c.category, probe.ProbeWarning) for c in caught) == (fault != "none")


# --- double backward ----------------------------------------------------------------------------
def _double_backward_backends():
    out = ["torch"]
    if HAS_EXTENSION:
        out.append("cuda")
    if HAS_TRITON and TRITON_INTERPRET:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _double_backward_backends())
def test_double_backward_raises_one_clear_error_on_every_backend(backend):
    x, w, y = _data(dtype=torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    loss = mk.cosface_loss(x, w, y, backend=backend)
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot differentiate twice") as info:
        grad_x.sum().backward()
    assert str(info.value) == ops.DOUBLE_BACKWARD_ERROR
    # a single backward is unaffected, and the reference module stays twice differentiable
    mk.cosface_loss(x, w, y, backend=backend).backward()
    ref = reference.margin_cross_entropy(x, w, y, MarginSpec.cosface())
    (g,) = torch.autograd.grad(ref, x, create_graph=True)
    g.sum().backward()
