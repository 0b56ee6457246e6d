"""One owner of the run-folder layout (``longtail.run_folder``: ``RunDir`` and the names), and the one merge of
metrics.json: the paths, the check that no other module spells them, the merge and the tables the CLI prints."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from longtail import run_folder
from longtail.evaluation.report import (
    common_split,
    feature_quality_table,
    merge_metrics,
    prediction_accuracy,
    sweep_table,
)
from longtail.run_folder import RUN_DIRS, RUN_FILES, RunDir, drop_latest_duplicates

REPO = Path(__file__).resolve().parents[1]
OWNER = REPO / "src" / "longtail" / "run_folder.py"
# Modules that still spell run-folder paths, to be switched to RunDir (then removed from here); none now.
PENDING: set[Path] = set()
# Every name a run writes in its folder, as run_folder spells them; and the checkpoint of a stage, stage_<name>.pt.
NAMES = {run_folder.LOCK_NAME, run_folder.LATEST, *RUN_FILES, *RUN_DIRS, run_folder.LAST, run_folder.BEST,
         run_folder.FINAL}
STAGE = re.compile(r"^stage_\{\}\.pt$")
# Calls whose string arguments are other things of the same name: a sub-command (`longtail export`, `longtail
# features`), a package (tensorboard), a progress bar's label.
NOT_PATHS = {"add_parser", "find_spec"}
NOT_PATH_KEYWORDS = {"desc"}


def _shape(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with ``{}`` for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def spelled_paths(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal in ``source`` that spells a run-folder path: a name of NAMES, or a path
    of such names (``checkpoints/final.pt``), or ``stage_{}.pt``. Docstrings and messages (text with spaces) are
    not paths; nor are the arguments of NOT_PATHS calls."""
    tree = ast.parse(source)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body \
                and isinstance(node.body[0], ast.Expr) and _shape(node.body[0].value) is not None:
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.JoinedStr):  # its text is checked whole, with {} for the values
            skip.update(id(v) for v in node.values)
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in NOT_PATHS:
                skip.update(id(a) for a in node.args)
            skip.update(id(k.value) for k in node.keywords if k.arg in NOT_PATH_KEYWORDS)
    found = []
    for node in ast.walk(tree):
        text = _shape(node)
        if text is None or id(node) in skip or not text or any(c.isspace() for c in text):
            continue
        parts = [p for p in text.split("/") if p]
        if any(p in NAMES or STAGE.match(p) for p in parts):
            found.append((node.lineno, text))
    return sorted(set(found))


