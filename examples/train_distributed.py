"""Train a small embedding model with a class-parallel margin head, under torchrun.

    torchrun --nproc_per_node=2 examples/train_distributed.py --steps 200
    torchrun --nproc_per_node=2 examples/train_distributed.py --steps 400 --resume

The same command runs on CPUs (gloo) and on GPUs (nccl, one GPU per process): the backend follows
``torch.cuda.is_available()``. The data are synthetic: ``--classes`` Gaussian clusters in
``--input-dim`` dimensions, so many classes are cheap to make. The backbone (an MLP) is replicated
and wrapped in DDP; the head, :class:`margin_kernels.distributed.ClassParallelMarginLoss`, owns
a shard of the classes on each rank. Every ``--save-every`` steps and at the end each rank saves
its own checkpoint (the backbone, its weight shard with the head's step counter, the optimizer
with its momentum for that shard); ``--resume`` continues from it, and since the data and the
Partial-FC samples are seeded by the step, a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from margin_kernels import MarginSpec
from margin_kernels.distributed import ClassParallelMarginLoss, allreduce_sum_hook


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="train until this global step")
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--margin", choices=("cosface", "arcface"), default="cosface")
    parser.add_argument("--scale", type=float, default=16.0, help="s of the margin")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC rate r")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/distributed"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join the torchrun group: nccl with one GPU per process, else gloo on CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


class GaussianClasses:
    """``num_classes`` clusters around fixed random centres; the same on every rank."""

    def __init__(self, num_classes: int, dim: int, seed: int, noise: float = 0.6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(num_classes, dim, generator=g)
        self.noise = noise

    def batch(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(size, dim) float32 inputs and (size,) int64 labels drawn from a generator seeded by
        ``seed`` (callers pass one made of the step and the rank, so resuming repeats it)."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.centres.shape[0], (size,), generator=g)
        inputs = self.centres[labels] + self.noise * torch.randn(
            size, self.centres.shape[1], generator=g
        )
        return inputs, labels


def make_backbone(input_dim: int, embed_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, 128), nn.ReLU(), nn.Linear(128, embed_dim))


def batch_seed(seed: int, step: int, rank: int, world: int) -> int:
    return (seed * 1_000_003 + step) * world + rank


def checkpoint_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.pt"


def save_checkpoint(
    directory: Path,
    rank: int,
    world: int,
    step: int,
    backbone: nn.Module,
    head: ClassParallelMarginLoss,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Each rank writes its own file: the replicated backbone, its weight shard and the head's
    step counter (``head.state_dict()``), and the optimizer (momentum of its shard)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "world_size": world,
        "backbone": backbone.state_dict(),
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    tmp = checkpoint_path(directory, rank).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(checkpoint_path(directory, rank))


def load_checkpoint(
    directory: Path,
    rank: int,
    world: int,
    backbone: nn.Module,
    head: ClassParallelMarginLoss,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Restore this rank's checkpoint; returns the step it was saved at."""
    state = torch.load(checkpoint_path(directory, rank), map_location="cpu", weights_only=True)
    if state["world_size"] != world:
        raise ValueError(
            f"checkpoint was written by {state['world_size']} ranks, this run has {world}"
        )
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


@torch.no_grad()
def evaluate(
    backbone: nn.Module,
    head: ClassParallelMarginLoss,
    data: GaussianClasses,
    rank: int,
    world: int,
    device: torch.device,
) -> float:
    """Nearest-class-centre (cosine) accuracy on held-out rows, averaged over ranks. Gathers the
    full classifier on every rank: fine for this example's C, not for 10^7 classes."""
    weight = nn.functional.normalize(head.full_weight(), dim=1)
    inputs, labels = data.batch(1024, seed=10**9 + rank)
    embeddings = nn.functional.normalize(backbone(inputs.to(device)), dim=1)
    correct = (embeddings @ weight.T).argmax(1).eq(labels.to(device)).float().mean()
    dist.all_reduce(correct)
    return correct.item() / world


def train(args: argparse.Namespace, device: torch.device) -> tuple[dict[int, float], float]:
    """Train (or resume) up to ``args.steps`` in the current process group; returns the loss of
    every step run here ({step: loss}, the same on every rank) and the held-out accuracy."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same backbone init on every rank (DDP also broadcasts it)
    data = GaussianClasses(args.classes, args.input_dim, seed=args.seed)
    backbone = make_backbone(args.input_dim, args.embed_dim).to(device)
    model = DistributedDataParallel(
        backbone, device_ids=[device] if device.type == "cuda" else None
    )
    # sum, not average, the backbone's gradients over ranks: each rank's loss is the global one
    model.register_comm_hook(None, allreduce_sum_hook)
    spec = (
        MarginSpec.cosface(s=args.scale, m=0.35)
        if args.margin == "cosface"
        else MarginSpec.arcface(s=args.scale, m=0.5)
    )
    head = ClassParallelMarginLoss(
        args.embed_dim,
        args.classes,
        spec,
        sample_rate=args.sample_rate,
        seed=args.seed,
        device=device,
    )
    optimizer = torch.optim.SGD(
        [*backbone.parameters(), *head.parameters()], lr=args.lr, momentum=0.9, weight_decay=5e-4
    )
    step = 0
    if args.resume:
        step = load_checkpoint(args.checkpoint_dir, rank, world, backbone, head, optimizer)
        if rank == 0:
            print(f"resumed from step {step}", flush=True)
    if rank == 0:
        print(
            f"world {world} ({dist.get_backend()}), {args.classes} classes, shard of rank 0: "
            f"[{head.class_start}, {head.class_end}), sample rate {args.sample_rate}",
            flush=True,
        )

    losses = {}
    while step < args.steps:
        inputs, labels = data.batch(args.batch_size, batch_seed(args.seed, step, rank, world))
        loss = head(model(inputs.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses[step] = loss.detach()  # read back once at the end, not every step
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step} loss {loss.item():.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.checkpoint_dir, rank, world, step, backbone, head, optimizer)

    accuracy = evaluate(backbone, head, data, rank, world, device)
    if rank == 0:
        print(f"held-out accuracy {accuracy:.3f}", flush=True)
    return {k: v.item() for k, v in losses.items()}, accuracy


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _, _, device = setup()
    train(args, device)
    # every rank leaves its last collective before any tears the group down: a gloo peer that
    # exits first can abort one that is still completing it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
