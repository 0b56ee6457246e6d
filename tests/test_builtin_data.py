"""Built-in datasets: shapes_glt (generated GLT benchmark) and digits_lt (scikit-learn digits made LT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.config import ConfigError, DataConfig
from longtail.data import builtin
from longtail.data.base import DataError
from longtail.data.builtin import (
    DigitsLTConfig,
    ShapesGLTConfig,
    attribute_split,
    digits_lt,
    digits_split_indices,
    shapes_glt,
)
from longtail.data.profiles import class_counts
from longtail.registry import DATASETS

SMALL = dict(max_per_class=100, imbalance_ratio=20.0)  # 10 classes, 100 .. 5 training images


def _shapes(cache, **kw):
    """shapes_glt with DataConfig fields and its own options (ShapesGLTConfig) as keywords."""
    own = {k: kw.pop(k) for k in ("num_classes", "max_per_class", "train_variant") if k in kw}
    return shapes_glt(DataConfig(**kw), ShapesGLTConfig(**own), cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_cache")


@pytest.fixture(scope="module")
def small(cache):
    return _shapes(cache, **SMALL)


def _groups(split, num_classes: int) -> np.ndarray:
    """(C, 3) images per (class, attribute group)."""
    out = np.zeros((num_classes, 3), dtype=np.int64)
    np.add.at(out, (split.targets.numpy(), split.attributes.numpy()), 1)
    return out


def test_registered():
    assert DATASETS.get("shapes-glt") is shapes_glt
    assert DATASETS.get("digits_lt") is digits_lt


def test_attribute_split():
    assert attribute_split(60) == [42, 12, 6]
    assert attribute_split(10) == [7, 2, 1]
    assert attribute_split(5) == [3, 1, 1]
    assert attribute_split(3) == [1, 1, 1]
    assert attribute_split(2) == [2, 0, 0]
    assert all(sum(attribute_split(n)) == n for n in range(200))


def test_shapes_structure(small):
    assert small.class_names == builtin.SHAPE_NAMES[:10]
    assert set(small.splits) == {"train", "val", "test_cbl", "test_gbl"}
    assert small.eval_splits == ["test_cbl", "test_gbl"]
    assert small.attribute_names == ["solid", "striped", "dotted"]
    assert small.image_size == 32
    assert small.protocols == {"CLT": "test_cbl", "GLT": "test_gbl"}  # Train-GLT (spec glt_ifl.md 3)
    for name, split in small.splits.items():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32), name
        assert split.targets.dtype == torch.int64 and split.attributes is not None
        assert split.images.flatten(1).float().std(1).min() > 5, f"{name} has a constant image"


def test_shapes_train_counts_and_attributes(small):
    expected = class_counts(10, 100, 20.0, "exp")
    assert small.train_counts().tolist() == expected
    assert small.info["train_counts"] == expected
    g = _groups(small.train, 10)
    assert g.tolist() == [attribute_split(n) for n in expected]  # 7:2:1 inside every class
    assert (g[:, 0] > g[:, 1]).all() and (g[:, 1] >= g[:, 2]).all() and (g >= 1).all()
    v = _groups(small.splits["val"], 10)  # i.i.d. with train: same class and attribute profile, ~10%
    assert v.sum(1).tolist() == [max(1, round(n / 10)) for n in expected]


def test_shapes_test_splits(small):
    cbl, gbl = _groups(small.splits["test_cbl"], 10), _groups(small.splits["test_gbl"], 10)
    assert (cbl == np.array([42, 12, 6])).all()  # class-balanced, attributes 7:2:1 (CLT)
    assert (gbl == 20).all()  # class- and attribute-balanced (GLT / ALT)


def test_shapes_splits_do_not_share_images(small):
    def rows(name):
        return {bytes(x) for x in small.splits[name].images.flatten(1).numpy()}

    names = list(small.splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not rows(a) & rows(b), (a, b)


def test_shapes_deterministic_and_seeded(small, tmp_path):
    again = _shapes(tmp_path / "fresh", **SMALL)  # regenerated, not read from the cache
    for name, split in small.splits.items():
        assert torch.equal(split.images, again.splits[name].images), name
        assert torch.equal(split.targets, again.splits[name].targets)
        assert torch.equal(split.attributes, again.splits[name].attributes)
    other = _shapes(tmp_path / "fresh", **SMALL, subset_seed=1)
    assert not torch.equal(other.train.images, small.train.images)
    assert not torch.equal(other.splits["test_gbl"].images, small.splits["test_gbl"].images)
    assert len(list((tmp_path / "fresh" / "shapes_glt").glob("*.pt"))) == 2


def test_shapes_cache_is_used(small, cache, monkeypatch):
    files = list((cache / "shapes_glt").glob("*.pt"))
    assert len(files) == 1 and files[0].stem == small.info["cache_key"]
    assert not list((cache / "shapes_glt").glob("*.tmp"))  # atomic write left no temp file

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(builtin, "render_split", fail)
    again = _shapes(cache, **SMALL)
    for name, split in small.splits.items():
        assert torch.equal(split.images, again.splits[name].images), name
        assert torch.equal(split.attributes, again.splits[name].attributes)


def test_shapes_corrupt_cache_is_regenerated(small, tmp_path):
    path = tmp_path / "shapes_glt" / f"{small.info['cache_key']}.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    ds = _shapes(tmp_path, **SMALL)
    assert torch.equal(ds.train.images, small.train.images)
    assert torch.load(path, weights_only=True)["train_images"].shape == small.train.images.shape


def test_shapes_cbl_variant(small, cache):
    ds = _shapes(cache, **SMALL, train_variant="cbl")
    n = sum(class_counts(10, 100, 20.0)) // 10  # the mean of the Train-GLT counts
    assert ds.train_counts().tolist() == [n] * 10
    assert _groups(ds.train, 10).tolist() == [attribute_split(n)] * 10  # attributes still long-tailed
    for name in ("test_cbl", "test_gbl"):  # the same test sets as the lt variant (same seed)
        assert torch.equal(ds.splits[name].images, small.splits[name].images)
    assert ds.protocols == {"ALT": "test_gbl"}  # Train-CBL is scored under ALT only


def test_shapes_step_profile_and_more_classes(cache):
    ds = _shapes(cache, num_classes=12, max_per_class=20, imbalance_ratio=10, profile="step")
    assert ds.train_counts().tolist() == [20] * 6 + [2] * 6
    assert ds.class_names[-1] == "crescent" and len(ds.splits["test_gbl"]) == 12 * 60


def test_shapes_errors(cache):
    from longtail.engine.build import build_config

    # The dataset's own options are checked when the config is resolved, before anything is generated.
    with pytest.raises(ConfigError, match=r"data.options: num_classes must be in 1..12"):
        build_config({"data": {"options": {"num_classes": len(builtin.SHAPE_NAMES) + 1}}})
    with pytest.raises(ConfigError, match="train_variant must be lt or cbl, got 'bl'"):
        build_config({}, ["data.options.train_variant=bl"])
    with pytest.raises(ConfigError, match="max_per_class must be >= 1"):
        build_config({}, ["data.max_per_class=0"])  # the old flat key, moved to data.options
    with pytest.raises(ValueError, match="train_variant"):
        ShapesGLTConfig(train_variant="bl")
    with pytest.raises(DataError, match="profile"):
        _shapes(cache, profile="linear")


def _edge_features(images: torch.Tensor) -> np.ndarray:
    """Contrast-normalised gradient magnitude at 16x16: polarity- and colour-free, so a linear model can
    read the silhouette (raw pixels carry mostly the attribute's palette)."""
    g = images.float().mean(1, keepdim=True) / 255  # (N, 1, 32, 32)
    dx = (g[..., :-1, 1:] - g[..., :-1, :-1]).abs()  # (N, 1, 31, 31)
    dy = (g[..., 1:, :-1] - g[..., :-1, :-1]).abs()
    e = (dx + dy) / ((dx + dy).flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-6)
    return F.adaptive_avg_pool2d(e, 16).flatten(1).numpy()  # (N, 256)


def _fit_predict(x: np.ndarray, y: np.ndarray, xt: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # multi-threaded BLAS on tiny matrices is ~100x slower on a 2-core machine
        return LogisticRegression(max_iter=200, C=0.1).fit(x, y).predict(xt)


def test_shapes_learnable(small):
    # Fit on test_cbl (balanced classes, attributes 7:2:1), score on test_gbl: the shapes are learnable
    # in every attribute group by a linear model on edge features.
    train, test = small.splits["test_cbl"], small.splits["test_gbl"]
    pred = _fit_predict(_edge_features(train.images), train.targets.numpy(), _edge_features(test.images))
    acc = pred == test.targets.numpy()
    per_group = [acc[test.attributes.numpy() == g].mean() for g in range(3)]
    assert acc.mean() > 0.45 and min(per_group) > 0.3, per_group  # chance is 0.1


def test_shapes_attribute_shift(small):
    # A pixel model that saw only the head attribute (solid) fails on the tail attributes: the attribute
    # is a real distribution shift inside each class, which is what GLT measures.
    train, test = small.splits["test_cbl"], small.splits["test_gbl"]
    solid = train.attributes == 0

    def pixels(images):
        return F.avg_pool2d(images.float() / 255, 4).flatten(1).numpy()  # (N, 3 * 8 * 8)

    pred = _fit_predict(pixels(train.images[solid]), train.targets[solid].numpy(), pixels(test.images))
    acc = pred == test.targets.numpy()
    per_group = [acc[test.attributes.numpy() == g].mean() for g in range(3)]
    assert per_group[0] > 0.4 and per_group[0] > 2 * max(per_group[1], per_group[2]), per_group


def test_digits_lt(tmp_path):
    ds = digits_lt(DataConfig(name="digits_lt", imbalance_ratio=20), DigitsLTConfig(), tmp_path)
    assert ds.class_names == [str(i) for i in range(10)] and ds.eval_splits == ["test"]
    assert ds.train_counts().tolist() == class_counts(10, 124, 20.0) == ds.info["train_counts"]
    assert ds.splits["test"].class_counts(10).tolist() == [50] * 10
    for split in ds.splits.values():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.images.max() > 200 and split.images.min() == 0
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey in 3 channels

    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, test, counts, n_max = digits_split_indices(targets, None, 20.0, "exp", 0)
    assert n_max == 124 and not set(train) & set(test) and len(set(train)) == len(train)
    assert (targets[train] == ds.train.targets.numpy()).all()
    other = digits_lt(DataConfig(name="digits_lt", imbalance_ratio=20, subset_seed=3), DigitsLTConfig(), tmp_path)
    assert torch.equal(other.splits["test"].images, ds.splits["test"].images)  # fixed test set
    assert not torch.equal(other.train.images, ds.train.images)  # seeded training subset


def test_digits_errors(tmp_path):
    with pytest.raises(DataError, match="max_per_class"):
        digits_lt(DataConfig(name="digits_lt"), DigitsLTConfig(max_per_class=500), tmp_path)
    from longtail.engine.build import build_config

    # digits_lt has 10 classes and one training variant: those shapes_glt options are not its own.
    with pytest.raises(ConfigError, match=r"data.options.num_classes: dataset 'digits_lt' has no option 'num_classes'; "
                                          r"its options: max_per_class"):
        build_config({"data": {"name": "digits_lt", "options": {"num_classes": 5}}})
    with pytest.raises(ConfigError, match=r"data.train_variant: dataset 'digits_lt' has no option train_variant "
                                          r"\(its options: max_per_class"):
        build_config({"data": {"name": "digits_lt"}}, ["data.train_variant=cbl"])
