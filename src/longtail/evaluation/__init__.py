"""Metrics (pure functions), plots and reports."""

from longtail.evaluation.metrics import ShotThresholds, classification_metrics

__all__ = ["ShotThresholds", "classification_metrics"]
