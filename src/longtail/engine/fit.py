"""The one training loop: stages of (method, sampler, optimiser, schedule) over one model.

Every method enters through the Method hooks; this file never asks which method it runs.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from longtail.config import ConfigError, RunConfig, StageConfig, absolute_paths, load_raw, save_yaml, to_dict
from longtail.data import LTDataset, create_dataset
from longtail.data.loaders import Loader
from longtail.data.samplers import create_sampler, shard
from longtail.engine.build import build_config, resolve
from longtail.engine.checkpoint import load_checkpoint, model_state, save_checkpoint
from longtail.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    average_buffers,
    averaged_state_dict,
    barrier,
    broadcast_from_main,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from longtail.engine.ema import WeightEMA
from longtail.engine.evaluate import (
    autocast,
    check_off_values,
    choose_on_val,
    evaluate_split,
    select_metric_of,
    thresholds_of,
)
from longtail.engine.record import inference_record
from longtail.engine.run_log import RunLog, check_log_extras
from longtail.engine.schedule import follows_schedule, lr_at, optimizer_groups
from longtail.errors import (
    WRITE_ERRNOS,
    CheckpointError,
    MissingFileError,
    TrainingError,
    UsageError,
    UserError,
    write_error,
)
from longtail.evaluation.metrics import describe_class_groups
from longtail.methods import BatchInfo, Method, MethodContext, create_method
from longtail.models import Classifier, create_model
from longtail.plugins import record_plugins
from longtail.progress import progress_bars
from longtail.registry import METHODS
from longtail.run_folder import (
    RunLock,
    check_new_run_folder,
    check_resumable,
    default_command,
    point_latest,
    remove_orphans,
    unique_run_dir,
)
from longtail.utils import (
    atomic_write_json,
    environment_info,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("longtail")


class Interrupted(RuntimeError):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked after every step (under DDP: agreed by all ranks every ``sync_every``
    steps); a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        log.warning("received %s: saving a checkpoint after this step (under DDP: at the next check point)",
                    signal.Signals(signum).name)

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class RunState:
    """Where a run is: the stage index, completed epochs in it, and steps into the current epoch."""

    stage: int = 0
    epoch: int = 0
    step: int = 0


def new_run_dir(cfg: RunConfig, out: str | Path | None) -> Path:
    """``out``, or a new folder ``runs/<name>-<time>`` (``-2``, ``-3``... when a run started in the same second
    has it), created here so that no other run can take it; ``runs/latest`` then links to it (an ``--out``
    folder is the user's to name and leaves the link alone)."""
    if out is not None:
        return Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = unique_run_dir(Path("runs"), f"{cfg.name}-{stamp}")
    point_latest(run_dir)
    return run_dir


def _setup_logging(run_dir: Path) -> logging.Handler:
    try:
        handler = logging.FileHandler(run_dir / "train.log")
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(run_dir / "train.log", e) from None
        raise
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


def build_stage_method(
    cfg: RunConfig,
    stage_idx: int,
    model: Classifier,
    ds: LTDataset,
    loader: Loader,
    device: torch.device,
    dist: DistInfo | None = None,
) -> tuple[Method, MethodContext]:
    st = cfg.stages[stage_idx]
    dist = dist or DistInfo()
    steps = loader.steps_per_epoch(len(ds.train), st.batch_size, st.drop_last)
    ctx = MethodContext(
        num_classes=ds.num_classes,
        train_counts=ds.train_counts(),
        epochs=st.epochs,
        steps_per_epoch=steps,
        device=device,
        world_size=dist.world_size,
        rank=dist.rank,
        stage=st,
        dataset=ds,
        loader=loader,
        sampler_seed=_epoch_seed(cfg.seed, stage_idx, 0),
    )
    method = create_method(st.method, model, ctx).to(device)
    return method, ctx


def _make_optimizer(method: Method, st: StageConfig) -> torch.optim.Optimizer:
    groups = optimizer_groups(method.param_groups(), f"stage '{st.name}': method '{st.method['name']}'")
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError(
            f"stage '{st.name}': method '{st.method['name']}' has no trainable parameters, so "
            f"epochs={st.epochs} would train nothing; set the stage's epochs to 0"
        )
    if st.optim.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=st.optim.lr, betas=tuple(st.optim.betas), eps=st.optim.eps, weight_decay=st.optim.weight_decay
        )
    return torch.optim.SGD(
        groups,
        lr=st.optim.lr,
        momentum=st.optim.momentum,
        weight_decay=st.optim.weight_decay,
        nesterov=st.optim.nesterov,
    )


def _set_lr(opt: torch.optim.Optimizer, st: StageConfig, t: float) -> float:
    lr = lr_at(st.optim.lr, st.schedule, st.epochs, t)
    for g in opt.param_groups:
        if follows_schedule(g):  # not a group with a constant lr of its own (IFL's centres)
            g["lr"] = lr
    return lr


