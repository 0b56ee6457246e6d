"""Batches for training and evaluation, as uint8 images on the device.

Two paths, one interface:
- in memory (CIFAR-LT, shapes-glt, digits-lt, or any dataset with data.in_memory=always): the uint8
  tensor stays on the device and augmentation (pad-and-crop, flip) runs on whole batches (the fast path;
  ``data.fast_path=false`` sends these images through the per-image path below instead);
- files (ImageNet-LT, Places-LT, iNat, your folders): DataLoader workers decode with torchvision.io and
  apply transforms v2 per image.
Normalisation to float happens on the device in ``normalize`` for both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torch.utils.data._utils.worker import _generate_state  # how DataLoader seeds a worker's numpy
from torchvision.transforms import v2

from longtail.data.base import DataError, LTDataset, Split
from longtail.data.images import DEFAULT_LIMITS, ImageLimits, read_image
from longtail.utils import rng_state, set_rng_state

Batch = tuple[torch.Tensor, torch.Tensor]  # (B, 3, H, W) uint8 on device, (B,) int64 on device


AUGMENT_PRESETS = ("auto", "cifar", "imagenet", "glt", "glt_coco", "none")
RANDAUGMENT = "+randaugment"  # suffix: RandAugment after the preset's flip (GLT's RandAug rows)
TRIVIALAUGMENT = "+trivialaugment"  # suffix: TrivialAugment (wide) after the preset's flip
POLICIES = (RANDAUGMENT, TRIVIALAUGMENT)  # per-image augmentation policies a preset may end with


def parse_augment(name: str) -> tuple[str, str]:
    """``data.augment`` -> (preset, policy): ``glt+randaugment`` -> (glt, "randaugment"), ``trivialaugment`` ->
    (auto, "trivialaugment"), ``cifar`` -> (cifar, ""); ValueError for anything else than a preset, optionally with
    one policy suffix (not after ``none``)."""
    for suffix in POLICIES:
        if name == suffix[1:] or name.endswith(suffix):
            preset = "auto" if name == suffix[1:] else name.removesuffix(suffix)
            if preset in AUGMENT_PRESETS and preset != "none":
                return preset, suffix[1:]
            break
    else:
        if name in AUGMENT_PRESETS:
            return name, ""
    raise ValueError(f"data.augment must be one of {', '.join(AUGMENT_PRESETS)}, optionally with "
                     f"'{RANDAUGMENT}' or '{TRIVIALAUGMENT}' (e.g. glt{RANDAUGMENT}; not after none), or "
                     f"randaugment / trivialaugment alone; got '{name}'")


def resolve_augment(name: str, ds: LTDataset) -> str:
    name, policy = parse_augment(name)
    if name == "auto":
        name = "cifar" if ds.train.in_memory and ds.image_size <= 64 else "imagenet"
    return name + (f"+{policy}" if policy else "")


def _split_policy(augment: str) -> tuple[str, v2.Transform | None]:
    """A resolved ``augment`` -> (its preset, a fresh policy transform or None)."""
    for suffix in POLICIES:
        if augment.endswith(suffix):
            return augment.removesuffix(suffix), randaugment() if suffix == RANDAUGMENT else trivialaugment()
    return augment, None


def randaugment() -> v2.Transform:
    """torchvision's RandAugment (Cubuk et al. 2020) at its defaults: 2 random ops of magnitude 9 of 31, per image
    on uint8. The GLT reference imports ``RandAugment()`` from the PyPI package ``randaugment`` (PIL ops of its
    own), so its RandAug rows are matched in kind, not bit for bit."""
    return v2.RandAugment()


def trivialaugment() -> v2.Transform:
    """torchvision's TrivialAugmentWide (Mueller and Hutter 2021): one random op at a random magnitude per image,
    on uint8; no hyper-parameters."""
    return v2.TrivialAugmentWide()


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad, zero fill) + RandomHorizontalFlip on (B, C, H, W).

    The random offsets and flips come from ``gen`` (CPU) so the result is the same on any device.
    """
    b, _, h, w = x.shape
    # non_blocking: a copy from pageable host memory is staged at once, and the host does not wait for the device.
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device, non_blocking=True)  # (2, B) y, x offsets
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device, non_blocking=True)  # (B,)
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zero fill as torchvision's RandomCrop
    rows = offs[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offs[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading columns backwards
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None],
                                     cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def file_transform(augment: str, size: int, train: bool) -> v2.Transform:
    """Per-image transforms v2 on uint8 tensors for file datasets (``augment``: a resolved preset, optionally
    with ``+randaugment``)."""
    base, policy = _split_policy(augment)
    if policy is not None:  # after the flip, as the GLT reference's rand_aug
        return v2.Compose([file_transform(base, size, train)] + ([policy] if train else []))
    if not train or augment == "none":
        return v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)])
    if augment == "cifar":
        return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.RandomCrop(size, padding=4),
                           v2.RandomHorizontalFlip()])
    if augment in ("glt", "glt_coco"):  # the GLT benchmark: RandomResizedCrop + flip, no colour jitter (spec 8)
        scale = (0.08, 1.0) if augment == "glt" else (0.5, 1.0)
        return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.4, 0.4, 0.4, 0.0)])


