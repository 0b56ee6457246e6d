"""Image decoding with torchvision.io, with errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from longtail.data.base import DataError

# torchvision 0.29 announces that its decoders move to TorchCodec; they still work and are the fastest
# option here, so keep them and keep the notice out of every user's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded image bytes; DataError naming ``name`` if it cannot be decoded."""
    # Imported here, not at the top: torchvision loads torch._dynamo and sympy (about a second), which registering
    # the datasets (`longtail list`, config checks) does not need. After the first image it is a dict lookup.
    from torchvision.io import ImageReadMode, decode_image

    if not data:
        raise DataError(f"{name}: empty image file; delete it or replace it with a valid image")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"{name}: cannot decode image ({e}); delete or replace this file") from None


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB image from a file; DataError if missing or corrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return decode_bytes(data, str(path))


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 by resizing the short side then centre-cropping."""
    from torchvision.transforms.v2 import functional as F

    if img.shape[-2:] == (size, size):
        return img
    img = F.resize(img, size, antialias=True)
    return F.center_crop(img, [size, size])