def _epoch_steps(st: StageConfig, sampler_steps: int, n_train: int) -> int:
    """Steps per epoch: the sampler's whole stream, or with ``epoch_length: dataset`` int(N / B) of it (Decoupling's
    ``run_networks.py``: ``epoch_steps = int(len(train set) / batch_size)``, the loop breaks at that step)."""
    if st.epoch_length == "sampler":
        return sampler_steps
    steps = n_train // st.batch_size
    if steps < 1:
        raise ConfigError(
            f"stage '{st.name}': epoch_length=dataset gives int({n_train} / {st.batch_size}) = 0 steps "
            f"per epoch; lower batch_size or use epoch_length=sampler"
        )
    return min(steps, sampler_steps)  # the reference loop also ends when its loader runs out


def _choose_options(
    method: Method, st: StageConfig, loader: Loader, cfg: RunConfig, channels_last: bool, dist: DistInfo
) -> list[dict]:
    """Choose the method's ``OPTION: val`` settings on the val split (``Method.val_options``) and store them in the
    method; returns one record per option for metrics.json."""
    out = []
    for option, grid in method.options_to_choose().items():
        choice = choose_on_val(method, loader, option, grid, cfg.eval, cfg.amp, channels_last, dist)
        method.set_chosen(option, choice["value"])
        broadcast_from_main(method.chosen_buffer(option))  # DDP: one value, rank 0's
        log.info(
            "stage %s: %s=%g chosen on val (%s %.2f); curve: %s",
            st.name,
            option,
            choice["value"],
            choice["metric"],
            choice["score"],
            ", ".join(
                f"{r[option]:g}: {r[choice['metric']]:.2f}" if r[choice["metric"]] is not None else f"{r[option]:g}: -"
                for r in choice["curve"]
            ),
        )
        out.append({"stage": st.name, **choice})
    return out


def val_split_hint(ds: LTDataset) -> str:
    """How to give a run of this dataset a val split."""
    if ds.name in ("cifar10_lt", "cifar100_lt"):
        return "set data.val_per_class (e.g. 100: CIFAR images the long-tailed subset left out) or data.val_fraction"
    return "set data.val_fraction (e.g. 0.1, held out of train per class)"


def _options_without_val(cfg: RunConfig, ds: LTDataset) -> list[str]:
    """A run without a val split: an ``OPTION: val`` with a ``<option>_fallback`` becomes that value in the run's
    config (saved so, so `longtail eval` predicts the same); one without a fallback is refused. Returns the notes
    said (logged, and printed at the end of `longtail train`)."""
    notes = []
    for st in cfg.stages:
        for option, fallback in METHODS.get(st.method["name"]).fallbacks_without_val(st.method).items():
            if fallback is None:
                raise ConfigError(
                    f"stage '{st.name}': method.{option}=val is chosen on a validation split and this "
                    f"run has none (never on test): {val_split_hint(ds)}"
                )
            st.method[option] = fallback
            notes.append(
                f"stage {st.name}: method.{option}=val is chosen on a validation split and this run has none (never "
                f"on test), so it predicts with method.{option}_fallback={fallback}; to choose {option} on val, "
                f"{val_split_hint(ds)}"
            )
            log.warning(notes[-1])
    return notes


def _init_checkpoint(init_from: str) -> Path:
    """The checkpoint an ``init_from`` path names: a run folder's evaluated weights, or a ``.pt`` file."""
    p = Path(init_from).expanduser()
    if p.is_dir():
        final = p / "checkpoints" / "final.pt"
        if not final.is_file():
            raise MissingFileError(
                f"init_from {init_from}: a folder without checkpoints/final.pt (is it a "
                f"finished longtail run? an interrupted one continues with --resume)"
            )
        return final
    if not p.is_file():
        raise MissingFileError(f"init_from {init_from}: no such run folder or checkpoint file")
    return p


def _check_stages_train(cfg: RunConfig) -> None:
    """Refuse a stage that would silently train nothing: epochs 0 for a method that learns in its epochs
    (``Method.trains``), without ``init_from``. With init_from it uses those weights as they are (skip a stage 1
    you already have); without, it would report what it started from (random weights for a first stage).
    At train start, not in config validation: a shipped recipe may leave init_from for the command line."""
    for i, st in enumerate(cfg.stages):
        if METHODS.get(st.method["name"]).trains and st.epochs == 0 and st.init_from is None:
            post_hoc = ", ".join(n for n in METHODS if not METHODS.get(n).trains)
            raise ConfigError(
                f"stages.{i} ('{st.name}'): epochs=0 with method '{st.method['name']}' trains nothing; "
                f"set epochs >= 1, or init_from to take its weights from an earlier stage or another "
                f"run (only post-hoc methods have epochs 0 on their own: {post_hoc})"
            )


def _resolve_init_paths(cfg: RunConfig) -> None:
    """Make path-valued ``init_from`` absolute and check they exist, so the saved config resumes anywhere."""
    for i, st in enumerate(cfg.stages):
        if st.init_from is not None and st.init_from not in [s.name for s in cfg.stages[:i]]:
            st.init_from = str(_init_checkpoint(st.init_from).resolve())


