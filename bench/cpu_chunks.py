"""CPU timing and peak memory of backend="cuda" (its C++ CPU kernels, class chunks) against the
torch reference and plain linear + cross-entropy, forward + backward, at one shape.

    PYTHONPATH=. python bench/cpu_chunks.py [--batch 256 --dim 512 --classes 100000 --reps 3]

Time: median wall time of ``--reps`` runs after one warm-up (harness.perf_counter_ms). Peak
memory: a separate run under harness.LiveBytes, a dispatch-mode tracker that counts every storage
an operator allocates until Python frees it, minus the gradients and outputs (bench/run.py
records no memory on CPU). Appends one row per provider to bench/results/cpu_chunks.csv.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import CsvSink, LiveBytes, perf_counter_ms

import margin_kernels as mk
from margin_kernels.ops import cuda as cuda_backend

FIELDS = [
    "date", "machine", "threads", "torch", "loss", "dtype", "B", "D", "C", "provider",
    "median_s", "runs_s", "peak_extra_mb", "chunk_classes", "chunks",
]  # fmt: skip


def providers(spec: mk.MarginSpec):
    """name -> loss(x, w, y) of one forward."""
    return {
        "cuda": lambda x, w, y: mk.margin_cross_entropy(x, w, y, spec, backend="cuda"),
        "torch": lambda x, w, y: mk.margin_cross_entropy(x, w, y, spec, backend="torch"),
        "linear+ce": lambda x, w, y: F.cross_entropy(F.linear(x, w), y),
    }


def step(fn, x, w, y) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.detach().requires_grad_()
    wa = w.detach().requires_grad_()
    fn(xa, wa, y).backward()
    return xa.grad, wa.grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not cuda_backend.HAS_CUDA_EXT:
        sys.exit("margin_kernels._C is not built: nothing to measure for backend='cuda'")
    g = torch.Generator().manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, generator=g)
    w = torch.randn(c, d, generator=g) * 0.05
    y = torch.randint(0, c, (b,), generator=g)
    spec = mk.MarginSpec.arcface()
    plan = cuda_backend.chunk_plan(b, c, d, torch.float32, spec.kind, device_type="cpu")
    with CsvSink(Path(args.out) / "cpu_chunks.csv", FIELDS) as sink:
        for name, fn in providers(spec).items():
            timed = functools.partial(step, fn, x, w, y)
            runs = [ms / 1e3 for ms in perf_counter_ms(timed, warmup=1, reps=args.reps)]
            with LiveBytes() as tracker:
                gx, gw = step(fn, x, w, y)
            peak = (tracker.peak - gx.nbytes - gw.nbytes) / 2**20
            row = {
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "loss": spec.kind,
                "dtype": "float32",
                "B": b,
                "D": d,
                "C": c,
                "provider": name,
                "median_s": f"{statistics.median(runs):.4f}",
                "runs_s": " ".join(f"{r:.4f}" for r in runs),
                "peak_extra_mb": f"{peak:.1f}",
                "chunk_classes": plan.classes_per_chunk if name == "cuda" else "",
                "chunks": plan.num_chunks if name == "cuda" else "",
            }
            sink.write(row)
            print(row)
    print(f"appended to {sink.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
