"""The GPU check: one prepared command that shows what longtail does on a GPU machine, in one JSON record.

    python benchmarks/gpu_check.py                       # on a GPU machine: about 5-8 minutes on one H100 / H200
    python benchmarks/gpu_check.py --device cpu --epochs 1 --data DIR --set data.options.max_per_class=12  # CPU test

Steps, in this order (each one's wall time, accuracy and peak GPU memory go into the record; a step that fails is
recorded with its error and the check goes on; steps that would not fit the time budget are skipped and say so):

1. ``full_fp32``   the whole CIFAR-10-LT TDE recipe (``cifar10_lt/tde``, ``--epochs`` long, 200 by default) end to
                   end in fp32 (``amp=false``, as the reproduction table runs it): wall time, training images/s,
                   top-1 of De-confound-TDE (alpha 1.0) and of De-confound (alpha 0) on the test split.
2. ``full_bf16``   the same with bf16 autocast (``amp=true``): its accuracy beside fp32's.
3. ``ddp_nccl``    the recipe for ``--short-epochs`` under ``torchrun --standalone`` on every GPU present (NCCL; gloo
                   on the CPU): it trains, every test image is scored once, and the ranks agree.
4. ``standard_path`` ``data.fast_path=false`` (per-image transforms and DataLoader workers) for ``--short-epochs``:
                   images/s against the fast path.
5. ``plain_loop``  the plain PyTorch loop of ``longtail bench`` (per-image transforms v2, a DataLoader, SGD + CE)
                   on the same data and model for ``--short-epochs``: the ratio of our loop to it.
6. ``compile``     ``compile=true`` for ``--short-epochs``: the first (compiling) epoch and the steady images/s
                   against ``compile=false``, and the epoch count after which compiling pays back.

Throughput figures drop the first epoch (a warm-up) when more than one epoch is timed. The record goes to
``benchmarks/results/gpu_check_<device>.json`` (``--out`` to change). Nothing here downloads: ``--data`` is the
shared CIFAR-10 copy (``../shared/data/cifar10-jpeg.zip``) or any folder in its layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = "cifar10_lt/tde"
STEPS = ("full_fp32", "full_bf16", "ddp_nccl", "standard_path", "plain_loop", "compile")


def _rate(timing: list[dict]) -> float | None:
    """Training images/s of a run's epoch_timing, the first (warm-up) epoch dropped when there are more."""
    if not timing:
        return None
    counted = timing[1:] if len(timing) > 1 else timing
    seconds = sum(t["seconds"] for t in counted)
    return round(sum(t["images"] for t in counted) / seconds, 1) if seconds > 0 else None


