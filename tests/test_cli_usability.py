"""The command line as a new user meets it: options anywhere, --print-config, `list METHOD`, whole descriptions."""

import yaml

from longtail.cli import main
from longtail.registry import describe_options, summary
from test_engine_cli import tiny_raw


def _recipe(image_folder, tmp_path, epochs=1):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=epochs)))
    return path


def test_print_config_takes_overrides_after_options_and_trains_nothing(image_folder, tmp_path, capsys):
    cfg, out = _recipe(image_folder, tmp_path), tmp_path / "never"
    assert main(["train", str(cfg), "--out", str(out), "seed=7", "--quiet", "stages.0.epochs=4",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 7 and printed["stages"][0]["epochs"] == 4
    assert printed["stages"][0]["method"] == {"name": "ce", "label_smoothing": 0.0}  # defaults resolved
    assert not out.exists()
    # The quickstart with no recipe named, an option first.
    assert main(["train", "--print-config", "epochs=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stages"][0]["epochs"] == 2


def test_print_config_refuses_resume(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path), "--print-config"]) == 2
    assert "--print-config" in capsys.readouterr().err


def test_train_with_overrides_after_options(image_folder, tmp_path, capsys):
    cfg, out = _recipe(image_folder, tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "seed=2", "--quiet", "eval.batch_size=8"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 2 and saved["eval"]["batch_size"] == 8


def test_intermixed_parsing_skips_top_level_option_values():
    from longtail.cli import build_parser, parse_command_line

    parser = build_parser()  # --plugin MODULE: a top-level option that takes a value
    args = parse_command_line(parser, ["--plugin", "mine", "train", "quickstart", "--out", "x", "seed=2"])
    assert (args.plugin, args.command, args.config, args.overrides, args.out) == (["mine"], "train", "quickstart",
                                                                                  ["seed=2"], "x")
    args = parse_command_line(parser, ["--plugin=m", "--debug", "report", "a", "--split", "test", "b"])
    assert (args.plugin, args.debug, args.run_dirs, args.split) == (["m"], True, ["a", "b"], "test")


def test_unknown_options_still_fail_with_the_subcommand_usage(capsys):
    assert_exit = None
    try:
        main(["train", "quickstart", "--bogus"])
    except SystemExit as e:
        assert_exit = e.code
    assert assert_exit == 2
    assert "longtail train: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_list_method_prints_options_defaults_and_docs(capsys):
    assert main(["list", "ldam_drw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ldam_drw (method): LDAM margins")
    assert "  drw_epoch: int = 160\n" in out and "0-based epoch from which class-balanced weights apply" in out
    assert "  max_margin: float = 0.5\n" in out
    assert main(["list", "ldam"]) == 2
    assert "unknown method, head or dataset 'ldam'; did you mean 'ldam_drw'" in capsys.readouterr().err


def test_list_head_and_dataset_print_their_options(capsys):
    assert main(["list", "causal_norm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("causal_norm (head): De-confound (TDE) classifier")
    assert "model.head.tau=..." in out and "  tau: float = 16.0\n" in out and "split as tau / K" in out
    assert "  num_heads: int = 2\n" in out and "  gamma: float = 0.03125\n" in out
    assert main(["list", "shapes-glt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shapes-glt (dataset): Generated shapes") and "data.options.num_classes=..." in out
    assert "  train_variant: str = 'lt'\n" in out and "Train-CBL" in out
    assert main(["list", "image_folder"]) == 0
    assert "no options" in capsys.readouterr().out
    assert main(["list", "cosin"]) == 2
    assert "did you mean 'cosine'" in capsys.readouterr().err


def test_describe_options_reads_comments_above_and_beside_fields():
    from dataclasses import dataclass, field

    @dataclass
    class Config:
        # the first
        # comment, two lines
        a: int = 1
        b: str = "x"  # beside
        c: list[int] = field(default_factory=lambda: [1, 2])

    assert describe_options(Config) == [("a", "int", "1", "the first comment, two lines"),
                                        ("b", "str", "'x'", "beside"), ("c", "list[int]", "[1, 2]", "")]


def test_list_prints_whole_descriptions(capsys):
    assert summary("First line\n    goes on.\n\n    Details.") == "First line goes on."
    assert main(["list"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "with l the loss ``base`` at its defaults." in flat  # mixup: two docstring lines
    assert "as the reference KNNClassifier defaults." in flat  # ncm
    assert "losses (method.base of ifl / mixup): balanced_softmax Balanced Softmax" in flat  # the LOSSES registry


# --------------------------------------------------------------------------------------------- run folders


def test_runs_latest_links_the_newest_default_run(image_folder, tmp_path, monkeypatch, capsys):
    cfg = _recipe(image_folder, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(cfg), "--quiet"]) == 0
    first = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert (tmp_path / "runs" / "latest").resolve() == first[0].resolve()
    assert main(["train", str(cfg), "--quiet", "seed=1"]) == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    newest = next(p for p in runs if p not in first)
    link = tmp_path / "runs" / "latest"
    assert link.is_symlink() and link.resolve() == newest.resolve()
    capsys.readouterr()
    assert main(["eval", "runs/latest", "--split", "test", "--no-write"]) == 0
    # runs/*/ names the link and its run: one row per run all the same
    assert main(["report", *(f"runs/{p.name}/" for p in sorted((tmp_path / "runs").iterdir()))]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    # an --out folder leaves the link alone
    assert main(["train", str(cfg), "--quiet", "--out", "runs/named"]) == 0
    assert link.resolve() == newest.resolve()


def test_a_failed_run_logs_its_error_and_report_skips_it(image_folder, tmp_path, capsys):
    cfg = _recipe(image_folder, tmp_path)
    good, failed = tmp_path / "good", tmp_path / "failed"
    assert main(["train", str(cfg), "--out", str(good), "--quiet"]) == 0
    assert main(["train", str(cfg), "--out", str(failed), "--quiet", f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err
    log = (failed / "train.log").read_text()
    assert "ERROR failed: " in log and "does not exist" in log
    assert main(["report", str(good), str(failed)]) == 0
    out, err = capsys.readouterr()
    assert out.count("| good ") == 1 and "failed" not in out
    assert f"warning: skipped {failed} stopped before its first checkpoint" in err and "train.log" in err
    assert main(["report", str(failed)]) == 2
    assert "no finished run among" in capsys.readouterr().err
    # A shell glob's plain files (logs beside the run folders): one warning line for all of them.
    logs = [tmp_path / f"{n}.log" for n in "abcd"]
    for f in logs:
        f.write_text("x")
    assert main(["report", str(good), *map(str, logs)]) == 0
    out, err = capsys.readouterr()
    assert out.count("| good ") == 1
    assert err.strip() == f"warning: skipped 4 file(s), not run folders: {logs[0]}, {logs[1]}, {logs[2]} and 1 more"
    assert main(["report", str(logs[0])]) == 2
    assert "no run folder among the arguments, only files" in capsys.readouterr().err


def test_report_names_an_unfinished_run_and_how_to_resume_it(tmp_path):
    import pytest

    from longtail.errors import MissingFileError
    from longtail.evaluation.report import load_run

    run = tmp_path / "half"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "x", "meta": {"longtail": "0"}}))
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(MissingFileError, match=f"unfinished run .*longtail train --resume --out {run}"):
        load_run(run)


# --------------------------------------------------------------------------------------------- comparison plots


def test_head_to_tail_orders_classes_by_training_images():
    from longtail.evaluation.plots import head_to_tail

    assert head_to_tail([5, 500, 50, 500]) == [1, 3, 2, 0]


def test_confusion_takes_a_permutation_only(tmp_path):
    import pytest

    from longtail.evaluation.plots import plot_confusion

    cm = [[3, 1], [0, 2]]
    assert plot_confusion(cm, ["a", "b"], tmp_path / "c.png", order=[1, 0]).stat().st_size > 0
    with pytest.raises(ValueError, match="permutation"):
        plot_confusion(cm, None, tmp_path / "d.png", order=[0, 0])


def test_long_titles_are_wrapped_inside_the_figure():
    from longtail.evaluation.plots import _new_figure, _title

    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot()
    _title(ax, "a-very-long-run-name-20240101-120000-2: accuracy per attribute group, test_gbl (GLT)")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    box = ax.title.get_window_extent(renderer)
    assert "\n" in ax.get_title() and box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_report_plot_draws_the_runs_in_one_figure(tmp_path, capsys):
    from test_plots_report import _metrics, _split, make_run

    a = make_run(tmp_path, "ce_run", _metrics({"test": _split(70.0, 90.0, 60.0, 10.0)}))
    b = make_run(tmp_path, "bs_run", _metrics({"test": _split(72.5, 85.0, 65.0, 30.0)}))
    c = make_run(tmp_path, "val_only", _metrics({"val": _split(50.0, 60.0, 50.0, 10.0)}))
    out = tmp_path / "cmp.md"
    assert main(["report", str(a), "--plot", str(b), str(c), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    png = tmp_path / "cmp.png"
    assert f"plot: {png}" in printed and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(png).shape[:2]
    assert w > 1.8 * h  # two panels side by side


# --------------------------------------------------------------------------------------------- images, --quiet


def _pil_image(tmp_path, fmt, w=5, h=4):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_pillow_decodes_what_torchvision_cannot(tmp_path):
    import torch

    from longtail.data.images import read_image

    for fmt in ("bmp", "tif"):
        path, pixels = _pil_image(tmp_path, fmt)
        assert torch.equal(read_image(path), torch.from_numpy(pixels).permute(2, 0, 1)), fmt


def test_pillow_path_keeps_the_pixel_limit_and_names_corrupt_files(tmp_path):
    import pytest

    from longtail.data.base import DataError
    from longtail.data.images import ImageLimits, read_image

    path, _ = _pil_image(tmp_path, "bmp", 20, 20)
    with pytest.raises(DataError, match=r"20x20 pixels, above data.max_image_pixels=100 "):
        read_image(path, ImageLimits(max_pixels=100))
    bad = tmp_path / "bad.bmp"
    bad.write_bytes(b"BM" + b"\x00" * 40)
    with pytest.raises(DataError, match=f"{bad}: cannot decode image .*delete or replace this file"):
        read_image(bad)


def test_quiet_silences_the_decoding_bars(tmp_path, capsys):
    from conftest import make_image_folder

    counts = {"train": {"ant": 6, "bee": 3}, "test": {"ant": 2, "bee": 2}}
    for quiet in (False, True):
        folder = make_image_folder(tmp_path / f"data{quiet}", counts)
        recipe = tmp_path / f"r{quiet}.yaml"
        raw = tiny_raw(folder, epochs=1)
        raw["eval"] = {"batch_size": 4, "many_above": 4, "few_below": 2}
        recipe.write_text(yaml.safe_dump(raw))
        assert main(["train", str(recipe), "--out", str(tmp_path / f"run{quiet}")] + ["--quiet"] * quiet) == 0
        err = capsys.readouterr().err
        assert ("decoding" in err) is not quiet, err


# --------------------------------------------------------------------------------------------- README


def test_every_readme_command_parses():
    """Each one-line `longtail ...` example in the README's bash blocks is a valid command line (options and
    key=value in the order written there)."""
    import re
    import shlex
    from pathlib import Path

    from longtail.cli import build_parser, parse_command_line

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for ln in block.splitlines()]
    commands = [ln for ln in lines if ln.startswith("longtail ") and not ln.endswith("\\") and "|" not in ln
                and "--help" not in ln]
    assert len(commands) >= 15
    for line in commands:
        assert parse_command_line(build_parser(), shlex.split(line, comments=True)[1:]).command, line
    assert "| | longtail | timm `train.py` | mmpretrain | Lightning |" in readme
