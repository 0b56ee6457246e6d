"""The fit loop end to end on a tiny image folder: determinism, resume, stages, the CLI commands."""

import json

import pytest
import torch
import yaml

from longtail.cli import main
from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint
from longtail.registry import METHODS


def tiny_raw(root, epochs=3, method="ce", **method_opts):
    return {
        "name": "tiny", "seed": 0,
        "data": {"name": "image_folder", "root": str(root), "image_size": 16, "in_memory": "always",
                 "augment": "cifar"},
        "model": {"backbone": "tiny"},
        "stages": [{"name": "main", "method": {"name": method, **method_opts}, "epochs": epochs, "batch_size": 8,
                    "optim": {"lr": 0.05}, "schedule": {"name": "cosine", "warmup_epochs": 1}}],
        "eval": {"batch_size": 16, "many_above": 20, "few_below": 5},
    }


def final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "final.pt")["method"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_folder_contents(image_folder, tmp_path):
    run = train(build_config(tiny_raw(image_folder)), out=tmp_path / "run", progress=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["seed"] == 0 and {"torch", "torchvision", "commit", "longtail", "device"} <= set(cfg["meta"])
    m = json.loads((run / "metrics.json").read_text())
    test = m["splits"]["test"]
    assert {"top1", "many", "medium", "few", "per_class", "precision"} <= set(test)
    assert len(test["per_class"]) == 3 and m["train_counts"] == [24, 8, 3]
    assert (run / "train.log").read_text().count("epoch") >= 3
    assert {"final.pt", "last.pt", "stage_main.pt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    plots = {p.name for p in (run / "plots").iterdir()}
    assert {"per_class_test.png", "shots.png", "confusion_test.png"} <= plots


def test_training_is_deterministic(image_folder, tmp_path):
    a = train(build_config(tiny_raw(image_folder, epochs=2)), out=tmp_path / "a", progress=False)
    b = train(build_config(tiny_raw(image_folder, epochs=2)), out=tmp_path / "b", progress=False)
    assert_same_state(final_weights(a), final_weights(b))
    c = train(build_config(tiny_raw(image_folder, epochs=2), ["seed=1"]), out=tmp_path / "c", progress=False)
    assert not torch.equal(final_weights(a)["model.head.fc.weight"], final_weights(c)["model.head.fc.weight"])


def test_resume_after_sigint_matches_uninterrupted_run(image_folder, tmp_path, interrupt_method):
    ref = train(build_config(tiny_raw(image_folder)), out=tmp_path / "ref", progress=False)
    cfg = build_config(tiny_raw(image_folder, method="interrupt_test", at_step=6))  # epoch 2, mid-epoch (4 steps/epoch)
    with pytest.raises(Interrupted, match="--resume"):
        train(cfg, out=tmp_path / "int", progress=False)
    state = load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"]
    assert state == {"stage": 0, "epoch": 1, "step": 2}
    assert not (tmp_path / "int" / "metrics.json").exists()
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))
    ref_m = json.loads((ref / "metrics.json").read_text())["splits"]["test"]
    res_m = json.loads((resumed / "metrics.json").read_text())["splits"]["test"]
    assert ref_m["per_class"] == res_m["per_class"]


def test_a_test_only_method_is_registered_for_its_test_only(interrupt_method):
    assert METHODS.get("interrupt_test") is interrupt_method


def test_no_test_only_method_outside_its_test():
    assert "interrupt_test" not in METHODS  # conftest's interrupt_method removed it when its test ended


def test_file_dataset_path_trains_and_predicts(image_folder, tmp_path):
    # Not in memory: DataLoader workers decode files and apply transforms v2.
    raw = tiny_raw(image_folder, epochs=1)
    raw["data"].update(in_memory="never", num_workers=0, augment="imagenet")
    run = train(build_config(raw), out=tmp_path / "files", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["splits"]["test"]["num_samples"] == 12
    from longtail.engine.inference import load_trained, predict_images

    top = predict_images(load_trained(run), [next((image_folder / "test" / "ant").iterdir())], topk=3)
    assert len(top[0]) == 3 and abs(sum(p for _, p in top[0]) - 1) < 1e-5


@pytest.mark.parametrize("sampler", ["class_balanced", "square_root", "progressive"])
def test_every_sampler_trains(image_folder, tmp_path, sampler):
    run = train(build_config(tiny_raw(image_folder, epochs=1), [f"stages.0.sampler={sampler}"]),
                out=tmp_path / sampler, progress=False)
    assert json.loads((run / "metrics.json").read_text())["splits"]["test"]["num_samples"] == 12


def test_refuses_to_overwrite_a_run(image_folder, tmp_path):
    train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match="finished run.*--overwrite"):
        train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "r", progress=False)


