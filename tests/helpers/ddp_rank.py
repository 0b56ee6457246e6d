"""One rank of the 2-process gloo test: `python ddp_rank.py CONFIG OUT` with RANK / WORLD_SIZE / MASTER_* set.

Runs the real CLI; just before the final evaluation it saves this rank's method state to OUT/rank<R>.pt so
the test can check that every rank ends with the same weights and method state.
"""

import os
import sys

import torch

import longtail.engine.fit as fit

_evaluate_run = fit.evaluate_run


def _capture(method, *args, **kwargs):
    state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    torch.save(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    return _evaluate_run(method, *args, **kwargs)


fit.evaluate_run = _capture

if __name__ == "__main__":
    from longtail.cli import main

    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2]]))
