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
from longtail.config import ConfigError  # noqa: E402
from longtail.engine import train  # noqa: E402
from longtail.engine.build import build_config  # noqa: E402  (names and method options resolved)
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from longtail.engine.features import feature_paths, load_features  # noqa: E402
from longtail.engine.inference import load_trained  # noqa: E402
from longtail.methods.dlsa import DLSACascade, DLSAConfig, FlowGMM, resolve_center_std  # noqa: E402
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


# ----------------------------------------------------------------------------- CIFAR adaptations


def _grid_cascade(flow_lr, dim=6, **opts):
    """A depth-1 cascade on the blobs, its flows and heads initialised from seed 0 (zuko uses the global RNG)."""
    cfg = DLSAConfig(**{"max_depth": 1, "clusters": 6, "flow_epochs": 3, "flow_batch_size": 32, "head_epochs": 2,
                        "max_cluster_size": 10**6, "flow_lr": flow_lr, **opts})
    torch.manual_seed(0)
    return DLSACascade(dim, 4, cfg, torch.tensor([120, 50, 20, 8]))


def test_flow_lr_grid_keeps_the_best_purity_candidate_and_skips_a_diverging_one(caplog):
    x, y = blobs()
    casc = _grid_cascade([1e-5, 0.05, 1e9, 0.5])
    with caplog.at_level("WARNING", logger="longtail"):
        st = casc.fit(x, y)["stages"][0]
    rows = st["flow_lr_grid"]
    assert [r["lr"] for r in rows] == [1e-5, 0.05, 1e9, 0.5]
    assert rows[2]["diverged"] and rows[2]["diverged_epoch"] == 1 and "flow lr 1e+09 diverged" in caplog.text
    ok = [r for r in rows if not r["diverged"]]
    assert all(len(r["epochs"]["loss"]) == 3 and r["flow_epoch"] in (1, 2, 3) for r in ok)
    best = max(ok, key=lambda r: (r["qualified"], r["pure_clusters"], r["purity"]))  # the documented key
    assert st["flow_lr"] == best["lr"] and st["purity"] == best["purity"] and st["flow_epoch"] == best["flow_epoch"]
    assert st["flow_lr"] != 1e-5 and st["purity"] > rows[0]["purity"]  # an lr that trains beats one that cannot
    # the kept flow is exactly the one training with that lr alone gives (same start, same pair stream)
    alone = _grid_cascade(st["flow_lr"])
    alone.fit(x, y)
    assert torch.equal(casc.thresholds, alone.thresholds)
    for k, v in alone.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(casc.state_dict()[k], v), k


@pytest.mark.parametrize("mode", ["pure_clusters", "purity", "last"])
def test_flow_select_keeps_the_epoch_its_criterion_ranks_first(mode):
    """pure_clusters (the reference's R), purity or last: the kept epoch is the first best of that criterion over
    the epochs' history, and the flow training itself does not depend on the choice."""
    x, y = blobs()
    st = _grid_cascade(0.05, flow_epochs=6, clusters=10, flow_select=mode).fit(x, y)["stages"][0]
    hist = st["flow_lr_grid"][0]["epochs"] if "flow_lr_grid" in st else st["flow_epochs"]
    want = {"pure_clusters": hist["pure_clusters"].index(max(hist["pure_clusters"])) + 1,
            "purity": hist["purity"].index(max(hist["purity"])) + 1, "last": 6}[mode]
    assert st["flow_epoch"] == want
    default = _grid_cascade(0.05, flow_epochs=6, clusters=10).fit(x, y)["stages"][0]
    assert (default["flow_lr_grid"][0]["epochs"] if "flow_lr_grid" in default else default["flow_epochs"]) == hist
    with pytest.raises(ValueError, match="flow_select must be one of pure_clusters, purity, last"):
        DLSAConfig(flow_select="best")


def test_a_diverging_flow_lr_alone_or_a_whole_diverging_grid_is_one_error():
    x, y = blobs()
    with pytest.raises(FloatingPointError, match=r"lower method.flow_lr \(1e\+09\)"):
        _grid_cascade(1e9).fit(x, y)
    with pytest.raises(FloatingPointError, match=r"every flow_lr candidate diverged \(\[1e\+09, 1e\+10\]\)"):
        _grid_cascade([1e9, 1e10]).fit(x, y)


