"""One rank of the 2-process gloo tests: `python ddp_rank.py CONFIG OUT [--resume]` with RANK / WORLD_SIZE /
MASTER_* set.

Runs the real CLI; just before the final evaluation it saves this rank's method state to OUT/rank<R>.pt so
the test can check that every rank ends with the same weights and method state. With LT_TEST_SIGINT="R:N",
rank R sends itself SIGINT at its N-th training step (only that rank: the others must stop with it). With
LT_TEST_DLSA_DRIFT set, rank 1's DLSA cascade is nudged after its fit.
"""

import os
import signal
import sys

import torch

import longtail.engine.fit as fit
from longtail.methods.tde import Deconfound

_evaluate_run = fit.evaluate_run


def _capture(method, *args, **kwargs):
    state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    torch.save(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    return _evaluate_run(method, *args, **kwargs)


fit.evaluate_run = _capture

if os.environ.get("LT_TEST_SIGINT"):
    rank, at = (int(v) for v in os.environ["LT_TEST_SIGINT"].split(":"))
    _forward, _calls = Deconfound.forward, [0]

    def _forward_then_interrupt(self, images, targets):
        _calls[0] += 1
        if _calls[0] == at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGINT)
        return _forward(self, images, targets)

    Deconfound.forward = _forward_then_interrupt

if os.environ.get("LT_TEST_DLSA_DRIFT"):
    # Stand-in for GPU non-determinism: rank 1's DLSA fit ends slightly off rank 0's; the method must make
    # every rank use rank 0's cascade.
    from longtail.methods.dlsa import DLSACascade

    _fit = DLSACascade.fit

    def _fit_then_drift(self, *args, **kwargs):
        out = _fit(self, *args, **kwargs)
        if int(os.environ["RANK"]) == 1:
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(0.01)
        return out

    DLSACascade.fit = _fit_then_drift

if __name__ == "__main__":
    from longtail.cli import main

    if "--resume" in sys.argv:
        sys.exit(main(["train", "--resume", "--out", sys.argv[2]]))
    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2]]))
