"""The training engine: one fit loop over stages, checkpoints, schedules, evaluation of a method."""

from longtail.engine.fit import evaluate_run, train
from longtail.engine.stopping import Interrupted

__all__ = ["Interrupted", "evaluate_run", "train"]
