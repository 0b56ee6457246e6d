"""Shared fixtures: a throw-away cache, tiny image folders made on the fly, and test-only plugins."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's ~/.cache/longtail from tests; one cache per test session is enough.
    monkeypatch.setenv("LONGTAIL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and leaves the other core free


def make_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 16, seed: int = 0) -> Path:
    """root/<split>/<class>/<i>.png with counts[split][class] images; each class has its own colour."""
    g = torch.Generator().manual_seed(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per in counts.items():
        for c, n in per.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            base = torch.tensor([(37 * (classes.index(c) + 1)) % 256, (91 * classes.index(c)) % 256, 128])
            for i in range(n):
                img = (base.view(3, 1, 1) + torch.randint(-20, 21, (3, size, size), generator=g)).clamp(0, 255)
                write_png(img.to(torch.uint8), str(d / f"{i:04d}.png"))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A 3-class long-tailed image folder with train and test."""
    return make_image_folder(tmp_path / "folder", {
        "train": {"ant": 24, "bee": 8, "cat": 3},
        "test": {"ant": 4, "bee": 4, "cat": 4},
    })


@pytest.fixture
def interrupt_method():
    """The test-only method ``interrupt_test``, registered for this test only: cross-entropy that sends its own
    process SIGINT once, at its ``at_step``-th training forward (counted across the test, a resume included).
    Yields the class; its ``calls`` counts the forwards."""
    from longtail.methods.ce import CrossEntropy
    from longtail.registry import METHODS

    class InterruptOnce(CrossEntropy):
        @dataclass
        class Config:
            label_smoothing: float = 0.0
            at_step: int = -1

        calls = 0
        fired = False

        def forward(self, images, targets, batch=None):
            cls = type(self)
            cls.calls += 1
            if cls.calls == self.cfg.at_step and not cls.fired:
                cls.fired = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().forward(images, targets, batch)

    with METHODS.temporarily("interrupt_test", InterruptOnce, help="test only: CE that sends itself SIGINT once"):
        yield InterruptOnce
