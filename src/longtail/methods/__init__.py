"""Methods: one file per method family, each a Method plugin registered by name."""

from __future__ import annotations

from dataclasses import dataclass

from longtail.config import from_dict
from longtail.methods import ce, decoupling, dlsa, ifl, losses, tde  # noqa: F401  (fill the registry)
from longtail.methods.base import (
    BatchInfo,
    LossMethod,
    Method,
    MethodContext,
    ParamGroup,
    TrainsWithLoss,
    check_contract,
)
from longtail.models import Classifier
from longtail.registry import METHODS

__all__ = ["BatchInfo", "LossMethod", "Method", "MethodContext", "ParamGroup", "TrainsWithLoss", "create_method"]


def create_method(spec: dict, model: Classifier, ctx: MethodContext) -> Method:
    """Instantiate the method ``spec['name']`` with its options (checked against its Config)."""
    cls = METHODS.get(spec["name"])
    check_contract(spec["name"], cls)  # a plugin written to an old contract: one line, before it trains
    opts = {k: v for k, v in spec.items() if k != "name"}
    cfg: dataclass = from_dict(cls.Config, opts, "method")
    return cls(model, cfg, ctx)
