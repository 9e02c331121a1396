"""Download the benchmark peers' wheels for a GPU machine without network, and check them.

    python bench/wheels.py                  # -> .whl/ (git-ignored)
    # on the GPU machine:
    pip install --no-deps .whl/*.whl

The peers (pytorch-metric-learning, cut-cross-entropy, liger-kernel) and tqdm ship pure-Python
wheels; ``--no-deps`` keeps pip from pulling a second torch or triton. Every downloaded wheel is
checked to be pure Python (tag ``py3-none-any`` and ``Root-Is-Purelib: true``), so it installs
on the GPU machine's Python whatever this machine's is. pytorch-metric-learning also imports
numpy and scipy, which are not pure Python; when the GPU machine lacks them, the harness skips
that peer with the import error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

PEERS = ("pytorch-metric-learning", "cut-cross-entropy", "liger-kernel", "tqdm")
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".whl"


def impure_reason(wheel: Path) -> str | None:
    """Why ``wheel`` is not a pure-Python wheel (None when it is)."""
    # name-version(-build)?-python-abi-platform.whl
    parts = wheel.name[: -len(".whl")].split("-")
    if not wheel.name.endswith(".whl") or len(parts) < 5:
        return f"{wheel.name} is not a wheel file name"
    abi, platform = parts[-2], parts[-1]
    if abi != "none" or platform != "any":
        return f"{wheel.name} is built for abi {abi!r} on platform {platform!r}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(".dist-info/WHEEL")]
            if not names:
                return f"{wheel.name} has no .dist-info/WHEEL"
            metadata = archive.read(names[0]).decode()
            compiled = [n for n in archive.namelist() if n.endswith((".so", ".pyd", ".dylib"))]
    except zipfile.BadZipFile:
        return f"{wheel.name} is not a zip archive"
    if "Root-Is-Purelib: true" not in metadata:
        return f"{wheel.name} does not declare Root-Is-Purelib: true"
    if compiled:
        return f"{wheel.name} contains compiled files ({compiled[0]})"
    return None


def download(packages: Sequence[str], dest: Path) -> None:
    """``pip download --no-deps --only-binary=:all:`` of ``packages`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*command, "--dest", str(dest), *packages], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    parser.add_argument("--check-only", action="store_true", help="check what is in --dest")
    parser.add_argument("packages", nargs="*", default=list(PEERS))
    args = parser.parse_args(argv)
    if not args.check_only:
        download(args.packages, args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.dest}", file=sys.stderr)
        return 1
    problems = [reason for wheel in wheels if (reason := impure_reason(wheel))]
    for wheel in wheels:
        print(f"{wheel.name}: {'pure Python' if impure_reason(wheel) is None else 'NOT pure'}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
