"""`longtail bench`: training speed of a recipe against a plain PyTorch reference loop on the same machine.

Ours: the real fit loop (``train``) on the recipe's first stage for a few epochs; the per-epoch timings it
records exclude start-up and evaluation. Reference: what research code does — a torchvision-style dataset
applying transforms v2 per image (random crop with padding 4, flip, normalise), a shuffling DataLoader with
the recipe's workers, the same model, SGD and cross-entropy, on the same device. The first epoch of each is
a warm-up and not counted when more than one is timed.
"""

from __future__ import annotations

import copy
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from longtail.config import ConfigError, RunConfig
from longtail.data import create_dataset
from longtail.models import create_model
from longtail.utils import device_name, environment_info, resolve_device, seed_everything


@dataclass
class BenchResult:
    images_per_s: float
    reference_images_per_s: float | None
    peak_memory_mb: float
    reference_peak_memory_mb: float | None

    @property
    def ratio(self) -> float | None:
        return self.images_per_s / self.reference_images_per_s if self.reference_images_per_s else None


class _PerImage(Dataset):
    """(3, H, W) uint8 images transformed one at a time, as torchvision's CIFAR datasets are used."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.targets[i])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rate(timing: list[dict]) -> float:
    counted = timing[1:] if len(timing) > 1 else timing  # drop the warm-up epoch
    return sum(t["images"] for t in counted) / sum(t["seconds"] for t in counted)


def bench_config(cfg: RunConfig, epochs: int = 2) -> RunConfig:
    """The recipe cut to its first stage, ``epochs`` long, with no validation, plots or best-val selection."""
    cfg = copy.deepcopy(cfg)
    st = cfg.stages[0]
    st.epochs, st.eval_every, st.init_from = epochs, 0, None
    cfg.stages = [st]
    cfg.eval.plots, cfg.eval.select = False, "last"
    cfg.data.val_fraction = 0.0
    return cfg


def reference_loop(cfg: RunConfig, epochs: int = 2) -> tuple[float, float]:
    """Images/s and peak memory (MB) of the plain loop on the recipe's data, model and optimiser."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ds = create_dataset(cfg.data)
    train = ds.splits["train"]
    if train.images is None:
        raise ConfigError("the reference loop needs an in-memory dataset (CIFAR-LT, shapes-glt, digits-lt, or "
                          "data.in_memory=always); or pass --no-reference")
    st = cfg.stages[0]
    size = train.images.shape[-1]
    transform = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(ds.mean, ds.std)])
    dl = DataLoader(_PerImage(train.images, train.targets, transform), batch_size=st.batch_size, shuffle=True,
                    num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", drop_last=st.drop_last,
                    persistent_workers=cfg.data.num_workers > 0)
    model = create_model(cfg.model, ds.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=st.optim.lr, momentum=st.optim.momentum,
                          weight_decay=st.optim.weight_decay)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = []
    model.train()
    for _ in range(epochs):
        t, seen = time.time(), 0
        for x, y in dl:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing.append({"seconds": time.time() - t, "images": seen})
    return _rate(timing), _peak_memory_mb(device)


def run_bench(cfg: RunConfig, epochs: int = 2, reference: bool = True) -> tuple[BenchResult, dict]:
    """Time our fit loop and (optionally) the reference loop; returns the result and a JSON-ready record."""
    import json

    from longtail.engine.fit import train

    bcfg = bench_config(cfg, epochs)
    device = resolve_device(bcfg.device)
    with tempfile.TemporaryDirectory(prefix="longtail-bench-") as tmp:
        run_dir = train(bcfg, out=Path(tmp) / "run", progress=False)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    ours, ours_mem = _rate(metrics["epoch_timing"]), _peak_memory_mb(device)
    ref = ref_mem = None
    if reference:
        ref, ref_mem = reference_loop(bcfg, epochs)
        if device.type != "cuda":
            ref_mem = None  # a CPU process's peak RSS covers both loops: only ours (measured first) is its own
    res = BenchResult(ours, ref, ours_mem, ref_mem)
    st = bcfg.stages[0]
    record = {
        "recipe": cfg.name, "method": st.method["name"], "dataset": bcfg.data.name, "backbone": bcfg.model.backbone,
        "batch_size": st.batch_size, "epochs_timed": max(epochs - 1, 1), "seed": bcfg.seed,
        "device": device_name(device),
        "images_per_s": round(ours, 1),
        "reference_images_per_s": None if ref is None else round(ref, 1),
        "ratio_vs_reference": None if res.ratio is None else round(res.ratio, 3),
        "peak_memory_mb": round(ours_mem, 1),
        "reference_peak_memory_mb": None if ref_mem is None else round(ref_mem, 1),
        "num_workers_reference": bcfg.data.num_workers,
        **{k: v for k, v in environment_info(device).items() if k != "device"},
    }
    return res, record
