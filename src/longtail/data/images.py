"""Image decoding with torchvision.io (Pillow for the formats it lacks), with errors that name the file, and limits
against decompression bombs."""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from longtail.data.base import DataError

# torchvision 0.29 announces that its decoders move to TorchCodec; they still work and are the fastest
# option here, so keep them and keep the notice out of every user's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost before it is read or decoded (``data.max_image_pixels``, ``data.max_file_mb``,
    ``data.max_zip_ratio``): a small file can decode to gigabytes (a 608 KB PNG to 1.1 GB, a 1.1 MB zip to 2.8 GB)."""

    max_pixels: int = 100_000_000  # width x height of one image, read from its header before decoding
    max_file_mb: float = 256.0  # one image file, or one zip member uncompressed (from the zip's directory)
    max_zip_ratio: float = 200.0  # a zip member's uncompressed / compressed size (images barely compress)

    @classmethod
    def of(cls, cfg: object) -> ImageLimits:
        """The limits a DataConfig sets."""
        return cls(cfg.max_image_pixels, cfg.max_file_mb, cfg.max_zip_ratio)

    def check_file_size(self, size: int, name: str) -> None:
        if size > self.max_file_mb * 2**20:
            raise DataError(f"{name}: {size / 2**20:.0f} MB, above data.max_file_mb={self.max_file_mb:g} for one "
                            f"image; raise data.max_file_mb if it is a real image, or remove the file")


DEFAULT_LIMITS = ImageLimits()


def _u16(b: bytes, at: int, order: str = ">") -> int:
    return struct.unpack_from(order + "H", b, at)[0]


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame: P, height, width
            return _u16(data, i + 7), _u16(data, i + 5)
        i += 2 + _u16(data, i + 2)
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF or WebP file, without decoding; None for another
    format or a header that cannot be read (the decoder then says what is wrong)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack_from(">II", data, 16)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _u16(data, 6, "<"), _u16(data, 8, "<")
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                return _u16(data, 26, "<") & 0x3FFF, _u16(data, 28, "<") & 0x3FFF
            if chunk == b"VP8L":
                bits = struct.unpack_from("<I", data, 21)[0]
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    except struct.error:  # cut short
        return None
    return None


def decode_bytes(data: bytes, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded image bytes; DataError naming ``name`` if it cannot be decoded or its
    header announces more than ``limits.max_pixels`` pixels (refused before decoding)."""
    # Imported here, not at the top: torchvision loads torch._dynamo and sympy (about a second), which registering
    # the datasets (`longtail list`, config checks) does not need. After the first image it is a dict lookup.
    from torchvision.io import ImageReadMode, decode_image

    if not data:
        raise DataError(f"{name}: empty image file; delete it or replace it with a valid image")
    _check_pixels(image_size_from_header(data), name, limits)
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        img = _decode_with_pil(data, name, limits)  # formats torchvision.io lacks: BMP, TIFF, ...
        if img is None:
            raise DataError(f"{name}: cannot decode image ({e}); delete or replace this file") from None
        return img


def _check_pixels(size: tuple[int, int] | None, name: str, limits: ImageLimits) -> None:
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise DataError(f"{name}: {size[0]}x{size[1]} pixels, above data.max_image_pixels={limits.max_pixels} "
                        f"(a decompression bomb?); raise data.max_image_pixels if it is a real image, or remove it")


def _decode_with_pil(data: bytes, name: str, limits: ImageLimits) -> torch.Tensor | None:
    """(3, H, W) uint8 RGB by Pillow (first frame), or None without Pillow; DataError naming ``name`` when Pillow
    cannot read it either. The size is read
    from the header (``Image.open`` is lazy) and checked against ``limits`` before any pixel is decoded; Pillow's
    own bomb check (``Image.MAX_IMAGE_PIXELS``) stays on as well."""
    try:
        from PIL import Image
    except ImportError:
        return None
    import io

    import numpy as np

    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            _check_pixels(size, name, limits)
            rgb = im.convert("RGB")  # decodes; palette, grey, CMYK and alpha become RGB
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e} (Pillow's limit); remove the file if it is not a real image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying "cannot read this"
        raise DataError(f"{name}: cannot decode image (neither torchvision nor Pillow reads it: "
                        f"{' '.join(str(e).split()) or type(e).__name__}); delete or replace this file") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def read_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """(3, H, W) uint8 RGB image from a file; DataError if missing, corrupt, or above ``limits``."""
    path = Path(path)
    try:
        limits.check_file_size(path.stat().st_size, str(path))
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
    return decode_bytes(data, str(path), limits)


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8 by resizing the short side then centre-cropping."""
    from torchvision.transforms.v2 import functional as F

    if img.shape[-2:] == (size, size):
        return img
    img = F.resize(img, size, antialias=True)
    return F.center_crop(img, [size, size])
