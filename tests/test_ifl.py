"""IFL (spec glt_ifl.md 5): environment weights, the two-environment sampler, centres, schedule, resume."""

import json
import os
import signal

import pytest
import torch

from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint
from longtail.methods.ifl import IFL, EnvironmentSampler, intra_weights
from test_engine_cli import assert_same_state, final_weights, tiny_raw


def test_intra_weights_balance_classes_and_upweight_the_hardest_fifth():
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([0] * 500 + [1] * 50 + [2] * 3 + [3] * 10)
    scores = torch.rand(len(targets), generator=g)  # ground-truth-class probabilities
    recorded = torch.ones(len(targets), dtype=torch.bool)
    recorded[549] = False  # class 1's last sample was never drawn in the scoring epoch
    w = intra_weights(scores, targets, recorded, num_classes=5, sample_scale=4.0)
    sums = torch.zeros(5).index_add_(0, targets, w.float())
    assert sums[:4].tolist() == pytest.approx([1.0] * 4, abs=1e-5)  # class-balanced environment
    assert sums[4] == 0  # a class with no sample
    assert w[549] == 0  # not recorded -> weight 0 (reference behaviour)
    assert torch.allclose(w[550:553], torch.full((3,), 1 / 3))  # fewer than 5 samples: uniform
    # Class 0: the hardest fifth (lowest p) about sample_scale times the easiest four fifths, on average.
    order = scores[:500].argsort()  # ascending p = hardest first
    hard, easy = w[:500][order[:100]].mean(), w[:500][order[100:]].mean()
    assert 3.0 < float(hard / easy) < 6.0
    assert (w[:500][order[:-1]] >= w[:500][order[1:]] - 1e-9).all()  # monotone in hardness


def test_environment_sampler_halves():
    targets = torch.tensor([0] * 30 + [1] * 6)
    weights = torch.ones(2, 36)
    weights[1, :30] = 0.0  # env2 draws class 1 only
    s = EnvironmentSampler(targets, 2, seed=3, total_epochs=1, weights=weights, half=4)
    idx = s.indices(0)
    assert len(idx) == len(s) == 9 * 8  # ceil(36 / 4) batches of 4 + 4: 2N draws, as the reference
    batches = idx.view(9, 8)
    assert (targets[batches[:, 4:]] == 1).all()  # second half of every batch from env2
    assert (targets[batches[:, :4]] == 0).any()  # first half from the natural distribution
    assert torch.equal(idx, s.indices(0)) and not torch.equal(idx, s.indices(1))  # seeded per epoch


def _ifl_raw(root, epochs=5, **opts):
    raw = tiny_raw(root, epochs=epochs, method="ifl", **opts)
    raw["stages"][0]["batch_size"] = 8
    return raw


def test_centre_weight_schedule_and_validation():
    ifl_cfg = IFL.Config()
    assert ifl_cfg.base == "balanced_softmax"
    ifl = IFL.__new__(IFL)
    object.__setattr__(ifl, "cfg", ifl_cfg)
    # 10 epochs: milestones 0.6, 0.8 -> epochs 6, 8 (the paper's 60 / 80 of 100)
    assert [ifl.center_weight(e, 10) for e in range(10)] == [0.0] * 6 + [0.001] * 2 + [0.005] * 2
    with pytest.raises(ValueError, match="own training step"):
        IFL.Config(base="tde")
    with pytest.raises(ValueError, match="one more entry"):
        IFL.Config(center_weights=[0.0, 0.1])
    with pytest.raises(ValueError, match="fractions"):
        IFL.Config(update_milestones=[60])


