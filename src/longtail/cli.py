"""`longtail` command line: parses arguments, then calls library functions."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from longtail.errors import UsageError, UserError

EPILOG = """examples:
  longtail train                                   # quickstart: shapes-glt, tiny CNN, ~1 minute on a laptop
  longtail train cifar10_lt/ce data.root=cifar10-jpeg.zip
  longtail train my.yaml stages.0.epochs=10 optim.lr=0.05 --out runs/try1
  longtail train --resume --out runs/try1          # continue an interrupted run
  longtail train my.yaml --out runs/try1 --overwrite   # start again in runs/try1, replacing its run
  longtail eval runs/try1 --split test
  longtail report runs/*
  longtail predict runs/try1 cat.jpg dog.png
  longtail features runs/try1 --split train,test   # backbone features to runs/try1/features/*.npy
  longtail eval runs/try1 --feature-quality        # head/tail separability of its features (DLSA's measure)
  longtail list
  longtail bench cifar10_lt/tde data.root=cifar10-jpeg.zip   # our epoch vs a plain PyTorch loop
  longtail data glt /data/imagenet/train --weights resnet50.pth --out glt/   # a GLT benchmark of a folder
  longtail data coco-glt /data/coco cocottributes_py3.jbl --out coco_glt/    # MSCOCO-GLT, crops included
"""


def _at_least(value: int, minimum: int, flag: str) -> int:
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from longtail.config import load_config
    from longtail.engine import Interrupted, train

    if args.resume:
        if args.config or args.overrides:
            raise UsageError("--resume continues a run with its saved config; drop CONFIG and key=value")
        if args.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite starts a new one there: pick one")
        cfg = None
    else:
        config, overrides = args.config, list(args.overrides)
        if config is not None and "=" in config and not Path(config).exists():
            overrides.insert(0, config)  # `longtail train epochs=3`: no config, only overrides
            config = None
        cfg = load_config(config, overrides)
    try:
        run_dir = train(cfg, out=args.out, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                        command=args.command_line)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 alone reports
    from longtail.evaluation.report import load_run, results_table

    run = load_run(run_dir)
    print()
    print(results_table(run["metrics"], title=f"{run_dir.name}: {run['metrics'].get('selected', '')}"))
    print(f"\nrun folder: {run_dir}  (config.yaml, metrics.json, train.log, checkpoints/, plots/)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from longtail.engine.fit import evaluate_run, write_metrics
    from longtail.engine.inference import load_trained
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
        unknown = [s for s in splits if s not in run.dataset.splits]
        if unknown:
            raise UsageError(f"no split {unknown[0]!r}; this run has {', '.join(run.dataset.splits)}")
    metrics = evaluate_run(run.method, run.loader, run.cfg, splits=splits)
    title = f"{Path(args.run_dir).name}" + (f" with {' '.join(args.set)}" if args.set else "")
    print(results_table(metrics, title=title))
    if not args.set and args.write:
        # Merge into metrics.json: re-evaluating one split keeps the others.
        from longtail.evaluation.report import read_metrics

        path = Path(args.run_dir) / "metrics.json"
        old = read_metrics(path) if path.is_file() else {}
        merged = {**old, **{k: v for k, v in metrics.items() if k != "splits"},
                  "splits": {**old.get("splits", {}), **metrics["splits"]}}
        write_metrics(Path(args.run_dir), merged, run.cfg)
        print(f"\nupdated {path}")
    return 0


def _feature_quality(args: argparse.Namespace) -> int:
    """DLSA's feature evaluation (our interpretation, spec dlsa.md section 8) of a run's train/test features."""
    import numpy as np
    import torch

    from longtail.config import ConfigError, from_dict, parse_override
    from longtail.engine.evaluate import thresholds_of
    from longtail.engine.features import export_features, load_features
    from longtail.engine.fit import write_metrics
    from longtail.engine.inference import load_trained
    from longtail.methods.dlsa import DLSAConfig, evaluate_features

    if args.sweep:
        raise UsageError("--feature-quality and --sweep are separate evaluations: pick one")
    run = load_trained(args.run_dir, device=args.device)
    split = args.split or run.dataset.eval_splits[0]
    if "," in split or split not in run.dataset.splits or split == "train":
        raise UsageError(f"--feature-quality takes one evaluation split, got {split!r} "
                         f"(this run has {', '.join(run.dataset.splits)})")
    # The flow filter's options: the run's own when it is a dlsa run, else the defaults; --set method.X=V
    # changes them (e.g. method.clusters=50 for a 10-class dataset).
    last = run.cfg.stages[-1].method
    opts = {k: v for k, v in last.items() if k != "name"} if last["name"] == "dlsa" else {}
    for o in args.set:
        key, _, value = o.partition("=")
        if not key.startswith("method."):
            raise UsageError(f"with --feature-quality, --set takes method.OPTION=VALUE of dlsa, got {o!r}")
        opts[key.split(".", 1)[1]] = parse_override(o)[1]
    try:
        fq_cfg = from_dict(DLSAConfig, opts, "method")
    except ConfigError as e:
        raise UsageError(str(e)) from None
    export_features(args.run_dir, ["train", split], device=args.device)
    dev = run.loader.device
    (tr_f, tr_y), (te_f, te_y) = load_features(args.run_dir, "train"), load_features(args.run_dir, split)
    rep = evaluate_features(torch.from_numpy(np.array(tr_f)).to(dev), torch.from_numpy(tr_y).to(dev),
                            torch.from_numpy(np.array(te_f)).to(dev), torch.from_numpy(te_y).to(dev),
                            run.dataset.num_classes, thresholds_of(run.cfg.eval), fq_cfg)
    rep["split"] = split
    print(f"{Path(args.run_dir).name}: feature quality on {split}\n\n{feature_quality_table(rep)}")
    if args.write:
        from longtail.evaluation.report import read_metrics

        path = Path(args.run_dir) / "metrics.json"
        old = read_metrics(path) if path.is_file() else {}
        old.setdefault("feature_quality", {})[split] = rep
        write_metrics(Path(args.run_dir), old, run.cfg)
        print(f"\nupdated {path} (feature_quality.{split})")
    return 0


def feature_quality_table(rep: dict) -> str:
    """Markdown summary of ``evaluate_features``: class composition and accuracy of the filtered subset."""

    def cell(v):
        return "–" if v is None else f"{v:.1f}"

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
    from longtail.engine.evaluate import parse_sweep, sweep_option
    from longtail.evaluation.plots import plot_sweep
    from longtail.utils import atomic_write_json, atomic_write_text

    option, values = parse_sweep(args.sweep)
    split = args.split or ("val" if "val" in run.dataset.splits else run.dataset.eval_splits[0])
    if split not in run.dataset.splits:
        raise UsageError(f"no split {split!r}; this run has {', '.join(run.dataset.splits)}")
    rows = sweep_option(run.method, run.loader, split, option, values, run.cfg.eval, run.cfg.amp)

    def cell(v):
        return "–" if v is None else f"{v:.2f}"

    lines = [f"| {option} | top1 | many | medium | few | precision |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[option]:g} | " + " | ".join(cell(r[k]) for k in ("top1", "many", "medium", "few", "precision"))
              + " |" for r in rows]
    table = "\n".join(lines)
    print(f"{Path(args.run_dir).name}: {option} sweep on {split}\n\n{table}")
    if split != "val":
        print(f"\nnote: {split} is not a validation split: read this curve, do not choose {option} on it")
    out = Path(args.run_dir) / "sweeps"
    stem = f"{option}_{split}"
    atomic_write_json(out / f"{stem}.json", {"option": option, "split": split, "rows": rows})
    atomic_write_text(out / f"{stem}.md", table + "\n")
    plot_sweep(rows, option, out / f"{stem}.png", title=f"{Path(args.run_dir).name}: {option} on {split}")
    print(f"\nwritten: {out / stem}.json, .md, .png")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from longtail.evaluation.report import runs_table
    from longtail.utils import atomic_write_text

    table = runs_table(args.run_dirs, split=args.split)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
        print(f"\nwritten to {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from longtail.engine.inference import load_trained, predict_images
    from longtail.utils import display_name

    _at_least(args.topk, 1, "--topk")
    run = load_trained(args.run_dir, device=args.device)
    for path, top in zip(args.images, predict_images(run, args.images, args.topk), strict=True):
        print(display_name(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top)))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from longtail.config import load_config
    from longtail.engine.bench import run_bench
    from longtail.utils import atomic_write_json

    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1 (2 or more: the first is a warm-up and not counted)")
    cfg = load_config(args.config, list(args.overrides))
    res, record = run_bench(cfg, epochs=args.epochs, reference=not args.no_reference)
    print(f"\n{record['recipe']} on {record['device']}, batch {record['batch_size']}, "
          f"{record['epochs_timed']} timed epoch(s)")
    print(f"  longtail fit loop : {res.images_per_s:10.1f} images/s   peak {res.peak_memory_mb:.0f} MB")
    if res.reference_images_per_s is not None:
        print(f"  reference loop    : {res.reference_images_per_s:10.1f} images/s")
        print(f"  ratio             : {res.ratio:10.2f}x")
    if args.json != "-":
        device = re.sub(r"[^A-Za-z0-9]+", "_", record["device"].split(" (")[0]).strip("_")
        path = Path(args.json or f"benchmarks/results/bench_{record['recipe']}_{device}.json")
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
          f"data.annotation={res['files']['lt']}  (Train-CBL / ALT: data.annotation={res['files']['cbl']})")
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
    print(f"train with: longtail train mscoco_glt/ce data.root={args.out} data.annotation={res['files']['lt']}  "
          f"(Train-CBL / ALT: data.annotation={res['files']['bl']})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import longtail  # noqa: F401  (fills every registry)
    from longtail import registry
    from longtail.config import shipped_configs

    for title, reg in (("datasets", registry.DATASETS), ("backbones", registry.BACKBONES),
                       ("heads", registry.HEADS), ("methods", registry.METHODS), ("samplers", registry.SAMPLERS)):
        print(f"{title}:")
        for name, doc in reg.describe().items():
            print(f"  {name:<18} {doc}")
    print("configs (longtail train NAME):")
    for name in shipped_configs():
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtail", description="Train, evaluate and compare long-tailed image "
                                "classifiers.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from longtail import __version__

    p.add_argument("--version", action="version", version=f"longtail {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: LONGTAIL_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe (default: the quickstart)",
                       description="Train a recipe made of stages, evaluate it, and write a run folder.",
                       epilog="CONFIG is a YAML file or a shipped recipe name (see `longtail list`). key=value "
                              "overrides any config field, e.g. stages.0.epochs=5, data.root=/data/cifar, "
                              "seed=1; stage keys (epochs, optim.lr, method.x) apply to a one-stage recipe.")
    t.add_argument("config", nargs="?", help="recipe file or shipped recipe name (default: quickstart)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.add_argument("--out", help="run folder (default: runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="start even when --out holds a run or other files: its config.yaml, metrics.json, train.log, "
                        "checkpoints/, plots/, sweeps/ and features/ are removed first (other files are kept)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a finished run", description="Re-evaluate a finished run "
                       "with its final weights; --set changes prediction-time method options.")
    e.add_argument("run_dir")
    e.add_argument("--split", help="comma-separated splits (default: val if present, then the test splits)")
    e.add_argument("--protocol", help="GLT protocol(s) instead of splits: CLT, GLT (Train-GLT runs), ALT "
                   "(Train-CBL runs), comma-separated")
    e.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="prediction-time override, e.g. method.alpha=2.0 (printed, metrics.json untouched)")
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
    r.add_argument("run_dirs", nargs="+", help="finished run folders (each with metrics.json)")
    r.add_argument("--split", help="only this split, e.g. test (default: every evaluated split)")
    r.add_argument("--out", help="also write the table to this markdown file")
    r.set_defaults(func=_cmd_report)

    pr = sub.add_parser("predict", help="top-k classes of image files",
                        description="Classify image files with a finished run's final weights (prediction-time "
                                    "settings of its method, e.g. TDE's alpha, as recorded).")
    pr.add_argument("run_dir", help="a finished run folder")
    pr.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    pr.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    pr.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    pr.set_defaults(func=_cmd_predict)

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

    bn = sub.add_parser("bench", help="time training epochs of a recipe against a plain PyTorch loop",
                        description="Time EPOCHS training epochs of the recipe's first stage in longtail's fit loop "
                        "and in a plain reference loop (torchvision transforms per image, a DataLoader, the same "
                        "model and optimiser), print images/s and their ratio, and write a JSON record. The "
                        "first epoch is a warm-up and not counted.")
    bn.add_argument("config", nargs="?", default="cifar10_lt/tde", help="recipe (default: cifar10_lt/tde)")
    bn.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=cifar10-jpeg.zip")
    bn.add_argument("--epochs", type=int, default=2, help="epochs to run in each loop (default 2)")
    bn.add_argument("--no-reference", action="store_true", help="time only longtail's loop")
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

    ls = sub.add_parser("list", help="registered datasets, backbones, heads, methods, samplers and recipes")
    ls.set_defaults(func=_cmd_list)
    # `--debug` also after the command (`longtail train ... --debug`); SUPPRESS keeps the main parser's value
    # when a sub-command does not see it.
    for parser in (t, e, r, pr, fe, bn, dg, dc, ls):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (any ``longtail.errors.UserError``: a setting, a file, a flag) is one
    line on stderr and exit code 2; anything else is a bug and keeps its traceback. ``--debug`` shows the
    traceback of user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.command_line = "longtail " + shlex.join(argv)  # recorded in a new run's log
    debug = args.debug or os.environ.get("LONGTAIL_DEBUG", "") not in ("", "0")
    try:
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
