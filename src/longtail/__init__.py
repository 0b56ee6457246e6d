"""longtail: train, compare and use long-tailed image classifiers.

Public API::

    import longtail
    cfg = longtail.load_config("quickstart", ["stages.0.epochs=2"])
    run_dir = longtail.train(cfg)
    run = longtail.load_trained(run_dir)
"""

from __future__ import annotations

__version__ = "0.1.0"

from longtail.config import RunConfig  # noqa: E402
from longtail.data import create_dataset  # noqa: E402
from longtail.engine import evaluate_run, train  # noqa: E402
from longtail.engine.build import load_config  # noqa: E402
from longtail.engine.inference import evaluate_protocol, load_trained, predict_images  # noqa: E402
from longtail.methods import create_method  # noqa: E402
from longtail.models import create_model  # noqa: E402

__all__ = [
    "RunConfig",
    "__version__",
    "create_dataset",
    "create_method",
    "create_model",
    "evaluate_protocol",
    "evaluate_run",
    "load_config",
    "load_trained",
    "predict_images",
    "train",
]
