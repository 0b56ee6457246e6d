"""Strict, typed run configuration: dataclasses are the schema, YAML presets fill them.

Unknown keys are errors with a "did you mean"; ``key.sub=value`` overrides are coerced to the
field's type. A leaf module: it imports no plugin and looks nothing up in a registry. The names a config gives
(dataset, backbone, head, sampler, method) and the own options of a dataset (``data.options``), a head
(``model.head: {name, ...}``) and a method (``stages[].method: {name, ...}``), each checked against that plugin's
``Config`` dataclass, are resolved one layer up, by ``longtail.engine.build``. ``migrate`` reads the flat head and
dataset keys of older configs (every older run folder's config.yaml) into that layout.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtail.errors import ConfigError  # defined with the other user errors; importable from here as before


@dataclass
class DataConfig:
    """Which dataset, and how its long tail and loaders are built."""

    name: str = "shapes_glt"  # a registered dataset (`longtail list`)
    root: str | None = None  # folder or archive of the data; None: the dataset's default location
    imbalance_ratio: float = 100.0  # n_max / n_min of the training split
    profile: str = "exp"  # exp: n_i = int(n_max * r^(i/(C-1))); step: half n_max, half n_max*r
    subset_seed: int = 0  # which images are kept (CIFAR-LT: bit-compatible with Cao et al.)
    val_fraction: float = 0.0  # held out of train per class for model selection; 0: no val split
    # CIFAR-LT: a balanced val of this many images per class drawn (seeded by subset_seed) from the CIFAR training
    # images the long-tailed subset left out, so train stays exactly as without it; 0: none. The head class keeps
    # all its images (n_max), so its val holds what is left (none at the default n_max): see data/cifar.py.
    val_per_class: int = 0
    # The dataset's own options, checked against its ``Config`` dataclass (``longtail list DATASET``) by
    # ``longtail.engine.build`` and completed there with their defaults: e.g. shapes_glt {num_classes, max_per_class,
    # train_variant}, list files {train_list, val_list, test_list}, GLT {annotation, path_prefix}.
    options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # network input side; None = the dataset's default
    in_memory: str = "auto"  # file datasets: auto | always | never: decode once into RAM and augment in batches
    # In-memory datasets (CIFAR-LT, shapes-glt, digits-lt, in_memory=always): true keeps the uint8 images on the
    # device and augments whole batches there; false serves them through DataLoader workers with per-image
    # transforms v2 (the plain PyTorch path, for comparison or for augmentations only written per image).
    fast_path: bool = True
    augment: str = "auto"  # auto | cifar | imagenet | glt | glt_coco | none; +randaugment / +trivialaugment after
    # the flip (e.g. cifar+trivialaugment), or randaugment / trivialaugment alone (auto's preset)
    num_workers: int = 2  # DataLoader workers for file datasets
    # File datasets: every file's existence is checked at load time, and with at most this many images in all
    # each is also decoded once then (a bad file fails before training, not mid-epoch); 0: no decoding check.
    decode_check: int = 5000
    # Against decompression bombs (the error names the file and the setting): the pixels of one image, read from
    # its header before decoding (PNG, JPEG, GIF, WebP); the MB of one image file or zip member (uncompressed, from
    # the zip's directory before reading); and a zip member's uncompressed / compressed size (images barely shrink).
    max_image_pixels: int = 100_000_000
    max_file_mb: float = 256.0
    max_zip_ratio: float = 200.0
    # List files and GLT annotations name images inside data.root (a `../` or an absolute path elsewhere is an
    # error); true lets them name any file.
    allow_outside_root: bool = False
    cache_dir: str | None = None  # decoded/generated data cache; None: $LONGTAIL_CACHE or ~/.cache/longtail


@dataclass
class ModelConfig:
    """Backbone + classifier head."""

    backbone: str = "resnet32"  # a registered backbone (`longtail list`)
    # A registered head and its own options (``longtail list HEAD``): ``linear`` or ``{name: causal_norm, tau: 16}``;
    # the options are checked against the head's ``Config`` dataclass and completed by ``longtail.engine.build``.
    head: dict[str, Any] = field(default_factory=lambda: {"name": "linear"})
    pretrained: str | None = None  # local weights file for the backbone (never downloaded implicitly)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU, ~10% on an AVX2 CPU)

    def __post_init__(self) -> None:
        if isinstance(self.head, str):  # ModelConfig(head="linear"), as a recipe's `head: linear`
            self.head = {"name": self.head}
        elif "name" not in self.head:  # `head: {bias: false}`: options of the default head, as model.head.bias=false
            self.head = {"name": "linear", **self.head}


@dataclass
class OptimConfig:
    """SGD with momentum (the optimiser of every reference recipe), or AdamW."""

    name: str = "sgd"  # sgd | adamw (decoupled weight decay; momentum and nesterov are SGD's)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    clip_grad_norm: float = 0.0  # clip the gradients' total L2 norm to this before each step; 0: off


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, evaluated beside them (metrics.json ``splits_ema``)."""

    decay: float = 0.0  # ema = decay * ema + (1 - decay) * weights after every step (e.g. 0.999); 0: off


