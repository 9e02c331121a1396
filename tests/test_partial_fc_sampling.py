"""PartialFC_V2's class sampling draws the same random numbers as arcface_torch's, step after
step: a checkpointed run resumed with the same seed must sample the same classes.

The rule restated below (our own code, written from arcface_torch's behaviour): the distinct
positive local ids; when they fit in ``num_sample`` (equality included) one uniform key per
local class from the global CPU generator, the positives keyed above every draw, and the
``num_sample`` largest keys' ids in ascending order; with more positives than that, the
positives alone and no draw. The equality case is where a strict comparison would skip the draw
and leave every later step on a different random stream."""

from __future__ import annotations

import pytest
import torch

from margin_kernels.compat import insightface as compat


def _arcface_torch_sample(local_target: torch.Tensor, num_local: int, num_sample: int):
    """(ids, drew a key per class) of one sampling step, by arcface_torch's rule."""
    positive = torch.unique(local_target[local_target >= 0], sorted=True)
    if positive.numel() > num_sample:
        return positive, False
    keys = torch.rand(num_local)
    keys[positive] = 2.0
    return torch.topk(keys, k=num_sample).indices.sort().values, True


def _targets(num_positive: int, num_local: int, batch: int, seed: int) -> torch.Tensor:
    """(batch,) local labels with exactly ``num_positive`` distinct ids and some -1 rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_local, generator=g)[:num_positive]
    target = ids[torch.arange(batch) % num_positive]
    target[::7] = -1
    target[:num_positive] = ids  # every id at least once
    return target[torch.randperm(batch, generator=g)]


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_follows_arcface_torchs_random_stream_across_steps(seed):
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 8, 40, 0.25)
    assert (head.num_local, head.num_sample) == (40, 10)
    # at the boundary (10 positives), below it, above it (no draw), at it again, below
    steps = [_targets(n, head.num_local, 24, seed + k) for k, n in enumerate((10, 3, 12, 10, 5))]
    assert [int(t[t >= 0].unique().numel()) for t in steps] == [10, 3, 12, 10, 5]
    torch.manual_seed(seed)
    ours = [head.sample_class_ids(t) for t in steps]
    ours_state = torch.get_rng_state()
    torch.manual_seed(seed)
    theirs = [_arcface_torch_sample(t, head.num_local, head.num_sample) for t in steps]
    assert [drew for _, drew in theirs] == [True, True, False, True, True]
    for step, (got, (want, _)) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(got.cpu(), want), f"step {step}: {got.tolist()} != {want.tolist()}"
    assert torch.equal(ours_state, torch.get_rng_state())
    assert torch.equal(head.weight_index, ours[-1])
