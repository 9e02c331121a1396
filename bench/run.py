"""Benchmark sweep: margin losses at face-recognition shapes, every provider side by side.

Run from the repository root::

    python bench/run.py                      # full sweep on the visible GPU
    python bench/run.py --providers triton torch gemm --losses arcface --classes 1000000
    TRITON_INTERPRET=1 python bench/run.py --smoke   # tiny CPU sweep (what CI runs)

Every measured (provider, case) appends one row to ``<out>/<device-slug>.csv`` (columns in
``harness.COLUMNS``, meanings in bench/README.md); a provider that cannot run here is skipped
with one line, an out-of-memory is recorded as ``OOM`` and any other failure as ``ERROR`` with
its message, and the sweep goes on. This file is the command line and the sweep over the grid;
the providers and cases are in providers.py, timing, memory and the CSV in harness.py.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# bench/ is a folder of scripts whose modules import each other by name: `python bench/run.py`
# puts the folder on sys.path; this does it too when run.py is loaded by path (e.g. by a test).
BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from harness import (  # noqa: E402
    REPO_ROOT,
    CsvSink,
    environment,
    measure,
    measurement_row,
    predicted_for,
    prediction_note,
    slug,
    split_values,
)
from providers import (  # noqa: E402
    DTYPE_ALIASES,
    DTYPES,
    GEMM_PROVIDER,
    LOSSES,
    MODES,
    Case,
    Provider,
    Shape,
    all_providers,
)

try:
    from tqdm import tqdm

    HAS_TQDM = True
except ImportError:  # the sweep runs without a progress bar
    HAS_TQDM = False

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SMOKE_OUT_DIR = REPO_ROOT / "out" / "bench"

FULL_SWEEP = {
    "batch": (128, 1024, 4096),
    "classes": (10_000, 100_000, 1_000_000, 2_000_000),
    "dim": 512,
    "losses": ("arcface", "cosface", "sphereface", "ce"),
    "dtypes": ("bf16", "fp32"),
    "modes": MODES,
    "sample_rates": (1.0, 0.1),
}
# cosface is left out of the smoke default: "ce" runs the same code path (CosFace, m = 0).
SMOKE_SWEEP = {
    "batch": (8,),
    "classes": (37, 100),
    "dim": 16,
    "losses": ("arcface", "sphereface", "ce"),
    "dtypes": ("fp32", "bf16"),
    "modes": MODES,
    "sample_rates": (1.0, 0.1),
}


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------
def shapes(config: dict) -> list[Shape]:
    return [
        Shape(dtype, mode, batch, classes, config["dim"], rate)
        for dtype, mode, batch, classes, rate in itertools.product(
            config["dtypes"],
            config["modes"],
            config["batch"],
            config["classes"],
            config["sample_rates"],
        )
    ]


def plan(
    config: dict, providers: dict[str, Provider], device: torch.device, say: Callable[[str], None]
) -> list[tuple[Provider, Case]]:
    """The (provider, case) pairs to measure, GEMM yardstick first in every shape group. Pairs
    that cannot run here are announced once per (provider, reason) and left out."""
    work = []
    announced = set()
    for shape in shapes(config):
        for provider in providers.values():
            losses = ["gemm"] if provider.name == GEMM_PROVIDER else config["losses"]
            for loss in losses:
                if provider.name != GEMM_PROVIDER and loss not in provider.losses:
                    continue
                # the GEMM yardstick is loss-independent; any loss spec builds its inputs
                case = Case(config["losses"][0] if loss == "gemm" else loss, shape)
                reason = provider.unavailable(case, device)
                if reason is not None:
                    key = (provider.name, reason)
                    if key not in announced:
                        announced.add(key)
                        say(f"skipping {provider.name}: {reason}")
                    continue
                work.append((provider, case))
    return work


def sweep(config: dict, providers: dict[str, Provider], device: torch.device, args) -> Path:
    """Measure every planned pair and append the rows; returns the CSV path."""
    env = environment(device)
    out_dir = Path(args.out) if args.out else (SMOKE_OUT_DIR if args.smoke else RESULTS_DIR)
    say = tqdm.write if HAS_TQDM else print
    work = plan(config, providers, device, say)
    gemm_ms: dict[Shape, float] = {}
    # In a log (no terminal) one progress line every 30 s instead of one per run.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(work, desc="bench", unit="run", mininterval=interval) if HAS_TQDM else work
    with CsvSink(out_dir / f"{slug(env['device'])}.csv") as sink:
        for provider, case in bar:
            is_gemm = provider.name == GEMM_PROVIDER
            label = "gemm" if is_gemm else case.loss
            if HAS_TQDM:
                bar.set_postfix_str(
                    f"{provider.name} {label} {_shape_label(case.shape)}", refresh=False
                )
            result = measure(provider, case, device, args)
            if is_gemm and result.status == "ok":
                gemm_ms[case.shape] = result.time_ms
            predicted = predicted_for(provider.name, case, env["device"])
            if predicted is not None:
                result.notes.append(prediction_note(predicted, result.time_ms))
                if result.status == "ok":
                    say(
                        f"{provider.name} {label} {_shape_label(case.shape)}: measured "
                        f"{result.time_ms:.4g} ms, predicted {predicted['predicted_ms']:.4g} ms"
                    )
            gemm_time = gemm_ms.get(case.shape, math.nan)
            sink.write(measurement_row(env, provider.name, label, case, result, gemm_time))
            if result.status != "ok":
                say(f"{result.status}: {provider.name} {label} {_shape_label(case.shape)}")
    return sink.path


def _shape_label(shape: Shape) -> str:
    rate = "" if shape.sample_rate >= 1 else f" r={shape.sample_rate:g}"
    return f"{shape.dtype} {shape.mode} B={shape.batch} C={shape.classes}{rate}"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _ints(values: list[str]) -> tuple[int, ...]:
    # "1e6" and "1_000_000" both mean one million
    return tuple(int(float(v.replace("_", ""))) for v in values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    multi = {"nargs": "+", "default": None}
    parser.add_argument("--smoke", action="store_true", help="tiny CPU sweep (CI)")
    parser.add_argument("--providers", **multi, help="subset of providers (default: all)")
    parser.add_argument("--losses", **multi, help=f"subset of {list(LOSSES)}")
    parser.add_argument("--dtypes", **multi, help=f"subset of {list(DTYPES)}")
    parser.add_argument("--modes", **multi, help=f"subset of {list(MODES)}")
    parser.add_argument("--batch", **multi, help="batch sizes B")
    parser.add_argument("--classes", **multi, help="class counts C (1e6 is accepted)")
    parser.add_argument("--dim", type=int, default=None, help="feature dim D")
    parser.add_argument(
        "--sample-rates", **multi, help="Partial-FC rates r (1 = all classes; default 1 0.1)"
    )
    parser.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    parser.add_argument("--out", default=None, help="output directory of the CSV")
    parser.add_argument(
        "--results",
        action="store_true",
        help="with --smoke: write into bench/results/ instead of out/bench/",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up time")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time")
    parser.add_argument(
        "--cpu-warmup", type=int, default=None, help="extra untimed runs, CPU timer (1; smoke 0)"
    )
    parser.add_argument(
        "--cpu-reps", type=int, default=None, help="timed runs, CPU timer (5; smoke 2)"
    )
    parser.add_argument(
        "--rotate-mb",
        type=float,
        default=None,
        help="cycle input sets until they exceed this many MiB (default 4x L2, CPU 64)",
    )
    parser.add_argument("--max-input-sets", type=int, default=4)
    parser.add_argument(
        "--input-sets", type=int, default=None, help="fixed number of input sets (smoke 2)"
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager in --smoke)",
    )
    parser.add_argument("--list", action="store_true", help="list providers and exit")
    args = parser.parse_args(argv)
    for name in ("providers", "losses", "dtypes", "modes", "batch", "classes", "sample_rates"):
        setattr(args, name, split_values(getattr(args, name)))
    if args.results:
        args.out = str(RESULTS_DIR)
    smoke_or_full = (lambda smoke, full: smoke) if args.smoke else (lambda smoke, full: full)
    if args.cpu_warmup is None:
        args.cpu_warmup = smoke_or_full(0, 1)
    if args.cpu_reps is None:
        args.cpu_reps = smoke_or_full(2, 5)
    if args.input_sets is None:
        args.input_sets = smoke_or_full(2, 0)
    return args


def sweep_config(args: argparse.Namespace) -> dict:
    """The sweep's axes: the full (or smoke) defaults narrowed by the flags; validates them."""
    config = dict(SMOKE_SWEEP if args.smoke else FULL_SWEEP)
    if args.losses:
        unknown = sorted(set(args.losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"--losses: unknown {unknown}; choose from {list(LOSSES)}")
        config["losses"] = tuple(args.losses)
    if args.dtypes:
        dtypes = tuple(DTYPE_ALIASES.get(d, d) for d in args.dtypes)
        unknown = sorted(set(dtypes) - set(DTYPES))
        if unknown:
            raise ValueError(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
        config["dtypes"] = dtypes
    if args.modes:
        unknown = sorted(set(args.modes) - set(MODES))
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; choose from {list(MODES)}")
        config["modes"] = tuple(args.modes)
    if args.batch:
        config["batch"] = _ints(args.batch)
    if args.classes:
        config["classes"] = _ints(args.classes)
    if args.dim:
        config["dim"] = args.dim
    if args.sample_rates:
        rates = tuple(float(r) for r in args.sample_rates)
        if any(not 0 < r <= 1 for r in rates):
            raise ValueError(f"--sample-rates must lie in (0, 1], got {rates}")
        config["sample_rates"] = rates
    if min(config["batch"]) < 1 or min(config["classes"]) < 2 or config["dim"] < 1:
        raise ValueError("--batch, --classes and --dim must be positive (C >= 2)")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if args.compile_backend is None:
        # inductor's first CPU compile costs ~25 s; aot_eager keeps the smoke run's wiring
        # check fast (CPU timings mean nothing anyway)
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.rotate_mb is None:
        l2_bytes = (
            torch.cuda.get_device_properties(device).L2_cache_size
            if device.type == "cuda"
            else 16 * 2**20
        )
        args.rotate_mb = 4 * l2_bytes / 2**20
    providers = all_providers(args.compile_backend)
    if args.list:
        for provider in providers.values():
            print(f"{provider.name:14s} {provider.description}")
        return 0
    if args.providers:
        unknown = sorted(set(args.providers) - set(providers))
        if unknown:
            raise ValueError(f"--providers: unknown {unknown}; choose from {list(providers)}")
        providers = {n: p for n, p in providers.items() if n in args.providers}
    elif args.smoke:
        # inductor or not, compiling every smoke case would dominate CI's time
        del providers["torch-compile"]
        print("--smoke leaves torch-compile out; name it in --providers to include it")
    config = sweep_config(args)
    if device.type == "cpu" and not args.smoke:
        print("note: CPU timings use perf_counter and record no memory (peak_extra_mb = nan)")
    path = sweep(config, providers, device, args)
    print(f"results appended to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:  # bad command line: the message, not a traceback
        sys.exit(f"error: {exc}")
