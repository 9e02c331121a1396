"""Install check: every backend that can run here against the float64 reference.

    python -m margin_kernels.selftest [--quick] [--device cpu|cuda ...]

or ``margin_kernels.selftest()`` from Python. It prints the versions of torch, Triton and CUDA,
what the compiled extension was built against (when it records that), which backends can run on
each device, and then one line per (device, backend, dtype): the case with the largest relative
error against its bound, over every margin kind, a column-major weight, Partial-FC class ids and
ignored rows (and on a GPU one large case, C > 10^5). Exit status 1 on any failure.

What is compared, per case: the per-row loss (``reduction="none"``) and the gradients dX and dW
of a weighted sum of it, each as ``max |got - exact| / max |exact|``, where "exact" is the
reference computed in float64 from the same (already rounded) inputs. The bound of a quantity is
``BOUND_FACTOR`` times the error PyTorch itself makes on the same inputs in that dtype (the
reference computes in float32 for 16-bit and float32 inputs, and rounds its gradients to the
input dtype) plus a floor per dtype (``FLOORS``).

On a CPU-only machine the Triton backend runs through Triton's interpreter, which has to be
switched on before Triton's kernels are imported: ``python -m margin_kernels.selftest`` restarts
itself with ``TRITON_INTERPRET=1`` when no GPU is visible; ``selftest()`` in a running process
cannot, and reports Triton on CPU as unavailable unless the variable was set before the import.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

from . import ops, reference
from .functional import margin_cross_entropy
from .spec import MarginSpec

__all__ = ["BOUND_FACTOR", "FLOORS", "CaseResult", "main", "run_cases", "selftest"]

# The oracle and PyTorch's own computation are bound once, here: a backend under test (including
# backend="torch", which calls reference.lse_parts at each call) can never move its own yardstick.
_ORACLE_LSE_PARTS = reference.lse_parts

# bound = BOUND_FACTOR * (PyTorch's error in that dtype) + FLOORS[dtype][quantity]
BOUND_FACTOR = 4.0
FLOORS = {
    # every backend computes float64 inputs in float64 throughout: rounding-level errors
    torch.float64: {"loss": 1e-13, "dX": 1e-13, "dW": 1e-13},
    # losses are computed in float32 for every non-float64 input
    torch.float32: {"loss": 1e-4, "dX": 1e-4, "dW": 1e-4},
    # 16-bit gradients are rounded to 11 (fp16) / 8 (bf16) significant bits, and the fused
    # backward's second GEMM takes 16-bit operands: ten roundings of headroom
    torch.float16: {"loss": 1e-4, "dX": 5e-3, "dW": 5e-3},
    torch.bfloat16: {"loss": 1e-4, "dX": 4e-2, "dW": 4e-2},
}
DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
BACKEND_ORDER = ("torch", "cuda", "triton")
IGNORE_INDEX = -100
SMALL = (19, 37, 24)  # B not a multiple of any tile, C prime, D not a power of two
LARGE = (256, 100_003, 128)  # GPU only: many class tiles and splits

# One spec per margin kind, with the paper defaults (lsoftmax/sphereface: m = 4).
KIND_SPECS = {
    "lsoftmax": MarginSpec.lsoftmax(),
    "sphereface": MarginSpec.sphereface(),
    "cosface": MarginSpec.cosface(),
    "arcface": MarginSpec.arcface(),
    "combined": MarginSpec.combined(),
    "so_softmax": MarginSpec.so_softmax(),
    "w_softmax": MarginSpec.w_softmax(),
    "lm_softmax": MarginSpec.lm_softmax(),
    "soft_margin": MarginSpec.soft_margin(0.2),
}
# Further hyper-parameters of the full run: the other psi orders, the arcface gradient and
# overflow conventions, a combined margin with m1 != 1, a lambda-annealed sphereface.
EXTRA_SPECS = {
    "lsoftmax_m2": MarginSpec.lsoftmax(m=2),
    "lsoftmax_m7": MarginSpec.lsoftmax(m=7),
    "sphereface_m10": MarginSpec.sphereface(m=10),
    "sphereface_m3_lam5": MarginSpec.sphereface(m=3, lam=5.0),
    "arcface_st_easy": MarginSpec.arcface(grad_mode="straight_through", overflow="easy"),
    "arcface_overflow_none": MarginSpec.arcface(overflow="none"),
    "combined_m1_1.35": MarginSpec.combined(m1=1.35, m2=0.25, m3=0.1),
}


@dataclass(frozen=True)
class Case:
    """One problem: a spec, a dtype, a shape and its layout options."""

    name: str
    spec: MarginSpec
    dtype: torch.dtype
    shape: tuple[int, int, int] = SMALL
    column_major: bool = False
    partial_fc: bool = False

    @property
    def label(self) -> str:
        extras = [n for n, on in (("colmajor", self.column_major), ("ids", self.partial_fc)) if on]
        if self.shape != SMALL:
            extras.append("B{}xC{}xD{}".format(*self.shape))
        return "+".join([self.name, *extras])


@dataclass
class CaseResult:
    """Errors of one backend on one case: ``errors``/``bounds`` keyed by "loss", "dX", "dW"."""

    device: str
    backend: str
    case: Case
    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    failure: str | None = None  # an exception or a non-finite value
    skipped: str | None = None  # why the backend cannot run this spec here (not a failure)

    @property
    def worst(self) -> tuple[str, float]:
        """(quantity, error / bound) of the quantity closest to (or furthest past) its bound."""
        if self.skipped is not None:
            return "-", 0.0
        if not self.errors:
            return "-", math.inf
        name = max(self.errors, key=lambda k: self.errors[k] / self.bounds[k])
        return name, self.errors[name] / self.bounds[name]

    @property
    def ok(self) -> bool:
        return self.failure is None and self.worst[1] <= 1.0


def cases(device: torch.device, quick: bool) -> list[Case]:
    """The problems to run on ``device``. Quick: every kind in fp32 and bf16, arcface in fp16 and
    fp64, the column-major and Partial-FC variants in bf16. Full: every kind in every dtype, the
    variants of arcface and W-Softmax in every dtype, the further hyper-parameters in fp32. Both
    add one large bf16 arcface case on a GPU."""
    out: list[Case] = []
    if quick:
        for dtype in (torch.float32, torch.bfloat16):
            out += [Case(n, s, dtype) for n, s in KIND_SPECS.items()]
        out += [Case("arcface", KIND_SPECS["arcface"], d) for d in (torch.float16, torch.float64)]
        out.append(Case("arcface", KIND_SPECS["arcface"], torch.bfloat16, column_major=True))
        out.append(Case("w_softmax", KIND_SPECS["w_softmax"], torch.bfloat16, partial_fc=True))
    else:
        for dtype in DTYPE_NAMES:
            out += [Case(n, s, dtype) for n, s in KIND_SPECS.items()]
            for name in ("arcface", "w_softmax"):
                spec = KIND_SPECS[name]
                out.append(Case(name, spec, dtype, column_major=True))
                out.append(Case(name, spec, dtype, partial_fc=True))
                out.append(Case(name, spec, dtype, column_major=True, partial_fc=True))
        out += [Case(n, s, torch.float32) for n, s in EXTRA_SPECS.items()]
    if device.type == "cuda":
        out.append(Case("arcface", KIND_SPECS["arcface"], torch.bfloat16, shape=LARGE))
    return out


def _inputs(case: Case, device: torch.device, seed: int = 0):
    """x (B, D), W (C, D) in the case's dtype and layout, labels with two ignored rows, and the
    Partial-FC ids (about half the classes, sorted) or None."""
    batch, num_classes, dim = case.shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).to(device, case.dtype)
    w = torch.randn(num_classes, dim, generator=gen).to(device, case.dtype)
    if case.column_major:
        w = w.t().contiguous().t()  # same values, strides (1, C)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    y[[1, batch // 2]] = IGNORE_INDEX
    ids = None
    if case.partial_fc:
        ids = torch.randperm(num_classes, generator=gen)[: num_classes // 2 + 1].sort().values
        ids = ids.to(device)
    return x, w, y.to(device), ids


def _pytorch_loss(x, w, y, spec, ids):
    """PyTorch's own loss (the reference's math, bound at import) in x's precision."""
    valid = y != IGNORE_INDEX
    neg_lse, t = _ORACLE_LSE_PARTS(x, w, torch.where(valid, y, -1), spec, ids)
    return reference.loss_from_parts(neg_lse, t, valid, spec, "none")


