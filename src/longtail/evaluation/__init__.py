"""Metrics (pure functions), plots and reports.

The names below load on first use (PEP 562), so ``longtail.evaluation.report`` imports no torch: ``longtail list``
formats its listings there and stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ShotThresholds", "classification_metrics"]

if TYPE_CHECKING:
    from longtail.evaluation.metrics import ShotThresholds, classification_metrics


def __getattr__(name: str) -> Any:
    if name in __all__:
        from longtail.evaluation import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
