"""Exact resume on every path (issue 15, item 1): SIGINT at a random training step, or a kill right after a
checkpoint, then ``--resume``, ends with every tensor of final.pt equal to the uninterrupted run's.

The paths: in-memory data with batch (``cifar``) and per-image augmentation (imagenet, glt, glt_coco, and what
``augment=auto`` picks above 64 px), file datasets with and without DataLoader workers, in-memory data through
workers (``data.fast_path=false``), mixup, IFL, two-stage recipes (cRT, LWS, tau-norm) and DLSA.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
import yaml

import longtail.engine.fit as fit
from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint
from longtail.methods.decoupling import _FrozenBackbone
from longtail.registry import METHODS
from test_distributed import _folder, _launch
from test_distributed import _raw as ddp_raw
from test_dlsa import TINY_DLSA
from test_engine_cli import final_weights, tiny_raw

# Three workers on a two-core machine: DataLoader's advice to use fewer is beside the point here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def assert_same_state(a: dict, b: dict) -> None:
    """Every entry equal: tensors bit for bit, a method's extra state (DLSA's fit report) as a value."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def _raw(root, data=None, method="ce", epochs=3, **opts):
    raw = tiny_raw(root, epochs=epochs, method=method, **opts)
    raw["data"].update(data or {})
    return raw


def _two_stage(root, second: dict, data=None):
    raw = _raw(root, data, epochs=2)
    raw["stages"][0]["name"] = "features"
    raw["stages"].append({"name": "classifier", "init_from": "features", "batch_size": 8, "optim": {"lr": 0.05},
                          "schedule": {"name": "cosine"}, **second})
    return raw


def _then(raw: dict, stage: dict, **top) -> dict:
    return {**raw, **top, "stages": [*raw["stages"], stage]}


FILES = {"in_memory": "never", "num_workers": 2, "augment": "imagenet"}
PATHS = {
    "cifar_in_memory": lambda r: _raw(r),
    "imagenet_in_memory": lambda r: _raw(r, {"augment": "imagenet"}),
    "glt_in_memory": lambda r: _raw(r, {"augment": "glt"}),
    "glt_coco_in_memory": lambda r: _raw(r, {"augment": "glt_coco"}),
    "auto_above_64px": lambda r: _raw(r, {"augment": "auto", "image_size": 72}),
    "files_with_workers": lambda r: _raw(r, FILES),
    "files_cifar_with_workers": lambda r: _raw(r, {**FILES, "augment": "cifar", "num_workers": 3}),
    "files_without_workers": lambda r: _raw(r, {**FILES, "num_workers": 0}),
    "fast_path_off": lambda r: _raw(r, {"fast_path": False, "num_workers": 2, "augment": "glt"}),
    "mixup": lambda r: _raw(r, method="mixup"),
    "mixup_files": lambda r: _raw(r, FILES, method="mixup"),
    "ifl": lambda r: _raw(r, method="ifl", epochs=4, center_milestones=[0.25], center_weights=[0.0, 0.01],
                          update_milestones=[0.25, 0.5]),
    "crt": lambda r: _two_stage(r, {"method": {"name": "crt"}, "epochs": 2, "sampler": "class_balanced"}),
    "crt_files": lambda r: _two_stage(r, {"method": {"name": "crt"}, "epochs": 2, "sampler": "class_balanced"},
                                      FILES),
    "lws_then_tau_norm": lambda r: _then(_two_stage(r, {"method": {"name": "lws"}, "epochs": 2}),
                                         {"name": "tau", "method": {"name": "tau_norm"}, "epochs": 0}),
    # cRT gives a stage-1 head without bias one with bias: a resume after it must rebuild that model.
    "crt_then_tau_norm": lambda r: _then(_two_stage(r, {"method": {"name": "crt"}, "epochs": 1}),
                                         {"name": "tau", "method": {"name": "tau_norm"}, "epochs": 0},
                                         model={"backbone": "tiny", "head_bias": False}),
    "dlsa": lambda r: _then(_raw(r, epochs=2), {"name": "dlsa", "method": TINY_DLSA, "epochs": 0,
                                                "init_from": "main"}),
}

