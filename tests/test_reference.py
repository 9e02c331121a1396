"""The pure-torch reference: psi values, special cases, float64 gradcheck, gradient conventions,
ignore_index and reductions."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_SPECS, PSI_VALUES

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.spec import MarginSpec


def _data(b=6, c=9, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return x, w, y


@pytest.mark.parametrize("m", sorted(PSI_VALUES))
def test_psi_reference_values(m):
    for degrees, expected in PSI_VALUES[m].items():
        c = torch.tensor(math.cos(math.radians(degrees)), dtype=torch.float64)
        assert reference.psi(c, m).item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_is_continuous_monotone_and_matches_cos_m_theta(m):
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    value = reference.psi(torch.cos(theta), m)
    assert torch.all(value[1:] < value[:-1] + 1e-12), "psi must decrease with theta"
    assert torch.allclose(value[0], torch.tensor(1.0, dtype=torch.float64))
    first_piece = theta <= math.pi / m
    assert torch.allclose(value[first_piece], torch.cos(m * theta[first_piece]))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_psi_gradient_is_polynomial_derivative(m):
    theta = torch.tensor([0.3, 1.1, 2.0, 2.9], dtype=torch.float64)
    c = torch.cos(theta).requires_grad_()
    reference.psi(c, m).sum().backward()
    k = torch.floor(theta * m / math.pi)
    # d cos(m theta)/dc = m sin(m theta) / sin(theta): the same polynomial derivative
    expected = (-1) ** k * m * torch.sin(m * theta) / torch.sin(theta)
    assert torch.allclose(c.grad, expected)


def test_cosface_m0_s1_is_cross_entropy_on_normalised_logits():
    x, w, y = _data()
    logits = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    expected = F.cross_entropy(logits, y)
    assert torch.allclose(mk.cosface_loss(x, w, y, s=1.0, m=0.0), expected)


def test_lm_softmax_relates_to_cross_entropy_by_softplus():
    x, w, y = _data()
    s = 5.0
    lm = mk.lm_softmax_loss(x, w, y, s=s, reduction="none")
    ce = F.cross_entropy(s * F.normalize(x, dim=1) @ F.normalize(w, dim=1).T, y, reduction="none")
    assert torch.allclose(F.softplus(lm), ce)


def test_lsoftmax_m1_lambda0_is_plain_softmax():
    x, w, y = _data()
    assert torch.allclose(mk.lsoftmax_loss(x, w, y, m=1, lam=0.0), F.cross_entropy(x @ w.T, y))


def test_lsoftmax_large_lambda_approaches_plain_softmax():
    x, w, y = _data()
    loss = mk.lsoftmax_loss(x, w, y, m=4, lam=1e9)
    assert torch.allclose(loss, F.cross_entropy(x @ w.T, y), rtol=1e-6)


def test_w_softmax_alpha0_is_normalised_weight_softmax():
    x, w, y = _data()
    expected = F.cross_entropy(x @ F.normalize(w, dim=1).T, y)
    assert torch.allclose(mk.w_softmax_loss(x, w, y, alpha=0.0), expected)


def test_combined_reduces_to_arcface_and_cosface():
    x, w, y = _data()
    arc = mk.arcface_loss(x, w, y, s=8.0, m=0.4, overflow="none")
    assert torch.allclose(mk.combined_margin_loss(x, w, y, s=8.0, m1=1.0, m2=0.4, m3=0.0), arc)
    cos = mk.cosface_loss(x, w, y, s=8.0, m=0.2)
    assert torch.allclose(mk.combined_margin_loss(x, w, y, s=8.0, m1=1.0, m2=0.0, m3=0.2), cos)


def test_soft_margin_is_ce_with_target_logit_minus_m():
    x, w, y = _data()
    logits = x @ w.T
    logits = logits - 0.3 * F.one_hot(y, w.shape[0])
    expected = F.cross_entropy(logits, y)
    got = mk.margin_cross_entropy(x, w, y, MarginSpec.soft_margin(0.3))
    assert torch.allclose(got, expected)


def test_margin_losses_match_a_dense_logit_construction():
    """An independent dense computation (one-hot replace of the target logit) of each kind."""
    x, w, y = _data()
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(y, w.shape[0]).bool()
    c_y = cos[onehot]
    theta = torch.acos(c_y)
    xn = x.norm(dim=1)
    cases = {
        MarginSpec.cosface(8.0, 0.35): (8 * cos, 8 * (c_y - 0.35)),
        MarginSpec.arcface(8.0, 0.5, overflow="none"): (8 * cos, 8 * torch.cos(theta + 0.5)),
        MarginSpec.sphereface(2): (
            xn[:, None] * cos,
            xn * torch.where(theta <= math.pi / 2, torch.cos(2 * theta), -torch.cos(2 * theta) - 2),
        ),
        MarginSpec.so_softmax(2.0, 3.0, 0.3): (3 * (cos**2 - 0.09), 2 * (0.09 - (c_y - 1) ** 2)),
    }
    for spec, (nontarget, target) in cases.items():
        logits = nontarget.masked_scatter(onehot, target)
        expected = F.cross_entropy(logits, y)
        assert torch.allclose(mk.margin_cross_entropy(x, w, y, spec), expected), spec.kind


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_gradcheck_every_loss(name):
    """Straight-through mode is deliberately not the true gradient: tested separately below."""
    spec = ALL_SPECS[name]
    x, w, y = _data(b=5, c=7, d=4, seed=1)
    x.requires_grad_()
    w.requires_grad_()
    y[3] = -100
    assert torch.autograd.gradcheck(
        lambda a, b: mk.margin_cross_entropy(a, b, y, spec, reduction="sum"), (x, w)
    )


def _near_target(c_target, b=4, c=6, d=5, seed=2):
    """Features whose cosine to their target weight is c_target."""
    x, w, y = _data(b, c, d, seed)
    wy = F.normalize(w[y], dim=1)
    noise = torch.randn_like(x)
    ortho = F.normalize(noise - (noise * wy).sum(1, keepdim=True) * wy, dim=1)
    x = 3.0 * (c_target * wy + math.sqrt(1 - c_target**2) * ortho)
    return x, w, y


@pytest.mark.parametrize("c_target", [0.9999, -0.9999, -0.95])
@pytest.mark.parametrize(
    "spec",
    [
        MarginSpec.arcface(8.0, 0.5),
        MarginSpec.arcface(8.0, 0.5, overflow="none"),
        MarginSpec.arcface(8.0, 0.5, overflow="easy"),
        MarginSpec.combined(8.0, 1.2, 0.3, 0.1),
        MarginSpec.sphereface(4),
        MarginSpec.lsoftmax(3),
        MarginSpec.cosface(8.0),
    ],
    ids=lambda s: f"{s.kind}-{s.overflow}",
)
def test_gradcheck_near_unit_cosine_and_past_pi(spec, c_target):
    """|cos| -> 1 and theta + m > pi (c = -0.95, m = 0.5: theta = 2.82 > pi - 0.5)."""
    x, w, y = _near_target(c_target)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: mk.margin_cross_entropy(a, b, y, spec, reduction="sum"), (x, w)
    )


def test_gradients_finite_at_exact_unit_cosine():
    """Features copied into W (c = 1 exactly) at s = 64: finite loss and gradients."""
    x, w, y = _data(b=4, c=6, d=5, dtype=torch.float32)
    x = w[y].clone().requires_grad_()
    w = w.clone().requires_grad_()
    for fn in (mk.arcface_loss, mk.combined_margin_loss, mk.cosface_loss, mk.sphereface_loss):
        loss = fn(x, w, y)
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_arcface_exact_vs_straight_through_gradients():
    """Same value; d T/dc is s (cos m + sin m c / sin theta) in exact mode and s in
    straight-through mode; the fallback region has derivative s in both."""
    s, m = 16.0, 0.5
    c = torch.tensor([0.9, 0.3, -0.2, -0.7, -0.95], dtype=torch.float64)
    one = torch.ones_like(c)
    values, grads = {}, {}
    for mode in ("exact", "straight_through"):
        spec = MarginSpec.arcface(s, m, grad_mode=mode)
        cc = c.clone().requires_grad_()
        t = reference.target_transform(cc, one, one, spec)
        t.sum().backward()
        values[mode], grads[mode] = t.detach(), cc.grad
    assert torch.equal(values["exact"], values["straight_through"])
    plain = c > -math.cos(m)
    sin_theta = torch.sqrt(1 - c**2)
    expected_exact = torch.where(plain, s * (math.cos(m) + math.sin(m) * c / sin_theta), s * one)
    assert torch.allclose(grads["exact"], expected_exact)
    assert torch.allclose(grads["straight_through"], s * one)
    expected_value = torch.where(plain, s * torch.cos(torch.acos(c) + m), s * (c - m * math.sin(m)))
    assert torch.allclose(values["exact"], expected_value)


def test_arcface_overflow_policies():
    s, m = 1.0, 0.5
    c = torch.tensor([0.5, -0.1, -0.95], dtype=torch.float64)
    one = torch.ones_like(c)
    plain = torch.cos(torch.acos(c) + m)

    def value(overflow):
        return reference.target_transform(c, one, one, MarginSpec.arcface(s, m, overflow=overflow))

    assert torch.allclose(value("none"), plain)
    assert torch.allclose(value("easy"), torch.where(c > 0, plain, c))
    fallback = torch.where(c > -math.cos(m), plain, c - m * math.sin(m))
    assert torch.allclose(value("fallback"), fallback)
    # the fallback keeps T monotone in c past theta + m > pi, "none" does not
    grid = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    ones = torch.ones_like(grid)
    fb = reference.target_transform(grid, ones, ones, MarginSpec.arcface(s, m))
    assert torch.all(fb[1:] >= fb[:-1])
    nn_ = reference.target_transform(grid, ones, ones, MarginSpec.arcface(s, m, overflow="none"))
    assert not torch.all(nn_[1:] >= nn_[:-1])


def test_ignore_index_and_reductions():
    x, w, y = _data(b=6)
    y = y.clone()
    y[[1, 4]] = -100
    x.requires_grad_()
    spec = MarginSpec.cosface(8.0, 0.2)
    rows = mk.margin_cross_entropy(x, w, y, spec, reduction="none")
    assert rows.shape == (6,)
    assert rows[1] == 0 and rows[4] == 0
    assert torch.allclose(mk.margin_cross_entropy(x, w, y, spec, reduction="sum"), rows.sum())
    mean = mk.margin_cross_entropy(x, w, y, spec, reduction="mean")
    assert torch.allclose(mean, rows.sum() / 4)
    mean.backward()
    assert torch.all(x.grad[[1, 4]] == 0)
    assert torch.all(x.grad[[0, 2, 3, 5]].abs().sum(1) > 0)
    # a custom ignore_index, which may even be a valid class id
    y2 = torch.tensor([0, 1, 2, 0])
    rows2 = mk.cosface_loss(x[:4], w, y2, ignore_index=0, reduction="none")
    assert rows2[0] == 0 and rows2[3] == 0 and rows2[1] > 0


def test_all_ignored_and_empty_batch_give_zero_not_nan():
    x, w, y = _data(b=3)
    x.requires_grad_()
    loss = mk.arcface_loss(x, w, torch.full_like(y, -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)
    empty = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum"):
        out = mk.arcface_loss(empty, w, torch.zeros(0, dtype=torch.long), reduction=reduction)
        assert out.item() == 0.0
    none = mk.arcface_loss(empty, w, torch.zeros(0, dtype=torch.long), reduction="none")
    assert none.shape == (0,)


def test_partial_fc_class_ids_equal_a_gathered_subproblem():
    x, w, y = _data(b=6, c=12)
    ids = torch.unique(torch.cat([y, torch.tensor([0, 5, 11])]))
    spec = MarginSpec.arcface(8.0, 0.5)
    remap = torch.full((12,), -1, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    expected = mk.margin_cross_entropy(x, w[ids], remap[y], spec)
    assert torch.allclose(mk.margin_cross_entropy(x, w, y, spec, class_ids=ids), expected)


def test_partial_fc_gradient_only_on_sampled_rows():
    x, w, y = _data(b=4, c=10)
    w.requires_grad_()
    ids = torch.unique(torch.cat([y, torch.tensor([9])]))
    mk.cosface_loss(x, w, y, class_ids=ids).backward()
    unsampled = torch.ones(10, dtype=torch.bool)
    unsampled[ids] = False
    assert torch.all(w.grad[unsampled] == 0)


def test_low_precision_inputs_compute_in_float32():
    x, w, y = _data(b=8, c=11, d=16, dtype=torch.float32)
    xe, we = x.double().requires_grad_(), w.double().requires_grad_()
    exact = mk.arcface_loss(xe, we, y)
    exact.backward()
    exact = exact.detach()
    for dtype in (torch.float16, torch.bfloat16):
        xl, wl = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        loss = mk.arcface_loss(xl, wl, y)
        assert loss.dtype == torch.float32
        # error comes from rounding the inputs, not from the computation
        rounded = mk.arcface_loss(xl.double(), wl.double(), y)
        assert torch.allclose(loss.double(), rounded, rtol=1e-5)
        # and the rounding moves the loss by its first-order change sum(dL/dv * (v_lp - v)):
        # second-order terms are ~eps times smaller, the float32 computation ~1e-7 * |loss|
        predicted = (xe.grad * (xl.double() - x.double())).sum()
        predicted += (we.grad * (wl.double() - w.double())).sum()
        change = loss.double() - exact
        assert abs(change - predicted) <= 0.02 * abs(predicted) + 1e-6 * abs(exact), (
            f"{dtype}: loss moved by {change.item():.3e}, first order: {predicted.item():.3e}"
        )
        loss.backward()
        assert xl.grad.dtype == dtype and wl.grad.dtype == dtype


def test_mixed_dtypes_promote_and_autocast_casts():
    x, w, y = _data(b=4, dtype=torch.float32)
    loss = mk.cosface_loss(x.to(torch.bfloat16), w, y)
    assert loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = mk.cosface_loss(x, w, y)
    assert amp.dtype == torch.float32
    assert torch.allclose(amp, mk.cosface_loss(x.bfloat16(), w.bfloat16(), y))


def test_non_contiguous_inputs():
    x, w, y = _data(b=6, c=9, d=8)
    xt = x.T.contiguous().T  # same values, column-major storage
    wv = torch.cat([w, w], dim=1)[:, ::2]  # strided view
    assert not xt.is_contiguous() and not wv.is_contiguous()
    expected = mk.arcface_loss(x, wv.contiguous(), y)
    assert torch.allclose(mk.arcface_loss(xt, wv, y), expected)


def test_regularisers_match_explicit_formulas():
    x, w, y = _data()
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    masked = cos.clone()
    masked[torch.arange(len(y)), y] = -2.0
    expected = (masked.max(1).values - cos[torch.arange(len(y)), y]).mean()
    assert torch.allclose(mk.sample_margin_regularization(x, w, y), expected)
    centroid = F.normalize(w, dim=1).sum(0)
    assert torch.allclose(mk.zero_centroid_regularization(w), centroid @ centroid)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mk.sample_margin_regularization(a, b, y), (x, w))
    assert torch.autograd.gradcheck(mk.zero_centroid_regularization, (w,))


def test_hsic_matches_gram_form_and_is_gradcheckable():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(7, 4, generator=g, dtype=torch.float64)
    v = torch.randn(7, 3, generator=g, dtype=torch.float64)
    h = torch.eye(7, dtype=torch.float64) - 1 / 7
    expected = torch.trace(u @ u.T @ h @ v @ v.T @ h) / 36
    assert torch.allclose(mk.hsic(u, v), expected)
    assert torch.allclose(mk.hsic(u + 5.0, v), mk.hsic(u, v)), "invariant to class-mean shifts"
    u.requires_grad_()
    v.requires_grad_()
    assert torch.autograd.gradcheck(mk.hsic, (u, v))


def test_em_softmax_one_head_is_soft_margin_and_gradcheck():
    x, w, y = _data()
    one = mk.em_softmax_loss(x, w[None], y, m=0.2, hsic_weight=1.0)
    assert torch.allclose(one, mk.margin_cross_entropy(x, w, y, MarginSpec.soft_margin(0.2)))
    heads = torch.stack([w, w.flip(0), w * 0.5]).requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: mk.em_softmax_loss(a, b, y, m=0.2, hsic_weight=0.5), (x, heads)
    )
    ce = sum(mk.margin_cross_entropy(x, heads[k], y, MarginSpec.soft_margin(0.2)) for k in range(3))
    pairs = [(0, 1), (0, 2), (1, 2)]
    div = sum(mk.hsic(heads[a], heads[b]) for a, b in pairs) / 3
    total = mk.em_softmax_loss(x, heads, y, m=0.2, hsic_weight=0.5)
    assert torch.allclose(total, ce / 3 + 0.5 * div)
