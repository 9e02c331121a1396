"""compat.insightface.PartialFC_V2 warns once when a rank samples no class at all
(int(sample_rate * num_local) == 0 and no label in its shard): its classes then leave the
denominator, and with every label on one rank the loss is exactly 0 (arcface_torch is silent)."""

from __future__ import annotations

import warnings

import pytest
import torch

from margin_kernels.compat import insightface as compat


def test_empty_sample_warns_once():
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 4, 10, 0.05)
    assert head.num_sample == 0
    no_positive = torch.full((6,), -1)
    with pytest.warns(RuntimeWarning, match=r"sampled 0 of its 10 classes.*\(warned once\)"):
        assert head.sample_class_ids(no_positive).numel() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert head.sample_class_ids(no_positive).numel() == 0  # once per head
        # a rank holding a positive keeps it: no warning
        assert head.sample_class_ids(torch.tensor([3, -1])).tolist() == [3]
