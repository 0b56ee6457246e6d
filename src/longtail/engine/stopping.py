"""How a run stops early and says so: the SIGINT / SIGTERM flag, and the error that carries the resume hint.

A leaf of the engine (it imports nothing of longtail's), so that the fit loop (engine/fit.py) and the fit on
features (engine/feature_stage.py) share one flag and one error without importing each other.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("longtail")


class Interrupted(RuntimeError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""


class StopFlag:
    """SIGINT/SIGTERM set a flag checked after every step (under DDP: agreed by all ranks every ``sync_every``
    steps) and at each epoch end of a fit on features; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        log.warning("received %s: saving a checkpoint after this step (under DDP: at the next check point)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
