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


def test_registry_registers_a_plugin_for_a_block_only():
    reg = Registry("thing")
    reg.register("kept")(int)
    with reg.temporarily("extra", str, help="for one test") as obj:
        assert obj is str and reg.get("extra") is str and list(reg) == ["extra", "kept"]
        assert reg.describe()["extra"] == "for one test"
    assert list(reg) == ["kept"] and "extra" not in reg.describe()
    with pytest.raises(KeyboardInterrupt), reg.temporarily("extra", str):
        raise KeyboardInterrupt  # removed however the block ends
    assert "extra" not in reg
    with pytest.raises(RegistryError, match="already registered"), reg.temporarily("kept", str):
        pass
    assert reg.get("kept") is int  # a refused registration leaves the original


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
    m = create_model(ModelConfig(backbone="tiny", head={"name": "linear", "bias": False}), 4)
    assert m.head.fc.bias is None


def test_cosine_head_is_scale_invariant_and_nan_free():
    m = create_model(ModelConfig(backbone="tiny", head={"name": "cosine", "scale": 10.0}), 4)
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


# The library's methods (a test may register its own for its duration: conftest's interrupt_method).
LIBRARY_METHODS = sorted(n for n in METHODS if METHODS.get(n).__module__.startswith("longtail."))
# Options that keep a method's own training tiny on 36 images; every other method runs with its defaults.
TINY_OPTIONS = {"dlsa": {"max_depth": 1, "clusters": 2, "flow_epochs": 1, "flow_batch_size": 16, "head_epochs": 1,
                         "head_batch_size": 8, "max_cluster_size": 1000}}
OPTIONAL = {"dlsa": ("zuko", "dlsa's flows need the optional zuko (pip install 'longtail[flows]')")}


@pytest.fixture(scope="module")
def tiny_data():
    """A 3-class in-memory dataset (train 12 / 8 / 4, val and test 2 per class) and its CPU loader."""
    from longtail.data.base import LTDataset, Split
    from longtail.data.loaders import Loader

    g = torch.Generator().manual_seed(0)

    def split(counts):
        targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        base = (targets[:, None, None, None] * 60 + 40).expand(-1, 3, 16, 16)  # a colour per class, plus noise
        noise = torch.randint(-30, 31, (len(targets), 3, 16, 16), generator=g)
        return Split(targets=targets, images=(base + noise).clamp(0, 255).to(torch.uint8))

    ds = LTDataset("tiny", ["a", "b", "c"], {"train": split([12, 8, 4]), "val": split([2, 2, 2]),
                                             "test": split([2, 2, 2])}, ["test"], 16)
    return ds, Loader(ds, torch.device("cpu"), "cifar", num_workers=0)


def _build(name, ds, loader):
    from longtail.config import DataConfig, RunConfig, StageConfig
    from longtail.engine.fit import build_stage_method

    cls = METHODS.get(name)
    stage = StageConfig(name="s", method={"name": name, **TINY_OPTIONS.get(name, {})},
                        epochs=1 if cls.trains else 0, batch_size=8, init_from="stage1")  # stage-2 methods need one
    cfg = RunConfig(data=DataConfig(name="image_folder"), model=ModelConfig(backbone="tiny",
                                                                            head=cls.requires_head or "linear"),
                    stages=[stage])
    model = create_model(cfg.model, ds.num_classes)
    return build_stage_method(cfg, 0, model, ds, loader, torch.device("cpu"))


@pytest.mark.parametrize("name", LIBRARY_METHODS)
def test_every_method_runs_its_stage_hooks_evaluates_and_round_trips(name, tiny_data, tmp_path):
    """Every registered method through what the fit loop calls: stage start, (training steps with its optimiser
    groups and its sampler), stage end, evaluation, save and load into a freshly built method."""
    import json

    from longtail.config import EvalConfig
    from longtail.data.samplers import create_sampler
    from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
    from longtail.engine.evaluate import choose_on_val, evaluate_split, predict_split
    from longtail.engine.feature_stage import fit_on_features
    from longtail.engine.fit import _make_optimizer
    from longtail.methods import BatchInfo

    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name][0], reason=OPTIONAL[name][1])
    ds, loader = tiny_data
    torch.manual_seed(0)
    method, ctx = _build(name, ds, loader)
    assert ctx.dataset is ds and ctx.loader is loader and ctx.stage.method["name"] == name
    method.on_stage_start(ctx)
    # as the fit loop does next: the splits a method fits on (ncm, dlsa), extracted once
    assert fit_on_features(method, ctx) == bool(method.feature_splits(ctx))
    if ctx.epochs:
        opt = _make_optimizer(method, ctx.stage)
        sampler = method.sampler(ds, ctx) or create_sampler(ctx.stage.sampler, ds.train.targets, ds.num_classes,
                                                            seed=ctx.sampler_seed, total_epochs=1)
        indices = sampler.indices(0)
        before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        method.on_epoch_start(0, ctx)
        method.train()
        for step, (x, y) in enumerate(loader.train_batches(indices[:16], 8, True, torch.Generator().manual_seed(0))):
            out = method(loader.normalize(x), y, batch=BatchInfo(indices[step * 8:(step + 1) * 8], step))
            assert out["logits"].shape == (8, 3) and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        after = [p.detach() for g in opt.param_groups for p in g["params"]]
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), "nothing trained"
    method.on_stage_end(ctx)
    ev = EvalConfig(batch_size=4, many_above=10, few_below=5)
    for option, grid in method.options_to_choose().items():  # as the fit loop then does (TDE's default alpha: val)
        choice = choose_on_val(method, loader, option, grid, ev, amp=False)
        assert choice["split"] == "val" and choice["value"] in grid
        method.set_chosen(option, choice["value"])
        assert method.option(option) == choice["value"]  # and the round trip below carries the choice
    metrics = evaluate_split(method, loader, "test", ev, amp=False)
    assert metrics["num_samples"] == 6 and 0 <= metrics["top1"] <= 100
    assert ("routes" in metrics) == (name == "dlsa")  # extra_metrics: DLSA's per-route breakdown
    report = json.loads(json.dumps(method.report()))  # JSON-able, as metrics.json stores it

    save_checkpoint(tmp_path / "m.pt", method=method.state_dict())
    torch.manual_seed(1)  # another initialisation: only the loaded state may make the two agree
    other, _ = _build(name, ds, loader)
    other.load_state_dict(load_checkpoint(tmp_path / "m.pt")["method"])  # strict: every key, every shape
    scores, _ = predict_split(method, loader, "test", 4, amp=False)
    again, _ = predict_split(other, loader, "test", 4, amp=False)
    torch.testing.assert_close(again, scores, rtol=0, atol=0)
    assert evaluate_split(other, loader, "test", ev, amp=False) == metrics
    assert other.report() == report


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
