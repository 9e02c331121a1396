"""ClassParallelMarginLoss refuses settings that differ across ranks: gloo groups of 2 and 3 CPU
processes, each rank building its head with its own value of one setting. Every rank must raise
the same ValueError (no rank left waiting in a collective), and the group must still be in step
afterwards (a consistent call then succeeds on every rank).

Workers are spawned once per group size (a module fixture) and run every check in order; each
check's outcome (None or the traceback) is reported and asserted by the tests below.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from helpers import init_gloo, run_gloo_group, save_report_and_leave

from margin_kernels.distributed import ClassParallelMarginLoss
from margin_kernels.spec import MarginSpec

GROUP_TIMEOUT_S = 60
DIM = 4
LOCAL_BATCH = 3


def _head(num_classes=12, margin=None, dtype=torch.float64, backend="torch", **kw):
    margin = margin if margin is not None else MarginSpec.cosface(8.0, 0.35)
    return ClassParallelMarginLoss(DIM, num_classes, margin, backend=backend, dtype=dtype, **kw)


def _batch(rank, num_classes=12):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(LOCAL_BATCH, DIM, generator=g, dtype=torch.float64)
    return x, torch.randint(0, num_classes, (LOCAL_BATCH,), generator=g)


# rank -> head of that rank: one setting differs on the last rank only, or on rank 0 only
MISMATCHES = {
    "scale": (
        lambda rank, world: _head(margin=MarginSpec.cosface(64.0 if rank == 0 else 8.0)),
        "margin s: rank 0 64.0, rank 1 8.0",
    ),
    "kind": (
        lambda rank, world: _head(
            margin=MarginSpec.arcface(8.0) if rank == world - 1 else MarginSpec.cosface(8.0)
        ),
        "margin kind:",
    ),
    "num_classes": (
        lambda rank, world: _head(num_classes=13 if rank == 0 else 14),
        "num_classes: rank 0 13, rank 1 14",
    ),
    "reduction": (
        lambda rank, world: _head(reduction="sum" if rank == world - 1 else "mean"),
        "reduction: rank 0 mean, rank 1",
    ),
    "ignore_index": (
        lambda rank, world: _head(ignore_index=-100 if rank == 0 else 3),
        "ignore_index: rank 0 -100, rank 1 3",
    ),
    "sample_rate": (
        lambda rank, world: _head(sample_rate=1.0 if rank == 0 else 0.5),
        "sample_rate: rank 0 1.0, rank 1 0.5",
    ),
    "annealed_lambda": (
        lambda rank, world: _head(margin=MarginSpec.sphereface(4, lam=5.0 if rank else 6.0)),
        "margin lam: rank 0 6.0, rank 1 5.0",
    ),
    "grad_mode": (
        lambda rank, world: _head(
            margin=MarginSpec.arcface(8.0, grad_mode="straight_through" if rank else "exact")
        ),
        "margin grad_mode: rank 0 exact, rank 1 straight_through",
    ),
    "weight_dtype": (
        lambda rank, world: _head(dtype=torch.float32 if rank == world - 1 else torch.float64),
        "weight dtype: rank 0 torch.float64",
    ),
}


def _check_mismatch(rank, world, name):
    import torch.distributed as dist

    make, expected = MISMATCHES[name]
    head = make(rank, world)
    x, y = _batch(rank, min(head.num_classes, 12))
    message = None
    try:
        head(x, y)
    except ValueError as err:
        message = str(err)
    messages = [None] * world
    dist.all_gather_object(messages, message)
    assert message is not None, "a mismatched setting must be refused"
    assert "settings differ across ranks" in message and expected in message, message
    assert all(m == message for m in messages), f"ranks raised different errors: {messages}"
    # the group is still in step: consistent heads work on every rank afterwards
    assert torch.isfinite(_head()(x, y))


def _check_allowed_differences(rank, world):
    """The seed and the backend may differ per rank (each rank samples its own shard; a
    backend changes how, not what, a shard computes): not refused."""
    head = _head(sample_rate=0.5, seed=rank, backend="auto" if rank == 0 else "torch")
    x, y = _batch(rank)
    assert torch.isfinite(head(x, y))


def _check_lm_softmax_needs_two_classes(rank, world):
    import torch.distributed as dist

    # one single-rank group per rank (new_group is collective: every rank creates all of them)
    groups = [dist.new_group([r]) for r in range(world)]
    try:
        _head(num_classes=1, margin=MarginSpec.lm_softmax(), process_group=groups[rank])
    except ValueError as err:
        assert "needs num_classes >= 2" in str(err), str(err)
    else:
        raise AssertionError("LM-Softmax with one class must be refused")
    head = _head(num_classes=2, margin=MarginSpec.lm_softmax(), process_group=groups[rank])
    x, _ = _batch(rank)
    assert torch.isfinite(head(x, torch.tensor([0, 1, 1])))


def _checks(rank, world):
    for name in MISMATCHES:
        yield f"mismatch[{name}]", lambda n=name: _check_mismatch(rank, world, n)
    yield "allowed_differences", lambda: _check_allowed_differences(rank, world)
    yield "lm_softmax_two_classes", lambda: _check_lm_softmax_needs_two_classes(rank, world)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    init_gloo(rank, world, store, GROUP_TIMEOUT_S)
    report = {}
    for name, check in _checks(rank, world):
        try:
            check()
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
    save_report_and_leave(report, out_dir, rank)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def reports(request, tmp_path_factory):
    return run_gloo_group(
        _worker, request.param, tmp_path_factory.mktemp(f"config{request.param}"), GROUP_TIMEOUT_S
    )


def _assert_passed(reports: list[dict], name: str) -> None:
    failures = {r: rep[name] for r, rep in enumerate(reports) if rep[name] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatched_setting_raises_the_same_error_on_every_rank(reports, name):
    _assert_passed(reports, f"mismatch[{name}]")


def test_seed_and_backend_may_differ(reports):
    _assert_passed(reports, "allowed_differences")


def test_lm_softmax_needs_two_classes(reports):
    _assert_passed(reports, "lm_softmax_two_classes")