# Every other method that trains on its own (the registry drives it), under per-image augmentation, which draws
# from the global generator between its steps.
for _name in METHODS:
    _cls = METHODS.get(_name)
    if (_cls.__module__.startswith("longtail.") and _cls.trains and not issubclass(_cls, _FrozenBackbone)
            and _name not in ("ce", "mixup", "ifl")):
        PATHS[f"method_{_name}"] = lambda r, n=_name, head=_cls.requires_head: {
            **_raw(r, {"augment": "imagenet"}, method=n, epochs=2),
            **({"model": {"backbone": "tiny", "head": head}} if head else {})}


class _Count:
    """Counts optimiser steps of the fit loop (every stage's) and sends SIGINT at step ``at``."""

    def __init__(self, at: int = -1) -> None:
        self.at, self.n = at, 0


def _counting(monkeypatch, counter: _Count) -> None:
    make = fit._make_optimizer

    def make_counting(method, st):
        opt = make(method, st)
        step = opt.step

        def step_and_count(*a, **k):
            out = step(*a, **k)
            counter.n += 1
            if counter.n == counter.at:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        opt.step = step_and_count
        return opt

    monkeypatch.setattr(fit, "_make_optimizer", make_counting)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_sigint_at_a_random_step_then_resume_ends_bit_identical(path, image_folder, tmp_path, monkeypatch):
    raw = PATHS[path](image_folder)
    counter = _Count()
    _counting(monkeypatch, counter)
    ref = train(build_config(raw), out=tmp_path / "ref", progress=False)
    total = counter.n
    # A random step, but the same one on every run of the test (the path's name seeds it); never the last one
    # (a SIGINT there saves the finished run).
    at = random.Random(path).randint(1, total - 1)
    _counting(monkeypatch, counter := _Count(at))
    with pytest.raises(Interrupted, match="--resume"):
        train(build_config(raw), out=tmp_path / "int", progress=False)
    assert counter.n == at
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert counter.n == total, f"{path}: interrupted at step {at} of {total}, resumed run stepped {counter.n - at}"
    assert_same_state(final_weights(ref), final_weights(resumed))