def _load_init(model: torch.nn.Module, st: StageConfig, ckpt_dir: Path, earlier: list[str]) -> None:
    path = ckpt_dir / f"stage_{st.init_from}.pt" if st.init_from in earlier else _init_checkpoint(st.init_from)
    weights = model_state(load_checkpoint(path)["method"])
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # another run's backbone / head / class count: say which settings differ
        raise CheckpointError(
            f"stage '{st.name}': the weights in {path} do not fit this model (model.backbone, "
            f"model.head, head_bias and the class count must match the run they come from): "
            f"{state_mismatch(model.state_dict(), weights)}"
        ) from None
    log.info("stage %s starts from %s", st.name, path)


def state_mismatch(own: dict, loaded: dict) -> str:
    """One line on how a state dict differs from the one a module expects (torch's message spans lines)."""
    missing = [k for k in own if k not in loaded]
    extra = [k for k in loaded if k not in own]
    shapes = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in loaded and hasattr(loaded[k], "shape") and tuple(loaded[k].shape) != tuple(own[k].shape)
    ]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")

    parts = [
        f"{len(missing)} missing ({few(missing)})" if missing else "",
        f"{len(extra)} unexpected ({few(extra)})" if extra else "",
        f"{len(shapes)} of another shape ({few(shapes)}; checkpoint vs model)" if shapes else "",
    ]
    return "; ".join(p for p in parts if p) or "the tensors differ"


def _load_method_state(method: Method, state: dict, path: Path) -> None:
    try:
        method.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{path} does not fit the method its config.yaml builds ("
            f"{state_mismatch(method.state_dict(), state)}); was config.yaml edited? restore it, "
            f"or start the run again"
        ) from None


def _rng_entry(loader: Loader, device: torch.device, dist: DistInfo) -> dict:
    """last.pt's ``rng``: every rank's global generators (torch CPU and GPU, numpy, python: mixup, per-image
    transforms in the main process, a re-initialised head, DataLoader seeds) and its training workers' streams,
    as they are at this point of the run. Called on every rank."""
    return {"ranks": gather_objects({"global": rng_state(device), "loader": loader.state_dict()}, dist)}


def _restore_rng(entry: dict | None, loader: Loader, device: torch.device, dist: DistInfo) -> None:
    """Put back what ``_rng_entry`` saved, so that a resumed run draws what the uninterrupted one drew from the
    save on. A checkpoint without it (written before it existed) resumes as it did then: the generators as
    seeded at start, exact on in-memory data with batch augmentation and a method that draws nothing."""
    if entry is None:
        return
    ranks = entry["ranks"]
    if len(ranks) != dist.world_size:
        log.warning(
            "last.pt was saved by %d processes, this run has %d: random augmentation and draws continue from "
            "fresh streams (the result differs from an uninterrupted run)", len(ranks), dist.world_size
        )
        return
    set_rng_state(ranks[dist.rank]["global"], device)
    loader.load_state_dict(ranks[dist.rank]["loader"])


def _loss_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the epoch's loss sum on the device: float64, as the Python float it replaces (the same sum to
    the bit); float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _read_check_point(loss_sum: torch.Tensor, seen: int, stop: bool, dist: DistInfo) -> tuple[float, int, bool]:
    """A check point's host read: (the epoch's loss sum so far, its images, whether to stop), summed over the ranks
    under DDP, so that every rank stops, or finds a non-finite loss, at the same step. Between check points the
    training step never waits for the device."""
    total = loss_sum.item()
    if not dist.enabled:
        return total, seen, stop
    total, seen_all, stops = all_reduce_sum([total, float(seen), float(stop)], dist, loss_sum.device)
    return total, int(seen_all), stops > 0


def _non_finite(st: StageConfig, epoch: int, first: int, last: int, loss_sum: float, sync_every: int) -> TrainingError:
    """The error for a loss found non-finite at a check point: it became so in one of steps ``first..last``
    (1-based, in ``epoch``, 0-based); nothing after the last finite check point is saved."""
    where = f"at step {last}" if first == last else f"between steps {first} and {last}"
    return TrainingError(
        f"stage '{st.name}': non-finite loss {where} of epoch {epoch + 1} (the epoch's loss sum is {loss_sum}; "
        f"the loss is read every sync_every={sync_every} steps); lower the learning rate "
        f"(optim.lr={st.optim.lr}) or check the data"
    )