@dataclass
class ScheduleConfig:
    """Learning rate per epoch: linear warm-up, then multistep or cosine decay."""

    name: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=list)  # multistep: epochs (0-based) where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_factor: float = 1.0 / 3.0  # lr at the first warm-up epoch, as a fraction of lr
    min_lr: float = 0.0  # cosine: final lr
    reference_offset: bool = False  # reproduce the TDE code's one-epoch offset (scheduler stepped first)
    per_iteration: bool = False  # update the lr every iteration (smooth warm-up / cosine)


@dataclass
class StageConfig:
    """One stage of a recipe: a method trained for some epochs with a sampler and an optimiser."""

    name: str = "main"
    method: dict[str, Any] = field(default_factory=lambda: {"name": "ce"})  # name + the method's options
    epochs: int = 200
    batch_size: int = 128
    sampler: str = "instance"  # a registered sampler
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Where this stage's starting weights come from: the name of an earlier stage (its final weights), or a
    # path to another run's folder (its evaluated weights, checkpoints/final.pt) or to a checkpoint file.
    init_from: str | None = None
    eval_every: int = 0  # evaluate on val every N epochs (0: only at the end); never on test
    drop_last: bool = True  # drop the last partial training batch (reference behaviour)
    # How long an epoch is. sampler: the sampler's whole stream (N for instance sampling, n_max x C for class-aware
    # sampling); dataset: int(N / batch_size) steps of it, N = training images, as Decoupling's run_networks.py
    # (epoch_steps), where a class-aware epoch is cut after that many batches.
    epoch_length: str = "sampler"


@dataclass
class EvalConfig:
    """What is measured at the end of a run."""

    batch_size: int = 512
    shots: str = "fixed"  # fixed: the thresholds below | auto: terciles of the training class counts
    many_above: int = 100  # many-shot: > this many training images (shots=fixed)
    few_below: int = 20  # few-shot: < this many training images (shots=fixed)
    inclusive: bool = False  # OLTR thresholds (>= many_above, <= few_below)
    select: str = "last"  # last | best_val: which epoch's weights are reported (never chosen on test)
    # best_val picks the epoch on this val metric: top1 | mean_class_acc | many | medium | few | precision; auto:
    # mean_class_acc when the val split is long-tailed (largest / smallest non-empty class > 2), else top1.
    select_metric: str = "auto"
    plots: bool = True


@dataclass
class LogConfig:
    """Per-epoch records beside metrics.csv (always written): TensorBoard and Weights & Biases, both off."""

    tensorboard: bool = False  # event files in <run>/tensorboard (needs the `log` extra: pip install tensorboard)
    wandb: str | None = None  # a W&B project name to log to (needs the `wandb` extra); None: off


@dataclass
class RunConfig:
    """A whole run: data, model, stages, evaluation."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = True  # deterministic kernels (CPU is always bit-reproducible for a seed)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    compile: bool = False  # torch.compile the model (GPU)
    checkpoint_every: int = 1  # epochs between checkpoints (atomic, resumable)
    # Also save the resume point every N training steps inside an epoch (0: off), so a kill loses at most N
    # steps of a long epoch; the checkpoint is the one SIGINT writes at that step, and training is unchanged.
    checkpoint_every_steps: int = 0
    # Training steps between host reads of the loss (the non-finite check, the progress bar's loss) and, under
    # DDP, of the stop flag: the steps in between queue on the device without waiting for it. Also read at
    # every epoch end and before every save; a NaN is reported as "between steps a and b".
    sync_every: int = 50
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Modules imported before the registries are read (your own datasets, backbones, heads, samplers, methods;
    # see longtail.plugins): `--plugin MODULE` adds to it, and a run records here every plugin it used.
    plugins: list[str] = field(default_factory=list)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the annotated type ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"unknown key '{where + '.' if where else ''}{key}'{hint}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a Config's __post_init__ rejecting a value
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def check_val_option(name: str, value: Any, grid: list[float]) -> None:
    """Check of a prediction-time option that may be a number or ``"val"`` (chosen on the val split over the
    Config field ``<name>_grid``; see ``Method.val_options``), for a Config's ``__post_init__``."""
    if isinstance(value, str) and value != "val":
        raise ValueError(f"{name} must be a number or 'val' (chosen on the val split over {name}_grid), got '{value}'")
    if not grid:
        raise ValueError(f"{name}_grid must hold at least one value (it is what {name}=val chooses from)")


