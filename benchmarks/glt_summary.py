"""Summarise GLT runs over seeds: mean +- std of accuracy and macro precision per protocol (CLT / GLT / ALT).

    python benchmarks/glt_summary.py RUNS_ROOT --name shapes_glt_ifl \
        --method ce --method balanced_softmax --method ifl --seeds 0 1 2

expects run folders RUNS_ROOT/<method>_<lt|cbl>_s<seed> (Train-GLT runs give CLT and GLT, Train-CBL runs ALT)
and writes results/<name>.json and results/<name>.md with the commands the runs recorded. ``--with RECORD.json``
puts the rows of an earlier record (e.g. results/shapes_glt_ifl.json) above the new ones, each marked with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from longtail.run_folder import RunDir
from longtail.utils import atomic_write_json

METRICS = ("top1", "precision", "many", "medium", "few")


def _stats(values: list) -> dict | None:
    """mean / std (sample) of the values that exist (a shot group can be empty, e.g. on Train-CBL)."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}


def summarise(root: Path, methods: list[str], seeds: list[int]) -> dict:
    rows: dict = {}
    runs: list[dict] = []
    for m in methods:
        per: dict[str, dict[str, list[float]]] = {}
        for variant in ("lt", "cbl"):
            for s in seeds:
                run = root / f"{m}_{variant}_s{s}"
                metrics = json.loads(RunDir(run).metrics.read_text())
                cfg = yaml.safe_load(RunDir(run).config.read_text())
                meta = cfg.get("meta", {})
                runs.append({"run": run.name, "command": meta.get("command"), "commit": meta.get("commit"),
                             "device": meta.get("device"), "train_seconds": metrics.get("train_seconds")})
                for protocol, split in metrics.get("protocols", {}).items():
                    vals = per.setdefault(protocol, {k: [] for k in METRICS})
                    for k in METRICS:
                        vals[k].append(metrics["splits"][split][k])
        rows[m] = {p: {k: _stats(v) for k, v in vals.items()} for p, vals in per.items()}
    return {"methods": rows, "seeds": seeds, "runs": runs}


def markdown(res: dict) -> str:
    protocols = ["CLT", "GLT", "ALT"]
    head = "| method | " + " | ".join(f"{p} acc | {p} prec" for p in protocols) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(protocols))]
    for m, per in res["methods"].items():
        cells = []
        for p in protocols:
            for k in ("top1", "precision"):
                v = per.get(p, {}).get(k)
                cells.append(f"{v['mean']:.1f} ± {v['std']:.1f}" if v else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--method", action="append", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--note", default="")
    p.add_argument("--with", dest="earlier", type=Path, action="append", default=[],
                   help="an earlier record whose rows are shown first (its runs stay in that record)")
    args = p.parse_args()
    res = summarise(args.root, args.method, args.seeds)
    if args.earlier:
        rows = {}
        for path in args.earlier:
            old = json.loads(path.read_text())
            rows.update({f"{m} ({path.stem})": r for m, r in old["methods"].items()})
        res["methods"] = {**rows, **res["methods"]}
        res["earlier"] = [str(p) for p in args.earlier]
    res["note"] = args.note
    out = Path(__file__).parent / "results"
    atomic_write_json(out / f"{args.name}.json", res)
    table = markdown(res)
    (out / f"{args.name}.md").write_text(f"# {args.name}\n\nmean ± std over seeds {args.seeds}; accuracy and "
                                         f"macro precision in %.\n\n{table}\n\n{args.note}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
