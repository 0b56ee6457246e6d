"""IFL (spec glt_ifl.md 5): environment weights, the two-environment sampler, centres, schedule, resume."""

import json
import math
import os
import signal

import pytest
import torch

from longtail.engine import Interrupted, train
from longtail.engine.build import build_config
from longtail.engine.checkpoint import load_checkpoint
from longtail.methods.ifl import IFL, EnvironmentSampler, intra_weights
from test_augment import batched_first_batches
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
    original = IFL.forward

    def interrupt_once(self, images, targets, batch=None):
        if batch is not None:  # a training step of the fit loop
            calls["n"] += 1
            if calls["n"] == 3 * 9 + 4:  # epoch 3 (the first scoring epoch; 9 steps an epoch), mid-epoch
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, images, targets, batch)

    monkeypatch.setattr(IFL, "forward", interrupt_once)
    with pytest.raises(Interrupted):
        train(build_config(_ifl_raw(image_folder)), out=tmp_path / "int", progress=False)
    monkeypatch.setattr(IFL, "forward", original)
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"]["epoch"] == 3
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))  # env weights and centres included


# ----------------------------------------------------------------------------- the reference's combinations


def test_hardest_fifth_is_int_point_two_n_as_the_reference():
    # 7 recorded samples: head = the int(0.8 * 7) = 5 smallest u, tail = the int(0.2 * 7) = 1 largest (not 2).
    targets = torch.zeros(7, dtype=torch.int64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.35, 0.1], dtype=torch.float64)
    w = intra_weights(scores, targets, torch.ones(7, dtype=torch.bool), num_classes=1, sample_scale=4.0)
    p = (scores - scores.min()) / (scores.max() - scores.min() + 1e-9)
    u = (1 - p).abs() + 1e-5
    s = u.sort().values
    k = float((math.log(4.0) / torch.log(s[-1:].mean() / s[:5].mean() + 1e-5)).clamp(1, 10))
    expect = (u**k + 1e-12) / (u**k + 1e-12).sum()
    assert torch.allclose(w.double(), expect, atol=1e-7)
    k_ours_before = float((math.log(4.0) / torch.log(s[-2:].mean() / s[:5].mean() + 1e-5)).clamp(1, 10))
    assert k != pytest.approx(k_ours_before)  # the case tells the two roundings apart


def test_ifl_refuses_combinations_that_would_train_something_else():
    from longtail.config import ConfigError
    from longtail.methods.losses import Mixup

    with pytest.raises(ValueError, match="silently train plain mixup.*mixup_alpha"):
        Mixup.Config(base="ifl")
    for base in ("crt", "lws", "tau_norm", "ncm"):
        with pytest.raises(ValueError, match="stage-2 method.*init_from"):
            IFL.Config(base=base)
    with pytest.raises(ValueError, match="stage-2 method"):
        Mixup.Config(base="crt")
    with pytest.raises(ValueError, match="own training step"):
        Mixup.Config(base="tde")
    with pytest.raises(ConfigError, match="drw_epch"):  # the base's options are checked against its Config
        IFL.Config(base="ldam_drw", base_options={"drw_epch": 80})
    with pytest.raises(ValueError, match="tau=val"):
        IFL.Config(base="logit_adjust_posthoc", base_options={"tau": "val"})
    with pytest.raises(ValueError, match="center_loss"):
        IFL.Config(center_loss="l1")
    cfg = IFL.Config(base="ldam_drw", base_options={"drw_epoch": 80})
    assert cfg.base_options == {"max_margin": 0.5, "drw_epoch": 80, "beta": 0.9999}  # completed, then saved


