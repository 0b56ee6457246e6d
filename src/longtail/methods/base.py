"""The Method plugin: a training recipe's loss, its own state, and how it predicts.

The fit loop never asks which method it runs; everything varies through these hooks. Method state
(a head direction, class centres, flow parameters) lives in registered buffers/parameters of the
Method, so ``state_dict()`` saves it together with the model weights it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.errors import CheckpointError
from longtail.models import Classifier


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
    stage: Any = None  # the StageConfig
    lr: float = 0.0  # the learning rate at the start of the current epoch (set by the engine)
    extras: dict = field(default_factory=dict)  # e.g. the dataset, for methods that need it


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
    own = [hook for hook in ("forward", "on_stage_start", "param_groups", "train_sampler", "sampler_name")
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
    # checkpoint and final.pt carry it. Such an option is read with ``self.option(name)``.
    val_options: tuple[str, ...] = ()
    # Whether the stage's epochs optimise ``param_groups()``. False for post-hoc methods, whose stage has
    # epochs 0 (they fit statistics, or train inside ``on_stage_start``); for the others train() refuses
    # epochs 0 without init_from, which would train nothing and report their starting weights.
    trains: bool = True
    # A stage-2 method: it freezes the backbone a finished stage trained and re-fits the classifier (cRT, LWS,
    # tau-norm, NCM); it follows another stage (init_from) and cannot be the loss inside a wrapper (IFL, mixup).
    stage_two: bool = False

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
        getattr(self, f"chosen_{name}").fill_(value)

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

    @torch.no_grad()
    def split_features(self, loader: Any, split: str, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) un-augmented eval-mode features of a split and its (N,) labels, on the loader's device.

        For methods that fit statistics at the end of a stage (class means, TDE's suggested alpha); the
        engine's ``extract_features`` is the DDP-aware, autocast version used for evaluation.
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
    def routes(self, feats: torch.Tensor) -> torch.Tensor | None:
        """(B,) which sub-model answers each sample, for methods that route (a cascade of classifiers); None:
        no routing. Evaluation then reports the sample count and accuracy of every route."""
        return None

    @property
    def route_names(self) -> list[str]:
        """Names of the routes ``routes`` returns (index = route id)."""
        return []

    def report(self) -> dict:
        """JSON-able facts the method chose or measured while training (a tuned value, a selected epoch,
        per-class statistics), written to metrics.json as ``method_report``; default: nothing. Keep what it
        returns in the method's state (a buffer, or ``get_extra_state``), so a reloaded run reports the same."""
        return {}

    def param_groups(self) -> list[dict]:
        """Parameters the optimiser updates; default: every trainable one."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def sampler_name(self, configured: str) -> str:
        """The sampler this method trains with; default: the stage's configured one."""
        return configured

    def train_sampler(self, sampler: Any, batch_size: int) -> Any:
        """The Sampler this stage trains with, given the configured one and the global batch size; default:
        that one. IFL replaces it by its two-environment sampler."""
        return sampler

    def on_train_batch(self, step: int, batch_indices: torch.Tensor) -> None:
        """Called before each training step with this rank's (B,) sample ids (e.g. IFL records confidences)."""

    def on_stage_start(self, ctx: MethodContext) -> None:
        """Freeze parts, re-initialise a head, build environments..."""

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        """Per-epoch schedules (deferred re-weighting, environment refresh)."""

    def on_stage_end(self, ctx: MethodContext) -> None:
        """Anything to finalise (e.g. class means)."""
