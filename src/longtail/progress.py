"""Whether progress bars draw: one switch for every bar of the process (a leaf module: no torch, so the CLI can
set it before any command imports anything)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_BARS = [True]  # progress bars allowed in this process (False inside ``progress_bars(False)``)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Inside the block, ``bars_off()`` is True when ``enabled`` is False (``--quiet``, ``train(progress=False)``),
    so every progress bar (the decoding and file checks in ``longtail.data`` too) stays silent; nested blocks can
    only silence, never turn bars back on."""
    prev = _BARS[0]
    _BARS[0] = prev and enabled
    try:
        yield
    finally:
        _BARS[0] = prev


def bars_off() -> bool:
    """``disable=`` for a tqdm bar: True inside ``progress_bars(False)``."""
    return not _BARS[0]
