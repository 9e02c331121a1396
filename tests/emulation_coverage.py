"""Line coverage of the CUDA kernels' source by the CPU suite (``make coverage``; not in CI).

Builds the emulated kernels (tests/cuda_emulation.py) unoptimised with gcov instrumentation,
runs the suite's emulation tests, and prints ``csrc kernel lines executed: X/Y (Z%)`` over the
files that hold device code: ``csrc/epilogue_kernels.cuh`` (the kernels, their launchers and
dispatch) and ``csrc/margin_math.h`` (the per-element math they call). Lines that only nvcc
compiles (the ``__CUDACC__`` side of an ``#if``) are not executable in the host build; they are
listed as excluded. ``--markdown PATH`` writes the report (docs/coverage.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from cuda_emulation import COVERAGE_DIR, COVERAGE_ENV, CSRC, SOURCE  # noqa: E402

KERNEL_FILES = ("epilogue_kernels.cuh", "margin_math.h")
# Reported on their own: the emulated execution layer and the C ABI (host-only code).
HOST_FILES = ("exec.h", "host/emulated_kernels.cpp")
DEFAULT_TESTS = ("tests/test_cuda_emulation.py",)
_LINE = re.compile(r"^\s*([^:]+):\s*(\d+):")


def run_tests(tests: list[str]) -> int:
    shutil.rmtree(COVERAGE_DIR, ignore_errors=True)
    env = dict(os.environ, **{COVERAGE_ENV: "1", "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def gcov_lines() -> dict[str, dict[int, bool]]:
    """{source path relative to csrc: {line: executed}} over the executable lines (the
    instantiations of a template line merged: executed when any ran)."""
    subprocess.run(
        ["gcov", "-p", "-o", str(COVERAGE_DIR), str(SOURCE)],
        cwd=COVERAGE_DIR,
        check=True,
        capture_output=True,
    )
    result: dict[str, dict[int, bool]] = {}
    for report in COVERAGE_DIR.glob("*.gcov"):
        lines = report.read_text(errors="replace").splitlines()
        source = lines[0].split("Source:", 1)[-1].strip() if lines else ""
        path = Path(source)
        if not path.is_absolute():
            path = (COVERAGE_DIR / path).resolve()
        try:
            rel = path.resolve().relative_to(CSRC).as_posix()
        except ValueError:
            continue  # a system header
        counts = result.setdefault(rel, {})
        for line in lines:
            m = _LINE.match(line)
            if not m or m.group(1).strip() == "-":
                continue
            number = int(m.group(2))
            if number == 0:
                continue
            count = m.group(1).strip().rstrip("*")
            executed = count not in ("#####", "=====", "$$$$$", "%%%%%")
            counts[number] = counts.get(number, False) or executed
    return result


def device_only_ranges(path: Path) -> list[tuple[int, int]]:
    """Line ranges of the ``#if defined(__CUDACC__)`` branches (to their #else or #endif)."""
    ranges, stack = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#if"):
            stack.append((number, "__CUDACC__" in stripped and "!" not in stripped))
        elif stripped.startswith(("#else", "#elif", "#endif")) and stack:
            start, device = stack.pop()
            if device:
                ranges.append((start, number))
            if not stripped.startswith("#endif"):
                stack.append((number, False))
    return ranges


def summarize(lines: dict[str, dict[int, bool]], files) -> tuple[int, int]:
    executed = sum(sum(lines.get(f, {}).values()) for f in files)
    total = sum(len(lines.get(f, {})) for f in files)
    return executed, total


def markdown(lines: dict[str, dict[int, bool]], tests: list[str]) -> str:
    executed, total = summarize(lines, KERNEL_FILES)
    out = [
        "# Coverage of the CUDA kernels' source by the CPU suite",
        "",
        "Written by `make coverage` (tests/emulation_coverage.py): the kernels of "
        "`csrc/epilogue_kernels.cuh` compiled by g++ over the emulated execution layer of "
        "`csrc/exec.h` with `-O0 --coverage`, run by " + ", ".join(f"`{t}`" for t in tests) + "; "
        "gcov line counts, every template instantiation of a line merged (a line counts as "
        "executed when any instantiation ran it).",
        "",
        "Before the execution layer (issue 21): 0 of the 459 code lines of "
        "`csrc/margin_epilogue.cu` ran in any test (its kernels were only compiled by nvcc).",
        "",
        f"**csrc kernel lines executed: {executed}/{total} "
        f"({100.0 * executed / max(1, total):.1f}%)** over " + ", ".join(KERNEL_FILES) + ".",
        "",
        "| file | executed | executable lines | % | lines never executed |",
        "|---|---:|---:|---:|---|",
    ]
    for f in (*KERNEL_FILES, *HOST_FILES):
        counts = lines.get(f, {})
        missed = sorted(n for n, ran in counts.items() if not ran)
        done = sum(counts.values())
        pct = 100.0 * done / max(1, len(counts))
        role = "" if f in KERNEL_FILES else " (host emulation, not counted)"
        missed_text = ", ".join(map(str, missed)) if missed else "none"
        out.append(f"| `csrc/{f}`{role} | {done} | {len(counts)} | {pct:.1f} | {missed_text} |")
    out += [
        "",
        "Excluded (compiled by nvcc only, so not executable in the host build): the "
        "`__CUDACC__` branches",
        "",
    ]
    for f in ("exec.h", *KERNEL_FILES):
        for start, end in device_only_ranges(CSRC / f):
            out.append(f"- `csrc/{f}` lines {start}-{end}")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument(
        "--report-only", action="store_true", help="report the counts of the last run"
    )
    parser.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS))
    args = parser.parse_args(argv)
    code = 0 if args.report_only else run_tests(args.tests)
    if code != 0:
        print(f"the tests failed (exit {code}); coverage below is of that run")
    lines = gcov_lines()
    for f in (*KERNEL_FILES, *HOST_FILES):
        done, total = summarize(lines, (f,))
        print(f"  csrc/{f}: {done}/{total}")
    executed, total = summarize(lines, KERNEL_FILES)
    print(
        f"csrc kernel lines executed: {executed}/{total} ({100.0 * executed / max(1, total):.1f}%)"
    )
    if args.markdown:
        args.markdown.write_text(markdown(lines, args.tests))
        print(f"wrote {args.markdown}")
    return code


if __name__ == "__main__":
    sys.exit(main())
