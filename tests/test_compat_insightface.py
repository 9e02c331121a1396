"""margin_kernels.compat.insightface against insightface arcface_torch's own algorithm.

arcface_torch has no pip package, so this file carries a minimal transcription of its
``CombinedMarginLoss`` (losses.py) and of ``PartialFC_V2``, ``DistCrossEntropyFunc`` and
``AllGatherFunc`` (partial_fc_v2.py), written from reading that source, with three changes that
leave the math alone: tensors stay on the CPU (no ``.cuda()``), buffers take the embeddings' dtype
(so float64 runs compare to rounding), and the autocast region is the CPU one (arcface_torch's
``torch.cuda.amp.autocast`` does nothing to CPU tensors). In-place operations, the
straight-through margin under ``no_grad``, the 1e-30 clamp, the gradient of the all-gather
(times the world size) and the sampling by ``torch.rand`` on the global generator are kept.

Gloo groups of 2 and 3 processes (spawned once per module) run every check and report; the tests
assert on the reports. Single-process checks run in the test process, without torch.distributed.
"""

from __future__ import annotations

import functools
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
from helpers import TRITON_DEVICE, init_gloo, run_gloo_group, save_report_and_leave
from torch import nn
from torch.nn.functional import linear, normalize

from margin_kernels import MarginSpec
from margin_kernels.compat import insightface as compat

GROUP_TIMEOUT_S = 60
NUM_CLASSES, DIM, LOCAL_BATCH = 40, 8, 4

# (s, m1, m2, m3, interclass_filtering_threshold): arcface_torch's two branches, with and
# without interclass filtering.
MARGINS = {
    "arcface": (64.0, 1.0, 0.5, 0.0, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4, 0.0),
    "arcface_filtered": (32.0, 1.0, 0.5, 0.0, 0.15),
    "cosface_filtered": (32.0, 1.0, 0.0, 0.35, 0.15),
}


# --- transcription of arcface_torch (losses.py, partial_fc_v2.py) ------------------------------
class RefCombinedMarginLoss(nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        index_positive = torch.where(labels != -1)[0]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).to(logits.dtype)
                mask = torch.ones([index_positive.size(0), logits.size(1)], dtype=logits.dtype)
                mask.scatter_(1, labels[index_positive], 0)
                dirty[index_positive] *= mask
                tensor_mul = 1 - dirty
            logits = tensor_mul * logits
        target_logit = logits[index_positive, labels[index_positive].view(-1)]
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                target_logit.arccos_()
                logits.arccos_()
                final_target_logit = target_logit + self.m2
                logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
                logits.cos_()
            logits = logits * self.s
        elif self.m3 > 0:
            final_target_logit = target_logit - self.m3
            logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
            logits = logits * self.s
        else:
            raise RuntimeError("unsupported margins")
        return logits


class RefAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, *gather_list):
        gather_list = list(gather_list)
        torch.distributed.all_gather(gather_list, tensor)
        return tuple(gather_list)

    @staticmethod
    def backward(ctx, *grads):
        dist = torch.distributed
        grad_list = list(grads)
        rank = dist.get_rank()
        grad_out = grad_list[rank]
        ops = [
            dist.reduce(
                grad_out if i == rank else grad_list[i], i, dist.ReduceOp.SUM, async_op=True
            )
            for i in range(dist.get_world_size())
        ]
        for op in ops:
            op.wait()
        grad_out *= len(grad_list)
        return (grad_out, *[None for _ in range(len(grad_list))])


class RefDistCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, label):
        dist = torch.distributed
        batch_size = logits.size(0)
        max_logits, _ = torch.max(logits, dim=1, keepdim=True)
        dist.all_reduce(max_logits, dist.ReduceOp.MAX)
        logits.sub_(max_logits)
        logits.exp_()
        sum_logits_exp = torch.sum(logits, dim=1, keepdim=True)
        dist.all_reduce(sum_logits_exp, dist.ReduceOp.SUM)
        logits.div_(sum_logits_exp)
        index = torch.where(label != -1)[0]
        loss = torch.zeros(batch_size, 1, dtype=logits.dtype)
        loss[index] = logits[index].gather(1, label[index])
        dist.all_reduce(loss, dist.ReduceOp.SUM)
        ctx.save_for_backward(index, logits, label)
        return loss.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, loss_gradient):
        index, logits, label = ctx.saved_tensors
        batch_size = logits.size(0)
        one_hot = torch.zeros(size=[index.size(0), logits.size(1)], dtype=logits.dtype)
        one_hot.scatter_(1, label[index], 1)
        logits[index] -= one_hot
        logits.div_(batch_size)
        return logits * loss_gradient.item(), None


