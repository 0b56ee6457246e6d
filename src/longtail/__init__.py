"""longtail: train, compare and use long-tailed image classifiers.

Public API::

    import longtail
    cfg = longtail.load_config("quickstart", ["stages.0.epochs=2"])
    run_dir = longtail.train(cfg)
    model = longtail.load_model(run_dir)          # from the run folder alone: no training data needed
    model.predict(["cat.jpg", "photos/"], topk=3)  # files, folders, list files, PIL images, tensors
    model.export("model.onnx", format="onnx")     # one module, prediction-time settings baked in
    run = longtail.load_trained(run_dir)          # with its data: evaluate, sweep
"""

from __future__ import annotations

__version__ = "0.1.0"

from longtail.config import RunConfig, load_config  # noqa: E402
from longtail.data import create_dataset  # noqa: E402
from longtail.engine import evaluate_run, train  # noqa: E402
from longtail.engine.inference import (  # noqa: E402
    TrainedModel,
    evaluate_protocol,
    load_model,
    load_trained,
    predict_images,
)
from longtail.methods import create_method  # noqa: E402
from longtail.models import create_model  # noqa: E402

__all__ = [
    "RunConfig",
    "TrainedModel",
    "__version__",
    "create_dataset",
    "create_method",
    "create_model",
    "evaluate_protocol",
    "evaluate_run",
    "load_config",
    "load_model",
    "load_trained",
    "predict_images",
    "train",
]
