"""Markdown tables of results (one run's splits, several run folders side by side, a sweep, a feature evaluation,
predictions), the listings of ``longtail list``, and the one merge of new results into a run's metrics.json.
Everything the CLI prints as a table is made here; nothing here imports torch (``longtail list`` stays quick)."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from longtail.errors import CorruptFileError, MissingFileError
from longtail.run_folder import RunDir, lock_holder, unfinished_reason

DASH = "–"  # shown for a missing value (an empty shot group, a split a run lacks)


def load_run(run_dir: str | Path) -> dict:
    """Read a run folder: ``{"run_dir": Path, "name": str, "config": dict, "metrics": dict}``.

    Raises FileNotFoundError naming the folder and the missing file when the folder does not exist or
    lacks ``config.yaml`` or ``metrics.json``, and ValueError when one of them cannot be parsed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"{run_dir} is not a longtail run folder: no such folder")
    rd = RunDir(run_dir)
    metrics_path = rd.metrics
    if not metrics_path.is_file():
        holder = lock_holder(run_dir)
        if holder is not None:
            raise MissingFileError(f"{run_dir} has no metrics.json yet: it is still training (pid "
                                   f"{holder.get('pid', '?')} on {holder.get('host', '?')})")
        why = unfinished_reason(run_dir)
        if why is not None:
            raise MissingFileError(why)
        if rd.final.is_file():
            raise MissingFileError(f"{run_dir} has final weights but no metrics.json; `longtail eval {run_dir}` "
                                   f"re-creates it")
        raise MissingFileError(
            f"{run_dir} is not a longtail run folder: no metrics.json; did the run finish? "
            f"`longtail eval {run_dir}` re-creates it from checkpoints/final.pt"
        )
    config_path = rd.config
    if not config_path.is_file():
        raise MissingFileError(f"{run_dir} is not a longtail run folder: no config.yaml")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{config_path}: not valid YAML ({' '.join(str(e).split())})") from e
    metrics = read_metrics(metrics_path)
    if not isinstance(config, dict):
        raise CorruptFileError(f"{run_dir}: config.yaml and metrics.json must each hold a mapping")
    return {"run_dir": run_dir, "name": run_dir.name, "config": config, "metrics": metrics}


def load_runs(run_dirs: Sequence[str | Path], skip: Callable[[str], None] | None = None) -> list[dict]:
    """``load_run`` of each folder; with ``skip``, folders without metrics.json are left out (``skip(why)``)."""
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except MissingFileError as e:
            if skip is None:
                raise
            skip(str(e))
    if not runs:
        raise MissingFileError(f"no finished run among {', '.join(str(d) for d in run_dirs)}")
    return runs


def read_metrics(path: str | Path) -> dict:
    """A run's metrics.json; CorruptFileError (one line) when it is not a JSON mapping."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e}); `longtail eval {path.parent}` writes it again") from e
    if not isinstance(metrics, dict):
        raise CorruptFileError(f"{path.parent}: config.yaml and metrics.json must each hold a mapping")
    return metrics


MERGED_BY_KEY = ("splits", "feature_quality")  # metrics.json entries merged key by key (split by split)


def merge_metrics(old: dict, new: dict) -> dict:
    """A run's metrics.json ``old`` updated with the results of a later evaluation ``new`` (``longtail eval``):
    ``new``'s entries replace ``old``'s, except those of MERGED_BY_KEY, which are merged key by key, so that
    re-evaluating one split (or the feature quality on one split) keeps the others. Keys keep their order."""
    merged = {**old, **{k: v for k, v in new.items() if k not in MERGED_BY_KEY}}
    for key in MERGED_BY_KEY:
        if key in new:
            merged[key] = {**old.get(key, {}), **new[key]}
    return merged


def common_split(runs: list[dict]) -> str:
    """The split a comparison figure of ``runs`` (``load_runs``) draws: test when every run has it, else the first
    run's first split that is not val."""
    splits = [list(r["metrics"].get("splits") or {}) for r in runs]
    if all("test" in s for s in splits):
        return "test"
    return next((s for s in splits[0] if s != "val"), splits[0][0] if splits[0] else "test")