class DataErrorInWorker(DataError):
    """A DataError (a missing or corrupt file) raised in a DataLoader worker.

    DataLoader re-raises a worker's exception in the main process as ``type(e)(message)`` with the worker's whole
    traceback as the message (20 lines); this class keeps the last line, the error itself, so the CLI shows one
    line naming the file.
    """

    def __init__(self, message: str) -> None:
        lines = message.strip().splitlines()
        tag = f"{type(self).__name__}: "
        if len(lines) > 1 and tag in lines[-1]:
            message = lines[-1].split(tag, 1)[1]
        super().__init__(message)


class _Batch(list):
    """A training batch's sample ids, and which random stream the worker that takes it continues.

    DataLoader hands batch j of an epoch to worker j % W, and each worker's transforms draw from its own global
    generators, which run on across epochs. A resumed run starts mid-epoch, in fresh workers, so the first W
    batches of every epoch say which stream they belong to (``stream`` = j % W) and where it stands: ``rng``, its
    state after its last batch (``rng_state``), or None for a stream that has not drawn yet (then the worker seeds
    itself as DataLoader seeds worker ``stream``). In an uninterrupted run every worker already is there.
    """

    def __init__(self, ids: list[int], stream: int, rng: dict | None) -> None:
        super().__init__(ids)
        self.stream, self.rng = stream, rng


def _continue_stream(batch: _Batch) -> None:
    info = get_worker_info()
    if info is None:  # num_workers=0: the main process's generators, which the engine saves and restores
        return
    if batch.rng is not None:
        set_rng_state(batch.rng)
        return
    base = info.seed - info.id  # DataLoader seeds worker w with base + w (torch, random), numpy from (base, w)
    random.seed(base + batch.stream)
    torch.manual_seed(base + batch.stream)
    np.random.seed(_generate_state(base, batch.stream))


class _StreamState:
    """A worker's generators' state riding with its batch; not pinned (pin_memory calls this ``pin_memory``)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def pin_memory(self, device: object = None) -> _StreamState:
        return self


def _collate_with_stream(samples: list) -> tuple[torch.Tensor, torch.Tensor, _StreamState | None]:
    """(B, 3, S, S) uint8, (B,) labels, and in a worker its generators' state after this batch."""
    x, y = default_collate(samples)
    return x, y, _StreamState(rng_state()) if get_worker_info() is not None else None


class FileDataset(Dataset):
    """One image per item, decoded from its file (or taken from an in-memory split) and transformed per image;
    returns ((3, S, S) uint8, label)."""

    def __init__(self, split: Split, transform: v2.Transform, limits: ImageLimits | None = None) -> None:
        self.split, self.targets, self.transform = split, split.targets, transform
        self.limits = limits or DEFAULT_LIMITS

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.split
        try:
            image = s.images[i] if s.in_memory else read_image(s.paths[i], self.limits)
        except DataError as e:
            if get_worker_info() is None:
                raise
            raise DataErrorInWorker(str(e)) from None
        return self.transform(image), int(self.targets[i])

    def __getitems__(self, ids: list[int]) -> list[tuple[torch.Tensor, int]]:
        # DataLoader's fetcher hands a whole batch here (in the worker that loads it).
        if isinstance(ids, _Batch):
            _continue_stream(ids)
        return [self[i] for i in ids]


