"""The Trainer's resume point (issue 14): every checkpoints/last.pt (a stop, checkpoint_every_steps, an epoch end,
a stage end) comes from one writer, with the keys, in the order, that older runs' files have (the reproduction
campaign's run folders resume from them), and ``ResumePoint.read`` gives a file without the later keys their
defaults."""

from __future__ import annotations

import pytest
import torch

import longtail.engine.fit as fit
from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from test_engine_cli import tiny_raw

# An epoch or stage end's last.pt, as the reproduction campaign's files hold it; mid-epoch ones add gen_state.
END_KEYS = ["format", "state", "method", "optimizer", "ema", "rng", "best", "choices", "config"]
MID_KEYS = ["format", "state", "method", "optimizer", "ema", "gen_state", "rng", "best", "choices", "config"]


def _record_last_saves(monkeypatch) -> list[dict]:
    saves: list[dict] = []
    save = fit.save_checkpoint

    def recording(path, **payload):
        if path.name == "last.pt":
            saves.append({"format": None, **payload})
        save(path, **payload)

    monkeypatch.setattr(fit, "save_checkpoint", recording)
    return saves


def test_every_resume_point_has_the_keys_of_older_runs(image_folder, tmp_path, monkeypatch):
    raw = tiny_raw(image_folder, epochs=2)
    raw["checkpoint_every_steps"] = 2
    raw["stages"].append({"name": "tau", "method": {"name": "tau_norm"}, "epochs": 0})  # no optimiser
    saves = _record_last_saves(monkeypatch)
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    states = [tuple(s["state"].values()) for s in saves]
    # mid-epoch every 2 steps (4 steps an epoch: the last one is the epoch end's), epoch ends, stage ends
    assert states == [(0, 0, 2), (0, 1, 0), (0, 1, 2), (0, 2, 0), (1, 0, 0), (2, 0, 0)], states
    for s in saves:
        assert list(s) == (MID_KEYS if s["state"]["step"] else END_KEYS), s["state"]
        assert set(s["rng"]) == {"ranks"} and len(s["rng"]["ranks"]) == 1
    assert saves[4]["optimizer"]["state"] and saves[5]["optimizer"] == {} and saves[5]["ema"] is None
    assert list(load_checkpoint(run / "checkpoints" / "last.pt")) == END_KEYS


def test_a_stop_saves_a_mid_epoch_resume_point(image_folder, tmp_path, interrupt_method):
    cfg = build_config(tiny_raw(image_folder, method="interrupt_test", epochs=2))
    cfg.stages[0].method["at_step"] = 3
    with pytest.raises(Interrupted, match=r"interrupted at stage 'main' epoch 1 step 3; continue with: longtail "
                                          r"train --resume --out "):
        train(cfg, out=tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert list(last) == MID_KEYS and last["state"] == {"stage": 0, "epoch": 0, "step": 3}
    point = fit.ResumePoint.read(tmp_path / "run" / "checkpoints" / "last.pt")
    assert point.state == fit.RunState(0, 0, 3) and not point.between_stages
    assert torch.equal(point.gen_state, last["gen_state"]) and point.optimizer.keys() == {"state", "param_groups"}


def test_resume_point_read_gives_older_files_their_defaults(tmp_path):
    path = tmp_path / "last.pt"
    assert fit.ResumePoint.read(path) is None  # no checkpoint yet: the run starts from the beginning
    weights = {"model.w": torch.ones(2)}
    save_checkpoint(path, state={"stage": 1, "epoch": 0, "step": 0}, method=weights, optimizer={}, config={})
    point = fit.ResumePoint.read(path)
    assert point.state == fit.RunState(1, 0, 0) and point.between_stages and point.path == path
    assert torch.equal(point.method["model.w"], weights["model.w"])
    assert (point.ema, point.gen_state, point.rng) == (None, None, None)
    assert point.best == {"top1": -1.0} and point.choices == []
