"""The one training loop: stages of (method, sampler, optimiser, schedule) over one model.

Every method enters through the Method hooks; this file never asks which method it runs.

``train`` resolves the config, claims and locks the run folder, starts the process group under torchrun, and
hands the run to a ``Trainer``, the loop in parts that keeps the run's state:

- ``Trainer.fit``: set-up (seed, dataset, loader, model, config.yaml; on resume last.pt read back as a
  ``ResumePoint`` and the model rebuilt as the earlier stages left it), every stage, then the final evaluation of
  the selected weights (last epoch or best val) and final.pt / metrics.json.
- ``Trainer.stage``: one stage: its method between ``on_stage_start`` and ``on_stage_end``, its optimiser, EMA,
  DDP wrapper and sampler, its epochs, stage_<name>.pt.
- ``Trainer.epoch``: one epoch: the batch stream of (seed, stage, epoch), its steps, the sync-free check points
  every ``sync_every`` steps (the only host reads of the loss), the epoch's log line, val evaluation (best.pt)
  and resume point.
- ``Trainer.step``: one optimisation step, which never waits for the device.

``Trainer._write_resume_point`` writes every checkpoints/last.pt (a stop, checkpoint_every_steps, epoch and stage
ends) and ``ResumePoint.read`` reads it back: one place for its keys, which old run folders resume by.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from longtail.config import (
    LOCATION_KEYS,
    ConfigError,
    RunConfig,
    StageConfig,
    absolute_paths,
    check_location_overrides,
    load_raw,
    save_yaml,
    to_dict,
)
from longtail.data import LTDataset, create_dataset
from longtail.data.loaders import Batch, Loader
from longtail.data.samplers import Sampler, create_sampler, shard
from longtail.dist import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    average_buffers,
    averaged_state_dict,
    barrier,
    broadcast_from_main,
    broadcast_object,
    gather_objects,
)
from longtail.engine.build import build_config, resolve
from longtail.engine.checkpoint import load_checkpoint, model_state, save_checkpoint
from longtail.engine.distributed import init_distributed, shutdown
from longtail.engine.ema import WeightEMA
from longtail.engine.evaluate import (
    autocast,
    check_off_values,
    choose_on_val,
    evaluate_split,
    select_metric_of,
    thresholds_of,
)
from longtail.engine.feature_stage import fit_on_features
from longtail.engine.record import inference_record
from longtail.engine.run_log import RunLog, check_log_extras
from longtail.engine.schedule import follows_schedule, lr_at, optimizer_groups
from longtail.engine.stopping import Interrupted, StopFlag
from longtail.errors import (
    WRITE_ERRNOS,
    CheckpointError,
    DataError,
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
    RUNS_ROOT,
    RunDir,
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
    run_dir = unique_run_dir(Path(RUNS_ROOT), f"{cfg.name}-{stamp}")
    point_latest(run_dir)
    return run_dir


def _setup_logging(run_dir: Path) -> logging.Handler:
    try:
        handler = logging.FileHandler(RunDir(run_dir).train_log)
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(RunDir(run_dir).train_log, e) from None
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
        final = RunDir(p).final
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


def _load_init(model: torch.nn.Module, st: StageConfig, run_dir: Path, earlier: list[str]) -> None:
    """The model's weights from ``init_from``: an earlier stage's stage_<name>.pt in this run, or another run's."""
    path = RunDir(run_dir).stage_checkpoint(st.init_from) if st.init_from in earlier else _init_checkpoint(st.init_from)
    weights = model_state(load_checkpoint(path)["method"])
    try:
        model.load_state_dict(weights)
    except RuntimeError:  # another run's backbone / head / class count: say which settings differ
        raise CheckpointError(
            f"stage '{st.name}': the weights in {path} do not fit this model (model.backbone, "
            f"model.head with its options and the class count must match the run they come from): "
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
    moved: list[str] | None = None,
) -> Path:
    """Train a recipe, evaluate it, and write a complete run folder. Returns the run folder.

    ``cfg`` is resolved first (``longtail.engine.build.resolve``: registered names checked, method options completed);
    the run works on that copy and leaves the caller's object as it is.

    With ``resume=True``, ``out`` names an existing run folder; training continues from its last
    checkpoint with its saved config and ends at the same weights as an uninterrupted run: the checkpoint holds
    every rank's global generators and DataLoader worker streams besides the batch generator (a checkpoint
    written before those were saved resumes with freshly seeded ones, exact only where nothing draws from them).
    ``moved`` (``key=value``, file locations only: ``longtail.config.LOCATION_KEYS``) resumes a run whose data sits
    elsewhere now, e.g. ``["data.root=/data/cifar10.zip"]`` on another machine; config.yaml is updated, and the run
    refuses data whose class counts differ from those it trained on.

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
    cfg, run_dir = _run_config(cfg, out, resume, overwrite, moved)
    plugin_notes = record_plugins(cfg)  # config.yaml names the plugins eval / predict / export must import
    dist, device = init_distributed(resolve_device(cfg.device))
    lock, handler = None, None
    try:
        notes: list[str] = list(plugin_notes)
        if dist.is_main:
            run_dir = new_run_dir(cfg, run_dir)
            # Lock first, then look: two runs started on one folder at once cannot both find it free.
            lock = RunLock(run_dir).acquire(command)
            notes += lock.notes + _check_run_folder(run_dir, resume, overwrite)
            if moved:
                notes += _save_moved_paths(run_dir, cfg)
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
                return Trainer(cfg, run_dir, resume, progress and dist.is_main, dist, device).fit()
        except Exception as e:
            if handler is not None:
                _log_failure(e)
            raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()
        shutdown(dist)


def _log_failure(e: Exception) -> None:
    """In an ``except`` clause: the run's own log says how it ended, beside the terminal (an interrupt has logged
    its checkpoint)."""
    if isinstance(e, Interrupted):
        return
    if isinstance(e, UserError):
        log.error("failed: %s", " ".join(str(e).split()))
    else:
        log.exception("failed with an unexpected error (a bug; please report it with this log)")


def _run_config(
    cfg: RunConfig | None, out: str | Path | None, resume: bool, overwrite: bool, moved: list[str] | None = None
) -> tuple[RunConfig, Path | None]:
    """The run's config and its folder (None: a new default one): a resumed run's saved config.yaml (with the file
    locations in ``moved``), or a resolved and checked copy of ``cfg`` (the caller's object is left as it is)."""
    moved = moved or []
    if moved and not resume:
        raise UsageError("moved file locations are for --resume; a new run takes them as overrides")
    if resume:
        if out is None:
            raise UsageError("--resume needs the run folder: longtail train --resume --out RUN_DIR")
        if overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite starts a new one there: pick one")
        run_dir = Path(out)
        check_resumable(run_dir)
        check_location_overrides(moved)
        saved = load_raw(RunDir(run_dir).config)
        saved.pop("meta", None)
        cfg = build_config(saved, moved)
        absolute_paths(cfg)  # a moved location is saved absolute too
        return cfg, run_dir
    cfg = resolve(cfg) if cfg is not None else build_config({})  # a copy: the caller's config is left as it is
    _check_stages_train(cfg)
    _resolve_init_paths(cfg)  # before anything trains: a wrong path fails now, not after stage 1
    absolute_paths(cfg)  # config.yaml names the same files from any working directory
    return cfg, (Path(out) if out is not None else None)


def _save_moved_paths(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Rank 0, with the folder locked: write a resumed run's moved file locations into its config.yaml (its meta
    kept), so that eval / predict find them too. Returns the notes for the log: each location, old -> new."""
    path = RunDir(run_dir).config
    saved = load_raw(path)
    new = to_dict(cfg)
    notes = []
    for key in LOCATION_KEYS:
        *parents, last = key.split(".")
        old_node, new_node = saved, new
        for part in parents:
            old_node, new_node = old_node.get(part) or {}, new_node.get(part) or {}
        if old_node.get(last) != new_node.get(last):
            notes.append(f"{key} moved: {old_node.get(last)} -> {new_node.get(last)}")
    save_yaml({**new, "meta": saved.get("meta", {})}, path)
    return notes


def _check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Rank 0, with the folder locked: refuse a new run in a folder that holds another (unless ``overwrite``), and
    remove temporary files of killed writes. Returns the notes for the log."""
    notes = [] if resume else check_new_run_folder(run_dir, overwrite)
    orphans = remove_orphans(run_dir)
    if orphans:
        notes.append(f"removed {len(orphans)} temporary file(s) of a write that was killed: {', '.join(orphans)}")
    return notes


def _check_global_batches(cfg: RunConfig, dist: DistInfo) -> None:
    for st in cfg.stages:
        if st.batch_size % dist.world_size:
            raise ConfigError(
                f"stage '{st.name}': batch_size {st.batch_size} is the global batch and must divide "
                f"evenly over {dist.world_size} processes"
            )


@dataclass
class ResumePoint:
    """``checkpoints/last.pt`` read back: where the run stopped and what it carried there (what
    ``Trainer._write_resume_point`` writes; a file written before ``gen_state``, ``rng``, ``best`` or ``choices``
    existed reads with their defaults)."""

    path: Path
    state: RunState
    method: dict  # the method's state dict (at a stage end: the finished stage's; only its model part is used)
    optimizer: dict
    ema: dict | None
    gen_state: torch.Tensor | None  # the epoch's batch generator, mid-epoch only
    rng: dict | None  # every rank's global generators and worker streams (see _rng_entry)
    best: dict
    choices: list[dict]

    @classmethod
    def read(cls, path: Path) -> ResumePoint | None:
        """The resume point in ``path``; None when there is none yet (a run stopped before its first save)."""
        if not path.exists():
            return None
        ckpt = load_checkpoint(path)
        return cls(
            path=path,
            state=RunState(**ckpt["state"]),
            method=ckpt["method"],
            optimizer=ckpt.get("optimizer"),
            ema=ckpt.get("ema"),
            gen_state=ckpt.get("gen_state"),
            rng=ckpt.get("rng"),
            best=ckpt.get("best", {"top1": -1.0}),
            choices=ckpt.get("choices", []),  # options chosen on val, per stage
        )

    @property
    def between_stages(self) -> bool:
        """Saved at a stage end (epoch 0, step 0 of the next stage): the next stage starts afresh from the model."""
        return self.state.epoch == 0 and self.state.step == 0


@dataclass
class _EpochRun:
    """One epoch's running state, from its first step (past the resume point's) to its end."""

    epoch: int  # 0-based, in the stage
    gen: torch.Generator  # the epoch's augmentation / batch stream, the same on every rank
    indices: torch.Tensor  # (n,) this rank's sample ids for the epoch, in order
    lr: float  # the learning rate of the last step (the epoch's own without a per-iteration schedule)
    loss_sum: torch.Tensor  # () on the device: sum over the steps so far of loss * batch size
    seen: int  # images of the steps so far, this rank's
    t0: float  # time.time() at the epoch's start
    checked: int  # steps of this epoch whose losses a check point found finite


class Trainer:
    """One run's fit loop, in parts: ``fit`` (set-up, every stage, the final evaluation), ``stage`` (one stage),
    ``epoch`` (one epoch) and ``step`` (one optimisation step).

    The run's state lives here: the dataset, loader and model, the best val score and the options chosen on val,
    the epochs' timing; the current stage's method, context, optimiser, EMA, wrapper, sampler and progress bar from
    ``stage`` on; an ``_EpochRun`` holds an epoch's running sums. Every random draw happens in the order of the loop
    this class replaced, so resumed runs and the numerics lock see the same numbers.
    """

    # The run's, from _set_up_run on.
    ds: LTDataset
    loader: Loader
    model: Classifier
    select_metric: str | None  # the val metric eval.select=best_val picks on
    t0: float  # time.time() at the set-up: train_seconds
    # The current stage's, from stage() on.
    si: int
    st: StageConfig
    ctx: MethodContext
    clip_params: list[torch.nn.Parameter] | None  # what optim.clip_grad_norm clips
    train_fn: torch.nn.Module  # what a step calls: the method, DDP-wrapped and / or compiled
    sampler: Sampler  # the method's own (Method.sampler) or the stage's configured one
    local_batch: int  # this rank's share of the global batch
    steps: int  # steps per epoch
    cut: int | None  # global samples per epoch with epoch_length=dataset
    bar: tqdm

    def __init__(
        self, cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, dist: DistInfo, device: torch.device
    ) -> None:
        self.cfg, self.run_dir, self.resume, self.progress = cfg, run_dir, resume, progress
        self.dist, self.device, self.main = dist, device, dist.is_main
        self.channels_last = cfg.model.channels_last
        self.stop = StopFlag()
        self.point: ResumePoint | None = None  # last.pt on resume, until the stage it resumes has taken it
        self.start = RunState()  # where the stages start (a resumed run: its last.pt's)
        self.notes: list[str] = []  # for the user at the end of `longtail train`: metrics.json "notes"
        self.best: dict = {"top1": -1.0}  # the best val epoch of the last stage (eval.select=best_val)
        self.choices: list[dict] = []  # options chosen on val, per stage
        self.timing: list[dict] = []  # the epochs this process trained: seconds and images (all ranks), for `bench`
        self.run_log: RunLog | None = None
        self.method: Method | None = None  # the current stage's (after the last stage: the evaluated one)
        self.ema: WeightEMA | None = None  # the current stage's (ema.decay > 0); the last stage's is scored too
        self.opt: torch.optim.Optimizer | None = None

    # ----------------------------------------------------------------------------------------- the run

    def fit(self) -> Path:
        """Set up the run (or read its resume point back), train every stage from there, evaluate the selected
        weights and write final.pt and metrics.json. Returns the run folder."""
        self._set_up_run()
        self._restore_run()
        with self.stop:
            for si in range(self.start.stage, len(self.cfg.stages)):
                self.stage(si)
        self.loader.close()  # training is over: stop any persistent DataLoader workers
        self._finish()
        barrier(self.dist)  # every rank returns once the run folder is complete
        return self.run_dir

    def _set_up_run(self) -> None:
        """Checks, seeding, last.pt read back on resume, the dataset, loader and model, and config.yaml."""
        cfg = self.cfg
        _check_global_batches(cfg, self.dist)
        check_log_extras(cfg)  # a missing tensorboard / wandb fails now, not after an epoch
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        RunDir(self.run_dir).checkpoints.mkdir(exist_ok=True)
        self.point = ResumePoint.read(RunDir(self.run_dir).last) if self.resume else None
        if self.resume:
            log.info("resuming %s from %s", self.run_dir,
                     "its last checkpoint" if self.point is not None else "the start (no checkpoint yet)")
        self.t0 = time.time()
        self.ds = ds = self._dataset()
        self.loader = Loader(ds, self.device, cfg.data.augment, cfg.data.num_workers, cfg.data.fast_path)
        self.select_metric = self._select_metric()
        if "val" not in ds.splits:  # before anything trains: an option chosen on val needs a val split
            self.notes += _options_without_val(cfg, ds)
        self.model = create_model(cfg.model, ds.num_classes).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.main and self.point is None:
            self._save_config()
        splits = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items() if k != "train")
        log.info("run %s: %s, %d classes, %d train images (%s), device %s", self.run_dir, ds.name, ds.num_classes,
                 len(ds.train), splits, self.device)

    def _dataset(self) -> LTDataset:
        """The run's dataset. A resumed run's must be the one it trained on: the same class counts as its
        config.yaml's meta recorded (a folder moved to another machine resumes with ``data.root=`` pointing there)."""
        if not self.resume:
            return create_dataset(self.cfg.data)
        how = (f"if the data moved, point the run at it: longtail train --resume --out {self.run_dir} "
               f"data.root=PATH")
        try:
            ds = create_dataset(self.cfg.data)
        except DataError as e:
            raise DataError(f"{e}; {how}") from None
        trained = (load_raw(RunDir(self.run_dir).config).get("meta") or {}).get("train_counts")
        now = ds.train_counts().tolist()
        if trained is not None and list(trained) != now:
            if len(trained) != len(now):
                differ = f"{len(trained)} classes then, {len(now)} now"
            else:
                c = next(i for i, (a, b) in enumerate(zip(trained, now, strict=True)) if a != b)
                differ = f"class {c} had {trained[c]} training images then, {now[c]} now"
            raise DataError(f"data.root={self.cfg.data.root} is not the data {self.run_dir} trained on ({differ}); "
                            f"{how}")
        return ds

    def _select_metric(self) -> str | None:
        """The val metric eval.select=best_val picks on (eval.select_metric, auto resolved on this val split)."""
        if self.cfg.eval.select != "best_val":
            return None
        if "val" not in self.ds.splits:
            raise ConfigError("eval.select=best_val needs a validation split: set data.val_fraction (never select on "
                              "test)")
        metric = select_metric_of(self.cfg.eval, self.ds.splits["val"].targets, self.ds.num_classes)
        log.info("eval.select=best_val: the epoch with the best val %s is reported", metric)
        return metric

    def _save_config(self) -> None:
        """config.yaml: the resolved config, with what the run ran on (versions, device, dataset) as ``meta``."""
        ds = self.ds
        meta = {
            **environment_info(self.device),
            "started": datetime.now().isoformat(timespec="seconds"),
            "dataset": {k: v for k, v in ds.info.items() if k != "counts"},
            "train_counts": ds.train_counts().tolist(),
        }
        save_yaml({**to_dict(self.cfg), "meta": meta}, RunDir(self.run_dir).config)

    def _restore_run(self) -> None:
        """A resumed run's model as the earlier stages left it, its best val and choices; and metrics.csv (a
        resumed run continues it from its last.pt's stage and epoch)."""
        point = self.point
        if point is not None:
            self.start = point.state
            self._rebuild_earlier_stages(point)
            self.best, self.choices = point.best, point.choices
        where = (self.start.stage, self.start.epoch) if point is not None else None
        self.run_log = RunLog(self.run_dir, self.cfg, where) if self.main else None

    def _rebuild_earlier_stages(self, point: ResumePoint) -> None:
        """What the earlier stages' methods made of the model (a new head, frozen parameters) before its state
        loads; their weights come from the checkpoint (between stages here, else with the stage's method)."""
        cfg = self.cfg
        for sj in range(min(point.state.stage, len(cfg.stages) - 1)):
            build_stage_method(cfg, sj, self.model, self.ds, self.loader, self.device, self.dist)
        if not (point.between_stages and point.state.stage < len(cfg.stages)):
            return
        weights = model_state(point.method)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError:
            raise CheckpointError(
                f"{point.path} does not fit the model its config.yaml builds "
                f"({state_mismatch(self.model.state_dict(), weights)}); was config.yaml edited? restore it, "
                f"or start the run again"
            ) from None

    def _write_resume_point(
        self, state: RunState, method_state: dict | None = None, gen: torch.Generator | None = None
    ) -> None:
        """checkpoints/last.pt, the run's one resume point: at a SIGINT / SIGTERM, every checkpoint_every_steps,
        at epoch ends (checkpoint_every) and at stage ends. ``state``: where the resumed run starts; ``method_state``
        (default: the method's own) and ``gen`` (the epoch's batch generator, mid-epoch only) as the caller has
        them. Called on every rank (the RNG entry gathers every rank's generators); rank 0 writes. Keep the keys:
        ``ResumePoint.read`` reads them, in files of older versions too."""
        rng = _rng_entry(self.loader, self.device, self.dist)
        if not self.main:
            return
        save_checkpoint(
            RunDir(self.run_dir).last,
            state=vars(state),
            method=method_state if method_state is not None else self.method.state_dict(),
            optimizer=self.opt.state_dict() if self.opt is not None else {},
            ema=self.ema.state_dict() if self.ema is not None else None,  # at the end: the last stage's, evaluated
            **({"gen_state": gen.get_state()} if gen is not None else {}),
            rng=rng,
            best=self.best,
            choices=self.choices,
            config=to_dict(self.cfg),
        )

    def _interrupted(self, where: str) -> Interrupted:
        """All ranks stop here (the resume point is saved); the error that says how to continue."""
        barrier(self.dist)
        self.bar.close()
        return Interrupted(f"interrupted {where}; continue with: longtail train --resume --out {self.run_dir}")

    # --------------------------------------------------------------------------------------- a stage

    def stage(self, si: int) -> None:
        """Stage ``si``: its method between its ``on_stage_start`` and ``on_stage_end`` hooks, the optimiser,
        sampler and progress bar, its epochs from the resume point on, then ``stage_<name>.pt`` and the next
        stage's resume point."""
        start_epoch, start_step, gen_state = self._start_stage(si)
        for epoch in range(start_epoch, self.st.epochs):
            self.epoch(epoch, start_step if epoch == start_epoch else 0, gen_state)
        self.bar.close()
        self.method.on_stage_end(self.ctx)
        self._end_stage()

    def _start_stage(self, si: int) -> tuple[int, int, torch.Tensor | None]:
        """Stage ``si`` up to its first epoch: its method (after ``on_stage_start`` and any fit on features), then
        ``_prepare_epochs``; returns where its epochs start. Also what ``engine.bench.StepRunner`` steps from."""
        st = self.st = self.cfg.stages[si]
        self.si = si
        resumed = self._take_resume_point(si)
        if resumed is not None and resumed.between_stages:  # the uninterrupted run drew from here: its set-up on
            _restore_rng(resumed.rng, self.loader, self.device, self.dist)
        if st.init_from is not None:
            _load_init(self.model, st, self.run_dir, [s.name for s in self.cfg.stages[:si]])
        self.method, self.ctx = build_stage_method(self.cfg, si, self.model, self.ds, self.loader, self.device,
                                                   self.dist)
        self.method.on_stage_start(self.ctx)
        # ncm, dlsa: fitted once, on extracted features
        fit_on_features(self.method, self.ctx, self.dist, self.stop, self.run_dir, self.progress)
        return self._prepare_epochs(resumed)  # what `resumed` held is in the method, optimiser and EMA then

    def _take_resume_point(self, si: int) -> ResumePoint | None:
        """last.pt when the run resumes in stage ``si`` (taken once: later stages start afresh)."""
        point = self.point
        if point is None or si != point.state.stage:
            return None
        self.point = None
        return point

    def _prepare_epochs(self, resumed: ResumePoint | None) -> tuple[int, int, torch.Tensor | None]:
        """The optimiser (none without epochs: tau_norm / ncm train nothing), the state of a resume point inside
        the stage, the EMA, the training wrapper, the sampler and the progress bar. Returns where the epochs
        start: (epoch, step, the batch generator's state)."""
        st = self.st
        self.opt = _make_optimizer(self.method, st) if st.epochs > 0 else None
        inside = resumed if resumed is not None and not resumed.between_stages else None
        start = (0, 0, None)
        if inside is not None:
            _load_method_state(self.method, inside.method, inside.path)
            if self.opt is not None:
                self.opt.load_state_dict(inside.optimizer)
            start = (inside.state.epoch, inside.state.step, inside.gen_state)
        self.ema = self._make_ema(inside)
        # what clip_grad_norm clips (None: no clipping, or no optimiser in a stage of epochs 0)
        clip = st.optim.clip_grad_norm and self.opt is not None
        self.clip_params = [p for g in self.opt.param_groups for p in g["params"]] if clip else None
        self.train_fn = self._wrap()
        self._build_sampler()
        self.bar = self._progress_bar(start[0] * self.steps + start[1])
        if inside is not None:  # mid-stage: the uninterrupted run drew from here on
            _restore_rng(inside.rng, self.loader, self.device, self.dist)
        return start

    def _make_ema(self, inside: ResumePoint | None) -> WeightEMA | None:
        """EMA of the weights (ema.decay): from the stage's starting weights, or the resume point's EMA."""
        decay = self.st.ema.decay
        ema = WeightEMA(self.method, decay) if decay > 0 and self.opt is not None else None
        if ema is not None and inside is not None and inside.ema is not None:
            ema.load_state_dict(inside.ema)
        return ema

    def _wrap(self) -> torch.nn.Module:
        """What a training step calls: the method, DDP-wrapped under torchrun, compiled with ``compile``."""
        train_fn = self.method
        if self.dist.enabled and self.opt is not None:
            # Wrapped per stage, after the method froze what it freezes (DDP registers only trainable
            # parameters at wrap time); the wrapper broadcasts rank 0's weights, then averages gradients.
            # Buffers are not broadcast each step: every rank's BN statistics follow its own batches (a
            # linear EMA) and average_buffers() takes their mean at each epoch end and before a mid-epoch save.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_fn = torch.nn.parallel.DistributedDataParallel(self.method, device_ids=device_ids,
                                                                 broadcast_buffers=False)
        if self.cfg.compile:
            train_fn = torch.compile(train_fn)
        return train_fn

    def _build_sampler(self) -> None:
        """The stage's sampler (the method's own, or the configured one) and the steps of an epoch of it."""
        st, world = self.st, self.ctx.world_size
        self.local_batch = st.batch_size // self.dist.world_size
        sampler = self.method.sampler(self.ds, self.ctx)  # e.g. IFL's two environments; None: the configured one
        if sampler is None:
            sampler = create_sampler(st.sampler, self.ds.train.targets, self.ds.num_classes,
                                     seed=self.ctx.sampler_seed, total_epochs=st.epochs)
        self.sampler = sampler
        # An epoch is the sampler's stream (n_max * C for class-aware sampling), this rank's share of it; with
        # epoch_length=dataset its first int(N / B) global batches (every rank the same number of steps).
        per_rank = -(-len(self.sampler) // world)
        sampler_steps = self.loader.steps_per_epoch(per_rank, self.local_batch, st.drop_last)
        self.steps = self.ctx.steps_per_epoch = _epoch_steps(st, sampler_steps, len(self.ds.train))
        self.cut = self.steps * st.batch_size if st.epoch_length == "dataset" else None  # global samples per epoch
        if self.opt is not None and self.steps == 0:  # before this stage trains anything: it would train nothing
            raise ConfigError(
                f"stage '{st.name}': an epoch of {len(self.sampler)} sampled images in batches of {st.batch_size} "
                f"(drop_last={str(st.drop_last).lower()}) has 0 training steps; set stages.{self.si}.batch_size "
                f"to at most {per_rank * self.dist.world_size}, or drop_last=false, or use more training images"
            )

    def _progress_bar(self, initial: int) -> tqdm:
        st = self.st
        return tqdm(
            total=st.epochs * self.steps,
            initial=initial,
            unit="step",
            desc=f"{st.name} ({st.method['name']})",
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            file=sys.stderr,
        )

    def _end_stage(self) -> None:
        """After ``on_stage_end``: the options chosen on val for the stage's final weights, stage_<name>.pt, and
        the resume point at the next stage's start."""
        st = self.st
        self.choices = [c for c in self.choices if c["stage"] != st.name]
        self.choices += _choose_options(self.method, st, self.loader, self.cfg, self.channels_last, self.dist)
        if self.main:
            save_checkpoint(RunDir(self.run_dir).stage_checkpoint(st.name), method=self.method.state_dict(),
                            config=to_dict(self.cfg))
        # The next stage starts at its epoch 0; record that so a resume lands there (with the model's weights
        # from `method`; the next stage builds its own method and optimiser).
        self._write_resume_point(RunState(self.si + 1, 0, 0))
        barrier(self.dist)  # a later stage's init_from reads the file rank 0 just wrote

    # -------------------------------------------------------------------------------------- an epoch

    def epoch(self, epoch: int, first_step: int, gen_state: torch.Tensor | None) -> None:
        """Epoch ``epoch`` of the stage from step ``first_step`` (a resume point's, else 0): its steps with their
        check points, then the epoch's loss (a host read), log line, val evaluation and resume point."""
        run = self._start_epoch(epoch, first_step, gen_state)
        for step, (x, y) in enumerate(self._epoch_batches(run, first_step), start=first_step):
            self.step(run, step, x, y)
            self._after_step(run, step)
        loss_sum, seen = self._epoch_loss(run)
        ips = self._log_epoch(run, loss_sum, seen)
        val = self._evaluate_epoch(epoch)
        if self.run_log is not None:
            self.run_log.epoch(self.si, epoch + 1, loss_sum / seen if seen else None, run.lr, ips, val,
                               self.ds.train_counts().tolist())
        self._end_epoch(epoch)

    def _epoch_batches(self, run: _EpochRun, first_step: int) -> Iterator[Batch]:
        """The epoch's batches from ``first_step`` on: (B, 3, H, W) uint8 images, (B,) targets."""
        # Every rank uses the same augmentation stream `gen`, so its state (saved by rank 0) resumes all.
        return self.loader.train_batches(run.indices, self.local_batch, self.st.drop_last, run.gen, first_step)

    def _start_epoch(self, epoch: int, first_step: int, gen_state: torch.Tensor | None) -> _EpochRun:
        gen = torch.Generator().manual_seed(_epoch_seed(self.cfg.seed, self.si, epoch) ^ 0x5EED)
        if first_step and gen_state is not None:
            gen.set_state(gen_state)
        lr = self.ctx.lr = _set_lr(self.opt, self.st, epoch)
        self.method.on_epoch_start(epoch, self.ctx)
        self.method.train()
        # Cut before sharding: the same (seed, epoch) stream, so a resumed epoch sees the same batches.
        indices = shard(self.sampler.indices(epoch)[: self.cut], self.ctx.rank, self.ctx.world_size)
        # The epoch's loss sum stays on the device: reading the loss every step would make the host wait for the
        # device every step. It is read at check points (every sync_every steps, before every save, at the epoch
        # end); a non-finite loss makes the sum non-finite for good, so a check point finds it.
        loss_sum = torch.zeros((), dtype=_loss_dtype(self.device), device=self.device)
        return _EpochRun(epoch, gen, indices, lr, loss_sum, seen=0, t0=time.time(), checked=first_step)

    def step(self, run: _EpochRun, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimisation step on the batch (x: (B, 3, H, W) uint8, y: (B,)); never reads the device."""
        st, opt = self.st, self.opt
        if st.schedule.per_iteration:
            run.lr = _set_lr(opt, st, run.epoch + step / self.steps)
        batch = BatchInfo(run.indices[step * self.local_batch : (step + 1) * self.local_batch], step)  # sample ids
        with autocast(self.device, self.cfg.amp):
            out = self.train_fn(self.loader.normalize(x, self.channels_last), y, batch=batch)
        loss = out["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_params is not None:
            torch.nn.utils.clip_grad_norm_(self.clip_params, st.optim.clip_grad_norm)
        opt.step()
        if self.ema is not None:
            self.ema.update()
        run.loss_sum += loss.detach().to(run.loss_sum.dtype) * len(y)  # as float(loss) * len(y) in float64
        run.seen += len(y)
        self.bar.update(1)

    def _after_step(self, run: _EpochRun, step: int) -> None:
        """The checks after ``step`` (0-based): a check point every sync_every steps and before a save (the loss
        read on the host, under DDP the ranks' stop flags agreed on); a stop there, or a periodic resume point
        every checkpoint_every_steps (the epoch's last step is left to the epoch-end one)."""
        done, every = step + 1, self.cfg.checkpoint_every_steps  # every 0: resume points at epoch ends only
        save_now = every and done % every == 0 and done < self.steps
        # Check points are the same steps on every rank. A single process reads its stop flag (a host bool, free)
        # every step; under DDP the ranks agree on it in the check point's all-reduce.
        stopping = False
        if done % self.cfg.sync_every == 0 or save_now or (self.stop.stop and not self.dist.enabled):
            stopping = self._check_point(run, step)
        if stopping:  # all ranks stop at the same step, after a check point found the loss finite
            self.stop.stop = True
            # BN running statistics are linear EMAs, so averaging them now and again at the epoch end equals
            # averaging once at the end: the resumed ranks start from rank 0's saved copy.
            average_buffers(self.method, self.dist)
            self._write_resume_point(RunState(self.si, run.epoch, done), gen=run.gen)
            raise self._interrupted(f"at stage '{self.st.name}' epoch {run.epoch + 1} step {done}")
        if save_now:
            # The resume point SIGINT would save at this step. Under DDP the BN statistics are averaged on copies:
            # the checkpoint holds the mean, while training goes on with each rank's own, as it would without
            # this save.
            saved = averaged_state_dict(self.method, self.dist)
            self._write_resume_point(RunState(self.si, run.epoch, done), method_state=saved, gen=run.gen)

    def _check_point(self, run: _EpochRun, step: int) -> bool:
        """Read the epoch's loss so far on the host (refuse a non-finite one); returns whether to stop."""
        total, total_seen, stopping = _read_check_point(run.loss_sum, run.seen, self.stop.stop, self.dist)
        if not math.isfinite(total):
            self.bar.close()
            raise _non_finite(self.st, run.epoch, run.checked + 1, step + 1, total, self.cfg.sync_every)
        run.checked = step + 1
        self.bar.set_postfix_str(f"epoch {run.epoch + 1} loss {total / max(total_seen, 1):.3f} lr {run.lr:.3g}",
                                 refresh=False)
        return stopping

    def _epoch_loss(self, run: _EpochRun) -> tuple[float, float]:
        """The epoch's check point: BN statistics averaged over the ranks, the loss sum and images of all ranks
        (a non-finite sum is refused)."""
        average_buffers(self.method, self.dist)
        loss_sum, seen = all_reduce_sum([run.loss_sum.item(), run.seen], self.dist, self.device)
        if not math.isfinite(loss_sum):
            self.bar.close()
            raise _non_finite(self.st, run.epoch, run.checked + 1, self.steps, loss_sum, self.cfg.sync_every)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss_sum, seen

    def _log_epoch(self, run: _EpochRun, loss_sum: float, seen: float) -> float:
        """The epoch's timing record and log line; returns its images per second."""
        st, epoch = self.st, run.epoch
        self.timing.append(
            {"stage": st.name, "epoch": epoch + 1, "seconds": round(time.time() - run.t0, 4), "images": int(seen)}
        )
        ips = seen / max(time.time() - run.t0, 1e-9)
        loss = loss_sum / max(seen, 1)
        self.bar.set_postfix_str(f"epoch {epoch + 1} loss {loss:.3f} lr {run.lr:.3g}")
        log.info(f"stage {st.name} epoch {epoch + 1}/{st.epochs} loss {loss:.4f} lr {run.lr:.5g} {ips:.0f} img/s")
        return ips

    def _evaluate_epoch(self, epoch: int) -> dict | None:
        """Val metrics every eval_every epochs and at the stage's last (None: not this epoch, or no val split),
        with the options chosen on val for these weights; keeps the best epoch."""
        st = self.st
        last_epoch = epoch + 1 == st.epochs
        if not (st.eval_every and "val" in self.ds.splits and ((epoch + 1) % st.eval_every == 0 or last_epoch)):
            return None
        _choose_options(self.method, st, self.loader, self.cfg, self.channels_last, self.dist)  # OPTION=val
        val = evaluate_split(self.method, self.loader, "val", self.cfg.eval, self.cfg.amp, self.channels_last,
                             self.dist)
        log.info("stage %s epoch %d val top1 %.2f mean_class_acc %.2f", st.name, epoch + 1, val["top1"],
                 val["mean_class_acc"])
        self._keep_if_best(val, epoch)
        return val

    def _keep_if_best(self, val: dict, epoch: int) -> None:
        """eval.select=best_val: the last stage's best val epoch so far becomes ``best`` and best.pt."""
        # None: no select metric, or one this val split has no class for (e.g. few)
        score = val.get(self.select_metric) if self.select_metric else None
        # best.pt of an older run holds top1 only: that was its score
        if score is not None and self.si == len(self.cfg.stages) - 1 and score > self.best.get("score",
                                                                                               self.best["top1"]):
            self.best = {"top1": val["top1"], "metric": self.select_metric, "score": score, "epoch": epoch + 1,
                         "stage": self.st.name}
            if self.main:
                save_checkpoint(RunDir(self.run_dir).best, method=self.method.state_dict(), best=self.best,
                                config=to_dict(self.cfg))

    def _end_epoch(self, epoch: int) -> None:
        """The ranks agree on a stop; the resume point every checkpoint_every epochs, at the stage's last epoch
        and at a stop (then the run stops)."""
        self.stop.stop = any_rank(self.stop.stop, self.dist, self.device)
        last_epoch = epoch + 1 == self.st.epochs
        if (epoch + 1) % self.cfg.checkpoint_every == 0 or last_epoch or self.stop.stop:  # the same on every rank
            self._write_resume_point(RunState(self.si, epoch + 1, 0))
        if self.stop.stop:
            raise self._interrupted(f"after stage '{self.st.name}' epoch {epoch + 1}")

    # ------------------------------------------------------------------------------------ the end

    def _finish(self) -> None:
        """The weights to report (the last epoch's, or best.pt's under best_val), their metrics (and the EMA's),
        the off-value check; rank 0 writes final.pt and metrics.json."""
        if self.method is None:  # resumed a finished run: rebuild the last stage's method from its checkpoint
            self._rebuild_last_method()
        selected = self._select_weights()
        metrics = evaluate_run(self.method, self.loader, self.cfg, self.channels_last, dist=self.dist)
        if self.ema is not None:  # the EMA weights at the end of training, scored as a variant of their own
            averaged = self.ema.averaged(self.method)
            metrics["splits_ema"] = evaluate_run(averaged, self.loader, self.cfg, self.channels_last,
                                                 dist=self.dist)["splits"]
        checks = check_off_values(self.method, self.loader, self.cfg.eval, self.cfg.amp, self.channels_last,
                                  self.dist, self.choices)
        if self.main:
            self._write_final(selected, metrics, checks)

    def _rebuild_last_method(self) -> None:
        cfg, last = self.cfg, self.cfg.stages[-1]
        self.method, _ = build_stage_method(cfg, len(cfg.stages) - 1, self.model, self.ds, self.loader, self.device,
                                            self.dist)
        stage_path = RunDir(self.run_dir).stage_checkpoint(last.name)
        _load_method_state(self.method, load_checkpoint(stage_path)["method"], stage_path)
        if last.ema.decay > 0 and self.point is not None and self.point.ema is not None:
            self.ema = WeightEMA(self.method, last.ema.decay)
            self.ema.load_state_dict(self.point.ema)

    def _select_weights(self) -> str:
        """Load best.pt's weights under eval.select=best_val (and choose the last stage's options for them);
        returns what was selected, in words."""
        best_path = RunDir(self.run_dir).best
        if self.cfg.eval.select != "best_val" or not best_path.exists():
            return "last epoch"
        b = load_checkpoint(best_path)
        _load_method_state(self.method, b["method"], best_path)
        bb = b["best"]
        selected = (f"best val {bb.get('metric', 'top1')} {bb.get('score', bb['top1']):.2f} at stage {bb['stage']} "
                    f"epoch {bb['epoch']}")
        if self.method.options_to_choose():  # best.pt was saved before the stage end: choose for these weights
            last = self.cfg.stages[-1]
            self.choices = [c for c in self.choices if c["stage"] != last.name]
            self.choices += _choose_options(self.method, last, self.loader, self.cfg, self.channels_last, self.dist)
        return selected

    def _write_final(self, selected: str, metrics: dict, checks: list[dict]) -> None:
        """Rank 0: final.pt and metrics.json (with the selection, the choices, checks, notes and timing)."""
        ema = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        # With what prediction needs besides the weights (class names, input size, normalisation, counts), so
        # load_model / predict / export never read the training data.
        save_checkpoint(RunDir(self.run_dir).final, method=self.method.state_dict(), config=to_dict(self.cfg),
                        selected=selected, inference=inference_record(self.ds), **ema)
        metrics["selected"] = selected
        if self.select_metric:
            metrics["select_metric"] = self.select_metric
        if self.choices:
            metrics["chosen_on_val"] = self.choices
        if checks:
            metrics["off_value_check"] = checks
        for c in checks:
            if c.get("warning"):
                log.warning(c["warning"])
        self._note_unchecked_off_values()
        if self.notes:
            metrics["notes"] = self.notes
        metrics["train_seconds"] = round(time.time() - self.t0, 1)
        metrics["epoch_timing"] = self.timing
        if self.dist.enabled:
            metrics["world_size"] = self.dist.world_size
        write_metrics(self.run_dir, metrics, self.cfg)
        if self.run_log is not None:
            self.run_log.close()
        log.info("finished in %.0f s; selected: %s", time.time() - self.t0, selected)

    def _note_unchecked_off_values(self) -> None:
        off = self.method.off_values
        if off and "val" not in self.ds.splits and not self.notes:
            self.notes.append(f"this run has no val split, so whether {', '.join(f'method.{o}' for o in off)} "
                              f"helps on this data is not checked (never on test); {val_split_hint(self.ds)}")
            log.info(self.notes[-1])


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
    atomic_write_json(RunDir(run_dir).metrics, metrics)
    if cfg.eval.plots:
        from longtail.evaluation.plots import save_run_plots

        save_run_plots(run_dir, metrics)
