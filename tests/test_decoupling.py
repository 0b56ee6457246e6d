"""Two-stage decoupled training: cRT, LWS, tau-norm and NCM on top of a frozen stage-1 model."""

import json

import pytest
import torch
import yaml

from longtail.engine import train
from longtail.engine.build import build_config  # names and method options resolved
from longtail.engine.checkpoint import load_checkpoint, model_state
from longtail.engine.inference import load_trained
from test_engine_cli import tiny_raw


def two_stage(image_folder, method, epochs=1, sampler="class_balanced"):
    raw = tiny_raw(image_folder, epochs=1)
    raw["stages"][0]["name"] = "features"
    raw["stages"].append({"name": "classifier", "method": method, "epochs": epochs, "batch_size": 8,
                          "sampler": sampler, "init_from": "features", "optim": {"lr": 0.1}})
    return build_config(raw)


def _states(run):
    s1 = model_state(load_checkpoint(run / "checkpoints" / "stage_features.pt")["method"])
    s2 = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    return s1, s2


def test_crt_freezes_backbone_and_retrains_a_fresh_classifier(image_folder, tmp_path):
    run = train(two_stage(image_folder, {"name": "crt"}), out=tmp_path / "crt", progress=False)
    s1, s2 = _states(run)
    for k, v in s1.items():
        if k.startswith("backbone."):  # weights and BN running statistics untouched
            assert torch.equal(v, s2[f"model.{k}"]), k
    assert "model.head.fc.bias" in s2 and not torch.equal(s1["head.fc.weight"], s2["model.head.fc.weight"])
    assert load_trained(run).method.model.head.fc.bias is not None


def test_lws_learns_only_scales(image_folder, tmp_path):
    run = train(two_stage(image_folder, {"name": "lws"}), out=tmp_path / "lws", progress=False)
    s1, s2 = _states(run)
    for k, v in s1.items():
        assert torch.equal(v, s2[f"model.{k}"]), k
    assert not torch.equal(s2["scales"], torch.ones(3))


def test_tau_norm_needs_no_training_and_sweeps(image_folder, tmp_path):
    run = train(two_stage(image_folder, {"name": "tau_norm", "tau": 1.0}, epochs=0), out=tmp_path / "tn",
                progress=False)
    m = load_trained(run).method
    f = torch.randn(4, 32)
    w = m.model.head.weight
    m.cfg.tau = 0.0
    torch.testing.assert_close(m.predict_features(f), f @ w.T)  # tau = 0: the raw weights, bias dropped
    m.cfg.tau = 1.0
    torch.testing.assert_close(m.predict_features(f), f @ (w / w.norm(dim=1, keepdim=True)).T)
    from longtail.cli import main

    assert main(["eval", str(run), "--sweep", "method.tau=0:2:1", "--split", "test"]) == 0


def test_ncm_centroids(image_folder, tmp_path):
    run = train(two_stage(image_folder, {"name": "ncm"}, epochs=0), out=tmp_path / "ncm", progress=False)
    m = load_trained(run).method
    assert m.centroids.shape == (3, 32) and m.centroids.norm(dim=1).gt(0).all()
    # a feature equal to a class's (cl2n) centroid direction is assigned to that class
    f = m.feature_mean + m.centroids[2] * 5
    assert m.predict_features(f[None]).argmax(1).item() == 2


def test_stage2_methods_need_a_linear_head(image_folder):
    from longtail.config import ConfigError

    with pytest.raises(ConfigError, match="needs model.head=linear"):
        build_config({**tiny_raw(image_folder), "model": {"backbone": "tiny", "head": "cosine"},
                      "stages": [{"method": "crt"}]})


def test_crt_balanced_softmax_option(image_folder, tmp_path):
    from longtail.config import ConfigError

    run = train(two_stage(image_folder, {"name": "crt", "loss": "balanced_softmax"}, sampler="instance"),
                out=tmp_path / "bs", progress=False)
    m = load_trained(run).method
    assert m.cfg.loss == "balanced_softmax"
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    prior = m.class_counts / m.class_counts.sum()  # (24, 8, 3) / 35: differs from CE unless uniform
    torch.testing.assert_close(m.loss(logits, y), torch.nn.functional.cross_entropy(logits + prior.log(), y))
    with pytest.raises(ConfigError, match="loss must be ce or balanced_softmax"):
        two_stage(image_folder, {"name": "crt", "loss": "focal"})


