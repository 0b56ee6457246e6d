"""The Method plugin: a training recipe's loss, its own state, and how it predicts.

The fit loop never asks which method it runs; everything varies through these hooks. Method state
(a head direction, class centres, flow parameters) lives in registered buffers/parameters of the
Method, so ``state_dict()`` saves it together with the model weights it belongs to.

The contract (what the engine calls; everything has a default, a method overrides what differs):

- ``Config``: the method's own options, a strict dataclass (``stages[].method`` in a recipe).
- class attributes ``requires_head`` (a head the method needs; checked by ``engine.build``), ``trains`` (whether
  its stage's epochs optimise ``param_groups()``), ``val_options`` (prediction-time options chosen on val),
  ``metrics_on_features`` (whether evaluation hands ``extra_metrics`` the split's features).
- training: ``forward(images, targets, batch=None) -> {'loss', 'logits'}``, where ``batch`` is the step's
  ``BatchInfo`` (its sample ids and step: what a method that tracks samples reads, IFL; None outside the fit loop);
  ``param_groups() -> list[ParamGroup]`` (a group's own constant lr, momentum, weight decay: typed, converted by the
  engine); ``sampler(dataset, ctx) -> Sampler | None`` (None: the stage's configured ``stages[].sampler``; IFL
  returns its two-environment sampler). A method's loss comes from ``longtail.losses`` (``LOSSES``).
- the stage: ``on_stage_start(ctx)``, ``on_epoch_start(epoch, ctx)``, ``on_stage_end(ctx)``; ``ctx`` is a
  ``MethodContext``, whose typed ``dataset`` and ``loader`` give a method the run's data (no untyped extras).
- fitting on features (a post-hoc stage of epochs 0: NCM's centroids, DLSA's flows and heads): a method names the
  splits it fits on in ``feature_splits(ctx)``; after ``on_stage_start`` the engine extracts their backbone
  features once (eval mode, float32, DDP-aware: ``engine.feature_stage``) and calls ``fit_features(feats, ctx,
  fit)`` with them as a ``FeatureSet``. ``fit`` is a ``FitControl``: a fit with epochs of its own calls
  ``fit.epoch(...)`` after each, which logs the epoch and stops the run there when Ctrl-C / SIGTERM asked it to.
- prediction: ``predict(images)`` / ``predict_features(feats)``; ``extra_metrics(feats, preds, targets, ...)``:
  metrics of a split beyond the standard ones, merged into the split's metrics (DLSA: ``routes``, which of its
  classifiers answered which samples, and how well). ``inference_module()``: ``predict`` as one traceable module
  (what ``longtail export`` writes; a routing method returns a dense equivalent). ``report()``: JSON-able facts
  for metrics.json.

Changes to this contract stay small and are listed here: ``MethodContext.extras`` became the typed fields
``dataset`` / ``loader`` and ``stage`` is a ``StageConfig``; the unused ``sampler_name`` hook is gone (a stage
trains with its configured sampler); ``routes`` / ``route_names`` (DLSA's alone, with a special case in the
evaluation) became the generic ``extra_metrics`` with ``metrics_on_features``; fitting on extracted features
inside ``on_stage_start`` (with a loop of its own, where Ctrl-C was ignored) became ``feature_splits`` /
``fit_features``; ``inference_module`` was added for export (default: ``predict``); ``train_sampler(sampler,
batch_size)`` became ``sampler(dataset, ctx)`` (``ctx.sampler_seed`` seeds a method's own sampler as the configured
one is); ``on_train_batch(step, sample_ids)`` became ``forward``'s ``batch`` argument; ``param_groups`` returns
``ParamGroup``s instead of dicts with the keys ``fixed_lr`` / ``lr_scale``; the re-balancing losses moved to
``longtail.losses`` (the methods of their names stay), which IFL and mixup hold as their ``criterion`` submodule
instead of a hidden base method. A plugin written to the old contract is refused with a one-line error naming the
new hook (``check_contract``), never trained silently the old way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

import longtail.losses  # noqa: F401  (fills LOSSES, which LossMethod and why_not_a_loss read)
from longtail.config import StageConfig, check_val_option
from longtail.errors import CheckpointError, ConfigError
from longtail.models import Classifier
from longtail.registry import LOSSES, METHODS

if TYPE_CHECKING:  # annotations only: the loader module imports torchvision
    from longtail.data.base import LTDataset
    from longtail.data.loaders import Loader
    from longtail.data.samplers import Sampler
    from longtail.evaluation.metrics import ShotThresholds

__all__ = ["BatchInfo", "FeatureSet", "FitControl", "LossMethod", "Method", "MethodContext", "ParamGroup",
           "check_contract", "check_val_option", "why_not_a_loss"]


@dataclass
class MethodContext:
    """What a method may know about the run. Built by the engine for each stage."""

    num_classes: int
    train_counts: torch.Tensor  # (C,) training images per class
    epochs: int  # epochs of this stage
    steps_per_epoch: int
    device: torch.device
    world_size: int = 1
    rank: int = 0
    stage: StageConfig | None = None  # this stage's config (None: a method built outside a run)
    lr: float = 0.0  # the learning rate at the start of the current epoch (set by the engine)
    # The run's data (None: a method built outside a run, e.g. in a unit test, or a finished run loaded for
    # prediction by load_model, which never reads the data: read them in on_stage_start / on_stage_end, or allow
    # None in __init__). dataset: its splits and training targets (IFL's environments); loader: batches of any
    # split on the run's device (methods that fit on features).
    dataset: LTDataset | None = None
    loader: Loader | None = None
    # The seed of this stage's sampler (the engine's, from the run's seed and the stage index): a method's own
    # sampler (``Method.sampler``) takes it, so that its stream is as reproducible and resumable as the configured one.
    sampler_seed: int = 0


@dataclass(frozen=True)
class BatchInfo:
    """Which training samples a step's batch holds: what the engine passes to ``Method.forward`` as ``batch``."""

    sample_ids: torch.Tensor  # (B,) int64 training-set indices of this rank's batch, in batch order, on the host
    step: int  # the batch's 0-based step in its epoch (a resumed epoch starts at its saved step); the same on all ranks


