"""Backbones: ``(B, 3, H, W) float -> (B, D) features``, each with a ``feature_dim`` attribute.

All use adaptive average pooling, so any input size works (TDE defect D8: a fixed AvgPool2d(7) crashes
on CIFAR-sized inputs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.errors import CheckpointError, ConfigError, MissingFileError, load_failure
from longtail.registry import BACKBONES


class _ShortcutA(nn.Module):
    """Option-A shortcut (He et al. CIFAR ResNets): stride-2 subsample and zero-pad the new channels."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)


class CifarResNet(nn.Module):
    """CIFAR ResNet with option-A shortcuts (16/32/64 channels).

    ``blocks=(5, 5, 5), two_branch=False``: Cao et al.'s ResNet-32 (LDAM-DRW), 64-d feature.
    ``blocks=(5, 5, 4), two_branch=True``: BBN's ResNet-32 used by TDE: after stage 3, two parallel
    BasicBlocks (64 -> 64) on the same input, concatenated to 128 channels, then pooled: 128-d feature.
    """

    def __init__(self, blocks: tuple[int, int, int], two_branch: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, n, stride in zip((16, 32, 64), blocks, (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.two_branch = two_branch
        if two_branch:
            self.cb_block = BasicBlock(64, 64)
            self.rb_block = BasicBlock(64, 64)
        self.feature_dim = 128 if two_branch else 64
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        if self.two_branch:
            x = torch.cat([self.cb_block(x), self.rb_block(x)], dim=1)  # (B, 128, H/4, W/4)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, D)


@BACKBONES.register("resnet32")
def resnet32() -> nn.Module:
    """CIFAR ResNet-32 of BBN / TDE: 16-32-64 channels, two-branch end, 128-d feature."""
    return CifarResNet((5, 5, 4), two_branch=True)


@BACKBONES.register("resnet32_cao")
def resnet32_cao() -> nn.Module:
    """CIFAR ResNet-32 of Cao et al. (LDAM-DRW): 5 blocks per stage, 64-d feature."""
    return CifarResNet((5, 5, 5), two_branch=False)


class TorchvisionBackbone(nn.Module):
    """A torchvision ResNet/ResNeXt without its classifier (``fc`` replaced by identity)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, D): 512 for ResNet-18/34, 2048 for the deeper ones; torchvision pools adaptively


class TorchvisionViT(nn.Module):
    """A torchvision Vision Transformer without its classifier: the class token's final embedding.

    Its position embeddings fix the input size (224 for ``vit_b_16``): other sizes are refused with the
    setting to change, rather than torch's shape assertion.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.feature_dim = net.hidden_dim
        self.image_size = net.image_size
        net.heads = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"this ViT takes {self.image_size}x{self.image_size} images, got "
                              f"{x.shape[-2]}x{x.shape[-1]}: set data.image_size={self.image_size}")
        return self.net(x)  # (B, hidden_dim)


class TimmBackbone(nn.Module):
    """Any timm model as a backbone: built with ``num_classes=0`` so that its forward returns the pooled
    ``forward_features`` (timm's own pooling and pre-logits), ``(B, num_features)``. Never downloads weights:
    ``model.pretrained=FILE`` loads a local file."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=False, num_classes=0)
        self.feature_dim = int(self.net.num_features)
        self.timm_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_features)


def _timm_backbone(name: str):
    """``timm/<name>`` -> a factory of that timm model (checked here, so a config naming it fails early)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone timm/{name} needs timm: pip install 'longtail[timm]'") from None
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5] if name else []
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.backbone timm/{name}: timm has no model '{name}'{hint} (timm.list_models() "
                          f"lists them)")

    def factory() -> nn.Module:
        return TimmBackbone(name)

    factory.__doc__ = f"timm {name}"
    return factory


BACKBONES.register_prefix("timm/", _timm_backbone, help="any timm model, e.g. timm/resnet18 or "
                          "timm/vit_tiny_patch16_224 (pip install 'longtail[timm]'; weights from model.pretrained)")


@BACKBONES.register("resnet18")
def resnet18() -> nn.Module:
    """torchvision ResNet-18, 512-d feature."""
    return TorchvisionBackbone("resnet18")


@BACKBONES.register("resnet34")
def resnet34() -> nn.Module:
    """torchvision ResNet-34, 512-d feature."""
    return TorchvisionBackbone("resnet34")


@BACKBONES.register("vit_b_16")
def vit_b_16() -> nn.Module:
    """torchvision ViT-B/16, 768-d class-token feature; 224x224 input (data.image_size=224)."""
    return TorchvisionViT("vit_b_16")


@BACKBONES.register("resnet50")
def resnet50() -> nn.Module:
    """torchvision ResNet-50, 2048-d feature."""
    return TorchvisionBackbone("resnet50")


@BACKBONES.register("resnext50_32x4d")
def resnext50_32x4d() -> nn.Module:
    """torchvision ResNeXt-50 32x4d, 2048-d feature (ImageNet-LT / Places-LT recipes)."""
    return TorchvisionBackbone("resnext50_32x4d")


@BACKBONES.register("resnet152")
def resnet152() -> nn.Module:
    """torchvision ResNet-152, 2048-d feature (Places-LT, from ImageNet weights)."""
    return TorchvisionBackbone("resnet152")


class TinyNet(nn.Module):
    """A three-layer CNN for tests and quick tries: 32-d feature, a few thousand images/s on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        chans = (3, 16, 32, 32)
        self.body = nn.Sequential(*[
            m for i in range(3) for m in (
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if i < 2 else nn.Identity())
        ])
        self.feature_dim = chans[-1]
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)  # (B, 32)


@BACKBONES.register("tiny")
def tiny() -> nn.Module:
    """Tiny 3-layer CNN (tests, quickstart)."""
    return TinyNet()


def load_pretrained(backbone: nn.Module, path: str) -> list[str]:
    """Load backbone weights from a local file (state dict or {'state_dict': ...}); returns missing keys.

    Common prefixes (``module.``, ``backbone.``, ``model.backbone.``) are stripped and classifier keys
    (``fc.``) dropped. Raises if no key matches, which is almost always the wrong file.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"pretrained weights not found: {p}; check model.pretrained")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle is the file's (truncated, not weights, unsafe pickle)
        raise CheckpointError(f"model.pretrained {p}: not a readable weights file ({load_failure(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"model.pretrained {p}: holds a {type(state).__name__}, not a state dict of weights")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.state_dict()
    mapped = {}
    for k, v in state.items():
        for prefix in ("module.", "model.backbone.", "backbone.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("fc.", "heads.")):  # classifiers (ResNets' fc, torchvision ViT's heads)
            continue
        if k not in own and f"net.{k}" in own:  # torchvision / timm keys into their wrappers' `net`
            k = f"net.{k}"
        if k in own:
            if own[k].shape != v.shape:
                raise ConfigError(f"model.pretrained {p}: '{k}' has shape {tuple(v.shape)}, the backbone expects "
                                  f"{tuple(own[k].shape)}")
            mapped[k] = v
    if not mapped:
        raise ConfigError(f"model.pretrained {p}: no parameter matches this backbone; is it the right "
                          f"architecture (model.backbone)?")
    backbone.load_state_dict(mapped, strict=False)
    return sorted(set(own) - set(mapped))
