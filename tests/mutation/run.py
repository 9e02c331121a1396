"""Mutation check: do the tests fail when the code is wrong?

``make mutation`` (or ``python tests/mutation/run.py``) applies each plausible bug of
``tests/mutation/mutations.py`` in turn to a temporary copy of the repository (the files git
tracks plus untracked, non-ignored ones, and the built extension ``margin_kernels/_C*.so``; the
real tree is never modified), runs that mutation's test files with ``pytest -x`` under
``TRITON_INTERPRET=1``, and records whether a test failed (KILLED, and by which test) or all
passed (SURVIVED). It writes ``tests/mutation/REPORT.md``.

Two suites can be compared: ``new`` (the tests of this tree) and ``old`` (the tests/ directory
of the git revision given by ``--old-tests-rev``, run against this tree's code). Before the
mutations, each suite's files are run once unmutated; tests that already fail there (for example
tests of features another branch adds) are deselected in the mutation runs and listed in the
report, so they cannot count as kills; files that fail to import (an old suite's tests of a
module that has moved) are left out of the mutation runs and listed.

Mutations of the CUDA kernels' source (``csrc/epilogue_kernels.cuh``) need no extension
rebuild: the copy leaves out the ignored ``build/``, so tests/test_cuda_emulation.py compiles the
emulated kernels from the copy's mutated csrc/ (g++, seconds) the first time it runs there.

Per-mutation subsets of test files keep a run practical (the whole suite takes ~5 min on two
cores, and survivors run their whole subset): each mutation lists the files that exercise the
code it changes. A snippet not found exactly once is reported STALE and not run.

Not part of the CI run (``make test``): a full check takes tens of minutes on two cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutations import MUTATIONS, Mutation  # noqa: E402


@dataclass
class Outcome:
    status: str  # KILLED, SURVIVED, STALE, TIMEOUT, NO TESTS
    detail: str = ""
    seconds: float = 0.0


@dataclass
class SuiteResult:
    name: str
    source: str
    baseline_failures: list[str] = field(default_factory=list)
    broken_files: list[str] = field(default_factory=list)
    baseline_seconds: float = 0.0
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def _git(*args: str, capture: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=capture, check=True)
    return done.stdout.decode() if capture else ""


def copy_tree(dest: Path, tests_rev: str | None) -> None:
    """Copy the tracked and untracked non-ignored files plus the built extension into dest;
    with ``tests_rev`` the tests/ directory comes from that git revision instead."""
    listing = _git("ls-files", "-co", "--exclude-standard", "-z").split("\0")
    extension = [str(p.relative_to(ROOT)) for p in ROOT.glob("margin_kernels/_C*.so")]
    for rel in filter(None, listing + extension):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted but still tracked
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    if tests_rev is not None:
        shutil.rmtree(dest / "tests")
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", tests_rev, "tests"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _pytest(
    tree: Path, python: str, files: list[str], extra: list[str], timeout: float
) -> tuple[int | None, str, float]:
    """Run pytest in ``tree``; returns (exit code or None on timeout, output, seconds). The run
    is its own process group, so a timeout ends its children too (distributed workers)."""
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line"]
    cmd += [*extra, *files]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(tree))
    env.pop("PYTEST_ADDOPTS", None)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    return code, out.decode(errors="replace"), time.monotonic() - start


_CRASH_FRAME = re.compile(r'File "(?:.*/)?(tests/test_\w+\.py)", line \d+ in (test_\w+)')


def _first_failure(output: str) -> str:
    """The first failing test of a pytest -x run; for a crash (the interpreter killed by a
    signal, e.g. an out-of-bounds read) the test in the faulthandler traceback."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    crash = _CRASH_FRAME.search(output)
    if crash:
        return f"crashed in {crash.group(1)}::{crash.group(2)}"
    tail = [line for line in output.splitlines() if line.strip()]
    return tail[-1][:200] if tail else "(no output)"


def baseline(tree: Path, python: str, files: list[str], timeout: float):
    """Node ids of the tests that fail in ``files`` without any mutation, the files that fail
    to import (an old suite's tests of modules that have since moved), and the seconds."""
    report = tree / "baseline.xml"
    extra = [f"--junitxml={report}", "--continue-on-collection-errors"]
    code, output, seconds = _pytest(tree, python, files, extra, timeout)
    if code is None:
        raise SystemExit(f"baseline run timed out after {timeout:.0f} s")
    failing, broken = [], []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        if not case.get("classname"):  # a collection error: name is the module
            broken.append(case.get("name", "").replace(".", "/") + ".py")
            continue
        path = case.get("classname", "").replace(".", "/") + ".py"
        failing.append(f"{path}::{case.get('name')}")
    if code not in (0, 1):
        raise SystemExit(f"baseline run failed to run (exit {code}):\n{output[-3000:]}")
    return failing, broken, seconds


def apply(tree: Path, mutation: Mutation) -> str | None:
    """Apply the mutation's edits in ``tree``; returns None, or why it is stale."""
    path = tree / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    text = path.read_text()
    for original, replacement in mutation.edits:
        count = text.count(original)
        if count != 1:
            return f"snippet found {count} times: {original.splitlines()[0][:70]!r}"
        text = text.replace(original, replacement)
    path.write_text(text)
    return None