class RefPartialFC_V2(nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        dist = torch.distributed
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.embedding_size = embedding_size
        self.sample_rate = sample_rate
        self.fp16 = fp16
        self.num_local = num_classes // self.world_size + int(
            self.rank < num_classes % self.world_size
        )
        self.class_start = num_classes // self.world_size * self.rank + min(
            self.rank, num_classes % self.world_size
        )
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.margin_softmax = margin_loss

    def sample(self, labels, index_positive):
        with torch.no_grad():
            positive = torch.unique(labels[index_positive], sorted=True)
            if self.num_sample - positive.size(0) >= 0:
                perm = torch.rand(size=[self.num_local])
                perm[positive] = 2.0
                index = torch.topk(perm, k=self.num_sample)[1]
                index = index.sort()[0]
            else:
                index = positive
            self.weight_index = index
            labels[index_positive] = torch.searchsorted(index, labels[index_positive])
        return self.weight[self.weight_index]

    def forward(self, local_embeddings, local_labels):
        local_labels.squeeze_()
        local_labels = local_labels.long()
        batch_size = local_embeddings.size(0)
        dtype = local_embeddings.dtype
        gather_embeddings = [
            torch.zeros((batch_size, self.embedding_size), dtype=dtype)
            for _ in range(self.world_size)
        ]
        gather_labels = [torch.zeros(batch_size).long() for _ in range(self.world_size)]
        list_embeddings = RefAllGather.apply(local_embeddings, *gather_embeddings)
        torch.distributed.all_gather(gather_labels, local_labels)
        embeddings = torch.cat(list_embeddings)
        labels = torch.cat(gather_labels).view(-1, 1)
        index_positive = (self.class_start <= labels) & (labels < self.class_start + self.num_local)
        labels[~index_positive] = -1
        labels[index_positive] -= self.class_start
        weight = self.sample(labels, index_positive) if self.sample_rate < 1 else self.weight
        with torch.autocast("cpu", dtype=torch.float16, enabled=self.fp16):
            logits = linear(normalize(embeddings), normalize(weight))
        if self.fp16:
            logits = logits.float()
        logits = logits.clamp(-1, 1)
        logits = self.margin_softmax(logits, labels)
        return RefDistCrossEntropy.apply(logits, labels)


# --- data ---------------------------------------------------------------------------------------
def _global_data(world, dtype, seed=0):
    """Global embeddings (world * LOCAL_BATCH, DIM), labels and a full classifier (C, DIM).
    The embeddings lean towards their class, so that target probabilities spread over
    (1e-9, 1) at s = 64 and the margins shape the gradients (saturated rows would give every
    margin the same gradient)."""
    g = torch.Generator().manual_seed(seed)
    batch = world * LOCAL_BATCH
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    w = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64) * 0.01
    x = torch.randn(batch, DIM, generator=g, dtype=torch.float64) * 0.3 + 2 * normalize(w[labels])
    return x.to(dtype), labels, w.to(dtype)


def _heads(margin, dtype, sample_rate=1.0, fp16=False, full_weight=None, seed=1):
    torch.manual_seed(seed)
    ref = RefPartialFC_V2(RefCombinedMarginLoss(*margin), DIM, NUM_CLASSES, sample_rate, fp16)
    torch.manual_seed(seed)
    ours = compat.PartialFC_V2(
        compat.CombinedMarginLoss(*margin), DIM, NUM_CLASSES, sample_rate, fp16
    )
    assert torch.equal(ref.weight, ours.weight), "initialisation differs from arcface_torch's"
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight"}
    ref.to(dtype)
    ours.to(dtype)
    if full_weight is not None:
        shard = full_weight[ref.class_start : ref.class_start + ref.num_local]
        with torch.no_grad():
            ref.weight.copy_(shard)
            ours.weight.copy_(shard)
    return ref, ours


def _run(head, x_local, labels_local, rng_seed=5):
    x_local = x_local.clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)  # the sampling stream of both heads
    loss = head(x_local, labels_local.clone())
    loss.backward()
    return loss.detach(), x_local.grad, head.weight.grad


