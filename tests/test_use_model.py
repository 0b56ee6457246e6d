"""Using a trained model (issue 16): run folders that stand alone, batch prediction, export, plugins."""

import csv
import json
import logging
import shutil
import sys

import pytest
import torch
import yaml
from torchvision.io import read_image

import longtail
from conftest import make_image_folder
from longtail import plugins
from longtail.cli import main
from longtail.engine import train
from longtail.engine.build import build_config
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.export import ExportError, check_export, export_model
from longtail.engine.inference import load_model, load_trained
from longtail.errors import ConfigError, DataError, UsageError
from longtail.registry import BACKBONES, METHODS
from longtail.utils import atomic_torch_save
from test_engine_cli import tiny_raw

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

COUNTS = {"train": {"ant": 24, "bee": 8, "cat": 3}, "test": {"ant": 4, "bee": 4, "cat": 4}}

# ----------------------------------------------------------------------------- every method, exported

# The library's own methods (a test file may register more, e.g. test_engine_cli's `interrupt_test`).
METHOD_NAMES = sorted(n for n in METHODS if METHODS.get(n).__module__.startswith("longtail."))
TINY_OPTIONS = {  # options that keep a method's fit to a fraction of a second on 35 images
    "dlsa": {"name": "dlsa", "max_depth": 2, "clusters": 2, "flow_epochs": 1, "flow_batch_size": 16, "head_epochs": 1,
             "head_batch_size": 8, "head_lr": 0.05, "max_cluster_size": 1000, "dead_channel_tol": 1e-3},
    "ifl": {"name": "ifl", "base": "logit_adjust_posthoc", "center_milestones": [0.0], "center_weights": [0.0, 0.01],
            "update_milestones": [0.0]},
    "ldam_drw": {"name": "ldam_drw", "drw_epoch": 0},
    "logit_adjust_posthoc": {"name": "logit_adjust_posthoc", "tau": 1.5},
    "tau_norm": {"name": "tau_norm", "tau": 0.7},
    "tde": {"name": "tde", "alpha": 1.5},
}


def method_raw(name: str, root) -> dict:
    """A tiny recipe that leaves ``name``'s prediction-time state non-trivial: a post-hoc method (no training of its
    own) as stage 2 on a CE stage; every other method trained for two epochs."""
    cls = METHODS.get(name)
    spec = TINY_OPTIONS.get(name, {"name": name})
    raw = tiny_raw(root, epochs=2, method=name)
    raw["eval"]["plots"] = False
    raw["model"]["head"] = cls.requires_head or "linear"
    raw["stages"][0]["method"] = spec
    if not cls.trains:
        raw["stages"][0]["method"] = {"name": "ce"}
        raw["stages"][0]["name"] = "features"
        raw["stages"].append({**raw["stages"][0], "name": "second", "method": spec, "epochs": 0,
                              "init_from": "features"})
    return raw


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("use_model")
    folder = make_image_folder(root / "data", COUNTS)
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name == "dlsa":
                pytest.importorskip("zuko", reason="dlsa needs zuko (pip install 'longtail[flows]')")
            cache[name] = train(build_config(method_raw(name, folder)), out=root / name, progress=False)
        return cache[name]

    get.folder = folder
    return get


def _test_images(folder) -> torch.Tensor:
    """(12, 3, 16, 16) uint8: the test images as they are."""
    return torch.stack([read_image(str(p)) for p in sorted((folder / "test").rglob("*.png"))])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_export_reproduces_predict_for_every_method(method_runs, tmp_path, name, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'longtail[export]')")
        ort = pytest.importorskip("onnxruntime", reason="checking an ONNX file needs onnxruntime")
    run = method_runs(name)
    model = load_model(run)
    out = model.export(tmp_path / f"{name}.{'pt' if fmt == 'torchscript' else 'onnx'}", format=fmt)
    images = torch.cat([_test_images(method_runs.folder),
                        torch.randint(0, 256, (5, 3, 16, 16), generator=torch.Generator().manual_seed(3),
                                      dtype=torch.uint8)])
    expected = model.logits(images)  # (17, 3): what predict scores with
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(images)
        assert not got.requires_grad  # an inference-only module
    else:
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))
    assert torch.equal(got.argmax(1), expected.argmax(1))
    rec = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert rec["class_names"] == ["ant", "bee", "cat"] and rec["input"] == "uint8" and rec["image_size"] == 16
    assert rec["method"]["name"] == name