class _EpochBatches:
    """The batch sampler of a persistent training DataLoader: the engine swaps in each epoch's batches.

    DataLoader iterates its batch sampler in the main process at the start of every epoch, so replacing
    ``batches`` between epochs changes what the (long-lived) workers load.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Loader:
    """Makes train and eval batches of one dataset on one device."""

    def __init__(self, ds: LTDataset, device: torch.device, augment: str = "auto", num_workers: int = 2,
                 fast_path: bool = True) -> None:
        self.ds, self.device, self.fast_path = ds, device, fast_path
        self.augment = resolve_augment(augment, ds)
        self.num_workers = num_workers
        self.mean = torch.tensor(ds.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(ds.std, device=device).view(1, 3, 1, 1) * 255
        self._on_device: dict[str, torch.Tensor] = {}
        self._train_dl: dict[str, tuple[DataLoader, _EpochBatches]] = {}  # file splits: persistent workers
        # Per split with training workers: the seed its DataLoader was made with and, per worker stream w,
        # its generators' state after the last batch of that stream the training loop took (None: not drawn yet).
        self._streams: dict[str, dict] = {}
        self._resume: dict[str, dict] = {}  # load_state_dict's streams, taken when the split's workers start

    def close(self) -> None:
        """Stop the persistent DataLoader workers (also happens when the Loader is garbage-collected)."""
        self._train_dl.clear()

    def state_dict(self) -> dict:
        """Where the training workers' random streams stand (for last.pt): {split: {seed, streams}}."""
        return {k: {"seed": v["seed"], "streams": list(v["streams"])} for k, v in self._streams.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the streams of ``state_dict()`` in workers started from now on (a resumed run's)."""
        self._resume = {k: v for k, v in state.items() if len(v["streams"]) == self.num_workers}

    def _images(self, split: str) -> torch.Tensor:
        # Move an in-memory split to the device once (a few tens of MB for CIFAR).
        if split not in self._on_device:
            self._on_device[split] = self.ds.splits[split].images.to(self.device)
        return self._on_device[split]

    def normalize(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float normalised with the dataset's mean / std."""
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def train_batches(self, indices: torch.Tensor, batch_size: int, drop_last: bool, gen: torch.Generator,
                      start_step: int = 0, split: str = "train") -> Iterator[Batch]:
        """Batches of ``indices`` (this rank's stream) in order, skipping the first ``start_step``."""
        n = len(indices)
        steps = n // batch_size if drop_last else -(-n // batch_size)
        s = self.ds.splits[split]
        if s.in_memory and self.fast_path:
            images, targets = self._images(split), s.targets.to(self.device)
            for step in range(steps):
                idx = indices[step * batch_size:(step + 1) * batch_size].to(self.device, non_blocking=True)
                x = images[idx]
                if self.augment == "cifar":
                    x = random_crop_flip(x, 4, gen) if step >= start_step else x
                elif self.augment in ("imagenet", "glt", "glt_coco"):
                    t = file_transform(self.augment, self.ds.image_size, True)
                    x = torch.stack([t(img) for img in x]) if step >= start_step else x
                elif self.augment.endswith(POLICIES) and step >= start_step:
                    # The preset on the batch (cifar: batched crop + flip), then the policy image by image (its
                    # op and magnitude are drawn per call: one call on the batch would treat it as one image).
                    base, policy = _split_policy(self.augment)
                    if base == "cifar":
                        x = random_crop_flip(x, 4, gen)
                    else:
                        t = file_transform(base, self.ds.image_size, True)
                        x = torch.stack([t(img) for img in x])
                    x = torch.stack([policy(img) for img in x])
                if step >= start_step:
                    yield x, targets[idx]
            return
        # Files (or in-memory images without the fast path): workers decode and augment per image. They persist
        # across epochs (no re-spawn and re-import each epoch); their seeds derive from `gen` of the epoch that
        # started them (a resumed run's: the saved seed), and their random streams run on (see _Batch).
        workers = self.num_workers
        if split not in self._train_dl:
            sampler = _EpochBatches()
            seed = int(torch.randint(2**62, (1,), generator=gen))
            streams = self._resume.pop(split, None) or {"seed": seed, "streams": [None] * workers}
            self._streams[split] = {"seed": streams["seed"], "streams": list(streams["streams"])}
            # In-memory images are already at the input size: "none" leaves them as the fast path does.
            t = v2.Identity() if s.in_memory and self.augment == "none" else \
                file_transform(self.augment, self.ds.image_size, True)
            dl = DataLoader(FileDataset(s, t, self.ds.image_limits),
                            batch_sampler=sampler, num_workers=workers, collate_fn=_collate_with_stream,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(streams["seed"]),
                            persistent_workers=workers > 0,
                            prefetch_factor=4 if workers > 0 else None)
            self._train_dl[split] = (dl, sampler)
        dl, sampler = self._train_dl[split]
        streams = self._streams[split]["streams"]
        batches: list[list[int]] = [indices[i * batch_size:(i + 1) * batch_size].tolist()
                                    for i in range(start_step, steps)]
        for p in range(min(workers, len(batches))):  # the first batch of each worker of this epoch
            batches[p] = _Batch(batches[p], (start_step + p) % workers, streams[(start_step + p) % workers])
        sampler.batches = batches
        for p, (x, y, rng) in enumerate(dl):
            if rng is not None:  # the state of stream j % W after batch j (this process's worker p % W)
                streams[(start_step + p) % workers] = rng.state
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def steps_per_epoch(self, n: int, batch_size: int, drop_last: bool) -> int:
        return n // batch_size if drop_last else -(-n // batch_size)

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Un-augmented batches of a split in order (optionally only ``indices``)."""
        s = self.ds.splits[split]
        idx_all = torch.arange(len(s)) if indices is None else indices
        if s.in_memory:
            images, targets = self._images(split), s.targets.to(self.device)
            for i in range(0, len(idx_all), batch_size):
                idx = idx_all[i:i + batch_size].to(self.device)
                yield images[idx], targets[idx]
            return
        sub = s if indices is None else s.subset(indices)
        dl = DataLoader(FileDataset(sub, file_transform("none", self.ds.image_size, False), self.ds.image_limits),
                        batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                        pin_memory=self.device.type == "cuda")
        for x, y in dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
