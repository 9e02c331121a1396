"""Cost against class count: time and peak extra memory of one ArcFace forward + backward as C
grows, every provider side by side, one point per fresh process.

Run from the repository root::

    python bench/scale.py --machine cpu-2core              # the CPU sweep (fp32, one thread)
    python bench/scale.py --machine h100 --dtype bf16      # on a GPU, with the GPU providers
    python bench/scale.py --smoke                          # tiny shapes, seconds (CI)
    python bench/scale.py --plot bench/results/scale_cpu-2core.csv   # figure + ratio table

A point is (provider, B, C). The parent predicts its memory first (from the same provider's
measured points at smaller C where there are two, else a formula) and records it as
``skipped: needs ~X GB`` when that is above ``--budget-gb``; otherwise it starts a fresh Python
process that builds x (B, D), W (C, D) and the targets, runs one warm-up step, then ``--reps``
timed steps, and prints one JSON line. Time is the median of the timed steps. Memory is the peak
beyond the inputs and their gradients: on Linux the resident-set high-water mark (``VmHWM``) is
reset through ``/proc/self/clear_refs`` after the warm-up, read after the timed steps, and the
resident set before them plus the gradients' bytes is subtracted (bench/README.md, "Scale").
On a GPU the caching allocator's peak is used the same way. One CSV row per point, including the
points that were skipped or could not run here, with the reason in ``status``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SMOKE_OUT = REPO_ROOT / "out" / "bench" / "scale_smoke.csv"

COLUMNS = (
    "date",
    "machine",
    "device",
    "threads",
    "torch",
    "provider",
    "resolved",
    "loss",
    "dtype",
    "batch",
    "dim",
    "num_classes",
    "status",
    "median_s",
    "steps_s",
    "median_cpu_s",
    "load_1min",
    "peak_extra_mb",
    "predicted_extra_mb",
    "memory_method",
)

# Every provider, in the order of the CSV, the plot and the tables.
PROVIDERS = ("auto", "cuda", "triton", "torch", "linear+ce", "pml", "cce", "liger")
GPU_ONLY = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}
CPU_SWEEP = {"classes": (10_000, 30_000, 100_000, 300_000, 1_000_000), "batch": (64, 256)}
SMOKE_SWEEP = {"classes": (100, 300), "batch": (4,), "dim": 16}
# glibc would otherwise keep freed blocks below a sliding mmap threshold (up to 32 MiB) in its
# heap, where the next step reuses them without raising the resident set: a fixed, small
# threshold returns every freed buffer to the kernel, so each step's peak is counted in full.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# resident set of a process that has imported torch and margin_kernels (measured, rounded up)
PROCESS_BASE_BYTES = 600 * 2**20
ARCFACE_S, ARCFACE_M = 64.0, 0.5


@dataclass(frozen=True)
class Point:
    provider: str
    batch: int
    num_classes: int
    dim: int
    dtype: str
    device: str
    threads: int
    reps: int


# ---------------------------------------------------------------- memory (Linux, CPU)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def resident_bytes() -> int:
    """Current resident set of this process (``VmRSS``), bytes."""
    return _status_kb("VmRSS") * 1024


def reset_peak_resident() -> None:
    """Sets ``VmHWM`` back to the current resident set (Linux >= 4.0: ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_resident_bytes() -> int:
    """Resident-set high-water mark (``VmHWM``) since the last reset, bytes."""
    return _status_kb("VmHWM") * 1024


def linux_memory_available() -> str | None:
    """None where VmHWM can be reset and read, else why not."""
    if not sys.platform.startswith("linux"):
        return "peak resident set needs Linux /proc"
    try:
        reset_peak_resident()
        peak_resident_bytes()
    except OSError as e:
        return f"/proc/self/clear_refs: {e}"
    return None


class PeakExtra:
    """Peak memory beyond what was resident (CPU) or allocated (GPU) on entry.

    ``extra`` after the block: peak minus the value on entry, bytes. On CPU this is the
    resident-set high-water mark, so it counts every page any allocator touched, torch's or not.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.extra = 0

    def __enter__(self) -> PeakExtra:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = resident_bytes()
            reset_peak_resident()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self._base
        else:
            self.extra = peak_resident_bytes() - self._base


# ---------------------------------------------------------------- providers


def not_run_reason(provider: str, device: str) -> str | None:
    """Why ``provider`` is not measured on ``device`` (None: it is)."""
    if provider == "triton" and device == "cpu":
        return "not run: Triton runs on CPU only under TRITON_INTERPRET=1, not a performance path"
    if provider in GPU_ONLY and device == "cpu":
        return "not run: GPU only (its kernels are Triton/CUDA)"
    if provider in GPU_ONLY:
        import importlib.util

        if importlib.util.find_spec(GPU_ONLY[provider]) is None:
            return f"not run: {GPU_ONLY[provider]} not installed"
    if provider == "pml":
        import importlib.util

        if importlib.util.find_spec("pytorch_metric_learning") is None:
            return "not run: pytorch-metric-learning not installed"
    if provider in ("cuda", "triton"):
        import torch

        import margin_kernels as mk
        from margin_kernels import ops

        reason = ops._reason(provider, torch.device(device), mk.MarginSpec.arcface())
        if reason is not None:
            return f"not run: {reason}"
    return None


def build_loss(provider: str, x, weight, target) -> tuple[Callable[[], object], list, str]:
    """(loss closure, the leaves whose gradients it makes, the backend that runs) of one point."""
    import torch
    import torch.nn.functional as F

    import margin_kernels as mk
    from margin_kernels import ops

    spec = mk.MarginSpec.arcface(s=ARCFACE_S, m=ARCFACE_M)
    if provider in ("auto", "cuda", "triton", "torch"):
        resolved = ops.resolve(provider, x.device, spec)[0]
        return (
            lambda: mk.margin_cross_entropy(x, weight, target, spec, backend=provider),
            [x, weight],
            resolved,
        )
    if provider == "linear+ce":
        return lambda: F.cross_entropy(F.linear(x, weight), target), [x, weight], "F.linear"
    if provider == "pml":
        from pytorch_metric_learning import losses

        # PML keeps W as (D, C) and takes its margin in degrees. Built with one class so that it
        # does not allocate its own C x D matrix; then handed W.t() (a view, no copy).
        module = losses.ArcFaceLoss(
            1, x.shape[1], margin=math.degrees(ARCFACE_M), scale=ARCFACE_S, collect_stats=False
        )
        module.num_classes = weight.shape[0]
        module.W = torch.nn.Parameter(weight.detach().t())
        return lambda: module(x, target), [x, module.W], "ArcFaceLoss"
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return (
            lambda: linear_cross_entropy(x, weight, target, filter_eps=None),
            [x, weight],
            "linear_cross_entropy",
        )
    if provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return (
            lambda: liger_fused_linear_cross_entropy(x, weight, target),
            [x, weight],
            "fused_linear_cross_entropy",
        )
    raise ValueError(f"unknown provider {provider!r}")


# ---------------------------------------------------------------- one point (child process)


def measure_point(point: Point) -> dict:
    """Builds the inputs, runs a warm-up and ``reps`` timed steps; returns the point's result."""
    import torch

    torch.set_num_threads(point.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[point.dtype]
    device = torch.device(point.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(point.batch, point.dim, generator=gen).to(device, dtype)
    weight = (torch.randn(point.num_classes, point.dim, generator=gen) * 0.05).to(device, dtype)
    target = torch.randint(0, point.num_classes, (point.batch,), generator=gen).to(device)
    x.requires_grad_()
    weight.requires_grad_()
    loss_fn, leaves, resolved = build_loss(point.provider, x, weight, target)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss_fn().backward()

    step()  # warm-up: one-time allocations, library initialisation
    grad_bytes = sum(leaf.nelement() * leaf.element_size() for leaf in leaves)
    for leaf in leaves:
        leaf.grad = None
    steps, cpu_steps = [], []
    with PeakExtra(device.type) as peak:
        for _ in range(point.reps):
            for leaf in leaves:
                leaf.grad = None
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss_fn().backward()
            sync()
            steps.append(time.perf_counter() - start)
            cpu_steps.append(time.process_time() - cpu_start)
    return {
        "resolved": resolved,
        "steps_s": steps,
        "cpu_steps_s": cpu_steps,
        "peak_extra_bytes": peak.extra - grad_bytes,
    }


def run_point_subprocess(point: Point, timeout_s: float) -> dict:
    """``measure_point`` in a fresh Python process; ``{"error": ...}`` when it fails."""
    env = dict(os.environ, **MALLOC_ENV)
    env["OMP_NUM_THREADS"] = str(point.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(asdict(point))]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if proc.returncode < 0 or "out of memory" in proc.stderr.lower():
        return {"error": f"OOM or killed ({tail[:160]})"}
    return {"error": tail[:200]}


# ---------------------------------------------------------------- the sweep (parent)


def formula_extra_bytes(provider: str, batch: int, num_classes: int, dim: int, size: int) -> int:
    """A deliberately generous guess of a point's extra bytes, used only until two points of the
    same provider and batch at smaller C have been measured (then those are extrapolated)."""
    bc = batch * num_classes * 4
    cd = num_classes * dim * size
    if provider in ("torch", "pml"):
        return 2 * cd + 16 * bc  # normalised W and its gradient, ~16 (B, C) buffers
    if provider == "linear+ce":
        return 4 * bc
    return 512 * 2**20 + 8 * num_classes  # chunked: the chunk budget plus per-class vectors


Measured = dict[tuple[str, int], list[tuple[int, int]]]


def predict_extra_bytes(point: Point, measured: Measured) -> int:
    """Extra bytes of ``point``: the line through the same provider's two largest measured C at
    this batch (memory is affine in C for every provider), else ``formula_extra_bytes``."""
    size = 2 if point.dtype in ("bf16", "fp16") else 4
    known = sorted(measured.get((point.provider, point.batch), []))
    if len(known) >= 2:
        (c0, m0), (c1, m1) = known[-2], known[-1]
        slope = max(0.0, (m1 - m0) / (c1 - c0))
        return int(max(m1, m1 + slope * (point.num_classes - c1)))
    return formula_extra_bytes(point.provider, point.batch, point.num_classes, point.dim, size)


def input_bytes(point: Point) -> int:
    """x and W and their gradients."""
    size = 2 if point.dtype in ("bf16", "fp16") else 4
    return 2 * size * (point.batch + point.num_classes) * point.dim


def sweep_points(
    providers: Sequence[str], batches: Sequence[int], classes: Sequence[int], **common
) -> list[Point]:
    """Batch outermost, then C ascending (so smaller C predict larger), then provider."""
    return [
        Point(provider=p, batch=b, num_classes=c, **common)
        for b in batches
        for c in sorted(classes)
        for p in providers
    ]


def run_sweep(args: argparse.Namespace, points: list[Point], out: Path) -> list[dict]:
    import torch

    try:
        from tqdm import tqdm
    except ImportError:  # the sweep runs without a progress bar
        tqdm = None
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} {os.cpu_count()} cpus"
    )
    method = (
        "torch.cuda.max_memory_allocated - allocated before - grads"
        if args.device == "cuda"
        else "VmHWM (reset via clear_refs) - VmRSS before - grads"
    )
    common = {
        "date": datetime.date.today().isoformat(),
        "machine": args.machine,
        "device": device_name,
        "threads": args.threads,
        "torch": torch.__version__,
        "loss": f"arcface s={ARCFACE_S:g} m={ARCFACE_M:g}",
    }
    measured: Measured = {}
    rows = []
    deadline = time.monotonic() + 60 * args.max_minutes
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_gb * 2**30)
    bar = tqdm(points, unit="point", file=sys.stderr) if tqdm else points
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for point in bar:
            label = f"{point.provider} B={point.batch} C={point.num_classes:.0e}"
            if tqdm:
                bar.set_postfix_str(label)
            row = dict.fromkeys(COLUMNS, "")
            row.update(common)
            row.update(
                provider=point.provider,
                dtype=point.dtype,
                batch=point.batch,
                dim=point.dim,
                num_classes=point.num_classes,
            )
            predicted = predict_extra_bytes(point, measured)
            needed = PROCESS_BASE_BYTES + input_bytes(point) + predicted
            reason = not_run_reason(point.provider, point.device)
            if reason is None and point.device == "cpu" and needed > budget:
                reason = (
                    f"skipped: needs ~{needed / 2**30:.1f} GB "
                    f"(budget {args.budget_gb:g} GB on this shared machine)"
                )
            if reason is None and time.monotonic() > deadline:
                reason = f"not run: the sweep's {args.max_minutes:g} min limit was reached"
            row["predicted_extra_mb"] = f"{predicted / 2**20:.0f}"
            if reason is not None:
                row["status"] = reason
            else:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
                result = run_point_subprocess(point, args.point_timeout)
                if "error" in result:
                    row["status"] = "error: " + result["error"].replace(",", ";")
                else:
                    steps = result["steps_s"]
                    extra = result["peak_extra_bytes"]
                    measured.setdefault((point.provider, point.batch), []).append(
                        (point.num_classes, extra)
                    )
                    row.update(
                        status="ok",
                        resolved=result["resolved"],
                        median_s=f"{statistics.median(steps):.4f}",
                        steps_s=" ".join(f"{s:.4f}" for s in steps),
                        median_cpu_s=f"{statistics.median(result['cpu_steps_s']):.4f}",
                        load_1min=f"{load:.2f}",
                        peak_extra_mb=f"{extra / 2**20:.1f}",
                        memory_method=method,
                    )
            writer.writerow(row)
            f.flush()
            rows.append(row)
            msg = f"{label}: {row['status']}"
            if row["status"] == "ok":
                msg += f" {row['median_s']} s, {row['peak_extra_mb']} MB extra"
            print(msg, file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- results: table and plot


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows. A row of an unquoted CSV (as written before the writer quoted fields)
    whose status held k commas has k fields too many: the status is put back together from
    the first k + 1 pieces and the rest shifted back into place."""
    after = COLUMNS[COLUMNS.index("status") :]
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            overflow = row.pop(None, None)
            if overflow:
                pieces = [row[c] for c in after] + overflow
                k = len(overflow)
                row["status"] = ",".join(pieces[: k + 1])
                row.update(zip(after[1:], pieces[k + 1 :], strict=True))
            rows.append(row)
    return rows


def _ok_rows(rows: list[dict]) -> dict[tuple[str, int, int], dict]:
    return {
        (r["provider"], int(r["batch"]), int(r["num_classes"])): r
        for r in rows
        if r["status"] == "ok"
    }


def ratio_table(rows: list[dict], min_classes: int = 100_000) -> str:
    """Markdown: each measured point at C >= ``min_classes`` with its step's wall and CPU time,
    extra memory, and its CPU time over linear+ce's and PML's at the same (B, C) (CPU time: the
    machine's other jobs stretch wall time, not the process's own CPU time), and its wall time
    over linear+ce's."""
    ok = _ok_rows(rows)
    lines = [
        "| B | C | provider | wall s | CPU s | extra MB | CPU / linear+ce | CPU / PML "
        "| wall / linear+ce |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted(ok, key=lambda k: (k[1], k[2], PROVIDERS.index(k[0])))
    for provider, batch, classes in keys:
        if classes < min_classes:
            continue
        r = ok[(provider, batch, classes)]
        cells = []
        for ref, column in (("linear+ce", "median_cpu_s"), ("pml", "median_cpu_s")):
            other = ok.get((ref, batch, classes))
            cells.append(f"{float(r[column]) / float(other[column]):.2f}" if other else "—")
        base = ok.get(("linear+ce", batch, classes))
        cells.append(f"{float(r['median_s']) / float(base['median_s']):.2f}" if base else "—")
        lines.append(
            f"| {batch} | {classes:.0e} | {provider} | {float(r['median_s']):.3f} "
            f"| {float(r['median_cpu_s']):.3f} | {float(r['peak_extra_mb']):.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def full_table(rows: list[dict]) -> str:
    """Markdown: every row of the CSV (times, memory, or the reason it was not measured)."""
    lines = [
        "| B | C | provider | runs as | wall s | CPU s | extra MB | load | status |",
        "|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        cells = [r[c] if ok else "—" for c in ("median_s", "median_cpu_s", "peak_extra_mb")]
        lines.append(
            f"| {r['batch']} | {int(r['num_classes']):.0e} | {r['provider']} | {r['resolved']} "
            f"| {' | '.join(cells)} | {r['load_1min'] or '—'} | {r['status']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Log-log figure: time (top) and peak extra memory (bottom) against C, one column per B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for provider in PROVIDERS:
            pts = sorted(
                (int(r["num_classes"]), float(r["median_cpu_s"]), float(r["peak_extra_mb"]))
                for r in rows
                if r["provider"] == provider and int(r["batch"]) == batch and r["status"] == "ok"
            )
            if not pts:
                continue
            cs, ts, ms = zip(*pts, strict=True)
            axes[0][col].plot(cs, ts, marker="o", label=provider)
            axes[1][col].plot(cs, [m / 1024 for m in ms], marker="o", label=provider)
        dtype = rows[0]["dtype"]
        axes[0][col].set_title(f"ArcFace fwd+bwd, B={batch}, D={rows[0]['dim']}, {dtype}")
        axes[0][col].set_ylabel("CPU time per step (s, median)")
        axes[1][col].set_ylabel("peak extra memory (GB)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['machine']}: {rows[0]['device']}, {rows[0]['threads']} thread(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_point(point: Point, rows: int = 12) -> str:
    """torch.profiler's table (self CPU time) of one step after a warm-up, in this process."""
    import torch

    torch.set_num_threads(point.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(point.batch, point.dim, generator=gen).requires_grad_()
    weight = (torch.randn(point.num_classes, point.dim, generator=gen) * 0.05).requires_grad_()
    target = torch.randint(0, point.num_classes, (point.batch,), generator=gen)
    loss_fn, leaves, _ = build_loss(point.provider, x, weight, target)
    loss_fn().backward()
    for leaf in leaves:
        leaf.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_fn().backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def interleaved_cpu_times(points: list[Point], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of one step of each point's provider, all in this process on the same inputs,
    the providers taking turns ``rounds`` times, so that a change in the machine's load hits
    all of them alike; plus ``gemm``: the three bare GEMMs of a linear layer's forward and
    backward at that shape (x Wᵀ, dZ W, dZᵀ x), the floor of any provider."""
    import torch

    first = points[0]
    torch.set_num_threads(first.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(first.batch, first.dim, generator=gen).requires_grad_()
    weight = (torch.randn(first.num_classes, first.dim, generator=gen) * 0.05).requires_grad_()
    target = torch.randint(0, first.num_classes, (first.batch,), generator=gen)
    steps = {}
    for point in points:
        loss_fn, leaves, _ = build_loss(point.provider, x, weight, target)

        def step(loss_fn=loss_fn, leaves=leaves) -> None:
            for leaf in leaves:
                leaf.grad = None
            loss_fn().backward()

        steps[point.provider] = step

    def gemm() -> None:
        with torch.no_grad():
            logits = x @ weight.T
            logits @ weight  # dX
            logits.T @ x  # dW

    steps["gemm"] = gemm
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    return times


def combine(
    inputs: Sequence[Path], grid: list[Point], missing: str, budget_gb: float
) -> list[dict]:
    """The rows of several sweeps' CSVs (e.g. one per batch size, run side by side), in the
    order of ``grid``. A grid point no input has gets a row saying why: the provider cannot run
    here, or its predicted memory (from the measured rows) is over ``budget_gb``, else
    ``missing``."""
    found = {}
    for path in inputs:
        for row in read_rows(path):
            found[(row["provider"], int(row["batch"]), int(row["num_classes"]))] = row
    if not found:
        raise ValueError("no rows in " + ", ".join(map(str, inputs)))
    template = next(iter(found.values()))
    measured: Measured = {}
    for (provider, batch, num_classes), row in sorted(found.items()):
        if row["status"] == "ok":
            extra = int(float(row["peak_extra_mb"]) * 2**20)
            measured.setdefault((provider, batch), []).append((num_classes, extra))
    shared = ("date", "machine", "device", "threads", "torch", "loss", "dtype", "dim")
    rows = []
    for point in grid:
        row = found.get((point.provider, point.batch, point.num_classes))
        if row is None:
            row = dict.fromkeys(COLUMNS, "")
            row.update({c: template[c] for c in shared})
            predicted = predict_extra_bytes(point, measured)
            needed = PROCESS_BASE_BYTES + input_bytes(point) + predicted
            status = not_run_reason(point.provider, point.device) or missing
            if status == missing and point.device == "cpu" and needed > budget_gb * 2**30:
                status = f"skipped: needs ~{needed / 2**30:.1f} GB (budget {budget_gb:g} GB)"
            row.update(
                provider=point.provider,
                batch=point.batch,
                num_classes=point.num_classes,
                status=status,
                predicted_extra_mb=f"{predicted / 2**20:.0f}",
            )
        rows.append(row)
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- command line


def _values(items: Sequence[str], kind: type) -> list:
    return [kind(float(v)) for item in items for v in item.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: one point, JSON
    p.add_argument("--smoke", action="store_true", help="tiny shapes, written to out/bench/")
    p.add_argument("--plot", type=Path, help="CSV to draw (PNG beside it) and tabulate")
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler table of each provider's step"
    )
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="write one CSV (--out) from these sweeps' CSVs, in the order of the grid",
    )
    p.add_argument(
        "--missing",
        default="not run: the sweep's time limit was reached",
        help="status of a grid point --combine finds in no input",
    )
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="CPU time per step of the providers taking turns in one process, and the GEMMs",
    )
    p.add_argument("--machine", default=platform.node() or "unknown", help="CSV file name tag")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--classes", nargs="+", default=None)
    p.add_argument("--batch", nargs="+", default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per point (CPU)")
    p.add_argument("--reps", type=int, default=3, help="timed steps after the warm-up (>= 3)")
    p.add_argument("--budget-gb", type=float, default=8.0, help="skip CPU points predicted above")
    p.add_argument("--point-timeout", type=float, default=1800.0, help="seconds per point")
    p.add_argument("--max-minutes", type=float, default=120.0, help="start no point after this")
    p.add_argument("--out", type=Path, default=None, help="CSV path")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.point:
        result = measure_point(Point(**json.loads(args.point)))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.plot:
        rows = read_rows(args.plot)
        png = args.plot.with_suffix(".png")
        plot(rows, png)
        print(f"wrote {png}\n\n{ratio_table(rows)}\n\n{full_table(rows)}")
        return 0
    sweep = SMOKE_SWEEP if args.smoke else CPU_SWEEP
    classes = _values(args.classes, int) if args.classes else list(sweep["classes"])
    batches = _values(args.batch, int) if args.batch else list(sweep["batch"])
    dim = args.dim or (SMOKE_SWEEP["dim"] if args.smoke else 512)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.combine:
        if args.out is None:
            sys.exit("--combine needs --out")
        grid = sweep_points(
            args.providers,
            batches,
            classes,
            dim=dim,
            dtype=dtype,
            device=args.device,
            threads=args.threads,
            reps=args.reps,
        )
        rows = combine(args.combine, grid, args.missing, args.budget_gb)
        write_rows(rows, args.out)
        print(f"wrote {args.out} ({len(rows)} rows)")
        return 0
    if args.interleaved:
        for batch in batches:
            for num_classes in classes:
                points = [
                    Point(p, batch, num_classes, dim, dtype, "cpu", args.threads, 1)
                    for p in args.providers
                    if not_run_reason(p, "cpu") is None
                ]
                times = interleaved_cpu_times(points, args.interleaved)
                gemm = statistics.median(times["gemm"])
                print(f"B={batch} C={num_classes} D={dim}: median CPU s per step (/ 3 GEMMs)")
                for name, values in times.items():
                    median = statistics.median(values)
                    print(f"  {name:10s} {median:8.3f}  {median / gemm:5.2f}")
        return 0
    if args.profile:
        for point in sweep_points(
            args.providers,
            batches,
            classes,
            dim=dim,
            dtype=dtype,
            device=args.device,
            threads=args.threads,
            reps=1,
        ):
            if not_run_reason(point.provider, point.device) is None:
                print(f"## {point.provider} B={point.batch} C={point.num_classes}")
                print(profile_point(point))
        return 0
    if args.device == "cpu" and (reason := linux_memory_available()):
        sys.exit(f"cannot measure CPU memory here: {reason}")
    if args.smoke:
        out = args.out or SMOKE_OUT
    else:
        out = args.out or RESULTS_DIR / f"scale_{args.machine}.csv"
    points = sweep_points(
        args.providers,
        batches,
        classes,
        dim=dim,
        dtype=dtype,
        device=args.device,
        threads=args.threads,
        reps=args.reps,
    )
    start = time.monotonic()
    rows = run_sweep(args, points, out)
    print(f"wrote {out} ({len(rows)} rows) in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