def _rel(a, b):
    """Max difference over max(max |b|, 1): relative for large values, absolute for small ones
    (a loss near 0 carries the reference's own rounding of -log p at p -> 1)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def _compare(got, want, tol, what=""):
    """Relative max differences <= tol; returns {name: (max abs, relative)} for the record."""
    diffs = {}
    for name, a, b in zip(("loss", "dX", "dW"), got, want, strict=True):
        assert torch.isfinite(a).all(), f"{what} {name} not finite"
        rel = _rel(a, b)
        diffs[name] = ((a.double() - b.double()).abs().max().item(), rel)
        assert rel <= tol, f"{what} {name}: relative difference {rel:.2e} > {tol}"
    return diffs


# --- checks run inside the workers --------------------------------------------------------------
def _check_parity(rank, world, margin_name, dtype, sample_rate=1.0, label_shape="flat"):
    margin = MARGINS[margin_name]
    x, labels, w = _global_data(world, dtype)
    ref, ours = _heads(margin, dtype, sample_rate, full_weight=w)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    y = labels[rows] if label_shape == "flat" else labels[rows, None]
    want = _run(ref, x[rows], y)
    got = _run(ours, x[rows], y)
    if sample_rate < 1:
        assert torch.equal(ours.weight_index, ref.weight_index), "sampled classes differ"
        owned = (labels >= ours.class_start) & (labels < ours.class_start + ours.num_local)
        positives = torch.unique(labels[owned]).numel()
        # r = 0.5 draws negatives at random; r = 0.1 keeps more positives than num_sample
        expected = ours.num_sample if sample_rate == 0.5 else positives
        assert ours.weight_index.numel() == expected > 0, (positives, ours.num_sample)
        assert (positives < ours.num_sample) == (sample_rate == 0.5)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    return _compare(got, want, tol, f"{margin_name} {dtype} r={sample_rate}")


def _check_sampling_rule(rank, world):
    """num_sample = int(r * num_local); every positive kept; only positives when they are more."""
    _, labels, w = _global_data(world, torch.float64)
    for rate in (0.5, 0.2):
        _, ours = _heads(MARGINS["cosface"], torch.float64, rate, full_weight=w)
        owned = (labels >= ours.class_start) & (labels < ours.class_start + ours.num_local)
        positives = torch.unique(labels[owned] - ours.class_start)
        assert ours.num_sample == int(rate * ours.num_local)
        ids = ours.sample_class_ids(torch.where(owned, labels - ours.class_start, -1))
        assert torch.isin(positives, ids).all()
        assert ids.numel() == max(ours.num_sample, positives.numel())
        assert torch.equal(ids, ids.sort().values) and ids.unique().numel() == ids.numel()
        # every local class positive: all of them are kept, whatever num_sample is
        every = torch.arange(ours.num_local)
        assert torch.equal(ours.sample_class_ids(every), every)


def _check_checkpoint_loads_strictly(rank, world, tmp):
    """A per-rank arcface_torch checkpoint loads strictly and gives arcface_torch's results."""
    x, labels, _ = _global_data(world, torch.float32)
    torch.manual_seed(100 + rank)
    ref = RefPartialFC_V2(RefCombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES)
    path = os.path.join(tmp, f"softmax_fc_gpu_{rank}.pt")
    torch.save(ref.state_dict(), path)
    ours = compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES)
    ours.load_state_dict(torch.load(path, weights_only=True), strict=True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    _compare(_run(ours, x[rows], labels[rows]), _run(ref, x[rows], labels[rows]), 2e-5)
    # and back: our state_dict loads into arcface_torch's module
    fresh = RefPartialFC_V2(RefCombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(fresh.weight, ours.weight)


def _check_fp16(rank, world):
    """fp16=True: GEMM in float16 like arcface_torch's autocast region; close to it."""
    x, labels, w = _global_data(world, torch.float32)
    ref, ours = _heads(MARGINS["arcface"], torch.float32, fp16=True, full_weight=w * 100)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    want = _run(ref, x[rows], labels[rows])
    got = _run(ours, x[rows], labels[rows])
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    _compare(got, want, 2e-2, "fp16")


def _check_saturated_row_clamp(rank, world):
    """A row whose target probability underflows 1e-30: arcface_torch's loss value caps the row
    at -log(1e-30); the gradient is the plain softmax one in both."""
    x, labels, w = _global_data(world, torch.float64)
    # row 0 points away from its class and at another one: s * 2 margin of logits
    labels[0] = 3
    x[0] = -w[3] + w[7]
    ref, ours = _heads(MARGINS["arcface"], torch.float64, full_weight=w)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    got = _run(ours, x[rows], labels[rows])
    want = _run(ref, x[rows], labels[rows])
    _compare(got, want, 1e-12, "saturated")
    unclamped = compat.PartialFC_V2(
        compat.CombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES
    )
    assert got[0] < unclamped.weight.new_tensor(float("inf"))  # finite
    assert got[0].item() > (-math.log(1e-30)) / (world * LOCAL_BATCH)


def _check_ddp_backbone_gets_single_process_gradient(rank, world):
    """The drop-in recipe: backbone in plain DDP (gradients averaged) + this head gives the
    backbone exactly the single-process gradient of the global batch's loss, as arcface_torch's
    world-size factor intends."""
    from torch.nn.parallel import DistributedDataParallel

    x, labels, w = _global_data(world, torch.float64)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
    single = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
    single.load_state_dict(backbone.state_dict())
    margin = MARGINS["arcface"]
    _single_reference(margin, single(x), labels, w).backward()
    _, ours = _heads(margin, torch.float64, full_weight=w)
    model = DistributedDataParallel(backbone)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    ours(model(x[rows]), labels[rows]).backward()
    for got, want in zip(backbone.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def _checks(rank, world, tmp):
    for name in MARGINS:
        for dtype in (torch.float64, torch.float32):
            yield (
                f"parity[{name}-{dtype}]",
                lambda n=name, d=dtype: _check_parity(rank, world, n, d),
            )
    for rate in (0.5, 0.1):
        for name in ("arcface", "cosface_filtered"):
            yield (
                f"sampled[{name}-{rate}]",
                lambda n=name, r=rate: _check_parity(rank, world, n, torch.float64, r),
            )
    yield "labels_b1", lambda: _check_parity(rank, world, "arcface", torch.float64, 1.0, "b1")
    yield "sampling_rule", lambda: _check_sampling_rule(rank, world)
    yield "checkpoint", lambda: _check_checkpoint_loads_strictly(rank, world, tmp)
    yield "fp16", lambda: _check_fp16(rank, world)
    yield "saturated_clamp", lambda: _check_saturated_row_clamp(rank, world)
    yield "ddp_backbone", lambda: _check_ddp_backbone_gets_single_process_gradient(rank, world)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    init_gloo(rank, world, store, GROUP_TIMEOUT_S)
    report = {}
    for name, check in _checks(rank, world, out_dir):
        try:
            report[name] = (None, check())
        except Exception:
            report[name] = (traceback.format_exc(), None)
    save_report_and_leave(report, out_dir, rank)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def reports(request, tmp_path_factory):
    return run_gloo_group(
        _worker, request.param, tmp_path_factory.mktemp(f"world{request.param}"), GROUP_TIMEOUT_S
    )


def _assert_passed(reports: list[dict], name: str) -> None:
    failures = {r: rep[name][0] for r, rep in enumerate(reports) if rep[name][0] is not None}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())


# --- the tests: gloo groups -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_loss_and_gradients_equal_arcface_torch(reports, margin, dtype):
    """sample_rate=1: loss, the weight shard's gradient and the embeddings' gradient (times the
    world size, as arcface_torch's all-gather backward gives it) equal arcface_torch's."""
    _assert_passed(reports, f"parity[{margin}-{dtype}]")


@pytest.mark.parametrize("rate", [0.5, 0.1])
@pytest.mark.parametrize("margin", ["arcface", "cosface_filtered"])
def test_partial_fc_samples_like_arcface_torch(reports, margin, rate):
    """Same global seed -> the same sampled classes, loss and gradients: r = 0.5 draws negatives
    at random; r = 0.1 has more positives than int(r * num_local) and keeps only them."""
    _assert_passed(reports, f"sampled[{margin}-{rate}]")


def test_b1_labels(reports):
    _assert_passed(reports, "labels_b1")


def test_sampling_rule(reports):
    _assert_passed(reports, "sampling_rule")


def test_per_rank_checkpoints_load_strictly(reports):
    _assert_passed(reports, "checkpoint")


def test_fp16_head(reports):
    _assert_passed(reports, "fp16")


def test_saturated_row_loss_is_clamped_like_arcface_torch(reports):
    _assert_passed(reports, "saturated_clamp")


def test_ddp_backbone_gets_single_process_gradient(reports):
    _assert_passed(reports, "ddp_backbone")


# --- single process, no torch.distributed ------------------------------------------------------
def _single_reference(margin, x, labels, weight):
    """arcface_torch's math in one process: the transcribed margin on clamped cosines, then
    cross-entropy with the 1e-30 clamp on the target probability (value only)."""
    logits = linear(normalize(x), normalize(weight)).clamp(-1, 1)
    logits = RefCombinedMarginLoss(*margin)(logits, labels[:, None])
    rows = -torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    rows = rows - (rows - rows.clamp_max(-math.log(1e-30))).detach()
    return rows.mean()


@pytest.mark.parametrize("margin", list(MARGINS))
def test_one_process_without_torch_distributed(margin):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    x, labels, w = _global_data(2, torch.float64, seed=3)
    torch.manual_seed(0)
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS[margin]), DIM, NUM_CLASSES)
    assert (head.rank, head.world_size, head.num_local, head.class_start) == (0, 1, NUM_CLASSES, 0)
    head.double()
    with torch.no_grad():
        head.weight.copy_(w)
    got = _run(head, x, labels)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = _single_reference(MARGINS[margin], xr, labels, wr)
    loss.backward()
    _compare(got, (loss.detach(), xr.grad, wr.grad), 1e-12, margin)


