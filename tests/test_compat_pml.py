"""margin_kernels.compat.pml against pytorch-metric-learning itself, on the same weights: losses,
dX and dW in float64 and float32 for a grid of the margins and scales PML accepts (L-Softmax and
SphereFace up to m = 10, as PML's own tests use), state_dict round trips both ways, the in-place
cast of W, miner weights, get_logits, and the errors. The m = 5..10 parity runs on every backend:
the reference, the Triton kernels (under TRITON_INTERPRET=1 on CPU tensors, or on a GPU) and the
C++ backend's chunked algorithm (its CPU kernels), each with the column-major weight ``W.t()``."""

from __future__ import annotations

import functools

import pytest
import torch

import margin_kernels as mk
from margin_kernels.compat import pml
from margin_kernels.ops import cuda as cuda_backend

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

from helpers import (  # noqa: E402
    TRITON_DEVICE,
    rel_error,
    requires_cuda,
    requires_extension,
    requires_triton_device,
)

B, C, D = 7, 9, 6

# (class name, constructor keywords): PML's defaults, other scales and margins, integer psi
# margins 1..10 (PML accepts any integer; its tests use 10).
CASES = [
    ("ArcFaceLoss", {}),
    ("ArcFaceLoss", {"margin": 60.0, "scale": 10}),
    ("ArcFaceLoss", {"margin": 5.0, "scale": 1.5}),
    ("CosFaceLoss", {}),
    ("CosFaceLoss", {"margin": 0.1, "scale": 8}),
    *[("LargeMarginSoftmaxLoss", {"margin": m}) for m in range(1, 11)],
    ("LargeMarginSoftmaxLoss", {"margin": 10, "scale": 0.5}),
    ("LargeMarginSoftmaxLoss", {"margin": 3, "scale": 2.5}),
    *[("SphereFaceLoss", {"margin": m}) for m in range(1, 11)],
    ("SphereFaceLoss", {"margin": 7, "scale": 2.0}),
    ("SphereFaceLoss", {"margin": 2, "scale": 0.25}),
]
PSI_HIGH = [
    (name, {"margin": m})
    for name in ("LargeMarginSoftmaxLoss", "SphereFaceLoss")
    for m in range(5, 11)
]
COLUMN_MAJOR = [
    ("ArcFaceLoss", {}),
    ("CosFaceLoss", {}),
    ("LargeMarginSoftmaxLoss", {"margin": 4, "scale": 2.0}),
    ("SphereFaceLoss", {"margin": 3}),
    *PSI_HIGH,
]


def _ids(cases):
    return [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'defaults'}" for n, kw in cases]


def _pair(name, kwargs, seed=1, **ours):
    """(PML head, our head) with the same W: both drawn from the same seed, which also checks
    that the initialisation is PML's."""
    torch.manual_seed(seed)
    theirs = getattr(pml_losses, name)(C, D, **kwargs)
    torch.manual_seed(seed)
    mine = getattr(pml, name)(C, D, **kwargs, **ours)
    assert torch.equal(theirs.W, mine.W), "initialisation differs from PML's"
    return theirs, mine