def test_ifl_passes_options_to_its_base_and_checks_its_head(image_folder, tmp_path):
    from longtail.config import ConfigError

    raw = _ifl_raw(image_folder, epochs=2, base="ldam_drw", base_options={"drw_epoch": 1},
                   center_milestones=[0.5], center_weights=[0.0, 0.01], update_milestones=[0.5])
    with pytest.raises(ConfigError, match="needs model.head=cosine"):  # LDAM's margins need the cosine head
        build_config(raw)
    mixup = tiny_raw(image_folder, method="mixup", base="ldam_drw")
    with pytest.raises(ConfigError, match="needs model.head=cosine"):
        build_config(mixup)
    raw["model"]["head"] = "cosine"
    seen = []
    original = IFL.on_epoch_start

    def spy(self, epoch, ctx):
        original(self, epoch, ctx)
        seen.append((epoch, self.criterion.cfg.drw_epoch, self.criterion.reweight))

    import unittest.mock

    with unittest.mock.patch.object(IFL, "on_epoch_start", spy):
        train(build_config(raw), out=tmp_path / "run", progress=False)
    assert seen == [(0, 1, False), (1, 1, True)]  # DRW from the base option's epoch 1, not its default 160


def _ifl_unit(num_classes=3, **opts):
    from longtail.config import ModelConfig
    from longtail.data.base import LTDataset, Split
    from longtail.methods.base import MethodContext
    from longtail.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="tiny", head="linear"), num_classes)
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    ds = LTDataset("t", ["a", "b", "c"], {"train": Split(targets=targets, images=images)}, ["train"], 16)
    ctx = MethodContext(num_classes=3, train_counts=ds.train_counts(), epochs=10, steps_per_epoch=1,
                        device=torch.device("cpu"), dataset=ds)
    ifl = IFL(model, IFL.Config(base="ce", **opts), ctx)
    ifl.on_stage_start(ctx)
    ifl.on_epoch_start(8, ctx)  # weight 0.005
    ifl.train()
    return ifl, model, images.float() / 255, targets


def test_cosine_centre_loss_is_one_minus_cos_and_moves_the_centres():
    import torch.nn.functional as F

    ifl, model, x, y = _ifl_unit(center_loss="cosine")
    out = ifl(x, y)
    z = model.forward_features(x)
    cos = F.cosine_similarity(z, ifl.centers[y].detach(), dim=1)
    ce = F.cross_entropy(model.forward_head(z), y)
    assert float(out["loss"].detach()) == pytest.approx(float((ce + 0.005 * (1 - cos).mean()).detach()), rel=1e-5)
    before = ifl.centers.detach().clone()
    out["loss"].backward()
    assert ifl.centers.grad is not None and ifl.centers.grad.abs().sum() > 0
    # The centres' gradient is that of the unweighted cosine loss (the reference's 1 / a rescale).
    c = before.clone().requires_grad_(True)
    (1 - F.cosine_similarity(z.detach(), c[y], dim=1)).mean().backward()
    assert torch.allclose(ifl.centers.grad, c.grad, atol=1e-6)


