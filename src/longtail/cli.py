"""`longtail` command line: parses arguments, then calls library functions."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from longtail.errors import MissingFileError, UsageError, UserError

EPILOG = """examples:
  longtail train                                   # quickstart: shapes-glt, tiny CNN, ~1 minute on a laptop
  longtail train cifar10_lt/ce data.root=cifar10-jpeg.zip
  longtail train my.yaml stages.0.epochs=10 optim.lr=0.05 --out runs/try1
  longtail train --resume --out runs/try1          # continue an interrupted run
  longtail train --resume --out runs/try1 data.root=/data/cifar10-jpeg.zip   # ... whose data sits elsewhere now
  longtail train my.yaml --out runs/try1 --overwrite   # start again in runs/try1, replacing its run
  longtail eval runs/try1 --split test
  longtail report runs/*
  longtail report runs/ce runs/tde --plot --out cmp.md   # table + figure (cmp.png) of many/medium/few, per class
  longtail predict runs/try1 cat.jpg dog.png
  longtail predict runs/try1 photos/ --out preds.csv   # a folder (recursive), batched; <class>/ folders: accuracy
  longtail export runs/try1 --format onnx --out model.onnx   # one module + model.onnx.json (class names)
  longtail --plugin my_models train my.yaml        # your own registered backbones / heads / datasets / methods
  longtail features runs/try1 --split train,test   # backbone features to runs/try1/features/*.npy
  longtail eval runs/try1 --feature-quality        # head/tail separability of its features (DLSA's measure)
  longtail list
  longtail list tde                                # a method's options, defaults and docs
  longtail train cifar10_lt/ce seed=1 --print-config   # the resolved config, no training
  longtail bench cifar10_lt/tde data.root=cifar10-jpeg.zip   # our epoch vs a plain PyTorch loop
  longtail data glt /data/imagenet/train --weights resnet50.pth --out glt/   # a GLT benchmark of a folder
  longtail data coco-glt /data/coco cocottributes_py3.jbl --out coco_glt/    # MSCOCO-GLT, crops included
"""


def _at_least(value: int, minimum: int, flag: str) -> int:
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from longtail.engine import Interrupted, train
    from longtail.engine.build import load_config

    if args.resume:
        if args.print_config:
            raise UsageError("--print-config shows a new run's config; a resumed run's is its config.yaml")
        moved = list(args.overrides)
        if args.config is not None and "=" in args.config and not Path(args.config).exists():
            moved.insert(0, args.config)  # `--resume --out RUN data.root=NEW`: the argparse CONFIG slot took it
        elif args.config is not None:
            raise UsageError("--resume continues a run with its saved config; drop CONFIG")
        if args.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite starts a new one there: pick one")
        cfg = None
    else:
        moved = []
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not Path(config).exists():
            overrides.insert(0, config)  # `longtail train epochs=3`: no config, only overrides
            config = None
        cfg = load_config(config, overrides)
        cfg.plugins = list(dict.fromkeys([*cfg.plugins, *args.plugins]))  # recorded: eval / predict import them
        if args.print_config:
            import yaml

            from longtail.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
    try:
        run_dir = train(cfg, out=args.out, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                        command=args.command_line, moved=moved)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 alone reports
    from longtail.evaluation.report import load_run, results_table

    run = load_run(run_dir)
    print()
    print(results_table(run["metrics"], title=f"{run_dir.name}: {run['metrics'].get('selected', '')}"))
    if run["metrics"].get("splits_ema"):  # ema.decay: the averaged weights, scored on their own
        print()
        print(results_table({**run["metrics"], "splits": run["metrics"]["splits_ema"]}, title="EMA of the weights"))
    _print_val_checks(run["metrics"])
    from longtail.run_folder import CHECKPOINTS, PLOTS, RUN_FILES

    print(f"\nrun folder: {run_dir}  ({', '.join(RUN_FILES)}, {CHECKPOINTS}/, {PLOTS}/)")
    return 0


def _print_val_checks(metrics: dict) -> None:
    """The prediction-time options chosen on val, and the warnings of ``check_off_values``."""
    for c in metrics.get("chosen_on_val", []):
        print(f"\n{c['option']}={c['value']:g} chosen on val for stage {c['stage']} ({c['metric']} {c['score']:.2f}; "
              f"curve in metrics.json and plots/)")
    for c in metrics.get("off_value_check", []):
        if c.get("warning"):
            print(f"\nwarning: {c['warning']}", file=sys.stderr)
    for note in metrics.get("notes", []):
        print(f"\nnote: {note}", file=sys.stderr)


def _cmd_eval(args: argparse.Namespace) -> int:
    from longtail.engine.inference import load_trained
    from longtail.engine.results import evaluate_trained, record_metrics
    from longtail.evaluation.report import results_table

    if args.feature_quality:
        return _feature_quality(args)
    run = load_trained(args.run_dir, args.set, device=args.device)
    if args.sweep:
        return _sweep(args, run)
    splits = None
    if args.protocol:
        from longtail.engine.inference import protocol_split

        splits = [protocol_split(run.dataset, p.strip()) for p in args.protocol.split(",")]
    elif args.split:
        splits = [s.strip() for s in args.split.split(",")]
    ev = evaluate_trained(run, splits)
    title = f"{Path(args.run_dir).name}" + (f" with {' '.join(args.set)}" if args.set else "")
    print(results_table(ev.metrics, title=title))
    _print_val_checks({"chosen_on_val": ev.choices, "off_value_check": ev.checks, "notes": ev.notes})
    if not args.set and args.write:
        path = record_metrics(args.run_dir, ev.metrics, run.cfg)  # merged: re-evaluating one split keeps the others
        print(f"\nupdated {path}")
    return 0


def _feature_quality(args: argparse.Namespace) -> int:
    """The registered feature evaluation (FEATURE_EVALUATIONS' default) of a run's train/test features."""
    from longtail.engine.inference import load_trained
    from longtail.engine.results import feature_quality, record_metrics
    from longtail.evaluation.report import feature_quality_table

    if args.sweep:
        raise UsageError("--feature-quality and --sweep are separate evaluations: pick one")
    run = load_trained(args.run_dir, device=args.device)
    rep = feature_quality(run, args.split, args.set, device=args.device)
    split = rep["split"]
    print(f"{Path(args.run_dir).name}: feature quality on {split}\n\n{feature_quality_table(rep)}")
    if args.write:
        path = record_metrics(args.run_dir, {"feature_quality": {split: rep}}, run.cfg)
        print(f"\nupdated {path} (feature_quality.{split})")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from longtail.engine.features import export_features, feature_paths

    _at_least(args.batch_size, 1, "--batch-size")
    splits = [s.strip() for s in args.split.split(",")] if args.split else None
    paths = export_features(args.run_dir, splits, batch_size=args.batch_size, device=args.device,
                            progress=not args.quiet, force=args.force)
    for split, path in paths.items():
        print(f"{split}: {path} + {feature_paths(args.run_dir, split)[1].name}")
    return 0


def _sweep(args: argparse.Namespace, run) -> int:
    from longtail.engine.results import save_sweep, sweep_trained
    from longtail.evaluation.report import sweep_table

    sweep = sweep_trained(run, args.sweep, args.split)
    table = sweep_table(sweep.rows, sweep.option)
    print(f"{Path(args.run_dir).name}: {sweep.option} sweep on {sweep.split}\n\n{table}")
    if sweep.split != "val":
        print(f"\nnote: {sweep.split} is not a validation split: read this curve, do not choose {sweep.option} on it")
    stem = save_sweep(args.run_dir, sweep, table)
    print(f"\nwritten: {stem}.json, .md, .png")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from longtail.evaluation.report import common_split, load_runs, runs_table
    from longtail.run_folder import drop_latest_duplicates
    from longtail.utils import atomic_write_text

    def skip(why: str) -> None:
        print(f"warning: skipped {why}", file=sys.stderr)

    names = drop_latest_duplicates(args.run_dirs)
    files = [d for d in names if Path(d).is_file()]  # what a shell glob (runs/*) brings besides the run folders
    if files:
        shown = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        print(f"warning: skipped {len(files)} file(s), not run folders: {shown}", file=sys.stderr)
        names = [d for d in names if d not in files]
        if not names:
            raise UsageError("no run folder among the arguments, only files: give run folders, e.g. runs/*/")
    table = runs_table(names, split=args.split, skip=skip)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
        print(f"\nwritten to {args.out}")
    if args.plot:
        from longtail.evaluation.plots import plot_compare

        runs = load_runs(names, skip=lambda why: None)  # (skipped ones were warned about above)
        split = args.split or common_split(runs)
        path = Path(args.out).with_suffix(".png") if args.out else Path("report.png")
        plot_compare({r["name"]: r["metrics"] for r in runs}, split, path,
                     title=f"{len(runs)} run(s) on {split}: many / medium / few and per-class accuracy")
        print(f"{'' if args.out else chr(10)}plot: {path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from longtail.engine.inference import collect_inputs, load_model, predict_to
    from longtail.evaluation.report import prediction_accuracy

    _at_least(args.topk, 1, "--topk")
    _at_least(args.batch_size, 1, "--batch-size")
    _at_least(args.num_workers, 0, "--num-workers")
    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {args.out}: write predictions to a .csv or .json file")
    missing = next((p for p in args.inputs if not Path(p).exists()), None)
    if missing is not None:  # before the model loads: a typo fails at once
        raise MissingFileError(f"{missing}: no such image, folder or list file")
    model = load_model(args.run_dir, args.set, device=args.device)
    samples = collect_inputs(args.inputs, model.class_names)
    res = predict_to(model, samples, args.out, args.topk, args.batch_size, args.num_workers,
                     progress=not args.quiet, echo=print)
    if args.out is not None:
        print(f"{res['count']} predictions written to {args.out}")
    accuracy = prediction_accuracy(res)
    if accuracy is not None:
        print(accuracy)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from longtail.engine.export import export_model
    from longtail.engine.inference import load_model

    model = load_model(args.run_dir, args.set, device="cpu")
    out = export_model(model, format=args.format, out=args.out, input=args.input)
    print(f"wrote {out} ({args.format}; input: (batch, 3, {model.info.image_size}, {model.info.image_size}) "
          f"{args.input} images, resized to {model.info.resize} and centre-cropped) and {out}.json (class names, "
          f"preprocessing)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from longtail.engine.bench import default_record_path, run_bench
    from longtail.engine.build import load_config
    from longtail.utils import atomic_write_json

    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1 (2 or more: the first is a warm-up and not counted)")
    cfg = load_config(args.config, list(args.overrides))
    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    res, record = run_bench(cfg, epochs=args.epochs, reference=not args.no_reference,
                            ceiling_too=not args.no_ceiling, rounds=args.rounds)
    print(f"\n{record['recipe']} on {record['device']}, batch {record['batch_size']}, "
          f"{record['epochs_timed']} timed epoch(s), {args.rounds} round(s)")
    print(f"  longtail fit loop     : {res.images_per_s:10.1f} images/s   peak {res.peak_memory_mb:.0f} MB")
    if res.reference_images_per_s is not None:
        style = res.anchors["reference_style"]
        print(f"  plain loop            : {res.reference_images_per_s:10.1f} images/s   ours {res.ratio:.2f}x")
        print(f"  reference-style loop  : {style['images_per_s']:10.1f} images/s   ours {style['ours_over_it']:.2f}x"
              f"  (with its per-epoch test pass: {style['with_eval_images_per_s']:.1f}, ours "
              f"{style['ours_over_it_with_eval']:.2f}x)")
    if "ceiling" in res.anchors:
        c = res.anchors["ceiling"]
        print(f"  ceiling (no data path): {c['images_per_s']:10.1f} images/s   ours {c['ours_pct_of_ceiling']:.0f}% "
              f"of it; fp32 matmul peak {c['matmul_peak_gflops_fp32']:.0f} GFLOP/s, ours "
              f"{c['throughput']['ours']['pct_of_matmul_peak']:.1f}% of it")
    if args.json != "-":
        path = Path(args.json) if args.json else default_record_path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        print(f"\nwrote {path}")
    return 0


def _cmd_data_glt(args: argparse.Namespace) -> int:
    from longtail.data.glt_build import build_glt_benchmark

    for flag, minimum in (("image_size", 1), ("clusters", 1), ("test_per_class", 0), ("val_per_class", 0),
                          ("batch_size", 1), ("num_workers", 0)):
        _at_least(getattr(args, flag), minimum, "--" + flag.replace("_", "-"))
    _at_least(args.cbl_per_class, 1, "--cbl-per-class")
    if not args.imbalance_ratio >= 1:
        raise UsageError(f"--imbalance-ratio is n_max / n_min and must be >= 1, got {args.imbalance_ratio}")
    res = build_glt_benchmark(args.root, args.out, name=args.name, weights=args.weights, backbone=args.backbone,
                              image_size=args.image_size, clusters=args.clusters, test_per_class=args.test_per_class,
                              val_per_class=args.val_per_class, budgets=args.budgets,
                              imbalance_ratio=args.imbalance_ratio, cbl_per_class=args.cbl_per_class,
                              select=args.select, normalize=args.normalize, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, num_workers=args.num_workers)
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"{res['classes']} classes; images per split:")
    for variant, sizes in res["sizes"].items():
        print(f"  {res['files'][variant]}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    print(f"train with: longtail train CONFIG data.name=glt data.root={args.root} "
          f"data.options.annotation={res['files']['lt']}  "
          f"(Train-CBL / ALT: data.options.annotation={res['files']['cbl']})")
    return 0


def _cmd_data_coco_glt(args: argparse.Namespace) -> int:
    from longtail.data.coco_glt_build import build_coco_glt

    _at_least(args.test_per_class, 2, "--test-per-class")
    _at_least(args.val_per_class, 0, "--val-per-class")
    if not 0 < args.imbalance_factor <= 1:
        raise UsageError(f"--imbalance-factor is n_min / n_max in (0, 1], got {args.imbalance_factor}")
    res = build_coco_glt(args.coco_root, args.attributes, args.out, seed=args.seed,
                         test_per_class=args.test_per_class, val_per_class=args.val_per_class,
                         imbalance_factor=args.imbalance_factor, crops=args.crops)
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"{len(res['classes'])} classes; objects per split:")
    for variant, sizes in res["sizes"].items():
        print(f"  {res['files'][variant]}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    print(f"train with: longtail train mscoco_glt/ce data.root={args.out} "
          f"data.options.annotation={res['files']['lt']}  "
          f"(Train-CBL / ALT: data.options.annotation={res['files']['bl']})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import shutil

    from longtail.evaluation.report import options_listing, plugin_listing

    width = max(80, min(120, shutil.get_terminal_size((100, 24)).columns))
    if args.method:
        print(options_listing(args.method, _registered_as(args.method), width))
        return 0
    print(plugin_listing(width))
    return 0


# What `longtail list NAME` shows the options of: (registry, kind, the package that fills it, how an option is set).
_OPTION_KINDS = (
    ("METHODS", "method", "longtail.methods",
     "method.OPTION=VALUE in a recipe stage, or e.g. stages.0.method.{opt}=... on the command line"),
    ("HEADS", "head", "longtail.models",
     "model: {{head: {{name: {name}, OPTION: VALUE}}}} in a recipe, or e.g. model.head.{opt}=... on the command "
     "line"),
    ("DATASETS", "dataset", "longtail.data",
     "data: {{name: {name}, options: {{OPTION: VALUE}}}} in a recipe, or e.g. data.options.{opt}=... on the "
     "command line"),
)


def _registered_as(name: str) -> list[tuple[str, object, type | None, str]]:
    """``(kind, registered object, its options' Config or None, how an option is set)`` for each registry of
    methods, heads and datasets that holds ``name``; a RegistryError with close matches when none does."""
    import difflib
    import importlib

    from longtail import registry
    from longtail.config import options_of

    found, known = [], []
    for var, kind, package, usage in _OPTION_KINDS:
        importlib.import_module(package)  # fills the registry
        reg = getattr(registry, var)
        known += list(reg)
        if name in reg:
            obj = reg.get(name)
            found.append((kind, obj, options_of(obj), usage))  # a method's Config, or a head's / dataset's
    if not found:
        close = difflib.get_close_matches(name.strip().lower().replace("-", "_"), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise registry.RegistryError(f"unknown method, head or dataset '{name}'{hint} (`longtail list` shows them)")
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtail", description="Train, evaluate and compare long-tailed image "
                                "classifiers.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from longtail import __version__

    p.add_argument("--version", action="version", version=f"longtail {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: LONGTAIL_DEBUG=1)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: your own datasets, backbones, heads, samplers or methods registered "
                        "there work with every command (a run records it; repeatable)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe (default: the quickstart)",
                       description="Train a recipe made of stages, evaluate it, and write a run folder.",
                       epilog="CONFIG is a YAML file or a shipped recipe name (see `longtail list`). key=value "
                              "overrides any config field, e.g. stages.0.epochs=5, data.root=/data/cifar, "
                              "seed=1; stage keys (epochs, optim.lr, method.x) apply to a one-stage recipe.")
    t.add_argument("config", nargs="?", help="recipe file or shipped recipe name (default: quickstart)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (it ends at the weights it would have reached "
                        "without the interruption); key=value may only move its files, e.g. data.root=/new/path "
                        "for a run folder copied to another machine")
    t.add_argument("--overwrite", action="store_true",
                   help="start even when --out holds a run or other files: its config.yaml, metrics.json, train.log, "
                        "checkpoints/, plots/, sweeps/, features/ and export/ are removed first (other files are kept)")
    t.add_argument("--quiet", action="store_true", help="no progress bars (the data's decoding and checks included)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML: the recipe with its overrides and every default) and exit")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a finished run", description="Re-evaluate a finished run "
                       "with its final weights; --set changes prediction-time method options (method.OPTION=val "
                       "chooses one on the run's val split). When the run has a val split, a prediction-time "
                       "correction (TDE's alpha) is also scored there against its off value (alpha 0, De-confound), "
                       "with a warning when it costs accuracy.")
    e.add_argument("run_dir")
    e.add_argument("--split", help="comma-separated splits (default: val if present, then the test splits)")
    e.add_argument("--protocol", help="GLT protocol(s) instead of splits: CLT, GLT (Train-GLT runs), ALT "
                   "(Train-CBL runs), comma-separated")
    e.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="prediction-time override, e.g. method.alpha=2.0, or method.alpha=val to choose it on the "
                        "run's val split (printed, metrics.json untouched)")
    e.add_argument("--sweep", metavar="method.OPTION=START:STOP:STEP",
                   help="metrics against a prediction-time option, e.g. method.alpha=0:3:0.25 (on --split, "
                        "default val if present); writes a table and a plot to RUN_DIR/sweeps/")
    e.add_argument("--feature-quality", action="store_true",
                   help="DLSA's feature evaluation: how well one flow filter separates head from tail classes in "
                        "the run's features (train features fit it; --split: the evaluated split, default test); "
                        "--set method.OPTION=V sets dlsa options (e.g. method.clusters=50)")
    e.add_argument("--no-write", dest="write", action="store_false", help="do not update metrics.json")
    e.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("report", help="one markdown table comparing runs",
                       description="One markdown table of finished runs: a row per run and evaluated split with "
                                   "top-1, many / medium / few-shot accuracy and precision (GLT protocols labelled), "
                                   "epochs per stage and the run each stage started from.")
    r.add_argument("run_dirs", nargs="+", help="run folders (each with metrics.json; unfinished ones are skipped "
                   "with a warning), e.g. runs/*/ or runs/latest")
    r.add_argument("--split", help="only this split, e.g. test (default: every evaluated split)")
    r.add_argument("--out", help="also write the table to this markdown file")
    r.add_argument("--plot", action="store_true",
                   help="also draw the runs in one figure: grouped many / medium / few bars and per-class accuracy "
                        "curves head -> tail, of --split (default test) to --out's name with .png, else report.png")
    r.set_defaults(func=_cmd_report)

    pr = sub.add_parser("predict", help="top-k classes of images, folders and list files",
                        description="Classify images with a finished run's final weights, from the run folder alone "
                                    "(the training data is not needed), with the prediction-time settings of its "
                                    "method (e.g. TDE's alpha) as recorded. Images stream through in batches.",
                        epilog="PATH: an image file, a folder (searched recursively; images under a first-level "
                               "sub-folder named after a class are labelled with it), or a list file (.txt, .lst: "
                               "an image path per line, relative to the list file, optionally followed by a class "
                               "name or index). With labels, the many / medium / few accuracy is printed too.")
    pr.add_argument("run_dir", help="a finished run folder")
    pr.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders and list files")
    pr.add_argument("--out", help="write the predictions to this .csv or .json file (path, label, top-k classes "
                    "and probabilities) instead of printing them")
    pr.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    pr.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    pr.add_argument("--num-workers", type=int, default=2, help="image decoding processes (default 2; 0: in this one)")
    pr.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="prediction-time override, e.g. method.alpha=2.0")
    pr.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="one TorchScript / ONNX module of a finished run",
                        description="Export a finished run to one module that maps a batch of images to the "
                                    "method's final scores, with the normalisation and its prediction-time "
                                    "settings (TDE, logit adjustment, tau-norm, NCM, DLSA's cascade) baked in; "
                                    "FILE.json beside it holds the class names and the preprocessing. Loading it "
                                    "needs only PyTorch (TorchScript) or onnxruntime (ONNX). The module is checked "
                                    "against predict before it is written.")
    ex.add_argument("run_dir", help="a finished run folder")
    ex.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript",
                    help="torchscript (default; torch.jit.load) or onnx (needs: pip install 'longtail[export]')")
    ex.add_argument("--out", help="file to write (default RUN_DIR/export/model.pt or model.onnx)")
    ex.add_argument("--input", choices=["uint8", "float", "normalized"], default="uint8",
                    help="what the module takes: uint8 RGB images 0-255 (default; torchvision.io.read_image), "
                         "float images in [0, 1] (ToTensor), or images already normalised with the run's mean/std")
    ex.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="prediction-time override baked into the module, e.g. method.alpha=2.0")
    ex.set_defaults(func=_cmd_export)

    fe = sub.add_parser("features", help="extract a run's backbone features to RUN_DIR/features/",
                        description="Write the final weights' backbone features (eval mode, no augmentation) of "
                        "each split to RUN_DIR/features/<split>.npy (float32, memory-mappable) with "
                        "<split>_labels.npy; files made from the current weights and config are re-used.")
    fe.add_argument("run_dir")
    fe.add_argument("--split", help="comma-separated splits (default: every split of the run's dataset)")
    fe.add_argument("--batch-size", type=int, default=512)
    fe.add_argument("--force", action="store_true", help="re-extract even when the files are current")
    fe.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    fe.set_defaults(func=_cmd_features)

    bn = sub.add_parser("bench", help="time training epochs of a recipe against two plain loops and the ceiling",
                        description="Time EPOCHS training epochs of the recipe's first stage in longtail's fit loop, "
                        "in a plain PyTorch loop (transforms v2 per image, a DataLoader, the same model and "
                        "optimiser), in a re-creation of the TDE authors' data path (PIL per image, a DataLoader, "
                        "the test split scored every epoch), and the bare training step on synthetic tensors (the "
                        "ceiling) with the fp32 matmul peak; print images/s, ratios and shares of peak, and write "
                        "a JSON record. The first epoch is a warm-up and not counted.")
    bn.add_argument("config", nargs="?", default="cifar10_lt/tde", help="recipe (default: cifar10_lt/tde)")
    bn.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=cifar10-jpeg.zip")
    bn.add_argument("--epochs", type=int, default=2, help="epochs to run in each loop (default 2)")
    bn.add_argument("--no-reference", action="store_true", help="skip the plain and reference-style loops")
    bn.add_argument("--no-ceiling", action="store_true", help="skip the ceiling (bare step on synthetic tensors) "
                    "and the matmul peak")
    bn.add_argument("--rounds", type=int, default=1, help="interleave the loops this many times and report "
                    "medians (default 1)")
    bn.add_argument("--json", default=None,
                    help="where to write the record (default benchmarks/results/bench_RECIPE_DEVICE.json; - for none)")
    bn.set_defaults(func=_cmd_bench)
    da = sub.add_parser("data", help="build benchmark files from your data (GLT, MSCOCO-GLT)")
    dsub = da.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    dg = dsub.add_parser("glt", help="make a GLT benchmark (ImageNet-GLT procedure) of an image folder",
                         description="Cluster each class's pretrained features into pseudo-attributes (k-means, "
                         "seeded), then write Train-GLT and Train-CBL annotation files with the Test-CBL, Test-GBL, "
                         "Test-GLT and val splits of the ImageNet-GLT procedure (spec glt_ifl.md 2.1). ROOT holds "
                         "<class>/<image> (ILSVRC-2012 train for ImageNet-GLT). Features are cached in --out.")
    dg.add_argument("root", help="image folder: ROOT/<class>/<image> (or ROOT/train/<class>/<image>)")
    dg.add_argument("--out", required=True, help="folder for the annotation files")
    dg.add_argument("--weights", help="local pretrained weights for the backbone (torchvision ResNet-50 file)")
    dg.add_argument("--backbone", default="resnet50", help="registered backbone for the features (default resnet50)")
    dg.add_argument("--name", default="glt", help="file name prefix (default glt)")
    dg.add_argument("--image-size", type=int, default=256, help="center crop side for features (default 256)")
    dg.add_argument("--clusters", type=int, default=6, help="k-means clusters per class, merged into 3 groups")
    dg.add_argument("--test-per-class", type=int, default=60,
                    help="Test-CBL / Test-GBL images per class (60: 42/12/6 and 20 per group); Test-GLT takes this "
                         "many times the class count")
    dg.add_argument("--val-per-class", type=int, default=30, help="val images per class (30; Train-CBL: 21/6/3)")
    dg.add_argument("--budgets", help="Train-GLT images per class, largest class first: the authors' "
                    "_ImageNetGeneration/long-tail-distribution.pytorch (ImageNet-GLT), a JSON list or a text file")
    dg.add_argument("--imbalance-ratio", type=float, default=20.0,
                    help="without --budgets: an exp profile of this ratio from the largest class (default 20, the "
                         "reference script's exp alternative)")
    dg.add_argument("--cbl-per-class", type=int, default=145,
                    help="Train-CBL images per class before val, min(this, n) (default 145: 101/29/14)")
    dg.add_argument("--select", choices=("front", "random"), default="front",
                    help="front: take each group's images in cluster / file order as the reference; random: shuffled")
    dg.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False,
                    help="normalise pixels by the ImageNet mean / std before the features (the reference does not)")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--batch-size", type=int, default=64)
    dg.add_argument("--device", default="cpu")
    dg.add_argument("--num-workers", type=int, default=2)
    dg.set_defaults(func=_cmd_data_glt)
    dc = dsub.add_parser("coco-glt", help="make MSCOCO-GLT from COCO 2014 and COCO-Attributes (with the crops)",
                         description="Join COCO-Attributes objects with their COCO 2014 train+val instances, write "
                         "the Train-GLT and Train-CBL annotation files of the authors' procedure (spec glt_ifl.md "
                         "2.2) and crop every object to OUT/images/<id>.jpg. Deterministic for --seed.")
    dc.add_argument("coco_root", help="COCO 2014: annotations/instances_{train,val}2014.json and train2014/, val2014/")
    dc.add_argument("attributes", help="COCO-Attributes: cocottributes .jbl / .pkl (a pickle: only the published "
                    "file), the same layout as JSON, or a JSON {annotation id: [votes]}")
    dc.add_argument("--out", required=True, help="output folder (annotation files and images/)")
    dc.add_argument("--seed", type=int, default=25, help="seed of every random draw (default 25, the reference's)")
    dc.add_argument("--test-per-class", type=int, default=200,
                    help="Train-GLT file: Test-GBL / Test-CBL objects per class (200; the Train-CBL file: half)")
    dc.add_argument("--val-per-class", type=int, default=100, help="val objects per class (100; Train-CBL: half)")
    dc.add_argument("--imbalance-factor", type=float, default=0.005,
                    help="Train-GLT: n_i = min(n_max * f^(i / (C - 1)), n_i) (default 0.005)")
    dc.add_argument("--crops", action=argparse.BooleanOptionalAction, default=True,
                    help="crop the objects (--no-crops: the annotation files only)")
    dc.set_defaults(func=_cmd_data_coco_glt)

    ls = sub.add_parser("list", help="registered datasets, backbones, heads, methods, samplers and recipes",
                        description="Without NAME: every registered plugin and shipped recipe. With NAME, a method, "
                                    "head or dataset: its options (method.OPTION, model.head.OPTION, "
                                    "data.options.OPTION in a recipe or on the command line), their types, defaults "
                                    "and what they do.")
    ls.add_argument("method", nargs="?", metavar="NAME",
                    help="a registered method, head or dataset, e.g. ldam_drw, causal_norm, shapes_glt: its options")
    ls.set_defaults(func=_cmd_list)
    # `--debug` also after the command (`longtail train ... --debug`); SUPPRESS keeps the main parser's value
    # when a sub-command does not see it.
    for parser in (t, e, r, pr, ex, fe, bn, dg, dc, ls):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--plugin", action="append", dest="plugin_after", default=[], metavar="MODULE",
                            help="import MODULE first (your own registered components; see longtail --help)")
    return p


