"""What the test modules share (no test module imports another): the specs every backend is
checked on, the skip markers, and the parity harness with its one tolerance rule.

Tolerance rule. A fused backend is compared with the float64 reference ("exact"). Its error is
the largest absolute difference relative to the largest exact magnitude (:func:`rel_error`).
In a low-precision dtype PyTorch itself is not exact: the reference run in that dtype has an
error of its own, and the backend's error must stay within ``factor`` (2) times it plus a floor
per dtype (:data:`FLOORS`). In float64 PyTorch's own error is 0 by definition, so the bound is
the floor. A test whose previous bound was stricter for a case passes that bound as ``cap``
(relative) or ``close`` (the element-wise ``rtol``/``atol`` of ``torch.testing.assert_close``),
checked in addition: the rule never loosens a test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.spec import MarginSpec

# docs/design.md section 2: theta in degrees -> psi_m(theta).
PSI_VALUES = {
    2: {0: 1.0, 45: 0.0, 90: -1.0, 135: -2.0, 180: -3.0},
    3: {60: -1.0, 90: -2.0, 180: -5.0},
    4: {30: -0.5, 45: -1.0, 90: -3.0, 135: -5.0, 180: -7.0},
}

# Every kind, the psi margins 1-4, every arcface overflow policy and two combined margins.
ALL_SPECS = {
    "lsoftmax_m1": MarginSpec.lsoftmax(1),
    "lsoftmax_m2": MarginSpec.lsoftmax(2, lam=0.5),
    "lsoftmax_m3": MarginSpec.lsoftmax(3),
    "lsoftmax_m4": MarginSpec.lsoftmax(4, lam=2.0),
    "sphereface_m4": MarginSpec.sphereface(4, lam=5.0),
    "sphereface_m2": MarginSpec.sphereface(2),
    "cosface": MarginSpec.cosface(8.0, 0.35),
    "arcface_exact_fallback": MarginSpec.arcface(8.0, 0.5),
    "arcface_exact_none": MarginSpec.arcface(8.0, 0.5, overflow="none"),
    "arcface_exact_easy": MarginSpec.arcface(8.0, 0.5, overflow="easy"),
    "combined": MarginSpec.combined(8.0, 1.0, 0.3, 0.2),
    "combined_m1": MarginSpec.combined(8.0, 1.35, 0.2, 0.1),
    "so_softmax": MarginSpec.so_softmax(),
    "w_softmax": MarginSpec.w_softmax(1.5),
    "lm_softmax": MarginSpec.lm_softmax(5.0),
    "soft_margin": MarginSpec.soft_margin(0.3),
}

# Straight-through specs (not in ALL_SPECS: they are deliberately not the true gradient).
STRAIGHT_THROUGH_SPECS = {
    "arcface_st_fallback": MarginSpec.arcface(8.0, 0.5, grad_mode="straight_through"),
    "arcface_st_easy": MarginSpec.arcface(8.0, 0.5, "straight_through", "easy"),
    "combined_st": MarginSpec.combined(8.0, 1.2, 0.3, 0.1, grad_mode="straight_through"),
}


# --- skip markers -------------------------------------------------------------------------------
def _triton_state() -> tuple[bool, bool]:
    """(Triton installed, interpreter on)."""
    try:
        from margin_kernels.ops import triton as triton_backend
    except ImportError:
        return False, False
    return bool(triton_backend.HAS_TRITON), bool(triton_backend.INTERPRET)


HAS_TRITON, TRITON_INTERPRET = _triton_state()
HAS_EXTENSION = bool(cuda_backend.HAS_CUDA_EXT)
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
requires_triton_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and TRITON_INTERPRET),
    reason="checks the Triton interpreter (TRITON_INTERPRET=1)",
)
# The Triton kernels can run here: on CPU tensors under the interpreter, or on a GPU.
TRITON_DEVICE = (
    None
    if not HAS_TRITON
    else torch.device("cpu")
    if TRITON_INTERPRET
    else torch.device("cuda")
    if HAS_CUDA
    else None
)
requires_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="needs Triton with TRITON_INTERPRET=1 or a CUDA GPU"
)
requires_extension = pytest.mark.skipif(
    not HAS_EXTENSION,
    reason="margin_kernels._C is not built (needs the CUDA build of torch and nvcc)",
)
requires_cuda_extension = pytest.mark.skipif(
    not (HAS_EXTENSION and HAS_CUDA), reason="needs a CUDA GPU and the built extension"
)


# --- parity harness -----------------------------------------------------------------------------
# Error floor per dtype of the inputs (relative to the largest exact magnitude).
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
}
FACTOR = 2.0


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the exact values), in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def error_bound(dtype: torch.dtype, torch_error: float, floor: float | None = None) -> float:
    """The rule: ``FACTOR * torch_error + floor`` (``FLOORS[dtype]`` unless given)."""
    return FACTOR * torch_error + (FLOORS[dtype] if floor is None else floor)


def assert_within(
    names: Sequence[str],
    got: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    torch_lowp: Sequence[torch.Tensor] | None,
    dtype: torch.dtype,
    *,
    floor: float | None = None,
    cap: float | None = None,
    close: dict | None = None,
) -> None:
    """Check ``got`` against ``exact`` (float64) by the rule; ``torch_lowp`` is the reference run
    in ``dtype`` (None for float64, whose own error is 0). ``cap``/``close``: a stricter previous
    bound, kept in addition (see the module docstring)."""
    lowp = torch_lowp if torch_lowp is not None else [None] * len(names)
    for name, a, e, t in zip(names, got, exact, lowp, strict=True):
        assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name}: not finite"
        ours = rel_error(a, e)
        theirs = 0.0 if t is None else rel_error(t, e)
        bound = error_bound(dtype, theirs, floor)
        if cap is not None:
            bound = min(bound, cap)
        assert ours <= bound, (
            f"{name}: relative error {ours:.2e} > {bound:.2e} (torch's {theirs:.2e})"
        )
        if close is not None:
            torch.testing.assert_close(
                a.double(), e.double(), **close, msg=lambda m, k=name: f"{k}: {m}"
            )


def assert_parity(
    ours: Callable[..., Sequence[torch.Tensor]],
    reference: Callable[..., Sequence[torch.Tensor]],
    names: Sequence[str],
    x: torch.Tensor,
    w: torch.Tensor,
    *args,
    floor: float | None = None,
    cap: float | None = None,
    close: dict | None = None,
    lowp_reference: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    """Run ``ours(x, w, *args, **kwargs)`` and ``reference`` on the float64 copies (and, when
    ``lowp_reference`` and the inputs are not float64, on the inputs themselves, for torch's own
    error) and apply :func:`assert_within`. Returns what ``ours`` returned."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    got = tuple(ours(x, w, *args, **kwargs))
    exact = tuple(reference(x.double(), w.double(), *args, **kwargs))
    lowp = None
    if lowp_reference and dtype != torch.float64:
        lowp = tuple(reference(x, w, *args, **kwargs))
    assert_within(names, got, exact, lowp, dtype, floor=floor, cap=cap, close=close)
    return got


