"""Wrong input is refused where it enters (functions and module constructors), the lambda
schedule compiles once and advances only in training with gradients, the NaN policy, and the
label checks under torch.compile and with ``validate="sync"``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import requires_cuda
from torch._dynamo.utils import counters

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.ops import cuda as cuda_backend
from margin_kernels.spec import MarginSpec

try:
    from margin_kernels.ops import triton as triton_backend
except ImportError:  # the module guards its own imports; kept for symmetry with HAS_TRITON
    triton_backend = None

IGNORE = -100


def _data(b=6, c=7, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return x, w, y


# --- LM-Softmax needs a non-target class ---------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w, y: mk.lm_softmax_loss(x, w[:1], torch.zeros_like(y)), "needs C >= 2"),
        (
            lambda x, w, y: mk.lm_softmax_loss(
                x, w, y, class_ids=torch.tensor([], dtype=torch.long)
            ),
            "class_ids with at least 2",
        ),
        (
            lambda x, w, y: mk.lm_softmax_loss(x, w, y, class_ids=torch.tensor([3])),
            "class_ids with at least 2",
        ),
        (
            lambda x, w, y: mk.margin_cross_entropy(
                x, w[:1], torch.zeros_like(y), MarginSpec.lm_softmax(), backend="torch"
            ),
            "needs C >= 2",
        ),
        (
            lambda x, w, y: mk.sample_margin_regularization(x, w[:1], torch.zeros_like(y)),
            "needs C >= 2",
        ),
        (lambda x, w, y: mk.nn.LMSoftmaxLoss(5, 1), "num_classes must be >= 2"),
    ],
    ids=["C=1", "class_ids=[]", "class_ids=[3]", "spec C=1", "sample_margin C=1", "module C=1"],
)
def test_lm_softmax_without_negatives_is_refused(call, match):
    x, w, y = _data()
    with pytest.raises(ValueError, match=match):
        call(x, w, y)


def test_lm_softmax_with_two_sampled_classes_keeps_a_negative_in_every_row():
    x, w, y = _data()
    y[:3] = 2
    loss = mk.lm_softmax_loss(x, w, y, class_ids=torch.tensor([2, 5]), reduction="none")
    assert torch.isfinite(loss).all()


def test_other_kinds_with_one_class_give_zero_loss_on_purpose():
    """One class and a target in the denominator: probability 1, loss 0 (not refused)."""
    x, w, y = _data()
    loss = mk.cosface_loss(x, w[:1], torch.zeros_like(y), s=8.0, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))


# --- LM-Softmax regularisers under reduction="none" ----------------------------------------------
def test_lm_regularisers_per_row_ignored_rows_zero_and_mean_consistent():
    x, _, y = _data(b=8, c=7)
    y[[1, 4]] = IGNORE
    kwargs = {"s": 5.0, "sample_margin_weight": 0.7, "zero_centroid_weight": 0.3}
    torch.manual_seed(0)
    rows_head = mk.nn.LMSoftmaxLoss(5, 7, reduction="none", dtype=torch.float64, **kwargs)
    mean_head = mk.nn.LMSoftmaxLoss(5, 7, dtype=torch.float64, **kwargs)
    mean_head.load_state_dict(rows_head.state_dict())
    rows = rows_head(x, y)
    valid = y != IGNORE
    assert torch.equal(rows[~valid], torch.zeros(2, dtype=rows.dtype))
    torch.testing.assert_close(rows[valid].mean(), mean_head(x, y), rtol=1e-12, atol=1e-12)
    w = rows_head.weight
    ce = mk.lm_softmax_loss(x, w, y, s=5.0, reduction="none")
    margins = mk.sample_margin_regularization(x, w, y, reduction="none")
    centroid = mk.zero_centroid_regularization(w)
    torch.testing.assert_close(rows[valid], (ce + 0.7 * margins + 0.3 * centroid)[valid])


def test_em_softmax_none_rows_carry_the_diversity_and_average_to_mean():
    x, w, y = _data(b=8)
    y[[0, 5]] = IGNORE
    heads = torch.stack([w, w.flip(0) * 0.5, w.roll(1, 0)])
    rows = mk.em_softmax_loss(x, heads, y, hsic_weight=0.4, reduction="none")
    plain = mk.em_softmax_loss(x, heads, y, hsic_weight=0.0, reduction="none")
    valid = y != IGNORE
    assert torch.equal(rows[~valid], torch.zeros(2, dtype=rows.dtype))
    pairs = [(0, 1), (0, 2), (1, 2)]
    diversity = 0.4 * sum(mk.hsic(heads[a], heads[b]) for a, b in pairs) / 3
    torch.testing.assert_close(rows[valid], plain[valid] + diversity)
    mean = mk.em_softmax_loss(x, heads, y, hsic_weight=0.4)
    torch.testing.assert_close(rows[valid].mean(), mean, rtol=1e-12, atol=1e-12)


def test_sample_margin_reductions_agree_with_the_reference():
    x, w, y = _data(b=8)
    y[2] = IGNORE
    rows = mk.sample_margin_regularization(x, w, y, reduction="none")
    assert rows[2] == 0
    ref = reference.sample_margin_regularization(x, w, y)
    torch.testing.assert_close(rows.sum() / 7, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        mk.sample_margin_regularization(x, w, y, reduction="sum"), rows.sum()
    )


# --- class_ids with repeats ---------------------------------------------------------------------
def test_repeated_class_ids_are_refused_naming_the_class():
    x, w, y = _data()
    ids = torch.tensor([4, 1, 6, 1])
    for validate in ("async", "sync"):
        with pytest.raises(ValueError, match="class_ids lists class 1 more than once"):
            mk.cosface_loss(x, w, y, class_ids=ids, validate=validate)
    # distinct ids in any order are fine
    assert torch.isfinite(mk.cosface_loss(x, w, y, class_ids=torch.tensor([6, 0, 3])))


def test_repeated_class_ids_under_compile_are_a_runtime_error():
    """Inside torch.compile the check is torch._assert_async (no graph break)."""
    x, w, y = _data()

    def step(ids):
        return mk.cosface_loss(x, w, y, class_ids=ids, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(torch.tensor([0, 2, 5])))
    with pytest.raises(RuntimeError, match="class_ids lists a class more than once"):
        compiled(torch.tensor([0, 2, 2]))


# --- non-finite hyper-parameters ----------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5, "0.1", True])
def test_em_softmax_hsic_weight_must_be_finite_and_nonnegative(value):
    x, w, y = _data()
    with pytest.raises(ValueError, match="hsic_weight must be"):
        mk.em_softmax_loss(x, torch.stack([w, w.flip(0)]), y, hsic_weight=value)
    with pytest.raises(ValueError, match="hsic_weight must be"):
        mk.nn.EMSoftmaxLoss(5, 7, hsic_weight=value)


@pytest.mark.parametrize("field", ["base", "gamma", "power", "lambda_min"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, "5"])
def test_lambda_schedule_fields_must_be_finite_and_nonnegative(field, value):
    with pytest.raises(ValueError, match=f"LambdaSchedule {field} must be"):
        mk.nn.LambdaSchedule(**{field: value})


@pytest.mark.parametrize(
    "lam, match",
    [
        (torch.tensor(math.nan), "lam must be finite and >= 0"),
        (torch.tensor(-1.0), "lam must be finite and >= 0"),
        (torch.tensor([1.0]), "0-d float tensor"),
        (torch.tensor(2), "0-d float tensor"),
        (math.nan, "lam must be finite"),
        ("1.0", "lam must be a float or a 0-d float tensor"),
    ],
)
def test_bad_lambda_is_refused(lam, match):
    x, w, y = _data()
    for loss in (mk.lsoftmax_loss, mk.sphereface_loss):
        with pytest.raises(ValueError, match=match):
            loss(x, w, y, lam=lam)


# --- module constructors ------------------------------------------------------------------------
MODULES = [
    mk.nn.LSoftmaxLoss,
    mk.nn.SphereFaceLoss,
    mk.nn.CosFaceLoss,
    mk.nn.ArcFaceLoss,
    mk.nn.CombinedMarginLoss,
    mk.nn.SOSoftmaxLoss,
    mk.nn.WSoftmaxLoss,
    mk.nn.LMSoftmaxLoss,
    mk.nn.EMSoftmaxLoss,
]

CONSTRUCTOR_CASES = [
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"backend": "gpu"}, "backend must be one of"),
    ({"ignore_index": 1.5}, "ignore_index must be an int"),
    ({"ignore_index": True}, "ignore_index must be an int"),
    ({"validate": "always"}, "validate must be one of"),
    ({"in_features": 8.0}, "in_features must be an int > 0"),
    ({"in_features": 0}, "in_features must be an int > 0"),
    ({"num_classes": "7"}, "num_classes must be an int > 0"),
    ({"num_classes": True}, "num_classes must be an int > 0"),
]


@pytest.mark.parametrize("override, match", CONSTRUCTOR_CASES, ids=lambda v: str(v)[:30])
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_module_constructor_refuses_bad_options(cls, override, match):
    args = {"in_features": 5, "num_classes": 7, **override}
    with pytest.raises(ValueError, match=match):
        cls(args.pop("in_features"), args.pop("num_classes"), **args)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mk.nn.EMSoftmaxLoss(5, 7, hsic_weight=-1), "hsic_weight must be"),
        (lambda: mk.nn.EMSoftmaxLoss(5, 7, num_heads=2.0), "num_heads must be an int > 0"),
        (lambda: mk.nn.LMSoftmaxLoss(5, 7, sample_margin_weight=math.nan), "sample_margin_weight"),
        (lambda: mk.nn.LMSoftmaxLoss(5, 7, zero_centroid_weight=-1.0), "zero_centroid_weight"),
        (lambda: mk.nn.SphereFaceLoss(5, 7, schedule="sphereface"), "schedule must be a Lambda"),
        (lambda: mk.nn.SphereFaceLoss(5, 7, lam=math.nan), "lam must be finite"),
        (lambda: mk.nn.CosFaceLoss(5, 7, s="64"), "s must be a real number"),
        (lambda: mk.nn.ArcFaceLoss(5, 7, m=math.inf), "m must be finite"),
    ],
)
def test_module_constructor_refuses_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- lambda schedule: when it advances, and compiled annealing ------------------------------------
def test_schedule_advances_only_in_training_with_gradients():
    x, _, y = _data()
    head = mk.nn.SphereFaceLoss(5, 7, schedule=mk.nn.LambdaSchedule.sphereface())
    head(x.float(), y)
    assert head.iteration == 1
    with torch.no_grad():
        head(x.float(), y)
    with torch.inference_mode():
        head(x.float(), y)
    assert head.iteration == 1, "evaluation without .eval() must not move the schedule"
    head.eval()
    head(x.float(), y)
    assert head.iteration == 1
    head.train()
    head(x.float(), y).backward()
    assert head.iteration == 2
    assert head.current_lambda == mk.nn.LambdaSchedule.sphereface()(2)


def test_tensor_lambda_equals_float_lambda_in_value_and_gradient():
    x, w, y = _data()
    y[0] = IGNORE
    for loss_fn in (mk.lsoftmax_loss, mk.sphereface_loss):
        for lam in (0.0, 0.5, 7.0, 1000.0):
            got, want = [], []
            for value, out in ((torch.tensor(lam, dtype=torch.float64), got), (lam, want)):
                xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
                loss = loss_fn(xa, wa, y, m=3, lam=value, reduction="none")
                (loss * torch.linspace(0.5, 1.5, len(y), dtype=loss.dtype)).sum().backward()
                out += [loss.detach(), xa.grad, wa.grad]
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            assert got[0][0] == 0 and torch.all(got[1][0] == 0), "ignored rows stay 0"


def _compile_counted(fn):
    """torch.compile(fullgraph=True) whose compilations are counted by dynamo's own statistics
    (``unique_graphs``: one per compiled graph, recompilations included): a lambda baked into
    the graph as a constant would recompile at every step."""
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize(
    "cls", [mk.nn.SphereFaceLoss, mk.nn.LSoftmaxLoss], ids=lambda c: c.__name__
)
def test_annealed_module_compiles_once_over_50_steps(cls):
    """torch.compile(fullgraph=True) over 50 annealed steps with backward: one compilation, and
    each step's loss and gradients are those of the eager loss at that step's lambda."""
    schedule = mk.nn.LambdaSchedule(base=1000.0, gamma=0.5, power=1.0, lambda_min=2.0)
    head = cls(5, 7, m=4, schedule=schedule, dtype=torch.float64)
    compiled = _compile_counted(head)
    x, _, y = _data()
    y[1] = IGNORE
    for step in range(50):
        xa = x.clone().requires_grad_()
        head.weight.grad = None
        loss = compiled(xa, y)
        loss.backward()
        xb, wb = x.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
        loss_fn = mk.lsoftmax_loss if cls is mk.nn.LSoftmaxLoss else mk.sphereface_loss
        want = loss_fn(xb, wb, y, m=4, lam=schedule(step))
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, wb.grad, rtol=1e-9, atol=1e-12)
    assert head.iteration == 50
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_functional_tensor_lambda_compiles_once():
    x, w, y = _data()

    def step(x, w, lam):
        return mk.sphereface_loss(x, w, y, m=4, lam=lam)

    compiled = _compile_counted(step)
    for k in range(50):
        lam = 1000.0 / (1 + 0.5 * k)
        xa = x.clone().requires_grad_()
        loss = compiled(xa, w, torch.tensor(lam, dtype=torch.float64))
        loss.backward()
        torch.testing.assert_close(loss, step(x, w, lam), rtol=1e-10, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_annealed_module_passes_class_ids_and_refuses_repeats():
    x, _, y = _data()
    head = mk.nn.SphereFaceLoss(
        5, 7, schedule=mk.nn.LambdaSchedule.sphereface(), deterministic=True, dtype=torch.float64
    )
    ids = torch.tensor([0, 3, 5])
    got = head(x, y, ids)
    want = mk.sphereface_loss(x, head.weight, y, m=4, lam=1000.0, class_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    every_class = mk.sphereface_loss(x, head.weight, y, m=4, lam=1000.0)
    assert not torch.allclose(got, every_class), "class_ids must reach the loss"
    with pytest.raises(ValueError, match="class_ids lists class 3 more than once"):
        head(x, y, torch.tensor([3, 3]))


def test_schedule_state_round_trip_and_device_counter():
    x, _, y = _data()
    head = mk.nn.LSoftmaxLoss(5, 7, m=2, schedule=mk.nn.LambdaSchedule.lsoftmax_mnist())
    for _ in range(3):
        head(x.float(), y).backward()
    state = head.state_dict()
    assert state["_extra_state"] == {"iteration": 3}
    assert "_iteration" not in state, "the counter travels as extra state only"
    resumed = mk.nn.LSoftmaxLoss(5, 7, m=2, schedule=mk.nn.LambdaSchedule.lsoftmax_mnist())
    resumed.load_state_dict(state)
    assert resumed.iteration == 3
    assert resumed.schedule.at(resumed._iteration).item() == pytest.approx(resumed.current_lambda)
    with pytest.raises(ValueError, match="iteration must be an int >= 0"):
        resumed.iteration = -1


# --- labels: torch.compile and validate="sync" --------------------------------------------------
def test_out_of_range_label_under_compile_is_a_runtime_error():
    x, w, y = _data()
    bad = y.clone()
    bad[2] = 7

    def step(y):
        return mk.arcface_loss(x, w, y, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(y))
    with pytest.raises(RuntimeError, match=r"target out of range \[0, 7\)"):
        compiled(bad)


def test_validate_sync_raises_index_error_even_inside_compile():
    """validate="sync" reads the labels back (a graph break under compile) and raises the
    IndexError with the bad value where the default would be a device-side/async assert."""
    x, w, y = _data()
    bad = y.clone()
    bad[4] = -3

    def step(y):
        return mk.arcface_loss(x, w, y, backend="torch", validate="sync")

    with pytest.raises(IndexError, match="target value -3 is out of range"):
        torch.compile(step, backend="aot_eager")(bad)
    with pytest.raises(IndexError, match="target value -3 is out of range"):
        step(bad)
    head = mk.nn.CosFaceLoss(5, 7, validate="sync", dtype=torch.float64)
    with pytest.raises(IndexError, match="target value -3"):
        head(x, bad)


# --- NaN policy -----------------------------------------------------------------------------------
SPECS = {
    "cosface": MarginSpec.cosface(16.0, 0.35),
    "arcface": MarginSpec.arcface(16.0, 0.5),
    "sphereface": MarginSpec.sphereface(4, 3.0),
    "lsoftmax": MarginSpec.lsoftmax(2),
    "lm_softmax": MarginSpec.lm_softmax(),
    "w_softmax": MarginSpec.w_softmax(),
}


def _cuda_twin(x, w, target, spec, class_ids=None):
    return cuda_backend._chunked_lse_parts(x, w, target, spec, class_ids, chunk_bytes=64)


# every backend that runs on CPU here: the reference, Triton under its interpreter, and the
# CUDA backend's chunked algorithm over its C++ CPU twin
PARTS = {"torch": reference.lse_parts}
if triton_backend is not None and triton_backend.HAS_TRITON and triton_backend.INTERPRET:
    PARTS["triton"] = triton_backend.lse_parts
if cuda_backend.HAS_CUDA_EXT:
    PARTS["cuda"] = _cuda_twin


def _rows(backend, x, w, y, spec):
    neg_lse, t = PARTS[backend](x, w, y, spec, None)
    return reference.loss_from_parts(neg_lse, t, torch.ones_like(y, dtype=torch.bool), spec, "none")


@pytest.mark.parametrize("backend", sorted(PARTS))
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_in_a_feature_row_poisons_that_row_only(backend, name, poison):
    x, w, y = _data()
    x[3, 1] = poison
    loss = _rows(backend, x, w, y, SPECS[name])
    assert torch.isnan(loss[3]), "a NaN/inf feature never gives a finite loss"
    assert torch.isfinite(loss[torch.arange(6) != 3]).all()
    assert torch.isnan(mk.margin_cross_entropy(x, w, y, SPECS[name], backend="torch"))


@pytest.mark.parametrize("backend", sorted(PARTS))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_nan_in_a_weight_row_poisons_every_row(backend, name):
    x, w, y = _data()
    y[:] = 0
    w[5, 2] = math.nan  # a non-target row of every sample: it is in every denominator
    assert torch.isnan(_rows(backend, x, w, y, SPECS[name])).all()


@pytest.mark.gpu
@requires_cuda
def test_cuda_label_check_is_a_device_assert_and_sync_raises_index_error():
    """In a subprocess: a device-side assert leaves the CUDA context unusable."""
    code = (
        "import torch, margin_kernels as mk\n"
        "x = torch.randn(4, 8, device='cuda'); w = torch.randn(5, 8, device='cuda')\n"
        "y = torch.tensor([0, 1, 9, 2], device='cuda')\n"
        "try:\n"
        "    mk.cosface_loss(x, w, y, validate='sync')\n"
        "except IndexError as err:\n"
        "    print('sync:', err, flush=True)\n"
        "mk.cosface_loss(x, w, y).item()\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "sync: target value 9 is out of range [0, 5)" in done.stdout, done.stdout + done.stderr
    assert done.returncode != 0 and "device-side assert" in done.stderr, done.stderr