def to_dict(obj: Any) -> Any:
    """Plain (YAML-safe) dict of a dataclass config."""
    return dataclasses.asdict(obj)


def options(config_cls: type) -> Any:
    """Decorator for a registered head or dataset factory: its own options are the fields of ``config_cls`` (a
    dataclass, available as ``factory.Config``), given in a recipe as ``model.head: {name: HEAD, OPTION: ...}`` or
    ``data.options: {OPTION: ...}``; ``longtail list NAME`` prints them with their comments. A factory without it
    takes no options."""

    def deco(factory: Any) -> Any:
        factory.Config = config_cls
        return factory

    return deco


def options_of(factory: Any) -> type | None:
    """The ``Config`` dataclass of a registered head or dataset factory (see ``options``); None: it takes none."""
    cls = getattr(factory, "Config", None)
    return cls if dataclasses.is_dataclass(cls) else None


def plugin_options(factory: Any, opts: dict, where: str, what: str) -> Any:
    """``opts`` (a mapping of option -> value) as an instance of ``factory``'s ``Config``, defaults filled in; None
    for a factory without one (and no options). ``where`` is the recipe key (``model.head``, ``data.options``),
    ``what`` names the plugin in errors (``the cosine head``, ``dataset 'shapes_glt'``): an option it does not take
    is a ConfigError naming it, with a "did you mean" and its options."""
    cls = options_of(factory)
    if cls is None:
        if opts:
            raise ConfigError(f"{where}: {what} takes no options, got {', '.join(map(str, opts))}")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    for key in opts:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{where}.{key}: {what} has no option '{key}'; {hint}its options: "
                              f"{', '.join(names) or 'none'}")
    return from_dict(cls, opts, where)


# ----------------------------------------------------------------------------- older configs

# Before heads and datasets had their own ``Config`` dataclasses, their options were flat fields of ModelConfig and
# DataConfig, each read by the heads / datasets it applied to and ignored by the others. Every config.yaml written
# then holds all of them (with the defaults below where not set), so ``migrate`` moves each to the option it was
# for, with its meaning: head_scale is the cosine head's s and the causal_norm head's tau.
OLD_HEAD_KEYS: dict[str, Any] = {"head_bias": True, "head_scale": 16.0, "num_heads": 2, "head_gamma": 0.03125}
OLD_DATA_KEYS: dict[str, Any] = {"num_classes": None, "max_per_class": None, "train_variant": "lt", "train_list": None,
                                 "val_list": None, "test_list": None, "annotation": None, "path_prefix": None,
                                 "download": False}
# Built-in head -> {old key: its option}: the old keys each head read (an old key missing here had no effect).
HEAD_OPTIONS_OF_OLD_KEYS: dict[str, dict[str, str]] = {
    "linear": {"head_bias": "bias"},
    "cosine": {"head_scale": "scale"},
    "causal_norm": {"head_scale": "tau", "num_heads": "num_heads", "head_gamma": "gamma"},
}
_LISTS = ("train_list", "val_list", "test_list")
_GLT = ("annotation", "path_prefix")
# Built-in dataset -> the old keys it read; each is now the option of the same name.
DATASET_OPTIONS_OF_OLD_KEYS: dict[str, tuple[str, ...]] = {
    "shapes_glt": ("num_classes", "max_per_class", "train_variant"),
    "digits_lt": ("max_per_class",),
    "cifar10_lt": ("max_per_class", "download"),
    "cifar100_lt": ("max_per_class", "download"),
    "image_folder": (),
    "list_file": ("num_classes", *_LISTS),
    "imagenet_lt": _LISTS,
    "places_lt": _LISTS,
    "inat2018": _LISTS,
    "imagenet_glt": _GLT,
    "mscoco_glt": _GLT,
    "glt": _GLT,
}