def _data(dtype, norm=0.3, seed=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * norm
    y = torch.randint(0, C, (B,), generator=g)
    return x.to(device, dtype), y.to(device)


def _loss_and_grads(head, x, y, **kwargs):
    x = x.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = head(x, y, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, head.W.grad


def _assert_same(got, want, tol):
    for what, a, b in zip(("loss", "dX", "dW"), got, want, strict=True):
        assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), what
        assert rel_error(a, b) <= tol, f"{what}: relative difference {rel_error(a, b):.2e} > {tol}"


@pytest.mark.parametrize("norm", [0.3, 1.5], ids=["small_x", "large_x"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
def test_loss_and_gradients_match_pml(name, kwargs, dtype, tol, norm):
    theirs, mine = _pair(name, kwargs)
    x, y = _data(dtype, norm)
    want = _loss_and_grads(theirs, x, y)
    got = _loss_and_grads(mine, x, y)
    _assert_same(got, want, tol)


def test_signatures_defaults_and_units():
    arc = pml.ArcFaceLoss(10, 4)
    # like PML, the stored margin is in radians after construction
    assert arc.margin == pytest.approx(torch.pi * 28.6 / 180) and arc.scale == 64
    assert arc.spec == mk.MarginSpec.arcface(64, arc.margin, "exact", "fallback")
    assert pml.CosFaceLoss(10, 4).spec == mk.MarginSpec.cosface(64, 0.35)
    lsm = pml.LargeMarginSoftmaxLoss(10, 4, 4.7)  # PML truncates the margin to an int
    assert lsm.margin == 4 and lsm.spec == mk.MarginSpec.lsoftmax(4) and lsm.scale == 1
    assert pml.SphereFaceLoss(10, 4).spec == mk.MarginSpec.sphereface(4)
    assert pml.ArcFaceLoss(10, 4).W.shape == (4, 10)


@pytest.mark.parametrize("name", ["ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss"])
def test_state_dict_round_trips_strictly_both_ways(name):
    torch.manual_seed(7)
    theirs = getattr(pml_losses, name)(C, D)
    mine = getattr(pml, name)(C, D)
    assert set(mine.state_dict()) == set(theirs.state_dict()) == {"W"}
    mine.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(mine.W, theirs.W)
    with torch.no_grad():
        mine.W.mul_(2)
    theirs.load_state_dict(mine.state_dict(), strict=True)
    assert torch.equal(mine.W, theirs.W)
    x, y = _data(torch.float64)
    _assert_same(_loss_and_grads(mine, x, y), _loss_and_grads(theirs, x, y), 1e-12)


def test_weight_follows_the_embeddings_dtype_in_place_as_in_pml():
    theirs, mine = _pair("CosFaceLoss", {})
    param = mine.W
    x, y = _data(torch.float64)
    _assert_same(_loss_and_grads(mine, x, y), _loss_and_grads(theirs, x, y), 1e-12)
    # the same Parameter object, now float64 (an optimizer holding it keeps working)
    assert mine.W is param and mine.W.dtype == theirs.W.dtype == torch.float64
    x16, _ = _data(torch.float16)
    loss = mine(x16, y)
    assert mine.W.dtype == torch.float16 and loss.dtype == torch.float16
    theirs.W.data = theirs.W.data.double()
    reference = theirs(x16.double(), y)
    assert abs(loss.double() - reference).item() < 0.05 * reference.item()


def test_miner_indices_tuple_weights_rows_as_pml():
    theirs, mine = _pair("ArcFaceLoss", {"scale": 16})
    x, y = _data(torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    triplets = pml_miners.TripletMarginMiner(margin=10.0)(x, y)
    assert len(triplets[0]) > 0
    want = _loss_and_grads(theirs, x, y, indices_tuple=triplets)
    got = _loss_and_grads(mine, x, y, indices_tuple=triplets)
    _assert_same(got, want, 1e-12)
    # an empty tuple weighs every row 1
    empty = tuple(torch.zeros(0, dtype=torch.int64) for _ in range(3))
    _assert_same(_loss_and_grads(mine, x, y, indices_tuple=empty), _loss_and_grads(mine, x, y), 0)


@pytest.mark.parametrize(("name", "kwargs"), CASES[::3], ids=_ids(CASES[::3]))
def test_get_logits_match_pml(name, kwargs):
    theirs, mine = _pair(name, kwargs)
    theirs.double()  # PML's get_logits does not cast W
    x, _ = _data(torch.float64, norm=1.0)
    torch.testing.assert_close(mine.get_logits(x), theirs.get_logits(x), rtol=1e-12, atol=1e-12)


def test_unsupported_features_raise_clear_errors():
    with pytest.raises(ValueError, match="reducer"):
        pml.ArcFaceLoss(10, 4, reducer=object())
    with pytest.raises(ValueError, match="weight_regularizer"):
        pml.CosFaceLoss(10, 4, weight_regularizer=object())
    with pytest.raises(ValueError, match="unexpected keyword argument 'margins'"):
        pml.CosFaceLoss(10, 4, margins=0.1)
    pml.CosFaceLoss(10, 4, reducer=None, collect_stats=False)  # PML's defaults are accepted
    with pytest.raises(ValueError, match=r"margin must be an integer in 1\.\.16"):
        pml.LargeMarginSoftmaxLoss(10, 4, margin=17)
    with pytest.raises(ValueError, match=r"margin must be an integer in 1\.\.16"):
        pml.SphereFaceLoss(10, 4, margin=0)
    with pytest.raises(ValueError, match=r"\[0, 180\) degrees"):
        pml.ArcFaceLoss(10, 4, margin=180)
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        pml.ArcFaceLoss(10, 4, scale=0)
    head = pml.ArcFaceLoss(10, 4)
    x, y = torch.randn(3, 4), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="labels are required"):
        head(x)
    with pytest.raises(ValueError, match="ref_emb"):
        head(x, y, ref_emb=x)
    with pytest.raises(ValueError, match="Number of embeddings must equal number of labels"):
        head(x, y[:2])
    with pytest.raises(IndexError, match="out of range"):
        head(x, torch.tensor([1, 2, 10]))


# --- every backend, column-major W.t() ----------------------------------------------------------
@requires_triton_device
@pytest.mark.parametrize(("name", "kwargs"), COLUMN_MAJOR, ids=_ids(COLUMN_MAJOR))
def test_triton_backend_matches_pml(name, kwargs):
    theirs, mine = _pair(name, kwargs, backend="triton")
    x, y = _data(torch.float64)
    want = _loss_and_grads(theirs, x, y)
    mine.to(TRITON_DEVICE)
    got = _loss_and_grads(mine, x.to(TRITON_DEVICE), y.to(TRITON_DEVICE))
    _assert_same(tuple(t.cpu() for t in got), want, 1e-10)


@requires_extension
@pytest.mark.parametrize(("name", "kwargs"), COLUMN_MAJOR, ids=_ids(COLUMN_MAJOR))
def test_cuda_backend_algorithm_matches_pml(name, kwargs, monkeypatch):
    """The C++ backend's chunked algorithm and epilogue kernels (CPU twin), 3 rows per chunk,
    through the whole compat head."""
    chunked = functools.partial(cuda_backend._chunked_lse_parts, chunk_bytes=3 * C * 8)
    monkeypatch.setattr(mk.functional, "resolve", lambda *_: ("cuda", chunked))
    theirs, mine = _pair(name, kwargs)
    x, y = _data(torch.float64)
    _assert_same(_loss_and_grads(mine, x, y), _loss_and_grads(theirs, x, y), 1e-10)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("name", "kwargs"), COLUMN_MAJOR, ids=_ids(COLUMN_MAJOR))
def test_fused_on_gpu_matches_pml(name, kwargs):
    theirs, mine = _pair(name, kwargs)
    theirs.cuda()
    mine.cuda()
    x, y = _data(torch.float32, device="cuda")
    _assert_same(_loss_and_grads(mine, x, y), _loss_and_grads(theirs, x, y), 1e-4)


# --- the general API migrating users move on to: class_ids, deterministic, PartialFCSampler ------
def test_modules_take_class_ids_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 8, 1])
    ids = torch.tensor([0, 1, 3, 5])
    for head in (
        mk.nn.CosFaceLoss(D, C, s=8.0, deterministic=True, dtype=torch.float64),
        mk.nn.SphereFaceLoss(D, C, m=3, dtype=torch.float64),
        mk.nn.LMSoftmaxLoss(D, C, dtype=torch.float64),
    ):
        assert head.deterministic is (type(head) is mk.nn.CosFaceLoss)
        loss = head(x, y, class_ids=ids)
        want = mk.margin_cross_entropy(x, head.weight, y, head.margin(), class_ids=ids)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
        assert abs(loss - head(x, y)).item() > 1e-6  # the sampled loss is not the full one
        head.zero_grad()
        loss.backward()
        touched = head.weight.grad.abs().sum(1) > 0
        assert set(torch.nonzero(touched).flatten().tolist()) == {0, 1, 3, 5, 8}


def test_partial_fc_sampler():
    sampler = mk.nn.PartialFCSampler(100, 0.1, seed=3)
    labels = torch.tensor([5, 5, 17, -100, 99, 42])
    ids = sampler(labels)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids.sort().values)
    assert ids.numel() == sampler.num_sampled(6) == 10 and ids.unique().numel() == 10
    assert torch.isin(torch.tensor([5, 17, 99, 42]), ids).all()
    assert sampler.step == 1
    # bounded below by the batch: every positive fits
    assert mk.nn.PartialFCSampler(100, 0.01).num_sampled(6) == 6
    assert mk.nn.PartialFCSampler(8, 0.5).num_sampled(20) == 8
    # reproducible: a restored state_dict draws what the original draws next
    restored = mk.nn.PartialFCSampler(100, 0.1, seed=3)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored(labels), sampler(labels))
    assert not torch.equal(sampler(labels), ids)  # the stream moves on with the step
    sampler.eval()
    assert sampler(labels) is None
    with pytest.raises(ValueError, match="sample_rate"):
        mk.nn.PartialFCSampler(100, 1.5)
