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
    with pytest.raises(ConfigError, match="alpha must be a number, 'val' .* or 'auto'"):
        build_config(raw, ["method.alpha=big"])
    with pytest.raises(ConfigError, match="alpha_fallback must be a number or 'auto'"):
        build_config(raw, ["method.alpha_fallback=val"])
    with pytest.raises(ConfigError, match="alpha_grid must hold at least one value"):
        build_config(raw, ["method.alpha_grid=[]"])


# ----------------------------------------------------------------- alpha chosen on val; the warning when TDE hurts
# Two classes (train counts 12 and 3), the tiny backbone's 32-d feature in K=2 heads of 16, and a head direction
# d = (1, 0) in the first two dimensions of each head. Per head, TDE gives class i the logit
# s (x.w_i - alpha cos(x, d) d.w_i) (unit x and w): it lowers each class by its weight's projection on d.
#   hurts: the head class's weight lies off d (0.6, 0.8) and the tail class's along it (1, 0), so TDE lowers the
#     tail class more; its val sample (0.9, 0.436) wins by a margin of 0.011 at alpha 0 and loses from alpha 0.25
#     on (and its sample (1, 0) from alpha 1): every alpha > 0 scores below alpha 0.
#   helps: the reverse weights; De-confound gives the tail sample (0.9, 0.436) to the head class, TDE recovers it
#     from alpha 0.25 on, and the head class keeps its sample (1, 0) below alpha 1: alpha=val chooses 0.25.
CONTROLLED = {
    "hurts": {"weights": [(0.6, 0.8), (1.0, 0.0)], "val": [((0.6, 0.8), 0), ((0.9, 0.436), 1), ((1.0, 0.0), 1)]},
    "helps": {"weights": [(1.0, 0.0), (0.6, 0.8)], "val": [((1.0, 0.0), 0), ((0.9, 0.436), 1), ((0.6, 0.8), 1)]},
}


def _embed(v) -> torch.Tensor:
    out = torch.zeros(32)
    out[0:2] = torch.tensor(v)
    out[16:18] = torch.tensor(v)
    return out