def _canonical_name(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_")  # as the registries spell names


def migrate(raw: dict, overridden: Collection[str] = ()) -> dict:
    """Move the flat head and dataset keys of an older config (``model.head_scale``, ``model.num_heads``,
    ``model.head_gamma``, ``model.head_bias``; ``data.num_classes``, ``data.max_per_class``, ``data.train_variant``,
    ``data.train_list`` / ``val_list`` / ``test_list``, ``data.annotation``, ``data.path_prefix``, ``data.download``)
    into ``model.head: {name, OPTION: ...}`` and ``data.options``, in place; returns ``raw``. The one place that
    knows the old layout: every run folder's config.yaml, old recipes and old ``key=value`` overrides go through it.

    For a built-in head or dataset each old key becomes the option it was read as (tables above); an old key the
    named head / dataset never read had no effect and is dropped, unless it is in ``overridden`` (dotted keys given
    on the command line): then it is a ConfigError that names the new keys. For a plugin's head or dataset, old
    keys not at their old defaults become options of the same name (checked against its ``Config`` later). An old
    key wins over the same option written the new way (it is the later one: an old-style override or a child
    recipe on a new-style base). Pure: no registry is looked at."""
    model = raw.get("model")
    if isinstance(model, dict) and any(k in model for k in OLD_HEAD_KEYS):
        head = model.get("head", ModelConfig().head)
        head = {"name": head} if isinstance(head, str) else dict(head) if isinstance(head, dict) else head
        if isinstance(head, dict):
            name = _canonical_name(head.get("name", ModelConfig().head["name"]))
            table = HEAD_OPTIONS_OF_OLD_KEYS.get(name)
            for old, default in OLD_HEAD_KEYS.items():
                if old not in model:
                    continue
                value = model.pop(old)
                if table is None:  # a plugin's head: it may have read any of them
                    if value != default or f"model.{old}" in overridden:
                        head[old] = value
                elif old in table:
                    head[table[old]] = value
                elif f"model.{old}" in overridden:
                    now = "; ".join(f"model.head.{t[old]} ({h})" for h, t in HEAD_OPTIONS_OF_OLD_KEYS.items()
                                    if old in t)
                    raise ConfigError(f"model.{old}: the {name} head has no such option (its options: "
                                      f"{', '.join(table.values()) or 'none'}; `longtail list {name}`); head options "
                                      f"are now model.head.OPTION, {old} became {now}")
            model["head"] = head
    data = raw.get("data")
    if isinstance(data, dict) and any(k in data for k in OLD_DATA_KEYS):
        opts = data.get("options")
        opts = {} if opts is None else dict(opts) if isinstance(opts, dict) else opts
        if isinstance(opts, dict):
            name = _canonical_name(data.get("name", DataConfig().name))
            takes = DATASET_OPTIONS_OF_OLD_KEYS.get(name)
            for old, default in OLD_DATA_KEYS.items():
                if old not in data:
                    continue
                value = data.pop(old)
                if takes is None:  # a plugin's dataset
                    if value != default or f"data.{old}" in overridden:
                        opts[old] = value
                elif old in takes:
                    opts[old] = value
                elif f"data.{old}" in overridden:
                    raise ConfigError(f"data.{old}: dataset '{name}' has no option {old} (its options: "
                                      f"{', '.join(takes) or 'none'}; `longtail list {name}`); a dataset's own "
                                      f"options are now data.options.OPTION")
            data["options"] = opts
    return raw


def _old_key(path: list[str]) -> str | None:
    """``model.head_scale`` for an override of an old flat key (see ``migrate``), else None."""
    if len(path) == 2 and ((path[0] == "model" and path[1] in OLD_HEAD_KEYS)
                           or (path[0] == "data" and path[1] in OLD_DATA_KEYS)):
        return ".".join(path)
    return None


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


SELECT_METRICS = ("auto", "top1", "mean_class_acc", "many", "medium", "few", "precision")
_STAGE_KEYS = {f.name for f in dataclasses.fields(StageConfig)}
_RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set ``raw[path] = value`` in a raw config dict (before validation).

    Stage keys given at top level (``epochs=5``, ``method.alpha=2``, ``optim.lr=0.1``) apply to the
    only stage, or to every stage when ``stages`` is absent; with several stages use ``stages.N.key``.
    """
    if path[0] not in _RUN_KEYS and path[0] in _STAGE_KEYS:
        stages = raw.setdefault("stages", [{}])
        if len(stages) != 1:
            raise ConfigError(
                f"'{'.'.join(path)}' is a stage key and this recipe has {len(stages)} stages: "
                f"write stages.N.{'.'.join(path)} (N from 0)"
            )
        path = ["stages", "0", *path]
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            try:
                idx = int(part)
                node = node[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"'{'.'.join(path)}': no list item '{part}' (have {len(node)})") from None
            continue
        nxt = node.get(part)
        named = part == "method" or (i == 1 and path[0] == "model" and part == "head")  # {name, options}
        if nxt is None:
            # `stages` defaults to one stage: `stages.0.x=...` on a recipe without stages means that one.
            nxt = [{}] if (i == 0 and part == "stages") else {}
            if part == "method":  # a stage that had no method had the default one: keep its name
                nxt = {"name": StageConfig().method["name"]}
            elif named:  # the same for the head
                nxt = {"name": ModelConfig().head["name"]}
            node[part] = nxt
        elif isinstance(nxt, str) and named:
            nxt = {"name": nxt}
            node[part] = nxt
        elif not isinstance(nxt, dict | list):
            raise ConfigError(f"'{'.'.join(path[: i + 1])}' is a value, not a section")
        node = nxt
    last = path[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"'{'.'.join(path)}': no list item '{last}'") from None
    else:
        if path == ["data", "name"] and _renames(node, value):
            node.pop("options", None)  # a dataset's options are its own: another dataset starts from its defaults
        node[last] = value


def _renames(data: dict, name: Any) -> bool:
    """Whether setting ``data.name`` to ``name`` names another dataset than ``data`` does."""
    return _canonical_name(data.get("name", DataConfig().name)) != _canonical_name(name)


# ----------------------------------------------------------------------------- loading


def configs_dir() -> Path:
    """The shipped recipes: ``configs/`` in a source checkout, else the copy inside the package."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    return here.parents[2] / "configs"


def shipped_configs() -> dict[str, Path]:
    """name -> path of every shipped recipe (``configs/**/*.yaml``)."""
    root = configs_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe (``quickstart``, ``cifar10_lt/ce``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    key = name_or_path.removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    close = difflib.get_close_matches(key, list(shipped), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `longtail list` shows the shipped recipes"
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped recipe{hint}")


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML recipe (safe_load) into a raw dict; ``base: other.yaml`` inherits from another."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            base_path = resolve_config_path(str(base))
        # A recipe that names itself, or a chain that comes back, would recurse until Python gives up.
        chain = (*_chain, path.resolve())
        if base_path.resolve() in chain:
            loop = " -> ".join(p.name for p in (*chain[chain.index(base_path.resolve()):], base_path))
            raise ConfigError(f"{path}: 'base: {base}' makes a cycle ({loop}); a recipe cannot inherit from "
                              f"itself: point base at another recipe or drop it")
        merged = load_raw(base_path, chain)
        _deep_merge(merged, raw)
        raw = merged
    return raw


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "method":
            if k == "data" and "name" in v and _renames(dst[k], v["name"]):
                dst[k].pop("options", None)  # another dataset than the base's: the base's dataset options do not apply
            if k == "head" and "name" in v and _canonical_name(v["name"]) != _canonical_name(dst[k].get("name")):
                dst[k] = v  # another head than the base's: nor do its head options
                continue
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def build_config(raw: dict, overrides: list[str] | None = None) -> RunConfig:
    """Apply ``key=value`` overrides to a raw dict, validate it strictly (schema, ranges, stage references), return
    a RunConfig. Plugin names and method options are checked by ``longtail.engine.build.build_config``."""
    raw = migrate(yaml.safe_load(yaml.safe_dump(raw)))  # deep copy of plain data; an older config's layout moved
    old_keys = []
    for text in overrides or []:
        path, value = parse_override(text)
        apply_override(raw, path, value)
        if (key := _old_key(path)) is not None:
            old_keys.append(key)
    migrate(raw, old_keys)  # old-style overrides (model.head_scale=30): after all of them, so their order is free
    cfg = from_dict(RunConfig, raw)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe file or shipped recipe name (None: the quickstart) with overrides; checked as ``build_config``
    (``longtail.load_config`` also resolves its plugins)."""
    path = resolve_config_path(str(path) if path is not None else "quickstart")
    return build_config(load_raw(path), overrides)


def _looks_like_path(text: str) -> bool:
    """An ``init_from`` that names a file or folder rather than a stage (existence is checked at train start)."""
    return "/" in text or "\\" in text or text.endswith(".pt") or Path(text).exists()


def validate(cfg: RunConfig) -> None:
    """Semantic checks beyond types: ranges, choices, stage references. Reads ``cfg`` and never changes it.

    The schema knows no plugin: registered names (dataset, backbone, head, sampler, method) and the options of a
    dataset, head and method are checked, and completed with their defaults, by ``longtail.engine.build.resolve``,
    which ``longtail.load_config``, ``train``, ``load_trained`` and the CLI apply.
    """

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    check(cfg.data.profile in ("exp", "step"), f"data.profile must be exp or step, got '{cfg.data.profile}'")
    check(cfg.data.imbalance_ratio >= 1, "data.imbalance_ratio must be >= 1 (n_max / n_min)")
    check(0 <= cfg.data.val_fraction < 1, "data.val_fraction must be in [0, 1)")
    check(cfg.data.val_per_class >= 0, f"data.val_per_class must be >= 0, got {cfg.data.val_per_class}")
    check(not (cfg.data.val_per_class and cfg.data.val_fraction),
          "data.val_per_class and data.val_fraction both make a val split: set only one")
    check(cfg.data.in_memory in ("auto", "always", "never"), "data.in_memory must be auto, always or never")
    check(cfg.eval.select in ("last", "best_val"), "eval.select must be last or best_val")
    check(cfg.eval.select_metric in SELECT_METRICS,
          f"eval.select_metric must be one of {', '.join(SELECT_METRICS)}, got '{cfg.eval.select_metric}'")
    check(cfg.eval.shots in ("fixed", "auto"), f"eval.shots must be fixed or auto, got '{cfg.eval.shots}'")
    check(cfg.eval.few_below <= cfg.eval.many_above, "eval.few_below must not exceed eval.many_above")
    check(cfg.checkpoint_every >= 1, "checkpoint_every must be >= 1")
    check(cfg.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0 (0: only at epoch ends)")
    check(cfg.sync_every >= 1, "sync_every must be >= 1 (1: read the loss after every step)")
    if cfg.device != "auto":
        from longtail.utils import parse_device

        parse_device(cfg.device)  # its syntax now; whether it is present, when the run starts
    # 0 or a negative size used to fall back silently to the dataset's default (`x or default`).
    check(cfg.data.image_size is None or cfg.data.image_size >= 1,
          f"data.image_size must be >= 1, got {cfg.data.image_size}; drop it (or null) for the dataset's default")
    check(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0 (0: load in this process), "
                                     f"got {cfg.data.num_workers}")
    check(cfg.data.decode_check >= 0, f"data.decode_check must be >= 0 (0: no decoding check at load time), "
                                      f"got {cfg.data.decode_check}")
    for key in ("max_image_pixels", "max_file_mb", "max_zip_ratio"):
        check(getattr(cfg.data, key) > 0, f"data.{key} must be > 0, got {getattr(cfg.data, key)}")
    # The default run folder is runs/<name>-<time>: a separator in the name (name=../..) would put it elsewhere.
    check(not any(c in cfg.name for c in "/\\\0"),
          f"name '{cfg.name}' names the run folder runs/<name>-<time>, so it cannot hold '/' or '\\'; pass "
          f"--out to train somewhere else")
    check(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    check(cfg.eval.many_above >= 0 and cfg.eval.few_below >= 0, "eval.many_above and eval.few_below must be >= 0")
    check(len(cfg.stages) >= 1, "a recipe needs at least one stage")
    names: list[str] = []
    for i, st in enumerate(cfg.stages):
        where = f"stages.{i} ('{st.name}')"
        check(st.name not in names, f"{where}: duplicate stage name")
        check(st.epochs >= 0, f"{where}: epochs must be >= 0")
        check(st.batch_size >= 1, f"{where}: batch_size must be >= 1")
        check(st.optim.lr >= 0, f"{where}: optim.lr must be >= 0")
        check(st.epoch_length in ("sampler", "dataset"),
              f"{where}: epoch_length must be sampler or dataset, got '{st.epoch_length}'")
        check(st.optim.momentum >= 0, f"{where}: optim.momentum must be >= 0")
        check(st.optim.name in ("sgd", "adamw"), f"{where}: optim.name must be sgd or adamw, got '{st.optim.name}'")
        check(len(st.optim.betas) == 2 and all(0 <= b < 1 for b in st.optim.betas),
              f"{where}: optim.betas must be two numbers in [0, 1), got {st.optim.betas}")
        check(st.optim.eps > 0, f"{where}: optim.eps must be > 0")
        check(st.optim.clip_grad_norm >= 0, f"{where}: optim.clip_grad_norm must be >= 0 (0: off)")
        check(0 <= st.ema.decay < 1, f"{where}: ema.decay must be in [0, 1) (0: off), got {st.ema.decay}")
        check(st.optim.weight_decay >= 0, f"{where}: optim.weight_decay must be >= 0")
        check(st.eval_every >= 0, f"{where}: eval_every must be >= 0 (0: only at the end)")
        check(st.schedule.warmup_epochs >= 0, f"{where}: schedule.warmup_epochs must be >= 0 (0: no warm-up), "
                                              f"got {st.schedule.warmup_epochs}")
        check(st.schedule.warmup_factor >= 0, f"{where}: schedule.warmup_factor must be >= 0")
        check(st.schedule.gamma >= 0 and st.schedule.min_lr >= 0, f"{where}: schedule.gamma and schedule.min_lr "
                                                                   f"must be >= 0")
        check(all(m >= 0 for m in st.schedule.milestones), f"{where}: schedule.milestones are 0-based epochs "
                                                           f"(>= 0), got {st.schedule.milestones}")
        check(st.schedule.name in ("multistep", "cosine", "constant"),
              f"{where}: schedule.name must be multistep, cosine or constant")
        # The reference code steps its scheduler before epoch 0, so with the offset epoch 0 already trains at
        # t = 1: a one-epoch warm-up would silently be none (lr at full value from the first step).
        check(not (st.schedule.reference_offset and 0 < st.schedule.warmup_epochs <= 1),
              f"{where}: schedule.warmup_epochs={st.schedule.warmup_epochs} with schedule.reference_offset=true "
              f"gives no warm-up at all (epoch 0 already trains at the lr for epoch 1); use warmup_epochs >= 2, "
              f"or warmup_epochs=0 to train without one")
        check(st.init_from is None or st.init_from in names or _looks_like_path(st.init_from),
              f"{where}: init_from '{st.init_from}' is neither an earlier stage ({', '.join(names) or 'none'}) "
              f"nor a path to a run folder or checkpoint (.pt)")
        check("name" in st.method, f"{where}: method needs a name")
        names.append(st.name)


# Keys that say where a run's files are, not what it trains: the only ones a resumed run may change (its folder
# moved to a machine whose data sits elsewhere: ``longtail train --resume --out RUN data.root=NEW``).
LOCATION_KEYS = ("data.root", "data.cache_dir", "data.options.annotation", "data.options.train_list",
                 "data.options.val_list", "data.options.test_list", "model.pretrained")


def check_location_overrides(overrides: list[str]) -> None:
    """ConfigError unless every ``key=value`` names a file location (``LOCATION_KEYS``): what a resume may change."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in LOCATION_KEYS:
            raise ConfigError(f"--resume keeps the run's saved settings: {key} cannot change (only where its files "
                              f"are can: {', '.join(LOCATION_KEYS)}); drop {text}")


def absolute_paths(cfg: RunConfig) -> None:
    """Make the file paths of ``cfg`` absolute (``~`` expanded), as a run saves them: its config.yaml then names the
    same files from any working directory. A list file that does not exist relative to the working directory stays
    as written: it is looked up under ``data.root``."""
    d = cfg.data
    for key in ("root", "cache_dir"):
        if getattr(d, key):
            setattr(d, key, str(Path(getattr(d, key)).expanduser().absolute()))
    # The file options of the built-in datasets (GLT: annotation; list files: train_list, val_list, test_list).
    if isinstance(d.options.get("annotation"), str) and d.options["annotation"]:
        d.options["annotation"] = str(Path(d.options["annotation"]).expanduser().absolute())
    for key in ("train_list", "val_list", "test_list"):
        value = d.options.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().is_file():
            d.options[key] = str(Path(value).expanduser().absolute())
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).expanduser().absolute())


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a config (dataclass or dict) as YAML atomically."""
    from longtail.utils import atomic_write_text

    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