# --------------------------------------------------------------------------------------------- formatting


def _fmt(v, digits: int = 1) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return DASH
    return f"{v:.{digits}f}"


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A markdown table padded to column width, so it also reads well as plain text."""
    cells = [[_cell(h) for h in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _thresholds(metrics: dict, split: dict | None) -> str | None:
    if isinstance(split, dict) and split.get("thresholds"):
        return str(split["thresholds"])
    return str(metrics["thresholds"]) if metrics.get("thresholds") else None


def _split_label(split: str, m: dict | None) -> str:
    """``test_gbl (GLT)``: the split named with the GLT protocol(s) it scores, when it scores one."""
    protocols = m.get("protocols") if isinstance(m, dict) else None
    if isinstance(protocols, list) and protocols:
        return f"{split} ({', '.join(str(p) for p in protocols)})"
    return split


# --------------------------------------------------------------------------------------------- run facts


def _dataset(config: dict) -> str:
    data = config.get("data") or {}
    name = data.get("name") if isinstance(data, dict) else None
    if not name:
        return DASH
    ratio = data.get("imbalance_ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        return f"{name} (IR {ratio:g})"
    return str(name)


def _backbone(config: dict) -> str:
    model = config.get("model") or {}
    return str(model.get("backbone")) if isinstance(model, dict) and model.get("backbone") else DASH


def _stages(config: dict) -> list[dict]:
    stages = config.get("stages")
    if isinstance(stages, list) and stages:
        return [s for s in stages if isinstance(s, dict)]
    # a config without stages: its top-level method / epochs are the one stage
    return [{k: config[k] for k in ("method", "epochs") if k in config}]


def _method(config: dict) -> str:
    names = []
    for st in _stages(config):
        m = st.get("method")
        name = m.get("name") if isinstance(m, dict) else m
        src = st.get("init_from")
        if isinstance(src, str) and ("/" in src or "\\" in src):  # started from another run's weights
            p = Path(src)
            of = RunDir.of_checkpoint(p)
            run = of.name if of is not None else p.name
            name = f"{name or '?'} (from {run})"
        names.append(str(name) if name else "?")
    return " -> ".join(names) if any(n != "?" for n in names) else DASH


def _epochs(config: dict) -> str:
    """Epochs per stage joined with "+" (e.g. "200+10"): a shortened stage shows as such."""
    eps = [st.get("epochs") for st in _stages(config)]
    if not eps or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in eps):
        return DASH
    return "+".join(f"{e:g}" for e in eps)


# --------------------------------------------------------------------------------------------- tables


def runs_table(run_dirs: Sequence[str | Path], split: str | None = None,
               skip: Callable[[str], None] | None = None) -> str:
    """One markdown table comparing run folders, one row per run per split.

    Columns: run (folder name), dataset (name and imbalance ratio), backbone, method (stage methods
    joined with " -> ", "(from RUN)" where a stage starts from another run), epochs (per stage, "200+10"),
    split (with the GLT protocol it scores, e.g. "test_gbl (GLT)"), top1, many, medium, few, precision
    (macro; percent, one decimal, "–" when missing).
    ``split`` keeps only that split (a run without it gets a row of "–");
    None shows every split of each run. A line under the table states the shot thresholds, and says so
    when the runs do not share them. With ``skip``, a folder without results (a run still training, stopped or
    failed) is left out and ``skip(why)`` called, instead of raising; MissingFileError when none is left.
    """
    runs = load_runs(run_dirs, skip)
    header = ["run", "dataset", "backbone", "method", "epochs", "split", "top1", "many", "medium", "few",
              "precision"]
    rows: list[list[str]] = []
    thresholds: dict[str, list[str]] = {}  # description -> runs using it
    missing: list[str] = []
    for run in runs:
        cfg, metrics = run["config"], run["metrics"]
        splits = metrics.get("splits") or {}
        facts = [run["name"], _dataset(cfg), _backbone(cfg), _method(cfg), _epochs(cfg)]
        names = [split] if split is not None else list(splits)
        if not names:
            missing.append(f"{run['name']} has no evaluated split")
        for s in names:
            m = splits.get(s)
            if not isinstance(m, dict):
                missing.append(f"{run['name']} has no split '{s}'")
                m = {}
            rows.append(facts + [_split_label(s, m)]
                        + [_fmt(m.get(k)) for k in ("top1", "many", "medium", "few", "precision")])
            t = _thresholds(metrics, m or None)
            if t is not None:
                thresholds.setdefault(t, [])
                if run["name"] not in thresholds[t]:
                    thresholds[t].append(run["name"])
    lines = [_markdown(header, rows, right={4, 6, 7, 8, 9, 10}), ""]
    if not thresholds:
        lines.append("Shot groups: thresholds not recorded.")
    elif len(thresholds) == 1:
        lines.append(f"Shot groups: {next(iter(thresholds))}.")
    else:
        per = "; ".join(f"{t} ({', '.join(names)})" for t, names in thresholds.items())
        lines.append(f"Shot groups: the runs differ in thresholds, so many / medium / few are not "
                     f"comparable across them: {per}.")
    if missing:
        lines.append("Missing: " + "; ".join(missing) + ".")
    return "\n".join(lines)


def results_table(metrics: dict, title: str | None = None) -> str:
    """A compact markdown table of one run's splits (split, top1, mean-class accuracy, many, medium, few,
    precision, n).

    ``metrics`` is a ``metrics.json`` dict; the shot thresholds go on a line under the table. Padded,
    so it reads well printed in a terminal at the end of training.
    """
    splits = metrics.get("splits") or {}
    rows = []
    seen: list[str] = []
    for s, m in splits.items():
        if not isinstance(m, dict):
            continue
        n = m.get("num_samples")
        rows.append([_split_label(s, m)]
                    + [_fmt(m.get(k)) for k in ("top1", "mean_class_acc", "many", "medium", "few", "precision")]
                    + [str(n) if isinstance(n, int) else DASH])
        t = _thresholds(metrics, m)
        if t is not None and t not in seen:
            seen.append(t)
    header = ["split", "top1", "mean_class", "many", "medium", "few", "precision", "n"]
    lines = [title, ""] if title else []
    lines.append(_markdown(header, rows, right={1, 2, 3, 4, 5, 6, 7}))
    if seen:
        lines.append("")
        lines.append("Shot groups: " + "; ".join(seen) + ".")
    for s, m in splits.items():  # methods that route samples (DLSA's cascade): who answered what
        if isinstance(m, dict) and m.get("routes"):
            lines.append(f"Routes on {s}: " + ", ".join(
                f"{r['route']} {r['num_samples']} ({_fmt(r['top1'])})" for r in m["routes"]) + " [samples (top1)].")
    return "\n".join(lines)


def sweep_table(rows: list[dict], option: str) -> str:
    """Markdown table of a prediction-time option's sweep (``sweep_option``'s rows): one row per value."""

    def cell(v):
        return DASH if v is None else f"{v:.2f}"

    lines = [f"| {option} | top1 | many | medium | few | precision |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[option]:g} | " + " | ".join(cell(r[k]) for k in ("top1", "many", "medium", "few", "precision"))
              + " |" for r in rows]
    return "\n".join(lines)


def feature_quality_table(rep: dict) -> str:
    """Markdown summary of a feature evaluation (``feature_quality``): class composition and accuracy of the
    filtered subset."""

    def cell(v):
        return DASH if v is None else f"{v:.1f}"

    comp, split = rep["composition"], rep.get("split", "test")
    lines = ["| subset | samples | % many | % medium | % few | top1 | many | medium | few | MCC | NMI |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, key, ckey in ((f"{split}: filtered (CAC)", "filtered", "test_filtered"),
                            (f"{split}: rest (regular)", "rest", None), (f"{split}: all", "all", "test_all")):
        m = rep[key]
        c = comp[ckey] if ckey else {}
        lines.append(f"| {name} | {m['num_samples']} | " + " | ".join(cell(c.get(g)) for g in ("many", "medium", "few"))
                     + " | " + " | ".join(cell(m.get(k)) for k in ("top1", "many", "medium", "few", "mcc", "nmi"))
                     + " |")
    for name, ckey in (("train: filtered", "train_filtered"), ("train: all", "train_all")):
        lines.append(f"| {name} | | " + " | ".join(cell(comp[ckey].get(g)) for g in ("many", "medium", "few"))
                     + " |" + " |" * 6)
    cl = rep["clusters"]
    lines.append("")
    lines.append(f"train clusters: purity > 0.9: {cl['purity_gt_0.9']}, > 0.7: {cl['purity_gt_0.7']}, > 0.5: "
                 f"{cl['purity_gt_0.5']}; empty {cl['empty']}; size quartiles {cl['size_quartiles']}")
    lines.append(f"({rep['protocol']}; shot groups {rep['thresholds']})")
    return "\n".join(lines)


def prediction_accuracy(res: dict) -> str | None:
    """The accuracy line of ``predict_to``'s result on its labelled images, or None without labels."""
    m = res["metrics"]
    if m is None:
        return None

    def cell(v):
        return "-" if v is None else f"{v:.2f}"

    return (f"accuracy on the {res['labelled']} labelled images (labels from <class>/ folders or the list file): "
            f"top1 {cell(m['top1'])}, many {cell(m['many'])}, medium {cell(m['medium'])}, few {cell(m['few'])} "
            f"({m['thresholds']})")


