"""The sync-free training step (issue 19, item 1): between check points (every ``sync_every`` steps, every save,
every epoch end) the fit loop never reads a tensor on the host, so on a GPU the step never waits for the device.

On the CPU there is no sync debug mode (``torch.cuda.set_sync_debug_mode`` is CUDA only), so a TorchFunctionMode
records every host read of a tensor (``.item()``, ``bool()``, ``float()``, ``.tolist()``, ``.cpu()``...) with
the training step it happened in and the file that called it.
"""

import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch.overrides import TorchFunctionMode

from longtail.config import ConfigError, build_config
from longtail.engine import Interrupted, train
from longtail.engine import fit as fit_module
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.evaluate import evaluate_split, sweep_option
from longtail.engine.inference import load_trained
from longtail.errors import TrainingError
from longtail.methods.ce import CrossEntropy
from longtail.registry import METHODS
from test_engine_cli import assert_same_state, final_weights, tiny_raw

# What makes the host wait for the device: a tensor's value read into Python, or a copy to the CPU.
HOST_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"}
STEPS = 8  # per epoch: 35 training images of the image_folder fixture in batches of 4 (drop_last)


def _raw(root, epochs=2, method="ce", **top):
    raw = tiny_raw(root, epochs=epochs, method=method)
    raw["stages"][0]["batch_size"] = 4
    raw["eval"]["plots"] = False
    return {**raw, **top}