def _command_at(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """Index of the sub-command in ``argv``: the first word that is neither a top-level option nor its value."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word == "-":
            return i
        action = parser._option_string_actions.get(word.split("=", 1)[0])
        takes_value = action is not None and action.nargs != 0 and "=" not in word
        i += 2 if takes_value else 1
    return None


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with a sub-command's options and positionals in any order
    (``longtail train quickstart --out X key=v``): plain argparse stops collecting ``key=value`` positionals
    at the first option and calls the rest "unrecognized arguments". The top-level options (``--debug``,
    ``--version``, ``--help``) come before the command, so the command is the first word that is not an
    option (nor the value of one); the sub-command's own parser then reads the rest with ``parse_intermixed_args``."""
    at = _command_at(parser, argv)
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if at is None or subs is None or argv[at] not in subs.choices:
        return parser.parse_args(argv)  # no command, or an unknown one: argparse's own message
    args = parser.parse_args(argv[:at])  # the top-level options alone
    try:
        subs.choices[argv[at]].parse_intermixed_args(argv[at + 1:], namespace=args)
    except TypeError:  # a command with sub-commands of its own (`data glt`): argparse cannot intermix those
        return parser.parse_args(argv)
    args.command = argv[at]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (any ``longtail.errors.UserError``: a setting, a file, a flag) is one
    line on stderr and exit code 2; anything else is a bug and keeps its traceback. ``--debug`` shows the
    traceback of user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.command_line = "longtail " + shlex.join(argv)  # recorded in a new run's log
    debug = args.debug or os.environ.get("LONGTAIL_DEBUG", "") not in ("", "0")
    args.plugins = [*args.plugin, *getattr(args, "plugin_after", [])]
    try:
        from longtail.plugins import load_entry_points, load_plugins
        from longtail.progress import progress_bars

        load_entry_points()
        load_plugins(args.plugins, needed_by="--plugin")
        with progress_bars(not getattr(args, "quiet", False)):  # --quiet: no bar at all, the data's included
            return args.func(args)
    except UserError as e:
        if debug:
            raise
        from longtail.utils import display_name

        print(f"error: {display_name(' '.join(str(e).split()))}", file=sys.stderr)  # one line, printable
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `longtail report ... | head`: the reader left; no traceback (Python docs recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
