"""Two-stage decoupled training: cRT, LWS, tau-norm and NCM on top of a frozen stage-1 model."""

import pytest
import torch

from longtail.config import build_config
from longtail.engine import train
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
