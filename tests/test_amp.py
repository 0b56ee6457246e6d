"""Every method trains and evaluates under bf16 autocast, as on a GPU with amp=true (the default).

CI has no GPU, so autocast is switched to the CPU's bf16 autocast here: the same op-level casting rules make
features and logits bf16 inside the forward. What this catches is dtype trouble in method code (statistics
accumulated from bf16 features, in-place updates of fp32 state, index_add / scatter of mixed dtypes), not GPU
numerics.
"""

import contextlib
import json

import pytest
import torch

import longtail.engine.evaluate as evaluate_mod
import longtail.engine.fit as fit_mod
from longtail.config import build_config
from longtail.engine import train
from test_engine_cli import final_weights, tiny_raw

_ENTERED = {"n": 0}


def _cpu_bf16_autocast(device, enabled):
    if not enabled:
        return contextlib.nullcontext()
    _ENTERED["n"] += 1
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture
def cpu_amp(monkeypatch):
    monkeypatch.setattr(fit_mod, "autocast", _cpu_bf16_autocast)
    monkeypatch.setattr(evaluate_mod, "autocast", _cpu_bf16_autocast)
    _ENTERED["n"] = 0
    yield _ENTERED


IFL = {
    "name": "ifl",
    "base": "ce",
    "center_milestones": [0.3],
    "center_weights": [0.0, 0.01],
    "update_milestones": [0.3, 0.6],
}
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
}

ONE_STAGE = {  # method -> (head, method options)
    "ce": ("linear", {}),
    "focal": ("linear", {}),
    "cb_loss": ("linear", {"loss": "focal"}),
    "balanced_softmax": ("linear", {}),
    "logit_adjust": ("linear", {}),
    "logit_adjust_posthoc": ("linear", {}),
    "mixup": ("linear", {"base": "balanced_softmax"}),
    "ldam_drw": ("cosine", {"drw_epoch": 1}),
    "deconfound": ("causal_norm", {}),
    "tde": ("causal_norm", {}),
    "ifl": ("linear", IFL),
}
STAGE_TWO = {"crt": 1, "lws": 1, "ncm": 0, "tau_norm": 0, "dlsa": 0}  # method -> epochs


def _check(run):
    state = final_weights(run)
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():  # not a method's extra state (DLSA's report)
            assert v.dtype == torch.float32, f"{k} saved as {v.dtype}"
            assert torch.isfinite(v).all(), k
    test = json.loads((run / "metrics.json").read_text())["splits"]["test"]
    assert test["num_samples"] == 12 and 0 <= test["top1"] <= 100


@pytest.mark.parametrize("name", sorted(ONE_STAGE))
def test_method_trains_under_bf16_autocast(name, image_folder, tmp_path, cpu_amp):
    head, opts = ONE_STAGE[name]
    raw = tiny_raw(image_folder, epochs=3 if name == "ifl" else 2, method=name, **opts)
    raw["model"]["head"] = head
    _check(train(build_config(raw), out=tmp_path / "run", progress=False))
    assert cpu_amp["n"] > 0  # the training steps and the evaluation ran under autocast


@pytest.mark.parametrize("name", sorted(STAGE_TWO))
def test_stage_two_method_under_bf16_autocast(name, image_folder, tmp_path, cpu_amp, monkeypatch):
    if name == "dlsa":
        pytest.importorskip("zuko")
        monkeypatch.setenv("LONGTAIL_CACHE", str(tmp_path / "cache"))
    raw = tiny_raw(image_folder, epochs=1)
    raw["stages"][0]["name"] = "features"
    method = TINY_DLSA if name == "dlsa" else {"name": name}
    raw["stages"].append(
        {
            "name": "second",
            "method": method,
            "epochs": STAGE_TWO[name],
            "batch_size": 8,
            "init_from": "features",
            "optim": {"lr": 0.05},
        }
    )
    _check(train(build_config(raw), out=tmp_path / "run", progress=False))
    assert cpu_amp["n"] > 0
