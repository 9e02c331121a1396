"""The open-set protocol (demo/openset.py): the split, the verification metrics on scores with
known answers, the verdict rule, and one tiny end-to-end run on sklearn's digits."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from demo import openset
from demo import run as demo
from demo.data import ImageDataset


def _dataset(train_per_class=5, test_per_class=3, classes=10):
    def split(per_class, offset):
        labels = torch.arange(classes).repeat_interleave(per_class)
        # each image's pixel value encodes (split, row) so that rows can be traced
        images = (offset + torch.arange(len(labels), dtype=torch.float32)).view(-1, 1, 1, 1)
        return images.expand(-1, 1, 2, 2).contiguous(), labels

    train_images, train_labels = split(train_per_class, 0)
    test_images, test_labels = split(test_per_class, 1000)
    names = tuple(f"c{k}" for k in range(classes))
    return ImageDataset("toy", train_images, train_labels, test_images, test_labels, names)


def test_split_keeps_unseen_classes_out_of_training():
    data = _dataset()
    split = openset.split_open_set(data)
    # training: only seen classes' training images, relabelled 0..5
    assert split.train.num_classes == 6
    assert split.train.class_names == tuple(f"c{k}" for k in openset.SEEN_CLASSES)
    assert sorted(split.train.train_labels.unique().tolist()) == [0, 1, 2, 3, 4, 5]
    seen_rows = torch.isin(data.train_labels, torch.tensor(openset.SEEN_CLASSES))
    torch.testing.assert_close(split.train.train_images, data.train_images[seen_rows])
    torch.testing.assert_close(split.train.train_labels, data.train_labels[seen_rows])
    # closed-set test: the seen classes' test images
    assert split.train.test_labels.numel() == 6 * 3
    # verification: the unseen classes' *test* images, original labels, none from training
    assert sorted(split.unseen_labels.unique().tolist()) == [6, 7, 8, 9]
    assert split.unseen_labels.numel() == 4 * 3
    assert (split.unseen_images >= 1000).all()
    train_values = set(split.train.train_images[:, 0, 0, 0].tolist())
    assert not train_values & set(split.unseen_images[:, 0, 0, 0].tolist())


def test_split_relabels_any_seen_set_and_rejects_overlap():
    data = _dataset()
    split = openset.split_open_set(data, seen=(7, 2), unseen=(0,))
    # rows keep their order (class 2's first); class 7 becomes label 0, class 2 label 1
    assert split.train.train_labels.tolist() == [1] * 5 + [0] * 5
    assert split.train.class_names == ("c7", "c2")
    with pytest.raises(ValueError, match="overlap"):
        openset.split_open_set(data, seen=(0, 1), unseen=(1, 2))


def test_pair_scores_are_cosines_of_every_pair():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    labels = torch.tensor([4, 4, 5])
    scores, genuine = openset.pair_scores(features, labels)
    torch.testing.assert_close(
        scores, torch.tensor([0.0, math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64)
    )
    assert genuine.tolist() == [True, False, False]


def _pairs(positives, negatives):
    scores = torch.tensor(positives + negatives, dtype=torch.float64)
    genuine = torch.tensor([True] * len(positives) + [False] * len(negatives))
    return scores, genuine


def test_roc_points_step_through_ties():
    scores, genuine = _pairs([0.9, 0.5], [0.5, 0.1])
    far, tar = openset.roc_points(scores, genuine)
    # the tie at 0.5 is accepted or rejected as a whole: no (0, 1) or (0.5, 0.5) point
    assert far.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tar.tolist() == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("positives", "negatives", "expected"),
    [
        ([0.9, 0.8], [0.2, 0.1], 0.0),  # separated
        ([0.9, 0.8, 0.7, 0.3], [0.6, 0.2, 0.1, 0.05], 0.25),  # FAR = FRR at a ROC point
        ([5.0, 3.0, 1.0], [4.0, 2.0], 0.5),  # crossing between two ROC points (interpolated)
        ([0.5, 0.5], [0.5, 0.5], 0.5),  # no information
        ([0.1, 0.2], [0.8, 0.9], 1.0),  # inverted
    ],
)
def test_equal_error_rate_exact(positives, negatives, expected):
    assert openset.equal_error_rate(*_pairs(positives, negatives)) == pytest.approx(expected)


def test_tar_at_far_exact():
    negatives = [k / 1000 for k in range(1000)]
    positives = [0.9995, 0.995, 0.9905, 0.985, 0.5]
    scores, genuine = _pairs(positives, negatives)
    # FAR <= 1e-2 admits the 10 highest negatives (0.990 .. 0.999): 3 of 5 positives pass
    assert openset.tar_at_far(scores, genuine, 1e-2) == pytest.approx(0.6)
    # FAR <= 1e-3 admits only 0.999: 1 of 5
    assert openset.tar_at_far(scores, genuine, 1e-3) == pytest.approx(0.2)
    # a positive tied with the highest negative cannot be accepted without it
    tied, flags = _pairs([0.999], negatives)
    assert openset.tar_at_far(tied, flags, 1e-3) == 1.0
    assert openset.tar_at_far(tied, flags, 5e-4) == 0.0


def test_best_threshold_prefers_highest_and_can_accept_none():
    scores, genuine = _pairs([0.9, 0.8, 0.3], [0.6, 0.1, 0.05])
    # accepting >= 0.8 and >= 0.3 both get 5 of 6 right: the higher threshold wins
    assert openset.best_threshold(scores, genuine) == 0.8
    scores, genuine = _pairs([0.1], [0.9, 0.8])
    assert openset.best_threshold(scores, genuine) == math.inf


def test_ten_fold_accuracy_picks_threshold_on_the_other_folds():
    # folds 1..9: genuine 0.9, impostor 0.1; fold 0: genuine 0.4, impostor 0.2
    scores = [0.4, 0.2] + [0.9, 0.1] * 9
    genuine = torch.tensor([True, False] * 10)
    folds = torch.arange(10).repeat_interleave(2)
    mean, per_fold = openset.ten_fold_accuracy(
        torch.tensor(scores, dtype=torch.float64), genuine, folds
    )
    # fold 0 held out: threshold 0.9 from folds 1..9 rejects its genuine pair -> 1/2; every
    # other fold: the threshold 0.4 (18 of 18 right) gets it all right. A threshold chosen on
    # all folds would give fold 0 full marks (mean 1.0).
    assert per_fold == [0.5] + [1.0] * 9
    assert mean == pytest.approx(0.95)


def test_balanced_folds_are_balanced():
    genuine = torch.tensor([True] * 40 + [False] * 200)
    index, folds = openset.balanced_folds(genuine, 60, 10, seed=3)
    assert len(set(index.tolist())) == 60
    assert int(genuine[index].sum()) == 30
    for fold in range(10):
        in_fold = folds == fold
        assert int(genuine[index][in_fold].sum()) == 3 and int(in_fold.sum()) == 6


@pytest.mark.parametrize(
    ("values", "baseline", "lower", "expected"),
    [
        ([0.10, 0.11], [0.20, 0.15], True, "better"),
        ([0.10, 0.16], [0.20, 0.15], True, "no difference"),
        ([0.30, 0.25], [0.20, 0.15], True, "worse"),
        ([0.30, 0.25], [0.20, 0.15], False, "better"),
        ([0.2], [0.2], False, "no difference"),
    ],
)
def test_verdict_needs_ranges_apart(values, baseline, lower, expected):
    assert openset.verdict(values, baseline, lower) == expected


def test_open_set_cli_end_to_end(tmp_path):
    """Two seeds of two losses on digits: CSV rows, the table with mean ± std and verdicts."""
    out = tmp_path / "out"
    argv = ["--protocol", "open-set", "--dataset", "digits", "--loss", "softmax,cosface"]
    argv += ["--seeds", "2", "--epochs", "1", "--width", "4", "--threads", "1", "--out", str(out)]
    assert demo.main(argv) == 0
    with open(out / "demo_openset.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["seed"]) for r in rows] == [
        ("softmax", "0"),
        ("cosface", "0"),
        ("softmax", "1"),
        ("cosface", "1"),
    ]
    for row in rows:
        assert row["dataset"] == "digits"
        for metric in openset.METRICS:
            assert 0.0 <= float(row[metric]) <= 1.0
    text = (out / "demo_openset.md").read_text()
    assert "--protocol open-set" in text and "wall time" in text
    assert "| softmax | 2 |" in text and "baseline" in text and "±" in text
    assert (out / "demo_openset_roc.png").stat().st_size > 0
    # --merge rebuilds the report from a run's directory without training
    merged = tmp_path / "merged"
    assert demo.main(["--protocol", "open-set", "--merge", str(out), "--out", str(merged)]) == 0
    assert (merged / "demo_openset.csv").read_text() == (out / "demo_openset.csv").read_text()
    assert (
        "merged by `python -m demo --protocol open-set --merge"
        in (merged / "demo_openset.md").read_text()
    )