@pytest.mark.parametrize("margin", list(MARGINS))
def test_combined_margin_loss_callable_matches_arcface_torch(margin):
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    labels = torch.tensor([[0], [3], [-1], [8], [3], [5]])
    cos[0, 0] = -0.95  # theta + m2 > pi: plain cos(theta + m2) in both
    outs = []
    for module in (
        compat.CombinedMarginLoss(*MARGINS[margin]),
        RefCombinedMarginLoss(*MARGINS[margin]),
    ):
        c = cos.clone().requires_grad_()
        probe = torch.linspace(-1, 1, 54, dtype=torch.float64).view(6, 9)
        out = module(c.clone(), labels)
        (out * probe).sum().backward()
        outs.append((out.detach(), c.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)


def test_margin_spec_of_each_branch_and_foreign_margin_modules():
    arc = compat.CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    assert arc.spec == MarginSpec.insightface_arcface(64, 0.5)
    assert arc.spec == MarginSpec.arcface(64, 0.5, grad_mode="straight_through", overflow="none")
    # m3 > 0 is CosFace in arcface_torch, whatever m1 and m2 are
    assert compat.CombinedMarginLoss(64, 1.0, 0.5, 0.2).spec == MarginSpec.cosface(64, 0.2)
    with pytest.raises(ValueError, match="two branches"):
        compat.CombinedMarginLoss(64, 0.9, 0.4, 0.0)
    # arcface_torch's own margin module is read through its attributes
    head = compat.PartialFC_V2(RefCombinedMarginLoss(32, 1.0, 0.3, 0.0, 0.2), DIM, NUM_CLASSES)
    assert head.margin_softmax.spec == MarginSpec.insightface_arcface(32, 0.3)
    assert head.margin_softmax.interclass_filtering_threshold == 0.2
    with pytest.raises(ValueError, match="margin's parameters"):
        compat.PartialFC_V2(lambda logits, labels: logits, DIM, NUM_CLASSES)


def test_fp16_runs_the_gemm_in_half_precision():
    """fp16=True equals the float32 head on float16-rounded operands (the torch path computes in
    float32 from its inputs), and differs from the float32 head."""
    x, labels, w = _global_data(1, torch.float32, seed=6)
    w = w * 100
    results = {}
    for fp16 in (True, False):
        head = compat.PartialFC_V2(
            compat.CombinedMarginLoss(*MARGINS["cosface"]), DIM, NUM_CLASSES, fp16=fp16
        )
        with torch.no_grad():
            head.weight.copy_(w if fp16 else w.half().float())
        xin = x if fp16 else x.half().float()
        results[fp16] = _run(head, xin, labels)
    assert results[True][1].dtype == torch.float32
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS["cosface"]), DIM, NUM_CLASSES)
    with torch.no_grad():
        head.weight.copy_(w)
    assert _run(head, x, labels)[0] != results[True][0]


