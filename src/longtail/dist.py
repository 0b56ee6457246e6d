"""Collectives over the process group: the one place methods and the engine reduce, gather and broadcast.

A leaf module (torch only), so a method can keep its state in sync across ranks without importing the engine.
Without a process group (a single process, or WORLD_SIZE=1) every function is the identity or a no-op, so callers
have one code path. Starting and ending the process group under torchrun is the engine's job
(``longtail.engine.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group (the defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this call created the process group (and so destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_in_order(local: torch.Tensor, n_total: int, info: DistInfo) -> torch.Tensor:
    """Undo ``shard``: rank r holds items r, r+W, r+2W, ... (wrap-padded); return all n_total in order.

    ``local``: (n_local, ...) on any device, the same n_local on every rank. Returns the gathered tensor on
    ``local``'s device with the padding dropped, so every item counts exactly once.
    """
    if not info.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local.contiguous())
    # stack to (n_local, W, ...) then flatten: position i*W + r is item i*W + r of the padded stream.
    return torch.stack(parts, dim=1).flatten(0, 1)[:n_total]


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average every floating-point buffer (BN running statistics, a method's moving averages) over ranks.

    Called at the end of each epoch: DDP broadcasts buffers before each forward, but the last forward leaves
    each rank's BN statistics updated with its own batch; after this every rank holds the same state.
    """
    if not info.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= info.world_size


def averaged_state_dict(module: torch.nn.Module, info: DistInfo) -> dict:
    """``module.state_dict()`` with every floating-point buffer replaced by its mean over ranks, computed on
    copies: the values ``average_buffers`` would give at this step, while the module's own buffers (and so
    the training that goes on) stay untouched. Without a process group: the plain state dict."""
    state = module.state_dict()
    if not info.enabled:
        return state
    for name, b in module.named_buffers():  # the order average_buffers uses, the same on every rank
        if b.is_floating_point():
            t = b.detach().clone()
            dist.all_reduce(t)
            t /= info.world_size
            if name in state:
                state[name] = t
    return state


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_from_main(*targets: torch.nn.Module | torch.Tensor) -> None:
    """Copy rank 0's values into every rank's tensors (a module: all its parameters and buffers); a no-op
    without a process group.

    For state a method fits on every rank from the same data (DLSA's flows and heads, NCM's centroids, TDE's
    suggested alpha): GPU kernels need not be bit-identical across ranks, so rank 0's result is made the one
    every rank evaluates with (and the one its checkpoint holds).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = [t for x in targets for t in ([*x.parameters(), *x.buffers()] if isinstance(x, torch.nn.Module) else [x])]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def object_from_main(obj: Any) -> Any:
    """Rank 0's copy of a picklable object (a method's JSON-able report), on every rank; ``obj`` itself
    without a process group. The companion of ``broadcast_from_main`` for state that is not a tensor."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
