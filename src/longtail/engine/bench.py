"""`longtail bench`: training speed of a recipe against two anchors and the machine's ceiling, in one run.

- Ours: the real fit loop (``train``) on the recipe's first stage for a few epochs; the per-epoch timings it
  records exclude start-up and evaluation.
- Plain loop: a plain PyTorch loop of our own — transforms v2 applied per image to the in-memory uint8 tensors
  (random crop with padding 4, flip, normalise), a shuffling DataLoader with the recipe's workers, the same
  model, SGD and cross-entropy, on the same device.
- Reference-style loop: what users run today, re-created from the TDE authors' classification code
  (``data/ImbalanceCIFAR.py`` + ``main.py`` of KaihuaTang/Long-Tailed-Recognition.pytorch): a torchvision-CIFAR
  style dataset of HWC uint8 arrays, ``PIL.Image.fromarray`` per item, torchvision's PIL transforms
  (RandomCrop(32, 4), flip, ToTensor, Normalize), a DataLoader, and the whole test split scored after every
  epoch as that code does; reported with and without that evaluation.
- Ceiling: the same model's training step (forward, CE, backward, SGD) on synthetic tensors already in memory
  in the best memory format, no data path at all; and the measured fp32 matmul peak, so each loop's images/s
  also reads as GFLOP/s and a share of the peak (FLOPs of a training image counted by torch's FlopCounterMode).

The first epoch of each loop is a warm-up and not counted when more than one is timed. With ``rounds`` > 1 the
loops are interleaved (ours, plain, reference-style, ceiling; again ...) and each figure is the median.
"""

from __future__ import annotations

import copy
import re
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from longtail.config import ConfigError, RunConfig
from longtail.data import create_dataset
from longtail.models import create_model
from longtail.run_folder import RunDir
from longtail.utils import device_name, environment_info, resolve_device, seed_everything


@dataclass
class BenchResult:
    images_per_s: float
    reference_images_per_s: float | None  # the plain loop
    peak_memory_mb: float
    reference_peak_memory_mb: float | None
    anchors: dict = field(default_factory=dict)  # reference-style loop, ceiling, peak: see run_bench's record

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
    model.train()
    timing = [_plain_epoch(model, opt, dl, device) for _ in range(epochs)]
    return _rate(timing), _peak_memory_mb(device)


def _plain_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, dl: DataLoader, device: torch.device) -> dict:
    """One epoch of the plain loops (CE, SGD) over ``dl``: its seconds (device synchronised) and images."""
    t, seen = time.time(), 0
    for x, y in dl:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    _sync(device)
    return {"seconds": time.time() - t, "images": seen}