def _loss_and_grads(loss_fn: Callable, x, w, y, spec, ids):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = loss_fn(x, w, y, spec, ids)
    # a non-uniform upstream gradient: every row's gradient counts on its own
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss * weights).sum().backward()
    return {"loss": loss.detach(), "dX": x.grad, "dW": w.grad}


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    scale = exact.abs().max().clamp_min(1e-30)
    return ((got.double() - exact).abs().max() / scale).item()


def _backend_loss(name: str) -> Callable:
    def loss_fn(x, w, y, spec, ids):
        return margin_cross_entropy(
            x, w, y, spec, reduction="none", ignore_index=IGNORE_INDEX, backend=name, class_ids=ids
        )

    return loss_fn


def run_case(case: Case, device: torch.device, backends: Sequence[str]) -> list[CaseResult]:
    """Every backend in ``backends`` on one case, with the case's exact values and bounds."""
    x, w, y, ids = _inputs(case, device)
    exact = _loss_and_grads(_pytorch_loss, x.double(), w.double(), y, case.spec, ids)
    exact = {k: v.double() for k, v in exact.items()}
    own = _loss_and_grads(_pytorch_loss, x, w, y, case.spec, ids)
    floors = FLOORS[case.dtype]
    bounds = {k: BOUND_FACTOR * _rel(own[k], exact[k]) + floors[k] for k in exact}
    results = []
    for backend in backends:
        result = CaseResult(str(device), backend, case, bounds=dict(bounds))
        if backend != "torch":
            result.skipped = ops._reason(backend, device, case.spec)
            if result.skipped is not None:
                results.append(result)
                continue
        try:
            got = _loss_and_grads(_backend_loss(backend), x, w, y, case.spec, ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # a backend that raises is a failure of this case, not a crash
            first_line = (str(exc).splitlines() or [""])[0]
            result.failure = f"{type(exc).__name__}: {first_line[:200]}"
            results.append(result)
            continue
        for key, value in got.items():
            if value is None or not torch.isfinite(value).all():
                result.failure = f"{key} is {'missing' if value is None else 'not finite'}"
                break
            result.errors[key] = _rel(value, exact[key])
        results.append(result)
    return results


def devices_here() -> list[torch.device]:
    """The CPU and, when visible, the current CUDA device."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda", torch.cuda.current_device()))
    return found


def backend_status(device: torch.device) -> dict[str, str | None]:
    """Per backend name: None when it can run on ``device``, else why not."""
    spec = KIND_SPECS["arcface"]
    return {name: (None if name == "torch" else ops._reason(name, device, spec)) for name in
            BACKEND_ORDER}  # fmt: skip


def extension_build_info() -> str:
    """What ``margin_kernels._C`` was built against (the record ``setup.py`` writes beside it),
    and whether it loaded."""
    from . import _extension

    info = _extension.build_info()
    recorded = (
        "no build record (a hand-built source checkout?)"
        if info is None
        else ", ".join(
            f"{key}={info.get(key)}"
            for key in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "CUDA_ARCH_LIST", "SASS_ARCHS")
        )
    )
    if not _extension.HAS_CUDA_EXT:
        return f"not loaded ({_extension.LOAD_ERROR}); record: {recorded}"
    return f"loaded; built with {recorded}"


def environment_lines() -> list[str]:
    """Versions, devices, the extension and the backends per device, as printed."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"Triton {triton_version}, Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        arch = ".".join(map(str, torch.cuda.get_device_capability()))
        lines.append(f"GPUs: {', '.join(names)} (current: sm {arch})")
    else:
        lines.append("GPUs: none visible")
    lines.append(f"extension margin_kernels._C: {extension_build_info()}")
    from .ops import triton as triton_ops

    if triton_ops.INTERPRET:
        lines.append("TRITON_INTERPRET=1: Triton kernels run on CPU tensors in the interpreter")
    for device in devices_here():
        status = backend_status(device)
        runs = [n for n, why in status.items() if why is None]
        lines.append(f"backends on {device}: {', '.join(runs)}")
        lines += [f"  {n} cannot run: {why}" for n, why in status.items() if why is not None]
    return lines


def run_cases(
    quick: bool = False,
    devices: Sequence[torch.device] | None = None,
    backends: Sequence[str] | None = None,
    progress: TextIO | None = None,
) -> list[CaseResult]:
    """Run every case on every device with every backend that can run there (or only
    ``backends``); returns one result per (device, backend, case)."""
    results = []
    for device in devices if devices is not None else devices_here():
        status = backend_status(device)
        names = [n for n in BACKEND_ORDER if status[n] is None]
        if backends is not None:
            names = [n for n in names if n in backends]
        for case in cases(device, quick):
            done = run_case(case, device, names)
            results += done
            if progress is not None:
                # one mark per case, and a failure's detail at once: a run stopped by a time
                # limit still shows what it found
                progress.write("".join("s" if r.skipped else "." if r.ok else "F" for r in done))
                for r in done:
                    if not r.ok:
                        progress.write(f"\nFAIL {_failure_line(r)}\n")
                progress.flush()
    if progress is not None:
        progress.write("\n")
    return results


def _failure_line(r: CaseResult) -> str:
    detail = r.failure or ", ".join(
        f"{k} {r.errors[k]:.1e} > {r.bounds[k]:.1e}" for k in r.errors if r.errors[k] > r.bounds[k]
    )
    return f"{r.device} {r.backend} {DTYPE_NAMES[r.case.dtype]} {r.case.label}: {detail}"


def format_table(results: Sequence[CaseResult]) -> list[str]:
    """One line per (device, backend, dtype): cases, the worst case, its quantity, relative
    error, bound and status; then every failed case on its own line."""
    groups: dict[tuple[str, str, torch.dtype], list[CaseResult]] = {}
    for r in results:
        if r.skipped is None:
            groups.setdefault((r.device, r.backend, r.case.dtype), []).append(r)
    header = (
        f"{'device':<7} {'backend':<7} {'dtype':<5} {'cases':>5}  {'worst case':<30} "
        f"{'qty':<4} {'rel.err':>8} {'bound':>8}  status"
    )
    lines = [header, "-" * len(header)]
    for (device, backend, dtype), group in groups.items():
        worst = max(group, key=lambda r: r.worst[1])
        qty, _ = worst.worst
        err = worst.errors.get(qty, math.nan)
        bound = worst.bounds.get(qty, math.nan)
        failed = sum(not r.ok for r in group)
        status = "ok" if not failed else f"FAIL ({failed})"
        lines.append(
            f"{device:<7} {backend:<7} {DTYPE_NAMES[dtype]:<5} {len(group):>5}  "
            f"{worst.case.label:<30} {qty:<4} {err:>8.1e} {bound:>8.1e}  {status}"
        )
    skips = sorted({f"{r.device} {r.backend}: {r.skipped}" for r in results if r.skipped})
    if skips:
        lines.append(f"skipped ({sum(r.skipped is not None for r in results)} cases):")
        lines += [f"  {line}" for line in skips]
    failures = [r for r in results if not r.ok]
    if failures:
        lines.append("")
        lines.append("failed cases:")
    lines += [f"  {_failure_line(r)}" for r in failures]
    return lines


def selftest(
    quick: bool = False, file: TextIO | None = None, backends: Sequence[str] | None = None
) -> bool:
    """Print the environment and the parity table; True when every case is within its bound.

    Args:
        quick: the short list of cases (every kind in fp32 and bf16, the rest sampled).
        file: where to print (default: stdout).
        backends: only these of "torch", "cuda", "triton" (default: every one that can run).
    """
    out = file if file is not None else sys.stdout
    start = time.perf_counter()
    print(f"margin_kernels selftest ({'quick' if quick else 'full'})", file=out)
    for line in environment_lines():
        print(line, file=out)
    results = run_cases(quick=quick, backends=backends, progress=out)
    for line in format_table(results):
        print(line, file=out)
    failed = sum(not r.ok for r in results)
    checked = sum(r.skipped is None for r in results)
    elapsed = time.perf_counter() - start
    verdict = "FAILED" if failed else "passed"
    print(f"selftest {verdict}: {checked - failed}/{checked} (device, backend, case) within "
          f"bounds in {elapsed:.1f} s", file=out)  # fmt: skip
    return failed == 0


def _needs_interpreter_restart() -> bool:
    """No GPU, Triton installed and its interpreter off: only a fresh process can switch it on
    (Triton reads TRITON_INTERPRET when the kernels are defined)."""
    if os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available():
        return False
    from .ops import triton as triton_ops

    return triton_ops.HAS_TRITON


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: exit status 0 when every case passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m margin_kernels.selftest",
        description="Check every backend that can run here against the float64 reference.",
    )
    parser.add_argument("--quick", action="store_true", help="the short list of cases")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKEND_ORDER,
        default=None,
        help="only these backends (default: every one that can run here)",
    )
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="on a CPU-only machine, do not restart with TRITON_INTERPRET=1 (Triton is skipped)",
    )
    args = parser.parse_args(argv)
    if not args.no_restart and _needs_interpreter_restart():
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "margin_kernels.selftest", *(argv or sys.argv[1:])]
        sys.stdout.flush()
        os.execve(sys.executable, cmd, env)
    return 0 if selftest(quick=args.quick, backends=args.backends) else 1


class _CallableModule(types.ModuleType):
    """``margin_kernels.selftest`` is this module and, when called, :func:`selftest`: the public
    ``mk.selftest()`` and ``python -m margin_kernels.selftest`` share one name, and importing the
    submodule (which rebinds the package attribute to it) keeps ``mk.selftest()`` working."""

    def __call__(
        self, quick: bool = False, file: TextIO | None = None, backends: Sequence[str] | None = None
    ) -> bool:
        return selftest(quick=quick, file=file, backends=backends)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
