"""Accuracy of the in-memory fast path against the standard per-image path, same recipe and seeds.

    python benchmarks/fast_vs_standard.py digits_lt --seeds 0 1 2 --name fast_vs_standard_digits_lt
    python benchmarks/fast_vs_standard.py cifar10_lt/tde data.root=cifar10-jpeg.zip --seeds 0 --name ...

Trains the recipe once per seed with ``data.fast_path=true`` (uint8 images on the device, batched augmentation)
and once with ``data.fast_path=false`` (DataLoader workers, per-image transforms v2), then writes
benchmarks/results/<name>.json and .md with top-1 / many / medium / few of both and their differences. The two
paths draw different augmentation streams, so single runs differ by seed noise; compare the mean difference
with the seed spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from longtail import load_config, train
from longtail.run_folder import RunDir
from longtail.utils import atomic_write_json, resolve_device

KEYS = ("top1", "many", "medium", "few")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", required=True, help="result file name (without extension)")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for fast in (True, False):
                cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"data.fast_path={fast}"])
                run = train(cfg, out=Path(tmp) / f"s{seed}_{fast}", progress=False)
                m = json.loads(RunDir(run).metrics.read_text())
                split = m["splits"]["test"] if "test" in m["splits"] else next(iter(m["splits"].values()))
                rows.append({"seed": seed, "fast_path": fast, **{k: split[k] for k in KEYS},
                             "train_seconds": m.get("train_seconds")})
                print(json.dumps(rows[-1]), flush=True)
    diffs = {k: [a[k] - b[k] for a, b in zip(rows[::2], rows[1::2], strict=True)
                 if a[k] is not None and b[k] is not None] for k in KEYS}
    summary = {k: {"mean_fast_minus_standard": statistics.mean(v) if v else None,
                   "seed_std_fast": statistics.pstdev([r[k] for r in rows[::2]]) if len(rows) > 2 and v else None}
               for k, v in diffs.items()}
    cfg = load_config(args.config, args.overrides)
    record = {
        "recipe": args.config, "overrides": args.overrides, "seeds": args.seeds, "runs": rows, "summary": summary,
        "command": "python benchmarks/fast_vs_standard.py " + " ".join(sys.argv[1:]),
        "commit": _commit(), "device": str(resolve_device(cfg.device)), "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
    }
    out = Path(__file__).parent / "results" / args.name
    atomic_write_json(out.with_suffix(".json"), record)
    lines = [f"# Fast path vs standard path: {args.config}", "",
             f"`{record['command']}` (commit {str(record['commit'])[:7]}, device {record['device']})", "",
             "| seed | path | top1 | many | medium | few | train s |", "|---|---|--:|--:|--:|--:|--:|"]
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['seed']} | {'fast' if r['fast_path'] else 'standard'} | "
                     + " | ".join(fmt(r[k]) for k in KEYS) + f" | {fmt(r['train_seconds'])} |")
    lines += ["", "Mean difference fast - standard (points): "
              + ", ".join(f"{k} {fmt(s['mean_fast_minus_standard'])}" for k, s in summary.items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