class _ReferenceStyle(Dataset):
    """torchvision's CIFAR10 ``__getitem__`` as the TDE authors' ImbalanceCIFAR uses it: an HWC uint8 array made
    a PIL image, then the PIL transforms."""

    def __init__(self, data: np.ndarray, targets: list[int], transform) -> None:
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def reference_style_loop(cfg: RunConfig, epochs: int = 2) -> dict:
    """The authors' data path and per-epoch test evaluation (module docstring); images/s with and without it."""
    from torchvision import transforms as T  # the PIL transforms (v1), as the reference code uses them

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ds = create_dataset(cfg.data)
    train, test = ds.splits["train"], ds.splits.get("test")
    if train.images is None:
        raise ConfigError("the reference-style loop needs an in-memory dataset (CIFAR-LT, shapes-glt, digits-lt, or "
                          "data.in_memory=always); or pass --no-reference")
    st = cfg.stages[0]
    size = train.images.shape[-1]
    norm = T.Normalize(ds.mean, ds.std)
    train_tf = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])

    def hwc(images: torch.Tensor) -> np.ndarray:  # (N, 3, H, W) uint8 -> (N, H, W, 3), CIFAR's `data` array
        return images.permute(0, 2, 3, 1).contiguous().numpy()

    workers = cfg.data.num_workers
    dl = DataLoader(_ReferenceStyle(hwc(train.images), train.targets.tolist(), train_tf), batch_size=st.batch_size,
                    shuffle=True, num_workers=workers, pin_memory=device.type == "cuda", drop_last=st.drop_last,
                    persistent_workers=workers > 0)
    test_dl = None
    if test is not None and test.images is not None:
        test_dl = DataLoader(_ReferenceStyle(hwc(test.images), test.targets.tolist(), test_tf),
                             batch_size=st.batch_size, shuffle=False, num_workers=workers,
                             pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    model = create_model(cfg.model, ds.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=st.optim.lr, momentum=st.optim.momentum,
                          weight_decay=st.optim.weight_decay)
    timing, with_eval = [], []
    for _ in range(epochs):
        model.train()
        t = time.time()
        epoch = _plain_epoch(model, opt, dl, device)
        if test_dl is not None:  # main.py scores the whole test split after every epoch
            model.eval()
            with torch.no_grad():
                for x, _y in test_dl:
                    model(x.to(device, non_blocking=True)).argmax(1).cpu()
            _sync(device)
        timing.append(epoch)
        with_eval.append({"seconds": time.time() - t, "images": epoch["images"]})
    return {"images_per_s": _rate(timing), "with_eval_images_per_s": _rate(with_eval),
            "test_images_per_epoch": len(test.targets) if test_dl is not None else 0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_step(cfg: RunConfig, num_classes: int, device: torch.device, channels_last: bool):
    """(run N steps -> seconds, flops of one step) of the recipe's model on one synthetic in-memory batch."""
    st = cfg.stages[0]
    size = cfg.data.image_size or 32
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(st.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (st.batch_size,), generator=g).to(device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes).to(device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=st.optim.lr, momentum=st.optim.momentum,
                          weight_decay=st.optim.weight_decay)
    model.train()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(n: int) -> float:
        _sync(device)
        t = time.time()
        for _ in range(n):
            step()
        _sync(device)
        return time.time() - t

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return run, fc.get_total_flops()


def ceiling(cfg: RunConfig, num_classes: int, images: int) -> dict:
    """Images/s of the bare training step on synthetic in-memory tensors (the faster memory format of two), the
    FLOPs of one training image, and the fp32 matmul peak of the device."""
    device = resolve_device(cfg.device)
    batch = cfg.stages[0].batch_size
    steps = max(2, images // batch)
    best: dict = {}
    for cl in (False, True):
        run, flops = _synthetic_step(cfg, num_classes, device, cl)
        run(2)  # warm-up (allocator, oneDNN / cuDNN algorithm choice)
        rate = steps * batch / run(steps)
        if rate > best.get("images_per_s", 0.0):
            best = {"images_per_s": rate, "channels_last": cl}
        best["flops_per_image"] = flops / batch
    return {**best, "matmul_peak_gflops": matmul_peak_gflops(device)}


def matmul_peak_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of fp32 GFLOP/s of an n x n matmul (2 n^3 flops) on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t = time.time()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / max(time.time() - t, 1e-9) / 1e9)
    return best


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def default_record_path(record: dict) -> Path:
    """Where ``longtail bench`` writes ``record`` without --json: benchmarks/results/bench_<recipe>_<device>.json
    (the device's name, e.g. ``NVIDIA_H200``, without its details in parentheses)."""
    device = re.sub(r"[^A-Za-z0-9]+", "_", record["device"].split(" (")[0]).strip("_")
    return Path(f"benchmarks/results/bench_{record['recipe']}_{device}.json")


def run_bench(cfg: RunConfig, epochs: int = 2, reference: bool = True, ceiling_too: bool = True,
              rounds: int = 1) -> tuple[BenchResult, dict]:
    """Time our fit loop, the two anchors (``reference``) and the ceiling (``ceiling_too``), interleaved over
    ``rounds`` rounds (medians); returns the result and a JSON-ready record."""
    import json
    import os

    from longtail.engine.fit import train

    bcfg = bench_config(cfg, epochs)
    device = resolve_device(bcfg.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ours_r, plain_r, style_r, style_eval_r, ceil = [], [], [], [], []
    ours_mem = ref_mem = None
    test_images = 0
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="longtail-bench-") as tmp:
            run_dir = train(bcfg, out=Path(tmp) / "run", progress=False)
            metrics = json.loads(RunDir(run_dir).metrics.read_text())
        ours_r.append(_rate(metrics["epoch_timing"]))
        if ours_mem is None:
            ours_mem = _peak_memory_mb(device)  # measured before any other loop ran in this process
        if reference:
            rate, mem = reference_loop(bcfg, epochs)
            plain_r.append(rate)
            ref_mem = mem if device.type == "cuda" else None  # a CPU process's peak RSS covers every loop
            style = reference_style_loop(bcfg, epochs)
            style_r.append(style["images_per_s"])
            style_eval_r.append(style["with_eval_images_per_s"])
            test_images = style["test_images_per_epoch"]
        if ceiling_too:
            ceil.append(ceiling(bcfg, len(metrics["splits"]["test"]["per_class"]),
                                images=int(metrics["epoch_timing"][-1]["images"])))
    ours, ref = _median(ours_r), _median(plain_r)
    anchors: dict = {}
    if reference:
        anchors["reference_style"] = {
            "what": "the TDE authors' data path: HWC uint8 arrays, PIL.Image.fromarray + torchvision PIL transforms "
                    "per image, a DataLoader with the recipe's workers, the test split scored after every epoch",
            "images_per_s": round(_median(style_r), 1),
            "with_eval_images_per_s": round(_median(style_eval_r), 1),
            "test_images_scored_per_epoch": test_images,
            "ours_over_it": round(ours / _median(style_r), 3),
            "ours_over_it_with_eval": round(ours / _median(style_eval_r), 3),
        }
    if ceil:
        best = max(ceil, key=lambda c: c["images_per_s"])
        peak = max(c["matmul_peak_gflops"] for c in ceil)
        fpi = best["flops_per_image"]

        def share(rate: float | None) -> dict | None:
            if rate is None:
                return None
            return {"images_per_s": round(rate, 1), "gflop_per_s": round(rate * fpi / 1e9, 2),
                    "pct_of_matmul_peak": round(100 * rate * fpi / 1e9 / peak, 1)}

        anchors["ceiling"] = {
            "what": "the same training step on synthetic in-memory tensors, no data path, the faster memory format",
            "images_per_s": round(_median([c["images_per_s"] for c in ceil]), 1),
            "channels_last": best["channels_last"],
            "flops_per_train_image": round(fpi),
            "matmul_peak_gflops_fp32": round(peak, 1),
            "ours_pct_of_ceiling": round(100 * ours / _median([c["images_per_s"] for c in ceil]), 1),
            "throughput": {"ours": share(ours), "plain_loop": share(ref),
                           "reference_style": share(_median(style_r)) if reference else None,
                           "ceiling": share(_median([c["images_per_s"] for c in ceil]))},
        }
    res = BenchResult(ours, ref, ours_mem, ref_mem, anchors)
    st = bcfg.stages[0]
    record = {
        "recipe": cfg.name, "method": st.method["name"], "dataset": bcfg.data.name, "backbone": bcfg.model.backbone,
        "batch_size": st.batch_size, "epochs_timed": max(epochs - 1, 1), "rounds": rounds, "seed": bcfg.seed,
        "device": device_name(device),
        "images_per_s": round(ours, 1),
        "reference_images_per_s": None if ref is None else round(ref, 1),
        "ratio_vs_reference": None if res.ratio is None else round(res.ratio, 3),
        **anchors,
        "peak_memory_mb": round(ours_mem, 1),
        "reference_peak_memory_mb": None if ref_mem is None else round(ref_mem, 1),
        "num_workers_reference": bcfg.data.num_workers,
        "load_average_1min": {"before": load_before,
                              "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        **{k: v for k, v in environment_info(device).items() if k != "device"},
    }
    return res, record


class StepRunner:
    """The fit loop's training step, step by step: a ``longtail.engine.fit.Trainer`` for the recipe's first stage,
    set up as ``train`` sets it up (dataset, loader, model in ``model.channels_last``, the stage's method,
    optimiser, EMA, ``torch.compile`` when ``cfg.compile``, sampler), its epochs started by the Trainer
    (generator, learning rate, ``on_epoch_start``, indices) and every step ``Trainer.step`` itself; without the
    check points, epoch ends, checkpoints or evaluation (the run folder the set-up writes its config.yaml to is a
    temporary one). Made for timing a setting over a few steps instead of whole epochs
    (``benchmarks/cpu_defaults.py``) and for checking bit for bit whether a setting moves the numerics
    (``digest``): after the same steps it trains the same weights as ``train`` (tested), so two runners that differ
    in one setting and agree in ``digest`` train identically."""

    def __init__(self, cfg: RunConfig) -> None:
        from longtail.dist import DistInfo
        from longtail.engine.fit import Trainer, _loss_dtype, _run_config

        cfg, _ = _run_config(bench_config(cfg, cfg.stages[0].epochs), None, resume=False, overwrite=False)
        self.cfg = cfg
        self.device = device = resolve_device(cfg.device)
        self._tmp = tempfile.TemporaryDirectory(prefix="longtail-steprunner-")  # removed with the runner
        self.trainer = t = Trainer(cfg, Path(self._tmp.name), resume=False, progress=False, dist=DistInfo(),
                                   device=device)
        t._set_up_run()  # fit's set-up and stage start, in fit's order: the same random draws build the same run
        t._start_stage(0)
        if t.opt is None:
            raise ConfigError(f"stage '{t.st.name}' has epochs 0: it has no training step to time")
        self.steps_per_epoch = t.steps
        self.epoch, self.step, self._run, self._batches = 0, 0, None, None
        # Over every step trained (an epoch's own sum in fit): Trainer.step adds to it in place.
        self.loss_sum = torch.zeros((), dtype=_loss_dtype(device), device=device)
        self.images = 0

    @property
    def method(self) -> torch.nn.Module:
        return self.trainer.method

    @property
    def loader(self):
        return self.trainer.loader

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:  # an epoch starts, as in fit: its generator, lr, the method's hook, its indices
            run = self.trainer._start_epoch(self.epoch, 0, None)
            run.loss_sum = self.loss_sum  # the same tensor: the runner's sum goes on over epoch ends
            self._run, self._batches = run, iter(self.trainer._epoch_batches(run, 0))
        batch = next(self._batches, None)
        if batch is None:  # the epoch's last batch was trained
            self.epoch, self.step, self._batches = self.epoch + 1, 0, None
            return self._next_batch()
        return batch

    def run(self, steps: int) -> dict:
        """Train ``steps`` more steps (across epoch ends as fit would); their ``seconds`` (wall, the device
        synchronised), ``cpu_seconds`` (this process's CPU time: on a shared CPU, the work a one-thread run did,
        whatever share of the cores it got), ``minor_faults`` (page faults without I/O: memory the allocator mapped
        afresh) and ``images``."""
        _sync(self.device)
        t, cpu, images = time.time(), time.process_time(), self.images
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            x, y = self._next_batch()
            self.trainer.step(self._run, self.step, x, y)
            self.images += len(y)
            self.step += 1
        _sync(self.device)
        return {"seconds": time.time() - t, "cpu_seconds": time.process_time() - cpu, "images": self.images - images,
                "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}

    def digest(self) -> str:
        """sha256 of the method's state (weights, buffers) and the loss sum so far: equal digests, equal training."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.method.state_dict().items()):
            if isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(self.loss_sum.cpu().numpy().tobytes())
        return h.hexdigest()
