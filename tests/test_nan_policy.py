"""NaN policy, the same in every backend: a NaN in a feature row makes that row's loss NaN (and
only that row's); a NaN in a weight row that takes part in the denominator makes every row's
loss NaN; a NaN never turns into 0, -inf or a finite loss.

Backends: the torch reference always, the cuda backend's C++ CPU kernels when the extension is
built, the Triton kernels under ``TRITON_INTERPRET=1`` (or on a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_SPECS, HAS_EXTENSION, TRITON_DEVICE

import margin_kernels as mk

BACKENDS = {
    "torch": torch.device("cpu"),
    "cuda": torch.device("cpu") if HAS_EXTENSION else None,
    "triton": TRITON_DEVICE,
}
SPECS = ["cosface", "arcface_exact_fallback", "lsoftmax_m4", "w_softmax", "lm_softmax"]
B, C, D = 5, 10, 8


def _backend_or_skip(name: str) -> torch.device:
    device = BACKENDS[name]
    if device is None:
        reasons = {
            "cuda": "margin_kernels._C is not built",
            "triton": "needs Triton with TRITON_INTERPRET=1 or a GPU",
        }
        pytest.skip(reasons[name])
    return device


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 2, 9])
    return x, w, y


def _losses(name, spec, x, w, y):
    device = _backend_or_skip(name)
    dtype = torch.float32
    return mk.margin_cross_entropy(
        x.to(device, dtype), w.to(device, dtype), y.to(device), spec, reduction="none", backend=name
    ).cpu()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("spec_name", SPECS)
def test_nan_feature_poisons_its_row_only(backend, spec_name):
    spec = ALL_SPECS[spec_name]
    x, w, y = _data()
    clean = _losses(backend, spec, x, w, y)
    x[1, 3] = float("nan")
    got = _losses(backend, spec, x, w, y)
    assert torch.isnan(got[1]), got
    others = torch.arange(B) != 1
    assert torch.isfinite(got[others]).all(), got
    torch.testing.assert_close(got[others], clean[others])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("spec_name", SPECS)
def test_nan_weight_row_poisons_every_row(backend, spec_name):
    spec = ALL_SPECS[spec_name]
    x, w, y = _data()
    # class 7 is no row's target: it takes part in every row's denominator only
    w[7, 0] = float("nan")
    got = _losses(backend, spec, x, w, y)
    assert torch.isnan(got).all(), got


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_nan_target_weight_poisons_the_rows_of_that_class(backend):
    spec = ALL_SPECS["cosface"]
    x, w, _ = _data()
    y = torch.tensor([0, 3, 3, 2, 9])
    w[3, 5] = float("nan")  # the target of rows 1, 2, and a negative of every other row
    got = _losses(backend, spec, x, w, y)
    assert torch.isnan(got).all(), got


@pytest.mark.parametrize("spec_name", SPECS)
def test_backends_agree_on_the_nan_pattern(spec_name):
    spec = ALL_SPECS[spec_name]
    x, w, y = _data()
    x[2, 0] = float("nan")
    runs = {}
    for name, device in BACKENDS.items():
        if device is not None:
            runs[name] = _losses(name, spec, x, w, y)
    if len(runs) < 2:
        pytest.skip("needs a second backend besides the reference")
    for name, got in runs.items():
        assert torch.equal(torch.isnan(got), torch.isnan(runs["torch"])), name
        finite = ~torch.isnan(got)
        torch.testing.assert_close(got[finite], runs["torch"][finite], rtol=1e-4, atol=1e-4)