@dataclass
class FeatureSet:
    """The backbone features a method fits on (``Method.feature_splits``), extracted once by the engine.

    ``splits``: split name -> ((N, D) float32 features, (N,) int64 labels), on the run's device, in split order,
    every sample once (under DDP each rank extracts its shard and the shards are gathered, so every rank holds
    the same tensors); eval mode (frozen BatchNorm statistics), no augmentation, no autocast.
    """

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def get(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.splits.get(split)


class FitControl(Protocol):
    """What ``Method.fit_features`` gets from the engine for a fit with epochs of its own."""

    def epoch(self, what: str, epoch: int, epochs: int, **values: float | int | str | None) -> None:
        """Call after epoch ``epoch`` (1-based) of ``epochs`` of the part ``what`` of the fit (e.g. "flow 1 lr
        0.2", "CAC_1 head"): logs one line with ``values`` (a mean loss, a val score; None: left out) and, when a
        stop was asked for (Ctrl-C / SIGTERM), stops the run here by raising the engine's interrupt, which the
        method lets through (a ``try / finally`` may tidy up). Only between epochs: stopping loses the fit in
        progress and nothing else (the run resumes at this stage's start)."""


@dataclass
class ParamGroup:
    """A group of parameters the optimiser updates, with the settings it does not take from the stage's ``optim``.

    ``lr`` None (the default): the stage's lr, following its schedule; a number: this lr, constant for the whole
    stage (IFL's centres: plain SGD at ``center_lr``). ``momentum`` / ``weight_decay`` / ``nesterov`` None: the stage's
    (``momentum`` and ``nesterov`` are SGD's: AdamW ignores them). The engine converts the groups to the optimiser's
    dicts (``engine.schedule.optimizer_groups``).
    """

    params: list[nn.Parameter]
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None

    @property
    def scheduled(self) -> bool:
        """Whether the group's lr follows the stage's schedule (no lr of its own)."""
        return self.lr is None


def decay_groups(params: list[nn.Parameter], no_decay: list[nn.Parameter]) -> list[ParamGroup]:
    """``params`` as one group at the stage's settings, less those in ``no_decay`` (a loss's ``no_decay(model)``),
    which form a second group without weight decay when any of them is among ``params`` (trainable)."""
    excluded = {id(p) for p in no_decay}
    kept = [p for p in params if id(p) in excluded]
    groups = [ParamGroup([p for p in params if id(p) not in excluded])]
    return groups + ([ParamGroup(kept, weight_decay=0.0)] if kept else [])


def why_not_a_loss(name: str) -> str | None:
    """Why ``name`` cannot be the loss inside a wrapper such as IFL or mixup, which train with a registered loss
    (``LOSSES``); None if it can. A method that trains its own way would be silently replaced by plain training."""
    if name in LOSSES:
        return None
    if name not in METHODS:
        return f"must be a registered loss ({', '.join(LOSSES)}), got '{name}'"
    cls = METHODS.get(name)
    if cls.stage_two:
        return (f"'{name}' is a stage-2 method (it freezes a trained backbone and re-fits the classifier): train the "
                f"wrapper as stage 1 and '{name}' as stage 2 with init_from (e.g. configs/imagenet_glt/ifl_crt.yaml)")
    if not cls.trains:
        return f"'{name}' trains nothing (a post-hoc stage of epochs 0)"
    return (f"'{name}' is a method with its own training step or stage set-up, not a registered loss: the "
            f"wrapper would silently replace it by plain training of a loss")


# Hooks of the old contract, which the engine no longer calls: a plugin overriding one would train the old way
# silently wrong (its sampler or sample tracking ignored), so check_contract refuses it, naming the new hook.
_REMOVED_HOOKS = {
    "train_sampler": "override sampler(dataset, ctx) -> Sampler | None (the seed is ctx.sampler_seed, the batch "
                     "size ctx.stage.batch_size)",
    "on_train_batch": "read forward(images, targets, batch=None)'s batch.sample_ids and batch.step",
    "sampler_name": "set the stage's sampler in the recipe (stages[].sampler), or override sampler(dataset, ctx)",
}


def check_contract(name: str, cls: type) -> None:
    """ConfigError (one line) if the registered method ``name`` (class ``cls``) is written to an old Method contract:
    it overrides a hook the engine no longer calls, or its ``forward`` takes no ``batch``. ``engine.build`` checks
    every stage's method with it before a run starts, and ``create_method`` every method it builds."""
    where = f"method '{name}' ({cls.__module__}.{cls.__qualname__})"
    for hook, instead in _REMOVED_HOOKS.items():
        if hasattr(cls, hook):
            raise ConfigError(f"{where} defines {hook}(), which the Method contract no longer has: {instead} "
                              f"(see longtail.methods.base)")
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (a C function): nothing to check
        return
    if "batch" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{where}: forward(images, targets) must also take batch=None (the step's BatchInfo: its "
                          f"sample ids), which the fit loop passes to every training step (see longtail.methods.base)")


class Method(nn.Module):
    """Base method: plain cross-entropy on the model's logits. Subclasses override what differs."""

    requires_head: str | None = None  # a registered head the method needs (checked by config validation)
    # Prediction-time options (Config fields) a recipe may set to "val": when the stage ends the engine sweeps the
    # option over the Config field ``<option>_grid`` on the run's val split (one pass of features), keeps the value
    # with the best mean per-class accuracy and stores it here in the buffer ``chosen_<option>``, so the stage
    # checkpoint and final.pt carry it. Such an option is read with ``self.option(name)``. When the Config also has a
    # field ``<option>_fallback``, a run without a val split predicts with that value instead (the engine writes it
    # into the run's config and says how to get a val split); without one such a run is refused before training.
    val_options: tuple[str, ...] = ()
    # Prediction-time options with a value that turns the method's prediction-time correction off, {option: (value,
    # what predicting at that value is)}, e.g. TDE's {"alpha": (0.0, "De-confound")}. When the run has a val split,
    # the end of training and `longtail eval` compare the val score at the option's value with the one at the off
    # value and warn when the correction costs accuracy (``engine.evaluate.check_off_values``).
    off_values: dict[str, tuple[float, str]] = {}
    # Whether the stage's epochs optimise ``param_groups()``. False for post-hoc methods, whose stage has
    # epochs 0 (they fit statistics or train on extracted features: ``fit_features``); for the others train() refuses
    # epochs 0 without init_from, which would train nothing and report their starting weights.
    trains: bool = True
    # A stage-2 method: it freezes the backbone a finished stage trained and re-fits the classifier (cRT, LWS,
    # tau-norm, NCM); it follows another stage (init_from) and cannot be the loss inside a wrapper (IFL, mixup).
    stage_two: bool = False
    # Whether evaluation hands ``extra_metrics`` the split's features. True: it extracts the (N, D) features once
    # (under autocast with amp), predicts with ``predict_features`` on them in float32 (chunks of eval.batch_size)
    # and passes them on; False (the default): it predicts with ``predict(images)`` and passes ``feats=None``.
    metrics_on_features: bool = False

    @dataclass
    class Config:
        """The method's own options (strict: unknown keys are config errors)."""

    @classmethod
    def head_needed(cls, opts: dict) -> str | None:
        """The registered head a method spec's options need (config validation checks model.head against it);
        default ``requires_head``. Wrappers (IFL, mixup) answer their base's."""
        return cls.requires_head

    def __init__(self, model: Classifier, cfg: Any, ctx: MethodContext) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.num_classes = ctx.num_classes
        self.register_buffer("class_counts", ctx.train_counts.clone().float(), persistent=False)  # (C,)
        for name in self.val_options:
            if getattr(cfg, name, None) == "val":  # () float64 (a grid value exactly); NaN until chosen
                self.register_buffer(f"chosen_{name}", torch.tensor(float("nan"), dtype=torch.float64))

    # ------------------------------------------------------------------ options chosen on val
    @classmethod
    def options_on_val(cls, opts: dict) -> list[str]:
        """The options a method spec (``{'name': ..., option: value}``) sets to "val" (checked before training)."""
        return [name for name in cls.val_options if opts.get(name) == "val"]

    @classmethod
    def fallbacks_without_val(cls, opts: dict) -> dict[str, Any]:
        """{option: its ``<option>_fallback``} for the options a method spec sets to "val" (None: no fallback)."""
        return {name: opts.get(f"{name}_fallback") for name in cls.options_on_val(opts)}

    def options_to_choose(self) -> dict[str, list[float]]:
        """{option: grid} of the options this method chooses on val when its stage ends."""
        return {n: [float(v) for v in getattr(self.cfg, f"{n}_grid")] for n in self.options_on_val(vars(self.cfg))}

    def option(self, name: str) -> float:
        """A prediction-time option's value: the configured number, or the one chosen on val."""
        value = getattr(self.cfg, name)
        if value != "val":
            return float(value)
        chosen = getattr(self, f"chosen_{name}")
        if chosen.isnan():
            raise CheckpointError(f"method.{name}=val: not chosen yet (it is chosen on the val split when the stage "
                                  f"ends); set method.{name} to a number")
        return float(chosen)

    def set_chosen(self, name: str, value: float) -> None:
        self.chosen_buffer(name).fill_(value)

    def chosen_buffer(self, name: str) -> torch.Tensor:
        """The () float64 buffer that holds the value chosen on val for option ``name`` (NaN until chosen)."""
        return getattr(self, f"chosen_{name}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A run whose option was chosen on val re-evaluated at a fixed value (eval --set method.tau=0.5) has no
        # buffer for it, and a fixed-value run re-scored with method.tau=val has nothing to load: neither is an
        # architecture mismatch.
        state_dict = dict(state_dict)
        for name in self.val_options:
            key = f"chosen_{name}"
            if not hasattr(self, key):
                state_dict.pop(key, None)
            elif key not in state_dict:
                state_dict[key] = getattr(self, key)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                batch: BatchInfo | None = None) -> dict[str, torch.Tensor]:
        """Training step outputs: at least 'loss' (scalar) and 'logits' (B, C). ``batch``: which samples the batch
        holds (the fit loop passes it to every training step; None elsewhere), for a method that tracks samples."""
        logits = self.model(images)
        return {"loss": self.loss(logits, targets), "logits": logits}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) scores used for prediction (argmax) and top-k; default: the model's logits."""
        return self.predict_features(self.model.forward_features(images))

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D) backbone features -> (B, C) scores. Prediction-time settings (TDE alpha, post-hoc tau) act
        here, so a sweep over them reuses one pass of features."""
        return self.model.forward_head(feats)

    def inference_module(self) -> nn.Module:
        """A module mapping (B, 3, H, W) normalised images to the (B, C) scores of ``predict``, with the current
        prediction-time settings fixed (an alpha, a tau, a direction, centroids): what ``longtail export`` traces
        into one TorchScript / ONNX module. Tracing records tensor operations and bakes in every Python value, so
        it must compute the same as ``predict`` for any batch without shapes that depend on the data. Default:
        ``predict`` itself, which traces for every method whose prediction is tensor algebra on its model and
        buffers; a method that routes samples (a cascade answering some samples by one head and the rest by
        another) returns a dense equivalent."""
        return _Predict(self)

    @torch.no_grad()
    def split_features(self, loader: Any, split: str, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) un-augmented eval-mode features of a split and its (N,) labels, on the loader's device.

        For a method that needs features outside its stage's start (TDE's suggested alpha at the stage end); a
        method that fits on features when its stage starts names them in ``feature_splits`` instead, and the
        engine extracts them once, DDP-aware (``fit_features``).
        """
        was = self.training
        self.eval()
        feats, labels = [], []
        try:
            for x, y in loader.eval_batches(split, batch_size):
                feats.append(self.model.forward_features(loader.normalize(x)).float())
                labels.append(y)
        finally:
            self.train(was)
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def extra_metrics(
        self,
        feats: torch.Tensor | None,
        preds: torch.Tensor,
        targets: torch.Tensor,
        train_counts: torch.Tensor,
        thresholds: ShotThresholds,
        batch_size: int,
    ) -> dict:
        """JSON-able metrics of an evaluated split beyond the standard ones, merged into its metrics dict (what
        metrics.json stores under ``splits.<split>``); default: none. ``preds`` / ``targets``: (N,) on the CPU;
        ``feats``: (N, D) float32 features on the evaluation device when ``metrics_on_features`` (else None), in
        split order (gathered under DDP), scored by ``predict_features`` in chunks of ``batch_size`` (recompute a
        per-sample quantity in the same chunks to match ``preds`` exactly); ``train_counts`` (C,) and
        ``thresholds`` give the many / medium / few groups. Identical on every rank under DDP. E.g. DLSA's
        ``routes``: per classifier of its cascade, the samples it answered and its accuracy on them."""
        return {}

    def diagnostics(self, feats: torch.Tensor, targets: torch.Tensor, class_names: list[str] | None = None) -> dict:
        """JSON-able statistics of (N, D) features of a split and their (N,) labels that explain the method's
        prediction-time behaviour (TDE: how features and class weights lie along the head direction); default:
        none. A ``summary`` entry (one line) is added to the warning when a prediction-time correction hurts."""
        return {}

    def report(self) -> dict:
        """JSON-able facts the method chose or measured while training (a tuned value, a selected epoch,
        per-class statistics), written to metrics.json as ``method_report``; default: nothing. Keep what it
        returns in the method's state (a buffer, or ``get_extra_state``), so a reloaded run reports the same."""
        return {}

    def param_groups(self) -> list[ParamGroup]:
        """Parameters the optimiser updates; default: every trainable one, at the stage's optimiser settings."""
        return [ParamGroup([p for p in self.parameters() if p.requires_grad])]

    def sampler(self, dataset: LTDataset, ctx: MethodContext) -> Sampler | None:
        """The Sampler this stage trains with (its global stream of sample ids per epoch, which the engine shards by
        rank); None (the default): the stage's configured one (``stages[].sampler``). Called once per stage, after
        ``on_stage_start``. IFL returns its two-environment sampler, seeded with ``ctx.sampler_seed``."""
        return None

    def on_stage_start(self, ctx: MethodContext) -> None:
        """Freeze parts, re-initialise a head, build environments..."""

    def feature_splits(self, ctx: MethodContext) -> tuple[str, ...]:
        """The splits whose backbone features the method fits on when its stage starts, e.g. ``("train",)``
        (NCM) or ``("train", "val")`` (DLSA selecting its heads on val); each must be a split of
        ``ctx.dataset``. Default ``()``: none, and ``fit_features`` is not called."""
        return ()

    def fit_features(self, feats: FeatureSet, ctx: MethodContext, fit: FitControl) -> None:
        """Fit the method's state on the features of ``feature_splits`` (called by the engine after
        ``on_stage_start``, before the stage's epochs; see ``FeatureSet``). A fit with epochs of its own calls
        ``fit.epoch(...)`` after each (logging, and where Ctrl-C / SIGTERM stop it). Under DDP every rank fits on
        the same features; keep rank 0's result (``longtail.dist.broadcast_from_main``), as GPU kernels may
        differ from rank to rank."""

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        """Per-epoch schedules (deferred re-weighting, environment refresh)."""

    def on_stage_end(self, ctx: MethodContext) -> None:
        """Anything to finalise (e.g. class means)."""


