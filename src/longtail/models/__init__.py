"""Backbones, heads, and the classifier that joins them."""

from __future__ import annotations

import torch
import torch.nn as nn

from longtail.config import ModelConfig, plugin_options
from longtail.models import backbones, heads  # noqa: F401  (fill the registries)
from longtail.models.backbones import load_pretrained
from longtail.registry import BACKBONES, HEADS

__all__ = ["Classifier", "create_model", "load_pretrained"]


class Classifier(nn.Module):
    """backbone + head, with timm-style ``forward_features`` / ``forward_head`` / ``reset_classifier``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, head: nn.Module) -> None:
        self.head = head


def create_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """Build the configured backbone and head (``cfg.head``: its name and options, given in full by
    ``longtail.engine.build``, else completed here with the head's defaults); load local pretrained backbone weights
    if configured."""
    backbone = BACKBONES.get(cfg.backbone)()
    if cfg.pretrained:
        load_pretrained(backbone, cfg.pretrained)
    factory = HEADS.get(cfg.head["name"])
    opts = plugin_options(factory, {k: v for k, v in cfg.head.items() if k != "name"}, "model.head",
                          f"the {cfg.head['name']} head")
    head = factory(backbone.feature_dim, num_classes, opts)  # (B, D) -> (B, C)
    return Classifier(backbone, head, num_classes)
