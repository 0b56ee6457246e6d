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
    assert out.startswith("ldam_drw: LDAM margins")
    assert "  drw_epoch: int = 160\n" in out and "0-based epoch from which class-balanced weights apply" in out
    assert "  max_margin: float = 0.5\n" in out
    assert main(["list", "ldam"]) == 2
    assert "unknown method 'ldam'; did you mean 'ldam_drw'" in capsys.readouterr().err


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
    assert "with l the loss of method ``base`` at its defaults." in flat  # mixup: two docstring lines
    assert "as the reference KNNClassifier defaults." in flat  # ncm