def test_prediction_time_state_is_in_the_export(method_runs, tmp_path):
    # TDE's alpha, tau-norm's tau and post-hoc logit adjustment's tau change the exported scores: they are baked in.
    images = _test_images(method_runs.folder)
    for name, option in (("tde", "alpha"), ("tau_norm", "tau"), ("logit_adjust_posthoc", "tau")):
        run = method_runs(name)
        a = torch.jit.load(str(load_model(run).export(tmp_path / f"{name}_a.pt")))(images)
        other = load_model(run, [f"method.{option}=0"])
        b = torch.jit.load(str(other.export(tmp_path / f"{name}_b.pt")))(images)
        assert not torch.allclose(a, b), name
        torch.testing.assert_close(b, other.logits(images), rtol=1e-4, atol=1e-4)


def test_dlsa_export_routes_like_the_cascade(method_runs):
    pytest.importorskip("zuko")
    model = load_model(method_runs("dlsa"))
    images = torch.cat([_test_images(method_runs.folder)] * 3)
    x = model.normalize(images)
    with torch.no_grad():
        feats = model.method.model.forward_features(x)
        routes = model.method.routes(feats)
        dense = model.method.inference_module().eval()(x)
    assert len(set(routes.tolist())) >= 2  # the cascade answers these images with more than one head
    torch.testing.assert_close(dense, model.method.predict(x), rtol=1e-5, atol=1e-5)