def test_center_std_auto_keeps_the_reference_spread_per_latent_dimension():
    assert resolve_center_std("auto", 2048) == pytest.approx(0.05)  # the reference's value at its dimension
    assert resolve_center_std("auto", 128) == pytest.approx(0.2)  # 0.05 * sqrt(2048 / 128)
    assert resolve_center_std(0.3, 128) == 0.3
    casc = _grid_cascade(0.05, dim=8, center_std="auto")
    ref = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 0.05 * 16  # sqrt(2048 / 8) = 16
    torch.testing.assert_close(casc.flows[0].means, ref)
    # the rule is on the channels the flow models: 2 of 10 dead -> 0.05 * sqrt(2048 / 8) = 0.8 again
    x, y = blobs(dim=8)
    x = torch.cat([x, torch.zeros(len(x), 2)], 1)
    casc = _grid_cascade(0.05, dim=10, center_std="auto", dead_channel_tol=1e-3)
    rep = casc.fit(x, y)
    assert casc.flows[0].means.shape == (6, 8) and rep["center_std"] == pytest.approx(0.8)


def test_dead_channels_are_left_out_of_the_flows_at_fit_and_predict(tmp_path):
    x, y = blobs()
    g = torch.Generator().manual_seed(3)
    nearly = (torch.rand(len(x), 1, generator=g) < 0.01) * 1e-4  # a channel non-zero on ~2 images
    x = torch.cat([torch.zeros(len(x), 2), x[:, :3], nearly, x[:, 3:], torch.full((len(x), 1), 0.7)], 1)  # (N, 10)
    casc = _grid_cascade(0.05, dim=10, dead_channel_tol=1e-3)
    rep = casc.fit(x, y)
    assert rep["dead_channels"] == 4 and rep["dead_channel_ids"] == [0, 1, 5, 9] and rep["flow_dim"] == 6
    assert rep["constant_channels"] == 3 and casc.live_channels.sum() == 6 and casc.flows[0].dim == 6
    assert torch.isfinite(casc.thresholds).all()
    casc.eval()
    test = torch.randn(40, 10) * 3
    routes, scores = casc.cascade(test)
    moved = test.clone()
    moved[:, [0, 1, 5, 9]] += 5.0  # the flows never see those channels: the routes stay, the heads' scores move
    assert torch.equal(casc.cascade(moved)[0], routes)
    # a fresh cascade (flows on all 10 channels) loads the fitted one from a checkpoint file and predicts the same
    save_checkpoint(tmp_path / "c.pt", method=casc.state_dict())
    fresh = _grid_cascade(0.05, dim=10, dead_channel_tol=1e-3)
    assert fresh.flows[0].dim == 10
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.pt")["method"])
    fresh.eval()
    assert fresh.flows[0].dim == 6 and fresh.report == rep
    r2, s2 = fresh.cascade(test)
    assert torch.equal(r2, routes) and torch.equal(s2, scores)
    # z_source=flow_latent: the latent is zero on the dropped channels, so the heads keep their shapes
    lat = _grid_cascade(0.05, dim=10, dead_channel_tol=1e-3, z_source="flow_latent")
    lat.fit(x, y)
    assert torch.isfinite(lat.eval().cascade(test)[1]).all()
    assert (lat.score_stage(0, test)[2][:, [0, 1, 5, 9]] == 0).all()


def test_constant_channels_are_kept_by_default_with_a_warning(caplog):
    x, y = blobs()
    x = torch.cat([x, torch.zeros(len(x), 1)], 1)
    casc = _grid_cascade(0.05, dim=7)
    with caplog.at_level("WARNING", logger="longtail"):
        rep = casc.fit(x, y)
    assert rep["dead_channels"] == 0 and rep["constant_channels"] == 1 and casc.flows[0].dim == 7
    assert "1 of 7 feature channels are constant" in caplog.text and "dead_channel_tol" in caplog.text


def test_checkpoints_from_before_dead_channels_still_load():
    casc, x, _, _ = fitted_cascade(depth=1)
    state = {k: v for k, v in casc.state_dict().items() if k not in ("live_channels", "_extra_state")}
    fresh = DLSACascade(x.shape[1], 4, casc.cfg, torch.bincount(blobs()[1]))
    fresh.load_state_dict(state)
    assert fresh.live_channels.all() and fresh.report == {}
    assert torch.equal(fresh.eval().cascade(x)[1], casc.cascade(x)[1])