class _Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint write (nothing after it runs)."""


@pytest.mark.parametrize("path, kill_at", [
    ("crt", {"stage": 1, "epoch": 0, "step": 0}),  # between the stages: stage 1 done, cRT not started
    ("crt_files", {"stage": 1, "epoch": 0, "step": 0}),
    ("dlsa", {"stage": 1, "epoch": 0, "step": 0}),
    ("lws_then_tau_norm", {"stage": 2, "epoch": 0, "step": 0}),
    ("crt_then_tau_norm", {"stage": 2, "epoch": 0, "step": 0}),
    ("crt_then_tau_norm", {"stage": 1, "epoch": 0, "step": 2}),
    ("files_with_workers", {"stage": 0, "epoch": 1, "step": 0}),  # an epoch end
    ("files_with_workers", {"stage": 0, "epoch": 1, "step": 3}),  # a checkpoint_every_steps save
    ("imagenet_in_memory", {"stage": 0, "epoch": 2, "step": 1}),
    ("mixup", {"stage": 0, "epoch": 1, "step": 0}),
])
def test_kill_after_a_checkpoint_then_resume_ends_bit_identical(path, kill_at, image_folder, tmp_path,
                                                               monkeypatch):
    raw = {**PATHS[path](image_folder), "checkpoint_every_steps": 1}
    ref = train(build_config(raw), out=tmp_path / "ref", progress=False)
    save = fit.save_checkpoint

    def save_then_die(path_, **payload):
        save(path_, **payload)
        if path_.name == "last.pt" and payload.get("state") == kill_at:
            raise _Killed

    monkeypatch.setattr(fit, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(build_config(raw), out=tmp_path / "int", progress=False)
    monkeypatch.setattr(fit, "save_checkpoint", save)
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"] == kill_at
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))


def test_a_checkpoint_without_rng_entries_resumes_as_before(image_folder, tmp_path, monkeypatch):
    """A last.pt written before the RNG entries existed (the running reproduction rows' files) still resumes,
    and on the default path (in-memory, batch augmentation, CE) still exactly."""
    raw = _raw(image_folder)
    ref = train(build_config(raw), out=tmp_path / "ref", progress=False)
    counter = _Count(7)
    _counting(monkeypatch, counter)
    with pytest.raises(Interrupted):
        train(build_config(raw), out=tmp_path / "int", progress=False)
    last = tmp_path / "int" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    old = {k: v for k, v in ckpt.items() if k not in ("rng", "loader")}
    assert old != ckpt  # the new entries exist, and are taken out here
    torch.save(old, last)
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))


def test_ddp_resume_with_workers_and_per_image_augmentation(tmp_path):
    """Two gloo ranks on a file dataset, each with its own DataLoader workers and per-image transforms: rank 1
    alone is interrupted, both resume, and the weights equal the uninterrupted 2-process run's (every rank's
    generators and worker streams are saved, each rank continues its own)."""
    raw = ddp_raw(_folder(tmp_path))
    raw["data"].update({"in_memory": "never", "num_workers": 2, "augment": "glt"})
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    for rc, o in _launch(cfg_path, tmp_path / "plain"):
        assert rc == 0, o
    for rc, o in _launch(cfg_path, tmp_path / "cut", env_extra={"LT_TEST_SIGINT": "1:11"}):
        assert rc == 130, o
    assert len(load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["rng"]["ranks"]) == 2
    for rc, o in _launch(cfg_path, tmp_path / "cut", "--resume"):
        assert rc == 0, o
    a, b = (load_checkpoint(p / "checkpoints" / "final.pt")["method"] for p in (tmp_path / "plain", tmp_path / "cut"))
    for k in a:  # BN statistics up to float rounding of their cross-rank mean, as the in-memory DDP resume test
        if "running_" in k:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), k
        else:
            assert torch.equal(a[k], b[k]), k


# The epochs of TINY_DLSA's fit, in order: flow 1 (2 epochs), CAC_1 head (3), flow 2 (2), CAC_2 head (3), regular (3).
@pytest.mark.parametrize("at, where", [(2, "flow 1 lr 0.2 epoch 2 of 2"), (4, "CAC_1 head epoch 2 of 3"),
                                       (12, "regular head epoch 2 of 3")])
def test_sigint_during_a_fit_on_features_stops_between_epochs_then_resumes_exactly(at, where, image_folder, tmp_path,
                                                                                    monkeypatch):
    """DLSA fits its flows and heads on extracted features (engine.feature_stage): a first Ctrl-C there stops the
    run at the next flow / head epoch end (it used to be logged and ignored), and --resume runs the stage's fit
    again from its start and ends bit-identical to the uninterrupted run."""
    pytest.importorskip("zuko")
    import longtail.engine.feature_stage as feature_stage

    raw = PATHS["dlsa"](image_folder)
    ref = train(build_config(raw), out=tmp_path / "ref", progress=False)
    log_text = (tmp_path / "ref" / "train.log").read_text()
    assert "stage dlsa: flow 1 lr 0.2 epoch 2/2: loss" in log_text  # one line per flow and head epoch
    assert "stage dlsa: CAC_2 head epoch 3/3: loss" in log_text and "stage dlsa: regular head epoch 1/3" in log_text
    epoch, calls = feature_stage._Control.epoch, [0]

    def epoch_then_interrupt(self, *a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)  # the fit loop's handler sets the stop flag; the fit goes on
        return epoch(self, *a, **k)

    monkeypatch.setattr(feature_stage._Control, "epoch", epoch_then_interrupt)
    with pytest.raises(Interrupted, match=rf"while it fitted on features \({where}\).*--resume --out"):
        train(build_config(raw), out=tmp_path / "int", progress=False)
    assert calls[0] == at  # stopped at the end of the epoch the signal arrived in
    assert not (tmp_path / "int" / "checkpoints" / "stage_dlsa.pt").exists()
    monkeypatch.setattr(feature_stage._Control, "epoch", epoch)
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))
