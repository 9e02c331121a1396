"""The package as users get it: the sdist holds what a build needs, a wheel built from it carries
the extension with its build record and imports from outside the source tree, a package built
without the extension (or for another torch) says so and how to fix it, ``import margin_kernels``
loads nothing beyond torch and Triton, and the metadata (version, license, typing) has one source.

The sdist -> wheel test compiles the extension for sm_90 only (about 70 s on an idle 2-core
machine) wherever it can be compiled (CUDA torch + nvcc), and forces the build so that a broken
sdist fails instead of silently producing a pure-Python wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest
import torch

import margin_kernels as mk
from margin_kernels import _extension
from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.ops import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILDABLE = (
    torch.version.cuda is not None
    and shutil.which("nvcc") is not None
    and os.environ.get("MARGIN_KERNELS_SKIP_CUDA_BUILD", "") in ("", "0")
)
needs_build = pytest.mark.skipif(
    importlib.util.find_spec("build") is None,
    reason="the `build` package is not installed (pip install build; `make test` installs it)",
)

# Imported from outside the source tree: what the wheel's margin_kernels reports.
PROBE = """
import json, sys, torch
import margin_kernels as mk
from margin_kernels import _extension
from margin_kernels.ops import cuda
spec = mk.MarginSpec.cosface()
ops = torch.ops.margin_kernels
report = {
    "file": mk.__file__,
    "version": mk.__version__,
    "has_ext": _extension.HAS_CUDA_EXT,
    "load_error": _extension.LOAD_ERROR,
    "build_info": _extension.build_info(),
    "ops": [n for n in ("margin_lse_fwd", "margin_lse_bwd") if hasattr(ops, n)],
    "cuda_reason": cuda.unavailable_reason(torch.device("cuda"), spec),
    "demo_importable": __import__("importlib").util.find_spec("demo") is not None,
}
if _extension.HAS_CUDA_EXT:  # the compiled CPU twin of the epilogues against the reference
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    y = torch.tensor([0, 3, 8, 1, 2, 5])
    got = cuda._chunked_lse_parts(x, w, y, spec)
    want = mk.reference.lse_parts(x, w, y, spec)
    report["twin_error"] = max(float((a - b).abs().max()) for a, b in zip(got, want))
