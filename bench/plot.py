"""Figures and markdown tables from the benchmark CSVs written by bench/run.py.

    python bench/plot.py bench/results/nvidia-h100-80gb-hbm3.csv --out bench/results/plots
    python bench/plot.py bench/results/*.csv --table                  # markdown on stdout
    python bench/plot.py out/bench/*.csv --table --metric memory --table-out table.md

Figures: one PNG per (device, B, D, Partial-FC rate) and metric (time, memory), log-log against
C, one panel per loss x dtype x mode, one line per provider, the bare GEMMs dashed. Tables: one
per (device, B, D, dtype, mode, rate), rows (loss, C), one column per provider. When a CSV holds
the same measurement twice (a re-run appended), the later row wins. Needs matplotlib, and
torch and margin_kernels for the harness's names (provider order, file-name slugs).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness import slug, split_values
from providers import GEMM_PROVIDER, LOSSES, MODES, all_providers

# Fixed order (and so fixed colours) of the providers the harness knows, the bare GEMMs last;
# unknown ones go after them.
PROVIDER_ORDER = (
    *(name for name in all_providers("inductor") if name != GEMM_PROVIDER),
    GEMM_PROVIDER,
)
LOSS_ORDER = tuple(LOSSES)
MODE_ORDER = MODES
METRICS = {
    # name: (column, axis label, table caption)
    "time": ("time_ms", "median time (ms)", "median ms (time / bare GEMMs)"),
    "memory": ("peak_extra_mb", "peak extra memory (MiB)", "peak extra MiB"),
    "tflops": ("tflops", "effective TFLOP/s", "effective TFLOP/s"),
    "vs_gemm": ("vs_gemm", "time / bare GEMMs", "time / bare GEMMs"),
}
# What identifies one measurement; a later row with the same key replaces an earlier one.
KEY = ("device", "provider", "loss", "dtype", "mode", "batch", "classes", "dim", "sample_rate")


def load_rows(paths: Iterable[Path]) -> list[dict[str, str]]:
    """Rows of every CSV, later duplicates replacing earlier ones (file order kept)."""
    latest: dict[tuple[str, ...], dict[str, str]] = {}
    for path in paths:
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(KEY) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not a bench/run.py CSV (missing {sorted(missing)})")
            for row in reader:
                key = tuple(row[k] for k in KEY)
                latest.pop(key, None)
                latest[key] = row
    return list(latest.values())


def number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    known = [v for v in preferred if v in values]
    return known + sorted(values - set(known))


def _rate_label(rate: str) -> str:
    return "all classes" if number(rate) >= 1 else f"Partial FC r={number(rate):g}"


def select(rows: list[dict[str, str]], args: argparse.Namespace) -> list[dict[str, str]]:
    """Rows matching the command line's filters (each None = no filter)."""
    filters = {
        "batch": args.batch,
        "dtype": args.dtypes,
        "mode": args.modes,
        "loss": args.losses,
        "provider": args.providers,
    }
    kept = []
    for row in rows:
        if any(allowed and row[col] not in allowed for col, allowed in filters.items()):
            continue
        if args.sample_rates and number(row["sample_rate"]) not in args.sample_rates:
            continue
        kept.append(row)
    return kept


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, str]], out_dir: Path) -> list[Path]:
    """Write the time and memory figures; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    providers = _order({r["provider"] for r in rows}, PROVIDER_ORDER)
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    written = []
    groups = sorted({(r["device"], r["batch"], r["dim"], r["sample_rate"]) for r in rows})
    for device, batch, dim, rate in groups:
        group = [
            r
            for r in rows
            if (r["device"], r["batch"], r["dim"], r["sample_rate"]) == (device, batch, dim, rate)
        ]
        losses = _order({r["loss"] for r in group if r["provider"] != GEMM_PROVIDER}, LOSS_ORDER)
        columns = [
            (dtype, mode)
            for dtype in sorted({r["dtype"] for r in group})
            for mode in _order({r["mode"] for r in group}, MODE_ORDER)
        ]
        if not losses or not columns:
            continue
        for metric in ("time", "memory"):
            column, label, _ = METRICS[metric]
            cpu_memory = metric == "memory" and device.startswith("cpu")
            empty_text = "not measured on CPU" if cpu_memory else "no data"
            fig, axes = plt.subplots(
                len(losses),
                len(columns),
                figsize=(3.6 * len(columns), 2.9 * len(losses)),
                squeeze=False,
                sharex=True,
            )
            for i, loss in enumerate(losses):
                for j, (dtype, mode) in enumerate(columns):
                    ax = axes[i][j]
                    panel = [
                        r
                        for r in group
                        if r["dtype"] == dtype
                        and r["mode"] == mode
                        and (r["loss"] == loss or r["provider"] == GEMM_PROVIDER)
                    ]
                    drawn = _draw_panel(ax, panel, column, providers, colours)
                    ax.set_title(f"{loss} · {dtype} · {mode}", fontsize=9)
                    if i == len(losses) - 1:
                        ax.set_xlabel("classes C")
                    if j == 0:
                        ax.set_ylabel(label, fontsize=8)
                    if not drawn:
                        ax.text(
                            0.5,
                            0.5,
                            empty_text,
                            ha="center",
                            va="center",
                            transform=ax.transAxes,
                            color="grey",
                        )
            handles = {
                text: handle
                for ax in axes.flat
                for handle, text in zip(*ax.get_legend_handles_labels(), strict=True)
            }
            if handles:
                fig.legend(
                    handles.values(),
                    handles.keys(),
                    loc="lower center",
                    ncol=min(len(handles), 5),
                    fontsize=8,
                    frameon=False,
                )
            fig.suptitle(f"{device} · B={batch} · D={dim} · {_rate_label(rate)} · {label}")
            # fixed margins: tight_layout costs seconds per figure on log axes
            fig.subplots_adjust(
                left=0.08, right=0.98, bottom=0.12, top=0.9, hspace=0.45, wspace=0.3
            )
            rate_tag = f"r{number(rate):g}".replace(".", "p")
            path = out_dir / f"{metric}_{slug(device)}_B{batch}_D{dim}_{rate_tag}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _draw_panel(ax, panel, column, providers, colours) -> bool:
    """One line per provider over C (ok rows with a finite positive value); True if any."""
    drawn = False
    for provider in providers:
        points = sorted(
            (number(r["classes"]), number(r[column]))
            for r in panel
            if r["provider"] == provider and r["status"] == "ok"
        )
        points = [(c, v) for c, v in points if v > 0 and math.isfinite(v)]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        gemm = provider == GEMM_PROVIDER
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3,
            linewidth=1.2,
            label=provider,
            color="black" if gemm else colours[provider],
            linestyle="--" if gemm else "-",
        )
        drawn = True
    ax.set_xscale("log")
    if drawn:
        ax.set_yscale("log")
    ax.grid(True, which="major", linewidth=0.3, alpha=0.5)
    return drawn


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _cell(row: dict[str, str] | None, metric: str) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    value = number(row[METRICS[metric][0]])
    if not math.isfinite(value):
        return "n/a"
    text = _short(value)
    ratio = number(row["vs_gemm"])
    if metric == "time" and row["provider"] != GEMM_PROVIDER and math.isfinite(ratio):
        text += f" ({_short(ratio)}x)"
    return text


def _short(value: float) -> str:
    """Three significant digits without exponents: 0.0123, 1.23, 123, 12,345."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def markdown_tables(rows: list[dict[str, str]], metric: str = "time") -> str:
    """Markdown: one table per (device, B, D, dtype, mode, rate); rows (loss, C), a column per
    provider (the bare GEMMs last). Cells: the metric, OOM, ERROR, or - (not run)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    lines = []
    group_keys = ("device", "batch", "dim", "dtype", "mode", "sample_rate")
    groups = sorted(
        {tuple(r[k] for k in group_keys) for r in rows},
        key=lambda g: (
            g[0],
            int(g[1]),
            int(g[2]),
            g[3],
            MODE_ORDER.index(g[4]) if g[4] in MODE_ORDER else 9,
            -number(g[5]),
        ),
    )
    for group in groups:
        device, batch, dim, dtype, mode, rate = group
        sub = [r for r in rows if tuple(r[k] for k in group_keys) == group]
        providers = _order({r["provider"] for r in sub}, PROVIDER_ORDER)
        losses = _order({r["loss"] for r in sub if r["provider"] != GEMM_PROVIDER}, LOSS_ORDER)
        classes = sorted({int(r["classes"]) for r in sub})
        lookup = {(r["provider"], r["loss"], int(r["classes"])): r for r in sub}
        gemm = {int(r["classes"]): r for r in sub if r["provider"] == GEMM_PROVIDER}
        lines.append(
            f"#### {device} · B={batch} · D={dim} · {dtype} · {mode} · {_rate_label(rate)} "
            f"— {METRICS[metric][2]}"
        )
        lines.append("")
        lines.append("| loss | C | " + " | ".join(providers) + " |")
        lines.append("|---|---:|" + "---:|" * len(providers))
        for loss in losses:
            for c in classes:
                cells = [
                    _cell(gemm.get(c) if p == GEMM_PROVIDER else lookup.get((p, loss, c)), metric)
                    for p in providers
                ]
                if all(cell == "-" for cell in cells):
                    continue
                lines.append(f"| {loss} | {c:,} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", nargs="+", type=Path, help="CSV files written by bench/run.py")
    parser.add_argument("--out", type=Path, default=None, help="directory of the PNGs")
    parser.add_argument("--table", action="store_true", help="print markdown tables")
    parser.add_argument("--table-out", type=Path, default=None, help="write the tables here")
    parser.add_argument("--metric", default="time", choices=list(METRICS), help="table metric")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    multi = {"nargs": "+", "default": None}
    parser.add_argument("--batch", **multi)
    parser.add_argument("--dtypes", **multi)
    parser.add_argument("--modes", **multi)
    parser.add_argument("--losses", **multi)
    parser.add_argument("--providers", **multi)
    parser.add_argument("--sample-rates", **multi)
    args = parser.parse_args(argv)
    for name in ("batch", "dtypes", "modes", "losses", "providers", "sample_rates"):
        setattr(args, name, split_values(getattr(args, name)))
    if args.sample_rates:
        args.sample_rates = [float(r) for r in args.sample_rates]

    rows = select(load_rows(args.csv), args)
    if not rows:
        print("no rows match", file=sys.stderr)
        return 1
    if not args.no_plots:
        out_dir = args.out or args.csv[0].parent / "plots"
        for path in plot(rows, out_dir):
            print(f"wrote {path}")
    if args.table or args.table_out:
        text = markdown_tables(rows, args.metric)
        if args.table_out:
            args.table_out.parent.mkdir(parents=True, exist_ok=True)
            args.table_out.write_text(text)
            print(f"wrote {args.table_out}")
        if args.table:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
