"""Which CPU settings train a CIFAR recipe fastest here, and which of them leave its numerics bit for bit as they are?

    python benchmarks/cpu_defaults.py                      # about 6 minutes on a quiet 2-core machine
    python benchmarks/cpu_defaults.py --threads 1 --only layout allocator   # beside other work: one thread

Every figure is the fit loop's own training step (``longtail.engine.bench.StepRunner``: the recipe's data path,
model, method and optimiser, step for step as ``longtail train`` runs them) timed over a few steps, not whole
epochs, so that settings can be compared A/B/A/B over several short rounds while the machine's load drifts. The
1-minute load average is read before and after every round; the record keeps every round and reports medians,
and each setting's speed-up over the baseline as the median of its per-round ratios (a paired comparison:
each ratio pairs two timings a few seconds apart). Each round also records CPU seconds: on a shared CPU a
one-thread run's CPU time is the work it did, whatever share of the cores it got, so ``cpu_images_per_s`` is the
steadier figure under load (a multi-thread run's CPU time also counts its threads' waiting).

Sections (``--only`` picks some):
- layout: in one process, ``model.channels_last`` true (today's default) and false, and one torch thread
  instead of ``--threads`` (skipped when that is 1).
- allocator: glibc malloc settings, which glibc reads from the environment when a process starts (so one process
  per setting and round): MALLOC_MMAP_THRESHOLD_ + MALLOC_TRIM_THRESHOLD_ raised (the step's large activation
  buffers stay in the heap instead of being mapped and unmapped, page faults and all, every step),
  MALLOC_ARENA_MAX=2; the same mmap / trim settings made from Python inside the process with glibc's
  ``mallopt`` (ctypes), which is what a library could do for its users; jemalloc and tcmalloc by LD_PRELOAD
  when ``ldconfig -p`` finds them (only possible before the process starts: not settable from Python).
- compile: ``compile=true`` against eager in one process, with a fresh inductor cache: the compile time (its first
  step less an eager step), the per-step gain, and in how many epochs of the recipe the gain pays the compile
  time back (against the 200 epochs of the CIFAR recipes).

Numerics: every setting's runner trains the same steps from the same seed; the sha256 of its weights, buffers and
loss sum after them (``digest``) equal to the baseline's means the setting trains bit for bit the same. One
record, ``benchmarks/results/cpu_defaults_cpu.json`` (``--out``), with the CPU model, torch and the seed, and per
section its command, commit, threads, steps and load; a run with ``--only`` replaces those sections of the record
and keeps the others.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
BIG = 1 << 30  # 1 GiB: above every activation buffer of a CIFAR step, so none is mmap'ed, and no trimming
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(BIG), "MALLOC_TRIM_THRESHOLD_": str(BIG)}


def load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def preloadable() -> dict[str, str]:
    """jemalloc / tcmalloc shared libraries ``ldconfig -p`` knows of: {name: path}."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    for line in out.splitlines():
        name = line.strip().split(" ", 1)[0]
        for lib in ("libjemalloc.so", "libtcmalloc_minimal.so", "libtcmalloc.so"):
            if name.startswith(lib) and "=>" in line:
                found.setdefault(lib.split(".")[0].removeprefix("lib"), line.rsplit("=>", 1)[1].strip())
    return found


