"""The Method contract (longtail.methods.base): the state a method saves, its typed hooks, the losses layer.

``tests/golden/method_state_keys.json`` holds the ``state_dict()`` entries (key, shape, dtype) of every library method,
and of IFL and mixup around every loss, as the code wrote them before the losses got a layer of their own and IFL /
mixup stopped hiding their base method from the module tree (issue 14): old checkpoints and final.pt files must
keep loading, strictly. A method whose saved state changes on purpose updates its entry in the same commit (say why):
old run folders of that method then no longer load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import longtail.engine.build  # noqa: F401  (imports every plugin)
from longtail.registry import METHODS

GOLDEN = Path(__file__).resolve().parent / "golden" / "method_state_keys.json"
WRAPPED = ["ce", "focal", "cb_loss", "balanced_softmax", "logit_adjust", "logit_adjust_posthoc", "ldam_drw"]
LIBRARY_METHODS = sorted(n for n in METHODS if METHODS.get(n).__module__.startswith("longtail."))
CASES = {
    **{n: {"name": n} for n in LIBRARY_METHODS},
    "logit_adjust_posthoc/tau_val": {"name": "logit_adjust_posthoc", "tau": "val"},  # + its chosen_tau buffer
    **{f"ifl/{b}": {"name": "ifl", "base": b} for b in WRAPPED},
    **{f"mixup/{b}": {"name": "mixup", "base": b} for b in WRAPPED},
}


def tiny_dataset():
    """A 3-class in-memory dataset (train 12 / 8 / 4, val and test 2 per class) and its CPU loader."""
    from longtail.data.base import LTDataset, Split
    from longtail.data.loaders import Loader

    g = torch.Generator().manual_seed(0)

    def split(counts):
        targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        base = (targets[:, None, None, None] * 60 + 40).expand(-1, 3, 16, 16)
        noise = torch.randint(-30, 31, (len(targets), 3, 16, 16), generator=g)
        return Split(targets=targets, images=(base + noise).clamp(0, 255).to(torch.uint8))

    ds = LTDataset("tiny", ["a", "b", "c"], {"train": split([12, 8, 4]), "val": split([2, 2, 2]),
                                             "test": split([2, 2, 2])}, ["test"], 16)
    return ds, Loader(ds, torch.device("cpu"), "cifar", num_workers=0)


def build(spec: dict, ds, loader):
    """The method of ``spec`` as the fit loop builds it (its options resolved, its head the one it needs)."""
    from longtail.config import DataConfig, ModelConfig, RunConfig, StageConfig
    from longtail.engine.build import resolve
    from longtail.engine.fit import build_stage_method
    from longtail.models import create_model

    cls = METHODS.get(spec["name"])
    opts = {k: v for k, v in spec.items() if k != "name"}
    head = cls.head_needed(opts) or "linear"
    stages = [StageConfig(name="s", method=dict(spec), epochs=1 if cls.trains else 0, batch_size=8)]
    if cls.stage_two or not cls.trains:
        stages = [StageConfig(name="first", method={"name": "ce"}, epochs=1, batch_size=8),
                  StageConfig(name="s", method=dict(spec), epochs=stages[0].epochs, batch_size=8, init_from="first")]
    cfg = resolve(RunConfig(data=DataConfig(name="image_folder"), model=ModelConfig(backbone="tiny", head=head),
                            stages=stages))
    torch.manual_seed(0)
    model = create_model(cfg.model, ds.num_classes)
    return build_stage_method(cfg, len(stages) - 1, model, ds, loader, torch.device("cpu"))


def state_entries(method) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] if isinstance(v, torch.Tensor) else "extra"
            for k, v in method.state_dict().items()}


@pytest.fixture(scope="module")
def data():
    return tiny_dataset()


def test_the_golden_covers_every_library_method():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES), "add the new method's entry to tests/golden/method_state_keys.json"


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_are_those_old_checkpoints_hold(case, data):
    if case == "dlsa":
        pytest.importorskip("zuko", reason="dlsa's flows need the optional zuko (pip install 'longtail[flows]')")
    method, _ = build(CASES[case], *data)
    assert state_entries(method) == json.loads(GOLDEN.read_text())[case]


# How the golden was written (on the code before the change it guards): python tests/test_method_contract.py
if __name__ == "__main__":
    ds, loader = tiny_dataset()
    out = {case: state_entries(build(spec, ds, loader)[0]) for case, spec in sorted(CASES.items())}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- the typed hooks


def _ifl(data, **opts):
    method, ctx = build({"name": "ifl", "base": "ce", **opts}, *data)
    return method, ctx


def test_ifl_centres_are_a_constant_lr_group_with_the_optimiser_settings_of_before(data):
    """ParamGroup -> torch.optim dicts: the same dicts (keys, values, order) IFL wrote itself before, so the
    optimiser steps the same and its state (in last.pt) reads as before; the schedule leaves the centres alone."""
    from longtail.engine.fit import _make_optimizer, _set_lr
    from longtail.engine.schedule import CONSTANT_LR, optimizer_groups
    from longtail.methods import ParamGroup

    method, ctx = _ifl(data, center_lr=0.5)
    main, centres = optimizer_groups(method.param_groups(), "ifl")
    assert list(main) == ["params"] and all(p is not method.centers for p in main["params"])
    assert list(centres) == ["params", "lr", "fixed_lr", "momentum", "weight_decay", "nesterov"] == [
        "params", "lr", CONSTANT_LR, "momentum", "weight_decay", "nesterov"]
    assert centres["params"] == [method.centers] and (centres["lr"], centres["momentum"]) == (0.5, 0.0)
    assert (centres["weight_decay"], centres["nesterov"], centres["fixed_lr"]) == (0.0, False, True)
    st = ctx.stage
    st.optim.lr, st.optim.momentum = 0.1, 0.9
    opt = _make_optimizer(method, st)
    assert _set_lr(opt, st, 0.5) == opt.param_groups[0]["lr"] != 0.5
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[0]["momentum"] == 0.9
    assert ParamGroup([]).scheduled and not ParamGroup([], lr=0.1).scheduled


def test_param_groups_as_dicts_are_refused_with_one_line(data):
    from longtail.config import ConfigError
    from longtail.engine.fit import _make_optimizer

    method, ctx = build({"name": "ce"}, *data)
    method.param_groups = lambda: [{"params": list(method.parameters()), "fixed_lr": True}]
    with pytest.raises(ConfigError, match=r"returned a dict, not a ParamGroup.*fixed_lr"):
        _make_optimizer(method, ctx.stage)


def test_ifl_sampler_is_the_two_environment_sampler_with_the_stage_seed(data):
    from longtail.engine.fit import _epoch_seed
    from longtail.methods.ifl import EnvironmentSampler

    ds, _ = data
    method, ctx = _ifl(data)
    assert ctx.sampler_seed == _epoch_seed(0, 0, 0)  # what the configured sampler is seeded with
    sampler = method.sampler(ds, ctx)
    assert isinstance(sampler, EnvironmentSampler) and sampler.half == ctx.stage.batch_size // 2
    assert sampler.weights is method.env_weights  # rebuilt in place: each epoch's draw reads the current weights
    expect = EnvironmentSampler(ds.train.targets, ds.num_classes, ctx.sampler_seed, ctx.epochs, method.env_weights, 4)
    assert torch.equal(sampler.indices(1), expect.indices(1))
    ce, ce_ctx = build({"name": "ce"}, *data)
    assert ce.sampler(ds, ce_ctx) is None  # the stage's configured sampler


def test_the_fit_loop_trains_with_a_methods_sampler_and_passes_each_batchs_sample_ids(image_folder, tmp_path):
    """A plugin's ``sampler`` replaces the configured one, and ``forward`` gets every step's BatchInfo: the sample
    ids of exactly the images and labels it trains on, and the step."""
    from longtail.data.samplers import Sampler
    from longtail.engine import train
    from longtail.engine.build import build_config
    from longtail.methods.ce import CrossEntropy
    from test_engine_cli import tiny_raw

    class Rare(Sampler):  # every epoch: the samples of class 2 only, twice over
        def indices(self, epoch):
            rare = (self.targets == 2).nonzero().flatten()
            return torch.cat([rare, rare, rare[:2]])  # 8 ids: one batch

    seen = []

    class OwnSampler(CrossEntropy):
        def sampler(self, dataset, ctx):
            self.targets = dataset.train.targets
            return Rare(dataset.train.targets, dataset.num_classes, ctx.sampler_seed)

        def forward(self, images, targets, batch=None):
            if batch is not None:
                seen.append((batch.step, batch.sample_ids.tolist(), targets.tolist()))
                assert torch.equal(self.targets[batch.sample_ids], targets)
            return super().forward(images, targets, batch)

    with METHODS.temporarily("own_sampler_test", OwnSampler):
        train(build_config(tiny_raw(image_folder, epochs=2, method="own_sampler_test")), out=tmp_path / "run",
              progress=False)
    assert [s[0] for s in seen] == [0, 0]  # one step an epoch: the sampler's 8 ids, not the 35 images
    assert all(t == [2] * 8 for _, _, t in seen) and len(set(seen[0][1])) == 3


@pytest.mark.parametrize("hook, message", [
    ("train_sampler", r"defines train_sampler\(\).*override sampler\(dataset, ctx\)"),
    ("on_train_batch", r"defines on_train_batch\(\).*batch\.sample_ids"),
    ("forward", r"forward\(images, targets\) must also take batch=None"),
])
def test_a_plugin_written_to_the_old_contract_is_refused_before_it_trains(hook, message, image_folder, tmp_path):
    """Overriding a hook the engine no longer calls would train silently wrong (the configured sampler, no sample
    tracking): one line naming the new hook, from the config check, before any training."""
    from longtail.config import ConfigError
    from longtail.engine.build import build_config
    from longtail.methods import create_method
    from longtail.methods.ce import CrossEntropy
    from test_engine_cli import tiny_raw

    def old(self, *args):
        return super(type(self), self).forward(*args) if hook == "forward" else args[0]

    Old = type("Old", (CrossEntropy,), {hook: old})
    with METHODS.temporarily("old_contract_test", Old):
        with pytest.raises(ConfigError, match=message) as err:
            build_config(tiny_raw(image_folder, method="old_contract_test"))
        assert "\n" not in str(err.value) and "'old_contract_test'" in str(err.value)
        method, _ = build({"name": "ce"}, *tiny_dataset())
        with pytest.raises(ConfigError, match=message):  # and wherever a method is built
            create_method({"name": "old_contract_test"}, method.model, _ifl_ctx())
    assert not (tmp_path / "run").exists()


def _ifl_ctx():
    from longtail.methods import MethodContext

    return MethodContext(3, torch.tensor([12, 8, 4]), epochs=1, steps_per_epoch=1, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- the losses layer


def test_every_loss_is_a_method_of_its_name_with_its_options():
    """Recipes name losses as methods (method: {name: focal, gamma: 2}) and as IFL / mixup bases (base: focal):
    both resolve to the same LOSSES entry and Config."""
    from longtail.methods import LossMethod
    from longtail.registry import LOSSES

    assert sorted(LOSSES) == sorted(WRAPPED)
    for name in LOSSES:
        method = METHODS.get(name)
        assert issubclass(method, LossMethod) and method.loss_name == name
        assert method.Config is LOSSES.get(name).Config
        assert method.head_needed({}) == LOSSES.get(name).requires_head
    assert METHODS.get("ifl").head_needed({"base": "ldam_drw"}) == "cosine" == METHODS.get("mixup").head_needed(
        {"base": "ldam_drw"})


@pytest.mark.parametrize("wrapper", ["ifl", "mixup"])
def test_ifl_and_mixup_hold_their_loss_as_a_submodule_that_saves_nothing(wrapper, data):
    method, ctx = build({"name": wrapper, "base": "ldam_drw"}, *data)
    modules = dict(method.named_modules())
    assert type(modules["criterion"]).__name__ == "LDAMLoss" and "_base" not in vars(method)
    assert not [k for k in method.state_dict() if k.startswith("criterion")]
    assert {n for n, _ in method.named_buffers()} >= {"criterion.margins", "criterion.drw_weights"}
    method.on_epoch_start(200, ctx)  # past drw_epoch 160: the loss re-weights
    assert method.criterion.reweight


def test_a_loss_method_with_posthoc_adjustment_predicts_as_before(data):
    """IFL around logit_adjust_posthoc predicts z - tau log pi (the loss's adjust_scores), as its base did."""
    ds, _ = data
    method, _ = build({"name": "ifl", "base": "logit_adjust_posthoc", "base_options": {"tau": 1.5}}, *data)
    feats = torch.randn(4, method.model.feature_dim)
    prior = ds.train_counts().float() / ds.train_counts().sum()
    expect = method.model.forward_head(feats) - torch.log(prior**1.5 + 1e-12)
    assert torch.equal(method.predict_features(feats), expect)


def test_longtail_list_still_shows_the_loss_methods(capsys):
    from longtail.cli import main

    assert main(["list"]) == 0
    methods = capsys.readouterr().out.split("methods:")[1].split("samplers:")[0]
    listed = [line.split()[0] for line in methods.splitlines() if line.startswith("  ") and line[2] != " "]
    assert set(WRAPPED) <= set(listed)
