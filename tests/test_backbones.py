"""Backbones beyond the CIFAR ResNets: torchvision ResNet-18/34 and ViT-B/16, any timm model as `timm/<name>`,
and `model.pretrained=FILE` into each."""

from __future__ import annotations

import pytest
import torch

from longtail.config import ConfigError, ModelConfig, build_config
from longtail.engine import train
from longtail.engine.checkpoint import load_checkpoint
from longtail.models import create_model
from longtail.registry import BACKBONES


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet34", 512)])
def test_torchvision_resnets_give_pooled_features_of_any_size(name, dim):
    net = BACKBONES.get(name)()
    assert net.feature_dim == dim
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_vit_refuses_other_sizes_with_the_setting_to_change():
    net = BACKBONES.get("vit_b_16")()
    assert net.feature_dim == 768
    with pytest.raises(ConfigError, match="data.image_size=224"):
        net(torch.randn(1, 3, 32, 32))


def test_pretrained_file_loads_into_every_kind_of_backbone(tmp_path):
    for name in ("resnet32", "resnet18"):
        src = create_model(ModelConfig(backbone=name), 10)  # a whole classifier's weights, fc / head included
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in src.backbone.state_dict().items()}}, path)
        dst = create_model(ModelConfig(backbone=name, pretrained=str(path)), 10)
        for k, v in src.backbone.state_dict().items():
            assert torch.equal(dst.backbone.state_dict()[k], v), (name, k)


def test_unknown_timm_name_or_missing_timm_is_a_config_error(monkeypatch):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'longtail[timm]')")
    assert "timm/resnet18" in BACKBONES and "timm/<name>" in BACKBONES.describe()
    with pytest.raises(ConfigError, match="timm has no model 'resnet1000'"):
        BACKBONES.get("timm/resnet1000")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'longtail\[timm\]'"):
        BACKBONES.get("timm/resnet18")
    assert timm.is_model("resnet18")


def test_a_timm_backbone_trains_one_step_and_loads_local_weights(image_folder, tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'longtail[timm]')")
    name = "resnet10t"  # a small timm ResNet
    src = timm.create_model(name, pretrained=False, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "w.pt")  # timm's own keys, its classifier included
    raw = {
        "name": "timm_try", "seed": 0,
        "data": {"name": "image_folder", "root": str(image_folder), "image_size": 16, "in_memory": "always"},
        "model": {"backbone": f"timm/{name}", "pretrained": str(tmp_path / "w.pt")},
        "stages": [{"name": "main", "method": {"name": "ce"}, "epochs": 1, "batch_size": 32, "optim": {"lr": 0.01}}],
        "eval": {"plots": False},
    }
    cfg = build_config(raw)
    model = create_model(cfg.model, 3)
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.backbone.net.state_dict()[k], v), k
    run = train(cfg, out=tmp_path / "run", progress=False)
    state = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    moved = [k for k, v in src.state_dict().items()
             if k.endswith("conv1.0.weight") and not torch.equal(state[f"model.backbone.net.{k}"], v)]
    assert moved, "one training step should have moved the stem from the loaded weights"
