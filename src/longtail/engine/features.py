"""A finished run's backbone features on disk: ``RUN/features/<split>.npy`` (float32 (N, D), memory-mapped),
``<split>_labels.npy`` ((N,) int64) and ``<split>.json``, a stamp of the weights and config they came from.

Files are written to temporary names and renamed, the stamp last, so a present and matching stamp means
complete, up-to-date files; they are re-used until the run's final.pt or config.yaml changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from longtail.errors import WRITE_ERRNOS, MissingFileError, UsageError, write_error
from longtail.run_folder import RunDir
from longtail.utils import atomic_write_json


def _stamp(run_dir: Path, split: str) -> dict:
    rd = RunDir(run_dir)
    st = rd.final.stat()
    return {"split": split, "checkpoint": {"path": rd.final_name, "mtime_ns": st.st_mtime_ns, "size": st.st_size},
            "config_sha256": hashlib.sha256(rd.config.read_bytes()).hexdigest()}


def feature_paths(run_dir: str | Path, split: str) -> tuple[Path, Path, Path]:
    """(features .npy, labels .npy, stamp .json) of a split."""
    return RunDir(run_dir).features(split)


def is_current(run_dir: str | Path, split: str) -> bool:
    """True when the split's feature files exist and were made from the run's current weights and config."""
    feats, labels, stamp = feature_paths(run_dir, split)
    if not (feats.is_file() and labels.is_file() and stamp.is_file()):
        return False
    try:
        saved = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    return {k: saved.get(k) for k in ("split", "checkpoint", "config_sha256")} == _stamp(Path(run_dir), split)


def load_features(run_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) memory-mapped float32 features and (N,) labels of a split written by ``export_features``."""
    feats, labels, _ = feature_paths(run_dir, split)
    if not feats.is_file():
        raise MissingFileError(f"no features for split {split!r} in {RunDir(run_dir).features_dir}: "
                                f"run longtail features {run_dir} --split {split}")
    return np.load(feats, mmap_mode="r"), np.load(labels)


def export_features(run_dir: str | Path, splits: list[str] | None = None, batch_size: int = 512,
                    device: str | None = None, progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Extract the run's final-weights backbone features of ``splits`` (default: every split) to disk.

    Eval mode, no augmentation (the test-time preprocessing). A split whose files are current is re-used
    unless ``force``. Returns split -> features path.
    """
    from longtail.engine.inference import load_trained

    run_dir = Path(run_dir)
    run = None
    if splits is None:
        run = load_trained(run_dir, device=device)
        splits = list(run.dataset.splits)
    out: dict[str, Path] = {}
    for split in splits:
        if not force and is_current(run_dir, split):
            out[split] = feature_paths(run_dir, split)[0]
            continue
        if run is None:
            run = load_trained(run_dir, device=device)
        try:
            out[split] = _write_split(run, run_dir, split, batch_size, progress)
        except OSError as e:
            if e.errno in WRITE_ERRNOS:  # a full or read-only disk: one line, naming the folder
                raise write_error(RunDir(run_dir).features_dir, e) from None
            raise
    return out


@torch.no_grad()
def _write_split(run, run_dir: Path, split: str, batch_size: int, progress: bool) -> Path:
    if split not in run.dataset.splits:
        raise UsageError(f"no split {split!r}; this run has {', '.join(run.dataset.splits)}")
    feats_path, labels_path, stamp_path = feature_paths(run_dir, split)
    feats_path.parent.mkdir(parents=True, exist_ok=True)
    n, dim = len(run.dataset.splits[split]), run.method.model.feature_dim
    tmp_f = feats_path.with_name(f".{feats_path.name}.{os.getpid()}.tmp")
    tmp_l = labels_path.with_name(f".{labels_path.name}.{os.getpid()}.tmp")
    stamp_path.unlink(missing_ok=True)  # stale from now on, until the new stamp is written
    method = run.method.eval()
    arr = np.lib.format.open_memmap(tmp_f, mode="w+", dtype=np.float32, shape=(n, dim))
    labels = np.empty(n, dtype=np.int64)
    i = 0
    try:
        with tqdm(total=n, unit="img", desc=f"features {split}", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
            for x, y in run.loader.eval_batches(split, batch_size):
                f = method.model.forward_features(run.loader.normalize(x)).float().cpu().numpy()
                arr[i:i + len(f)] = f
                labels[i:i + len(f)] = y.cpu().numpy()
                i += len(f)
                bar.update(len(f))
        arr.flush()
        del arr
        with open(tmp_l, "wb") as fh:
            np.save(fh, labels)
        os.replace(tmp_f, feats_path)
        os.replace(tmp_l, labels_path)
    finally:
        for t in (tmp_f, tmp_l):
            t.unlink(missing_ok=True)
    atomic_write_json(stamp_path, {**_stamp(run_dir, split), "num_samples": n, "dim": dim})
    return feats_path
