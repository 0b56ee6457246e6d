"""De-confound-TDE: the causal-norm head, TDE logits, the head direction, the detection helper."""

import math

import pytest
import torch
import torch.nn.functional as F

from longtail.config import ConfigError, ModelConfig
from longtail.engine.build import build_config  # names and method options resolved
from longtail.methods import MethodContext, create_method
from longtail.methods.tde import background_exempted_tde, suggest_alpha
from longtail.models import create_model
from longtail.models.heads import causal_norm_logits, tde_logits


def test_causal_norm_k2_hand_computed():
    # D = 4, K = 2: chunks [3, 4] and [0, 2] of the feature; one class with weight chunks [1, 0] and [0, 1].
    f = torch.tensor([[3.0, 4.0, 0.0, 2.0]])
    w = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    tau, gamma = 16.0, 0.5
    # head 1: (3*1 + 4*0) / 5 / (1 + 0.5) = 0.4; head 2: (2*1) / 2 / (1 + 0.5) = 2/3; scale tau / K = 8
    expected = 8 * (0.4 + 2 / 3)
    assert causal_norm_logits(f, w, 2, tau, gamma).item() == pytest.approx(expected, rel=1e-6)


def test_k1_gamma0_is_scaled_cosine():
    f, w = torch.randn(5, 8), torch.randn(3, 8)
    expected = 16 * F.normalize(f, dim=1) @ F.normalize(w, dim=1).T
    torch.testing.assert_close(causal_norm_logits(f, w, 1, 16.0, 0.0), expected)


def test_logits_invariant_to_feature_scale():
    f, w = torch.randn(4, 8), torch.randn(3, 8)
    torch.testing.assert_close(causal_norm_logits(f, w, 2, 16, 1 / 32), causal_norm_logits(7 * f, w, 2, 16, 1 / 32))


def test_tde_k1_hand_computed():
    # unit x = [1, 0]... take x = [0.6, 0.8], d = [1, 0]: cos = 0.6, x - alpha cos d = [0.6 - 0.6 a, 0.8]
    f = torch.tensor([[0.6, 0.8]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([5.0, 0.0])  # only the direction matters
    out = tde_logits(f, w, d, alpha=1.0, k=1, tau=2.0, gamma=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.6]]))


def test_alpha_zero_tde_equals_deconfound():
    f, w, d = torch.randn(6, 8), torch.randn(4, 8), torch.rand(8)
    for k in (1, 2, 4):
        torch.testing.assert_close(tde_logits(f, w, d, 0.0, k, 16, 1 / 32), causal_norm_logits(f, w, k, 16, 1 / 32))


def _tde(name="tde", counts=(10, 5, 2), **opts):
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="tiny", head="causal_norm"), len(counts))
    ctx = MethodContext(num_classes=len(counts), train_counts=torch.tensor(counts), epochs=1, steps_per_epoch=1,
                        device=torch.device("cpu"))
    return create_method({"name": name, **opts}, model, ctx), ctx


def test_direction_updates_only_in_training_and_round_trips():
    method, _ = _tde()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    method.eval()
    method(x, y)
    assert method.head_direction.abs().sum() == 0  # eval forward leaves it alone
    method.train()
    method(x, y)
    d1 = method.head_direction.clone()
    method(x, y)
    feats_mean = method.model.forward_features(x).mean(0)
    torch.testing.assert_close(method.head_direction, 0.9 * d1 + feats_mean, rtol=1e-4, atol=1e-5)  # accumulate
    other, _ = _tde()
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.head_direction, method.head_direction)
    method.eval(), other.eval()
    torch.testing.assert_close(other.predict(x), method.predict(x))


def test_zero_direction_is_an_error_not_nan():
    method, _ = _tde()
    method.eval()
    with pytest.raises(RuntimeError, match="head direction is zero"):
        method.predict(torch.randn(2, 3, 32, 32))
    deconf, _ = _tde("deconfound")
    deconf.eval()
    assert torch.isfinite(deconf.predict(torch.randn(2, 3, 32, 32))).all()


def test_tde_with_alpha_zero_predicts_like_deconfound():
    a, _ = _tde("tde", alpha=0.0)
    b, _ = _tde("deconfound")
    x = torch.randn(3, 3, 32, 32)
    a.train(), a(x, torch.tensor([0, 1, 2]))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    torch.testing.assert_close(a.predict(x), b.predict(x))


def test_lr_scaled_momentum():
    method, ctx = _tde(momentum_schedule="lr_scaled")
    for lr, mu in ((0.2, 0.9), (0.02, 0.9), (0.01, 0.95), (0.0, 1.0)):
        ctx.lr = lr
        method.on_epoch_start(0, ctx)
        assert method.mu == pytest.approx(mu)


