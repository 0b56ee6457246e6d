"""Distributed start-up for the fit loop: torchrun's environment in, a process group and this rank's device out.

``torchrun --nproc_per_node=N -m longtail train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; ``init_distributed`` reads them and starts the process group (NCCL on GPU, gloo on CPU). Without
them everything degrades to the single-process case, so the fit loop has one code path. The collectives
(reduce, gather, broadcast) live in the leaf module ``longtail.dist``: the engine and the methods import them from
there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from longtail.dist import DistInfo


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Start (or join) the process group named by torchrun's environment; return it and this rank's device.

    On CUDA each process takes GPU ``LOCAL_RANK``; a process group that the caller already started is used
    as it is.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        started = False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistInfo(), device
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, init_method="env://")
        started = True
    if device.type == "cuda":
        device = torch.device("cuda", local)
    return DistInfo(rank, world, local, started), device


def shutdown(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()
