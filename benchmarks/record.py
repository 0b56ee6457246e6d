"""Record a finished run as a benchmark result: benchmarks/results/<name>.json.

    python benchmarks/record.py RUN_DIR --name cifar10_lt_r100_ce_s0 [--command "longtail train ..."]

The JSON holds what a reader needs to trust and repeat the figure: method, dataset, ratio, epochs, seed,
top1 / many / medium / few (and precision), the shot thresholds, commit, device, the exact command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from longtail.run_folder import RunDir
from longtail.utils import atomic_write_json


def record(run_dir: Path, name: str, command: str | None, split: str | None, note: str | None,
           out_dir: Path | None = None) -> dict:
    cfg = yaml.safe_load(RunDir(run_dir).config.read_text())
    metrics = json.loads(RunDir(run_dir).metrics.read_text())
    meta = cfg.get("meta", {})
    splits = metrics["splits"]
    split = split or [s for s in splits if s != "val"][0]
    m = splits[split]
    result = {
        "method": " -> ".join(st["method"]["name"] for st in cfg["stages"]),
        "dataset": cfg["data"]["name"],
        "ratio": cfg["data"]["imbalance_ratio"],
        "backbone": cfg["model"]["backbone"],
        "epochs": sum(st["epochs"] for st in cfg["stages"]),
        "seed": cfg["seed"],
        "subset_seed": cfg["data"]["subset_seed"],
        "split": split,
        "top1": m["top1"], "many": m["many"], "medium": m["medium"], "few": m["few"],
        "precision": m.get("precision"),
        "thresholds": metrics.get("thresholds"),
        "selected": metrics.get("selected"),
        "commit": meta.get("commit"),
        "device": meta.get("device"),
        "command": command or meta.get("command"),
        "train_seconds": metrics.get("train_seconds"),
        "finished": metrics.get("finished"),
        "versions": {k: meta.get(k) for k in ("longtail", "torch", "torchvision", "python")},
        "data": meta.get("dataset"),
    }
    if m.get("routes"):  # methods that route samples (DLSA's cascade): count and top1 per route
        result["routes"] = m["routes"]
    if metrics.get("chosen_on_val"):  # prediction-time options chosen on val (tau: val): value, metric, curve
        result["chosen_on_val"] = metrics["chosen_on_val"]
    if metrics.get("method_report"):  # what the method fitted (DLSA: chosen flow lr / epoch, filtered fractions)
        result["method_report"] = metrics["method_report"]
    init = [st["init_from"] for st in cfg["stages"] if st.get("init_from") and "/" in str(st["init_from"])]
    if init:  # stage 2 on top of another run: name the stage-1 weights it used
        result["init_from"] = init
    if note:
        result["note"] = note
    out = Path(out_dir or Path(__file__).parent / "results") / f"{name}.json"
    atomic_write_json(out, result)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", required=True, help="result file name (without .json)")
    p.add_argument("--command", help="the exact command that produced the run (default: the one the run recorded)")
    p.add_argument("--split", help="split to record (default: the first non-val split)")
    p.add_argument("--note", help="free text, e.g. deviations from the paper recipe")
    args = p.parse_args()
    res = record(args.run_dir, args.name, args.command, args.split, args.note)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
