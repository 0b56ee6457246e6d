"""Evaluate a finished run again and record what it measured in its folder: what ``longtail eval`` runs.

``evaluate_trained`` scores splits and checks the prediction-time corrections on val; ``sweep_trained`` /
``save_sweep`` read one option's curve; ``feature_quality`` measures the run's backbone features with a registered
feature evaluation. ``record_metrics`` merges any of them into the run's metrics.json (``merge_metrics``: the one
merge), so re-evaluating one split keeps the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from longtail.config import RunConfig
from longtail.engine.evaluate import check_off_values, parse_sweep, sweep_option, thresholds_of
from longtail.engine.fit import evaluate_run, val_split_hint, write_metrics
from longtail.engine.inference import TrainedRun
from longtail.errors import ConfigError, UsageError
from longtail.evaluation.report import merge_metrics, read_metrics
from longtail.run_folder import RunDir


def read_run_metrics(run_dir: str | Path) -> dict:
    """A run's metrics.json, or {} when it has none yet (CorruptFileError when it cannot be parsed)."""
    path = RunDir(run_dir).metrics
    return read_metrics(path) if path.is_file() else {}


def record_metrics(run_dir: str | Path, new: dict, cfg: RunConfig) -> Path:
    """Merge ``new`` (an evaluation of some splits, ``{"feature_quality": {split: ...}}``, ...) into the run's
    metrics.json and write it (atomic; the plots too when ``cfg.eval.plots``). Returns the file's path."""
    rd = RunDir(run_dir)
    write_metrics(rd.path, merge_metrics(read_run_metrics(rd.path), new), cfg)
    return rd.metrics


@dataclass
class Evaluation:
    """What ``evaluate_trained`` measured, and what to tell the user about it."""

    metrics: dict  # evaluate_run's metrics.json content of the splits (+ ``off_value_check`` when it ran)
    choices: list[dict] = field(default_factory=list)  # options chosen on val as the run was loaded (chosen_on_val)
    checks: list[dict] = field(default_factory=list)  # check_off_values: does each correction help on val?
    notes: list[str] = field(default_factory=list)  # e.g. why a check could not run


def evaluate_trained(run: TrainedRun, splits: list[str] | None = None) -> Evaluation:
    """Score ``splits`` (default: val when present, then the dataset's eval splits) of a loaded run, and check on
    its val split whether the method's prediction-time corrections help (``check_off_values``). UsageError for a
    split the run's dataset does not have."""
    if splits is not None:
        unknown = [s for s in splits if s not in run.dataset.splits]
        if unknown:
            raise UsageError(f"no split {unknown[0]!r}; this run has {', '.join(run.dataset.splits)}")
    metrics = evaluate_run(run.method, run.loader, run.cfg, splits=splits)
    # Options chosen on val when the run trained, or just now (--set method.X=val on a run that has no choice).
    choices = run.choices or read_run_metrics(run.run_dir).get("chosen_on_val", [])
    checks = check_off_values(run.method, run.loader, run.cfg.eval, run.cfg.amp, choices=choices)
    if checks:
        metrics["off_value_check"] = checks
    notes = []
    if run.method.off_values and "val" not in run.dataset.splits:
        options = ", ".join(f"method.{o}" for o in run.method.off_values)
        notes.append(f"this run has no val split, so whether {options} helps is not checked (never on test); to "
                     f"train one with a val split, {val_split_hint(run.dataset)}")
    return Evaluation(metrics, run.choices, checks, notes)


@dataclass
class Sweep:
    """One prediction-time option's curve on a split (``sweep_trained``)."""

    option: str
    split: str
    rows: list[dict]  # one per value: {option: value, top1, many, medium, few, precision}


def sweep_trained(run: TrainedRun, spec: str, split: str | None = None) -> Sweep:
    """Sweep a prediction-time option (``spec``: ``method.alpha=0:3:0.25`` or ``method.alpha=0,1,2``) on
    ``split`` (default: val when present, else the first eval split), from one pass of features."""
    option, values = parse_sweep(spec)
    split = split or ("val" if "val" in run.dataset.splits else run.dataset.eval_splits[0])
    if split not in run.dataset.splits:
        raise UsageError(f"no split {split!r}; this run has {', '.join(run.dataset.splits)}")
    rows = sweep_option(run.method, run.loader, split, option, values, run.cfg.eval, run.cfg.amp)
    return Sweep(option, split, rows)


def save_sweep(run_dir: str | Path, sweep: Sweep, table: str) -> Path:
    """Write a sweep to the run's sweeps/: ``<option>_<split>`` .json (the rows), .md (``table``) and .png (the
    curve). Returns that stem."""
    from longtail.evaluation.plots import plot_sweep
    from longtail.utils import atomic_write_json, atomic_write_text

    rd = RunDir(run_dir)
    stem = rd.sweep(sweep.option, sweep.split)
    atomic_write_json(Path(f"{stem}.json"), {"option": sweep.option, "split": sweep.split, "rows": sweep.rows})
    atomic_write_text(Path(f"{stem}.md"), table + "\n")
    plot_sweep(sweep.rows, sweep.option, Path(f"{stem}.png"), title=f"{rd.name}: {sweep.option} on {sweep.split}")
    return stem


def feature_quality(run: TrainedRun, split: str | None = None, options: list[str] | None = None,
                    device: str | None = None) -> dict:
    """The default feature evaluation (``FEATURE_EVALUATIONS``' default) of the run's train and ``split`` features
    (extracted to its features/ first, or re-used when current); returns its report, with ``split``.

    Its options are the run's own when the run's last method has the same options (it trained such a filter),
    else the defaults; ``options`` (``method.X=V``) change them (e.g. method.clusters=50 for a 10-class dataset).
    UsageError for a bad split or option."""
    import numpy as np
    import torch

    from longtail.config import from_dict, parse_override
    from longtail.engine.features import export_features, load_features
    from longtail.registry import FEATURE_EVALUATIONS, METHODS

    split = split or run.dataset.eval_splits[0]
    if "," in split or split not in run.dataset.splits or split == "train":
        raise UsageError(f"--feature-quality takes one evaluation split, got {split!r} "
                         f"(this run has {', '.join(run.dataset.splits)})")
    evaluation = FEATURE_EVALUATIONS.get_default()
    last = run.cfg.stages[-1].method
    same = METHODS.get(last["name"]).Config is evaluation.Config
    opts = {k: v for k, v in last.items() if k != "name"} if same else {}
    for o in options or []:
        key, _, value = o.partition("=")
        if not key.startswith("method."):
            raise UsageError(f"with --feature-quality, --set takes method.OPTION=VALUE of the "
                             f"{FEATURE_EVALUATIONS.default.replace('_', ' ')}, got {o!r}")
        opts[key.split(".", 1)[1]] = parse_override(o)[1]
    try:
        fq_cfg = from_dict(evaluation.Config, opts, "method")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    export_features(run.run_dir, ["train", split], device=device)
    dev = run.loader.device
    (tr_f, tr_y), (te_f, te_y) = load_features(run.run_dir, "train"), load_features(run.run_dir, split)
    rep = evaluation.evaluate(torch.from_numpy(np.array(tr_f)).to(dev), torch.from_numpy(tr_y).to(dev),
                              torch.from_numpy(np.array(te_f)).to(dev), torch.from_numpy(te_y).to(dev),
                              run.dataset.num_classes, thresholds_of(run.cfg.eval, run.dataset.train_counts()),
                              fq_cfg)
    rep["split"] = split
    return rep