# ----------------------------------------------------------------------------- fidelity options (issue 13)


def _bn_buffers(state, prefix=""):
    return {k: v for k, v in state.items() if k.startswith(f"{prefix}backbone.") and "running_" in k}


@pytest.mark.parametrize("name", ["crt", "lws"])
def test_backbone_bn_train_moves_running_statistics_with_frozen_weights(image_folder, tmp_path, name):
    from longtail.engine.evaluate import predict_split

    run = train(two_stage(image_folder, {"name": name, "backbone_bn": "train"}), out=tmp_path / name,
                progress=False)
    s1, s2 = _states(run)
    stats = _bn_buffers(s1)
    assert stats  # the tiny backbone has BatchNorm
    for k, v in s1.items():
        if k.startswith("backbone.") and k in stats:  # the running statistics moved and were saved in final.pt
            assert not torch.equal(v, s2[f"model.{k}"]), k
        elif k.startswith("backbone.") and "num_batches_tracked" not in k:  # every weight stayed frozen
            assert torch.equal(v, s2[f"model.{k}"]), k
    trained = load_trained(run)
    m, loader = trained.method, trained.loader
    m.train()
    assert m.model.backbone.training  # BN in train mode while training
    assert not any(p.requires_grad for p in m.model.backbone.parameters())
    scores, _ = predict_split(m, loader, "test", 16, amp=False)
    assert m.training  # evaluation switched to eval mode and back
    m.eval()
    assert not any(mod.training for mod in m.modules())
    ref = torch.cat([m.predict(loader.normalize(xb)) for xb, _ in loader.eval_batches("test", 16)])
    torch.testing.assert_close(scores, ref)  # = the eval-mode forward with the saved running statistics


@pytest.mark.parametrize("name", ["crt", "lws"])
def test_backbone_bn_default_keeps_eval_mode(image_folder, tmp_path, name):
    run = train(two_stage(image_folder, {"name": name}), out=tmp_path / name, progress=False)
    s1, s2 = _states(run)
    for k, v in s1.items():
        if k.startswith("backbone."):  # BN statistics included: bit-identical to stage 1
            assert torch.equal(v, s2[f"model.{k}"]), k
    m = load_trained(run).method
    assert m.cfg.backbone_bn == "eval"
    m.train()
    assert not m.model.backbone.training and m.model.head.training


@pytest.mark.parametrize("name", ["crt", "lws"])
def test_backbone_bn_bad_value(image_folder, name):
    from longtail.config import ConfigError

    with pytest.raises(ConfigError, match="backbone_bn must be eval or train, got 'frozen'"):
        two_stage(image_folder, {"name": name, "backbone_bn": "frozen"})


def _images_per_epoch(run):
    return [e["images"] for e in json.loads((run / "metrics.json").read_text())["epoch_timing"]]


def test_epoch_length_dataset_cuts_a_class_aware_epoch_to_n_over_b_steps(image_folder, tmp_path):
    # 35 training images (24 / 8 / 3), batch 8: class-aware stream n_max x C = 72 samples = 9 steps; int(35/8) = 4
    full = train(two_stage(image_folder, {"name": "crt"}, epochs=2), out=tmp_path / "full", progress=False)
    assert _images_per_epoch(full)[-2:] == [72, 72]
    cfg = two_stage(image_folder, {"name": "crt"}, epochs=2)
    cfg.stages[1].epoch_length = "dataset"
    cut = train(cfg, out=tmp_path / "cut", progress=False)
    assert _images_per_epoch(cut)[-2:] == [32, 32]
    # the default (sampler) is the run as before: instance sampling gives int(35/8) = 4 steps either way
    assert _images_per_epoch(full)[0] == _images_per_epoch(cut)[0] == 32


