"""Values, not shapes: the modules' ``scores()`` and the demo's angle metrics on hand-built
vectors whose angles are known.

``scores()`` is documented as the cosine between the embedding and each class weight for the
kinds that normalise the weight, the raw logit ``W_j . x`` for L-Softmax, and for EM-Softmax the
mean of its heads' raw logits. The demo's ``angle_metrics`` returns each row's angle to its
target class direction and to the nearest other class direction, and the smallest angle between
two class directions.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.spec import MarginSpec


def load_demo():
    """The demo module that holds ``angle_metrics`` (the top-level demo package)."""
    return importlib.import_module("demo.run")


def unit(degrees: float) -> list[float]:
    """Unit vector at ``degrees`` in the (e1, e2) plane of R^3."""
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r), 0.0]


# Class weights: directions (degrees in the e1-e2 plane, or e3) and lengths.
W_DIRECTIONS = [unit(0), unit(60), [0.0, 0.0, 1.0], unit(180)]
W_NORMS = [2.0, 0.5, 3.0, 1.5]
# Embeddings: direction and length.
X_DIRECTIONS = [unit(0), unit(30), [0.0, 0.0, 1.0], unit(50)]
X_NORMS = [4.0, 0.25, 7.0, 1.0]
# cos(angle between X row i and W row j), from the angles above.
COSINES = [
    [1.0, 0.5, 0.0, -1.0],
    [math.cos(math.radians(30)), math.cos(math.radians(30)), 0.0, -math.cos(math.radians(30))],
    [0.0, 0.0, 1.0, 0.0],
    [math.cos(math.radians(50)), math.cos(math.radians(10)), 0.0, -math.cos(math.radians(50))],
]


def hand_built():
    w = torch.tensor(W_DIRECTIONS, dtype=torch.float64) * torch.tensor(W_NORMS)[:, None].double()
    x = torch.tensor(X_DIRECTIONS, dtype=torch.float64) * torch.tensor(X_NORMS)[:, None].double()
    cos = torch.tensor(COSINES, dtype=torch.float64)
    raw = cos * torch.tensor(X_NORMS, dtype=torch.float64)[:, None] * torch.tensor(W_NORMS)
    return x, w, cos, raw


def test_reference_negatives_lse_leaves_out_the_target_column():
    """CosFace with s = 1, m = 0 has f_ij = t_i = c_ij: the reference's LSE of the negatives is
    log sum_{j != y} exp(c_ij) of the known cosines, and its loss is cross-entropy on them.
    (``backend="torch"`` pins the reference: on CPU ``auto`` takes the compiled kernels.)"""
    x, w, cos, _ = hand_built()
    target = torch.tensor([0, 1, 2, 3])
    neg_lse, t = reference.lse_parts(x, w, target, MarginSpec.cosface(1.0, 0.0))
    is_target = torch.eye(4, dtype=torch.bool)
    want = torch.logsumexp(cos.masked_fill(is_target, -math.inf), dim=1)
    torch.testing.assert_close(neg_lse, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, cos.diagonal(), rtol=1e-12, atol=1e-12)
    loss = mk.cosface_loss(x, w, target, s=1.0, m=0.0, reduction="none", backend="torch")
    ce = torch.nn.functional.cross_entropy(cos, target, reduction="none")
    torch.testing.assert_close(loss, ce, rtol=1e-12, atol=1e-12)


NORMALISED_WEIGHT_MODULES = {
    "sphereface": lambda: mk.nn.SphereFaceLoss(3, 4, m=4, dtype=torch.float64),
    "cosface": lambda: mk.nn.CosFaceLoss(3, 4, dtype=torch.float64),
    "arcface": lambda: mk.nn.ArcFaceLoss(3, 4, dtype=torch.float64),
    "combined": lambda: mk.nn.CombinedMarginLoss(3, 4, dtype=torch.float64),
    "so_softmax": lambda: mk.nn.SOSoftmaxLoss(3, 4, dtype=torch.float64),
    "w_softmax": lambda: mk.nn.WSoftmaxLoss(3, 4, dtype=torch.float64),
    "lm_softmax": lambda: mk.nn.LMSoftmaxLoss(3, 4, dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(NORMALISED_WEIGHT_MODULES))
def test_scores_are_cosines_for_normalised_weight_kinds(name):
    head = NORMALISED_WEIGHT_MODULES[name]()
    x, w, cos, raw = hand_built()
    with torch.no_grad():
        head.weight.copy_(w)
    scores = head.scores(x)
    torch.testing.assert_close(scores, cos, rtol=1e-12, atol=1e-12)
    # row 3 lies 10 degrees from the short class 1 and 50 degrees from the long class 0: the
    # cosine prediction is class 1 where the raw logit would say class 0
    assert scores[3].argmax().item() == 1 and raw[3].argmax().item() == 0


def test_scores_are_raw_logits_for_lsoftmax():
    head = mk.nn.LSoftmaxLoss(3, 4, m=2, dtype=torch.float64)
    x, w, _, raw = hand_built()
    with torch.no_grad():
        head.weight.copy_(w)
    torch.testing.assert_close(head.scores(x), raw, rtol=1e-12, atol=1e-12)


def test_em_softmax_scores_average_the_heads_raw_logits():
    head = mk.nn.EMSoftmaxLoss(3, 4, num_heads=2, dtype=torch.float64)
    x, w, _, raw = hand_built()
    with torch.no_grad():
        head.weight.copy_(torch.stack([w, 2.0 * w]))
    torch.testing.assert_close(head.scores(x), 1.5 * raw, rtol=1e-12, atol=1e-12)


# Demo metrics: class directions at 0, 70 and 200 degrees in a plane (pairwise angles 70, 130,
# 160: the class margin is 70), features at known angles and arbitrary lengths.
DEMO_DIRECTIONS = [(0.0, 1.0), (70.0, 2.5), (200.0, 0.4)]
# (feature angle, length, label) -> (angle to target, angle to nearest other class)
DEMO_ROWS = [
    ((10.0, 3.0, 0), (10.0, 60.0)),
    ((100.0, 0.2, 1), (30.0, 100.0)),
    ((190.0, 5.0, 0), (170.0, 10.0)),
    ((250.0, 1.0, 2), (50.0, 110.0)),
]


def _planar(angle: float, length: float) -> list[float]:
    r = math.radians(angle)
    return [length * math.cos(r), length * math.sin(r)]


def test_demo_angle_metrics_on_known_angles():
    demo = load_demo()
    directions = torch.tensor([_planar(a, n) for a, n in DEMO_DIRECTIONS])
    feats = torch.tensor([_planar(a, n) for (a, n, _), _ in DEMO_ROWS])
    labels = torch.tensor([label for (_, _, label), _ in DEMO_ROWS])
    target, nearest_other, class_margin = demo.angle_metrics(feats, labels, directions)
    want_target = torch.tensor([t for _, (t, _) in DEMO_ROWS])
    want_other = torch.tensor([o for _, (_, o) in DEMO_ROWS])
    torch.testing.assert_close(target.double(), want_target.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(nearest_other.double(), want_other.double(), rtol=0, atol=1e-4)
    assert class_margin == pytest.approx(70.0, abs=1e-4)


def test_demo_angle_metrics_in_higher_dimension():
    """Orthogonal class directions in R^5 (class margin 90) and a feature between two of them."""
    demo = load_demo()
    directions = torch.eye(5)[:4] * torch.tensor([1.0, 3.0, 0.5, 2.0])[:, None]
    a = math.radians(20.0)
    feats = torch.tensor([[math.cos(a), math.sin(a), 0.0, 0.0, 0.0]]) * 6.0
    target, nearest_other, class_margin = demo.angle_metrics(feats, torch.tensor([1]), directions)
    assert target.item() == pytest.approx(70.0, abs=1e-4)
    assert nearest_other.item() == pytest.approx(20.0, abs=1e-4)
    assert class_margin == pytest.approx(90.0, abs=1e-4)


def test_demo_class_directions_of_em_softmax_are_the_heads_mean():
    demo = load_demo()
    head = mk.nn.EMSoftmaxLoss(3, 4, num_heads=2, dtype=torch.float64)
    x, w, _, _ = hand_built()
    with torch.no_grad():
        head.weight.copy_(torch.stack([w, 3.0 * w]))
    torch.testing.assert_close(demo.class_directions(head), 2.0 * w)
    # the demo's test error uses scores(); its argmax agrees with the mean head's raw logits
    assert torch.equal(head.scores(x).argmax(1), (x @ (2.0 * w).T).argmax(1))
