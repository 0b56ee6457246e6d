"""A `longtail` CLI process that kills itself with SIGKILL (no clean-up of any kind), for the reliability tests.

    python kill_run.py step N -- train CONFIG --out DIR ...   # SIGKILL inside the N-th training step (CE)
    python kill_run.py startup -- train CONFIG --out DIR ...  # SIGKILL while the dataset loads (before config.yaml)
"""

import os
import signal
import sys

import longtail.engine.fit as fit
from longtail.methods.ce import CrossEntropy


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode = sys.argv[1]
    argv = sys.argv[sys.argv.index("--") + 1:]
    if mode == "step":
        at, calls, forward = int(sys.argv[2]), [0], CrossEntropy.forward

        def _forward_then_kill(self, images, targets, batch=None):
            calls[0] += 1
            if calls[0] == at:
                _kill()
            return forward(self, images, targets, batch)

        CrossEntropy.forward = _forward_then_kill
    elif mode == "startup":
        fit.create_dataset = lambda cfg: _kill()
    from longtail.cli import main

    sys.exit(main(argv))