def test_export_inputs_float_and_normalized(method_runs, tmp_path):
    model = load_model(method_runs("tde"))
    images = _test_images(method_runs.folder)
    expected = model.logits(images)
    f = torch.jit.load(str(model.export(tmp_path / "f.pt", input="float")))
    torch.testing.assert_close(f(images.float() / 255), expected, rtol=1e-4, atol=1e-4)
    n = torch.jit.load(str(model.export(tmp_path / "n.pt", input="normalized")))
    torch.testing.assert_close(n(model.normalize(images)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match="unknown export format"):
        export_model(model, format="tflite")
    with pytest.raises(UsageError, match="unknown export input"):
        export_model(model, input="bgr")


def test_onnx_export_without_onnx_says_what_to_install(method_runs, tmp_path, monkeypatch):
    model = load_model(method_runs("ce"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails
    with pytest.raises(UsageError, match="pip install 'longtail\\[export\\]'"):
        model.export(tmp_path / "m.onnx", format="onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_module_that_does_not_reproduce_predict():
    ref = torch.zeros(3, 2)
    with pytest.raises(ExportError, match="does not reproduce predict"):
        check_export(lambda x: torch.ones(3, 2), ref, torch.zeros(3), "export of x")
    with pytest.raises(ExportError, match="gives \\(2, 2\\) scores"):
        check_export(lambda x: torch.zeros(2, 2), ref, torch.zeros(3), "export of x")
    assert check_export(lambda x: ref.clone(), ref, torch.zeros(3), "export of x") == 0


# ----------------------------------------------------------------------------- the run folder stands alone


def test_moved_run_without_its_data_predicts_a_folder_and_exports(tmp_path, monkeypatch, capsys):
    """Issue 16's 'done when': train, move the run folder, delete the training data; predict (folder in, CSV out)
    and export still work from the moved folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    make_image_folder(work / "data", COUNTS)
    raw = tiny_raw("data", epochs=2)  # a relative data.root: stored absolute
    cfg_path = work / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), "--out", "run", "--quiet"]) == 0
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"]["root"] == str(work / "data")
    test_top1 = json.loads((work / "run" / "metrics.json").read_text())["splits"]["test"]["top1"]

    photos = tmp_path / "photos"  # the test images, kept elsewhere; then the data and the old place are gone
    shutil.copytree(work / "data" / "test", photos)
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(str(work / "run"), moved)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(moved), "--split", "test", "--no-write"]) == 0  # from anywhere: data.root is absolute
    shutil.rmtree(work)
    capsys.readouterr()

    assert main(["predict", str(moved), str(photos), "--out", "preds.csv", "--batch-size", "5", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "12 predictions written to preds.csv" in printed and "accuracy on the 12 labelled images" in printed
    rows = list(csv.DictReader((tmp_path / "preds.csv").open()))
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", *(f"{k}_{i}" for i in (1, 2, 3)
                                                                       for k in ("class", "prob"))}
    assert {r["label"] for r in rows} == {"ant", "bee", "cat"}
    # The same images, the same preprocessing, the same weights: the accuracy of the run's own evaluation.
    top1 = 100 * sum(r["class_1"] == r["label"] for r in rows) / len(rows)
    assert top1 == pytest.approx(test_top1)
    assert f"top1 {test_top1:.2f}" in printed
    for r in rows:
        assert sum(float(r[f"prob_{i}"]) for i in (1, 2, 3)) == pytest.approx(1, abs=1e-4)

    assert main(["export", str(moved)]) == 0
    assert (moved / "export" / "model.pt").is_file() and (moved / "export" / "model.pt.json").is_file()
    scripted = torch.jit.load(str(moved / "export" / "model.pt"))
    images = torch.stack([read_image(r["path"]) for r in rows])
    assert [longtail.load_model(moved).class_names[i] for i in scripted(images).argmax(1)] == \
        [r["class_1"] for r in rows]
    if _has("onnx") and _has("onnxruntime"):
        assert main(["export", str(moved), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
        assert json.loads((tmp_path / "m.onnx.json").read_text())["class_names"] == ["ant", "bee", "cat"]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_predict_takes_paths_folders_list_files_tensors_and_pil_images(image_folder, tmp_path):
    run = train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "run", progress=False)
    model = load_model(run)
    files = sorted((image_folder / "test").rglob("*.png"))
    by_path = model.predict([str(p) for p in files], topk=2)
    assert len(by_path) == 12 and all(len(t) == 2 for t in by_path)
    assert model.predict(image_folder / "test", topk=2) == by_path  # a folder: recursive, sorted
    batch = torch.stack([read_image(str(p)) for p in files])
    from_tensor = model.predict(batch, topk=2)
    assert [[c for c, _ in t] for t in from_tensor] == [[c for c, _ in t] for t in by_path]
    torch.testing.assert_close(model.logits(batch), model.logits(files))
    torch.testing.assert_close(model.logits(batch.float() / 255), model.logits(batch), rtol=1e-4, atol=1e-4)
    from PIL import Image

    pil = Image.open(files[0]).convert("L")  # any mode: converted to RGB
    assert len(model.predict(pil, topk=1)) == 1
    big = torch.nn.functional.interpolate(batch[:2].float(), size=40).to(torch.uint8)  # resized like the run's data
    assert model.logits(big).shape == (2, 3)
    # streaming: batches of at most batch_size, in order
    sizes = [len(s) for s, _ in model.batches(image_folder / "test", batch_size=5)]
    assert sizes == [5, 5, 2]
    # a list file: paths relative to it, labels by name or index
    lst = image_folder / "some.txt"
    lst.write_text(f"# comment\n{files[0].relative_to(image_folder)} ant\n\n{files[-1]} 2\n{files[5]}\n")
    from longtail.engine.inference import collect_inputs

    samples = collect_inputs(lst, model.class_names)
    assert [s.label for s in samples] == [0, 2, None] and samples[2].source == str(files[5])
    with pytest.raises(UsageError, match="topk must be at least 1"):
        model.predict(files[0], topk=0)
    with pytest.raises(UsageError, match="raw images in \\[0, 1\\]"):
        model.predict(model.normalize(batch))
    with pytest.raises(UsageError, match="cannot predict a dict"):
        model.predict({"a": 1})


def test_predict_cli_json_and_its_errors(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(build_config(tiny_raw(image_folder, epochs=1)), out=run, progress=False)
    out = tmp_path / "p.json"
    assert main(["predict", str(run), str(image_folder / "test"), "--out", str(out), "--topk", "9",
                 "--num-workers", "0", "--quiet"]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["predictions"]) == 12 and len(rec["predictions"][0]["topk"]) == 3  # topk capped at C
    assert rec["metrics"]["num_samples"] == 12 and {"many", "medium", "few", "top1"} <= set(rec["metrics"])
    capsys.readouterr()
    img = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(run), str(img), "--topk", "2", "--quiet"]) == 0  # no --out: printed
    assert capsys.readouterr().out.strip().count("%") == 2

    bad = tmp_path / "bad"
    (bad / "ant").mkdir(parents=True)
    shutil.copy(img, bad / "ant" / "ok.png")
    (bad / "ant" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "labels.txt").write_text(f"{img} zebra\n")
    cases = [  # (inputs, flags, message)
        ([img], ["--topk", "0"], "--topk must be at least 1"),
        ([img], ["--batch-size", "0"], "--batch-size must be at least 1"),
        ([img], ["--out", str(tmp_path / "p.txt")], "a .csv or .json file"),
        ([tmp_path / "nowhere.png"], [], "no such image, folder or list file"),
        ([tmp_path / "empty"], [], "no images"),
        ([tmp_path / "notes.md"], [], "neither an image"),
        ([tmp_path / "labels.txt"], [], "label 'zebra' is neither"),
        ([bad], ["--num-workers", "2", "--out", str(tmp_path / "p.csv")], "broken.png: cannot decode image"),
    ]
    for inputs, flags, message in cases:
        assert main(["predict", str(run), *map(str, inputs), *flags, "--quiet"]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (flags, err)
    assert not list(tmp_path.glob(".p.*.tmp")) and not (tmp_path / "p.csv").exists()  # nothing half-written


def test_a_run_from_before_the_inference_record_still_loads(image_folder, tmp_path, caplog):
    run = train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "run", progress=False)
    expected = load_model(run).logits(image_folder / "test")
    final = run / "checkpoints" / "final.pt"
    ckpt = load_checkpoint(final)
    assert set(ckpt["inference"]) >= {"class_names", "image_size", "mean", "std", "preprocess", "train_counts"}
    del ckpt["inference"]  # as final.pt was written before it existed
    atomic_torch_save(ckpt, final)
    with caplog.at_level(logging.WARNING, logger="longtail"):
        old = load_model(run)
    assert "predates the inference record" in caplog.text
    torch.testing.assert_close(old.logits(image_folder / "test"), expected)
    assert load_trained(run).model.info == old.info  # eval's path: from the data, as before
    shutil.rmtree(image_folder / "train")
    with pytest.raises(DataError, match="trained before runs saved what prediction needs"):
        load_model(run)


def test_a_tde_run_with_alpha_val_predicts_and_exports_the_alpha_it_chose(tmp_path, caplog):
    """Issue 20 with issue 16: alpha chosen on val lives in the method's buffer chosen_alpha (final.pt), and
    load_model, predict and export use it; an alpha set to val afterwards is chosen on the run's val split."""
    from test_tde import _val_folder, _val_raw

    folder = _val_folder(tmp_path)
    raw = _val_raw(folder)  # alpha: val, the default
    raw["eval"]["plots"] = False
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    (choice,) = json.loads((run / "metrics.json").read_text())["chosen_on_val"]
    final = run / "checkpoints" / "final.pt"
    ckpt = load_checkpoint(final)
    assert float(ckpt["method"]["chosen_alpha"]) == choice["value"]
    assert load_model(run).method.alpha() == choice["value"]
    # Another stored choice than the fallback (1.0): a model that ignored the buffer would predict at 1.0.
    ckpt["method"]["chosen_alpha"].fill_(2.5)
    atomic_torch_save(ckpt, final)
    model = load_model(run)
    assert model.method.alpha() == 2.5 and model.choices == []  # nothing chosen again: the data is not read
    images = torch.stack([read_image(str(p)) for p in sorted((folder / "test").rglob("*.png"))])
    at = {a: load_model(run, [f"method.alpha={a}"]).logits(images) for a in (2.5, 1.0)}
    assert not torch.allclose(at[2.5], at[1.0])
    torch.testing.assert_close(model.logits(images), at[2.5])
    out = model.export(tmp_path / "tde.pt")
    torch.testing.assert_close(torch.jit.load(str(out))(images), at[2.5], rtol=1e-4, atol=1e-4)
    rec = json.loads((tmp_path / "tde.pt.json").read_text())
    assert rec["method"]["alpha"] == "val" and rec["prediction_options"] == {"alpha": 2.5}
    top = model.predict(images, topk=1)
    assert [t[0][0] for t in top] == [model.class_names[i] for i in at[2.5].argmax(1).tolist()]

    # A run trained at a fixed alpha, predicted with method.alpha=val: chosen now on its val split (read once).
    fixed = train(build_config({**raw, "stages": [{**raw["stages"][0], "method": {"name": "tde", "alpha": 1.0}}]}),
                  out=tmp_path / "fixed", progress=False)
    with caplog.at_level(logging.WARNING, logger="longtail"):
        chosen = load_model(fixed, ["method.alpha=val"])
    assert "chosen now on the run's val split" in caplog.text
    (c,) = chosen.choices
    assert c["option"] == "alpha" and c["split"] == "val" and chosen.method.alpha() == c["value"]
    torch.testing.assert_close(chosen.logits(images), load_model(fixed, [f"method.alpha={c['value']}"]).logits(images))
    shutil.rmtree(folder)  # the run folders alone
    with pytest.raises(DataError, match="give a number instead: --set method.alpha=V"):
        load_model(fixed, ["method.alpha=val"])
    assert load_model(run).method.alpha() == 2.5  # a stored choice needs no data


# ----------------------------------------------------------------------------- plugins


PLUGIN = """
import torch.nn as nn
from longtail.registry import BACKBONES


class PlugMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_dim = 8
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8), nn.ReLU())

    def forward(self, x):
        return self.net(x)


@BACKBONES.register("plug_mlp")
def plug_mlp():
    return PlugMLP()
"""


@pytest.fixture
def own_registries(monkeypatch):
    """Registrations of a test's plugins are undone after it."""
    from longtail import registry

    for reg in (registry.BACKBONES, registry.METHODS, registry.DATASETS, registry.HEADS, registry.SAMPLERS,
                registry.LOSSES):
        monkeypatch.setattr(reg, "_items", dict(reg._items))
        monkeypatch.setattr(reg, "_help", dict(reg._help))
    monkeypatch.setattr(plugins, "_loaded", {})
    yield


def test_plugin_module_from_the_command_line_is_recorded_and_required(image_folder, tmp_path, monkeypatch, capsys,
                                                                      own_registries):
    src = tmp_path / "plugsrc"
    src.mkdir()
    (src / "lt_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(src))
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=1)))
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "model.backbone=plug_mlp", "--out", str(run), "--quiet"]) == 2
    assert "unknown backbone 'plug_mlp'" in capsys.readouterr().err
    assert main(["train", str(cfg_path), "model.backbone=plug_mlp", "--out", str(run), "--quiet",
                 "--plugin", "lt_test_plugin"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == ["lt_test_plugin"]
    capsys.readouterr()
    img = next((image_folder / "test" / "ant").iterdir())
    assert main(["predict", str(run), str(img), "--quiet"]) == 0  # the recorded plugin is imported again
    assert main(["eval", str(run), "--no-write"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["list", "--plugin", "lt_test_plugin"]) == 0
    listed = capsys.readouterr().out  # the static catalogue, then what the plugin registered
    assert "  plug_mlp " in listed and "(plugin lt_test_plugin)" in listed and "  resnet32 " in listed
    # On a machine without the plugin: a one-line error naming it.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(src)])
    monkeypatch.delitem(sys.modules, "lt_test_plugin")
    monkeypatch.setattr(plugins, "_loaded", {})
    assert main(["predict", str(run), str(img), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'lt_test_plugin' cannot be imported" in err and f"the run {run}" in err and err.count("\n") == 1
    # A run that does not record its plugin (trained from a script that registered the backbone itself).
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "plugins": []}))
    del BACKBONES._items["plug_mlp"]  # own_registries: restored after the test
    assert main(["predict", str(run), str(img), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'plug_mlp'" in err and "--plugin MODULE" in err and err.count("\n") == 1


def test_entry_point_plugins_and_components_of_a_script(tmp_path, monkeypatch, own_registries):
    site = tmp_path / "site"
    (site / "lt_ep_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "lt_ep_plugin.py").write_text(PLUGIN.replace("plug_mlp", "ep_mlp"))
    (site / "lt_ep_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: lt-ep-plugin\n"
                                                                  "Version: 0.1\n")
    (site / "lt_ep_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[longtail.plugins]\nmine = lt_ep_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    plugins.reset_entry_points()
    try:
        cfg = build_config({"model": {"backbone": "ep_mlp"}})  # resolving imports the installed entry points
        assert plugins.record_plugins(cfg) == [] and cfg.plugins == ["lt_ep_plugin"]
    finally:
        plugins.reset_entry_points()

    @BACKBONES.register("script_mlp")
    def script_mlp():  # pragma: no cover - never built
        raise AssertionError

    script_mlp.__module__ = "__main__"
    cfg = build_config({"model": {"backbone": "script_mlp"}})
    notes = plugins.record_plugins(cfg)
    assert cfg.plugins == [] and len(notes) == 1 and "registered by a script (__main__)" in notes[0]
    with pytest.raises(ConfigError, match="not a file path"):
        plugins.load_plugin("my_plugin.py")
    with pytest.raises(ConfigError, match="has no function nope"):
        plugins.load_plugin("json:nope")


def test_config_paths_are_stored_absolute(tmp_path, monkeypatch):
    from longtail.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a 0\n")
    cfg = build_config({"data": {"name": "list_file", "root": "imgs", "train_list": "lists/train.txt",
                                 "test_list": "test.txt", "cache_dir": "~/c"},
                        "model": {"pretrained": "w/r.pth"}})
    absolute_paths(cfg)
    assert cfg.data.root == str(tmp_path / "imgs") and cfg.model.pretrained == str(tmp_path / "w" / "r.pth")
    assert cfg.data.options["train_list"] == str(tmp_path / "lists" / "train.txt")
    assert cfg.data.options["test_list"] == "test.txt"  # not here: a list under data.root
    assert not cfg.data.cache_dir.startswith("~")


def test_ifl_loads_without_its_training_set(method_runs):
    from types import SimpleNamespace

    from longtail.methods import MethodContext, create_method

    run = method_runs("ifl")
    model = load_model(run)  # built without data: its per-sample buffers take their size from final.pt
    assert model.method.env_weights.shape == (2, 35)
    state = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    torch.testing.assert_close(model.method.env_weights, state["env_weights"])
    # Built with a training set, an IFL keeps its size: a checkpoint of another training set is refused.
    ds = SimpleNamespace(train=SimpleNamespace(targets=torch.zeros(5, dtype=torch.int64)))
    ctx = MethodContext(num_classes=3, train_counts=torch.tensor([24, 8, 3]), epochs=1, steps_per_epoch=1,
                        device=torch.device("cpu"), dataset=ds)
    other = create_method(dict(TINY_OPTIONS["ifl"]), model.method.model, ctx)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)


def test_predict_keeps_the_runs_image_pixel_limit(image_folder, tmp_path):
    raw = tiny_raw(image_folder, epochs=1)
    raw["data"]["max_image_pixels"] = 300  # the 16x16 training images pass, a 32x32 one does not
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    model = load_model(run)
    big = tmp_path / "big.png"
    from torchvision.io import write_png

    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(big))
    with pytest.raises(DataError, match=r"32x32 pixels, above data.max_image_pixels=300"):
        model.predict([str(big)])
    assert len(model.predict(sorted((image_folder / "test").rglob("*.png"))[:2])) == 2
