"""Public API: MarginSpec validation, input validation (each guarded case), backend selection,
modules and their state."""

import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels.spec import MarginSpec


def _inputs(b=4, c=6, d=5):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, d, generator=g),
        torch.randn(c, d, generator=g),
        torch.randint(0, c, (b,), generator=g),
    )


# --- MarginSpec ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MarginSpec("nope"), "kind must be one of"),
        (lambda: MarginSpec.lsoftmax(m=17), "m must be an integer in 1..16"),
        (lambda: MarginSpec.sphereface(m=2.5), "m must be an integer in 1..16"),
        (lambda: MarginSpec.sphereface(m=0), "m must be an integer in 1..16"),
        (lambda: MarginSpec.lsoftmax(lam=-1.0), "lam must be >= 0"),
        (lambda: MarginSpec.cosface(s=0.0), "s must be > 0"),
        (lambda: MarginSpec.arcface(s=-1.0), "s must be > 0"),
        (lambda: MarginSpec.arcface(m=4.0), r"angle in \[0, pi\)"),
        (lambda: MarginSpec.cosface(m=-0.1), "m must be >= 0"),
        (lambda: MarginSpec.arcface(grad_mode="approx"), "grad_mode must be one of"),
        (lambda: MarginSpec.arcface(overflow="clip"), "overflow must be one of"),
        (lambda: MarginSpec("cosface", grad_mode="straight_through"), "arcface and combined"),
        (lambda: MarginSpec("cosface", overflow="easy"), "arcface only"),
        (lambda: MarginSpec.combined(m1=0.0), "m1 must be > 0"),
        (lambda: MarginSpec.so_softmax(lambda_p=0.0), "lambda_p and lambda_n"),
        (lambda: MarginSpec.w_softmax(alpha=-1.0), "alpha must be >= 0"),
        (lambda: MarginSpec.cosface(s=math.nan), "s must be finite"),
        (lambda: MarginSpec.cosface(s="64"), "s must be a real number"),
    ],
)
def test_marginspec_rejects_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_marginspec_kernel_args_order():
    kind_id, params = MarginSpec.arcface(s=30.0, m=0.4, grad_mode="straight_through").kernel_args()
    assert kind_id == 3
    assert params[0] == 30.0 and params[1] == 0.4
    assert params[9] == pytest.approx(math.cos(0.4)) and params[10] == pytest.approx(math.sin(0.4))
    assert params[11] == 1.0 and params[12] == 0.0  # straight_through, fallback


def test_marginspec_properties():
    assert MarginSpec.cosface().normalizes_features
    assert not MarginSpec.sphereface().normalizes_features
    assert not MarginSpec.lsoftmax().normalizes_weight
    assert MarginSpec.lm_softmax().excludes_target
    assert not MarginSpec.w_softmax().shardable and MarginSpec.arcface().shardable


# --- input validation --------------------------------------------------------------------------
def _call(**override):
    x, w, y = _inputs()
    args = {"x": x, "weight": w, "target": y, "margin": MarginSpec.cosface()}
    args.update(override)
    return mk.margin_cross_entropy(
        args.pop("x"), args.pop("weight"), args.pop("target"), args.pop("margin"), **args
    )


@pytest.mark.parametrize(
    "override, exc, match",
    [
        ({"x": torch.randn(4)}, ValueError, r"x must be 2-D \(B, D\)"),
        ({"x": [[1.0]]}, ValueError, "x must be a torch.Tensor"),
        ({"weight": torch.randn(6, 5, 1)}, ValueError, r"weight must be 2-D \(C, D\)"),
        ({"x": torch.randn(4, 3)}, ValueError, "feature dims differ"),
        ({"weight": torch.randn(0, 5)}, ValueError, "at least one class"),
        ({"x": torch.ones(4, 5, dtype=torch.int32)}, ValueError, "x must be float16"),
        ({"weight": torch.randn(6, 5, dtype=torch.complex64)}, ValueError, "weight must be"),
        ({"target": torch.zeros(4)}, ValueError, "target must hold integers"),
        ({"target": torch.zeros(4, dtype=torch.bool)}, ValueError, "target must hold integers"),
        ({"target": torch.zeros(4, 1, dtype=torch.long)}, ValueError, "target must be 1-D"),
        ({"target": torch.zeros(3, dtype=torch.long)}, ValueError, "3 entries but x has 4"),
        ({"target": torch.tensor([0, 1, 6, 2])}, IndexError, "value 6 is out of range"),
        ({"target": torch.tensor([0, 1, -1, 2])}, IndexError, "value -1 is out of range"),
        ({"target": "labels"}, ValueError, "target must be a torch.Tensor"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"backend": "cudnn"}, ValueError, "backend must be one of"),
        ({"ignore_index": 1.5}, ValueError, "ignore_index must be an int"),
        ({"margin": "arcface"}, ValueError, "margin must be a MarginSpec"),
        ({"class_ids": torch.tensor([0, 9])}, IndexError, "class_ids value 9"),
        ({"class_ids": torch.tensor([0.0, 1.0])}, ValueError, "class_ids must hold integers"),
        ({"target": torch.zeros(4, dtype=torch.long, device="meta")}, ValueError, "one device"),
    ],
)
def test_bad_input_raises_clear_error(override, exc, match):
    with pytest.raises(exc, match=match):
        _call(**override)


def test_bad_input_corrupts_nothing():
    x, w, y = _inputs()
    x0, w0, y0 = x.clone(), w.clone(), y.clone()
    bad = y.clone()
    bad[0] = 99
    with pytest.raises(IndexError):
        mk.arcface_loss(x, w, bad)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(y, y0)


