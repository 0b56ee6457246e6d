"""The "fit on extracted features" part of a stage, shared by every method that fits on features (NCM's centroids,
DLSA's flows and heads; ``Method.feature_splits`` / ``Method.fit_features``).

Such a stage has epochs 0: the method never sees images, so driving its fit through the image loop would re-run
the frozen backbone at every step. Right after the method's ``on_stage_start``, ``fit_on_features`` extracts the
splits the method asks for once (eval mode, no augmentation, float32, no autocast; under DDP each rank extracts its
shard and the shards are gathered, so every rank fits on the same tensors), then calls ``fit_features`` with a
``FitControl`` that logs one line per epoch of the fit to the run's log (and ticks a progress bar) and, when
Ctrl-C / SIGTERM asked the run to stop, stops it at the next epoch end with the engine's interrupt.

What a stop keeps: nothing of the fit in progress. The run's last checkpoint is the one written when the stage
before ended (or none, when the feature stage is the first), so ``longtail train --resume`` starts this stage
again from its beginning, with the random state that checkpoint saved: a fit is seeded and deterministic, so it
ends as the uninterrupted run's (tests/test_exact_resume.py). The fitted state is checkpointed, as every stage's,
when the stage ends (``stage_<name>.pt`` and ``last.pt``); a checkpoint in the middle of a fit would also need the
fit's own position and generators (DLSA: which flow, which lr candidate), which is not worth it for fits of
minutes.

Under DDP a stop is not agreed between the ranks (no collective per epoch: a fit's epoch count may differ between
ranks, e.g. when a DLSA flow lr candidate diverges on one rank only, and unmatched collectives would hang); each
rank stops at its own next epoch end once it got the signal (torchrun passes Ctrl-C / SIGTERM to every worker,
and ends the other workers when one exits).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from longtail.engine.distributed import DistInfo
from longtail.engine.evaluate import extract_features
from longtail.engine.stopping import Interrupted, StopFlag
from longtail.errors import ConfigError
from longtail.methods.base import FeatureSet, Method, MethodContext
from longtail.progress import bars_off

log = logging.getLogger("longtail")

BATCH_SIZE = 512  # images per batch of the extraction (what Method.split_features uses)


def _extract(method: Method, ctx: MethodContext, split: str, dist: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features and (N,) labels of ``split`` on the run's device (one split, one pass)."""
    # amp off and contiguous inputs: the numbers Method.split_features gave these fits before this helper existed
    return extract_features(method, ctx.loader, split, BATCH_SIZE, amp=False, channels_last=False, dist=dist,
                            to_cpu=False)


class _Control:
    """The ``FitControl`` of one stage's fit: a log line (and a progress-bar tick) per epoch, and the stop."""

    def __init__(self, stage: str, stop: StopFlag | None, resume_hint: str, bar: tqdm) -> None:
        self.stage, self.stop, self.resume_hint, self.bar = stage, stop, resume_hint, bar

    def epoch(self, what: str, epoch: int, epochs: int, **values: float | int | str | None) -> None:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items() if v is not None)
        log.info("stage %s: %s epoch %d/%d%s", self.stage, what, epoch, epochs, f": {shown}" if shown else "")
        self.bar.set_postfix_str(f"{what} {epoch}/{epochs}", refresh=False)
        self.bar.update(1)
        if self.stop is not None and self.stop.stop:
            where = f"{what} epoch {epoch} of {epochs}"
            log.warning("stage %s: stopping the fit on features after %s, as asked", self.stage, where)
            raise Interrupted(
                f"interrupted in stage '{self.stage}' while it fitted on features ({where}); a fit is not saved "
                f"part-way, so resuming runs this stage's fit again from its start (seeded: it ends the same); "
                f"continue with: {self.resume_hint}"
            )


def _fmt(v: float | int | str) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fit_on_features(
    method: Method,
    ctx: MethodContext,
    dist: DistInfo | None = None,
    stop: StopFlag | None = None,
    run_dir: str | Path | None = None,
    progress: bool = False,
) -> bool:
    """Extract the features of ``method.feature_splits(ctx)`` once and call ``method.fit_features`` on them; a
    no-op (False) for a method that fits on none. Called right after ``on_stage_start``.

    ``stop``: the run's stop flag, honoured at each epoch end of the fit by raising ``Interrupted`` (its
    message says how to resume ``run_dir``). ``progress``: a progress bar of the fit's epochs. Returns True when
    the method fitted on features.
    """
    splits = method.feature_splits(ctx)
    if not splits:
        return False
    if ctx.loader is None:
        raise ConfigError(f"stage '{_stage_name(ctx)}': fitting on features needs the run's data (ctx.loader)")
    missing = [s for s in splits if s not in ctx.loader.ds.splits]
    if missing:  # a method asks only for splits the run has (DLSA: val only when there is one)
        raise ConfigError(f"stage '{_stage_name(ctx)}' fits on the split(s) {', '.join(missing)}, which this run "
                          f"does not have (it has {', '.join(ctx.loader.ds.splits)})")
    dist = dist or DistInfo(ctx.rank, ctx.world_size)
    feats = FeatureSet({s: _extract(method, ctx, s, dist) for s in dict.fromkeys(splits)})
    stage = _stage_name(ctx)
    hint = f"longtail train --resume --out {run_dir}" if run_dir is not None else "train(..., resume=True)"
    with tqdm(unit="epoch", desc=f"{stage} ({type(method).__name__}, on features)", disable=not progress or bars_off(),
              dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr) as bar:
        method.fit_features(feats, ctx, _Control(stage, stop, hint, bar))
    return True


def _stage_name(ctx: MethodContext) -> str:
    return ctx.stage.name if ctx.stage is not None else "?"
