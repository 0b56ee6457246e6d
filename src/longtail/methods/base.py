"""The Method plugin: a training recipe's loss, its own state, and how it predicts.

The fit loop never asks which method it runs; everything varies through these hooks. Method state
(a head direction, class centres, flow parameters) lives in registered buffers/parameters of the
Method, so ``state_dict()`` saves it together with the model weights it belongs to.

The contract (what the engine calls; everything has a default, a method overrides what differs):

- ``Config``: the method's own options, a strict dataclass (``stages[].method`` in a recipe).
- class attributes ``requires_head`` (a head the method needs; checked by ``engine.build``), ``trains`` (whether
  its stage's epochs optimise ``param_groups()``), ``val_options`` (prediction-time options chosen on val),
  ``metrics_on_features`` (whether evaluation hands ``extra_metrics`` the split's features).
- training: ``forward(images, targets) -> {'loss', 'logits'}`` (with ``loss``), ``param_groups()``,
  ``train_sampler(sampler, batch_size)`` and ``on_train_batch(step, sample_ids)`` (a method that resamples or
  tracks samples: IFL).
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
``fit_features``; ``inference_module`` was added for export (default: ``predict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.config import StageConfig
from longtail.errors import CheckpointError
from longtail.models import Classifier

if TYPE_CHECKING:  # annotations only: the loader module imports torchvision
    from longtail.data.base import LTDataset
    from longtail.data.loaders import Loader
    from longtail.evaluation.metrics import ShotThresholds


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


def check_val_option(name: str, value: Any, grid: list[float]) -> None:
    """Config check of a prediction-time option that may be a number or ``"val"`` (see ``Method.val_options``)."""
    if isinstance(value, str) and value != "val":
        raise ValueError(f"{name} must be a number or 'val' (chosen on the val split over {name}_grid), got '{value}'")
    if not grid:
        raise ValueError(f"{name}_grid must hold at least one value (it is what {name}=val chooses from)")


def why_not_a_loss(name: str, cls: type) -> str | None:
    """Why method ``name`` (class ``cls``) cannot be the loss inside a wrapper such as IFL or mixup, which call only
    its ``loss``, ``on_epoch_start`` and ``predict_features``; None if it can. A method that trains its own way
    would be silently replaced by plain training of its loss."""
    if cls.stage_two:
        return (f"'{name}' is a stage-2 method (it freezes a trained backbone and re-fits the classifier): train the "
                f"wrapper as stage 1 and '{name}' as stage 2 with init_from (e.g. configs/imagenet_glt/ifl_crt.yaml)")
    if not cls.trains:
        return f"'{name}' trains nothing (a post-hoc stage of epochs 0)"
    own = [hook for hook in ("forward", "on_stage_start", "fit_features", "param_groups", "train_sampler")
           if getattr(cls, hook) is not getattr(Method, hook)]
    if own:
        return (f"'{name}' has its own training step or stage set-up ({', '.join(own)}), which the wrapper would "
                f"silently replace by plain training of its loss")
    return None


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

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step outputs: at least 'loss' (scalar) and 'logits' (B, C)."""
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

    def param_groups(self) -> list[dict]:
        """Parameters the optimiser updates; default: every trainable one."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def train_sampler(self, sampler: Any, batch_size: int) -> Any:
        """The Sampler this stage trains with, given the configured one and the global batch size; default:
        that one. IFL replaces it by its two-environment sampler."""
        return sampler

    def on_train_batch(self, step: int, batch_indices: torch.Tensor) -> None:
        """Called before each training step with this rank's (B,) sample ids (e.g. IFL records confidences)."""

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


class _Predict(nn.Module):
    """``method.predict`` as a module of its own (the default ``Method.inference_module``)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.predict(images)  # (B, C)