def train(
    cfg: RunConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Train a recipe, evaluate it, and write a complete run folder. Returns the run folder.

    ``cfg`` is resolved first (``longtail.engine.build.resolve``: registered names checked, method options completed);
    the run works on that copy and leaves the caller's object as it is.

    With ``resume=True``, ``out`` names an existing run folder; training continues from its last
    checkpoint with its saved config and ends at the same weights as an uninterrupted run: the checkpoint holds
    every rank's global generators and DataLoader worker streams besides the batch generator (a checkpoint
    written before those were saved resumes with freshly seeded ones, exact only where nothing draws from them).

    A new run needs ``out`` to be new, empty, or a folder a start stopped early in; a folder with other files
    or a finished or unfinished run is refused unless ``overwrite`` (see ``longtail.run_folder``). While it trains,
    the run folder is locked (``.lock``): a second run or resume in it is refused. ``command`` is the command
    line recorded in the log (default: this process's), so a run killed during start-up can say how to start
    it again.

    Under ``torchrun`` (or inside a process group the caller started) this trains with DDP: every rank
    calls ``train`` with the same arguments; ``stages[].batch_size`` stays the GLOBAL batch; rank 0 alone
    writes (and locks) the run folder.
    """
    command = command or default_command()
    if resume:
        if out is None:
            raise UsageError("--resume needs the run folder: longtail train --resume --out RUN_DIR")
        if overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite starts a new one there: pick one")
        run_dir: Path | None = Path(out)
        check_resumable(run_dir)
        saved = load_raw(run_dir / "config.yaml")
        saved.pop("meta", None)
        cfg = build_config(saved)
    else:
        cfg = resolve(cfg) if cfg is not None else build_config({})  # a copy: the caller's config is left as it is
        _check_stages_train(cfg)
        _resolve_init_paths(cfg)  # before anything trains: a wrong path fails now, not after stage 1
        absolute_paths(cfg)  # config.yaml names the same files from any working directory
        run_dir = Path(out) if out is not None else None
    plugin_notes = record_plugins(cfg)  # config.yaml names the plugins eval / predict / export must import
    dist, device = init_distributed(resolve_device(cfg.device))
    lock, handler = None, None
    try:
        notes: list[str] = list(plugin_notes)
        if dist.is_main:
            run_dir = new_run_dir(cfg, run_dir)
            # Lock first, then look: two runs started on one folder at once cannot both find it free.
            lock = RunLock(run_dir).acquire(command)
            notes += lock.notes
            if not resume:
                notes += check_new_run_folder(run_dir, overwrite)
            orphans = remove_orphans(run_dir)
            if orphans:
                notes.append(
                    f"removed {len(orphans)} temporary file(s) of a write that was killed: {', '.join(orphans)}"
                )
        run_dir = broadcast_object(run_dir, dist)  # the default folder's name is rank 0's
        run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main:
            handler = _setup_logging(run_dir)
            if not resume:
                log.info("command: %s", command)
            for note in notes:
                log.warning(note)
        try:
            with progress_bars(progress and dist.is_main):  # (the data's decoding bars too)
                return _train(cfg, run_dir, resume, progress and dist.is_main, dist, device)
        except Exception as e:  # the run's own log says how it ended, beside the terminal
            if handler is not None and not isinstance(e, Interrupted):  # (an interrupt logs its checkpoint)
                if isinstance(e, UserError):
                    log.error("failed: %s", " ".join(str(e).split()))
                else:
                    log.exception("failed with an unexpected error (a bug; please report it with this log)")
            raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()
        shutdown(dist)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: DistInfo, device: torch.device) -> Path:
    main = dist.is_main
    for st in cfg.stages:
        if st.batch_size % dist.world_size:
            raise ConfigError(
                f"stage '{st.name}': batch_size {st.batch_size} is the global batch and must divide "
                f"evenly over {dist.world_size} processes"
            )
    check_log_extras(cfg)  # a missing tensorboard / wandb fails now, not after an epoch
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    last_path = ckpt_dir / "last.pt"
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    if resume:
        log.info("resuming %s from %s", run_dir, "its last checkpoint" if ckpt else "the start (no checkpoint yet)")

    t0 = time.time()
    ds = create_dataset(cfg.data)
    loader = Loader(ds, device, cfg.data.augment, cfg.data.num_workers, cfg.data.fast_path)
    if cfg.eval.select == "best_val" and "val" not in ds.splits:
        raise ConfigError("eval.select=best_val needs a validation split: set data.val_fraction (never select on test)")
    select_metric = None  # the val metric best_val picks on (eval.select_metric, auto resolved on this val split)
    if cfg.eval.select == "best_val":
        select_metric = select_metric_of(cfg.eval, ds.splits["val"].targets, ds.num_classes)
        log.info("eval.select=best_val: the epoch with the best val %s is reported", select_metric)
    notes = []  # for the user at the end of `longtail train`: metrics.json "notes"
    if "val" not in ds.splits:  # before anything trains: an option chosen on val needs a val split
        notes += _options_without_val(cfg, ds)
    model = create_model(cfg.model, ds.num_classes).to(device)
    channels_last = cfg.model.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    if main and (not resume or ckpt is None):
        meta = {
            **environment_info(device),
            "started": datetime.now().isoformat(timespec="seconds"),
            "dataset": {k: v for k, v in ds.info.items() if k != "counts"},
            "train_counts": ds.train_counts().tolist(),
        }
        save_yaml({**to_dict(cfg), "meta": meta}, run_dir / "config.yaml")
    log.info(
        "run %s: %s, %d classes, %d train images (%s), device %s",
        run_dir,
        ds.name,
        ds.num_classes,
        len(ds.train),
        ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items() if k != "train"),
        device,
    )

    state = RunState(**ckpt["state"]) if ckpt else RunState()
    saved_rng = ckpt.get("rng") if ckpt else None
    # Saved at a stage end (epoch 0, step 0 of the next stage): the next stage starts afresh from the model.
    between_stages = ckpt is not None and state.epoch == 0 and state.step == 0
    if ckpt is not None:
        # What the earlier stages' methods made of the model (a new head, frozen parameters) before its state
        # loads; their weights come from the checkpoint.
        for sj in range(min(state.stage, len(cfg.stages) - 1)):
            build_stage_method(cfg, sj, model, ds, loader, device, dist)
        if between_stages and state.stage < len(cfg.stages):
            weights = model_state(ckpt["method"])
            try:
                model.load_state_dict(weights)
            except RuntimeError:
                raise CheckpointError(
                    f"{last_path} does not fit the model its config.yaml builds "
                    f"({state_mismatch(model.state_dict(), weights)}); was config.yaml edited? restore it, "
                    f"or start the run again"
                ) from None
    best = ckpt.get("best", {"top1": -1.0}) if ckpt else {"top1": -1.0}
    choices: list[dict] = ckpt.get("choices", []) if ckpt else []  # options chosen on val, per stage
    timing: list[dict] = []  # the epochs this process trained: seconds and images (all ranks), for `bench`
    every_steps = cfg.checkpoint_every_steps  # 0: checkpoints at epoch ends only
    # metrics.csv (+ TensorBoard / W&B): a resumed run continues it from its checkpoint's (stage, epoch)
    run_log = RunLog(run_dir, cfg, (state.stage, state.epoch) if ckpt else None) if main else None
    sync_every = cfg.sync_every  # steps between check points: host reads of the loss (and DDP's stop flag)
    method = None
    ema = None  # the current stage's WeightEMA (ema.decay > 0); the last stage's is evaluated as splits_ema
    with _StopFlag() as stop:
        for si in range(state.stage, len(cfg.stages)):
            st = cfg.stages[si]
            resuming = ckpt is not None and si == state.stage
            if resuming and between_stages:  # the uninterrupted run drew from here: the stage's set-up on
                _restore_rng(saved_rng, loader, device, dist)
            if st.init_from is not None:
                _load_init(model, st, ckpt_dir, [s.name for s in cfg.stages[:si]])
            method, ctx = build_stage_method(cfg, si, model, ds, loader, device, dist)
            method.on_stage_start(ctx)
            opt = _make_optimizer(method, st) if st.epochs > 0 else None  # tau_norm / ncm: nothing to train
            start_epoch, start_step, gen_state = 0, 0, None
            if resuming and not between_stages:
                _load_method_state(method, ckpt["method"], last_path)
                if opt is not None:
                    opt.load_state_dict(ckpt["optimizer"])
                start_epoch, start_step, gen_state = state.epoch, state.step, ckpt.get("gen_state")
            # EMA of the weights (ema.decay): from the stage's starting weights, or the resumed checkpoint's EMA
            ema = WeightEMA(method, st.ema.decay) if st.ema.decay > 0 and opt is not None else None
            if ema is not None and resuming and not between_stages and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
            clip_params = [p for g in opt.param_groups for p in g["params"]] if st.optim.clip_grad_norm else None
            if resuming:
                ckpt = None
            train_fn = method
            if dist.enabled and opt is not None:
                # Wrapped per stage, after the method froze what it freezes (DDP registers only trainable
                # parameters at wrap time); the wrapper broadcasts rank 0's weights, then averages gradients.
                # Buffers are not broadcast each step: every rank's BN statistics follow its own batches (a
                # linear EMA) and average_buffers() takes their mean at each epoch end and before a mid-epoch save.
                train_fn = torch.nn.parallel.DistributedDataParallel(
                    method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
                )
            if cfg.compile:
                train_fn = torch.compile(train_fn)
            local_batch = st.batch_size // dist.world_size
            sampler = method.sampler(ds, ctx)  # e.g. IFL's two environments; None: the stage's configured one
            if sampler is None:
                sampler = create_sampler(
                    st.sampler,
                    ds.train.targets,
                    ds.num_classes,
                    seed=ctx.sampler_seed,
                    total_epochs=st.epochs,
                )
            # An epoch is the sampler's stream (n_max * C for class-aware sampling), this rank's share of it; with
            # epoch_length=dataset its first int(N / B) global batches (every rank the same number of steps).
            sampler_steps = loader.steps_per_epoch(-(-len(sampler) // ctx.world_size), local_batch, st.drop_last)
            steps = ctx.steps_per_epoch = _epoch_steps(st, sampler_steps, len(ds.train))
            cut = steps * st.batch_size if st.epoch_length == "dataset" else None  # global samples per epoch
            if opt is not None and steps == 0:  # before this stage trains anything: it would train nothing
                raise ConfigError(
                    f"stage '{st.name}': an epoch of {len(sampler)} sampled images in batches of {st.batch_size} "
                    f"(drop_last={str(st.drop_last).lower()}) has 0 training steps; set stages.{si}.batch_size "
                    f"to at most {-(-len(sampler) // ctx.world_size) * dist.world_size}, or drop_last=false, or "
                    f"use more training images"
                )
            bar = tqdm(
                total=st.epochs * steps,
                initial=start_epoch * steps + start_step,
                unit="step",
                desc=f"{st.name} ({st.method['name']})",
                disable=not progress,
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0,
                file=sys.stderr,
            )
            if resuming and not between_stages:  # mid-stage: the uninterrupted run drew from here on
                _restore_rng(saved_rng, loader, device, dist)
            for epoch in range(start_epoch, st.epochs):
                gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, si, epoch) ^ 0x5EED)
                first_step = start_step if epoch == start_epoch else 0
                if first_step and gen_state is not None:
                    gen.set_state(gen_state)
                lr = ctx.lr = _set_lr(opt, st, epoch)
                method.on_epoch_start(epoch, ctx)
                method.train()
                # Cut before sharding: the same (seed, epoch) stream, so a resumed epoch sees the same batches.
                indices = shard(sampler.indices(epoch)[:cut], ctx.rank, ctx.world_size)
                # The epoch's loss sum stays on the device: reading the loss every step would make the host wait for
                # the device every step. It is read at check points (every sync_every steps, before every save, at
                # the epoch end); a non-finite loss makes the sum non-finite for good, so a check point finds it.
                loss_sum = torch.zeros((), dtype=_loss_dtype(device), device=device)
                seen, t_epoch = 0, time.time()
                checked = first_step  # steps of this epoch whose losses a check point found finite
                # Every rank uses the same augmentation stream `gen`, so its state (saved by rank 0) resumes all.
                for step, (x, y) in enumerate(
                    loader.train_batches(indices, local_batch, st.drop_last, gen, first_step), start=first_step
                ):
                    if st.schedule.per_iteration:
                        lr = _set_lr(opt, st, epoch + step / steps)
                    batch = BatchInfo(indices[step * local_batch : (step + 1) * local_batch], step)  # sample ids
                    with autocast(device, cfg.amp):
                        out = train_fn(loader.normalize(x, channels_last), y, batch=batch)
                    loss = out["loss"]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip_params is not None:
                        torch.nn.utils.clip_grad_norm_(clip_params, st.optim.clip_grad_norm)
                    opt.step()
                    if ema is not None:
                        ema.update()
                    loss_sum += loss.detach().to(loss_sum.dtype) * len(y)  # as float(loss) * len(y) in float64
                    seen += len(y)
                    bar.update(1)
                    save_now = every_steps and (step + 1) % every_steps == 0 and step + 1 < steps
                    # Check points are the same steps on every rank. A single process reads its stop flag (a host
                    # bool, free) every step; under DDP the ranks agree on it in the check point's all-reduce.
                    if (step + 1) % sync_every == 0 or save_now or (stop.stop and not dist.enabled):
                        total, total_seen, stopping = _read_check_point(loss_sum, seen, stop.stop, dist)
                        if not math.isfinite(total):
                            bar.close()
                            raise _non_finite(st, epoch, checked + 1, step + 1, total, sync_every)
                        checked = step + 1
                        bar.set_postfix_str(
                            f"epoch {epoch + 1} loss {total / max(total_seen, 1):.3f} lr {lr:.3g}", refresh=False
                        )
                    else:
                        stopping = False
                    if stopping:  # all ranks stop at the same step, after a check point found the loss finite
                        stop.stop = True
                        # BN running statistics are linear EMAs, so averaging them now and again at the epoch
                        # end equals averaging once at the end: the resumed ranks start from rank 0's saved copy.
                        average_buffers(method, dist)
                        rng = _rng_entry(loader, device, dist)
                        if main:
                            save_checkpoint(
                                last_path,
                                state=vars(RunState(si, epoch, step + 1)),
                                method=method.state_dict(),
                                optimizer=opt.state_dict(),
                                ema=ema.state_dict() if ema is not None else None,
                                gen_state=gen.get_state(),
                                rng=rng,
                                best=best,
                                choices=choices,
                                config=to_dict(cfg),
                            )
                        barrier(dist)
                        bar.close()
                        raise Interrupted(
                            f"interrupted at stage '{st.name}' epoch {epoch + 1} step {step + 1}; "
                            f"continue with: longtail train --resume --out {run_dir}"
                        )
                    if save_now:
                        # The resume point SIGINT would save at this step (the epoch's last step is left to
                        # the epoch-end checkpoint). Under DDP the BN statistics are averaged on copies: the
                        # checkpoint holds the mean, while training goes on with each rank's own, as it would
                        # without this save.
                        saved = averaged_state_dict(method, dist)
                        rng = _rng_entry(loader, device, dist)
                        if main:
                            save_checkpoint(
                                last_path,
                                state=vars(RunState(si, epoch, step + 1)),
                                method=saved,
                                optimizer=opt.state_dict(),
                                ema=ema.state_dict() if ema is not None else None,
                                gen_state=gen.get_state(),
                                rng=rng,
                                best=best,
                                choices=choices,
                                config=to_dict(cfg),
                            )
                average_buffers(method, dist)
                loss_sum, seen = all_reduce_sum([loss_sum.item(), seen], dist, device)  # the epoch's check point
                if not math.isfinite(loss_sum):
                    bar.close()
                    raise _non_finite(st, epoch, checked + 1, steps, loss_sum, sync_every)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timing.append(
                    {
                        "stage": st.name,
                        "epoch": epoch + 1,
                        "seconds": round(time.time() - t_epoch, 4),
                        "images": int(seen),
                    }
                )
                ips = seen / max(time.time() - t_epoch, 1e-9)
                msg = (
                    f"stage {st.name} epoch {epoch + 1}/{st.epochs} loss {loss_sum / max(seen, 1):.4f} "
                    f"lr {lr:.5g} {ips:.0f} img/s"
                )
                bar.set_postfix_str(f"epoch {epoch + 1} loss {loss_sum / max(seen, 1):.3f} lr {lr:.3g}")
                log.info(msg)
                last_epoch = epoch + 1 == st.epochs
                val = None
                if st.eval_every and "val" in ds.splits and ((epoch + 1) % st.eval_every == 0 or last_epoch):
                    _choose_options(method, st, loader, cfg, channels_last, dist)  # OPTION=val: for these weights
                    val = evaluate_split(method, loader, "val", cfg.eval, cfg.amp, channels_last, dist)
                    log.info("stage %s epoch %d val top1 %.2f mean_class_acc %.2f", st.name, epoch + 1, val["top1"],
                             val["mean_class_acc"])
                    score = val.get(select_metric) if select_metric else None  # None: a group val has no class of
                    # best.pt of an older run holds top1 only: that was its score
                    if score is not None and si == len(cfg.stages) - 1 and score > best.get("score", best["top1"]):
                        best = {"top1": val["top1"], "metric": select_metric, "score": score, "epoch": epoch + 1,
                                "stage": st.name}
                        if main:
                            save_checkpoint(
                                ckpt_dir / "best.pt", method=method.state_dict(), best=best, config=to_dict(cfg)
                            )
                if run_log is not None:
                    run_log.epoch(si, epoch + 1, loss_sum / seen if seen else None, lr, ips, val,
                                  ds.train_counts().tolist())
                stop.stop = any_rank(stop.stop, dist, device)
                if (epoch + 1) % cfg.checkpoint_every == 0 or last_epoch or stop.stop:  # the same on every rank
                    rng = _rng_entry(loader, device, dist)
                if main and ((epoch + 1) % cfg.checkpoint_every == 0 or last_epoch or stop.stop):
                    save_checkpoint(
                        last_path,
                        state=vars(RunState(si, epoch + 1, 0)),
                        method=method.state_dict(),
                        optimizer=opt.state_dict(),
                        ema=ema.state_dict() if ema is not None else None,
                        rng=rng,
                        best=best,
                        choices=choices,
                        config=to_dict(cfg),
                    )
                if stop.stop:
                    barrier(dist)
                    bar.close()
                    raise Interrupted(
                        f"interrupted after stage '{st.name}' epoch {epoch + 1}; "
                        f"continue with: longtail train --resume --out {run_dir}"
                    )
            bar.close()
            method.on_stage_end(ctx)
            choices = [c for c in choices if c["stage"] != st.name]
            choices += _choose_options(method, st, loader, cfg, channels_last, dist)
            rng = _rng_entry(loader, device, dist)
            if main:
                save_checkpoint(ckpt_dir / f"stage_{st.name}.pt", method=method.state_dict(), config=to_dict(cfg))
                # The next stage starts at its epoch 0; record that so a resume lands there (with the model's
                # weights from `method`; the next stage builds its own method and optimiser).
                save_checkpoint(
                    last_path,
                    state=vars(RunState(si + 1, 0, 0)),
                    method=method.state_dict(),
                    optimizer=opt.state_dict() if opt is not None else {},
                    ema=ema.state_dict() if ema is not None else None,  # the last stage's: evaluated at the end
                    rng=rng,
                    best=best,
                    choices=choices,
                    config=to_dict(cfg),
                )
            barrier(dist)  # a later stage's init_from reads the file rank 0 just wrote

    loader.close()  # training is over: stop any persistent DataLoader workers
    if method is None:  # resumed a finished run: rebuild the last stage's method from its checkpoint
        method, _ = build_stage_method(cfg, len(cfg.stages) - 1, model, ds, loader, device, dist)
        stage_path = ckpt_dir / f"stage_{cfg.stages[-1].name}.pt"
        _load_method_state(method, load_checkpoint(stage_path)["method"], stage_path)
        if cfg.stages[-1].ema.decay > 0 and ckpt is not None and ckpt.get("ema") is not None:
            ema = WeightEMA(method, cfg.stages[-1].ema.decay)
            ema.load_state_dict(ckpt["ema"])
    selected = "last epoch"
    if cfg.eval.select == "best_val" and (ckpt_dir / "best.pt").exists():
        b = load_checkpoint(ckpt_dir / "best.pt")
        _load_method_state(method, b["method"], ckpt_dir / "best.pt")
        bb = b["best"]
        selected = (f"best val {bb.get('metric', 'top1')} {bb.get('score', bb['top1']):.2f} at stage {bb['stage']} "
                    f"epoch {bb['epoch']}")
        if method.options_to_choose():  # best.pt was saved before the stage end: choose for these weights
            last = cfg.stages[-1]
            choices = [c for c in choices if c["stage"] != last.name]
            choices += _choose_options(method, last, loader, cfg, channels_last, dist)
    metrics = evaluate_run(method, loader, cfg, channels_last, dist=dist)
    if ema is not None:  # the EMA weights at the end of training, scored as a variant of their own
        metrics["splits_ema"] = evaluate_run(ema.averaged(method), loader, cfg, channels_last, dist=dist)["splits"]
    checks = check_off_values(method, loader, cfg.eval, cfg.amp, channels_last, dist, choices)
    if main:
        # With what prediction needs besides the weights (class names, input size, normalisation, counts), so
        # load_model / predict / export never read the training data.
        save_checkpoint(ckpt_dir / "final.pt", method=method.state_dict(), config=to_dict(cfg), selected=selected,
                        inference=inference_record(ds), **({"ema": ema.state_dict()} if ema is not None else {}))
        metrics["selected"] = selected
        if select_metric:
            metrics["select_metric"] = select_metric
        if choices:
            metrics["chosen_on_val"] = choices
        if checks:
            metrics["off_value_check"] = checks
        for c in checks:
            if c.get("warning"):
                log.warning(c["warning"])
        if method.off_values and "val" not in ds.splits and not notes:
            notes.append(f"this run has no val split, so whether {', '.join(f'method.{o}' for o in method.off_values)} "
                         f"helps on this data is not checked (never on test); {val_split_hint(ds)}")
            log.info(notes[-1])
        if notes:
            metrics["notes"] = notes
        metrics["train_seconds"] = round(time.time() - t0, 1)
        metrics["epoch_timing"] = timing
        if dist.enabled:
            metrics["world_size"] = dist.world_size
        write_metrics(run_dir, metrics, cfg)
        if run_log is not None:
            run_log.close()
        log.info("finished in %.0f s; selected: %s", time.time() - t0, selected)
    barrier(dist)  # every rank returns once the run folder is complete
    return run_dir


def evaluate_run(
    method: Method,
    loader: Loader,
    cfg: RunConfig,
    channels_last: bool = False,
    splits: list[str] | None = None,
    dist: DistInfo | None = None,
) -> dict:
    """The metrics.json content for ``splits`` (default: val when present, then the dataset's eval splits),
    with the method's own ``report()`` as ``method_report`` when it has one."""
    ds = loader.ds
    if splits is None:
        splits = (["val"] if "val" in ds.splits else []) + ds.eval_splits
    results = {s: evaluate_split(method, loader, s, cfg.eval, cfg.amp, channels_last, dist) for s in splits}
    for protocol, split in ds.protocols.items():
        if split in results:
            results[split].setdefault("protocols", []).append(protocol)
    extra = {"method_report": rep} if (rep := method.report()) else {}
    if ds.class_groups is None:
        thresholds = thresholds_of(cfg.eval, ds.train_counts())
        if small := thresholds.small_groups(ds.train_counts()):
            # a "mean over the group" of one class (or none) reads like a group figure and is not one
            extra["small_shot_groups"] = small
            fix = ("too few classes for three groups" if cfg.eval.shots == "auto" else
                   "set eval.shots=auto (terciles of the class counts) or eval.many_above / eval.few_below")
            if dist is None or dist.rank == 0:
                log.warning(
                    "shot groups with fewer than two classes (%s) under %s: their many / medium / few figures "
                    "are single classes or none; %s", ", ".join(f"{k}: {v}" for k, v in small.items()),
                    thresholds.describe(), fix)
    return {
        "splits": results,
        "protocols": {p: s for p, s in ds.protocols.items() if s in results},
        "train_counts": ds.train_counts().tolist(),
        "class_names": ds.class_names,
        "attribute_names": ds.attribute_names,
        "stage": cfg.stages[-1].name,
        "epoch": cfg.stages[-1].epochs,
        "thresholds": (
            describe_class_groups(ds.class_groups)
            if ds.class_groups is not None
            else thresholds_of(cfg.eval, ds.train_counts()).describe()
        ),
        "finished": datetime.now().isoformat(timespec="seconds"),
        **extra,
    }


def write_metrics(run_dir: Path, metrics: dict, cfg: RunConfig) -> None:
    """metrics.json (atomic) and, when configured, the plots."""
    atomic_write_json(run_dir / "metrics.json", metrics)
    if cfg.eval.plots:
        from longtail.evaluation.plots import save_run_plots

        save_run_plots(run_dir, metrics)