def test_integer_labels_of_other_widths_are_accepted():
    x, w, y = _inputs()
    assert torch.allclose(mk.cosface_loss(x, w, y.int()), mk.cosface_loss(x, w, y))


def test_invalid_hyperparameters_through_functions():
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="m must be an integer"):
        mk.lsoftmax_loss(x, w, y, m=17)
    with pytest.raises(ValueError, match="s must be > 0"):
        mk.arcface_loss(x, w, y, s=0)
    with pytest.raises(ValueError, match=r"weights must be a \(K, C, D\)"):
        mk.em_softmax_loss(x, w, y)
    with pytest.raises(ValueError, match="hsic_weight must be finite and >= 0"):
        mk.em_softmax_loss(x, w[None], y, hsic_weight=-1.0)
    with pytest.raises(ValueError, match="same classes"):
        mk.hsic(w, w[:3])


# --- backends ------------------------------------------------------------------------------
def test_auto_on_cpu_matches_the_reference():
    """auto on CPU is the reference, or the C++ kernels where they measured no slower
    (ops.CPU_AUTO_NO_SLOWER): equal up to fp32 summation order, which the CPU's vector
    width decides."""
    x, w, y = _inputs()
    torch.testing.assert_close(
        mk.arcface_loss(x, w, y), mk.arcface_loss(x, w, y, backend="torch"), rtol=1e-6, atol=0
    )
    assert "torch" in mk.available_backends("cpu", MarginSpec.arcface())


def test_named_backend_that_cannot_run_raises_naming_the_fix(monkeypatch):
    from margin_kernels.ops import cuda

    x, w, y = _inputs()
    monkeypatch.setattr(cuda, "HAS_CUDA_EXT", False)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run here.*no-build-isolation"):
        mk.arcface_loss(x, w, y, backend="cuda")


# --- modules -------------------------------------------------------------------------------
MODULES = [
    (mk.nn.LSoftmaxLoss, {"m": 2}),
    (mk.nn.SphereFaceLoss, {"m": 4}),
    (mk.nn.CosFaceLoss, {"s": 16.0}),
    (mk.nn.ArcFaceLoss, {"s": 16.0, "overflow": "easy"}),
    (mk.nn.CombinedMarginLoss, {}),
    (mk.nn.SOSoftmaxLoss, {}),
    (mk.nn.WSoftmaxLoss, {"alpha": 0.5}),
    (mk.nn.LMSoftmaxLoss, {"sample_margin_weight": 0.1, "zero_centroid_weight": 0.01}),
    (mk.nn.EMSoftmaxLoss, {"num_heads": 3}),
]


@pytest.mark.parametrize("cls, kwargs", MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_module_forward_backward_repr_and_scores(cls, kwargs):
    x, _, y = _inputs(b=5, c=7, d=6)
    module = cls(6, 7, **kwargs)
    assert module.weight.shape[-2:] == (7, 6)
    loss = module(x, y)
    loss.backward()
    assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
    assert "num_classes=7" in repr(module)
    assert module.scores(x).shape == (5, 7)


def test_module_matches_functional():
    x, _, y = _inputs(b=5, c=7, d=6)
    module = mk.nn.ArcFaceLoss(6, 7, s=30.0, m=0.4)
    assert torch.equal(module(x, y), mk.arcface_loss(x, module.weight, y, s=30.0, m=0.4))


def test_module_rejects_bad_hyperparameters_at_construction():
    with pytest.raises(ValueError, match="m must be an integer"):
        mk.nn.SphereFaceLoss(4, 3, m=17)
    with pytest.raises(ValueError, match="in_features must be an int > 0"):
        mk.nn.CosFaceLoss(0, 3)
    with pytest.raises(ValueError, match="num_heads"):
        mk.nn.EMSoftmaxLoss(4, 3, num_heads=0)
    with pytest.raises(ValueError, match="LambdaSchedule"):
        mk.nn.LambdaSchedule(base=-1.0)


def test_lambda_schedule_values():
    sphere = mk.nn.LambdaSchedule.sphereface()
    assert sphere(0) == 1000.0
    assert sphere(10) == pytest.approx(1000.0 / 2.2)
    assert sphere(10**6) == 5.0
    lsm = mk.nn.LambdaSchedule.lsoftmax_mnist()
    assert lsm(0) == 1000.0 and lsm(10**6) == pytest.approx(1000.0 * 26.0**-35)


def test_state_dict_round_trip_resumes_lambda_schedule():
    x, _, y = _inputs(b=4, c=6, d=5)
    module = mk.nn.SphereFaceLoss(5, 6, schedule=mk.nn.LambdaSchedule.sphereface())
    for _ in range(7):
        module(x, y).backward()
    assert module.iteration == 7
    state = module.state_dict()
    resumed = mk.nn.SphereFaceLoss(5, 6, schedule=mk.nn.LambdaSchedule.sphereface())
    resumed.load_state_dict(state)
    assert resumed.iteration == 7
    assert resumed.current_lambda == module.current_lambda
    assert torch.equal(resumed.weight, module.weight)
    module.eval()
    module(x, y)
    assert module.iteration == 7, "evaluation does not advance the schedule"


def test_reference_path_compiles_fullgraph_with_backward():
    x, w, y = _inputs(b=6, c=11, d=8)
    x.requires_grad_()
    fn = torch.compile(lambda a, b, t: mk.arcface_loss(a, b, t, backend="torch"), fullgraph=True)
    loss = fn(x, w, y)
    loss.backward()
    assert torch.allclose(loss, mk.arcface_loss(x, w, y))
    eager_x = x.detach().clone().requires_grad_()
    mk.arcface_loss(eager_x, w, y).backward()
    assert torch.allclose(x.grad, eager_x.grad, atol=1e-6)
