import math

import pytest
import torch
import torch.nn.functional as F

from longtail.config import ModelConfig, ScheduleConfig
from longtail.engine.schedule import lr_at
from longtail.methods import MethodContext, create_method
from longtail.models import create_model, load_pretrained
from longtail.registry import BACKBONES, HEADS, METHODS, Registry, RegistryError

FEATURE_DIMS = {"resnet32": 128, "resnet32_cao": 64, "tiny": 32, "resnet50": 2048, "resnext50_32x4d": 2048,
                "resnet152": 2048, "resnet18": 512, "resnet34": 512, "vit_b_16": 768}


def test_registry_is_strict():
    reg = Registry("thing")
    reg.register("foo_bar")(object)
    assert reg.get("foo-bar") is object  # hyphen and underscore name the same thing
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("foo_bar")(object)
    with pytest.raises(RegistryError, match="did you mean 'foo_bar'"):
        reg.get("foo_baz")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_gives_features(name):
    torch.manual_seed(0)
    net = BACKBONES.get(name)().eval()
    size = getattr(net, "image_size", 32)  # CIFAR-sized input works everywhere (adaptive pooling) but a ViT's
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        f = net(x)
    assert f.shape == (2, net.feature_dim) and net.feature_dim == FEATURE_DIMS[name]
    assert torch.isfinite(f).all()


def test_resnet32_parameter_count():
    # BBN/TDE ResNet-32: (5, 5, 4) blocks + two parallel 64-channel blocks.
    n = sum(p.numel() for p in BACKBONES.get("resnet32")().parameters())
    assert 500_000 < n < 600_000
    n_cao = sum(p.numel() for p in BACKBONES.get("resnet32_cao")().parameters())
    assert 450_000 < n_cao < 470_000  # the classic 0.46 M


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_gives_logits(head):
    model = create_model(ModelConfig(backbone="tiny", head=head), num_classes=5)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5)


def test_linear_head_bias_switch():
    m = create_model(ModelConfig(backbone="tiny", head="linear", head_bias=False), 4)
    assert m.head.fc.bias is None


def test_cosine_head_is_scale_invariant_and_nan_free():
    m = create_model(ModelConfig(backbone="tiny", head="cosine", head_scale=10.0), 4)
    f = torch.randn(3, 32)
    torch.testing.assert_close(m.forward_head(f), m.forward_head(5 * f))
    assert m.forward_head(f).abs().max() <= 10.0 + 1e-5
    assert torch.isfinite(m.forward_head(torch.zeros(1, 32))).all()


def test_pretrained_loading(tmp_path):
    src = BACKBONES.get("tiny")()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    m = create_model(ModelConfig(backbone="tiny", pretrained=str(path)), 3)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(m.backbone.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        load_pretrained(BACKBONES.get("tiny")(), str(tmp_path / "missing.pt"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="no parameter matches"):
        load_pretrained(BACKBONES.get("tiny")(), str(tmp_path / "wrong.pt"))


def _ctx(counts):
    return MethodContext(num_classes=len(counts), train_counts=torch.tensor(counts), epochs=1, steps_per_epoch=1,
                         device=torch.device("cpu"))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_one_step_and_round_trips(name):
    torch.manual_seed(0)
    head = getattr(METHODS.get(name), "requires_head", None) or "linear"
    model = create_model(ModelConfig(backbone="tiny", head=head), 3)
    method = create_method({"name": name}, model, _ctx([10, 5, 2]))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = method(x, y)
    assert out["logits"].shape == (4, 3) and out["loss"].ndim == 0
    out["loss"].backward()
    method.eval()
    other = create_method({"name": name}, create_model(ModelConfig(backbone="tiny", head=head), 3), _ctx([10, 5, 2]))
    other.load_state_dict(method.state_dict())
    other.eval()
    torch.testing.assert_close(method.predict(x), other.predict(x))


def test_ce_golden_value():
    method = create_method({"name": "ce"}, create_model(ModelConfig(backbone="tiny"), 3), _ctx([1, 1, 1]))
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = (-(2 - math.log(math.exp(2) + 1 + math.exp(-1))) + math.log(3)) / 2
    assert method.loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    smoothed = create_method({"name": "ce", "label_smoothing": 0.1}, create_model(ModelConfig(backbone="tiny"), 3),
                             _ctx([1, 1, 1]))
    assert smoothed.loss(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, targets, label_smoothing=0.1).item())


def test_tde_cifar_lr_table_with_reference_offset():
    # spec tde.md section 6: 1-based epoch -> lr 0.0933, 0.12, 0.1467, 0.1733, 0.2 (5-119), 0.002 (120-159), 2e-5.
    cfg = ScheduleConfig(name="multistep", milestones=[120, 160], gamma=0.01, warmup_epochs=5,
                         warmup_factor=1 / 3, reference_offset=True)
    lr = [lr_at(0.2, cfg, 200, e) for e in range(200)]  # 0-based epochs
    assert lr[0] == pytest.approx(0.09333, abs=1e-4) and lr[1] == pytest.approx(0.12)
    assert lr[2] == pytest.approx(0.14667, abs=1e-4) and lr[3] == pytest.approx(0.17333, abs=1e-4)
    assert all(x == pytest.approx(0.2) for x in lr[4:118])
    assert all(x == pytest.approx(0.002) for x in lr[119:158])
    assert all(x == pytest.approx(2e-5) for x in lr[159:])


def test_imagenet_cosine_with_reference_offset_ends_at_zero():
    cfg = ScheduleConfig(name="cosine", reference_offset=True)
    lr = [lr_at(0.2, cfg, 90, e) for e in range(90)]
    assert lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr[71] == pytest.approx(0.0191, abs=1e-4)  # epoch 72 in the spec's table


def test_conventional_schedule_starts_at_warmup_factor():
    cfg = ScheduleConfig(name="multistep", milestones=[2], gamma=0.1, warmup_epochs=2, warmup_factor=0.5)
    assert [lr_at(1.0, cfg, 4, e) for e in range(4)] == pytest.approx([0.5, 0.75, 0.1, 0.1])
