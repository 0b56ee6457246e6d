import copy

import pytest

from longtail.config import (
    ConfigError,
    RunConfig,
    build_config,
    load_raw,
    resolve_config_path,
    shipped_configs,
    validate,
)
from longtail.engine import build


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_validates(name):
    cfg = build.load_config(name)  # names and method options too
    assert isinstance(cfg, RunConfig)
    assert cfg.stages and all(st.method["name"] for st in cfg.stages)


def test_shipped_configs_exist():
    assert {"quickstart", "cifar10_lt/ce", "cifar100_lt/ce"} <= set(shipped_configs())


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'data.imbalance_ration'; did you mean 'imbalance_ratio'"):
        build_config({"data": {"imbalance_ration": 10}})


def test_unknown_top_level_key_lists_known():
    with pytest.raises(ConfigError, match="unknown key 'zzz'"):
        build_config({"zzz": 1})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="data.imbalance_ratio: expected a number"):
        build_config({"data": {"imbalance_ratio": "lots"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        build_config({}, ["stages.0.epochs=2.5"])


def test_overrides_are_coerced_to_field_types():
    cfg = build_config({}, ["seed=3", "data.imbalance_ratio=50", "stages.0.optim.lr=0.5",
                            "stages.0.schedule.milestones=[3,4]", "eval.plots=false", "model.pretrained=null"])
    assert cfg.seed == 3 and cfg.data.imbalance_ratio == 50.0 and isinstance(cfg.data.imbalance_ratio, float)
    assert cfg.stages[0].optim.lr == 0.5
    assert cfg.stages[0].schedule.milestones == [3, 4]
    assert cfg.eval.plots is False and cfg.model.pretrained is None


def test_stage_shorthand_applies_to_single_stage():
    cfg = build_config({}, ["epochs=7", "optim.lr=0.3", "method.label_smoothing=0.1"])
    assert cfg.stages[0].epochs == 7 and cfg.stages[0].optim.lr == 0.3
    assert cfg.stages[0].method == {"name": "ce", "label_smoothing": 0.1}


def test_stage_shorthand_refuses_ambiguity():
    raw = {"stages": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(ConfigError, match="stages.N.epochs"):
        build_config(raw, ["epochs=3"])


def test_method_options_are_strict():
    with pytest.raises(ConfigError, match="did you mean 'label_smoothing'"):
        build.build_config({}, ["method.label_smothing=0.1"])


def test_unknown_names_are_errors_with_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'cifar10_lt'"):
        build.build_config({"data": {"name": "cifar10-lr"}})
    with pytest.raises(ConfigError, match="unknown method 'cee'"):
        build.build_config({}, ["method.name=cee"])
    with pytest.raises(ConfigError, match="backbone"):
        build.build_config({"model": {"backbone": "resnet33"}})
    with pytest.raises(ConfigError, match=r"stages.0 \('main'\).sampler: unknown sampler 'balanced'"):
        build.build_config({}, ["sampler=balanced"])


def test_the_schema_knows_no_plugin_and_resolve_changes_no_config():
    # config.build_config checks types, ranges and stage references only; names are the engine's (build.resolve).
    cfg = build_config({"data": {"name": "no_such_data"}}, ["method.name=no_such_method", "method.x=1"])
    assert cfg.stages[0].method == {"name": "no_such_method", "x": 1}
    with pytest.raises(ConfigError, match="unknown dataset 'no_such_data'"):
        build.resolve(cfg)
    raw = build_config({}, ["method.name=tau_norm", "epochs=0", "model.head=linear"])
    before = copy.deepcopy(raw)
    validate(raw)
    resolved = build.resolve(raw)
    assert raw == before  # neither validate nor resolve changes the config it is given
    assert resolved.stages[0].method["tau"] == 1.0 and len(resolved.stages[0].method["tau_grid"]) == 21
    assert build.resolve(resolved) == resolved  # idempotent: a saved config.yaml resolves to itself


def test_semantic_checks():
    with pytest.raises(ConfigError, match="init_from 'nope'"):
        build_config({"stages": [{"name": "a", "init_from": "nope"}]})
    with pytest.raises(ConfigError, match="profile"):
        build_config({"data": {"profile": "linear"}})
    with pytest.raises(ConfigError, match="eval.select_metric must be one of auto, top1, mean_class_acc"):
        build_config({"eval": {"select_metric": "top5"}})
    with pytest.raises(ConfigError, match="duplicate stage name"):
        build_config({"stages": [{"name": "a"}, {"name": "a"}]})
    # A one-epoch warm-up under the reference offset would be no warm-up (the cause of collapsed short runs).
    with pytest.raises(ConfigError, match="gives no warm-up"):
        build_config({"stages": [{"schedule": {"warmup_epochs": 1, "reference_offset": True}}]})
    build_config({"stages": [{"schedule": {"warmup_epochs": 2, "reference_offset": True}}]})


def test_unknown_config_name_is_clear():
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        resolve_config_path("cifar10_lt/cee")


def test_base_inheritance(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("seed: 5\ndata: {name: digits_lt, imbalance_ratio: 10}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ndata: {imbalance_ratio: 20}\n")
    raw = load_raw(child)
    assert raw["seed"] == 5 and raw["data"] == {"name": "digits_lt", "imbalance_ratio": 20}


def test_invalid_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_raw(bad)
