"""Built-in datasets that need no download: ``shapes_glt`` (generated), ``digits_lt`` (scikit-learn digits).

``shapes_glt`` is a small, seeded, procedurally rendered *generalized* long-tailed benchmark in the spirit of
ImageNet-GLT (Tang et al., ECCV 2022): the class is the shape, and inside every class there are three
attribute groups (appearance modes) whose frequencies are long-tailed 7:2:1, like the benchmark's three
pseudo-attribute clusters. Its test sets follow the GLT protocols:

- ``test_cbl`` (Test-CBL): class-balanced, attributes 7:2:1 as in training -> the CLT protocol;
- ``test_gbl`` (Test-GBL): balanced over classes *and* attributes -> the GLT protocol (train_variant ``lt``)
  and the ALT protocol (train_variant ``cbl``).

``digits_lt`` is scikit-learn's bundled 8x8 handwritten digits made class-wise long-tailed: real (if tiny)
images for a quick end-to-end try.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longtail.config import DataConfig, options
from longtail.data.base import DataError, LTDataset, Split
from longtail.data.profiles import class_counts, index_hash, select_long_tailed
from longtail.registry import DATASETS
from longtail.utils import atomic_torch_save

# ----------------------------------------------------------------------------------------------- shapes

# Bump whenever the rendered pixels or the split sizes change: it is part of the cache key, so stale
# caches are never read back.
GENERATOR_VERSION = 1

IMAGE_SIZE = 32  # rendered side; the network input side
_SUPER = 64  # rendered at 64x64 and averaged 2x2 down to 32x32: antialiased edges
_PX = 2.0 / _SUPER  # one supersampled pixel, in image units (the image spans [-1, 1])
_CHUNK = 256  # images rendered at once: bounds peak memory (~25 MB per (chunk, 3, 64, 64) float32 array)

ATTRIBUTE_NAMES = ["solid", "striped", "dotted"]
ATTRIBUTE_RATIO = (7, 2, 1)  # intra-class attribute frequencies of every LT split (as ImageNet-GLT)
DEFAULT_NUM_CLASSES = 10
DEFAULT_MAX_PER_CLASS = 500  # n_max of the training split when data.options.max_per_class is None
TEST_PER_CLASS = 60  # test_cbl: 42/12/6 per class; test_gbl: 20/20/20 per class (as ImageNet-GLT)
VAL_FRACTION = 0.1  # val: about 10% of the training size, same class and attribute distribution

# Per-channel statistics of the default Train-GLT (seed 0, 10 classes, n_max 500, ratio 100), rounded.
# Hard-coded (not recomputed per config) so that every variant and ratio normalises the same way.
SHAPES_MEAN = (0.31, 0.266, 0.249)
SHAPES_STD = (0.312, 0.262, 0.223)

_SPLIT_CODES = {"train": 1, "val": 2, "test_cbl": 3, "test_gbl": 4}  # independent random stream per split


def glt_protocols(train_variant: str, class_split: str, glt_split: str) -> dict[str, str]:
    """GLT protocols (spec glt_ifl.md 3) a training variant is scored under: Train-GLT (``lt``) gives CLT on the
    class-balanced test set and GLT on the class- and attribute-balanced one; Train-CBL (``cbl``) gives ALT on
    the latter."""
    if train_variant == "cbl":
        return {"ALT": glt_split}
    return {"CLT": class_split, "GLT": glt_split}


def attribute_split(n: int, ratio: tuple[int, int, int] = ATTRIBUTE_RATIO) -> list[int]:
    """Split ``n`` images of one class over the 3 attribute groups in ``ratio`` (default 7:2:1).

    Groups 1 and 2 get round-half-up of their share, at least 1 each when n >= 3; group 0 takes the rest,
    so the counts always sum to n. 60 -> [42, 12, 6]; 10 -> [7, 2, 1]; 5 -> [3, 1, 1]; 2 -> [2, 0, 0].
    """
    total = sum(ratio)
    n1 = int(math.floor(n * ratio[1] / total + 0.5))
    n2 = int(math.floor(n * ratio[2] / total + 0.5))
    if n >= 3:
        n1, n2 = max(n1, 1), max(n2, 1)
    return [n - n1 - n2, n1, n2]


# Signed distance functions (negative inside) of the shapes, in local units: the shape fits a disc of
# radius ~0.85-1.0, y points up. Exact or close enough for a 1-pixel antialiasing ramp.


def _box(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    return np.maximum(np.abs(u) - hu, np.abs(v) - hv)


def _polygon(u: np.ndarray, v: np.ndarray, n: int, radius: float,
             vertex_angle: float = math.pi / 2) -> np.ndarray:
    # Regular n-gon of circumradius `radius` with a vertex at `vertex_angle`: max over the edges' half-planes.
    d = None
    for k in range(n):
        a = vertex_angle + math.pi / n + 2 * math.pi * k / n  # outward normal of edge k
        e = u * math.cos(a) + v * math.sin(a)
        d = e if d is None else np.maximum(d, e)
    return d - radius * math.cos(math.pi / n)


def _circle(u, v):
    return np.hypot(u, v) - 0.85


def _square(u, v):
    return _box(u, v, 0.7, 0.7)


def _triangle(u, v):
    return _polygon(u, v + 0.25, 3, 1.0)  # shifted so the bounding box is centred


def _cross(u, v):
    a, b = (u + v) * math.sqrt(0.5), (u - v) * math.sqrt(0.5)
    return np.minimum(_box(a, b, 0.95, 0.2), _box(a, b, 0.2, 0.95))


def _star(u, v):
    # Five-pointed star, tip up: fold the angle into [0, 36 deg] from the nearest tip, then the inside is
    # the triangle (origin, tip A, inner vertex B) -> signed distance to the line AB.
    r_out, r_in, sector = 1.0, 0.42, 2 * math.pi / 5
    r = np.hypot(u, v)
    a = np.abs(np.mod(np.arctan2(v, u) - math.pi / 2 + sector / 2, sector) - sector / 2)
    qx, qy = r * np.cos(a), r * np.sin(a)
    bx, by = r_in * math.cos(sector / 2), r_in * math.sin(sector / 2)
    nx, ny = by, r_out - bx  # outward normal of AB
    norm = math.hypot(nx, ny)
    return ((qx - r_out) * nx + qy * ny) / norm


def _ring(u, v):
    return np.abs(np.hypot(u, v) - 0.66) - 0.2


def _diamond(u, v):
    # Elongated rhombus (0.58 wide, 0.95 tall): not a rotated square, since rotation is only +-15 degrees.
    return (np.abs(u) / 0.58 + np.abs(v) / 0.95 - 1.0) / math.hypot(1 / 0.58, 1 / 0.95)


def _hexagon(u, v):
    return _polygon(u, v, 6, 0.9)


def _plus(u, v):
    return np.minimum(_box(u, v, 0.9, 0.22), _box(u, v, 0.22, 0.9))


def _arrow(u, v):
    shaft = _box(u + 0.3, v, 0.55, 0.16)  # u in [-0.85, 0.25]
    # Head: tip (0.95, 0), base corners (0.2, +-0.62); (nx, ny) is the outward normal of its slanted edges.
    nx, ny = 0.62, 0.75
    head = np.maximum(0.2 - u, ((u - 0.95) * nx + np.abs(v) * ny) / math.hypot(nx, ny))
    return np.minimum(shaft, head)


def _heart(u, v):
    # A square rotated 45 degrees with two discs on its upper edges (each edge a disc's diameter).
    v = v + 0.07
    h = math.sqrt(0.5)  # square of side 1: half-diagonal
    square = (np.abs(u) + np.abs(v) - h) * math.sqrt(0.5)
    left = np.hypot(u + h / 2, v - h / 2) - 0.5
    right = np.hypot(u - h / 2, v - h / 2) - 0.5
    return np.minimum(square, np.minimum(left, right))


def _crescent(u, v):
    return np.maximum(np.hypot(u, v) - 0.85, 0.68 - np.hypot(u - 0.38, v - 0.12))


SHAPES = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
    "ring": _ring,
    "diamond": _diamond,
    "hexagon": _hexagon,
    "plus": _plus,
    "arrow": _arrow,
    "heart": _heart,
    "crescent": _crescent,
}
SHAPE_NAMES = list(SHAPES)  # class c is SHAPE_NAMES[c]; the first num_classes are used

# HSV ranges (lo, hi) per attribute group for the three colours of an image: the shape's main colour, its
# texture colour (stripes / dots; unused by "solid"), and the background. Group 0 is a bright warm shape
# on a dark background; group 1 cool stripes on a grey gradient; group 2 a dark purple shape with light
# dots on a light checkerboard (inverted polarity). The class never changes the palette: colour and texture
# carry the attribute, only the silhouette carries the class.
_HSV_LO = np.array([
    [[-0.03, 0.65, 0.80], [0.00, 0.00, 0.00], [0.55, 0.20, 0.05]],  # solid
    [[0.45, 0.55, 0.75], [0.00, 0.00, 0.18], [0.00, 0.00, 0.40]],  # striped (texture hue/sat = main's)
    [[0.72, 0.50, 0.30], [0.08, 0.60, 0.85], [0.20, 0.05, 0.80]],  # dotted
], dtype=np.float32)  # (group, colour, hsv)
_HSV_HI = np.array([
    [[0.14, 1.00, 1.00], [0.00, 0.00, 0.00], [0.70, 0.50, 0.18]],
    [[0.68, 0.90, 1.00], [0.00, 0.00, 0.30], [1.00, 0.12, 0.55]],
    [[0.95, 0.85, 0.50], [0.16, 0.95, 1.00], [0.40, 0.25, 0.93]],
], dtype=np.float32)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) HSV in [0, 1] (hue wraps) -> (..., 3) RGB in [0, 1]."""
    h, s, v = np.mod(hsv[..., 0], 1.0), hsv[..., 1], hsv[..., 2]
    k = np.mod(np.array([5.0, 3.0, 1.0], dtype=np.float32) + h[..., None] * 6.0, 6.0)  # (..., 3)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _draw_params(rng: np.random.Generator, attributes: np.ndarray) -> dict[str, np.ndarray]:
    """Random appearance of each image of one class: pose, colours, texture, jitter and noise.

    Every image draws the same number of values whatever its group, so the stream is a function of the
    image count and attribute list only.
    """
    n = len(attributes)
    f32 = np.float32
    p = {
        "cx": rng.uniform(-0.16, 0.16, n), "cy": rng.uniform(-0.16, 0.16, n),  # position jitter
        "scale": rng.uniform(0.52, 0.72, n),  # local unit -> image units
        "theta": rng.uniform(-math.radians(15), math.radians(15), n),  # small rotation: keeps X != +
        "tex_angle": rng.uniform(0, math.pi, n), "tex_freq": rng.uniform(2.6, 3.4, n),  # stripes
        "tex_phase": rng.uniform(0, 2 * math.pi, n),
        "dot_spacing": rng.uniform(0.24, 0.32, n), "dot_radius": rng.uniform(0.17, 0.23, n),  # dots
        "dot_offset": rng.uniform(0, 1, (n, 2)),
        "grad_angle": rng.uniform(0, 2 * math.pi, n), "grad_amp": rng.uniform(0.08, 0.16, n),  # bg gradient
        "check_size": rng.uniform(0.3, 0.45, n), "check_amp": rng.uniform(0.05, 0.09, n),  # bg checkerboard
        "check_offset": rng.uniform(0, 1, (n, 2)),
        "gain": rng.uniform(0.9, 1.1, (n, 3)), "offset": rng.uniform(-0.04, 0.04, n),  # colour jitter
        "noise_std": rng.uniform(0.01, 0.035, n),
    }
    u = rng.random((n, 3, 3), dtype=f32)  # (N, colour, hsv)
    hsv = _HSV_LO[attributes] + u * (_HSV_HI[attributes] - _HSV_LO[attributes])
    striped = attributes == 1
    hsv[striped, 1, :2] = hsv[striped, 0, :2]  # stripes: same hue and saturation as the shape, darker
    p["colours"] = _hsv_to_rgb(hsv)  # (N, 3 colours, 3 rgb)
    p["noise"] = rng.standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=f32)  # (N, 3, 32, 32)
    p = {k: np.asarray(v, dtype=f32) for k, v in p.items()}
    p["attributes"] = attributes
    return p