def mallopt(settings: dict[int, int]) -> bool:
    """glibc's mallopt from Python (ctypes); False where there is no glibc or it refuses."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    return all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in settings.items())


# ----------------------------------------------------------------------------- the worker (one process)


def worker(spec: dict) -> dict:
    """Time ``spec['variants']`` interleaved over ``spec['rounds']`` rounds in this process; a JSON-ready dict."""
    if spec.get("mallopt"):
        ok = mallopt({M_MMAP_THRESHOLD: BIG, M_TRIM_THRESHOLD: BIG})
        if not ok:
            return {"error": "mallopt is not available here (no glibc?)"}
    import torch

    from longtail.engine.bench import StepRunner
    from longtail.engine.build import load_config

    threads = torch.get_num_threads()
    runners, out = {}, {"threads": threads, "variants": {}}
    for v in spec["variants"]:
        cfg = load_config(spec["recipe"], [*spec["overrides"], *v.get("overrides", [])])
        torch.set_num_threads(v.get("threads", threads))
        t = time.time()
        r = runners[v["name"]] = StepRunner(cfg)
        built = time.time() - t
        first = r.run(1)  # compile=true compiles here
        rest = r.run(spec["warmup"] - 1) if spec["warmup"] > 1 else None
        torch.set_num_threads(threads)
        out["variants"][v["name"]] = {
            "overrides": v.get("overrides", []), "threads": v.get("threads", threads),
            "build_seconds": round(built, 2), "first_step_seconds": round(first["seconds"], 3),
            "warmup_step_seconds": round(rest["seconds"] / (spec["warmup"] - 1), 3) if rest else None,
            "rounds": [], "steps_per_epoch": r.steps_per_epoch, "batch_size": r.cfg.stages[0].batch_size,
        }
    names = list(runners)
    for k in range(spec["rounds"]):
        before = load()
        for name in names[k % len(names):] + names[: k % len(names)]:  # each round starts one variant later
            v = next(v for v in spec["variants"] if v["name"] == name)
            torch.set_num_threads(v.get("threads", threads))
            res = runners[name].run(spec["steps"])
            torch.set_num_threads(threads)
            out["variants"][name]["rounds"].append({
                "round": spec.get("round", k), "seconds": round(res["seconds"], 3),
                "cpu_seconds": round(res["cpu_seconds"], 3), "images": res["images"],
                "minor_faults_per_step": round(res["minor_faults"] / spec["steps"]),
                "images_per_s": round(res["images"] / res["seconds"], 2),
                "cpu_images_per_s": round(res["images"] / max(res["cpu_seconds"], 1e-9), 2)})
        after = load()
        for name in names:
            out["variants"][name]["rounds"][-1]["load_1min"] = {"before": before, "after": after}
    first = next(iter(runners.values()))
    ref = {k: v.detach().float() for k, v in first.method.state_dict().items() if v.is_floating_point()}
    for name, r in runners.items():
        v = out["variants"][name]
        v["steps_trained"] = r.images // r.cfg.stages[0].batch_size
        v["digest"] = r.digest()
        v["loss_sum"] = float(r.loss_sum)  # of every step trained: how far a setting that moves numerics moved it
        v[f"max_abs_weight_diff_vs_{names[0]}"] = max(_max_diff(t.detach().float(), ref[k])
                                                      for k, t in r.method.state_dict().items() if k in ref)
    return out


def _max_diff(a, b) -> float:
    """Largest |a - b|, where NaN equals NaN (an option not chosen yet, such as TDE's chosen_alpha, is NaN)."""
    import torch

    same = (a == b) | (a.isnan() & b.isnan())
    return float(torch.where(same, torch.zeros_like(a), (a - b).abs()).max()) if a.numel() else 0.0


def run_worker(spec: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- summaries


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def summarise(variants: dict, baseline: str) -> dict:
    """Medians per variant, and its speed-up over ``baseline`` as the median of per-round ratios."""
    base = {r["round"]: r for r in variants[baseline]["rounds"]}
    for v in variants.values():
        rounds = v["rounds"]
        v["median_images_per_s"] = median([r["images_per_s"] for r in rounds])
        v["median_cpu_images_per_s"] = median([r["cpu_images_per_s"] for r in rounds])
        paired = [(r, base[r["round"]]) for r in rounds if r["round"] in base]
        v["speedup_vs_baseline"] = median([r["images_per_s"] / b["images_per_s"] for r, b in paired])
        v["cpu_speedup_vs_baseline"] = median([r["cpu_images_per_s"] / b["cpu_images_per_s"] for r, b in paired])
        v["same_numerics_as_baseline"] = v["digest"] == variants[baseline]["digest"]
    return variants


def section_layout(args, spec: dict) -> dict:
    variants = [{"name": "channels_last", "overrides": ["model.channels_last=true"]},
                {"name": "nchw", "overrides": ["model.channels_last=false"]}]
    if args.threads > 1:
        variants.append({"name": "one_thread", "overrides": ["model.channels_last=true"], "threads": 1})
    res = run_worker({**spec, "variants": variants})
    return {"what": "model.channels_last true (today's default) vs false"
                    + (f", and 1 torch thread vs {args.threads}" if args.threads > 1 else "")
                    + ", interleaved in one process", "baseline": "channels_last",
            "variants": summarise(res["variants"], "channels_last")}


def section_allocator(args, spec: dict) -> dict:
    envs = {"glibc_default": ({}, False), "glibc_mmap_trim_env": (GLIBC_ENV, False),
            "glibc_arena_max_2": ({"MALLOC_ARENA_MAX": "2"}, False), "glibc_mmap_trim_mallopt": ({}, True)}
    libs = preloadable()
    for name, path in libs.items():
        envs[f"{name}_preload"] = ({"LD_PRELOAD": path}, False)
    variants: dict = {}
    for k in range(args.rounds):
        names = list(envs)
        for name in names[k % len(names):] + names[: k % len(names)]:
            env, use_mallopt = envs[name]
            before = load()
            res = run_worker({**spec, "rounds": 1, "round": k, "mallopt": use_mallopt,
                              "variants": [{"name": name, "overrides": []}]}, env)
            v = res["variants"][name]
            v["rounds"][-1]["load_1min"] = {"before": before, "after": load()}
            if name not in variants:
                variants[name] = {**v, "env": env, "mallopt_in_process": use_mallopt, "digests": []}
            else:
                variants[name]["rounds"] += v["rounds"]
            variants[name]["digests"].append(v["digest"])
    for v in variants.values():
        v["digest"] = v["digests"][0] if len(set(v["digests"])) == 1 else "differs between rounds"
        del v["digests"]
    return {"what": "glibc malloc by environment (one process per setting and round) and by mallopt from Python; "
                    "jemalloc / tcmalloc by LD_PRELOAD where installed",
            "preloadable_found": libs or "none (ldconfig -p lists no jemalloc or tcmalloc)",
            "baseline": "glibc_default", "variants": summarise(variants, "glibc_default")}


def section_compile(args, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        res = run_worker({**spec, "variants": [{"name": "eager", "overrides": ["compile=false"]},
                                               {"name": "compiled", "overrides": ["compile=true"]}]},
                         {"TORCHINDUCTOR_CACHE_DIR": cache})
    v = summarise(res["variants"], "eager")
    eager_step = median([r["seconds"] / (r["images"] / v["eager"]["batch_size"]) for r in v["eager"]["rounds"]])
    comp_step = median([r["seconds"] / (r["images"] / v["eager"]["batch_size"]) for r in v["compiled"]["rounds"]])
    compile_s = v["compiled"]["first_step_seconds"] - eager_step
    gain_epoch = (eager_step - comp_step) * v["eager"]["steps_per_epoch"]
    payback = compile_s / gain_epoch if gain_epoch > 0 else None
    return {"what": "compile=true (torch.compile of the method) vs eager in one process, fresh inductor cache",
            "baseline": "eager", "variants": v,
            "eager_step_seconds": eager_step, "compiled_step_seconds": comp_step,
            "compile_seconds": round(compile_s, 1), "gain_seconds_per_epoch": round(gain_epoch, 2),
            "payback_epochs": None if payback is None else round(payback, 1),
            "pays_back_within_200_epochs": payback is not None and payback <= 200}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--recipe", default="cifar10_lt/tde")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"),
                   help="data.root of the recipe (default: ../shared/data/cifar10-jpeg.zip; '' for none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override (repeat)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per section (default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per setting and round (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; the first compiles)")
    p.add_argument("--only", nargs="+", choices=("layout", "allocator", "compile"), help="sections to run")
    p.add_argument("--out", help="the record (default benchmarks/results/cpu_defaults_<device>.json)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0
    if min(args.rounds, args.steps, args.warmup, args.threads) < 1:
        raise SystemExit("error: --rounds, --steps, --warmup and --threads must be at least 1")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the workers' threads
    import torch

    from longtail.utils import atomic_write_json, git_commit

    data = [f"data.root={args.data}"] if args.data else []
    spec = {"recipe": args.recipe, "overrides": [*data, "amp=false", *args.set],
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}
    t0 = time.time()
    out = Path(args.out) if args.out else HERE / "results" / "cpu_defaults_cpu.json"
    # A section run alone (--only) replaces its own part of an existing record and keeps the others; each section
    # says how it was run (command, commit, threads, steps, load).
    record: dict = json.loads(out.read_text()) if out.exists() and args.only else {}
    record.update({
        "question": "which CPU settings train the recipe fastest, and which leave its numerics bit for bit as they are",
        "recipe": args.recipe, "seed": 0, "cpu_model": cpu_model(),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "torch": str(torch.__version__),
        "glibc": "-".join(platform.libc_ver()),
    })
    how = {"command": " ".join(["python benchmarks/cpu_defaults.py", *sys.argv[1:]]), "commit": git_commit(),
           "overrides": spec["overrides"], "threads": args.threads, "rounds": args.rounds,
           "steps_per_round": args.steps, "warmup_steps": args.warmup}
    sections = {"layout": section_layout, "allocator": section_allocator, "compile": section_compile}
    for name in args.only or sections:
        t, start = time.time(), load()
        print(f"{name} ...", file=sys.stderr, flush=True)
        record[name] = {**how, **sections[name](args, spec)}
        record[name].update({"wall_seconds": round(time.time() - t, 1),
                             "load_1min": {"start": start, "end": load()}})
        for vname, v in record[name]["variants"].items():
            print(f"  {vname:26s} {v['median_images_per_s']:8.1f} images/s ({v['median_cpu_images_per_s']:7.1f} per "
                  f"CPU second)  x{v['speedup_vs_baseline']:.3f} (CPU x{v['cpu_speedup_vs_baseline']:.3f})  "
                  f"same numerics: {v['same_numerics_as_baseline']}", file=sys.stderr, flush=True)
    record["wall_seconds_of_last_command"] = round(time.time() - t0, 1)
    atomic_write_json(out, record)  # an interrupted run leaves the previous record intact
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
