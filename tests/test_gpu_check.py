"""benchmarks/gpu_check.py in its reduced CPU form: every step runs and the record says what each measured, so the
prepared GPU command is known to work the day a GPU machine is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar(root: Path) -> Path:
    """A CIFAR-10 folder (root/<split>/<class>/*.png) big enough for max_per_class=12 at imbalance 10."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 15), ("test", 2)):
        for k, c in enumerate(CLASSES):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = (torch.full((3, 32, 32), 20 * k) + torch.randint(0, 40, (3, 32, 32), generator=g)).clamp(0, 255)
                write_png(img.to(torch.uint8), str(d / f"{i}.png"))
    return root


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    data = _fake_cifar(tmp_path / "cifar10")
    out = tmp_path / "record.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--epochs", "1",
           "--short-epochs", "2", "--data", str(data), "--out", str(out), "--quiet",
           "--set", "data.options.max_per_class=12", "--set", "data.imbalance_ratio=10", "--set", "batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    steps = rec["steps"]
    assert list(steps) == ["full_fp32", "full_bf16", "ddp_nccl", "standard_path", "plain_loop", "compile"]
    assert rec["summary"]["failed_steps"] == []
    for name in ("full_fp32", "full_bf16"):
        s = steps[name]
        assert 0 <= s["top1_tde"] <= 100 and 0 <= s["top1_deconfound"] <= 100
        assert s["images_per_s"] > 0 and s["wall_s"] > 0
        assert s["peak_gpu_mb"] is None  # no GPU: no GPU memory figure, rather than a wrong one
    assert steps["ddp_nccl"]["backend"] == "gloo" and steps["ddp_nccl"]["world_size"] == 2
    assert steps["standard_path"]["fast_path_images_per_s"] > 0
    assert steps["standard_path"]["standard_path_images_per_s"] > 0
    assert steps["plain_loop"]["ours_over_plain"] > 0
    assert steps["compile"]["on_images_per_s"] > 0 and steps["compile"]["off_images_per_s"] > 0
    # bf16 autocast is ignored on the CPU, so both full runs train the same numbers
    assert steps["full_bf16"]["top1_tde"] == steps["full_fp32"]["top1_tde"]
    assert rec["summary"]["top1_tde_fp32"] == steps["full_fp32"]["top1_tde"]


def test_gpu_check_without_a_gpu_says_how_to_run_it(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the default device is right")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "r.json").exists()
