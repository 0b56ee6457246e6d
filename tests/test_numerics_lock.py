"""Numerics lock (issue 14): every registered method, and the two CIFAR-10-LT recipes being reproduced, trains a
few steps on tiny data (CPU, seed 0, one thread) through the real fit loop, and its per-step batches and losses,
its per-epoch learning rates, a fingerprint of every tensor of its final state (checkpoints/final.pt: per tensor
its sum, L1, sum of squares, a position-weighted sum and its first values, in float64) and its test top-1 must match
the golden values in tests/golden/numerics_lock.json.

It fails when a loss formula, an RNG call order (other batches, crops, flips or initial weights), an optimiser or
schedule setting, an augmentation or a statistic a method keeps or fits changes. Such a change must not land while
a reproduction row is mid-run (benchmarks/runs/, resumed across sessions): its remaining epochs would train with
other numerics than its first ones. Land it when the row has finished, or restart the row from scratch.

When the change is intended, regenerate the goldens and commit them together with it, saying why:

    LT_UPDATE_GOLDEN=1 pytest tests/test_numerics_lock.py

Without LT_UPDATE_GOLDEN a missing golden entry is a failure, never a skip.

Tolerance. On one machine the recorded values are bit-identical from run to run; batches (targets and image
fingerprints) are bit-identical on any CPU. Another x86 CPU rounds floats differently (vector widths and reduction
orders of oneDNN, MKL and ATen kernels), so floats compare at rtol 1e-5 (atol 1e-7), each against the scale its
rounding errors live on: a loss against the run's mean loss, a tensor's sums against n times the largest RMS in its
module, its first values against that RMS (a bias or running mean starts at 0 and, measured against itself, moves
by up to 1e-3 between CPUs). Measured on the AVX-512 machine that made the goldens: the goldens reproduced with
ATen, oneDNN and MKL restricted to AVX2 need at most rtol 2e-6; SGD momentum 0.9 -> 0.89 or weight decay
5e-4 -> 4e-4 move the ResNet-32 recipe cases by at least 3e-5 and the tiny-net cases by far more. The recipe cases
take two optimiser steps only: ResNet-32 on 32 synthetic images amplifies rounding differences about tenfold per
step at lr 0.1, so a longer run could not be compared across CPUs at this tolerance; even now they would not pass
on a CPU without AVX2 (oneDNN then picks other convolution algorithms: 3e-4).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from pathlib import Path

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook
from torchvision.io import write_png

from longtail.config import build_config, load_raw, resolve_config_path, to_dict
from longtail.engine import train
from longtail.engine.checkpoint import load_checkpoint
from longtail.methods import Method
from longtail.registry import METHODS

GOLDEN = Path(__file__).resolve().parent / "golden" / "numerics_lock.json"
UPDATE = os.environ.get("LT_UPDATE_GOLDEN", "") not in ("", "0")
RTOL, ATOL = 1e-5, 1e-7
REGENERATE = "LT_UPDATE_GOLDEN=1 pytest tests/test_numerics_lock.py"

# ----------------------------------------------------------------------------- the cases

# Only the library's own methods are locked: a test file may register one at import time (test_engine_cli's
# `interrupt_test`), and which test files pytest imported first must not change the lock.
LOCKED_METHODS = sorted(n for n in METHODS if METHODS.get(n).__module__.startswith("longtail."))

IFL = {
    "name": "ifl",
    "base": "ce",
    "center_milestones": [0.3],
    "center_weights": [0.0, 0.01],
    "update_milestones": [0.3, 0.6],
}  # 3 epochs: centres from epoch 1, env2 rebuilt after epochs 0 and 1
TINY_DLSA = {
    "name": "dlsa",
    "max_depth": 1,
    "clusters": 2,
    "flow_epochs": 1,
    "flow_batch_size": 16,
    "head_epochs": 1,
    "head_batch_size": 8,
    "head_lr": 0.05,
    "max_cluster_size": 1000,
    "flow_lr": 0.1,  # the default 0.2 doubles how far another CPU's rounding moves the flow's batch norm
}
ONE_STAGE = {  # method -> (head, method options, epochs); a method missing here trains with its defaults
    "cb_loss": ("linear", {"name": "cb_loss"}, 2),
    "ldam_drw": ("cosine", {"name": "ldam_drw", "drw_epoch": 1}, 2),  # re-weighted from the second epoch
    "mixup": ("linear", {"name": "mixup", "base": "balanced_softmax"}, 2),
    "ifl": ("linear", IFL, 3),
}
STAGE_TWO = {  # method -> its stage on top of a CE stage 1 (init_from), as in the shipped two-stage recipes
    "crt": {"method": {"name": "crt"}, "epochs": 1, "sampler": "class_balanced"},
    "lws": {"method": {"name": "lws"}, "epochs": 1, "sampler": "class_balanced"},
    "ncm": {"method": {"name": "ncm"}, "epochs": 0},
    "tau_norm": {"method": {"name": "tau_norm"}, "epochs": 0},
    "dlsa": {"method": TINY_DLSA, "epochs": 0},
}
# The reproduction rows of the table, with the overrides of their commands (benchmarks/runs/*/config.yaml,
# meta.command) apart from data.root. TINY_RECIPE shrinks them to seconds on a fake CIFAR-10 image folder; the model,
# head, method, optimiser, augmentation, the in-memory CIFAR path and the warm-up stay the recipe's: epoch 1 trains at
# the rows' first-epoch lr, 0.2 * (1/3 + 2/3 * 1/5) = 0.0933 (warm-up with reference_offset), epoch 2 past a milestone
# (x0.01, still in warm-up). One step of 32 images per epoch: ResNet-32 amplifies rounding differences about tenfold
# per large step on such tiny data, so a longer run could not be compared across CPUs at 1e-5 (module docstring).
RECIPES = {"cifar10_lt/ce": ["amp=false", "model.head_bias=true"], "cifar10_lt/tde": ["amp=false"]}
TINY_RECIPE = [
    "data.max_per_class=12",
    "data.imbalance_ratio=10",
    "epochs=2",
    "batch_size=32",
    "schedule.milestones=[2]",
    "eval.plots=false",
]
CASES = [*LOCKED_METHODS, *(f"recipe:{r}" for r in RECIPES)]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_images(root: Path, counts: dict[str, dict[str, int]], size: int, seed: int) -> Path:
    """root/<split>/<class>/<i>.png (lossless, so decoded pixels are exactly these); a colour per class.

    Made here rather than with conftest's helper so that the goldens depend on nothing another test may edit.
    """
    g = torch.Generator().manual_seed(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per in counts.items():
        for c, n in per.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            k = classes.index(c)
            base = torch.tensor([(37 * (k + 1)) % 256, (91 * k) % 256, (53 * k + 128) % 256])
            for i in range(n):
                img = (base.view(3, 1, 1) + torch.randint(-40, 41, (3, size, size), generator=g)).clamp(0, 255)
                write_png(img.to(torch.uint8), str(d / f"{i:04d}.png"))
    return root


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("numerics_lock")
    folder = _write_images(
        root / "folder",
        {"train": {"ant": 24, "bee": 8, "cat": 3}, "test": {"ant": 4, "bee": 4, "cat": 4}},
        size=16,
        seed=0,
    )
    # CIFAR-10-LT keeps 12, 9, 7, 5, 4, 3, 2, 2, 1, 1 (max_per_class 12, ratio 10); three more per class so the
    # seeded subset selection has something to choose from.
    keep = [int(12 * 0.1 ** (i / 9)) for i in range(10)]
    cifar = _write_images(
        root / "cifar10",
        {
            "train": {c: n + 3 for c, n in zip(CIFAR10_CLASSES, keep, strict=True)},
            "test": dict.fromkeys(CIFAR10_CLASSES, 2),
        },
        size=32,
        seed=1,
    )
    return {"folder": folder, "cifar": cifar}


def _folder_raw(root: Path, method: dict, head: str, epochs: int) -> dict:
    # Optimiser momentum / weight decay and the sampler stay at their defaults: changing a default is locked too.
    return {
        "name": "numerics_lock",
        "seed": 0,
        "data": {
            "name": "image_folder",
            "root": str(root),
            "image_size": 16,
            "in_memory": "always",
            "augment": "cifar",
        },
        "model": {"backbone": "tiny", "head": head},
        "stages": [
            {
                "name": "main",
                "method": method,
                "epochs": epochs,
                "batch_size": 8,
                "optim": {"lr": 0.05},
                "schedule": {"name": "multistep", "warmup_epochs": 1},
            }
        ],
        "eval": {"batch_size": 16, "many_above": 20, "few_below": 5, "plots": False},
    }


def case_config(case: str, roots: dict[str, Path]):
    if case.startswith("recipe:"):
        recipe = case.removeprefix("recipe:")
        raw = load_raw(resolve_config_path(recipe))
        return build_config(raw, [*RECIPES[recipe], f"data.root={roots['cifar']}", *TINY_RECIPE])
    if case in STAGE_TWO:
        raw = _folder_raw(roots["folder"], {"name": "ce"}, "linear", 1)
        raw["stages"][0]["name"] = "features"
        raw["stages"].append(
            {"name": "second", "batch_size": 8, "init_from": "features", "optim": {"lr": 0.05}, **STAGE_TWO[case]}
        )
        return build_config(raw)
    head, method, epochs = ONE_STAGE.get(case, (None, {"name": case}, 2))
    head = head or getattr(METHODS.get(case), "requires_head", None) or "linear"
    return build_config(_folder_raw(roots["folder"], method, head, epochs))


# ----------------------------------------------------------------------------- what is recorded


def _weights(n: int) -> torch.Tensor:
    """(n,) fixed integer weights in [-504, 504] that scramble positions: a weighted sum notices moved values
    (a flip, another crop) that a plain sum does not. Exact integer arithmetic: the same on every machine."""
    return (torch.arange(n, dtype=torch.int64) * 2654435761) % 1009 - 504


def _plain(obj):
    """A non-tensor state entry (a module's extra state, e.g. a fit report) as JSON: tensors inside fingerprinted."""
    if isinstance(obj, torch.Tensor):
        return _fingerprint(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj if obj is None or isinstance(obj, bool | int | float | str) else repr(obj)


def _fingerprint(t) -> dict:
    if not isinstance(t, torch.Tensor):
        return {"value": _plain(t)}
    t = t.detach().cpu()
    fp = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.is_floating_point():
        v = t.double().flatten()
        fp.update(
            sum=v.sum().item(),
            abs=v.abs().sum().item(),
            sq=(v * v).sum().item(),
            wsum=(v * _weights(len(v)).double() / 504).sum().item(),
            head=v[:3].tolist(),
        )
    else:
        v = t.long().flatten()
        fp.update(sum=int(v.sum()), wsum=int((v * _weights(len(v))).sum()))
    return fp


def _flat_config(cfg) -> dict:
    out = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = node

    walk("", to_dict(cfg))
    return {k: v for k, v in out.items() if k not in ("data.root", "data.cache_dir")}  # tmp paths


_LOG_EPOCH = re.compile(r"stage (\S+) epoch (\d+)/\d+ loss \S+ lr (\S+) ")


def run_case(case: str, roots: dict[str, Path], out: Path) -> dict:
    """Train ``case`` through longtail.engine.train and record its numerics."""
    torch.set_num_threads(1)  # as conftest; the goldens are single-threaded
    cfg = case_config(case, roots)
    steps: list[dict] = []

    def record(module, args, output) -> None:
        # Every training step calls the Method (the fit loop's train_fn) with (normalised images, targets).
        if isinstance(module, Method) and module.training and torch.is_grad_enabled() and isinstance(output, dict):
            x, y = args[0].detach().double().flatten(), args[1]
            steps.append(
                {
                    "loss": output["loss"].item(),
                    "x": [x.sum().item(), x.abs().sum().item(), (x * _weights(len(x)).double() / 504).sum().item()],
                    "y": y.tolist(),
                }
            )

    handle = register_module_forward_hook(record)
    try:
        run = train(cfg, out=out, progress=False)
    finally:
        handle.remove()
    metrics = json.loads((run / "metrics.json").read_text())
    # Name every step after its stage and epoch (drop_last: an epoch's images are its steps times the batch).
    batch = {st.name: st.batch_size for st in cfg.stages}
    labels = [
        f"stage {t['stage']} epoch {t['epoch']} step {s + 1}"
        for t in metrics["epoch_timing"]
        for s in range(t["images"] // batch[t["stage"]])
    ]
    assert len(labels) == len(steps), f"{case}: {len(steps)} recorded steps, the log counts {len(labels)}"
    for label, step in zip(labels, steps, strict=True):
        step["at"] = label
    epochs = [
        {"stage": m[1], "epoch": int(m[2]), "lr": m[3]} for m in _LOG_EPOCH.finditer((run / "train.log").read_text())
    ]
    state = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    return {
        "steps": [{"at": s["at"], "loss": s["loss"], "x": s["x"], "y": s["y"]} for s in steps],
        "epochs": epochs,
        "state": {k: _fingerprint(v) for k, v in state.items()},
        "top1": metrics["splits"]["test"]["top1"],
        "config": _flat_config(cfg),
    }


# ----------------------------------------------------------------------------- comparing


def _close(a: float, b: float, scale: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= RTOL * abs(scale) + ATOL


def _rel(a: float, b: float, scale: float) -> str:
    return f"golden {b!r}, now {a!r} ({abs(a - b) / max(abs(scale), 1e-300):.1e} of its scale)"


def _scale(state: dict, key: str) -> float:
    """The size a float tensor's rounding errors are relative to: the largest RMS among the tensors of its module
    (a BatchNorm's weight, bias and running statistics; a linear layer's weight and bias). A bias, a running mean
    or a flow's log-scale starts at 0 and is the sum of a few updates whose gradients nearly cancel: relative to
    itself another CPU's rounding moves it by up to 1e-3, relative to its module by 1e-6."""
    module = key.rsplit(".", 1)[0] if "." in key else key
    rms = [
        math.sqrt(v["sq"] / max(math.prod(v["shape"]), 1))
        for k, v in state.items()
        if "sq" in v and (k == key or ("." in k and k.rsplit(".", 1)[0] == module))
    ]
    return max(rms)


def _plain_diffs(a, b, where: str) -> list[str]:
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-3 * abs(b) + ATOL else [f"{where}: golden {b!r}, now {a!r}"]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in b for d in _plain_diffs(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _plain_diffs(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: golden {b!r}, now {a!r}"]


def compare_state(now: dict, gold: dict) -> list[str]:
    diffs = []
    if now.keys() != gold.keys():
        diffs.append(
            f"state_dict keys: missing {sorted(gold.keys() - now.keys())}, new {sorted(now.keys() - gold.keys())}"
        )
    for k in sorted(now.keys() & gold.keys()):
        s, g = now[k], gold[k]
        if "value" in g or "value" in s:  # not a tensor: floats in it are summaries (often rounded), 1e-3
            bad = _plain_diffs(s.get("value"), g.get("value"), k)
            diffs += [f"entry {b}" for b in bad[:3]]
            continue
        if (s["shape"], s["dtype"]) != (g["shape"], g["dtype"]):
            diffs.append(f"tensor {k}: shape/dtype golden {g['shape']} {g['dtype']}, now {s['shape']} {s['dtype']}")
            continue
        if "sq" not in g:  # integer tensor (BatchNorm's num_batches_tracked, IFL's records): exact
            if (s["sum"], s["wsum"]) != (g["sum"], g["wsum"]):
                diffs.append(f"tensor {k} (integer): sums golden {g['sum']}/{g['wsum']}, now {s['sum']}/{s['wsum']}")
            continue
        n, rms = max(math.prod(g["shape"]), 1), _scale(gold, k)
        checks = [
            ("sum", s["sum"], g["sum"], n * rms),
            ("L1", s["abs"], g["abs"], n * rms),
            ("sum of squares", s["sq"], g["sq"], n * rms * rms),
            ("weighted sum", s["wsum"], g["wsum"], n * rms),
        ]
        checks += [(f"value [{j}]", a, b, rms) for j, (a, b) in enumerate(zip(s["head"], g["head"], strict=True))]
        bad = [f"{what} {_rel(a, b, sc)}" for what, a, b, sc in checks if not _close(a, b, sc)]
        if bad:
            diffs.append(f"tensor {k}: " + "; ".join(bad))
    return diffs


def compare(now: dict, gold: dict) -> tuple[list[str], str]:
    """(differences, a hint at what moved first)."""
    diffs: list[str] = []
    first_batch = first_loss = None
    if len(now["steps"]) != len(gold["steps"]):
        diffs.append(f"number of training steps: golden {len(gold['steps'])}, now {len(now['steps'])}")
    # A loss's rounding error is relative to the losses of the run, not to one small value.
    loss_scale = sum(abs(g["loss"]) for g in gold["steps"]) / max(len(gold["steps"]), 1)
    for i, (s, g) in enumerate(zip(now["steps"], gold["steps"], strict=False)):
        if s["y"] != g["y"] or not all(_close(a, b, g["x"][1]) for a, b in zip(s["x"], g["x"], strict=True)):
            first_batch = i if first_batch is None else first_batch
            what = "targets (other samples)" if s["y"] != g["y"] else "augmented images (same targets)"
            diffs.append(
                f"{g['at']}: the batch's {what} differ: targets golden {g['y']}, now {s['y']}; image sums "
                f"golden {g['x']}, now {s['x']}"
            )
        scale = max(abs(g["loss"]), loss_scale)
        if not _close(s["loss"], g["loss"], scale):
            first_loss = i if first_loss is None else first_loss
            diffs.append(f"{g['at']}: loss {_rel(s['loss'], g['loss'], scale)}")
    if [(e["stage"], e["epoch"], e["lr"]) for e in now["epochs"]] != [
        (e["stage"], e["epoch"], e["lr"]) for e in gold["epochs"]
    ]:
        diffs.append(
            f"learning rate per epoch (train.log): golden {[e['lr'] for e in gold['epochs']]}, "
            f"now {[e['lr'] for e in now['epochs']]}"
        )
    state_diffs = compare_state(now["state"], gold["state"])
    diffs += state_diffs
    if now["top1"] != gold["top1"]:
        diffs.append(f"test top1: golden {gold['top1']}, now {now['top1']}")

    if len(now["steps"]) != len(gold["steps"]):
        hint = "The number of steps changed: epochs, batch size, the sampler's epoch length or drop_last."
    elif first_batch is not None and (first_loss is None or first_batch <= first_loss):
        hint = (
            f"The batches moved first ({gold['steps'][first_batch]['at']}): the data, the sampler, the "
            f"augmentation, or the order of calls on the seeded generators changed."
        )
    elif first_loss == 0:
        hint = (
            "The very first loss moved on the same batch: a loss formula, the model's forward, or its "
            "initialisation (the global RNG's call order before training) changed."
        )
    elif first_loss is not None:
        hint = (
            f"The same batches, but the losses move from {gold['steps'][first_loss]['at']} on: the update "
            f"changed (optimiser momentum / weight decay / lr schedule, a per-epoch method schedule, a "
            f"training-time statistic of the method)."
        )
    elif state_diffs:
        hint = (
            "Every batch and loss matched but the final state moved: the last update, a statistic the method "
            "keeps (TDE's head direction, BatchNorm's running statistics) or one fitted at a stage's end (NCM "
            "centroids, TDE's alpha, the DLSA cascade) changed."
        )
    else:
        hint = "The evaluation changed (top-1 on the same weights): prediction or metrics, not training."
    return diffs, hint


def _config_changes(now: dict, gold: dict) -> list[str]:
    keys = sorted(now.keys() | gold.keys())
    return [
        f"{k}: {gold.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in keys if now.get(k) != gold.get(k)
    ]


def _meta() -> dict:
    return {
        "torch": str(torch.__version__),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- golden file


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def _dumps(obj, depth: int = 0) -> str:
    """JSON with one line per step / tensor / config key (readable diffs in review)."""
    leaf = (
        depth >= 3
        or not isinstance(obj, dict | list)
        or not any(isinstance(v, dict | list) for v in (obj.values() if isinstance(obj, dict) else obj))
    )
    if leaf:
        return json.dumps(obj)
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + body + "\n" + pad + "}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(v, depth + 1)}" for v in obj) + "\n" + pad + "]"


def save_golden(golden: dict) -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(_dumps({k: golden[k] for k in sorted(golden)}) + "\n")
    tmp.replace(GOLDEN)


def _what_to_do(case: str) -> str:
    return (
        f"What to do: if you did not mean to change how '{case}' trains, this is a regression; fix it. If you "
        f"did, a change of training numerics must not land while a reproduction row is mid-run (see "
        f"benchmarks/runs/: its resumed epochs would train differently from its first ones) unless that row is "
        f"restarted from scratch; then regenerate the goldens and commit tests/golden/numerics_lock.json with "
        f"the change, saying why: {REGENERATE}"
    )


# ----------------------------------------------------------------------------- tests


def test_only_library_methods_are_locked():
    assert LOCKED_METHODS, "no method registered"
    assert all(METHODS.get(n).__module__.startswith("longtail.") for n in LOCKED_METHODS)
    assert "interrupt_test" not in LOCKED_METHODS  # test_engine_cli's, registered when pytest imports that file
    assert not set(STAGE_TWO) & set(ONE_STAGE)


@pytest.mark.parametrize("case", CASES)
def test_training_numerics_match_golden(case, data_roots, tmp_path):
    if case == "dlsa":
        pytest.importorskip("zuko", reason="dlsa's flows need zuko (pip install -e '.[flows]')")
    now = run_case(case, data_roots, tmp_path / "run")
    golden = load_golden()
    if UPDATE:
        golden[case] = now
        golden["_meta"] = _meta()
        save_golden(golden)
        return
    if case not in golden:
        pytest.fail(
            f"numerics-lock: no golden entry for '{case}' in {GOLDEN} (a new method or recipe case?). Generate "
            f"it alone, so that no other entry is rewritten: LT_UPDATE_GOLDEN=1 pytest "
            f"'tests/test_numerics_lock.py::test_training_numerics_match_golden[{case}]'",
            pytrace=False,
        )
    gold = golden[case]
    diffs, hint = compare(now, gold)
    if not diffs:
        return
    config = _config_changes(now["config"], gold.get("config", {}))
    lines = [
        f"numerics-lock: the training numerics of '{case}' moved ({len(diffs)} differences). {hint}",
        *(f"  {d}" for d in diffs[:12]),
        *(["  ..."] if len(diffs) > 12 else []),
    ]
    if config:
        lines += ["The resolved config differs from the golden one:", *(f"  {c}" for c in config[:12])]
    meta = golden.get("_meta", {})
    if meta and meta != _meta():
        lines.append(
            f"The goldens were made with {meta}; this run has {_meta()} (another torch or CPU can move "
            f"the last digits, not more than {RTOL:g} relative)."
        )
    lines.append(_what_to_do(case))
    pytest.fail("\n".join(lines), pytrace=False)


def test_golden_file_has_no_stale_entries():
    golden = load_golden()
    stale = sorted(set(golden) - set(CASES) - {"_meta"})
    if UPDATE and stale:
        save_golden({k: v for k, v in golden.items() if k not in stale})
        return
    assert not stale, (
        f"numerics-lock: {GOLDEN} holds entries for cases that no longer exist: {stale} (a method "
        f"was removed or renamed?). Rewrite it with: {REGENERATE}"
    )


def test_comparison_tolerates_rounding_and_catches_changes():
    """compare() itself: every recorded loss, image sum and weight fingerprint moved by one float32 ulp passes; a
    1e-4 change of one value, another target in one batch, another learning rate or an integer buffer off by one
    fails."""
    golden = load_golden()
    missing = [c for c in CASES if c not in golden]
    if missing:
        pytest.fail(f"numerics-lock: no golden entries for {missing}. Generate them with: {REGENERATE}", pytrace=False)

    def nudged(obj, f: float):
        if isinstance(obj, float):
            return obj * f
        if isinstance(obj, dict):
            return {k: nudged(v, f) for k, v in obj.items()}
        if isinstance(obj, list):
            return [nudged(v, f) for v in obj]
        return obj

    for case in CASES:
        gold = golden[case]
        for f in (1 + 2**-23, 1 - 2**-23):
            rounded = {**gold, "steps": nudged(gold["steps"], f), "state": nudged(gold["state"], f)}
            assert compare(rounded, gold)[0] == [], case
        key = next(k for k, v in gold["state"].items() if "head" in v and math.prod(v["shape"]) > 1)
        moved = json.loads(json.dumps(gold))
        moved["state"][key]["head"][0] += 1e-4 * _scale(gold["state"], key)
        assert compare(moved, gold)[0], case
        if gold["steps"]:
            moved = json.loads(json.dumps(gold))
            moved["steps"][-1]["y"][0] += 1
            assert compare(moved, gold)[0], case
        moved = json.loads(json.dumps(gold))
        moved["epochs"][-1]["lr"] += "1"
        assert compare(moved, gold)[0], case
        plain = {**gold, "state": {**gold["state"], "x._extra_state": _fingerprint({"report": {"lr": 0.1, "n": [3]}})}}
        for moved_value, fails in ((0.1 * (1 + 1e-5), False), (0.11, True)):
            moved = {
                **plain,
                "state": {**plain["state"], "x._extra_state": _fingerprint({"report": {"lr": moved_value, "n": [3]}})},
            }
            assert bool(compare(moved, plain)[0]) == fails, case
        ints = [k for k, v in gold["state"].items() if "sq" not in v and "value" not in v]
        if ints:
            moved = json.loads(json.dumps(gold))
            moved["state"][ints[0]]["sum"] += 1
            assert compare(moved, gold)[0], case