def test_mixup_ifl_mixes_the_batch_the_loss_and_the_centre_loss():
    import torch.nn.functional as F

    ifl, model, x, y = _ifl_unit(mixup_alpha=1.0)
    torch.manual_seed(5)
    out = ifl(x, y)
    torch.manual_seed(5)  # the same draws: lam ~ Beta(1, 1), then the permutation
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(len(x))
    z = model.forward_features(lam * x + (1 - lam) * x[perm])
    logits = model.forward_head(z)
    ctr = lambda t: ((z - ifl.centers[t].detach()) ** 2).sum(1).mean()  # noqa: E731
    expect = (lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
              + 0.005 * (lam * ctr(y) + (1 - lam) * ctr(y[perm])))
    assert float(out["loss"].detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    assert not torch.equal(perm, torch.arange(len(x)))
    ifl.eval()
    assert torch.equal(ifl(x, y)["logits"], model(x))  # no mixing at evaluation


def test_mixup_ifl_and_randaugment_ifl_train(image_folder, tmp_path):
    # Mixup + IFL: the environments are rebuilt from the unmixed labels' confidences as usual.
    run = train(build_config(_ifl_raw(image_folder, epochs=5, base="ce", mixup_alpha=1.0)), out=tmp_path / "mix",
                progress=False)
    w2 = final_weights(run)["env_weights"][1]
    targets = torch.tensor([0] * 24 + [1] * 8 + [2] * 3)
    assert torch.zeros(3).index_add_(0, targets, w2).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    # RandAugment + IFL, on the batched in-memory path and on the per-image DataLoader path.
    for fast in (True, False):
        raw = _ifl_raw(image_folder, epochs=1, base="ce")
        raw["data"].update(augment="cifar+randaugment", fast_path=fast, num_workers=0)
        run = train(build_config(raw), out=tmp_path / f"ra{fast}", progress=False)
        assert json.loads((run / "metrics.json").read_text())["splits"]["test"]["top1"] >= 0


def test_randaugment_presets():
    from torchvision.transforms import v2

    from longtail.config import ConfigError
    from longtail.data.loaders import file_transform, parse_augment

    assert parse_augment("glt+randaugment") == ("glt", "randaugment")
    assert parse_augment("randaugment") == ("auto", "randaugment")
    assert parse_augment("cifar") == ("cifar", "")
    for bad in ("none+randaugment", "glt+rand", "randaug"):
        with pytest.raises(ValueError, match="data.augment"):
            parse_augment(bad)
    with pytest.raises(ConfigError, match="randaugment"):
        build_config({"data": {"augment": "glt+randaug"}})
    t = file_transform("glt_coco+randaugment", 16, True)
    assert isinstance(t.transforms[-1], v2.RandAugment)  # after the preset's crop and flip
    assert not any(isinstance(s, v2.RandAugment) for s in file_transform("glt+randaugment", 16, False).transforms)
    # The batched in-memory path: the same crops and flips (same generator), then RandAugment per image.
    batches = batched_first_batches(("cifar", "cifar+randaugment", "randaugment"))
    assert batches["cifar"].shape == batches["cifar+randaugment"].shape and batches["cifar"].dtype == torch.uint8
    assert not torch.equal(batches["cifar"], batches["cifar+randaugment"])
    assert torch.equal(batches["randaugment"], batches["cifar+randaugment"])  # auto resolves to cifar here


def test_ifl_then_crt_and_lws_as_a_two_stage_recipe(image_folder, tmp_path):
    from longtail.config import load_raw, resolve_config_path

    for second in ("crt", "lws"):
        raw = load_raw(resolve_config_path(f"shapes_glt/ifl_{second}"))
        assert [s["method"]["name"] if isinstance(s["method"], dict) else s["method"] for s in raw["stages"]] \
            == ["ifl", second]
        assert raw["stages"][1]["init_from"] == raw["stages"][0]["name"]
        tiny = _ifl_raw(image_folder, epochs=2, base="ce")
        tiny["model"]["head_bias"] = False
        tiny["stages"][0]["name"] = "features"
        tiny["stages"].append({**raw["stages"][1], "epochs": 1, "batch_size": 8})
        run = train(build_config(tiny), out=tmp_path / second, progress=False)
        stage1 = load_checkpoint(run / "checkpoints" / "stage_features.pt")["method"]
        final = final_weights(run)
        assert "centers" in stage1 and "centers" not in final  # stage 2 is the plain method on IFL's backbone
        backbone = [k for k in stage1 if k.startswith("model.backbone.") and k.endswith("weight")]
        assert backbone and all(torch.equal(stage1[k], final[k]) for k in backbone)  # frozen


def test_per_half_bn_normalises_each_environment_half_and_keeps_env1_running_stats():
    import copy

    ifl, model, x, y = _ifl_unit(per_half_bn=True)  # 6 images: env1 = the first 3, env2 = the last 3
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    start = copy.deepcopy(model.state_dict())
    logits = ifl(x, y)["logits"].detach()
    env1, env2 = copy.deepcopy(model), copy.deepcopy(model)  # as two DataParallel replicas
    env1.load_state_dict(start)
    env2.load_state_dict(start)
    env1.train()
    env2.train()
    expect = env1.forward_head(torch.cat([env1.forward_features(x[:3]), env2.forward_features(x[3:])]))
    assert torch.allclose(logits, expect.detach(), atol=1e-6)
    assert_same_state(model.state_dict(), env1.state_dict())  # running statistics: env1's half only (GPU 0)
    mixed, _, _, _ = _ifl_unit(per_half_bn=False)
    assert not torch.allclose(mixed(x, y)["logits"].detach(), logits, atol=1e-4)  # the default: one batch
