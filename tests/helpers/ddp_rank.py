"""One rank of the 2-process gloo tests: `python ddp_rank.py CONFIG OUT [--resume]` with RANK / WORLD_SIZE /
MASTER_* set.

Runs the real CLI; just before the final evaluation it saves this rank's method state to OUT/rank<R>.pt so
the test can check that every rank ends with the same weights and method state. With LT_TEST_SIGINT="R:N",
rank R sends itself SIGINT at its N-th training step (only that rank: the others must stop with it). With
LT_TEST_FEATURE_DRIFT set, rank 1's features for statistics fitted inside a stage (`split_features`, and the engine's
feature stage: `longtail.engine.feature_stage`) are nudged.
"""

import os
import signal
import sys

import torch

import longtail.engine.fit as fit
from longtail.methods.tde import Deconfound

_evaluate_run = fit.evaluate_run


def _capture(method, *args, **kwargs):
    state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in method.state_dict().items()}
    torch.save(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    return _evaluate_run(method, *args, **kwargs)


fit.evaluate_run = _capture

if os.environ.get("LT_TEST_SIGINT"):
    rank, at = (int(v) for v in os.environ["LT_TEST_SIGINT"].split(":"))
    _forward, _calls = Deconfound.forward, [0]

    def _forward_then_interrupt(self, images, targets, batch=None):
        _calls[0] += 1
        if _calls[0] == at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGINT)
        return _forward(self, images, targets, batch)

    Deconfound.forward = _forward_then_interrupt

if os.environ.get("LT_TEST_FEATURE_DRIFT"):
    # Stand-in for GPU non-determinism: rank 1's features for fitted statistics (NCM centroids, TDE's suggested
    # alpha, DLSA's flows and heads) come out slightly off rank 0's; methods must end with rank 0's state.
    from longtail.methods.base import Method

    _split_features = Method.split_features

    def _drifting_split_features(self, *args, **kwargs):
        feats, labels = _split_features(self, *args, **kwargs)
        return (feats + 0.01 if int(os.environ["RANK"]) == 1 else feats), labels

    Method.split_features = _drifting_split_features

    import longtail.engine.feature_stage as feature_stage

    _extract = feature_stage._extract

    def _drifting_extract(*args, **kwargs):
        feats, labels = _extract(*args, **kwargs)
        return (feats + 0.01 if int(os.environ["RANK"]) == 1 else feats), labels

    feature_stage._extract = _drifting_extract

if __name__ == "__main__":
    from longtail.cli import main

    if "--resume" in sys.argv:
        sys.exit(main(["train", "--resume", "--out", sys.argv[2]]))
    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2]]))