def test_bad_inputs_raise():
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES)
    x = torch.randn(4, DIM)
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, 1\)"):
        head(x, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="embedding_size=8"):
        head(torch.randn(4, DIM + 1), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(IndexError, match="out of range"):
        head(x, torch.tensor([0, 1, 2, NUM_CLASSES]))
    with pytest.raises(ValueError, match="sample_rate"):
        compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES, 0.0)
    labels = torch.tensor([[1], [2], [3], [4]])
    head(x, labels)
    assert labels.shape == (4, 1), "the caller's labels must not be squeezed in place"


def test_one_process_saturated_row_is_capped_in_value_only():
    """Row 0's target probability underflows 1e-30: its loss is capped at -log(1e-30) as in
    arcface_torch, while the gradients stay the plain softmax ones."""
    x, labels, w = _global_data(2, torch.float64, seed=3)
    labels[0] = 3
    x[0] = -w[3] + w[7]
    head = compat.PartialFC_V2(compat.CombinedMarginLoss(*MARGINS["arcface"]), DIM, NUM_CLASSES)
    head.double()
    with torch.no_grad():
        head.weight.copy_(w)
    got = _run(head, x, labels)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = _single_reference(MARGINS["arcface"], xr, labels, wr)
    loss.backward()
    _compare(got, (loss.detach(), xr.grad, wr.grad), 1e-12, "saturated")
    rows = -torch.log_softmax(
        RefCombinedMarginLoss(*MARGINS["arcface"])(
            linear(normalize(x), normalize(w)).clamp(-1, 1), labels[:, None]
        ),
        dim=1,
    ).gather(1, labels[:, None])
    assert rows[0].item() > -math.log(1e-30), "row 0 must be saturated for this test"