class TrainsWithLoss(Method):
    """A method that holds a registered loss as ``criterion`` (a ``longtail.losses.Loss``, set in its ``__init__``)
    and passes it the loss's hooks: its stage start (cb_loss's sigmoid forms start the head's bias), the parameters
    it keeps out of weight decay, and its epoch schedule (deferred re-weighting). LossMethod, mixup and IFL."""

    criterion: nn.Module

    def on_stage_start(self, ctx: MethodContext) -> None:
        self.criterion.on_stage_start(self.model, ctx.num_classes)

    def param_groups(self) -> list[ParamGroup]:
        return decay_groups([p for p in self.parameters() if p.requires_grad], self.criterion.no_decay(self.model))

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        self.criterion.on_epoch_start(epoch)


class LossMethod(TrainsWithLoss):
    """A method that trains the model's logits with the registered loss ``loss_name`` (its ``criterion``, built
    from the method's own Config, which is the loss's) and predicts with the model's logits."""

    loss_name: ClassVar[str] = "ce"

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # A submodule whose constants are non-persistent buffers: it moves with the method, and saves nothing.
        self.criterion = LOSSES.get(self.loss_name)(cfg, ctx.train_counts, model)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, targets)


class _Predict(nn.Module):
    """``method.predict`` as a module of its own (the default ``Method.inference_module``)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.predict(images)  # (B, C)