def test_two_stages_with_init_from(image_folder, tmp_path):
    raw = tiny_raw(image_folder, epochs=1)
    raw["stages"].append({**raw["stages"][0], "name": "second", "init_from": "main", "epochs": 1})
    run = train(build_config(raw), out=tmp_path / "two", progress=False)
    log = (run / "train.log").read_text()
    assert "stage main epoch 1/1" in log and "stage second epoch 1/1" in log
    assert (run / "checkpoints" / "stage_second.pt").exists()


def test_best_val_needs_val_split(image_folder, tmp_path):
    with pytest.raises(ValueError, match="val"):
        cfg = build_config(tiny_raw(image_folder, epochs=1), ["eval.select=best_val", "stages.0.eval_every=1"])
        train(cfg, out=tmp_path / "x", progress=False)


def test_best_val_selection(image_folder, tmp_path):
    cfg = build_config(tiny_raw(image_folder, epochs=2), ["eval.select=best_val", "data.val_fraction=0.2",
                                                          "stages.0.eval_every=1"])
    run = train(cfg, out=tmp_path / "bv", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["selected"].startswith("best val") and "val" in m["splits"]


def test_cli_train_eval_report_predict_list(image_folder, tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=1)))
    out = tmp_path / "cli"
    assert main(["train", str(cfg_path), "seed=2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top1" in printed and "many" in printed and str(out) in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 2

    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "test" in capsys.readouterr().out
    assert main(["eval", str(out), "--split", "nope"]) != 0

    assert main(["report", str(out), str(out)]) == 0
    assert capsys.readouterr().out.count("| cli ") == 2

    img = next((image_folder / "test" / "cat").iterdir())
    assert main(["predict", str(out), str(img), "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(img)) and line.count("%") == 2

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "quickstart" in listed and "resnet32" in listed and "ce " in listed


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "data.name=nope", "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["train", "data.imbalance_ration=3", "--quiet"]) == 2
    assert "did you mean 'imbalance_ratio'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a longtail run folder" in capsys.readouterr().err
    assert main(["train", "data.name=image_folder", f"data.root={tmp_path / 'nowhere'}", "--quiet",
                 "--out", str(tmp_path / "e2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_cli_times_both_loops_and_writes_json(image_folder, tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=5)))
    out = tmp_path / "bench.json"
    assert main(["bench", str(cfg), "--epochs", "2", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["images_per_s"] > 0 and rec["reference_images_per_s"] > 0
    assert rec["ratio_vs_reference"] == pytest.approx(rec["images_per_s"] / rec["reference_images_per_s"], rel=1e-2)
    assert rec["epochs_timed"] == 1 and rec["seed"] == 0 and rec["device"].startswith("cpu") and rec["command"]
    style, ceil = rec["reference_style"], rec["ceiling"]
    assert style["images_per_s"] > 0 and 0 < style["with_eval_images_per_s"] < style["images_per_s"]
    assert style["test_images_scored_per_epoch"] == 12  # the tiny folder's test split, scored after every epoch
    assert style["ours_over_it"] == pytest.approx(rec["images_per_s"] / style["images_per_s"], rel=1e-2)
    assert ceil["images_per_s"] > 0 and ceil["matmul_peak_gflops_fp32"] > 0 and ceil["flops_per_train_image"] > 0
    ours = ceil["throughput"]["ours"]
    assert ours["gflop_per_s"] == pytest.approx(rec["images_per_s"] * ceil["flops_per_train_image"] / 1e9, rel=2e-2)
    assert ours["pct_of_matmul_peak"] == pytest.approx(100 * ours["gflop_per_s"] / ceil["matmul_peak_gflops_fp32"],
                                                       rel=2e-2)
    assert rec["rounds"] == 1 and rec["load_average_1min"]["before"] is not None


def test_bench_rounds_interleave_and_anchors_can_be_skipped(image_folder, tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=5)))
    out = tmp_path / "bench.json"
    assert main(["bench", str(cfg), "--epochs", "2", "--rounds", "2", "--no-reference", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["rounds"] == 2 and "reference_style" not in rec and rec["reference_images_per_s"] is None
    assert rec["ceiling"]["images_per_s"] > 0
    assert main(["bench", str(cfg), "--epochs", "2", "--no-reference", "--no-ceiling", "--json", str(out)]) == 0
    assert "ceiling" not in json.loads(out.read_text())
    assert main(["bench", str(cfg), "--rounds", "0"]) == 2


def test_bench_rejects_zero_epochs(image_folder, tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(image_folder)))
    assert main(["bench", str(cfg), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_file_loader_keeps_its_workers_and_serves_each_epochs_batches(image_folder):
    from longtail.config import DataConfig
    from longtail.data import create_dataset
    from longtail.data.loaders import Loader

    ds = create_dataset(DataConfig(name="image_folder", root=str(image_folder), image_size=16, in_memory="never"))
    loader = Loader(ds, torch.device("cpu"), augment="none", num_workers=2)
    gen = torch.Generator().manual_seed(0)
    targets = ds.splits["train"].targets
    seen_loaders = set()
    for epoch in range(3):
        idx = torch.randperm(len(targets), generator=torch.Generator().manual_seed(epoch))
        got = torch.cat([y for _, y in loader.train_batches(idx, 8, False, gen, start_step=epoch % 2)])
        assert torch.equal(got, targets[idx][8 * (epoch % 2):])  # this epoch's batches, in order
        seen_loaders.add(id(loader._train_dl["train"][0]))
    assert len(seen_loaders) == 1  # one DataLoader, its workers kept across epochs
    loader.close()
    assert not loader._train_dl


def test_file_dataset_runs_with_workers_are_deterministic(image_folder, tmp_path):
    raw = tiny_raw(image_folder, epochs=2)
    raw["data"].update(in_memory="never", num_workers=2, augment="imagenet")
    a = train(build_config(raw), out=tmp_path / "a", progress=False)
    b = train(build_config(raw), out=tmp_path / "b", progress=False)
    assert_same_state(final_weights(a), final_weights(b))


def test_init_from_another_run_folder_or_checkpoint(image_folder, tmp_path, monkeypatch):
    first = train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "first", progress=False)
    monkeypatch.chdir(tmp_path)  # a relative path, stored absolute so the run resumes from anywhere
    raw = tiny_raw(image_folder, epochs=0)
    raw["stages"][0]["init_from"] = "first"
    run = train(build_config(raw), out=tmp_path / "second", progress=False)
    assert_same_state(final_weights(first), final_weights(run))  # 0 epochs: exactly the other run's weights
    saved = yaml.safe_load((run / "config.yaml").read_text())["stages"][0]["init_from"]
    assert saved == str((tmp_path / "first" / "checkpoints" / "final.pt").resolve())
    raw["stages"][0]["init_from"] = str(first / "checkpoints" / "final.pt")  # a checkpoint file works too
    assert_same_state(final_weights(first), final_weights(train(build_config(raw), out=tmp_path / "third",
                                                                   progress=False)))
    raw["stages"][0]["init_from"] = "missing/run"
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        train(build_config(raw), out=tmp_path / "fourth", progress=False)
    assert not (tmp_path / "fourth").exists()  # failed before creating anything
    raw["model"]["head"] = "cosine"
    raw["stages"][0]["init_from"] = str(first)
    with pytest.raises(RuntimeError, match="do not fit this model"):
        train(build_config(raw), out=tmp_path / "fifth", progress=False)


def test_compile_trains_the_same_model(image_folder, tmp_path, monkeypatch):
    # compile=True wraps the method in torch.compile. Here with the aot_eager backend: Dynamo traces the method
    # (dict outputs, method state) and AOTAutograd builds the backward exactly as with inductor, without
    # minutes of C++ code generation on a CI CPU. Checkpoints must hold the plain method's keys (no
    # `_orig_mod.` prefix), and the weights follow the eager run.
    compile_calls = []
    real_compile = torch.compile

    def aot_eager_compile(fn, **kwargs):
        compile_calls.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch._dynamo.reset()
    eager = train(build_config(tiny_raw(image_folder, epochs=1)), out=tmp_path / "eager", progress=False)
    assert compile_calls == []
    comp = train(build_config(tiny_raw(image_folder, epochs=1), ["compile=true"]), out=tmp_path / "comp",
                 progress=False)
    assert len(compile_calls) == 1
    a, b = final_weights(eager), final_weights(comp)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fast_path_off_gives_the_same_batches_through_dataloader_workers(image_folder, tmp_path):
    # data.fast_path=false sends in-memory images through DataLoader workers and per-image transforms. Without
    # augmentation both paths see the same images in the same order, so training is bit-identical.
    raw = tiny_raw(image_folder, epochs=2)
    raw["data"]["augment"] = "none"
    fast = train(build_config(raw), out=tmp_path / "fast", progress=False)
    plain = train(build_config(raw, ["data.fast_path=false"]), out=tmp_path / "plain", progress=False)
    assert_same_state(final_weights(fast), final_weights(plain))
    # With augmentation (pad-and-crop, flip) the random streams differ, the run still trains and evaluates.
    aug = train(build_config(tiny_raw(image_folder, epochs=1), ["data.fast_path=false"]), out=tmp_path / "aug",
                progress=False)
    assert json.loads((aug / "metrics.json").read_text())["splits"]["test"]["num_samples"] > 0


def test_in_memory_never_on_an_in_memory_dataset_says_what_to_set(tmp_path):
    from longtail.data import DataError, create_dataset

    cfg = build_config({"data": {"name": "digits_lt", "in_memory": "never", "cache_dir": str(tmp_path)}})
    with pytest.raises(DataError, match="data.fast_path=false"):
        create_dataset(cfg.data)