def _controlled(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight (2, 32), direction (32,), val features (3, 32), val labels (3,)) of a CONTROLLED case."""
    c = CONTROLLED[case]
    weight = torch.stack([_embed(w) for w in c["weights"]])
    feats = torch.stack([_embed(x) for x, _ in c["val"]])
    return weight, _embed((1.0, 0.0)), feats, torch.tensor([y for _, y in c["val"]])


def _fake_loader(feats, targets):
    from types import SimpleNamespace

    return SimpleNamespace(ds=SimpleNamespace(splits={"val": None}, train_counts=lambda: torch.tensor([12, 3]),
                                              class_names=["ant", "bee"]), device=torch.device("cpu"))


@pytest.mark.parametrize("case,chosen", [("hurts", 0.0), ("helps", 0.25)])
def test_alpha_val_on_controlled_weights(monkeypatch, case, chosen):
    from longtail.config import EvalConfig
    from longtail.engine import evaluate

    weight, direction, feats, targets = _controlled(case)
    method, _ = _tde(counts=(12, 3), alpha="val")
    with torch.no_grad():
        method.model.head.weight.copy_(weight)
        method.head_direction.copy_(direction)
    monkeypatch.setattr(evaluate, "extract_features", lambda *a, **k: (feats, targets))
    loader = _fake_loader(feats, targets)
    eval_cfg = EvalConfig(many_above=10, few_below=2)
    assert method.alpha() == 1.0  # not chosen yet: alpha=val predicts with alpha_fallback (Python API use)
    choice = evaluate.choose_on_val(method, loader, "alpha", method.cfg.alpha_grid, eval_cfg)
    curve = {r["alpha"]: r["mean_class_acc"] for r in choice["curve"]}
    assert choice["value"] == chosen and len(curve) == 21 and max(curve) == 5.0
    if case == "hurts":
        assert curve[0.0] == 100.0 and curve[0.25] == curve[0.75] == 75.0 and curve[2.0] == 50.0
    else:
        assert curve[0.0] == 75.0 and curve[0.25] == curve[0.75] == 100.0 and curve[2.0] == 50.0
    method.set_chosen("alpha", choice["value"])
    assert method.alpha() == chosen
    (check,) = evaluate.check_off_values(method, loader, eval_cfg, choices=[{"stage": "main", **choice}])
    assert check["value"] == chosen and check["how"] == "chosen on val" and check["off_value"] == 0.0
    if case == "hurts":
        # val chose alpha 0: the run predicts as De-confound, and says so, with the best alpha > 0's score
        assert check["hurts"] and "chose alpha=0" in check["warning"] and "alpha=0.25, 75.00" in check["warning"]
        assert "100.00" in check["warning"]
        assert check["diagnostics"]["alpha"] == 1.0  # what TDE would do at alpha_fallback
    else:
        assert not check["hurts"] and "warning" not in check
        assert (check["score"], check["off_score"]) == (100.0, 75.0)
    # A fixed alpha of 2 costs accuracy in both cases: the warning gives both numbers.
    method.cfg.alpha = 2.0
    (check,) = evaluate.check_off_values(method, loader, eval_cfg)
    off = 100.0 if case == "hurts" else 75.0
    assert check["hurts"] and (check["score"], check["off_score"]) == (50.0, off)
    assert f"method.alpha=2 (configured) scores 50.00 mean_class_acc on val, below {off:.2f} at alpha=0" in \
        check["warning"]
    assert "De-confound" in check["warning"] and "TDE shifts the logits" in check["warning"]


def test_tde_statistics_on_controlled_weights():
    from longtail.methods.tde import spearman, tde_statistics

    for case, rho in (("hurts", -1.0), ("helps", 1.0)):
        weight, direction, feats, targets = _controlled(case)
        st = tde_statistics(feats, targets, direction, weight, 2, 16.0, 1 / 32, torch.tensor([12, 3]), alpha=1.0,
                            class_names=["ant", "bee"])
        cos = [x[0] for x, _ in CONTROLLED[case]["val"]]  # cos(x, d) = x_0 for unit x, d = (1, 0)
        proj = [w[0] / (1 + 1 / 32) for w in CONTROLLED[case]["weights"]]  # d . w / (||w|| + gamma), ||w|| = 1
        assert st["mean_cos"] == pytest.approx(sum(cos) / 3, abs=1e-4)
        assert st["suggested_alpha"] == pytest.approx(3 / sum(cos), abs=1e-3)
        assert st["weight_projection"] == pytest.approx(proj, abs=1e-4)
        # shift of class i: -alpha (tau/K) sum over the 2 heads of cos * proj_i, averaged over samples, centred
        spread = 16.0 * sum(cos) / 3 * abs(proj[0] - proj[1])
        assert st["shift_spread"] == pytest.approx(spread, abs=1e-3)
        assert st["logit_shift"] == pytest.approx([-spread / 2, spread / 2] if case == "helps" else
                                                  [spread / 2, -spread / 2], abs=1e-3)
        assert st["projection_vs_count"] == pytest.approx(rho)
        assert st["favoured_class"] == (1 if case == "helps" else 0)
        assert st["per_class_mean_cos"] == pytest.approx([cos[0], (cos[1] + cos[2]) / 2], abs=1e-4)
        assert "class bee" in st["summary"] or "class ant" in st["summary"]
    assert spearman([1, 2, 3], [3, 3, 3]) is None and spearman([1, 2, 2, 5], [1, 3, 3, 4]) == pytest.approx(1.0)


def _val_folder(tmp_path):
    from conftest import make_image_folder

    return make_image_folder(tmp_path / "vfolder", {
        "train": {"ant": 12, "bee": 3}, "val": {"ant": 2, "bee": 2}, "test": {"ant": 2, "bee": 2},
    })


def _val_raw(root, **method) -> dict:
    return {"data": {"name": "image_folder", "root": str(root), "image_size": 16, "in_memory": "always"},
            "model": {"backbone": "tiny", "head": "causal_norm"},
            "stages": [{"method": {"name": "tde", **method}, "epochs": 1, "batch_size": 5}],
            "eval": {"many_above": 10, "few_below": 2}}


@pytest.mark.parametrize("case,chosen", [("hurts", 0.0), ("helps", 0.25)])
def test_tiny_run_chooses_alpha_on_val_and_warns(tmp_path, monkeypatch, capsys, case, chosen):
    """A tiny run through `longtail train` and `longtail eval`: at the end of training the head's weights and
    direction are set to a CONTROLLED case and the val features replaced by its three, so what alpha=val
    chooses, and whether the run warns, is known exactly."""
    import json

    import yaml

    from longtail.cli import main
    from longtail.engine import evaluate
    from longtail.methods.tde import TDE

    weight, direction, feats, targets = _controlled(case)
    stage_end = TDE.on_stage_end

    def controlled_end(self, ctx):
        stage_end(self, ctx)
        with torch.no_grad():
            self.model.head.weight.copy_(weight)
            self.head_direction.copy_(direction)

    real = evaluate.extract_features
    monkeypatch.setattr(TDE, "on_stage_end", controlled_end)
    monkeypatch.setattr(evaluate, "extract_features",
                        lambda m, loader, split, *a, **k: (feats, targets) if split == "val" else
                        real(m, loader, split, *a, **k))
    cfg = tmp_path / "tde.yaml"
    cfg.write_text(yaml.safe_dump(_val_raw(_val_folder(tmp_path))))  # alpha: the default, val
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr()
    assert f"alpha={chosen:g} chosen on val for stage main (mean_class_acc" in out.out
    metrics = json.loads((run / "metrics.json").read_text())
    (choice,) = metrics["chosen_on_val"]
    assert choice["option"] == "alpha" and choice["value"] == chosen and len(choice["curve"]) == 21
    (check,) = metrics["off_value_check"]
    assert check["hurts"] == (case == "hurts") and check["value"] == chosen
    assert (run / "plots" / "chosen_alpha_main.png").stat().st_size > 0
    log = (run / "train.log").read_text()
    if case == "hurts":
        assert "warning: method.alpha=val chose alpha=0" in out.err and "WARNING method.alpha=val chose" in log
    else:  # no TDE warning (two classes cannot fill the shot groups: that warning is issue 17's)
        lines = [line for line in (out.err + log).splitlines() if "warning" in line.lower()]
        assert all("shot groups with fewer than two classes" in line for line in lines), lines
    from longtail.engine.inference import load_trained

    assert load_trained(run).method.alpha() == chosen  # final.pt carries the choice
    # `longtail eval` checks again, also at an alpha given with --set
    assert main(["eval", str(run), "--split", "test"]) == 0
    err = capsys.readouterr().err
    assert ("chose alpha=0" in err) == (case == "hurts")
    assert main(["eval", str(run), "--split", "test", "--set", "method.alpha=2"]) == 0
    off = 100.0 if case == "hurts" else 75.0
    assert f"warning: method.alpha=2 (configured) scores 50.00 mean_class_acc on val, below {off:.2f} at alpha=0 " \
           f"(De-confound)" in capsys.readouterr().err


def test_alpha_val_without_val_split_keeps_the_fallback(image_folder, tmp_path, capsys):
    import json

    from longtail.cli import main
    from longtail.config import load_raw
    from longtail.engine import train
    from longtail.engine.checkpoint import load_checkpoint
    from longtail.engine.inference import load_trained

    raw = {"data": {"name": "image_folder", "root": str(image_folder), "image_size": 16, "in_memory": "always"},
           "model": {"backbone": "tiny", "head": "causal_norm"},
           "stages": [{"method": {"name": "tde", "alpha_fallback": 1.5}, "epochs": 1, "batch_size": 8}],
           "eval": {"many_above": 20, "few_below": 5}}
    assert build_config(raw).stages[0].method["alpha"] == "val"  # the default
    run = train(build_config(raw), out=tmp_path / "noval", progress=False)
    saved = load_raw(run / "config.yaml")["stages"][0]["method"]
    assert saved["alpha"] == 1.5  # the run's config says what it predicts with, so eval predicts the same
    assert "chosen_alpha" not in load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "chosen_on_val" not in metrics and "off_value_check" not in metrics
    log = (run / "train.log").read_text()
    assert "method.alpha=val is chosen on a validation split and this run has none" in log
    assert "set data.val_fraction" in log
    assert load_trained(run).method.alpha() == 1.5
    assert "this run has none" in metrics["notes"][0] and "method.alpha_fallback=1.5" in metrics["notes"][0]
    assert main(["eval", str(run), "--no-write"]) == 0
    assert "note: this run has no val split" in capsys.readouterr().err
    assert main(["eval", str(run), "--set", "method.alpha=val"]) == 2  # chosen on val only, never on test
    assert "needs a validation split" in capsys.readouterr().err


def test_eval_on_a_run_folder_from_before_alpha_val(image_folder, tmp_path, capsys):
    """A run folder whose config.yaml predates alpha_grid / alpha_fallback (alpha: 1.0, as the running
    reproduction row's) re-evaluates to the metrics it recorded."""
    import json

    import yaml

    from longtail.cli import main
    from longtail.engine import train

    raw = {"data": {"name": "image_folder", "root": str(image_folder), "image_size": 16, "in_memory": "always"},
           "model": {"backbone": "tiny", "head": "causal_norm"},
           "stages": [{"method": {"name": "tde", "alpha": 1.0}, "epochs": 1, "batch_size": 8}],
           "eval": {"many_above": 20, "few_below": 5, "plots": False}}
    run = train(build_config(raw), out=tmp_path / "old", progress=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    method = cfg["stages"][0]["method"]
    assert method.pop("alpha_grid") and method.pop("alpha_fallback") == 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = json.loads((run / "metrics.json").read_text())["splits"]["test"]
    assert main(["eval", str(run)]) == 0
    after = json.loads((run / "metrics.json").read_text())["splits"]["test"]
    assert after["top1"] == before["top1"] and after["per_class"] == before["per_class"]
    assert main(["eval", str(run), "--set", "method.alpha=0", "--no-write"]) == 0


def test_eval_set_alpha_val_chooses_on_the_runs_val_split(tmp_path, capsys):
    from longtail.cli import main
    from longtail.engine import train

    raw = _val_raw(_val_folder(tmp_path), alpha=1.0)
    raw["eval"]["plots"] = False
    run = train(build_config(raw), out=tmp_path / "fixed", progress=False)
    assert main(["eval", str(run), "--set", "method.alpha=val", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "chosen on val for stage main" in out