def test_train_class_fractions_add_up_over_the_stages():
    casc, x, y, summary = fitted_cascade(depth=2)
    fr = torch.tensor([st["train_class_fraction"] for st in summary["stages"]])  # (D+1, C)
    torch.testing.assert_close(fr.sum(0), torch.ones(4, dtype=fr.dtype), atol=1e-3, rtol=0)
    routes, _ = casc.cascade(x)  # the training set routes as in training
    for d in range(3):
        expect = torch.bincount(y[routes == d], minlength=4) / torch.bincount(y)
        torch.testing.assert_close(fr[d], expect.to(fr.dtype), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "opt, match",
    [
        ("flow_lr=[]", "flow_lr must be a positive number or a non-empty list"),
        ("flow_lr=[0.1,0.1]", "list of distinct ones"),
        ("flow_lr=-0.1", "flow_lr must be a positive number"),
        ("flow_lr=fast", "expected a number"),
        ("center_std=big", "center_std must be a positive number or auto, got 'big'"),
        ("center_std=0", "center_std must be a positive number or auto, got 0"),
        ("dead_channel_tol=1.5", r"dead_channel_tol must be in \[0, 1\)"),
    ],
)
def test_bad_new_options_are_one_line_errors(opt, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_config({"stages": [{"method": {"name": "dlsa"}}]}, [f"stages.0.method.{opt}"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="flow_batch_norm=true"):
        DLSAConfig(center_std="auto", flow_batch_norm=False)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dlsa_run(tmp_path_factory):
    """A tiny 2-stage run (ce 1 epoch, then dlsa depth 2 with an lr grid, center_std auto and dead channels
    left out) trained through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("dlsa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGTAIL_CACHE", str(root / "cache"))
        folder = make_image_folder(
            root / "folder", {"train": {"ant": 24, "bee": 8, "cat": 3}, "test": {"ant": 4, "bee": 4, "cat": 4}}
        )
        raw = tiny_raw(folder, epochs=1)
        raw["stages"][0]["name"] = "features"
        method = {**TINY_DLSA, "flow_lr": [0.2, 0.05], "center_std": "auto", "dead_channel_tol": 1e-3}
        raw["stages"].append({"name": "dlsa", "method": method, "epochs": 0, "init_from": "features"})
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


def test_metrics_json_has_the_method_report_and_per_class_route_fractions(dlsa_run, monkeypatch):
    m = json.loads((dlsa_run / "metrics.json").read_text())
    rep = m["method_report"]
    assert rep["feature_dim"] == 32 and rep["flow_dim"] + rep["dead_channels"] == 32
    assert len(rep["dead_channel_ids"]) == rep["dead_channels"] and rep["center_std"] > 0
    stages = rep["stages"]
    assert [st["stage"] for st in stages] == [1, 2, "regular"]
    for st in stages[:2]:
        assert st["flow_lr"] in (0.2, 0.05) and 1 <= st["flow_epoch"] <= 2
        assert [r["lr"] for r in st["flow_lr_grid"]] == [0.2, 0.05]
        assert all(set(r["epochs"]) == {"loss", "train_llh", "pure_clusters", "purity"} for r in st["flow_lr_grid"])
    # per class, the stages' training fractions add up to 1 (3 classes, all with training images)
    fr = torch.tensor([st["train_class_fraction"] for st in stages])
    torch.testing.assert_close(fr.sum(0), torch.ones(3, dtype=fr.dtype), atol=1e-3, rtol=0)
    # and the test routes' class fractions too (4 test images per class)
    tf = torch.tensor([r["class_fraction"] for r in m["splits"]["test"]["routes"]])
    torch.testing.assert_close(tf.sum(0), torch.ones(3, dtype=tf.dtype), atol=1e-3, rtol=0)
    assert all(abs(v * 4 - round(v * 4)) < 1e-3 for v in tf.flatten().tolist())  # k of a class's 4 images
    # the report is part of the checkpoint: a reloaded run reports the same
    monkeypatch.setenv("LONGTAIL_CACHE", str(dlsa_run.parent / "cache"))
    assert json.loads(json.dumps(load_trained(dlsa_run).method.report())) == rep


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


def test_feature_quality_is_one_report_per_feature_set():
    """The report depends on the features and the options (their seed), not on torch's global generator, which
    it leaves as it found it (the flows' and heads' initial weights once made two runs of --feature-quality
    differ)."""
    from longtail.methods.dlsa import DLSAConfig, evaluate_features

    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([200, 100, 50, 25])])
    yt = torch.arange(4).repeat_interleave(20)
    x = torch.randn(len(y), 8, generator=g) + 3 * torch.nn.functional.one_hot(y, 8).float()
    xt = torch.randn(len(yt), 8, generator=g) + 3 * torch.nn.functional.one_hot(yt, 8).float()
    cfg = DLSAConfig(clusters=6, flow_epochs=2, head_epochs=2, flow_lr=[0.02])
    reports = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        reports.append(evaluate_features(x, y, xt, yt, 4, None, cfg))
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())  # untouched
    assert reports[0] == reports[1]


@pytest.mark.parametrize("name", ["cifar10_lt_crt_on_run", "cifar10_lt_bs_on_run"])
def test_benchmark_stage2_configs_validate(name):
    from pathlib import Path

    from longtail.engine.build import load_config

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / f"{name}.yaml", ["init_from=/runs/ce"]
    )
    assert len(cfg.stages) == 1 and cfg.stages[0].method["name"] == "crt" and cfg.stages[0].init_from == "/runs/ce"