def test_ifl_trains_rebuilds_env2_and_moves_centres_only_after_the_first_milestone(image_folder, tmp_path):
    # 5 epochs: centre weight 0 for epochs 0-2, > 0 from epoch 3; env2 rebuilt from epoch 3's record.
    run2 = train(build_config(_ifl_raw(image_folder, epochs=2)), out=tmp_path / "two", progress=False)
    run5 = train(build_config(_ifl_raw(image_folder, epochs=5)), out=tmp_path / "five", progress=False)
    s2, s5 = final_weights(run2), final_weights(run5)
    assert torch.equal(s2["env_weights"], torch.ones_like(s2["env_weights"]))  # no rebuild yet
    w2 = s5["env_weights"][1]
    targets = torch.tensor([0] * 24 + [1] * 8 + [2] * 3)
    sums = torch.zeros(3).index_add_(0, targets, w2)
    assert sums.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)  # env2: class-balanced
    assert not torch.equal(s5["env_weights"][1], torch.ones(35))
    # While the weight is 0 the centres keep their random initialisation; then they move.
    init = load_checkpoint(run2 / "checkpoints" / "final.pt")["method"]["centers"]
    assert not torch.equal(init, s5["centers"])
    m = json.loads((run5 / "metrics.json").read_text())
    assert 0 <= m["splits"]["test"]["top1"] <= 100


def test_centres_stay_at_init_while_weight_is_zero(image_folder, tmp_path):
    run_a = train(build_config(_ifl_raw(image_folder, epochs=1)), out=tmp_path / "a", progress=False)
    raw = _ifl_raw(image_folder, epochs=1, center_milestones=[], center_weights=[0.0])
    raw["stages"][0]["epochs"] = 3
    run_b = train(build_config(raw), out=tmp_path / "b", progress=False)
    # Same seed, so the same random centres; three epochs at weight 0 leave them untouched.
    assert torch.equal(final_weights(run_a)["centers"], final_weights(run_b)["centers"])


def test_centre_step_is_the_moving_average_of_the_spec():
    """One SGD step (lr 0.5, no momentum / decay) on the unweighted centre loss:
    C_c <- C_c + (1 / B) sum_{y_i = c} (z_i - C_c), for any centre weight a > 0."""
    from longtail.config import ModelConfig, StageConfig
    from longtail.data.base import LTDataset, Split
    from longtail.engine.fit import _make_optimizer
    from longtail.methods.base import MethodContext
    from longtail.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="tiny", head="linear"), 3)
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    ds = LTDataset("t", ["a", "b", "c"], {"train": Split(targets=targets, images=images)}, ["train"], 16)
    ctx = MethodContext(num_classes=3, train_counts=ds.train_counts(), epochs=10, steps_per_epoch=1,
                        device=torch.device("cpu"), dataset=ds)
    ifl = IFL(model, IFL.Config(), ctx)
    st = StageConfig(epochs=10)
    st.optim.momentum, st.optim.weight_decay = 0.9, 5e-4  # the main group's; the centres ignore them
    opt = _make_optimizer(ifl, st)
    ifl.on_stage_start(ctx)
    ifl.on_epoch_start(8, ctx)  # weight 0.005
    x = images.float() / 255
    ifl.train()  # BN normalises with the batch's statistics: the same features in both passes below
    before = ifl.centers.detach().clone()
    z = model.forward_features(x).detach()
    out = ifl(x, targets)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    expect = before.clone()
    for c in range(3):
        expect[c] += (z[targets == c] - before[c]).sum(0) / len(targets)
    assert torch.allclose(ifl.centers.detach(), expect, atol=1e-5)


def test_resume_inside_a_scoring_epoch_matches_uninterrupted_run(image_folder, tmp_path, monkeypatch):
    ref = train(build_config(_ifl_raw(image_folder)), out=tmp_path / "ref", progress=False)
    calls = {"n": 0}
    original = IFL.on_train_batch

    def interrupt_once(self, step, idx):
        calls["n"] += 1
        if calls["n"] == 3 * 9 + 4:  # epoch 3 (the first scoring epoch; 9 steps an epoch), mid-epoch
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, idx)

    monkeypatch.setattr(IFL, "on_train_batch", interrupt_once)
    with pytest.raises(Interrupted):
        train(build_config(_ifl_raw(image_folder)), out=tmp_path / "int", progress=False)
    monkeypatch.setattr(IFL, "on_train_batch", original)
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"]["epoch"] == 3
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))  # env weights and centres included
