"""Older configs (flat head / dataset keys) load, resume and evaluate as they did: ``longtail.config.migrate``.

Before heads and datasets had their own ``Config`` dataclasses, ``model.head_scale`` was the cosine head's s and the
causal_norm head's tau, ``data.max_per_class`` every dataset's n_max, and so on; every run folder's config.yaml of
then holds them all. tests/data/old_runs/*_config.yaml are verbatim copies of two reproduction rows' config.yaml
(benchmarks/runs/{ce,tde}/, written at commit b03d7e2), never read from benchmarks/runs/ itself.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

import longtail.engine.fit as fit
from longtail.config import (
    DATASET_OPTIONS_OF_OLD_KEYS,
    HEAD_OPTIONS_OF_OLD_KEYS,
    OLD_DATA_KEYS,
    OLD_HEAD_KEYS,
    ConfigError,
    load_raw,
    migrate,
    to_dict,
)
from longtail.engine import Interrupted, train
from longtail.engine.build import build_config, load_config
from longtail.engine.fit import evaluate_run
from longtail.engine.inference import load_trained
from longtail.registry import DATASETS, HEADS
from test_engine_cli import assert_same_state, final_weights, tiny_raw

REPO = Path(__file__).resolve().parents[1]
OLD_RUNS = Path(__file__).resolve().parent / "data" / "old_runs"


def _old_saved(name: str) -> dict:
    raw = load_raw(OLD_RUNS / f"{name}_config.yaml")
    raw.pop("meta")
    return raw


# ----------------------------------------------------------------------------- the verbatim config.yaml files


@pytest.mark.parametrize("name, head", [
    ("ce", {"name": "linear", "bias": True}),
    ("tde", {"name": "causal_norm", "tau": 16.0, "num_heads": 2, "gamma": 0.03125}),
])
def test_an_old_run_config_yaml_loads_with_its_head_and_dataset_options(name, head):
    raw = _old_saved(name)
    assert "head_scale" in raw["model"] and "max_per_class" in raw["data"]  # the old layout, as written then
    cfg = build_config(raw)
    assert cfg.model.head == head  # tde: head_scale 16 became tau; its head_bias (ignored then) is gone
    assert cfg.data.options == {"max_per_class": None, "download": False}  # CIFAR's own; lists, GLT keys dropped
    assert cfg.data.name == "cifar10_lt" and cfg.data.imbalance_ratio == 100 and cfg.model.backbone == "resnet32"
    saved = to_dict(cfg)
    assert not set(OLD_HEAD_KEYS) & set(saved["model"]) and not set(OLD_DATA_KEYS) & set(saved["data"])
    assert to_dict(build_config(saved)) == saved  # saved again, it reads back the same


@pytest.mark.parametrize("row", ["ce", "tde"])
def test_the_campaign_sees_no_settings_change_in_an_old_run_folder(row, tmp_path):
    """benchmarks/reproduce.py resumes a partial row only when its config.yaml matches the row's recipe and
    overrides: the migration must not look like a change, and a real change must still be caught."""
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    rp = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = rp  # dataclasses look their module up there
    spec.loader.exec_module(rp)
    table = rp.load_table(REPO / "benchmarks" / "reproduce.yaml")
    (tmp_path / "runs" / row).mkdir(parents=True)
    text = (OLD_RUNS / f"{row}_config.yaml").read_text()
    (tmp_path / "runs" / row / "config.yaml").write_text(text)
    notes: list[str] = []
    campaign = rp.Campaign(table, tmp_path / "runs", tmp_path / "results", None, log=notes.append)
    campaign.check_config(table.get(row))  # no TableError
    moved = " ".join(notes)
    for key in ("model.head", "head_bias", "head_scale", "num_heads", "head_gamma", "data.options",
                "max_per_class", "train_list", "annotation", "download"):
        assert key not in moved, moved  # only keys added since (e.g. data.val_per_class) are one-sided
    changed = text.replace("head_scale: 16.0", "head_scale: 20.0").replace("head_bias: true", "head_bias: false")
    (tmp_path / "runs" / row / "config.yaml").write_text(changed)
    with pytest.raises(rp.TableError, match=r"model\.head\.(tau \(run: 20.0, row: 16.0\)|bias \(run: False, row: "
                                            r"True\))"):
        campaign.check_config(table.get(row))


# ----------------------------------------------------------------------------- the mapping


def test_the_tables_name_registered_heads_datasets_and_options():
    assert set(HEAD_OPTIONS_OF_OLD_KEYS) == set(HEADS) and set(DATASET_OPTIONS_OF_OLD_KEYS) == set(DATASETS)
    for name, table in HEAD_OPTIONS_OF_OLD_KEYS.items():
        fields = set(HEADS.get(name).Config.__dataclass_fields__)
        assert set(table.values()) == fields, name  # every option of a built-in head had an old key
    for name, keys in DATASET_OPTIONS_OF_OLD_KEYS.items():
        config = getattr(DATASETS.get(name), "Config", None)
        assert set(keys) == set(config.__dataclass_fields__ if config else ()), name


def test_migrate_gives_each_old_key_the_meaning_it_had():
    flat_model = {"backbone": "tiny", "head_bias": False, "head_scale": 30.0, "num_heads": 4, "head_gamma": 0.1}
    assert migrate({"model": {**flat_model, "head": "cosine"}})["model"] == \
        {"backbone": "tiny", "head": {"name": "cosine", "scale": 30.0}}  # s
    assert migrate({"model": {**flat_model, "head": "causal_norm"}})["model"]["head"] == \
        {"name": "causal_norm", "tau": 30.0, "num_heads": 4, "gamma": 0.1}  # tau, K, gamma
    assert migrate({"model": dict(flat_model)})["model"]["head"] == {"name": "linear", "bias": False}  # default head
    flat_data = {"num_classes": 7, "max_per_class": 50, "train_variant": "cbl", "train_list": "a.txt",
                 "annotation": "ann.json", "path_prefix": "/x/", "download": True}
    assert migrate({"data": dict(flat_data)})["data"] == {  # shapes_glt, the default dataset
        "options": {"num_classes": 7, "max_per_class": 50, "train_variant": "cbl"}}
    assert migrate({"data": {**flat_data, "name": "list_file"}})["data"]["options"] == \
        {"num_classes": 7, "train_list": "a.txt"}
    assert migrate({"data": {**flat_data, "name": "mscoco_glt"}})["data"]["options"] == \
        {"annotation": "ann.json", "path_prefix": "/x/"}
    assert migrate({"data": {**flat_data, "name": "cifar100_lt"}})["data"]["options"] == \
        {"max_per_class": 50, "download": True}
    # A plugin's head or dataset: what is not at its old default is passed on as an option of the same name.
    assert migrate({"model": {"head": "mine", **OLD_HEAD_KEYS, "head_scale": 2.0}})["model"]["head"] == \
        {"name": "mine", "head_scale": 2.0}
    assert migrate({"data": {"name": "mine", **OLD_DATA_KEYS}})["data"]["options"] == {}
    new = {"model": {"head": {"name": "cosine", "scale": 3.0}}, "data": {"options": {"max_per_class": 3}}}
    assert migrate(copy.deepcopy(new)) == new  # the new layout is left as it is


def test_old_style_overrides_keep_their_meaning_in_any_order():
    def head(recipe, *ov):
        return load_config(recipe, list(ov)).model.head

    assert head("cifar10_lt/tde", "model.head_scale=20") == \
        {"name": "causal_norm", "tau": 20.0, "num_heads": 2, "gamma": 0.03125}
    assert head("cifar10_lt/ldam_drw", "model.head_scale=20") == {"name": "cosine", "scale": 20.0}
    assert head("cifar10_lt/ce", "model.head_bias=true") == {"name": "linear", "bias": True}  # the ce row's
    assert head("quickstart", "model.head_scale=20", "model.head=cosine") == {"name": "cosine", "scale": 20.0}
    assert head("quickstart", "model.head=causal_norm", "model.head.tau=8") == \
        {"name": "causal_norm", "tau": 8.0, "num_heads": 2, "gamma": 0.03125}
    cfg = load_config("quickstart", ["data.name=cifar10_lt", "data.max_per_class=12"])
    assert cfg.data.options == {"max_per_class": 12, "download": False}  # shapes_glt's options did not carry over
    assert load_config("quickstart", ["data.train_variant=cbl"]).data.options["train_variant"] == "cbl"


@pytest.mark.parametrize("overrides, message", [
    (["model.head.scale=3"], "model.head.scale: the causal_norm head has no option 'scale'; its options: tau, "
                             "num_heads, gamma"),
    (["model.head.tua=3"], "model.head.tua: the causal_norm head has no option 'tua'; did you mean 'tau'? its "
                           "options: tau, num_heads, gamma"),
    (["model.head_bias=false"], "model.head_bias: the causal_norm head has no such option (its options: tau, "
                                "num_heads, gamma; `longtail list causal_norm`); head options are now "
                                "model.head.OPTION, head_bias became model.head.bias (linear)"),
    (["data.annotation=a.json"], "data.annotation: dataset 'cifar10_lt' has no option annotation (its options: "
                                 "max_per_class, download; `longtail list cifar10_lt`)"),
    (["data.options.train_variant=cbl"], "data.options.train_variant: dataset 'cifar10_lt' has no option "
                                         "'train_variant'; its options: max_per_class, download"),
    (["model.head.tau=0"], "model.head: tau must be > 0, got 0.0"),
])
def test_a_key_this_head_or_dataset_does_not_take_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("cifar10_lt/tde", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recipes_inherit_head_and_dataset_options_by_name(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {name: shapes_glt, options: {max_per_class: 50}}\n"
                                        "model: {backbone: tiny, head: {name: causal_norm, tau: 8}}\n")
    (tmp_path / "same.yaml").write_text("base: base.yaml\nmodel: {head: {gamma: 0.5}}\n"
                                        "data: {options: {train_variant: cbl}}\n")
    (tmp_path / "other.yaml").write_text("base: base.yaml\nmodel: {head: {name: cosine}}\ndata: {name: digits_lt}\n")
    (tmp_path / "old.yaml").write_text("base: base.yaml\nmodel: {head_scale: 4}\n")  # an old-style child
    same = load_config(tmp_path / "same.yaml")
    assert same.model.head == {"name": "causal_norm", "tau": 8.0, "num_heads": 2, "gamma": 0.5}
    assert same.data.options == {"num_classes": None, "max_per_class": 50, "train_variant": "cbl"}
    other = load_config(tmp_path / "other.yaml")
    assert other.model.head == {"name": "cosine", "scale": 16.0} and other.data.options == {"max_per_class": None}
    assert load_config(tmp_path / "old.yaml").model.head["tau"] == 4.0


# ----------------------------------------------------------------------------- a run folder in the old layout


def _old_layout(saved: dict) -> dict:
    """A config.yaml as the code before per-head / per-dataset options wrote it: every flat key, at its value."""
    raw = copy.deepcopy(saved)
    head = raw["model"].pop("head")
    inverse = {new: old for old, new in HEAD_OPTIONS_OF_OLD_KEYS[head["name"]].items()}
    flat = {**OLD_HEAD_KEYS, **{inverse[k]: v for k, v in head.items() if k != "name"}}
    raw["model"] = {"backbone": raw["model"].pop("backbone"), "head": head["name"], **flat, **raw["model"]}
    raw["data"] = {**{k: v for k, v in raw["data"].items() if k != "options"}, **OLD_DATA_KEYS,
                   **raw["data"]["options"]}
    return raw


def _rewrite_old(run: Path) -> None:
    path = run / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(_old_layout(saved), sort_keys=False))
    assert "head_scale" in path.read_text() and "options" not in yaml.safe_load(path.read_text())["data"]


def test_an_old_layout_run_resumes_bit_identical_and_evaluates_the_same(image_folder, tmp_path, monkeypatch):
    """TDE on a causal_norm head with a non-default tau and gamma: resumed from a config.yaml in the old layout
    (head_scale as tau), the run ends with the uninterrupted run's weights; evaluated from one, with its numbers."""
    raw = tiny_raw(image_folder, epochs=2, method="tde")
    raw["model"]["head"] = {"name": "causal_norm", "tau": 8.0, "num_heads": 2, "gamma": 0.05}
    ref = train(build_config(raw), out=tmp_path / "ref", progress=False)
    make = fit._make_optimizer
    steps = []

    def make_counting(method, st):
        opt = make(method, st)
        step = opt.step

        def step_and_count(*a, **k):
            out = step(*a, **k)
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the fit loop saves a resume point and stops
            return out

        opt.step = step_and_count
        return opt

    monkeypatch.setattr(fit, "_make_optimizer", make_counting)
    with pytest.raises(Interrupted, match="--resume"):
        train(build_config(raw), out=tmp_path / "int", progress=False)
    _rewrite_old(tmp_path / "int")
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))

    want = evaluate_run(*(lambda r: (r.method, r.loader, r.cfg))(load_trained(ref)))
    _rewrite_old(ref)
    run = load_trained(ref)
    assert run.cfg.model.head == raw["model"]["head"]
    got = evaluate_run(run.method, run.loader, run.cfg)
    assert got["splits"] == want["splits"]
