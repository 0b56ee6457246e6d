"""Per-image augmentation policies after a preset: +trivialaugment beside +randaugment, on both data paths."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms import v2

from longtail.config import ConfigError
from longtail.data.base import LTDataset, Split
from longtail.data.loaders import Loader, file_transform, parse_augment
from longtail.engine import train
from longtail.engine.build import build_config
from test_engine_cli import tiny_raw


def test_trivialaugment_parses_like_randaugment():
    assert parse_augment("cifar+trivialaugment") == ("cifar", "trivialaugment")
    assert parse_augment("trivialaugment") == ("auto", "trivialaugment")
    for bad in ("none+trivialaugment", "cifar+trivial", "cifar+randaugment+trivialaugment"):
        with pytest.raises(ValueError, match="trivialaugment"):
            parse_augment(bad)
    with pytest.raises(ConfigError, match=r"\+trivialaugment"):
        build_config({"data": {"augment": "glt+trivial"}})
    t = file_transform("imagenet+trivialaugment", 16, True)
    assert isinstance(t.transforms[-1], v2.TrivialAugmentWide)  # after the preset's crop and flip
    assert not any(isinstance(s, v2.TrivialAugmentWide)
                   for s in file_transform("imagenet+trivialaugment", 16, False).transforms)  # never at test time


def batched_first_batches(augments: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The first training batch of 8 random 16 px images on the batched in-memory path, per augment preset, each
    drawn with the same seeds (so the same crops and flips)."""
    images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    ds = LTDataset("t", ["a"], {"train": Split(targets=torch.zeros(8, dtype=torch.int64), images=images)},
                   ["train"], 16)
    batches = {}
    for aug in augments:
        torch.manual_seed(0)
        loader = Loader(ds, torch.device("cpu"), augment=aug, num_workers=0)
        batches[aug] = next(loader.train_batches(torch.arange(8), 8, True, torch.Generator().manual_seed(1)))[0]
    return batches


def test_trivialaugment_on_the_batched_path_changes_images_after_the_same_crops():
    batches = batched_first_batches(("cifar", "cifar+trivialaugment", "trivialaugment"))
    assert batches["cifar+trivialaugment"].dtype == torch.uint8
    assert batches["cifar+trivialaugment"].shape == batches["cifar"].shape
    assert not torch.equal(batches["cifar"], batches["cifar+trivialaugment"])
    assert torch.equal(batches["trivialaugment"], batches["cifar+trivialaugment"])  # auto resolves to cifar here


@pytest.mark.parametrize("fast_path", [True, False])
def test_trivialaugment_trains_on_both_data_paths(image_folder, tmp_path, fast_path):
    raw = tiny_raw(image_folder, epochs=1)
    raw["data"].update(augment="cifar+trivialaugment", fast_path=fast_path, num_workers=0)
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    assert 0 <= json.loads((run / "metrics.json").read_text())["splits"]["test"]["top1"] <= 100


def test_batched_crop_and_flip_is_torchvisions_per_image():
    """The batched CIFAR crop + flip is, image by image, torchvision's RandomCrop(32, padding=4) (zero fill on
    the uint8 image, before Normalize) and RandomHorizontalFlip at the offsets and flips it drew; every one of the
    9 x 9 offsets and both flips occur (the LDAM / BBN / TDE reference transforms)."""
    from torchvision.transforms.v2 import functional as TF

    from longtail.data.loaders import random_crop_flip

    x = torch.randint(0, 255, (512, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    offs = torch.randint(0, 9, (2, 512), generator=g)
    flip = torch.rand(512, generator=g) < 0.5
    for i in range(512):
        want = TF.crop(TF.pad(x[i], [4], fill=0), int(offs[0, i]), int(offs[1, i]), 32, 32)
        assert torch.equal(out[i], TF.horizontal_flip(want) if flip[i] else want), i
    assert len({(int(a), int(b)) for a, b in offs.T}) == 81 and 0 < int(flip.sum()) < 512