# --------------------------------------------------------------------------------------------- longtail list


def _entry(name: str, doc: str, width: int) -> str:
    # Whole descriptions, wrapped under their column (a long name pushes its text to the next line).
    head = f"  {name:<18} " if len(name) < 19 else f"  {name}\n" + " " * 21
    return textwrap.fill(doc, width, initial_indent=" " * 21, subsequent_indent=" " * 21).replace(
        " " * 21, head, 1) if doc else head.rstrip()


def plugin_listing(width: int) -> str:
    """What ``longtail list`` prints: every registered dataset, backbone, head, method, loss and sampler with its
    description, then the shipped recipes. longtail's own plugins are read from their source (``catalogue``: no
    torch to import); then come the live entries that the source does not name (``--plugin`` modules and entry
    points, imported before), each with the module that registered it."""
    from longtail import registry
    from longtail.config import shipped_configs
    from longtail.plugins import provider

    registries = registry.catalogue()
    lines = []
    for title, var, reg in (("datasets", "DATASETS", registry.DATASETS), ("backbones", "BACKBONES", registry.BACKBONES),
                            ("heads", "HEADS", registry.HEADS), ("methods", "METHODS", registry.METHODS),
                            ("losses (method.base of ifl / mixup)", "LOSSES", registry.LOSSES),
                            ("samplers", "SAMPLERS", registry.SAMPLERS)):
        lines.append(f"{title}:")
        static = registries.get(var, {})
        for name, doc in static.items():
            lines.append(_entry(name, doc, width))
        for name, doc in reg.describe().items():
            if name not in static:
                module = None if name.endswith("<name>") else provider(reg.get(name))
                lines.append(_entry(name, f"{doc}{f' (plugin {module})' if module else ''}", width))
    lines.append("configs (longtail train NAME):")
    lines += [f"  {name}" for name in shipped_configs()]
    return "\n".join(lines)


def options_listing(name: str, found: list[tuple[str, object, type | None, str]], width: int) -> str:
    """What ``longtail list NAME`` prints for a method, head or dataset: for each ``(kind, registered object, its
    options' Config dataclass or None, how an option is set)`` in ``found``, its description and each option of
    that Config with type, default and the comment that documents it."""
    from longtail.registry import describe_options

    blocks = []
    for kind, obj, config_cls, usage in found:
        doc = " ".join((obj.__doc__ or "").split())
        lines = [textwrap.fill(f"{name} ({kind}): {doc}" if doc else f"{name} ({kind})", width)]
        options = describe_options(config_cls) if config_cls is not None else []
        if not options:
            lines.append("\nno options")
        else:
            lines.append(f"\noptions ({usage.format(name=name, opt=options[0][0])}):")
            for opt, tp, default, text in options:
                lines.append(f"  {opt}: {tp} = {default}")
                if text:
                    lines.append(textwrap.fill(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