def test_epoch_length_dataset_resumes_mid_epoch_exactly(image_folder, tmp_path, interrupt_method):
    from longtail.engine import Interrupted
    from test_engine_cli import assert_same_state, final_weights

    def cfg(method, **opts):
        raw = tiny_raw(image_folder, epochs=3, method=method, **opts)
        raw["stages"][0].update(sampler="class_balanced", epoch_length="dataset")
        return build_config(raw)

    ref = train(cfg("ce"), out=tmp_path / "ref", progress=False)
    assert _images_per_epoch(ref) == [32, 32, 32]
    with pytest.raises(Interrupted, match="--resume"):
        train(cfg("interrupt_test", at_step=6), out=tmp_path / "int", progress=False)  # epoch 2, step 2 of 4
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"] == {"stage": 0, "epoch": 1,
                                                                                       "step": 2}
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))


def test_epoch_length_errors(image_folder, tmp_path):
    from longtail.config import ConfigError

    with pytest.raises(ConfigError, match="epoch_length must be sampler or dataset, got 'cycle'"):
        build_config(tiny_raw(image_folder), ["stages.0.epoch_length=cycle"])
    cfg = build_config(tiny_raw(image_folder, epochs=1), ["stages.0.epoch_length=dataset", "stages.0.batch_size=64"])
    with pytest.raises(ValueError, match=r"epoch_length=dataset gives int\(35 / 64\) = 0 steps"):
        train(cfg, out=tmp_path / "r", progress=False)


def _tau_case():
    """A tau-norm head and val features whose best tau is known: W = [[10, 0], [0, 1], [0, 0]] (class 0 the head),
    a class-0 feature (1, v) is right iff tau < 1 - log10 v, a class-1 feature iff tau > 1 - log10 v.

    Over 0, 0.1, ..., 2: class 0 (6 at threshold 0.95, 4 at 1.15) and class 1 (2 at 1.05) give mean per-class
    accuracy 50 for tau <= 0.9, 20 at 1.0, 70 at 1.1 (the unique best), 50 from 1.2; micro top1 would pick tau = 0.
    """
    from longtail.config import ModelConfig
    from longtail.methods import MethodContext, create_method
    from longtail.models import create_model

    model = create_model(ModelConfig(backbone="tiny", head={"name": "linear", "bias": False}), 3)
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.weight[0, 0], model.head.fc.weight[1, 1] = 10.0, 1.0
    ctx = MethodContext(num_classes=3, train_counts=torch.tensor([100, 10, 5]), epochs=0, steps_per_epoch=1,
                        device=torch.device("cpu"))
    method = create_method({"name": "tau_norm", "tau": "val"}, model, ctx)
    rows = [(0, 0.95)] * 6 + [(0, 1.15)] * 4 + [(1, 1.05)] * 2
    feats = torch.zeros(len(rows), 32)
    for i, (_, threshold) in enumerate(rows):
        feats[i, 0], feats[i, 1] = 1.0, 10 ** (1 - threshold)
    targets = torch.tensor([c for c, _ in rows])
    return method, feats, targets


def test_tau_val_picks_the_best_mean_class_accuracy_on_val(monkeypatch):
    from types import SimpleNamespace

    from longtail.config import EvalConfig
    from longtail.engine import evaluate

    method, feats, targets = _tau_case()
    monkeypatch.setattr(evaluate, "extract_features", lambda *a, **k: (feats, targets))
    loader = SimpleNamespace(ds=SimpleNamespace(splits={"val": None}, train_counts=lambda: torch.tensor([100, 10, 5])),
                             device=torch.device("cpu"))
    choice = evaluate.choose_on_val(method, loader, "tau", method.cfg.tau_grid, EvalConfig(few_below=6))
    assert choice["value"] == pytest.approx(1.1) and choice["score"] == pytest.approx(70.0)
    assert choice["metric"] == "mean_class_acc" and choice["split"] == "val" and len(choice["curve"]) == 21
    curve = {round(r["tau"], 1): r["mean_class_acc"] for r in choice["curve"]}
    assert curve[0.0] == curve[0.9] == pytest.approx(50) and curve[1.0] == pytest.approx(20)
    assert max(choice["curve"], key=lambda r: r["top1"])["tau"] == 0.0  # micro accuracy would have chosen 0
    assert method.cfg.tau == "val"  # the sweep restores the option; the caller stores the choice
    with pytest.raises(RuntimeError, match="not chosen yet"):
        method.option("tau")
    method.set_chosen("tau", choice["value"])
    assert method.option("tau") == choice["value"]  # exactly the grid value that was scored