# --- the public-API probe shared by the fused backends' tests ---------------------------------
def make_data(
    b: int = 19,
    c: int = 37,
    d: int = 24,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    ignored: Sequence[int] = (3,),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (b, d), w (c, d) drawn in float64 then cast to ``dtype``; labels y (b,) with the rows
    ``ignored`` set to -100 (the default ignore_index)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    for row in ignored:
        y[row] = -100
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


LOSS_AND_GRADS = ("loss", "dX", "dW")


def loss_and_grads(x, w, y, spec: MarginSpec, backend: str, **kwargs) -> tuple[torch.Tensor, ...]:
    """(loss, dX, dW) of ``margin_cross_entropy`` under a non-uniform upstream gradient, so that
    every row's gradient is checked on its own."""
    import margin_kernels as mk

    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = mk.margin_cross_entropy(x, w, y, spec, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss * weights.view_as(loss)).sum().backward()
    return loss.detach(), x.grad, w.grad


def assert_backend_parity(
    backend: str,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    spec: MarginSpec,
    *,
    tol: float | None = None,
    floor: float | None = None,
    cap: float | None = None,
    lowp_reference: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    """:func:`assert_parity` of ``backend`` against ``backend="torch"`` through the public API.
    ``tol``: a test's own relative bound, used as the floor in float64 (where torch's own error
    is 0) and as a cap in every dtype."""
    if tol is not None:
        if torch.promote_types(x.dtype, w.dtype) == torch.float64 and floor is None:
            floor = tol
        cap = tol if cap is None else min(cap, tol)

    def ours(x, w, *args, **kw):
        return loss_and_grads(x, w, *args, backend=backend, **kw)

    def reference(x, w, *args, **kw):
        return loss_and_grads(x, w, *args, backend="torch", **kw)

    return assert_parity(ours, reference, LOSS_AND_GRADS, x, w, y, spec, floor=floor, cap=cap,
                         lowp_reference=lowp_reference, **kwargs)  # fmt: skip


def lowp_errors(
    backend: str,
    dtype: torch.dtype,
    spec: MarginSpec,
    x_norm: float | None = None,
    device: torch.device | str = "cpu",
) -> list[tuple[float, float]]:
    """[(backend's error, torch's own error)] in ``dtype`` vs float64 for loss, dX, dW (feature
    rows scaled to norm ``x_norm`` when given)."""
    x, w, y = make_data(dtype=torch.float64, seed=3, device=device)
    if x_norm is not None:
        x = x / x.norm(dim=1, keepdim=True) * x_norm
    exact = loss_and_grads(x, w, y, spec, "torch", reduction="none")
    xl, wl = x.to(dtype), w.to(dtype)
    ours = loss_and_grads(xl, wl, y, spec, backend, reduction="none")
    torch_lp = loss_and_grads(xl, wl, y, spec, "torch", reduction="none")
    return [
        (rel_error(o, e), rel_error(t, e)) for o, t, e in zip(ours, torch_lp, exact, strict=True)
    ]


# --- gloo process groups (the distributed tests) -------------------------------------------------
def init_gloo(rank: int, world: int, store: str, timeout_s: float) -> None:
    """Join a gloo group of ``world`` processes through a file store (one thread per process)."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s / 2),
    )


def save_report_and_leave(report: dict, out_dir: str, rank: int) -> None:
    """Write this rank's report, then leave together and skip the interpreter's shutdown: gloo's
    background threads can abort a process at exit ("terminate called ...", SIGABRT) after all
    its checks passed and its report was written."""
    import os

    import torch.distributed as dist

    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_gloo_group(worker: Callable, world: int, tmp_path, timeout_s: float) -> list[dict]:
    """Spawn ``world`` processes running ``worker(rank, world, store, out_dir)`` (a module-level
    function); fail, never hang, if they do not finish in time. Returns the ranks' reports."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(r, world, str(tmp_path / "store"), str(tmp_path)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} of {world} workers hung past {timeout_s} s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
