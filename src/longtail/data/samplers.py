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


@SAMPLERS.register("class_balanced")
class ClassAwareSampler(Sampler):
    """Class-balanced (q = 0), the class-aware sampler of OLTR / Decoupling (spec baselines.md 4).

    Cycle over the classes in a shuffled order (reshuffled after each full pass); for each class emit the
    next ``per_class`` samples of that class's own shuffled cycle. Epoch length n_max * C as the reference.
    Classes without samples are skipped (label subsets may miss classes).
    """

    per_class = 4  # num_samples_cls of the Decoupling cRT / LWS configs

    def __len__(self) -> int:
        counts = torch.bincount(self.targets, minlength=self.num_classes)
        return int(counts.max()) * int((counts > 0).sum())

    def indices(self, epoch: int) -> torch.Tensor:
        g = self.generator(epoch)
        classes = [c for c in range(self.num_classes) if (self.targets == c).any()]
        members = {c: (self.targets == c).nonzero().flatten() for c in classes}
        pos = dict.fromkeys(classes, 0)
        order = {c: members[c][torch.randperm(len(members[c]), generator=g)] for c in classes}
        out, total = [], len(self)
        while len(out) < total:
            for ci in torch.randperm(len(classes), generator=g).tolist():  # one pass over the classes
                c = classes[ci]
                for _ in range(self.per_class):
                    if pos[c] == len(order[c]):  # end of this class's cycle: reshuffle
                        order[c], pos[c] = members[c][torch.randperm(len(members[c]), generator=g)], 0
                    out.append(int(order[c][pos[c]]))
                    pos[c] += 1
                if len(out) >= total:
                    break
        return torch.tensor(out[:total], dtype=torch.int64)


class _ClassWeightedSampler(Sampler):
    """Draw N samples with replacement: class j with probability p_j, uniformly inside the class."""

    def class_probs(self, epoch: int, counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def indices(self, epoch: int) -> torch.Tensor:
        counts = torch.bincount(self.targets, minlength=self.num_classes).double()
        p = self.class_probs(epoch, counts)  # (C,) sums to 1 over present classes
        per_sample = p[self.targets] / counts[self.targets]  # (N,)
        return torch.multinomial(per_sample, len(self.targets), replacement=True, generator=self.generator(epoch))


@SAMPLERS.register("square_root")
class SquareRootSampler(_ClassWeightedSampler):
    """Square-root sampling (q = 1/2): p_j proportional to sqrt(n_j) (Decoupling feat_squareroot)."""

    def class_probs(self, epoch: int, counts: torch.Tensor) -> torch.Tensor:
        w = counts.sqrt()
        return w / w.sum()


@SAMPLERS.register("progressive")
class ProgressiveSampler(_ClassWeightedSampler):
    """Progressively balanced: p_j(t) = (1 - t/T) n_j / N + (t/T) / C over the stage's epochs t = 0..T-1."""

    def class_probs(self, epoch: int, counts: torch.Tensor) -> torch.Tensor:
        t = epoch / max(self.total_epochs, 1)
        present = (counts > 0).double()
        return (1 - t) * counts / counts.sum() + t * present / present.sum()


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