class Check:
    """Runs the steps against one device and collects the record."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        self.args, self.work, self.torch = args, work, torch
        self.cuda = args.device.startswith("cuda")
        self.t0 = time.time()
        self.record: dict = {"recipe": RECIPE, "epochs": args.epochs, "short_epochs": args.short_epochs,
                             "budget_s": args.budget_s, "steps": {}}
        self.fast_short_rate: float | None = None  # the fast path's images/s, measured once, reused
        first = self.config([f"data.root={args.data}"]).stages[0]
        self.recipe_epochs, self.recipe_milestones = first.epochs, list(first.schedule.milestones)

    # ------------------------------------------------------------------ helpers

    def overrides(self, *extra: str, epochs: int | None = None) -> list[str]:
        """The recipe's overrides for a run of ``epochs`` (default ``--epochs``): a run shorter than the recipe
        keeps its shape, the lr milestones scaled to the epochs it has (TDE's 160 / 180 of 200)."""
        ep = self.args.epochs if epochs is None else epochs
        ov = [f"data.root={self.args.data}", f"device={self.args.device}", f"epochs={ep}"]
        if ep != self.recipe_epochs and self.recipe_milestones:
            scaled = sorted({min(ep - 1, max(0, round(m * ep / self.recipe_epochs))) for m in self.recipe_milestones})
            ov.append(f"schedule.milestones=[{','.join(map(str, scaled))}]")
        if ep < self.args.epochs:
            ov.append("eval.plots=false")
        return [*ov, *self.args.set, *extra]

    def config(self, overrides: list[str]):
        from longtail.config import load_raw, resolve_config_path
        from longtail.engine.build import build_config  # names and method options resolved

        return build_config(load_raw(resolve_config_path(RECIPE)), overrides)

    def peak_reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def train(self, name: str, overrides: list[str]) -> tuple[Path, dict, float]:
        """Train in this process; the run folder, its metrics.json and its wall time (start-up included)."""
        from longtail.engine.fit import train
        from longtail.run_folder import RunDir

        out = self.work / name
        self.peak_reset()
        t = time.time()
        train(self.config(overrides), out=out, progress=not self.args.quiet)
        wall = time.time() - t
        return out, json.loads(RunDir(out).metrics.read_text()), wall

    def test_metrics(self, run_dir: Path, overrides: list[str]) -> dict:
        """Test split metrics of a finished run with prediction-time overrides (TDE at alpha 0)."""
        from longtail.engine.fit import evaluate_run
        from longtail.engine.inference import load_trained

        run = load_trained(run_dir, overrides)
        return evaluate_run(run.method, run.loader, run.cfg, splits=["test"])["splits"]["test"]

    # ------------------------------------------------------------------ steps

    def step_full(self, amp: bool) -> dict:
        name = "full_bf16" if amp else "full_fp32"
        run_dir, metrics, wall = self.train(name, self.overrides(f"amp={str(amp).lower()}"))
        test = metrics["splits"]["test"]
        deconf = self.test_metrics(run_dir, ["method.alpha=0"])
        return {
            "wall_s": round(wall, 1), "train_s": metrics.get("train_seconds"),
            "images_per_s": _rate(metrics.get("epoch_timing", [])), "peak_gpu_mb": self.peak_mb(),
            "top1_tde": test["top1"], "many_few_tde": [test.get("many"), test.get("medium"), test.get("few")],
            "top1_deconfound": deconf["top1"],
        }

    def step_ddp(self) -> dict:
        import torch

        from longtail.run_folder import RunDir

        n = torch.cuda.device_count() if self.cuda else 2
        out = self.work / "ddp"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "longtail", "train", RECIPE, *self.overrides("amp=false", epochs=self.args.short_epochs),
               "--out", str(out), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(60, self.left()))
        wall = time.time() - t
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads(RunDir(out).metrics.read_text())
        test = metrics["splits"]["test"]
        res = {"backend": "nccl" if self.cuda else "gloo", "processes": n, "world_size": metrics.get("world_size"),
               "wall_s": round(wall, 1), "images_per_s": _rate(metrics.get("epoch_timing", [])),
               "top1_tde": test["top1"], "command": " ".join(["torchrun", *cmd[3:]])}
        if n == 1:
            res["note"] = ("one GPU: torchrun's world size 1 trains without a process group, so NCCL itself was not "
                           "exercised (NCCL takes one GPU per rank; it needs two or more GPUs)")
        return res

    def step_standard_path(self) -> dict:
        short = self.args.short_epochs
        _, fast, _ = self.train("fast_short", self.overrides("amp=false", epochs=short))
        _, std, wall = self.train("standard_short", self.overrides("amp=false", "data.fast_path=false",
                                                                    epochs=short))
        a, b = _rate(fast.get("epoch_timing", [])), _rate(std.get("epoch_timing", []))
        self.fast_short_rate = a
        return {"fast_path_images_per_s": a, "standard_path_images_per_s": b,
                "fast_over_standard": round(a / b, 2) if a and b else None, "peak_gpu_mb": self.peak_mb()}

    def step_plain_loop(self) -> dict:
        from longtail.engine.bench import bench_config, reference_loop

        cfg = bench_config(self.config(self.overrides("amp=false")), self.args.short_epochs)
        self.peak_reset()
        rate, _ = reference_loop(cfg, self.args.short_epochs)
        ours = self.fast_short_rate
        if ours is None:
            _, fast, _ = self.train("fast_short", self.overrides("amp=false", epochs=self.args.short_epochs))
            ours = _rate(fast.get("epoch_timing", []))
        return {"plain_loop_images_per_s": round(rate, 1), "ours_images_per_s": ours,
                "ours_over_plain": round(ours / rate, 2) if ours and rate else None,
                "plain_loop_peak_gpu_mb": self.peak_mb()}

    def step_compile(self) -> dict:
        short = self.args.short_epochs
        _, off, _ = self.train("compile_off", self.overrides("amp=false", "compile=false", epochs=short))
        _, on, _ = self.train("compile_on", self.overrides("amp=false", "compile=true", epochs=short))
        t_off, t_on = off.get("epoch_timing", []), on.get("epoch_timing", [])
        r_off, r_on = _rate(t_off), _rate(t_on)
        res = {"off_images_per_s": r_off, "on_images_per_s": r_on, "peak_gpu_mb": self.peak_mb(),
               "on_first_epoch_s": round(t_on[0]["seconds"], 1) if t_on else None,
               "off_first_epoch_s": round(t_off[0]["seconds"], 1) if t_off else None}
        if r_off and r_on and t_on and len(t_on) > 1:
            per_epoch_images = t_on[1]["images"]
            saved_per_epoch = per_epoch_images / r_off - per_epoch_images / r_on  # seconds saved per epoch
            extra = t_on[0]["seconds"] - t_off[0]["seconds"]  # compile time, roughly
            res["compile_overhead_s"] = round(extra, 1)
            res["pays_back_after_epochs"] = round(extra / saved_per_epoch, 1) if saved_per_epoch > 0 else None
        return res

    # ------------------------------------------------------------------ driver

    def run(self) -> dict:
        import torch

        from longtail.utils import environment_info, resolve_device

        device = resolve_device(self.args.device)
        self.record["environment"] = environment_info(device)
        self.record["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                               if torch.cuda.is_available() else [])
        self.record["host"] = {"machine": platform.machine(), "cpus": os.cpu_count()}
        self.record["command"] = " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]])
        steps = {
            "full_fp32": lambda: self.step_full(amp=False),
            "full_bf16": lambda: self.step_full(amp=True),
            "ddp_nccl": self.step_ddp,
            "standard_path": self.step_standard_path,
            "plain_loop": self.step_plain_loop,
            "compile": self.step_compile,
        }
        for name in self.args.steps:
            if self.left() <= 0:
                self.record["steps"][name] = {"skipped": f"time budget of {self.args.budget_s} s used up"}
                continue
            t = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                res = steps[name]()
            except Exception as e:  # a failed step is a finding: record it, go on with the others
                res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            res["step_wall_s"] = round(time.time() - t, 1)
            self.record["steps"][name] = res
            print(f"[gpu_check] {name}: {json.dumps(res)[:300]}", flush=True)
        s = self.record["steps"]
        full, bf16, plain = s.get("full_fp32", {}), s.get("full_bf16", {}), s.get("plain_loop", {})
        self.record["summary"] = {
            "tde_recipe_wall_s": full.get("wall_s"),
            # the goal is for the whole recipe on a GPU; a shortened or CPU check has no verdict
            "goal_under_60_s": ((full["wall_s"] < 60) if "wall_s" in full and self.cuda
                                and self.args.epochs == self.recipe_epochs else None),
            "top1_tde_fp32": full.get("top1_tde"), "top1_tde_bf16": bf16.get("top1_tde"),
            "bf16_minus_fp32": (round(bf16["top1_tde"] - full["top1_tde"], 2)
                                if "top1_tde" in bf16 and "top1_tde" in full else None),
            "ours_over_plain_loop": plain.get("ours_over_plain"),
            "total_wall_s": round(time.time() - self.t0, 1),
            "failed_steps": [k for k, v in s.items() if "error" in v],
        }
        return self.record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (the reduced CPU check)")
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.zip"),
                   help="CIFAR-10 data root (default: the shared JPEG copy)")
    p.add_argument("--epochs", type=int, default=200, help="epochs of the two full runs (default 200)")
    p.add_argument("--short-epochs", type=int, default=3,
                   help="epochs of the throughput steps (default 3; the first is a warm-up)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, metavar="STEP",
                   help=f"steps to run, in order (default: all: {' '.join(STEPS)})")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="skip the steps that would start after this many seconds (default 570)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (e.g. data.options.max_per_class=12 for a tiny check); repeatable")
    p.add_argument("--out", type=Path, help="record path (default benchmarks/results/gpu_check_<device>.json)")
    p.add_argument("--keep", type=Path, help="keep the run folders under this directory (default: deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.short_epochs < 1:
        p.error("--epochs and --short-epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run on a GPU machine, or pass --device cpu for the reduced check",
                  file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        record = Check(args, work).run()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    kind = "cpu" if args.device == "cpu" else "gpu"
    out = args.out or HERE / "results" / f"gpu_check_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[gpu_check] record: {out}")
    print(json.dumps(record["summary"], indent=1))
    return 1 if record["summary"]["failed_steps"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