def test_a_choice_at_the_top_of_its_grid_warns_to_widen_it(monkeypatch, caplog):
    from types import SimpleNamespace

    from longtail.config import EvalConfig
    from longtail.engine import evaluate

    method, feats, targets = _tau_case()
    monkeypatch.setattr(evaluate, "extract_features", lambda *a, **k: (feats, targets))
    loader = SimpleNamespace(ds=SimpleNamespace(splits={"val": None}, train_counts=lambda: torch.tensor([100, 10, 5])),
                             device=torch.device("cpu"))
    with caplog.at_level("WARNING", logger="longtail"):
        inside = evaluate.choose_on_val(method, loader, "tau", method.cfg.tau_grid, EvalConfig(few_below=6))
    assert inside["value"] == pytest.approx(1.1) and "widen" not in caplog.text  # 1.1 beats 1.2: inside the grid
    with caplog.at_level("WARNING", logger="longtail"):
        top = evaluate.choose_on_val(method, loader, "tau", [1.0, 0.0, 1.1], EvalConfig(few_below=6))
    assert top["value"] == pytest.approx(1.1)
    assert ("method.tau=1.1 chosen on val is the largest value of its grid and scores above 1 (70.00 against 20.00): "
            "the best may lie beyond; widen method.tau_grid") in caplog.text


