"""The training engine: one fit loop over stages, checkpoints, schedules, evaluation of a method."""

from longtail.engine.fit import Interrupted, evaluate_run, train

__all__ = ["Interrupted", "evaluate_run", "train"]
