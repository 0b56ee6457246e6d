"""Samplers: each epoch's GLOBAL index stream drawn from (seed, epoch), then sharded by rank.

Every rank draws the same stream and takes its own slice, so a long-tailed sampler behaves identically
with 1 or N processes and is never silently replaced by a plain DistributedSampler.
"""

from __future__ import annotations

import torch

from longtail.registry import SAMPLERS


class Sampler:
    """Base: ``indices(epoch)`` is the global stream of one epoch, a (L,) int64 tensor of sample ids."""

    def __init__(self, targets: torch.Tensor, num_classes: int, seed: int, total_epochs: int = 1) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.int64)  # (N,) class id per sample
        self.num_classes = num_classes
        self.seed = seed
        self.total_epochs = total_epochs

    def generator(self, epoch: int) -> torch.Generator:
        # One generator per (seed, epoch): an epoch's stream never depends on what ran before it,
        # which is what makes resuming reproduce the uninterrupted run exactly.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)


@SAMPLERS.register("instance")
class InstanceSampler(Sampler):
    """Instance-balanced: every sample once per epoch in a random order (ordinary shuffling, q = 1)."""

    def indices(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.targets), generator=self.generator(epoch))


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a global stream: pad by wrapping to a multiple of world_size, then stride.

    The union of all shards is the global stream (plus the padding), as DistributedSampler does.
    """
    if world_size == 1:
        return indices
    total = -(-len(indices) // world_size) * world_size
    if total > len(indices):
        indices = torch.cat([indices, indices[: total - len(indices)]])
    return indices[rank::world_size]


def create_sampler(name: str, targets: torch.Tensor, num_classes: int, seed: int, total_epochs: int) -> Sampler:
    return SAMPLERS.get(name)(targets, num_classes, seed, total_epochs)