def test_ema_average():
    method, _ = _tde(average="ema", momentum=0.5)
    x = torch.randn(4, 3, 32, 32)
    method.train()
    method(x, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(method.head_direction, 0.5 * method.model.forward_features(x).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_tde_needs_the_causal_norm_head():
    with pytest.raises(ConfigError, match="needs model.head=causal_norm"):
        build_config({"stages": [{"method": {"name": "tde"}}]})
    with pytest.raises(ValueError, match="causal_norm"):
        model = create_model(ModelConfig(backbone="tiny"), 3)
        create_method({"name": "tde"}, model, MethodContext(3, torch.tensor([1, 1, 1]), 1, 1, torch.device("cpu")))


def test_bad_option_values():
    with pytest.raises(ValueError, match="momentum_schedule"):
        _tde(momentum_schedule="cosine")


def test_suggest_alpha_rule_of_thumb():
    d = torch.tensor([1.0, 0.0, 1.0, 0.0])
    feats = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # cos = 1/sqrt(2) in both heads
    assert suggest_alpha(feats, d, 2) == pytest.approx(math.sqrt(2))


def test_background_exempted_tde_hand_computed():
    deconf = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))  # p over (fg0, fg1, bg)
    tde = torch.log(torch.tensor([[0.6, 0.2, 0.2]]))  # q
    s = background_exempted_tde(deconf, tde, bg_index=2)
    # bg keeps p_bg = 0.5; foreground share (1 - 0.5) split as q_fg / sum q_fg = 0.75 / 0.25
    torch.testing.assert_close(s, torch.tensor([[0.375, 0.125, 0.5]]))
    assert s.sum().item() == pytest.approx(1.0)


def test_direction_saved_with_the_weights_and_alpha_reset_at_eval(image_folder, tmp_path, capsys):
    from longtail.cli import main
    from longtail.engine import train
    from longtail.engine.checkpoint import load_checkpoint
    from longtail.engine.inference import load_trained

    raw = {"data": {"name": "image_folder", "root": str(image_folder), "image_size": 16, "in_memory": "always"},
           "model": {"backbone": "tiny", "head": "causal_norm"},
           "stages": [{"method": {"name": "tde", "alpha": 1.0}, "epochs": 2, "batch_size": 8}],
           "eval": {"many_above": 20, "few_below": 5}}
    run = train(build_config(raw), out=tmp_path / "tde", progress=False)
    final = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    assert final["head_direction"].norm() > 0
    loaded = load_trained(run)
    assert torch.equal(loaded.method.head_direction, final["head_direction"])
    assert load_trained(run, ["method.alpha=2.5"]).method.cfg.alpha == 2.5
    assert main(["eval", str(run), "--set", "method.alpha=0"]) == 0
    assert "method.alpha=0" in capsys.readouterr().out
    assert main(["eval", str(run), "--sweep", "method.alpha=0:1:0.5", "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert "| 0.5 |" in printed and "do not choose alpha" in printed
    import json

    rows = json.loads((run / "sweeps" / "alpha_test.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert (run / "sweeps" / "alpha_test.png").stat().st_size > 0
    # alpha = 0 in the sweep is De-confound: the same numbers as evaluating with alpha set to 0
    from longtail.engine.evaluate import evaluate_split

    m0 = evaluate_split(load_trained(run, ["method.alpha=0"]).method, loaded.loader, "test", loaded.cfg.eval)
    assert rows[0]["top1"] == m0["top1"]
    assert main(["eval", str(run), "--sweep", "method.beta=0:1:0.5"]) == 2


def test_parse_sweep():
    from longtail.engine.evaluate import parse_sweep

    assert parse_sweep("method.alpha=0:3:0.75") == ("alpha", [0.0, 0.75, 1.5, 2.25, 3.0])
    assert parse_sweep("method.alpha=1,2") == ("alpha", [1.0, 2.0])
    with pytest.raises(ValueError, match="method.NAME"):
        parse_sweep("seed=0:1:1")
    with pytest.raises(ValueError, match="step > 0"):
        parse_sweep("method.alpha=0:1:0")


def test_alpha_auto(image_folder, tmp_path):
    from longtail.engine import train
    from longtail.engine.inference import load_trained

    raw = {"data": {"name": "image_folder", "root": str(image_folder), "image_size": 16, "in_memory": "always"},
           "model": {"backbone": "tiny", "head": "causal_norm"},
           "stages": [{"method": {"name": "tde", "alpha": "auto"}, "epochs": 1, "batch_size": 8}]}
    run = train(build_config(raw), out=tmp_path / "auto", progress=False)
    m = load_trained(run).method
    # the rule of thumb on the (un-augmented) training features, never on test
    assert m.alpha() == pytest.approx(m.suggested_alpha.item()) and m.alpha() >= 1.0
    with pytest.raises(ConfigError, match="number or 'auto'"):
        build_config(raw, ["method.alpha=big"])
