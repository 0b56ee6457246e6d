"""DLSA: the flow filter, progressive filtering, cascade routing, checkpoints, the CLI (features, feature quality)."""

import json
import os
import sys

import pytest
import torch
import yaml

pytest.importorskip("zuko")

from conftest import make_image_folder  # noqa: E402
from longtail.cli import main  # noqa: E402
from longtail.config import ConfigError, build_config  # noqa: E402
from longtail.engine import train  # noqa: E402
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from longtail.engine.features import feature_paths, load_features  # noqa: E402
from longtail.engine.inference import load_trained  # noqa: E402
from longtail.methods.dlsa import DLSACascade, DLSAConfig, FlowGMM  # noqa: E402
from test_engine_cli import tiny_raw  # noqa: E402

TINY_DLSA = {
    "name": "dlsa",
    "max_depth": 2,
    "clusters": 4,
    "flow_epochs": 2,
    "flow_batch_size": 16,
    "head_epochs": 3,
    "head_batch_size": 8,
    "head_lr": 0.05,
    "max_cluster_size": 1000,
}


def blobs(n_per=(120, 50, 20, 8), dim=6, seed=0):
    """Long-tailed Gaussian blobs: (N, dim) features and (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(n_per), dim, generator=g) * 3
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per)])
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def fitted_cascade(depth=2, **opts):
    x, y = blobs()
    opts = {"head_epochs": 4, **opts}
    cfg = DLSAConfig(max_depth=depth, clusters=6, flow_epochs=3, flow_batch_size=32, max_cluster_size=10**6, **opts)
    casc = DLSACascade(x.shape[1], 4, cfg, torch.bincount(y))
    summary = casc.fit(x, y)
    return casc.eval(), x, y, summary


def test_flow_log_likelihood_is_finite_invertible_and_a_density():
    torch.manual_seed(0)
    flow = FlowGMM(5, clusters=3, seed=1)
    x = torch.randn(64, 5) * 2 + 1
    flow.train()
    flow.component_log_probs(x)  # moves the batch-norm running statistics away from the identity
    flow.eval()
    lp = flow.log_prob(x)
    assert lp.shape == (64,) and torch.isfinite(lp).all()
    u, logdet = flow.transform(x)
    torch.testing.assert_close(flow.inverse(u), x, atol=1e-4, rtol=1e-4)  # x -> z -> x
    # log|det J| of the whole flow equals autograd's Jacobian determinant
    jac = torch.autograd.functional.jacobian(lambda v: flow.transform(v[None])[0][0], x[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-4, rtol=1e-4)
    # the mixture prior: log p(x) = logmeanexp_k N(u; mu_k, I) + log|det J|
    normal = torch.distributions.MultivariateNormal(flow.means, torch.eye(5))
    ref = normal.log_prob(u[:, None]).logsumexp(1) - torch.log(torch.tensor(3.0)) + logdet
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)


def test_filter_keeps_the_configured_fraction_and_reuses_the_threshold():
    casc, x, y, summary = fitted_cascade(depth=2, filter_fraction=0.3)
    n = len(y)
    n1 = int(casc.stage_train_counts[0])
    n2 = int(casc.stage_train_counts[1])
    assert abs(n1 - 0.3 * n) <= 1
    assert abs(n2 - 0.3 * (n - n1)) <= 1
    assert int(casc.stage_train_counts.sum()) == n
    # at prediction the train-percentile thresholds route the training set exactly as in training
    routes, _ = casc.cascade(x)
    assert torch.bincount(routes, minlength=3).tolist() == casc.stage_train_counts.tolist()
    assert [s["train_samples"] for s in summary["stages"]] == casc.stage_train_counts.tolist()


def test_cascade_routes_each_sample_to_exactly_one_stage():
    casc, x, y, _ = fitted_cascade(depth=2)
    test = torch.randn(300, x.shape[1]) * 3
    routes, scores = casc.cascade(test)
    assert routes.shape == (300,) and set(routes.unique().tolist()) <= {0, 1, 2}
    # stage d answers iff its flow accepts the sample and no earlier flow did; the score is its head's
    s = [casc.flows[d].score(test)[0] for d in range(2)]
    accept = [s[d] >= casc.thresholds[d] for d in range(2)]
    expected = torch.where(accept[0], 0, torch.where(accept[1], 1, 2))
    assert torch.equal(routes, expected)
    rest = routes == 2
    assert rest.any() and (routes < 2).any()
    casc.train()  # a route never depends on the batch (flows score with running statistics), even in train mode
    assert torch.equal(torch.cat([casc.cascade(test[i : i + 7])[0] for i in range(0, 300, 7)]), routes)
    assert casc.flows[0].training
    casc.eval()
    torch.testing.assert_close(scores[rest], casc.regular(test[rest], test[rest]))
    first = routes == 0
    c = casc.flows[0].score(test)[1]
    torch.testing.assert_close(scores[first], casc.cacs[0](test[first], test[first], casc.cluster_priors[0][c[first]]))


def test_heads_are_selected_on_routed_val_samples_only():
    x, y = blobs()
    xv, yv = blobs(n_per=(10, 10, 10, 10), seed=1)
    cfg = DLSAConfig(
        max_depth=1, clusters=6, flow_epochs=2, flow_batch_size=32, head_epochs=6, eval_every=2, max_cluster_size=10**6
    )
    summary = DLSACascade(6, 4, cfg, torch.bincount(y)).fit(x, y, val=(xv, yv))
    for st in summary["stages"]:
        assert st["head_epoch"] in (2, 4, 6) and st["val_top1"] is not None
    last = DLSACascade(6, 4, DLSAConfig(**{**cfg.__dict__, "head_select": "last"}), torch.bincount(y))
    assert all(st["head_epoch"] == 6 and st["val_top1"] is None for st in last.fit(x, y, val=(xv, yv))["stages"])


def test_depth_zero_is_a_balanced_softmax_classifier_on_all_features():
    casc, x, y, _ = fitted_cascade(depth=0, head_epochs=30, head_lr=0.1)
    routes, scores = casc.cascade(x)
    assert (routes == 0).all() and casc.stage_train_counts.tolist() == [len(y)]
    assert (scores.argmax(1) == y).float().mean() > 0.5  # separable blobs: it learned something


def test_flow_latent_variant_and_bad_options():
    casc, x, _, _ = fitted_cascade(depth=1, z_source="flow_latent")
    assert torch.isfinite(casc.cascade(x)[1]).all()
    with pytest.raises(ValueError, match="z_source"):
        DLSAConfig(z_source="latent")
    with pytest.raises(ConfigError, match="did you mean 'clusters'"):
        build_config({"stages": [{"method": {"name": "dlsa", "cluster": 5}}]})


def test_missing_zuko_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "zuko", None)
    with pytest.raises(ImportError, match=r"longtail\[flows\]"):
        FlowGMM(4, 2)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dlsa_run(tmp_path_factory):
    """A tiny 2-stage run (ce 1 epoch, then dlsa depth 2) trained through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("dlsa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGTAIL_CACHE", str(root / "cache"))
        folder = make_image_folder(
            root / "folder", {"train": {"ant": 24, "bee": 8, "cat": 3}, "test": {"ant": 4, "bee": 4, "cat": 4}}
        )
        raw = tiny_raw(folder, epochs=1)
        raw["stages"][0]["name"] = "features"
        raw["stages"].append({"name": "dlsa", "method": TINY_DLSA, "epochs": 0, "init_from": "features"})
        (root / "r.yaml").write_text(yaml.safe_dump(raw))
        assert main(["train", str(root / "r.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
        yield root / "run"


def test_cli_two_stage_run_reports_routes(dlsa_run):
    m = json.loads((dlsa_run / "metrics.json").read_text())
    routes = m["splits"]["test"]["routes"]
    assert [r["route"] for r in routes] == ["CAC_1", "CAC_2", "regular"]
    assert sum(r["num_samples"] for r in routes) == 12
    assert all({"mcc", "nmi", "many"} <= set(r) for r in routes if r["num_samples"])
    state = load_checkpoint(dlsa_run / "checkpoints" / "final.pt")["method"]
    assert {
        "cascade.thresholds",
        "cascade.cluster_priors",
        "cascade.flows.1.means",
        "cascade.regular.lin_x.weight",
    } <= set(state)
    assert torch.isfinite(state["cascade.thresholds"]).all()
    # the frozen backbone is the stage-1 one
    s1 = load_checkpoint(dlsa_run / "checkpoints" / "stage_features.pt")["method"]
    assert all(torch.equal(v, state[k]) for k, v in s1.items() if k.startswith("model.backbone."))


def test_state_round_trips_through_a_checkpoint(dlsa_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_CACHE", str(dlsa_run.parent / "cache"))
    a = load_trained(dlsa_run)
    feats = torch.randn(50, a.method.model.feature_dim).abs()
    before = a.method.predict_features(feats)
    path = tmp_path / "x.pt"
    save_checkpoint(path, method=a.method.state_dict())
    b = load_trained(dlsa_run)
    with torch.no_grad():  # scramble, then restore from the file
        for p in b.method.cascade.parameters():
            p.add_(1.0)
        b.method.cascade.thresholds.add_(1.0)
    assert not torch.equal(b.method.predict_features(feats), before)
    b.method.load_state_dict(load_checkpoint(path)["method"])
    b.method.eval()
    assert torch.equal(b.method.predict_features(feats), before)
    assert torch.equal(b.method.routes(feats), a.method.routes(feats))
    # re-evaluating the saved run gives the recorded metrics
    assert main(["eval", str(dlsa_run), "--split", "test", "--no-write"]) == 0
    m = json.loads((dlsa_run / "metrics.json").read_text())["splits"]["test"]
    from longtail.engine.evaluate import evaluate_split

    again = evaluate_split(a.method, a.loader, "test", a.cfg.eval, a.cfg.amp)
    assert again["top1"] == m["top1"] and again["routes"] == m["routes"]


def test_dlsa_stage_needs_zero_epochs_and_a_backbone(image_folder, tmp_path):
    raw = tiny_raw(image_folder, epochs=1)
    raw["stages"].append({"name": "dlsa", "method": TINY_DLSA, "epochs": 2, "init_from": "main"})
    with pytest.raises(ValueError, match="set its epochs to 0"):
        train(build_config(raw), out=tmp_path / "a", progress=False)
    raw = tiny_raw(image_folder)
    raw["stages"] = [{"name": "dlsa", "method": TINY_DLSA, "epochs": 0}]
    with pytest.raises(ValueError, match="init_from"):
        train(build_config(raw), out=tmp_path / "b", progress=False)


def test_features_are_written_and_reused(dlsa_run, monkeypatch):
    monkeypatch.setenv("LONGTAIL_CACHE", str(dlsa_run.parent / "cache"))
    assert main(["features", str(dlsa_run), "--split", "train,test", "--quiet"]) == 0
    f, lab = load_features(dlsa_run, "train")
    assert f.shape == (35, 32) and isinstance(f, __import__("numpy").memmap)
    assert sorted(lab.tolist()) == [0] * 24 + [1] * 8 + [2] * 3
    run = load_trained(dlsa_run)
    ref, ref_y = run.method.split_features(run.loader, "train")
    torch.testing.assert_close(torch.from_numpy(f.copy()), ref)
    assert torch.equal(torch.from_numpy(lab), ref_y)
    path = feature_paths(dlsa_run, "train")[0]
    mtime = path.stat().st_mtime_ns
    assert main(["features", str(dlsa_run), "--split", "train", "--quiet"]) == 0
    assert path.stat().st_mtime_ns == mtime  # current: re-used
    final = dlsa_run / "checkpoints" / "final.pt"
    st = final.stat()
    os.utime(final, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "new weights": stale, extracted again
    assert main(["features", str(dlsa_run), "--split", "train", "--quiet"]) == 0
    assert path.stat().st_mtime_ns != mtime
    assert not list(path.parent.glob(".*tmp"))  # no temporary files left


def test_feature_quality_report(dlsa_run, capsys, monkeypatch):
    monkeypatch.setenv("LONGTAIL_CACHE", str(dlsa_run.parent / "cache"))
    assert (
        main(
            ["eval", str(dlsa_run), "--feature-quality", "--set", "method.clusters=3", "--set", "method.flow_epochs=1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test: filtered (CAC)" in out and "purity > 0.9" in out
    fq = json.loads((dlsa_run / "metrics.json").read_text())["feature_quality"]["test"]
    assert fq["options"]["clusters"] == 3 and fq["options"]["max_depth"] == 1
    assert fq["filtered"]["num_samples"] + fq["rest"]["num_samples"] == 12
    assert sum(fq["clusters"][k] for k in ("empty",)) + fq["clusters"]["purity_gt_0.5"] <= 3
    assert sum(v for v in fq["composition"]["train_all"].values()) == pytest.approx(100, abs=0.1)
    assert main(["eval", str(dlsa_run), "--feature-quality", "--set", "optim.lr=1"]) == 2  # not a dlsa option


@pytest.mark.parametrize("name", ["cifar10_lt_crt_on_run", "cifar10_lt_bs_on_run"])
def test_benchmark_stage2_configs_validate(name):
    from pathlib import Path

    from longtail.config import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / f"{name}.yaml", ["init_from=/runs/ce"]
    )
    assert len(cfg.stages) == 1 and cfg.stages[0].method["name"] == "crt" and cfg.stages[0].init_from == "/runs/ce"
