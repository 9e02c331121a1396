"""Class-parallel margin loss on torch.distributed (see the distributed issue)."""
