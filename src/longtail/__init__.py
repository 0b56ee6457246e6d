"""longtail: train, compare and use long-tailed image classifiers.

Public API::

    import longtail
    cfg = longtail.load_config("quickstart", ["stages.0.epochs=2"])
    run_dir = longtail.train(cfg)
    model = longtail.load_model(run_dir)          # from the run folder alone: no training data needed
    model.predict(["cat.jpg", "photos/"], topk=3)  # files, folders, list files, PIL images, tensors
    model.export("model.onnx", format="onnx")     # one module, prediction-time settings baked in
    run = longtail.load_trained(run_dir)          # with its data: evaluate, sweep

The names below are imported on first use (PEP 562), so ``import longtail`` and every ``import longtail.X``
(which runs this file first) stay cheap: ``longtail --help`` or ``import longtail.registry`` load neither torch
nor the training engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "RunConfig": "longtail.config",
    "TrainedModel": "longtail.engine.inference",
    "create_dataset": "longtail.data",
    "create_method": "longtail.methods",
    "create_model": "longtail.models",
    "evaluate_protocol": "longtail.engine.inference",
    "evaluate_run": "longtail.engine.fit",
    "load_config": "longtail.engine.build",  # resolved: names and method options checked
    "load_model": "longtail.engine.inference",
    "load_trained": "longtail.engine.inference",
    "predict_images": "longtail.engine.inference",
    "train": "longtail.engine.fit",
}

__all__ = [  # the names of _API, spelled out for linters
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from longtail.config import RunConfig
    from longtail.data import create_dataset
    from longtail.engine.build import load_config
    from longtail.engine.fit import evaluate_run, train
    from longtail.engine.inference import (
        TrainedModel,
        evaluate_protocol,
        load_model,
        load_trained,
        predict_images,
    )
    from longtail.methods import create_method
    from longtail.models import create_model


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # the next access skips this function
        return value
    raise AttributeError(f"module 'longtail' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