def test_general_api_preset_and_ddp_hook_exported():
    """The general API's counterparts: the insightface ArcFace preset and the summing DDP hook
    (the example uses the exported one)."""
    import importlib.util

    import margin_kernels as mk

    spec = MarginSpec.insightface_arcface(30.0, 0.4)
    assert (spec.kind, spec.s, spec.m, spec.grad_mode, spec.overflow) == (
        "arcface",
        30.0,
        0.4,
        "straight_through",
        "none",
    )
    example_path = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
    module_spec = importlib.util.spec_from_file_location("train_distributed", example_path)
    example = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(example)
    assert example.allreduce_sum_hook is mk.distributed.allreduce_sum_hook
    assert "allreduce_sum_hook" in mk.distributed.__all__


def _fused_backend(name, monkeypatch):
    """(backend keyword, device) running ``name``'s algorithm here, or skip."""
    if name == "triton":
        device = TRITON_DEVICE
        if device is None:
            pytest.skip("needs Triton with TRITON_INTERPRET=1 or a CUDA GPU")
        return "triton", device
    from margin_kernels.ops import cuda as cuda_backend

    if not cuda_backend.HAS_CUDA_EXT:
        pytest.skip("margin_kernels._C is not built")
    if torch.cuda.is_available():
        return "cuda", "cuda"
    # the C++ backend's chunked algorithm with its CPU kernels, 5 rows per chunk
    chunked = functools.partial(cuda_backend._chunked_lse_parts, chunk_bytes=5 * NUM_CLASSES * 8)
    original = compat.resolve

    def resolve(backend, device, spec, *tensors):
        return ("cuda", chunked) if backend == "auto" else original(backend, device, spec, *tensors)

    monkeypatch.setattr(compat, "resolve", resolve)
    return "auto", "cpu"


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("margin", ["arcface", "cosface"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_equal_the_reference_head(backend, margin, sample_rate, monkeypatch):
    """The head on the fused backends (one process) equals the torch path, which the gloo tests
    hold equal to arcface_torch: loss, embedding and weight gradients, sampled or not."""
    keyword, device = _fused_backend(backend, monkeypatch)
    x, labels, w = _global_data(3, torch.float64, seed=2)
    results = []
    for name in ("torch", keyword):
        head = compat.PartialFC_V2(
            compat.CombinedMarginLoss(*MARGINS[margin]), DIM, NUM_CLASSES, sample_rate, backend=name
        )
        head.to(device, torch.float64)
        with torch.no_grad():
            head.weight.copy_(w)
        results.append(_run(head, x.to(device), labels.to(device)))
    _compare(tuple(t.cpu() for t in results[1]), tuple(t.cpu() for t in results[0]), 1e-10)