def run_suite(
    suite: SuiteResult,
    tree: Path,
    python: str,
    mutations: list[Mutation],
    timeout: float,
    on_progress=lambda: None,
) -> None:
    wanted = sorted({f for m in mutations for f in m.tests if (tree / f).is_file()})
    print(f"[{suite.name}] baseline over {len(wanted)} files ...", flush=True)
    suite.baseline_failures, suite.broken_files, suite.baseline_seconds = baseline(
        tree, python, wanted, timeout
    )
    deselect = [f"--deselect={node}" for node in suite.baseline_failures]
    for mutation in mutations:
        files = [f for f in mutation.tests if (tree / f).is_file() and f not in suite.broken_files]
        original = (tree / mutation.file).read_text() if (tree / mutation.file).is_file() else ""
        stale = apply(tree, mutation)
        if stale is not None:
            outcome = Outcome("STALE", stale)
        elif not files:
            outcome = Outcome("NO TESTS", "none of its test files is in this suite")
        else:
            code, output, seconds = _pytest(tree, python, files, ["-x", *deselect], timeout)
            if code is None:
                outcome = Outcome("TIMEOUT", f"over {timeout:.0f} s (counted as killed)", seconds)
            elif code == 0:
                outcome = Outcome("SURVIVED", "", seconds)
            elif code == 1:
                outcome = Outcome("KILLED", _first_failure(output), seconds)
            else:
                outcome = Outcome(
                    "KILLED", f"pytest exit {code}: {_first_failure(output)}", seconds
                )
        if original:
            (tree / mutation.file).write_text(original)
        suite.outcomes[mutation.id] = outcome
        print(f"[{suite.name}] {mutation.id}: {outcome.status} {outcome.detail}", flush=True)
        on_progress()


def tree_state() -> str:
    """The revision of the tree being copied, and whether it had uncommitted changes."""
    rev = _git("rev-parse", "--short", "HEAD").strip()
    return rev + (" (with uncommitted changes)" if _git("status", "--porcelain").strip() else "")


def write_report(
    path: Path, suites: list[SuiteResult], mutations: list[Mutation], args, state: str
) -> None:
    lines = [
        "# Mutation check",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on revision "
        f"{state}, `{' '.join(args)}` (pytest -x per mutation, TRITON_INTERPRET=1, the "
        "test files listed per mutation in tests/mutation/mutations.py).",
        "",
        "Suites: " + "; ".join(f"**{s.name}** = {s.source}" for s in suites) + ".",
        "",
    ]
    header = "| mutation | file | bug | " + " | ".join(s.name for s in suites) + " |"
    lines += [header, "|" + "---|" * (3 + len(suites))]
    for m in mutations:
        cells = []
        for s in suites:
            o = s.outcomes.get(m.id)
            if o is None:
                cells.append("not run")
                continue
            text = f"**{o.status}**"
            if o.detail:
                text += f" {o.detail.replace('|', '/')}"
            if o.seconds:
                text += f" ({o.seconds:.0f} s)"
            cells.append(text)
        bug = m.description.replace("|", "\\|")
        lines.append(f"| `{m.id}` | {m.file} | {bug} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in suites:
        survivors = [k for k, o in s.outcomes.items() if o.status == "SURVIVED"]
        stale = [k for k, o in s.outcomes.items() if o.status == "STALE"]
        lines.append(
            f"**{s.name}**: {len(survivors)} of {len(s.outcomes)} survived"
            + (f" ({', '.join(survivors)})" if survivors else "")
            + (f"; stale: {', '.join(stale)}" if stale else "")
            + f". Unmutated run of its files: {s.baseline_seconds:.0f} s, "
            + (
                f"{len(s.baseline_failures)} failing test(s), deselected in the mutation runs: "
                + ", ".join(f"`{n}`" for n in s.baseline_failures)
                if s.baseline_failures
                else "no failures"
            )
            + (
                "; not importable against this tree's code, left out: "
                + ", ".join(f"`{f}`" for f in s.broken_files)
                if s.broken_files
                else ""
            )
            + "."
        )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default="new", help="comma list of: new, old (default new)")
    parser.add_argument(
        "--old-tests-rev", default="main", help="git revision whose tests/ form the old suite"
    )
    parser.add_argument("--only", default="", help="comma list of mutation ids to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only.split(",")]
    if not chosen:
        parser.error(f"no mutation matches --only {args.only!r}")
    suites = []
    state = tree_state()  # before the report (an untracked file) is written
    for name in args.suites.split(","):
        if name not in ("new", "old"):
            parser.error(f"unknown suite {name!r}")
        source = "tests/ of this tree" if name == "new" else f"tests/ of `{args.old_tests_rev}`"
        suite = SuiteResult(name, source)
        suites.append(suite)

        def progress() -> None:  # the report so far, so that an interrupted run leaves one
            write_report(args.report, suites, chosen, sys.argv[1:] if argv is None else argv, state)

        with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
            tree = Path(tmp)
            copy_tree(tree, args.old_tests_rev if name == "old" else None)
            run_suite(suite, tree, args.python, chosen, args.timeout, progress)
    write_report(args.report, suites, chosen, sys.argv[1:] if argv is None else argv, state)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
