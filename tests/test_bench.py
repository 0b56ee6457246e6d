"""longtail.engine.bench: the step runner trains what the fit loop trains, bit for bit (timings are not tested)."""

import pytest
import torch

from longtail.config import ConfigError, build_config
from longtail.engine import train
from longtail.engine.bench import StepRunner
from longtail.engine.checkpoint import load_checkpoint
from test_engine_cli import tiny_raw


@pytest.mark.parametrize("overrides", [[], ["model.channels_last=false"], ["stages.0.schedule.per_iteration=true"]])
def test_step_runner_trains_the_fit_loops_weights(image_folder, tmp_path, overrides):
    cfg = build_config(tiny_raw(image_folder, epochs=2), overrides)
    run = train(cfg, out=tmp_path / "run", progress=False)
    fit_state = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    runner = StepRunner(cfg)
    assert runner.steps_per_epoch == 35 // 8  # 35 training images, drop_last
    runner.run(2 * runner.steps_per_epoch)  # both epochs, across the epoch end
    assert runner.epoch == 1 and runner.images == 2 * 4 * 8
    own = runner.method.state_dict()
    assert own.keys() == fit_state.keys()
    for k in own:
        assert torch.equal(own[k], fit_state[k]), k


def test_step_runner_digest_tells_equal_from_different_training(image_folder):
    cfg = build_config(tiny_raw(image_folder, epochs=2))
    a, b, c = StepRunner(cfg), StepRunner(cfg), StepRunner(build_config(tiny_raw(image_folder, epochs=2), ["seed=1"]))
    for r in (a, b, c):
        r.run(3)
    assert a.digest() == b.digest() != c.digest()
    assert float(a.loss_sum) > 0 and a.images == 24
    assert a.run(1)["images"] == 8
    assert a.digest() != b.digest()


def test_step_runner_refuses_a_batch_larger_than_the_epoch(image_folder):
    with pytest.raises(ConfigError, match="0 training steps"):
        StepRunner(build_config(tiny_raw(image_folder, epochs=2), ["stages.0.batch_size=64"]))
