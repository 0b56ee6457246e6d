"""CutMix (mixup's ``cutmix: true``): the box and its loss on tiny tensors, and a run on both data paths."""

import json

import pytest
import torch

from longtail.config import build_config
from longtail.engine import train
from longtail.methods.losses import _cut_and_paste
from test_engine_cli import tiny_raw
from test_losses import _method


def test_cut_and_paste_box_and_kept_share():
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    torch.manual_seed(3)
    mixed, kept = _cut_and_paste(x, torch.tensor([1, 0]), lam=0.75)  # a box of side 8 * sqrt(0.25) = 4 at most
    pasted = mixed[0].sum().item()  # image 0 (zeros) got ones in the box
    assert 0 < pasted <= 16 and kept == pytest.approx(1 - pasted / 64)
    assert (mixed[1] == 1 - (mixed[0] > 0).float()).all()  # image 1 got the zeros of image 0 in the same box
    assert x[0].sum() == 0  # the input is left as it is


def test_cutmix_is_the_mixed_loss_of_its_base():
    m, _ = _method("mixup", alpha=0.4, base="balanced_softmax", cutmix=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    m.train()
    torch.manual_seed(1)
    out = m(x, y)
    torch.manual_seed(1)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(4)
    mixed, kept = _cut_and_paste(x, perm, lam)
    logits = m.model(mixed)
    bs, _ = _method("balanced_softmax")
    expected = kept * bs.loss(logits, y) + (1 - kept) * bs.loss(logits, y[perm])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("data", [{}, {"fast_path": False, "num_workers": 0}], ids=["fast_path", "per_image"])
def test_cutmix_trains_on_both_data_paths(data, image_folder, tmp_path):
    raw = tiny_raw(image_folder, epochs=1, method="mixup", cutmix=True)
    raw["data"].update(data)
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["splits"]["test"]["num_samples"] == 12
    blended = tiny_raw(image_folder, epochs=1, method="mixup")
    blended["data"].update(data)
    other = train(build_config(blended), out=tmp_path / "blend", progress=False)
    a = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["method"]["model.head.fc.weight"]
    b = torch.load(other / "checkpoints" / "final.pt", weights_only=True)["method"]["model.head.fc.weight"]
    assert not torch.equal(a, b)