def _render(targets: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 3, 32, 32) uint8 images of shapes ``targets`` with appearance ``p`` (from ``_draw_params``)."""
    n = len(targets)
    col = ((np.arange(_SUPER, dtype=np.float32) + 0.5) / _SUPER) * 2 - 1  # pixel centres in [-1, 1]
    x, y = col[None, None, :], -col[None, :, None]  # (1, 1, S) and (1, S, 1); y points up

    def per_image(name: str) -> np.ndarray:
        return p[name][:, None, None]  # (N, 1, 1)

    # Shape mask: image -> local coordinates (undo translation, rotation, scale), then the class's SDF.
    dx, dy = x - per_image("cx"), y - per_image("cy")  # (N, S, S) by broadcasting
    cos, sin, scale = np.cos(per_image("theta")), np.sin(per_image("theta")), per_image("scale")
    u, v = (cos * dx + sin * dy) / scale, (cos * dy - sin * dx) / scale  # (N, S, S)
    sdf = np.empty((n, _SUPER, _SUPER), dtype=np.float32)
    for c in np.unique(targets):
        idx = np.nonzero(targets == c)[0]
        sdf[idx] = SHAPES[SHAPE_NAMES[c]](u[idx], v[idx])
    mask = np.clip(0.5 - sdf * scale / _PX, 0.0, 1.0)  # (N, S, S): 1 inside, 1-pixel linear ramp at edges
    del u, v, sdf

    # Texture weight inside the shape: 0 for solid, stripes for striped, dots for dotted.
    a = p["attributes"]
    ta = per_image("tex_angle")
    s = x * np.cos(ta) + y * np.sin(ta)  # (N, S, S) coordinate across the stripes
    wave = np.sin(2 * math.pi * per_image("tex_freq") * s + per_image("tex_phase"))  # (N, S, S)
    stripes = np.clip(0.5 + 3.0 * wave, 0, 1)  # soft-edged square wave
    sp = per_image("dot_spacing")
    gx = np.mod(x / sp + p["dot_offset"][:, 0, None, None], 1.0) - 0.5  # (N, S, S) position inside a dot cell
    gy = np.mod(y / sp + p["dot_offset"][:, 1, None, None], 1.0) - 0.5
    dots = np.clip(0.5 - (np.hypot(gx, gy) - per_image("dot_radius")) * sp / _PX, 0.0, 1.0)
    tex = np.where((a == 1)[:, None, None], stripes, np.where((a == 2)[:, None, None], dots, 0.0))
    del s, wave, stripes, gx, gy, dots

    # Background modulation: 0 for solid, a linear gradient for striped, a faint checkerboard for dotted.
    ga = per_image("grad_angle")
    grad = per_image("grad_amp") * (x * np.cos(ga) + y * np.sin(ga))  # (N, S, S)
    cs = per_image("check_size")
    check = (np.floor(x / cs + p["check_offset"][:, 0, None, None])
             + np.floor(y / cs + p["check_offset"][:, 1, None, None])) % 2  # (N, S, S) in {0, 1}
    check = per_image("check_amp") * (check - 0.5)
    bg_mod = np.where((a == 1)[:, None, None], grad, np.where((a == 2)[:, None, None], check, 0.0))
    del grad, check

    colours = p["colours"][:, :, :, None, None]  # (N, 3 colours, 3 rgb, 1, 1)
    fg = colours[:, 0] * (1 - tex[:, None]) + colours[:, 1] * tex[:, None]  # (N, 3, S, S)
    bg = colours[:, 2] + bg_mod[:, None]  # (N, 3, S, S)
    img = bg + (fg - bg) * mask[:, None]  # (N, 3, S, S) float in ~[0, 1]
    img = img.reshape(n, 3, IMAGE_SIZE, 2, IMAGE_SIZE, 2).mean(axis=(3, 5))  # (N, 3, 32, 32): 2x2 box filter
    img = img * p["gain"][:, :, None, None] + per_image("offset")[:, None]  # colour jitter
    img = img + p["noise"] * p["noise_std"][:, None, None, None]  # sensor noise
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)  # (N, 3, 32, 32) uint8


def render_split(groups: list[list[int]], seed: int, split: str) -> Split:
    """Render one split: ``groups[c][g]`` images of class c in attribute group g, class-major order.

    Each (split, class) pair has its own random stream seeded by (seed, split, class), so the test sets
    do not depend on the training counts (the same seed gives the same test images for every imbalance
    ratio and train variant), and splits never share an image.
    """
    targets, attributes, params = [], [], []
    for c, per_group in enumerate(groups):
        attrs = np.repeat(np.arange(3), per_group)  # (n_c,) group ids, group-major inside the class
        if len(attrs) == 0:
            continue
        rng = np.random.default_rng([GENERATOR_VERSION, seed % 2**63, _SPLIT_CODES[split], c])
        params.append(_draw_params(rng, attrs))
        targets.append(np.full(len(attrs), c))
        attributes.append(attrs)
    t, a = np.concatenate(targets), np.concatenate(attributes)
    p = {k: np.concatenate([q[k] for q in params]) for k in params[0]}
    images = np.empty((len(t), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # (N, 3, 32, 32) uint8
    for i in range(0, len(t), _CHUNK):
        sl = slice(i, i + _CHUNK)
        images[sl] = _render(t[sl], {k: v[sl] for k, v in p.items()})
    return Split(targets=torch.from_numpy(t), images=torch.from_numpy(images), attributes=torch.from_numpy(a))


def shapes_glt_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: str,
                      train_variant: str) -> dict[str, list[list[int]]]:
    """Images per (class, attribute group) of every split: ``{split: [[n_c0, n_c1, n_c2] per class]}``.

    - train, variant ``lt`` (Train-GLT): class c gets ``class_counts(C, n_max, ratio, profile)[c]``, 7:2:1
      over attributes;
    - train, variant ``cbl`` (Train-CBL, the ALT protocol): every class gets the mean of the Train-GLT
      counts (floor), 7:2:1 over attributes, so both variants have about the same size, as ImageNet-GLT's
      Train-CBL (114/class) matches its Train-GLT (113,460 images);
    - val: i.i.d. with train, ~10%: per class max(1, round(0.1 * n_c)), 7:2:1;
    - test_cbl: 60 per class, 42/12/6; test_gbl: 60 per class, 20/20/20.
    """
    lt = class_counts(num_classes, n_max, imbalance_ratio, profile)
    if train_variant == "lt":
        train = lt
    elif train_variant == "cbl":
        train = [max(1, sum(lt) // num_classes)] * num_classes
    else:
        raise DataError(f"shapes_glt: unknown data.options.train_variant '{train_variant}' (lt or cbl)")
    val = [max(1, int(math.floor(VAL_FRACTION * n + 0.5))) for n in train]
    return {
        "train": [attribute_split(n) for n in train],
        "val": [attribute_split(n) for n in val],
        "test_cbl": [attribute_split(TEST_PER_CLASS) for _ in range(num_classes)],
        "test_gbl": [[TEST_PER_CLASS // 3] * 3 for _ in range(num_classes)],
    }


def _load_cache(path: Path, splits: list[str]) -> dict[str, Split] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        return {s: Split(targets=blob[f"{s}_targets"], images=blob[f"{s}_images"],
                         attributes=blob[f"{s}_attributes"]) for s in splits}
    except Exception:  # corrupt or foreign file: regenerate and overwrite
        return None


@dataclass
class ShapesGLTConfig:
    """Options of ``shapes_glt`` (``data.options``)."""

    num_classes: int | None = None  # shape classes, 1..12 (the first ones of SHAPE_NAMES); None: 10
    max_per_class: int | None = None  # n_max, the head class's training images; None: 500
    # lt: Train-GLT, long-tailed over classes and attributes (scored under CLT and GLT); cbl: Train-CBL,
    # class-balanced with long-tailed attributes, every class the mean of the lt counts (scored under ALT).
    train_variant: str = "lt"

    def __post_init__(self) -> None:
        if self.num_classes is not None and not 1 <= self.num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)} (the shapes drawn: "
                             f"{', '.join(SHAPE_NAMES)}), got {self.num_classes}; drop it (or null) for 10")
        _check_n_max(self.max_per_class)
        if self.train_variant not in ("lt", "cbl"):
            raise ValueError(f"train_variant must be lt or cbl, got '{self.train_variant}'")


def _check_n_max(n: int | None) -> None:
    # 0 or a negative n_max used to fall back silently to the dataset's default (`x or default`).
    if n is not None and n < 1:
        raise ValueError(f"max_per_class must be >= 1, got {n}; drop it (or null) for the dataset's default")


@DATASETS.register("shapes_glt")
@options(ShapesGLTConfig)
def shapes_glt(cfg: DataConfig, opts: ShapesGLTConfig, cache_dir: Path) -> LTDataset:
    """Generated shapes, long-tailed over classes and attributes (GLT); CLT/GLT/ALT test sets; no download.

    Classes are shapes (``data.options.num_classes``, default 10, at most 12); 3 attribute groups per class
    (solid / striped / dotted, each with its own palette and background) at 7:2:1. ``data.options.max_per_class``
    is n_max (default 500), ``data.imbalance_ratio`` and ``data.profile`` shape the class tail,
    ``data.options.train_variant`` picks Train-GLT (``lt``) or Train-CBL (``cbl``), ``data.subset_seed`` seeds the
    pixels. Generated once (a few seconds) and cached under ``cache_dir/shapes_glt``.
    """
    num_classes = opts.num_classes or DEFAULT_NUM_CLASSES
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise DataError(f"shapes_glt draws {len(SHAPE_NAMES)} shapes ({', '.join(SHAPE_NAMES)}); "
                        f"data.options.num_classes={num_classes} is out of range 1..{len(SHAPE_NAMES)}")
    if cfg.image_size not in (None, IMAGE_SIZE):
        raise DataError(f"shapes_glt is rendered at {IMAGE_SIZE}x{IMAGE_SIZE}; drop data.image_size")
    n_max = opts.max_per_class or DEFAULT_MAX_PER_CLASS
    try:
        counts = shapes_glt_counts(num_classes, n_max, cfg.imbalance_ratio, cfg.profile, opts.train_variant)
    except ValueError as e:  # bad ratio / profile / n_max from class_counts
        raise DataError(f"shapes_glt: {e}") from None

    params = {"version": GENERATOR_VERSION, "seed": cfg.subset_seed, "num_classes": num_classes,
              "n_max": n_max, "imbalance_ratio": float(cfg.imbalance_ratio), "profile": cfg.profile,
              "train_variant": opts.train_variant}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "shapes_glt" / f"{key}.pt"
    split_names = list(counts)
    splits = _load_cache(path, split_names)
    if splits is None:
        splits = {s: render_split(counts[s], cfg.subset_seed, s) for s in split_names}
        blob = {}
        for s, sp in splits.items():
            blob |= {f"{s}_targets": sp.targets, f"{s}_images": sp.images, f"{s}_attributes": sp.attributes}
        try:
            atomic_torch_save(blob, path)
        except OSError:  # read-only cache: still usable, just regenerated next time
            pass

    info = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.subset_seed,
        "num_classes": num_classes,
        "n_max": n_max,
        "imbalance_ratio": float(cfg.imbalance_ratio),
        "profile": cfg.profile,
        "train_variant": opts.train_variant,
        "train_counts": [sum(g) for g in counts["train"]],
        "attribute_counts": {s: counts[s] for s in split_names},  # [class][group]
        "attribute_ratio": "7:2:1",
        "split_sizes": {s: len(sp) for s, sp in splits.items()},
        "cache_key": key,
    }
    ds = LTDataset(
        name="shapes_glt",
        class_names=SHAPE_NAMES[:num_classes],
        splits=splits,
        eval_splits=["test_cbl", "test_gbl"],
        image_size=IMAGE_SIZE,
        mean=SHAPES_MEAN,
        std=SHAPES_STD,
        attribute_names=list(ATTRIBUTE_NAMES),
        protocols=glt_protocols(opts.train_variant, class_split="test_cbl", glt_split="test_gbl"),
        info=info,
    )
    ds.validate()
    return ds


# ----------------------------------------------------------------------------------------------- digits

DIGITS_TEST_PER_CLASS = 50  # class-balanced test set: 500 images
DIGITS_TEST_SEED = 0  # the test set is fixed (not data.subset_seed): every run is scored on the same images
# Per-channel statistics of all 1797 upsampled digits (grey, so equal channels).
DIGITS_MEAN = (0.305, 0.305, 0.305)
DIGITS_STD = (0.324, 0.324, 0.324)


def digits_images(data: np.ndarray) -> torch.Tensor:
    """(N, 64) scikit-learn digit pixels in 0..16 -> (N, 3, 32, 32) uint8, bilinear 4x upsampling."""
    x = torch.from_numpy(np.asarray(data, dtype=np.float32)).view(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8), [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)  # (N,1,32,32)
    x = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32) uint8, grey in 3 channels


def digits_split_indices(targets: np.ndarray, max_per_class: int | None, imbalance_ratio: float,
                         profile: str, seed: int) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """(train, test, train counts, n_max): indices into the scikit-learn digits for ``digits_lt``.

    test: 50 per class, fixed seed, sorted. train: ``select_long_tailed`` over the rest (the pool, in
    original order), grouped by class, seeded by ``seed``; never overlaps test.
    """
    rng = np.random.default_rng(DIGITS_TEST_SEED)
    test = np.sort(np.concatenate([rng.permutation(np.nonzero(targets == c)[0])[:DIGITS_TEST_PER_CLASS]
                                   for c in range(10)]))
    pool = np.setdiff1d(np.arange(len(targets)), test)  # sorted, original order
    pool_sizes = np.bincount(targets[pool], minlength=10)
    n_max = max_per_class or int(pool_sizes.min())
    if n_max > pool_sizes.min():
        raise DataError(f"digits_lt: data.options.max_per_class={n_max} but the smallest class has only "
                        f"{int(pool_sizes.min())} training images left after the test split; use <= that")
    try:
        counts = class_counts(10, n_max, imbalance_ratio, profile)
    except ValueError as e:
        raise DataError(f"digits_lt: {e}") from None
    if min(counts) < 1:
        raise DataError(f"digits_lt: n_max={n_max} with imbalance_ratio={imbalance_ratio} leaves a class "
                        f"with no image ({counts}); lower the ratio or raise data.options.max_per_class")
    train = pool[select_long_tailed(targets[pool], counts, seed)]  # (sum(counts),) grouped by class
    return train, test, counts, n_max


@dataclass
class DigitsLTConfig:
    """Options of ``digits_lt`` (``data.options``)."""

    # n_max, the head class's training images; None: the smallest class left after the test split (124).
    max_per_class: int | None = None

    def __post_init__(self) -> None:
        _check_n_max(self.max_per_class)


@DATASETS.register("digits_lt")
@options(DigitsLTConfig)
def digits_lt(cfg: DataConfig, opts: DigitsLTConfig, cache_dir: Path) -> LTDataset:
    """scikit-learn's 8x8 handwritten digits (bundled, no download), class-wise long-tailed, 32x32.

    A fixed class-balanced test set (50 per class) is split off first; the training set is drawn from the
    rest with ``class_counts(10, n_max, ratio, profile)`` and ``select_long_tailed`` seeded by
    ``data.subset_seed``. n_max is ``data.options.max_per_class`` or the smallest class left in the pool (124).
    ``cache_dir`` is unused: loading takes milliseconds.
    """
    from sklearn.datasets import load_digits

    if cfg.image_size not in (None, IMAGE_SIZE):
        raise DataError(f"digits_lt is upsampled to {IMAGE_SIZE}x{IMAGE_SIZE}; drop data.image_size")
    digits = load_digits()
    targets = np.asarray(digits.target, dtype=np.int64)  # (1797,)
    train, test, counts, n_max = digits_split_indices(targets, opts.max_per_class, cfg.imbalance_ratio,
                                                      cfg.profile, cfg.subset_seed)

    images = digits_images(digits.data)  # (1797, 3, 32, 32) uint8
    splits = {
        "train": Split(targets=torch.from_numpy(targets[train]), images=images[train]),
        "test": Split(targets=torch.from_numpy(targets[test]), images=images[test]),
    }
    info = {
        "seed": cfg.subset_seed,
        "test_seed": DIGITS_TEST_SEED,
        "n_max": n_max,
        "imbalance_ratio": float(cfg.imbalance_ratio),
        "profile": cfg.profile,
        "train_counts": counts,
        "test_per_class": DIGITS_TEST_PER_CLASS,
        "train_index_hash": index_hash(train),
        "test_index_hash": index_hash(test),
    }
    ds = LTDataset(name="digits_lt", class_names=[str(i) for i in range(10)], splits=splits,
                   eval_splits=["test"], image_size=IMAGE_SIZE, mean=DIGITS_MEAN, std=DIGITS_STD, info=info)
    ds.validate()
    return ds
