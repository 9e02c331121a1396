"""Class-parallel loss on torch.distributed: gloo process groups of 2 and 3 CPU processes.

Each group is spawned once per module (a fixture); its workers run every check in order, each
check ending with its assertions after all of its collectives, and report per check ``None`` or
the traceback. The tests below assert on those reports, so one spawn serves the whole matrix.
Float64 throughout, so the distributed loss and gradients must equal the single-process
reference on the concatenated batch to rounding.

The exact and Partial-FC checks run for every backend that runs on CPU: ``torch``, ``triton``
(under ``TRITON_INTERPRET=1``, which the workers inherit) and ``cuda`` on the C++ CPU twin of its
epilogues (the workers point the backend's CPU check and ``lse_parts`` at its CPU entry point,
see tests/cpu_backends.py); each shard's lse_parts then receives rows whose label another rank
owns (as -1: no target here). The fused backends run two reductions ("mean", "none") of the
exact checks to keep the interpreter's time bounded. (Targets >= C and < -1 straight into
lse_parts: tests/test_shard_targets.py.)
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from cpu_backends import cpu_lse_parts
from helpers import init_gloo, run_gloo_group, save_report_and_leave

import margin_kernels as mk
from margin_kernels.distributed import ClassParallelMarginLoss, shard_range
from margin_kernels.spec import MarginSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_distributed.py"
GROUP_TIMEOUT_S = 240
IGNORE = -100

# test name -> backend name passed to the head ("cuda" runs its CPU twin in the workers).
HEAD_BACKENDS = {"torch": "torch", "triton": "triton", "cuda_cpu": "cuda"}
FUSED_REDUCTIONS = ("mean", "none")


def _runnable_backends() -> dict[str, str | None]:
    """test backend name -> None if it runs here, else the reason it cannot."""
    return {name: cpu_lse_parts(name)[1] for name in HEAD_BACKENDS}


RUNNABLE = _runnable_backends()


def _reductions(backend: str) -> tuple[str, ...]:
    return REDUCTIONS if backend == "torch" else FUSED_REDUCTIONS


def _tolerances() -> dict:
    """rtol/atol of the exact checks: float64 rounding on every backend and kind (the fused
    kernels' combined-margin arccos is refined to float64 too)."""
    return {"rtol": 1e-10, "atol": 1e-12}


def _use_cuda_cpu_twin() -> None:
    """In a worker: let backend="cuda" run on CPU tensors through the CPU twin."""
    from margin_kernels.ops import cuda as cuda_backend

    cpu_entry, _ = cpu_lse_parts("cuda_cpu")
    cuda_backend.unavailable_reason = lambda device, spec: None
    cuda_backend.lse_parts = cpu_entry


KINDS = {
    "cosface": MarginSpec.cosface(s=8.0, m=0.35),
    "arcface": MarginSpec.arcface(s=8.0, m=0.5),
    "combined": MarginSpec.combined(s=8.0),
    "sphereface": MarginSpec.sphereface(m=4),
    "lsoftmax": MarginSpec.lsoftmax(m=2),
    "lm_softmax": MarginSpec.lm_softmax(s=5.0),
    "so_softmax": MarginSpec.so_softmax(),
    "soft_margin": MarginSpec.soft_margin(m=0.1),
}
REDUCTIONS = ("mean", "sum", "none")

# world -> (C, D, local batch sizes, global labels in rank order). C=11 over 3 ranks gives the
# uneven shards [0, 4), [4, 8), [8, 11); rows are labelled by their own rank, by other ranks,
# or ignored. World 2 has an empty rank (B_1 = 0).
EXACT_CASES = {
    3: (11, 6, (3, 1, 2), [0, 10, IGNORE, 5, 4, 7]),
    2: (7, 5, (3, 0), [6, IGNORE, 1]),
}
# Partial FC: C=40 over the group, sample rate 0.5.
SAMPLED_LABELS = [0, 13, 14, 39, 20, 20, IGNORE, 27]


def _data(num_classes: int, dim: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    return x, w


def _local_rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _reference_grads(x, w, labels, spec, reduction, class_ids=None, row_weights=None):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = mk.margin_cross_entropy(
        x, w, labels, spec, reduction=reduction, backend="torch", class_ids=class_ids
    )
    (loss if row_weights is None else (loss * row_weights).sum()).backward()
    return loss.detach(), x.grad, w.grad


def _head(num_classes, dim, spec, **kw):
    kw.setdefault("backend", "torch")
    return ClassParallelMarginLoss(dim, num_classes, spec, dtype=torch.float64, **kw)


# --- checks run inside the workers ------------------------------------------------------------
def _check_exact(rank, world, spec, reduction, validate=True, backend="torch"):
    num_classes, dim, sizes, label_list = EXACT_CASES[world]
    labels = torch.tensor(label_list)
    x, w = _data(num_classes, dim, len(label_list))
    row_weights = torch.linspace(0.5, 1.5, len(label_list), dtype=torch.float64)
    ref_loss, ref_dx, ref_dw = _reference_grads(
        x, w, labels, spec, reduction, row_weights=row_weights if reduction == "none" else None
    )
    head = _head(
        num_classes, dim, spec, reduction=reduction, validate=validate,
        backend=HEAD_BACKENDS[backend],
    )  # fmt: skip
    head.init_from_full_weight(w)
    rows = _local_rows(sizes, rank)
    x_local = x[rows].clone().requires_grad_()
    loss = head(x_local, labels[rows])
    (loss if reduction != "none" else (loss * row_weights).sum()).backward()
    tol = _tolerances()
    torch.testing.assert_close(loss.detach(), ref_loss, **tol)
    torch.testing.assert_close(x_local.grad, ref_dx[rows], **tol)
    shard = slice(head.class_start, head.class_end)
    torch.testing.assert_close(head.weight.grad, ref_dw[shard], **tol)


def _check_equal_batches_without_validation(rank, world):
    spec = KINDS["arcface"]
    num_classes, dim, batch = 9, 4, 2 * world
    labels = torch.arange(batch) % num_classes
    x, w = _data(num_classes, dim, batch, seed=3)
    ref_loss, ref_dx, ref_dw = _reference_grads(x, w, labels, spec, "mean")
    head = _head(num_classes, dim, spec, validate=False)
    head.init_from_full_weight(w)
    rows = _local_rows((2,) * world, rank)
    x_local = x[rows].clone().requires_grad_()
    loss = head(x_local, labels[rows])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_local.grad, ref_dx[rows], rtol=1e-10, atol=1e-12)
    shard = slice(head.class_start, head.class_end)
    torch.testing.assert_close(head.weight.grad, ref_dw[shard], rtol=1e-10, atol=1e-12)


def _sampling_setup(world):
    labels = torch.tensor(SAMPLED_LABELS)
    sizes = (len(labels) - 2 * (world - 1),) + (2,) * (world - 1)
    return 40, 6, labels, sizes


def _check_sampling_positives_and_reproducible(rank, world):
    num_classes, dim, labels, _ = _sampling_setup(world)
    head = _head(num_classes, dim, KINDS["cosface"], sample_rate=0.5, seed=7)
    ids = head.sampled_class_ids(labels, step=5)
    s = head.num_sampled(len(labels))
    ceil_half = -(-head.num_local_classes // 2)
    assert s == min(head.num_local_classes, max(ceil_half, len(labels))), s
    assert ids.shape == (s,) and ids.dtype == torch.int64
    assert torch.equal(ids, ids.unique()), "ids must be unique and ascending"
    owned = [y - head.class_start for y in SAMPLED_LABELS if head.class_start <= y < head.class_end]
    assert set(owned) <= set(ids.tolist()), (owned, ids)
    assert torch.equal(ids, head.sampled_class_ids(labels, step=5)), "same step, same ids"
    again = _head(num_classes, dim, KINDS["cosface"], sample_rate=0.5, seed=7)
    assert torch.equal(ids, again.sampled_class_ids(labels, step=5)), "same seed, same ids"
    other_steps = [head.sampled_class_ids(labels, step=k) for k in (6, 7, 8)]
    assert any(not torch.equal(ids, o) for o in other_steps), "different steps must differ"
    other_seed = _head(num_classes, dim, KINDS["cosface"], sample_rate=0.5, seed=8)
    assert not torch.equal(ids, other_seed.sampled_class_ids(labels, step=5))


def _check_sampled_loss_and_sparse_dw(rank, world, backend="torch"):
    import torch.distributed as dist

    num_classes, dim, labels, sizes = _sampling_setup(world)
    spec = KINDS["arcface"]
    x, w = _data(num_classes, dim, len(labels), seed=1)
    head = _head(num_classes, dim, spec, sample_rate=0.5, seed=3, backend=HEAD_BACKENDS[backend])
    head.init_from_full_weight(w)
    head.step = 11
    local_ids = head.sampled_class_ids(labels, step=11)
    shards = [None] * world
    dist.all_gather_object(shards, (local_ids + head.class_start).tolist())
    union = torch.tensor(sorted(i for shard in shards for i in shard))
    rows = _local_rows(sizes, rank)
    x_local = x[rows].clone().requires_grad_()
    loss = head(x_local, labels[rows])
    loss.backward()
    assert head.step == 12
    ref_loss, ref_dx, ref_dw = _reference_grads(x, w, labels, spec, "mean", class_ids=union)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_local.grad, ref_dx[rows], rtol=1e-10, atol=1e-12)
    shard = slice(head.class_start, head.class_end)
    torch.testing.assert_close(head.weight.grad, ref_dw[shard], rtol=1e-10, atol=1e-12)
    sampled = torch.zeros(head.num_local_classes, dtype=torch.bool)
    sampled[local_ids] = True
    assert torch.all(head.weight.grad[~sampled] == 0), "unsampled rows must get no gradient"
    assert torch.all(head.weight.grad[sampled].abs().sum(1) > 0), "sampled rows get gradient"
    exact = _reference_grads(x, w, labels, spec, "mean")[0]
    assert not torch.allclose(loss.detach(), exact), "sampling changes the loss"
    head.eval()
    with torch.no_grad():
        eval_loss = head(x[rows], labels[rows])
    torch.testing.assert_close(eval_loss, exact, rtol=1e-12, atol=1e-12)
    assert head.step == 12, "evaluation does not advance the sampling stream"


def _check_state_dict_round_trip(rank, world):
    num_classes, dim, labels, sizes = _sampling_setup(world)
    head = _head(num_classes, dim, KINDS["cosface"], sample_rate=0.5, seed=5)
    rows = _local_rows(sizes, rank)
    x, _ = _data(num_classes, dim, len(labels))
    for _ in range(3):
        head(x[rows], labels[rows])
    state = head.state_dict()
    resumed = _head(num_classes, dim, KINDS["cosface"], sample_rate=0.5, seed=5)
    resumed.load_state_dict(state)
    assert resumed.step == head.step == 3
    assert torch.equal(resumed.weight, head.weight)
    torch.testing.assert_close(resumed(x[rows], labels[rows]), head(x[rows], labels[rows]))
    assert resumed.step == head.step == 4
    bad = dict(state["_extra_state"], class_range=(0, 1))
    try:
        resumed.set_extra_state(bad)
    except ValueError as err:
        assert "checkpoint shard holds classes" in str(err)
    else:
        raise AssertionError("a checkpoint of another shard must be refused")


def _check_full_weight_and_shards(rank, world):
    num_classes, dim, _, _ = EXACT_CASES[world]
    _, w = _data(num_classes, dim, 1)
    head = _head(num_classes, dim, KINDS["cosface"])
    assert (head.class_start, head.class_end) == shard_range(num_classes, rank, world)
    assert head.weight.shape == (head.num_local_classes, dim)
    head.init_from_full_weight(w)
    assert torch.equal(head.full_weight(), w)
    fresh = _head(num_classes, dim, KINDS["cosface"], seed=1)
    full = fresh.full_weight()
    bound = dim**-0.5
    assert full.abs().max() <= bound, "nn.Linear init bound 1/sqrt(D)"
    second = shard_range(num_classes, 1, world)[0]
    assert not torch.equal(full[0], full[second]), "shards are drawn from different streams"
    assert "classes=[" in repr(head) and "kind=cosface" in repr(head)


def _expect_error(exc_type, match, fn):
    try:
        fn()
    except exc_type as err:
        assert match in str(err), str(err)
        return str(err)
    raise AssertionError(f"expected {exc_type.__name__} matching {match!r}")


def _check_errors_on_every_rank(rank, world):
    num_classes, dim, sizes, label_list = EXACT_CASES[world]
    labels = torch.tensor(label_list)
    x, _ = _data(num_classes, dim, len(label_list))
    head = _head(num_classes, dim, KINDS["cosface"])
    rows = _local_rows(sizes, rank)
    x_local, y_local = x[rows], labels[rows]
    wide = torch.randn(x_local.shape[0], dim + 1, dtype=torch.float64)
    _expect_error(
        ValueError,
        f"rank 1: local_embeddings have D={dim + 1} features but in_features={dim}",
        lambda: head(wide if rank == 1 else x_local, y_local),
    )
    _expect_error(
        ValueError,
        "dtypes differ across ranks",
        lambda: head(x_local.float() if rank == world - 1 else x_local, y_local),
    )
    _expect_error(
        ValueError,
        "rank 0: local_labels must be a 1-D integer tensor",
        lambda: head(x_local, y_local.double() if rank == 0 else y_local),
    )
    _expect_error(
        ValueError,
        "rank 0: local_embeddings must be a 2-D tensor",
        lambda: head(x_local[None] if rank == 0 else x_local, y_local),
    )
    too_big = y_local.clone()
    too_big[:1] = num_classes  # rank 0's first row; every rank sees it after the gather
    _expect_error(
        IndexError, f"label value {num_classes} is out of range", lambda: head(x_local, too_big)
    )
    # after every rank raised at the same point the group is still in step
    assert torch.isfinite(head(x_local, y_local))
    _expect_error(
        ValueError,
        "cannot be class-parallel",
        lambda: _head(num_classes, dim, MarginSpec.w_softmax()),
    )
    _expect_error(
        ValueError,
        "cannot be class-parallel",
        lambda: setattr(head, "margin", MarginSpec.w_softmax()),
    )
    head.margin = KINDS["arcface"]  # reassigning a shardable margin (e.g. annealing) is fine
    assert head.margin.kind == "arcface"
    _expect_error(
        ValueError,
        "sample_rate must lie in (0, 1]",
        lambda: _head(num_classes, dim, KINDS["cosface"], sample_rate=0.0),
    )


def _check_empty_global_batch(rank, world):
    num_classes, dim, _, _ = EXACT_CASES[world]
    head = _head(num_classes, dim, KINDS["cosface"])
    x = torch.zeros(0, dim, dtype=torch.float64, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, dim)


def _load_example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_ddp_sum_hook_gives_single_process_backbone_grads(rank, world):
    """The example's recipe: DDP backbone with a summing comm hook + class-parallel head gives
    the backbone exactly the single-process gradient of the global loss."""
    from torch.nn.parallel import DistributedDataParallel

    example = _load_example()
    num_classes, dim, sizes, label_list = EXACT_CASES[world]
    labels = torch.tensor(label_list)
    inputs, w = _data(num_classes, dim, len(label_list), seed=4)
    torch.manual_seed(0)
    backbone = example.make_backbone(dim, dim).double()
    single = copy.deepcopy(backbone)
    spec = KINDS["arcface"]
    mk.margin_cross_entropy(single(inputs), w, labels, spec, backend="torch").backward()
    model = DistributedDataParallel(backbone)
    model.register_comm_hook(None, example.allreduce_sum_hook)
    head = _head(num_classes, dim, spec)
    head.init_from_full_weight(w)
    rows = _local_rows(sizes, rank)
    head(model(inputs[rows]), labels[rows]).backward()
    for got, want in zip(backbone.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def _check_example_resume_reproduces(rank, world, out_dir):
    """examples/train_distributed.py's train(): 4 steps straight, and 2 steps then --resume to
    4 (Partial FC at r = 0.5); the resumed steps reproduce the straight run's losses exactly,
    since the data and the class samples are seeded by the step."""
    example = _load_example()
    common = ["--classes", "40", "--batch-size", "16", "--sample-rate", "0.5"]
    common += ["--log-every", "100"]

    def train(steps, directory, *extra):
        argv = [*common, "--steps", str(steps), "--checkpoint-dir", directory, *extra]
        return example.train(example.parse_args(argv), torch.device("cpu"))[0]

    straight = train(4, os.path.join(out_dir, "straight"))
    assert sorted(straight) == [1, 2, 3, 4]
    assert train(2, os.path.join(out_dir, "resumed")) == {1: straight[1], 2: straight[2]}
    resumed = train(4, os.path.join(out_dir, "resumed"), "--resume")
    assert resumed == {3: straight[3], 4: straight[4]}, (resumed, straight)


def _checks(rank, world, out_dir):
    for backend, reason in RUNNABLE.items():
        if reason is not None:
            continue
        for kind, spec in KINDS.items():
            for reduction in _reductions(backend):
                yield (
                    f"exact[{backend}-{kind}-{reduction}]",
                    lambda s=spec, r=reduction, b=backend: _check_exact(
                        rank, world, s, r, backend=b
                    ),
                )
        if backend != "torch":
            yield (
                f"sampled_loss_sparse_dw[{backend}]",
                lambda b=backend: _check_sampled_loss_and_sparse_dw(rank, world, b),
            )
    yield (
        "equal_batches_no_validation",
        lambda: _check_equal_batches_without_validation(rank, world),
    )
    yield (
        "sampling_positives_reproducible",
        lambda: _check_sampling_positives_and_reproducible(rank, world),
    )
    yield "sampled_loss_sparse_dw", lambda: _check_sampled_loss_and_sparse_dw(rank, world)
    yield "state_dict_round_trip", lambda: _check_state_dict_round_trip(rank, world)
    yield "full_weight_and_shards", lambda: _check_full_weight_and_shards(rank, world)
    yield "errors_on_every_rank", lambda: _check_errors_on_every_rank(rank, world)
    yield "empty_global_batch", lambda: _check_empty_global_batch(rank, world)
    yield (
        "ddp_sum_hook",
        lambda: _check_ddp_sum_hook_gives_single_process_backbone_grads(rank, world),
    )
    yield "example_resume", lambda: _check_example_resume_reproduces(rank, world, out_dir)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    if RUNNABLE["cuda_cpu"] is None:
        _use_cuda_cpu_twin()
    init_gloo(rank, world, store, GROUP_TIMEOUT_S)
    report = {}
    for name, check in _checks(rank, world, out_dir):
        try:
            check()
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
    save_report_and_leave(report, out_dir, rank)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def reports(request, tmp_path_factory):
    return run_gloo_group(
        _worker, request.param, tmp_path_factory.mktemp(f"world{request.param}"), GROUP_TIMEOUT_S
    )


def _assert_passed(reports: list[dict], name: str) -> None:
    failures = {r: rep[name] for r, rep in enumerate(reports) if rep[name] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


# --- the tests ---------------------------------------------------------------------------------
def _skip_unless_runnable(backend: str) -> None:
    if RUNNABLE[backend] is not None:
        pytest.skip(f"{backend}: {RUNNABLE[backend]}")


@pytest.mark.parametrize(
    ("backend", "reduction"),
    [(b, r) for b in HEAD_BACKENDS for r in _reductions(b)],
)
@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_and_gradients_equal_single_process(reports, backend, kind, reduction):
    """Loss, d loss/d local embeddings and d loss/d weight shard equal the single-process
    reference on the concatenated batch: uneven shards, unequal (and empty) local batches,
    ignored rows and labels owned by other ranks."""
    _skip_unless_runnable(backend)
    _assert_passed(reports, f"exact[{backend}-{kind}-{reduction}]")


def test_equal_batches_without_validation(reports):
    _assert_passed(reports, "equal_batches_no_validation")


def test_sampling_keeps_positives_and_is_reproducible(reports):
    _assert_passed(reports, "sampling_positives_reproducible")


def test_sampled_loss_matches_reference_and_only_sampled_rows_get_dw(reports):
    _assert_passed(reports, "sampled_loss_sparse_dw")


@pytest.mark.parametrize("backend", [b for b in HEAD_BACKENDS if b != "torch"])
def test_sampled_loss_on_the_fused_backends(reports, backend):
    _skip_unless_runnable(backend)
    _assert_passed(reports, f"sampled_loss_sparse_dw[{backend}]")


def test_state_dict_round_trip_resumes_sampling(reports):
    _assert_passed(reports, "state_dict_round_trip")


def test_full_weight_init_and_shards(reports):
    _assert_passed(reports, "full_weight_and_shards")


def test_bad_input_raises_same_error_on_every_rank(reports):
    """Mismatched D or dtype, bad labels: every rank raises (no hang) and stays in step."""
    _assert_passed(reports, "errors_on_every_rank")


def test_empty_global_batch(reports):
    _assert_passed(reports, "empty_global_batch")


# --- single-process checks ----------------------------------------------------------------------
def test_shard_range_uneven_split():
    assert [shard_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]
    assert [shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="num_classes=2 must be >= world_size=3"):
        shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank must lie in"):
        shard_range(4, 3, 3)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClassParallelMarginLoss(4, 10, KINDS["cosface"])


def test_ddp_backbone_with_sum_hook_gets_single_process_gradients(reports):
    _assert_passed(reports, "ddp_sum_hook")


def test_example_resume_reproduces_uninterrupted_run(reports):
    _assert_passed(reports, "example_resume")


def test_example_runs_under_torchrun(tmp_path):
    """The example's command line: torchrun, 2 gloo ranks, 2 steps, a checkpoint per rank."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(EXAMPLE), "--steps", "2"]
    cmd += ["--classes", "40", "--batch-size", "16", "--checkpoint-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 2 loss" in done.stdout and "held-out accuracy" in done.stdout, done.stdout
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state["step"] == 2 and state["head"]["_extra_state"]["step"] == 2
