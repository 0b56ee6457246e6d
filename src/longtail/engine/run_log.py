"""Per-epoch records of a run: ``metrics.csv`` always, TensorBoard and W&B when configured (``log.*``).

One row per trained epoch: stage, epoch, loss, lr, images/s, and every scalar val metric (``val_top1``,
``val_mean_class_acc``, ``val_many``...) when that epoch was evaluated, empty cells otherwise. The file is
rewritten atomically at each epoch end (a few hundred rows at most), so a kill never leaves half a row, and a
resumed run first drops the rows at or after its resume point (an epoch trained again after the kill), so the
file never holds one epoch twice. The loss and images/s of an epoch a resumed run continued mid-way cover its
steps since the resume (empty when none were left). Written by rank 0 only; it touches no training tensor.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from longtail.config import RunConfig, to_dict
from longtail.errors import ConfigError
from longtail.run_folder import RunDir
from longtail.utils import atomic_write_text

log = logging.getLogger("longtail")

BASE_COLUMNS = ["stage", "epoch", "loss", "lr", "images_per_s"]


def val_scalars(val: dict) -> dict[str, float | None]:
    """The scalar metrics of an ``evaluate_split`` dict (top1, mean_class_acc, many / medium / few, precision...):
    floats, or None for a group the split has no class of; counts and lists are left out."""
    return {
        k: (float(v) if v is not None else None)
        for k, v in val.items()
        if k != "num_samples" and (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))
    }


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLog:
    """``metrics.csv`` (+ TensorBoard, + W&B) of one run folder. ``resume_at = (stage index, completed epochs)`` of
    the checkpoint a resumed run starts from: rows from there on are dropped (they are trained again)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_at: tuple[int, int] | None = None) -> None:
        self.path = RunDir(run_dir).metrics_csv
        self.cfg = cfg
        self._stage_index = {st.name: i for i, st in enumerate(cfg.stages)}
        self._offsets = [sum(st.epochs for st in cfg.stages[:i]) for i in range(len(cfg.stages))]
        rows = _read_rows(self.path) if resume_at is not None else []
        if resume_at is not None:
            rows = [r for r in rows if self._key(r) <= resume_at]
        self.rows: list[dict] = rows
        self.columns: list[str] = list(BASE_COLUMNS)
        for r in rows:
            self._add_columns(r)
        self.tb = None
        self.wandb = None
        if cfg.log.tensorboard:
            self.tb = _tensorboard_writer(RunDir(run_dir).tensorboard, self._global_step(*resume_at) + 1
                                          if resume_at is not None else None)
        if cfg.log.wandb:
            self.wandb = _wandb_run(cfg, run_dir, resume_at is not None)

    def _key(self, row: dict) -> tuple[int, int]:
        return self._stage_index.get(row["stage"], len(self._offsets)), int(row["epoch"])

    def _global_step(self, stage: int, epoch: int) -> int:
        """Epochs trained since the run's start: the x axis of TensorBoard / W&B across stages."""
        return (self._offsets[stage] if stage < len(self._offsets) else sum(s.epochs for s in self.cfg.stages)) + epoch

    def _add_columns(self, row: dict) -> None:
        self.columns += [k for k in row if k not in self.columns]

    def epoch(
        self,
        stage: int,
        epoch: int,
        loss: float | None,
        lr: float,
        images_per_s: float,
        val: dict | None = None,
        train_counts: list[int] | None = None,
    ) -> None:
        """Record completed epoch ``epoch`` (1-based) of stage index ``stage``; ``val`` its val metrics, if any."""
        scalars = val_scalars(val) if val is not None else {}
        row = {
            "stage": self.cfg.stages[stage].name,
            "epoch": epoch,
            "loss": round(loss, 6) if loss is not None else None,
            "lr": lr,
            "images_per_s": round(images_per_s, 1),
            **{f"val_{k}": v for k, v in scalars.items()},
        }
        self.rows.append(row)
        self._add_columns(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        atomic_write_text(self.path, buf.getvalue())
        step = self._global_step(stage, epoch)
        train = {"train/loss": loss, "train/lr": lr, "train/images_per_s": images_per_s}
        train = {k: v for k, v in train.items() if v is not None}
        vals = {f"val/{k}": v for k, v in scalars.items() if v is not None}
        if self.tb is not None:
            for k, v in {**train, **vals}.items():
                self.tb.add_scalar(k, v, step)
            if val is not None and val.get("per_class") is not None:
                self.tb.add_figure("val/per_class_accuracy", per_class_figure(val["per_class"], train_counts), step)
            self.tb.flush()
        if self.wandb is not None:
            payload = {**train, **vals, "epoch": step}
            if val is not None and val.get("per_class") is not None:
                import wandb

                payload["val/per_class_accuracy"] = wandb.Image(per_class_figure(val["per_class"], train_counts))
            self.wandb.log(payload, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def per_class_figure(per_class: list[float | None], train_counts: list[int] | None = None):
    """Bars of per-class accuracy, classes ordered head -> tail by training count (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(range(len(per_class)))
    if train_counts is not None:
        order.sort(key=lambda c: -train_counts[c])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * len(order)), 3.0))
    ax.bar(range(len(order)), [per_class[c] if per_class[c] is not None else 0.0 for c in order], width=1.0)
    ax.set_xlabel("class (head -> tail)" if train_counts is not None else "class")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


def _tensorboard_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install 'longtail[log]' "
                         "(or pip install tensorboard)") from None
    # purge_step: a resumed run drops the events it writes again (epochs after its checkpoint)
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _wandb_run(cfg: RunConfig, run_dir: Path, resume: bool):
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package: pip install 'longtail[wandb]' "
                         f"(or pip install wandb)") from None
    return wandb.init(project=cfg.log.wandb, name=run_dir.name, dir=str(run_dir), config=to_dict(cfg),
                      resume="allow" if resume else None, id=None)


def check_log_extras(cfg: RunConfig) -> None:
    """Fail before training (one line) when a configured logger's package is missing."""
    import importlib.util

    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install 'longtail[log]' "
                         "(or pip install tensorboard)")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package: pip install 'longtail[wandb]' "
                         f"(or pip install wandb)")