def _sources() -> list[Path]:
    return sorted([*(REPO / "src" / "longtail").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")])


def test_only_run_folder_spells_the_paths_of_a_run_folder():
    offenders = {}
    for path in _sources():
        if path == OWNER or path in PENDING:
            continue
        hits = spelled_paths(path.read_text(encoding="utf-8"))
        if hits:
            offenders[str(path.relative_to(REPO))] = hits
    assert offenders == {}, f"ask longtail.run_folder.RunDir for these paths: {offenders}"
    for path in PENDING:  # a reminder: once a pending module is switched, it leaves PENDING (and is checked)
        assert spelled_paths(path.read_text(encoding="utf-8")), f"{path.name} is switched: remove it from PENDING"


def test_the_check_sees_what_it_must_and_nothing_else():
    code = '''
"""A docstring naming config.yaml and checkpoints/final.pt."""
a = run_dir / "metrics.json"
b = ckpt_dir / f"stage_{name}.pt"
c = f"{run_dir}/checkpoints/last.pt"
d = Path(run_dir, "plots")
e = f"{run_dir} has no checkpoints/final.pt yet"   # a message
f = sub.add_parser("export", help="...")
g = tqdm(x, desc="features")
h = {"splits": 1, "metrics": 2}
'''
    assert [text for _, text in spelled_paths(code)] == ["metrics.json", "stage_{}.pt", "{}/checkpoints/last.pt",
                                                        "plots"]
    assert spelled_paths(OWNER.read_text())  # the owner does spell them


def test_run_dir_paths(tmp_path):
    rd = RunDir(str(tmp_path / "r"))
    assert rd.path == tmp_path / "r" and rd.name == "r"
    assert rd.config == tmp_path / "r" / "config.yaml" and rd.metrics == tmp_path / "r" / "metrics.json"
    assert rd.metrics_csv.name == "metrics.csv" and rd.train_log.name == "train.log" and rd.lock.name == ".lock"
    assert rd.last == tmp_path / "r" / "checkpoints" / "last.pt"
    assert rd.best == tmp_path / "r" / "checkpoints" / "best.pt"
    assert rd.final == tmp_path / "r" / "checkpoints" / "final.pt"
    assert rd.final == rd.path / rd.final_name  # the name recorded in feature stamps
    assert rd.stage_checkpoint("stage2") == tmp_path / "r" / "checkpoints" / "stage_stage2.pt"
    assert rd.features("test") == tuple(tmp_path / "r" / "features" / n
                                        for n in ("test.npy", "test_labels.npy", "test.json"))
    assert rd.sweep("alpha", "val") == tmp_path / "r" / "sweeps" / "alpha_val"
    assert rd.export(".onnx") == tmp_path / "r" / "export" / "model.onnx"
    assert rd.plots.name == "plots" and rd.tensorboard.name == "tensorboard"
    assert not (tmp_path / "r").exists()  # names only: nothing is created
    with pytest.raises(AttributeError):
        rd.path = tmp_path  # frozen
    assert RunDir.of_checkpoint(rd.final) == rd and RunDir.of_checkpoint(tmp_path / "w.pt") is None
    # What a run writes at the top of its folder and below, as --overwrite clears and its error lists them.
    assert RUN_FILES == ("config.yaml", "metrics.json", "metrics.csv", "train.log")
    assert RUN_DIRS == ("checkpoints", "plots", "sweeps", "features", "export", "tensorboard")


def test_drop_latest_duplicates(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    (tmp_path / "latest").symlink_to("b", target_is_directory=True)
    names = [str(tmp_path / n) for n in ("a", "b", "latest")]
    assert drop_latest_duplicates(names) == names[:2]  # runs/*: latest is b again
    assert drop_latest_duplicates([names[0], names[2]]) == [names[0], names[2]]  # latest alone names b


def test_merge_metrics_keeps_other_splits_and_the_order_of_keys():
    old = {"splits": {"val": {"top1": 1}, "test": {"top1": 2}}, "thresholds": "t", "feature_quality": {"test": 1},
           "notes": ["old"]}
    new = {"notes": ["new"], "splits": {"test": {"top1": 3}, "test_gbl": {"top1": 4}}, "off_value_check": []}
    merged = merge_metrics(old, new)
    assert merged == {"splits": {"val": {"top1": 1}, "test": {"top1": 3}, "test_gbl": {"top1": 4}},
                      "thresholds": "t", "feature_quality": {"test": 1}, "notes": ["new"], "off_value_check": []}
    assert list(merged) == ["splits", "thresholds", "feature_quality", "notes", "off_value_check"]
    assert list(merged["splits"]) == ["val", "test", "test_gbl"]
    fq = merge_metrics(old, {"feature_quality": {"val": 2}})
    assert fq["feature_quality"] == {"test": 1, "val": 2} and fq["splits"] == old["splits"]
    assert list(merge_metrics({}, new)) == ["notes", "off_value_check", "splits"]  # a first metrics.json
    assert old["splits"]["test"] == {"top1": 2}  # the inputs are left as they were


def test_sweep_and_prediction_tables():
    rows = [{"alpha": 0.0, "top1": 50.0, "many": 70.0, "medium": 40.0, "few": None, "precision": 48.125},
            {"alpha": 1.5, "top1": 55.5, "many": 65.0, "medium": 50.0, "few": 30.0, "precision": 52.0}]
    assert sweep_table(rows, "alpha") == (
        "| alpha | top1 | many | medium | few | precision |\n|---:|---:|---:|---:|---:|---:|\n"
        "| 0 | 50.00 | 70.00 | 40.00 | – | 48.12 |\n| 1.5 | 55.50 | 65.00 | 50.00 | 30.00 | 52.00 |")
    assert prediction_accuracy({"metrics": None, "labelled": 0}) is None
    line = prediction_accuracy({"labelled": 3, "metrics": {"top1": 66.666, "many": 100.0, "medium": None,
                                                             "few": 0.0, "thresholds": "many > 100"}})
    assert line == ("accuracy on the 3 labelled images (labels from <class>/ folders or the list file): top1 66.67, "
                    "many 100.00, medium -, few 0.00 (many > 100)")


def test_feature_quality_table():
    sub = {"num_samples": 4, "top1": 50.0, "many": 100.0, "medium": None, "few": 0.0, "mcc": 0.25, "nmi": 0.5}
    rep = {"split": "val", "filtered": sub, "rest": sub, "all": sub, "protocol": "p", "thresholds": "t",
           "composition": {k: {"many": 50.0, "medium": 25.0, "few": 25.0}
                           for k in ("test_filtered", "test_all", "train_filtered", "train_all")},
           "clusters": {"purity_gt_0.9": 1, "purity_gt_0.7": 2, "purity_gt_0.5": 3, "empty": 0,
                        "size_quartiles": [1, 2, 3]}}
    lines = feature_quality_table(rep).splitlines()
    assert lines[2] == "| val: filtered (CAC) | 4 | 50.0 | 25.0 | 25.0 | 50.0 | 100.0 | – | 0.0 | 0.2 | 0.5 |"
    assert lines[3].startswith("| val: rest (regular) | 4 | – | – | – | 50.0")
    assert lines[5] == "| train: filtered | | 50.0 | 25.0 | 25.0 | | | | | | |"
    assert lines[-2:] == ["train clusters: purity > 0.9: 1, > 0.7: 2, > 0.5: 3; empty 0; size quartiles [1, 2, 3]",
                          "(p; shot groups t)"]


def test_common_split():
    def run(*splits):
        return {"metrics": {"splits": {s: {} for s in splits}}}

    assert common_split([run("val", "test"), run("test")]) == "test"
    assert common_split([run("val", "test_gbl"), run("test")]) == "test_gbl"
    assert common_split([run("val")]) == "val" and common_split([run()]) == "test"


def test_feature_quality_runs_the_registry_default():
    import longtail.engine.build  # noqa: F401  (imports every plugin)
    from longtail.registry import FEATURE_EVALUATIONS, Registry, RegistryError

    assert FEATURE_EVALUATIONS.default in FEATURE_EVALUATIONS
    assert FEATURE_EVALUATIONS.get_default() is FEATURE_EVALUATIONS.get(FEATURE_EVALUATIONS.default)
    with pytest.raises(RegistryError, match="no default thing"):
        Registry("thing").get_default()
    cli = (REPO / "src" / "longtail" / "cli.py").read_text()
    assert FEATURE_EVALUATIONS.default not in cli  # the CLI names no evaluation (nor method)


def test_features_stamp_names_the_final_checkpoint(tmp_path):
    from longtail.engine.features import _stamp

    rd = RunDir(tmp_path)
    rd.checkpoints.mkdir()
    rd.final.write_bytes(b"w")
    rd.config.write_text("seed: 0\n")
    stamp = _stamp(tmp_path, "test")
    assert stamp["checkpoint"]["path"] == "checkpoints/final.pt" and stamp["checkpoint"]["size"] == 1
    assert json.loads(json.dumps(stamp)) == stamp
