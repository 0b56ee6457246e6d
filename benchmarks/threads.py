"""Do N one-thread training runs side by side train more images per second than one N-thread run?

    python benchmarks/threads.py cifar10_lt/tde data.root=../shared/data/cifar10-jpeg.zip --epochs 2

Times `longtail bench RECIPE --no-reference` (the real fit loop, first epoch a warm-up) once as a single
process with every core's thread, then as one 1-thread process per core started together, and writes
benchmarks/results/repro_threads_<device>.json with the images/s of each and their total. The reproduction
runner (benchmarks/reproduce.py) trains rows side by side, one thread each, because of this measurement;
run it on a quiet machine (nothing else training), or the figures measure the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench(recipe: str, overrides: list[str], epochs: int, threads: int, copies: int) -> list[dict]:
    """Run ``copies`` `longtail bench` processes at once, ``threads`` threads each; their JSON records."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{i}.json" for i in range(copies)]
        procs = [subprocess.Popen([sys.executable, "-m", "longtail", "bench", recipe, *overrides, "--epochs",
                                   str(epochs), "--no-reference", "--json", str(o)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for o in outs]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"longtail bench failed (exit {p.returncode}); run it by hand to see why")
        return [json.loads(o.read_text()) for o in outs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--epochs", type=int, default=2, help="epochs per timing (the first is a warm-up)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to compare over (default: all)")
    args = p.parse_args()
    if args.epochs < 2:
        raise SystemExit("error: --epochs must be at least 2 (the first one is a warm-up and not counted)")
    t0 = time.time()
    one = bench(args.recipe, args.overrides, args.epochs, args.cores, 1)
    many = bench(args.recipe, args.overrides, args.epochs, 1, args.cores)
    single = one[0]["images_per_s"]
    side = [r["images_per_s"] for r in many]
    record = {
        "question": f"{args.cores} one-thread runs side by side vs one {args.cores}-thread run",
        "recipe": one[0]["recipe"], "batch_size": one[0]["batch_size"], "epochs_timed": one[0]["epochs_timed"],
        "one_process_images_per_s": single,
        "side_by_side_images_per_s": side,
        "side_by_side_total_images_per_s": round(sum(side), 1),
        "speedup_of_side_by_side": round(sum(side) / single, 3),
        "faster": "side by side" if sum(side) > single else "one process",
        "device": one[0]["device"].replace(f"{args.cores} threads", "threads as stated"),
        **{k: one[0][k] for k in ("commit", "torch", "seed")},
        "command": " ".join(["python benchmarks/threads.py", args.recipe, *args.overrides, "--epochs",
                             str(args.epochs)]),
        "wall_seconds": round(time.time() - t0, 1),
    }
    out = HERE / "results" / f"repro_threads_{'cpu' if one[0]['device'].startswith('cpu') else 'gpu'}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