@pytest.mark.parametrize("name", ["tau_norm", "logit_adjust_posthoc"])
def test_tau_val_is_chosen_at_stage_end_and_written_to_metrics(image_folder, tmp_path, name):
    from longtail.cli import main

    cfg = two_stage(image_folder, {"name": name, "tau": "val", "tau_grid": [0, 0.5, 1, 1.5, 2]}, epochs=0)
    cfg.data.val_fraction = 0.3
    run = train(cfg, out=tmp_path / name, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    (choice,) = metrics["chosen_on_val"]
    assert choice["stage"] == "classifier" and choice["option"] == "tau" and choice["split"] == "val"
    scores = [r["mean_class_acc"] for r in choice["curve"]]
    assert [r["tau"] for r in choice["curve"]] == [0, 0.5, 1, 1.5, 2]
    assert choice["value"] == choice["curve"][scores.index(max(scores))]["tau"]  # the first best
    assert metrics["splits"]["val"]["mean_class_acc"] == choice["score"]  # evaluated with the chosen tau
    assert "chosen on val" in (run / "train.log").read_text()
    m = load_trained(run).method
    assert m.option("tau") == choice["value"]
    # the same test metrics when the run is re-scored at that tau as a fixed value
    assert main(["eval", str(run), "--split", "test", "--set", f"method.tau={choice['value']}", "--no-write"]) == 0
    fixed = load_trained(run, [f"method.tau={choice['value']}"])
    from longtail.engine.fit import evaluate_run

    again = evaluate_run(fixed.method, fixed.loader, fixed.cfg, splits=["test"])["splits"]["test"]
    assert again["per_class"] == metrics["splits"]["test"]["per_class"]
    # a resumed (finished) run keeps the record
    (run / "metrics.json").unlink()
    train(out=run, resume=True, progress=False)
    assert json.loads((run / "metrics.json").read_text())["chosen_on_val"] == metrics["chosen_on_val"]


@pytest.mark.parametrize("name", ["tau_norm", "logit_adjust_posthoc"])
def test_tau_val_errors(image_folder, tmp_path, name):
    from longtail.config import ConfigError

    with pytest.raises(ValueError, match=r"method.tau=val is chosen on a validation split and this run has none"):
        train(two_stage(image_folder, {"name": name, "tau": "val"}, epochs=0), out=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="tau must be a number or 'val'"):
        two_stage(image_folder, {"name": name, "tau": "best"}, epochs=0)
    with pytest.raises(ConfigError, match="tau_grid must hold at least one value"):
        two_stage(image_folder, {"name": name, "tau": "val", "tau_grid": []}, epochs=0)


def test_tau_fixed_value_runs_have_no_chosen_state(image_folder, tmp_path):
    run = train(two_stage(image_folder, {"name": "tau_norm", "tau": 0.5}, epochs=0), out=tmp_path / "tn",
                progress=False)
    assert not any(k.startswith("chosen_") for k in load_checkpoint(run / "checkpoints" / "final.pt")["method"])
    assert "chosen_on_val" not in json.loads((run / "metrics.json").read_text())
    assert load_trained(run).method.option("tau") == 0.5


@pytest.mark.parametrize("name", ["crt", "lws", "tau_norm", "ncm", "logit_adjust_posthoc"])
def test_decoupling_reproduction_recipes_validate(name):
    from pathlib import Path

    from longtail.engine.build import load_config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / f"cifar10_lt_{name}_decoupling.yaml"
    cfg = load_config(path, ["init_from=/runs/ce"])
    (st,) = cfg.stages
    assert st.method["name"] == name and st.init_from == "/runs/ce"
    # The model of the reproduction table's stage-1 row `ce` (cifar10_lt/ce with a head bias), whose weights it loads.
    row = next(r for r in yaml.safe_load((path.parents[1] / "reproduce.yaml").read_text())["rows"] if r["name"] == "ce")
    assert cfg.model == load_config(row["recipe"], row.get("overrides", [])).model
    if name in ("crt", "lws"):
        assert st.method["backbone_bn"] == "train" and st.epoch_length == "dataset" and st.batch_size == 512
        assert st.schedule.reference_offset and cfg.eval.select == "best_val" and cfg.data.val_per_class == 1000
    if name in ("tau_norm", "logit_adjust_posthoc"):
        assert st.method["tau"] == "val" and st.epochs == 0 and cfg.data.val_per_class == 1000


def test_tau_val_with_per_epoch_val_and_best_val_selection(image_folder, tmp_path):
    # A one-stage post-hoc LA run: each val evaluation first chooses tau for that epoch's weights; the reported
    # choice is the one of the selected (best-val) weights.
    raw = tiny_raw(image_folder, epochs=2, method="logit_adjust_posthoc", tau="val", tau_grid=[0, 1, 2])
    raw["data"]["val_fraction"] = 0.3
    raw["stages"][0]["eval_every"] = 1
    raw["eval"]["select"] = "best_val"
    run = train(build_config(raw), out=tmp_path / "la", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    (choice,) = metrics["chosen_on_val"]
    assert choice["stage"] == "main" and choice["value"] in (0, 1, 2)
    assert load_trained(run).method.option("tau") == choice["value"]
    assert (run / "train.log").read_text().count("tau=") >= 3  # epochs 1 and 2, then the selected weights


def test_ncm_fits_once_on_the_engines_train_features(image_folder, tmp_path):
    """The engine's feature stage hands NCM the train features Method.split_features gives (the same numbers as
    before the stage helper existed), and refuses a split the run does not have."""
    from longtail.engine.feature_stage import fit_on_features
    from longtail.errors import ConfigError
    from longtail.methods import MethodContext

    run = train(two_stage(image_folder, {"name": "ncm"}, epochs=0), out=tmp_path / "ncm", progress=False)
    loaded = load_trained(run)
    m, loader = loaded.method, loaded.loader
    feats, labels = m.split_features(loader, "train")
    z = torch.nn.functional.normalize(feats - feats.mean(0), dim=1, eps=1e-12)
    sums = torch.zeros_like(m.centroids).index_add_(0, labels, z)
    expected = sums / torch.bincount(labels, minlength=3).clamp_min(1)[:, None]
    ctx = MethodContext(num_classes=3, train_counts=torch.ones(3), epochs=0, steps_per_epoch=0,
                        device=torch.device("cpu"), loader=loader)
    m.centroids.zero_()
    m.feature_mean.zero_()
    assert fit_on_features(m, ctx) and torch.equal(m.centroids, expected)  # bit for bit
    m.feature_splits = lambda ctx: ("train", "val")
    with pytest.raises(ConfigError, match="val, which this run does not have"):
        fit_on_features(m, ctx)