class _HostReads(TorchFunctionMode):
    """Counts host reads per (training step, function, calling file); the step is the number of training forwards
    of CrossEntropy so far (a read after step k's forward and before step k+1's belongs to step k)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            caller = sys._getframe(1).f_code.co_filename  # called from C: the frame above is the caller
            self.reads[(self.step, name, os.path.basename(caller))] += 1
        return func(*args, **(kwargs or {}))

    def steps_with_reads(self) -> set[int]:
        return {s for s, _, _ in self.reads}


@pytest.fixture
def host_reads(monkeypatch):
    mode = _HostReads()
    forward = CrossEntropy.forward

    def counted(self, images, targets, batch=None):
        if self.training and torch.is_grad_enabled():
            mode.step += 1
        return forward(self, images, targets, batch)

    monkeypatch.setattr(CrossEntropy, "forward", counted)
    return mode


def test_no_host_read_between_check_points(image_folder, tmp_path, host_reads):
    """sync_every=3 over 2 epochs of 8 steps: the loss is read at steps 3 and 6 of each epoch and at its end (8);
    no other step reads anything on the host, in the fit loop, the loader, the method or the optimiser."""
    with host_reads:
        train(build_config(_raw(image_folder, sync_every=3)), out=tmp_path / "run", progress=False)
    assert host_reads.step == 2 * STEPS
    check_points = {3, 6, 11, 14}  # global steps: 3 and 6 of epochs 1 and 2
    epoch_ends = {8, 16}
    assert host_reads.steps_with_reads() - {0} <= check_points | epoch_ends, sorted(host_reads.reads.items())
    for s in check_points:  # one read there: the loss sum, by the fit loop
        assert [(k[1:], n) for k, n in host_reads.reads.items() if k[0] == s] == [(("item", "fit.py"), 1)], s
    assert host_reads.reads[(8, "item", "fit.py")] == 1  # epoch 1's end: its loss sum, once


def test_sync_every_1_reads_every_step_and_changes_no_numerics(image_folder, tmp_path, host_reads):
    """The mode above sees reads when they are there; and when the loss is read changes nothing trained."""
    with host_reads:
        one = train(build_config(_raw(image_folder, sync_every=1)), out=tmp_path / "one", progress=False)
    assert all(host_reads.reads[(s, "item", "fit.py")] >= 1 for s in range(1, 2 * STEPS + 1))
    fifty = train(build_config(_raw(image_folder)), out=tmp_path / "fifty", progress=False)
    assert_same_state(final_weights(one), final_weights(fifty))

    def epoch_lines(run):
        return [ln.split(" INFO ", 1)[1].rsplit(" lr ", 1)[0] for ln in (run / "train.log").read_text().splitlines()
                if " INFO stage main epoch " in ln and " loss " in ln]

    assert len(epoch_lines(one)) == 2 and epoch_lines(one) == epoch_lines(fifty)


def test_epoch_loss_is_the_same_float64_sum_as_before(image_folder, tmp_path, monkeypatch):
    """The logged epoch loss: the device's float64 sum equals, to the bit, the Python sum of float(loss) * B
    the loop made before (what the numerics lock's train.log lines and the reproduction logs were made with)."""
    losses: list[tuple[float, int]] = []
    forward = CrossEntropy.forward

    def recorded(self, images, targets, batch=None):
        out = forward(self, images, targets, batch)
        if self.training and torch.is_grad_enabled():
            losses.append((out["loss"].item(), len(targets)))
        return out

    sums: list[float] = []
    reduce = fit_module.all_reduce_sum

    def recorded_reduce(values, dist, device):
        sums.append(values[0])
        return reduce(values, dist, device)

    monkeypatch.setattr(CrossEntropy, "forward", recorded)
    monkeypatch.setattr(fit_module, "all_reduce_sum", recorded_reduce)
    train(build_config(_raw(image_folder, sync_every=3)), out=tmp_path / "run", progress=False)
    expected = []
    for e in range(2):
        s = 0.0
        for loss, n in losses[e * STEPS : (e + 1) * STEPS]:
            s += loss * n
        expected.append(s)
    assert sums == expected  # bit-identical floats


@pytest.fixture
def nan_method():
    """``nan_test``: cross-entropy whose loss is NaN from its ``nan_at``-th training forward on, and which sends
    its process SIGINT at its ``sigint_at``-th (counted across the test)."""

    class NanFrom(CrossEntropy):
        @dataclass
        class Config:
            label_smoothing: float = 0.0
            nan_at: int = -1
            sigint_at: int = -1

        calls = 0

        def forward(self, images, targets, batch=None):
            out = super().forward(images, targets, batch)
            if self.training and torch.is_grad_enabled():
                cls = type(self)
                cls.calls += 1
                if cls.calls == self.cfg.sigint_at:
                    os.kill(os.getpid(), signal.SIGINT)
                if 0 < self.cfg.nan_at <= cls.calls:
                    out = {**out, "loss": out["loss"] * float("nan")}
            return out

    with METHODS.temporarily("nan_test", NanFrom, help="test only: CE whose loss turns NaN at a step"):
        yield NanFrom


def _nan_raw(root, nan_at, sigint_at=-1, **top):
    raw = _raw(root, method="nan_test", **top)
    raw["stages"][0]["method"].update(nan_at=nan_at, sigint_at=sigint_at)
    return raw


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_nan_names_the_steps_between_check_points(image_folder, tmp_path, nan_method):
    with pytest.raises(TrainingError) as e:
        train(build_config(_nan_raw(image_folder, 6, sync_every=4)), out=tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "stage 'main': non-finite loss between steps 5 and 8 of epoch 1" in msg, msg
    assert "sync_every=4" in msg and "lower the learning rate (optim.lr=0.05)" in msg
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # the epoch end found it: nothing saved


def test_nan_found_at_the_epoch_end(image_folder, tmp_path, nan_method):
    with pytest.raises(TrainingError, match="non-finite loss between steps 1 and 8 of epoch 2 "):
        train(build_config(_nan_raw(image_folder, 12)), out=tmp_path / "run", progress=False)  # sync_every 50
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"] == {"stage": 0, "epoch": 1, "step": 0} and _all_finite(last["method"])


def test_nan_before_a_periodic_save_is_not_saved(image_folder, tmp_path, nan_method):
    """checkpoint_every_steps=3: the save at epoch 2 step 6 is a check point; the NaN of step 5 stops the run
    there, and last.pt stays the finite resume point of step 3."""
    raw = _nan_raw(image_folder, STEPS + 5, checkpoint_every_steps=3)
    with pytest.raises(TrainingError, match="non-finite loss between steps 4 and 6 of epoch 2 "):
        train(build_config(raw), out=tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"] == {"stage": 0, "epoch": 1, "step": 3} and _all_finite(last["method"])


def test_sigint_with_a_nan_reports_the_nan_and_saves_nothing(image_folder, tmp_path, nan_method):
    raw = _nan_raw(image_folder, STEPS + 5, sigint_at=STEPS + 5, sync_every=1)
    with pytest.raises(TrainingError, match="non-finite loss at step 5 of epoch 2 "):
        train(build_config(raw), out=tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"] == {"stage": 0, "epoch": 1, "step": 0} and _all_finite(last["method"])


def test_sigint_between_check_points_stops_there_and_resumes_exactly(image_folder, tmp_path, interrupt_method):
    """A single process reads its stop flag (a host bool) every step: SIGINT in step 5 saves step 5's resume
    point although the loss is read only every 3 steps, and the resumed run ends as the uninterrupted one."""
    ref = train(build_config(_raw(image_folder)), out=tmp_path / "ref", progress=False)
    cfg = build_config(_raw(image_folder, method="interrupt_test", sync_every=3))
    cfg.stages[0].method["at_step"] = 5
    with pytest.raises(Interrupted, match="epoch 1 step 5;"):
        train(cfg, out=tmp_path / "int", progress=False)
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["state"] == {"stage": 0, "epoch": 0, "step": 5}
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))


def test_sync_every_must_be_positive(image_folder):
    with pytest.raises(ConfigError, match=r"sync_every must be >= 1"):
        build_config(_raw(image_folder), ["sync_every=0"])


def test_evaluation_reads_back_once_not_per_batch(image_folder, tmp_path):
    """12 test images in batches of 2: predictions and targets come back to the host once each; a sweep reads
    one prediction tensor per value."""
    run_dir = train(build_config(_raw(image_folder, epochs=1)), out=tmp_path / "run", progress=False)
    run = load_trained(run_dir)
    run.cfg.eval.batch_size = 2
    mode = _HostReads()
    with mode:
        evaluate_split(run.method, run.loader, "test", run.cfg.eval, amp=False)
    assert {k[1:]: n for k, n in mode.reads.items() if k[2] == "evaluate.py"} == {("cpu", "evaluate.py"): 2}
    mode = _HostReads()
    with mode:
        rows = sweep_option(run.method, run.loader, "test", "label_smoothing", [0.0, 0.1, 0.2], run.cfg.eval, False)
    assert len(rows) == 3 and rows[0]["top1"] == rows[1]["top1"]  # CE predicts the same at any label smoothing
    assert {k[1:]: n for k, n in mode.reads.items() if k[2] == "evaluate.py"} == {("cpu", "evaluate.py"): 2 + 3}
