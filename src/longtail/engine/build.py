"""Where the config meets the registries: every name a run config gives is resolved here, once.

``longtail.config`` is the schema (types, ranges, stage references) and knows no plugin. ``resolve`` checks the
registered names (dataset, backbone, head, sampler, each stage's method; plugins imported first), a method's
``requires_head``, and the own options of the dataset (``data.options``), the head (``model.head``) and each
method (``stages[].method``) against that plugin's ``Config`` dataclass, and returns a copy that holds every option
with its default filled in: the resolved config a run saves in ``config.yaml`` and embeds in every checkpoint.
``train``, ``load_trained``, ``load_model``, ``longtail.load_config`` and the CLI go through it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import longtail.data  # noqa: F401  (fill the registries: datasets, samplers)
import longtail.losses  # noqa: F401  (losses)
import longtail.methods  # noqa: F401  (methods)
import longtail.models  # noqa: F401  (backbones, heads)
from longtail import config
from longtail.config import RunConfig, from_dict, plugin_options, to_dict
from longtail.data.loaders import parse_augment
from longtail.errors import ConfigError
from longtail.methods.base import check_contract
from longtail.plugins import load_entry_points, load_plugins
from longtail.registry import BACKBONES, DATASETS, HEADS, METHODS, SAMPLERS, Registry, RegistryError


def _known(reg: Registry, name: str, where: str) -> None:
    try:
        reg.get(name)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` (which is left as it is) with every registered name checked and the options of the dataset,
    the head and each stage's method completed with their defaults; ConfigError (with a "did you mean") on an
    unknown name or option, or a method whose ``requires_head`` is not ``model.head``. Idempotent.

    Plugins are imported first, so their names are known: the installed ``longtail.plugins`` entry points (once
    per process) and the modules ``cfg.plugins`` names (``--plugin``, a recipe's ``plugins:``)."""
    config.validate(cfg)
    load_entry_points()
    load_plugins(cfg.plugins, needed_by="this config (plugins)")
    out = copy.deepcopy(cfg)
    try:
        parse_augment(out.data.augment)  # a preset, optionally + randaugment (the loaders own the presets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _known(DATASETS, out.data.name, "data.name")
    _known(BACKBONES, out.model.backbone, "model.backbone")
    head = out.model.head["name"]
    _known(HEADS, head, "model.head")
    # A dataset's and a head's own options, checked against their Config and completed with its defaults.
    data_opts = plugin_options(DATASETS.get(out.data.name), out.data.options, "data.options",
                               f"dataset '{out.data.name}'")
    out.data.options = {} if data_opts is None else to_dict(data_opts)
    head_opts = plugin_options(HEADS.get(head), {k: v for k, v in out.model.head.items() if k != "name"},
                               "model.head", f"the {head} head")
    out.model.head = {"name": head, **({} if head_opts is None else to_dict(head_opts))}
    for i, st in enumerate(out.stages):
        where = f"stages.{i} ('{st.name}')"
        _known(SAMPLERS, st.sampler, f"{where}.sampler")
        _known(METHODS, st.method["name"], f"{where}.method")
        method_cls = METHODS.get(st.method["name"])
        check_contract(st.method["name"], method_cls)  # a plugin written to an old Method contract
        opts = {k: v for k, v in st.method.items() if k != "name"}
        need = method_cls.head_needed(opts)  # a wrapper (ifl, mixup) answers for its base
        if need is not None and need != head:
            raise ConfigError(f"{where}: method '{st.method['name']}' needs model.head={need} (got '{head}')")
        st.method = {"name": st.method["name"], **to_dict(from_dict(method_cls.Config, opts, f"{where}.method"))}
    if out.eval.select == "best_val" and out.stages[-1].eval_every == 0:
        out.stages[-1].eval_every = 1  # best_val chooses among the last stage's val evaluations: one per epoch
    return out


def build_config(raw: dict, overrides: list[str] | None = None) -> RunConfig:
    """``longtail.config.build_config`` (schema, overrides, ranges), then ``resolve`` (names, method options)."""
    return resolve(config.build_config(raw, overrides))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A shipped recipe's name or a YAML file (None: the quickstart) with ``key=value`` overrides, resolved."""
    return resolve(config.load_config(path, overrides))