print(json.dumps(report))
"""


def _run(args: list[str], cwd: pathlib.Path, timeout: int, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARGIN_KERNELS_")}
    base.pop("PYTHONPATH", None)
    run = subprocess.run(
        args, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, f"{args} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _wheel_from(sdist: pathlib.Path, out: pathlib.Path, **env: str) -> pathlib.Path:
    pip = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    _run([*pip, "-w", str(out), str(sdist)], out.parent, timeout=1800, **env)
    (wheel,) = out.glob("margin_kernels-*.whl")
    return wheel


def _install(wheel: pathlib.Path, target: pathlib.Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip, "--target", str(target), str(wheel)], target.parent, timeout=600)


def _probe(target: pathlib.Path, cwd: pathlib.Path) -> dict:
    """Imports the installed copy in a fresh interpreter whose cwd is outside the source tree."""
    return json.loads(_run([sys.executable, "-c", PROBE], cwd, timeout=300, PYTHONPATH=str(target)))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("sdist")
    build = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)]
    _run([*build, str(ROOT)], ROOT, timeout=600, MARGIN_KERNELS_SKIP_CUDA_BUILD="1")
    (archive,) = out.glob("margin_kernels-*.tar.gz")
    return archive


@needs_build
def test_sdist_holds_what_a_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir()}
    assert {n for n in csrc if n.endswith((".h", ".cpp", ".cu"))} <= names
    expected = {"LICENSE", "setup.py", "pyproject.toml", "README.md", "CHANGELOG.md"}
    expected |= {"margin_kernels/py.typed", "margin_kernels/_version.py", "docs/design.md"}
    expected |= {"demo/__main__.py", "demo/run.py", "demo/data.py", "tests/test_packaging.py"}
    assert expected <= names
    # Build outputs never travel as source: the next build writes its own.
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_build_info.py")]


@needs_build
def test_wheel_from_sdist_imports_extension_outside_source_tree(sdist, tmp_path):
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "2"}
    if BUILDABLE:
        env["MARGIN_KERNELS_FORCE_CUDA_BUILD"] = "1"
    wheel = _wheel_from(sdist, tmp_path / "wheels", **env)
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
    assert all(n.startswith(("margin_kernels/", "margin_kernels-")) for n in members), members
    assert "margin_kernels/py.typed" in members
    assert any(n.endswith("licenses/LICENSE") for n in members)
    assert any(re.fullmatch(r"margin_kernels/_C\..*\.so", n) for n in members) == BUILDABLE

    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    _install(wheel, target)
    report = _probe(target, elsewhere)
    assert pathlib.Path(report["file"]).is_relative_to(target)
    assert report["version"] == mk.__version__
    assert not report["demo_importable"]
    info = report["build_info"]
    assert info["EXTENSION_BUILT"] is BUILDABLE
    assert report["has_ext"] is BUILDABLE, report["load_error"]
    if not BUILDABLE:
        assert "circular import" not in report["cuda_reason"]
        assert "built without its compiled CUDA extension" in report["cuda_reason"]
        return
    assert info["TORCH_VERSION"] == torch.__version__
    assert info["TORCH_CUDA_VERSION"] == torch.version.cuda
    assert info["SASS_ARCHS"] == ["sm_90"] and info["PTX_ARCHS"] == []
    assert report["ops"] == ["margin_lse_fwd", "margin_lse_bwd"]
    assert report["twin_error"] < 1e-4

    # The same wheel as if built against another torch: not loaded, both versions named.
    record = target / "margin_kernels" / "_build_info.py"
    record.write_text(record.read_text().replace(repr(torch.__version__), "'2.11.0+cu999'"))
    for cached in target.glob("margin_kernels/__pycache__/_build_info.*"):
        cached.unlink()  # pip compiled the original; its cache could outlive the edit
    report = _probe(target, elsewhere)
    assert report["has_ext"] is False and report["ops"] == []
    assert "2.11.0+cu999" in report["load_error"] and torch.__version__ in report["load_error"]
    assert "--no-build-isolation" in report["cuda_reason"]


@needs_build
def test_wheel_without_extension_says_why_and_how_to_rebuild(sdist, tmp_path):
    wheel = _wheel_from(sdist, tmp_path / "wheels", MARGIN_KERNELS_SKIP_CUDA_BUILD="1")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".so")]
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    _install(wheel, target)
    report = _probe(target, elsewhere)
    assert report["has_ext"] is False
    assert report["build_info"] == {
        "EXTENSION_BUILT": False,
        "SKIP_REASON": "MARGIN_KERNELS_SKIP_CUDA_BUILD is set",
    }
    reason = report["cuda_reason"]
    assert "built without its compiled CUDA extension" in reason
    assert "MARGIN_KERNELS_SKIP_CUDA_BUILD is set" in reason
    assert "circular import" not in reason and "--no-build-isolation" in reason


def test_first_cuda_tensor_warns_once_when_extension_unusable(monkeypatch):
    problem = "this margin_kernels was built without its compiled CUDA extension (test)"
    monkeypatch.setattr(_extension, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", problem)
    monkeypatch.setattr(_extension, "_warned", set())
    spec = mk.MarginSpec.cosface()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve("torch", torch.device("cpu"), spec)
        assert caught == []  # CPU tensors never need the extension
        resolve("torch", torch.device("cuda"), spec)
        resolve("auto", torch.device("cuda"), spec)
    assert len(caught) == 1
    assert issubclass(caught[0].category, _extension.ExtensionWarning)
    text = str(caught[0].message)
    assert problem in text and "--no-build-isolation" in text and "TORCH_CUDA_ARCH_LIST" in text


def test_missing_extension_message_is_accurate(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "BUILD_INFO", None)
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(tmp_path))  # a package without _C
    loaded, why = _extension._load()
    assert not loaded
    assert "not in this installation" in why and "circular" not in why


def test_torch_mismatch_names_both_versions():
    built = {"TORCH_VERSION": "2.11.0+cu130", "TORCH_CUDA_VERSION": "13.0"}
    text = _extension._torch_mismatch(built)
    if (torch.__version__, torch.version.cuda) == ("2.11.0+cu130", "13.0"):
        assert text is None
    else:
        assert "2.11.0+cu130" in text and torch.__version__ in text
    same = {"TORCH_VERSION": torch.__version__, "TORCH_CUDA_VERSION": torch.version.cuda}
    assert _extension._torch_mismatch(same) is None


@pytest.mark.parametrize(
    ("capability", "sass", "ptx", "runs"),
    [
        ((9, 0), ["sm_90"], [], True),
        ((10, 0), ["sm_90"], [], False),  # machine code does not cross major versions
        ((8, 9), ["sm_80"], [], True),  # ... but runs on a later minor of the same major
        ((8, 0), ["sm_86"], [], False),
        ((10, 0), ["sm_90"], ["compute_90"], True),  # PTX is compiled by the driver
        ((8, 0), [], ["compute_90"], False),
        ((9, 0), ["sm_90a"], [], True),
        ((10, 0), [], ["compute_90a"], False),  # architecture-specific: exactly 9.0
    ],
)
def test_arch_compatibility(capability, sass, ptx, runs):
    assert _extension.runs_on(capability, sass, ptx) is runs


def test_arch_reason_names_gpu_and_fix(monkeypatch):
    monkeypatch.setattr(_extension, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(_extension, "BUILD_INFO", {"SASS_ARCHS": ["sm_90"], "PTX_ARCHS": []})
    monkeypatch.setattr(_extension, "_CAPABILITIES", {0: (10, 0), 1: (9, 0)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    text = _extension.arch_reason(torch.device("cuda:0"))
    assert "sm_90" in text and "sm_100" in text and "TORCH_CUDA_ARCH_LIST=10.0" in text
    assert _extension.arch_reason(torch.device("cuda:1")) is None
    assert _extension.arch_reason(torch.device("cpu")) is None
    monkeypatch.setattr(cuda_backend, "HAS_CUDA_EXT", True)
    spec = mk.MarginSpec.cosface()
    assert cuda_backend.unavailable_reason(torch.device("cuda:0"), spec) == text


def test_import_loads_only_torch_and_triton():
    probe = """
