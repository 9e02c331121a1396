"""CPU timing and peak memory of backend="cuda" (its C++ CPU kernels, class chunks) against the
torch reference and plain linear + cross-entropy, forward + backward, at one shape.

    PYTHONPATH=. python bench/cpu_chunks.py [--batch 256 --dim 512 --classes 100000 --reps 3]

Time: median wall time of ``--reps`` runs after one warm-up (time.perf_counter). Peak memory: a
separate run under a dispatch-mode tracker that counts every storage an operator allocates until
Python frees it, minus the gradients and outputs (bench/run.py records no memory on CPU).
Appends one row per provider to bench/results/cpu_chunks.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import margin_kernels as mk
from margin_kernels.ops import cuda as cuda_backend

FIELDS = [
    "date", "machine", "threads", "torch", "loss", "dtype", "B", "D", "C", "provider",
    "median_s", "runs_s", "peak_extra_mb", "chunk_classes", "chunks",
]  # fmt: skip


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated by operators while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key in self._sizes or key in inputs:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


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
    path = os.path.join(args.out, "cpu_chunks.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for name, fn in providers(spec).items():
            step(fn, x, w, y)
            runs = []
            for _ in range(args.reps):
                start = time.perf_counter()
                step(fn, x, w, y)
                runs.append(time.perf_counter() - start)
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
            writer.writerow(row)
            print(row)
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