import json, sys
import torch
try:
    import triton, triton.language
except ImportError:
    pass
before = set(sys.modules)
import margin_kernels
new = {name.split(".")[0] for name in set(sys.modules) - before}
print(json.dumps({"new": sorted(new)}))
"""
    out = _run([sys.executable, "-c", probe], ROOT, timeout=300, PYTHONPATH=str(ROOT))
    report = json.loads(out)
    third_party = set(report["new"]) - set(sys.stdlib_module_names) - {"margin_kernels"}
    assert third_party == set(), third_party
    # Named explicitly, though covered above (torch loads numpy and Triton loads tqdm themselves).
    demo_deps = {"numpy", "matplotlib", "sklearn", "tqdm", "PIL", "scipy", "demo", "mlxtend"}
    assert demo_deps.isdisjoint(report["new"])


def test_demo_runs_as_top_level_package():
    out = _run([sys.executable, "-m", "demo", "--help"], ROOT, timeout=300, PYTHONPATH=str(ROOT))
    assert out.startswith("usage: python -m demo")
    out = _run([sys.executable, "-m", "demo.data", "--help"], ROOT, 300, PYTHONPATH=str(ROOT))
    assert out.startswith("usage: python -m demo.data")
    assert not (ROOT / "margin_kernels" / "demo.py").exists()
    assert not (ROOT / "margin_kernels" / "data.py").exists()


def test_metadata_has_one_source():
    import tomllib  # stdlib from Python 3.11, which pyproject.toml requires

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert dynamic["dynamic"]["version"] == {"attr": "margin_kernels._version.__version__"}
    namespace: dict = {}
    exec((ROOT / "margin_kernels" / "_version.py").read_text(), namespace)
    assert mk.__version__ == namespace["__version__"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", mk.__version__)
    assert f"## [{mk.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
    # SPDX expression (PEP 639), not the deprecated {text = ...} table
    assert project["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "margin_kernels" / "py.typed").exists()
    assert set(project["optional-dependencies"]["demo"]) >= {"numpy", "matplotlib"}
    assert "Typing :: Typed" in project["classifiers"]
