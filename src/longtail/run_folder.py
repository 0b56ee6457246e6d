"""Run folders: which folder a run may write, the lock of the process training in one, clean-up after a kill.

What ``train`` accepts as its folder (``folder_state`` tells which kind a folder is):
  new or empty            a fresh run starts there
  start-up leftovers      a run stopped before it saved anything (train.log, an empty checkpoints/): same
  unsaved run             config.yaml written by longtail, but no checkpoint yet: started again, as before
  unfinished run          refused: continue it with --resume (or --overwrite to start again)
  finished run            refused: pick another --out (or --overwrite to replace it)
  anything else           refused: it holds files longtail did not write (or --overwrite to write into it)
Nothing a user put in a folder is overwritten without ``--overwrite``; even then only the files a run writes
(RUN_FILES, RUN_DIRS) are removed, the others are left alone.

The lock (``.lock`` in the run folder) is an exclusive ``flock`` held for as long as a process trains there;
the file names the holder (pid, host, start time, command) for the error of a second process. The kernel
drops the lock when its process dies however it dies, so a lock file that nobody holds is stale (its process
was killed) and is taken over with a log line.

This module is the one place that spells the layout of a run folder (``RunDir``: every file and sub-folder a run
writes, by name); the rest of the package asks a ``RunDir`` for its paths (tests/test_run_dir.py checks that no
other module spells them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from longtail.errors import WRITE_ERRNOS, MissingFileError, RunFolderError, write_error

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock falls back to an O_EXCL file and the holder's pid
    fcntl = None

# The layout of a run folder: every name a run writes there (RunDir gives their paths).
RUNS_ROOT = "runs"  # where a run without --out gets its folder (runs/<name>-<time>, and runs/latest)
LOCK_NAME = ".lock"
CONFIG = "config.yaml"  # the resolved config (with ``meta``: versions, seed, command), written first
METRICS = "metrics.json"  # the evaluation: per split, per class; written last, so it marks a finished run
METRICS_CSV = "metrics.csv"  # one row per epoch (engine/run_log.py)
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"  # last.pt, best.pt, stage_<name>.pt, final.pt (engine/checkpoint.py says what each holds)
LAST, BEST, FINAL = "last.pt", "best.pt", "final.pt"
PLOTS, SWEEPS, FEATURES, EXPORT, TENSORBOARD = "plots", "sweeps", "features", "export", "tensorboard"
RUN_FILES = (CONFIG, METRICS, METRICS_CSV, TRAIN_LOG)  # what a run writes at the top of its folder
RUN_DIRS = (CHECKPOINTS, PLOTS, SWEEPS, FEATURES, EXPORT, TENSORBOARD)  # and its sub-folders
# The temporary files of atomic writes (utils._atomic: .NAME.XXXX.tmp, plots: .NAME.XXXX.tmp.png, features:
# .NAME.PID.tmp). A process killed mid-write leaves one; nothing ever reads them.
_TMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")
_COMMAND_LINE = re.compile(r"^\S+ \S+ INFO command: (.*)$", re.M)  # logged by train() as a run starts


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder: ``RunDir(path).metrics`` is its metrics.json, ``.final`` its
    checkpoints/final.pt, and so on. Only names: nothing is read, created or checked here."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is accepted

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        """The rolling resume point."""
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        """The best weights on val (``eval.select: best_val``)."""
        return self.checkpoints / BEST

    @property
    def final(self) -> Path:
        """The weights that were evaluated: what eval / predict / export / features load."""
        return self.checkpoints / FINAL

    @property
    def final_name(self) -> str:
        """``final`` relative to the run folder, as a stable string (``checkpoints/final.pt``) for records."""
        return f"{CHECKPOINTS}/{FINAL}"

    def stage_checkpoint(self, stage: str) -> Path:
        """The method state at the end of stage ``stage`` (a stage's ``init_from`` loads its model part)."""
        return self.checkpoints / f"stage_{stage}.pt"

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def sweeps(self) -> Path:
        return self.path / SWEEPS

    def sweep(self, option: str, split: str) -> Path:
        """The stem of one sweep's files (``.json``, ``.md``, ``.png`` are added to it)."""
        return self.sweeps / f"{option}_{split}"

    @property
    def features_dir(self) -> Path:
        return self.path / FEATURES

    def features(self, split: str) -> tuple[Path, Path, Path]:
        """(features .npy, labels .npy, stamp .json) of a split (engine/features.py)."""
        d = self.features_dir
        return d / f"{split}.npy", d / f"{split}_labels.npy", d / f"{split}.json"

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    def export(self, suffix: str) -> Path:
        """The default file ``longtail export`` writes, ``suffix`` its format's (``.pt``, ``.onnx``)."""
        return self.export_dir / f"model{suffix}"

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @staticmethod
    def of_checkpoint(path: str | Path) -> RunDir | None:
        """The run folder a checkpoint file lies in (``RUN/checkpoints/X.pt``), or None for a file elsewhere."""
        path = Path(path)
        return RunDir(path.parent.parent) if path.name.endswith(".pt") and path.parent.name == CHECKPOINTS else None


@dataclass
class FolderState:
    """What a folder holds, as far as a run is concerned."""

    kind: str  # missing | file | empty | leftovers | unsaved | unfinished | finished | foreign
    entries: list[str] = field(default_factory=list)  # what it holds (names; sub-folders end with /)


def _is_tmp(name: str) -> bool:
    return bool(_TMP.match(name))


def _longtail_config(path: Path) -> bool:
    """config.yaml written by a run (it carries ``meta.longtail``), not a recipe or somebody else's file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("meta"), dict) and "longtail" in raw["meta"]


def folder_state(run_dir: str | Path) -> FolderState:
    """Which kind of folder ``run_dir`` is (see the module docstring); the lock and temporary files do not count."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return FolderState("missing")
    if not run_dir.is_dir():
        return FolderState("file")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()
                   if p.name != LOCK_NAME and not _is_tmp(p.name))
    if not names:
        return FolderState("empty")
    rd = RunDir(run_dir)
    ckpt = rd.checkpoints
    ckpts = sorted(p.name for p in ckpt.iterdir() if not _is_tmp(p.name)) if ckpt.is_dir() else []
    ours = rd.config.is_file() and _longtail_config(rd.config)
    if ours and (rd.metrics.is_file() or FINAL in ckpts):
        return FolderState("finished", names)
    if ours and any(n.endswith(".pt") for n in ckpts):
        return FolderState("unfinished", names)
    started = {TRAIN_LOG, f"{CHECKPOINTS}/"} | ({CONFIG} if ours else set())
    if set(names) <= started and not ckpts:
        return FolderState("unsaved" if ours else "leftovers", names)
    return FolderState("foreign", names)


def _listing(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_new_run_folder(run_dir: Path, overwrite: bool) -> list[str]:
    """Refuse a folder a new run must not write (RunFolderError), or with ``overwrite`` clear the previous
    run's files from it. Returns lines for the run's log. Called with the folder's lock held."""
    state = folder_state(run_dir)
    notes: list[str] = []
    if state.kind == "file":
        raise RunFolderError(f"--out {run_dir} is a file, not a folder; pick a folder for the run")
    if state.kind == "unsaved":
        notes.append(f"{run_dir} held a run that stopped before its first checkpoint; starting it again")
    if state.kind in ("missing", "empty", "leftovers", "unsaved"):
        return notes
    if not overwrite:
        if state.kind == "finished":
            raise RunFolderError(f"{run_dir} holds a finished run (metrics.json, checkpoints/final.pt); pick another "
                                 f"--out, or pass --overwrite to replace it")
        if state.kind == "unfinished":
            raise RunFolderError(f"{run_dir} holds an unfinished run; continue it with: longtail train --resume "
                                 f"--out {run_dir} (or pass --overwrite to start it again)")
        raise RunFolderError(f"{run_dir} is not empty and is not a longtail run (it holds {_listing(state.entries)});"
                             f" pick a new or empty folder for --out, or pass --overwrite to write the run into it "
                             f"(its {', '.join(RUN_FILES)} and {'/, '.join(RUN_DIRS)}/ are replaced)")
    removed = []
    for name in (*RUN_FILES, *RUN_DIRS):
        p = run_dir / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            else:
                continue
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_error(p, e) from None
            raise
        removed.append(name + ("/" if name in RUN_DIRS else ""))
    notes.append(f"--overwrite: removed the previous run's {', '.join(removed) or 'nothing'} from {run_dir}")
    return notes


def check_resumable(run_dir: Path) -> None:
    """Raise a one-line error when ``run_dir`` has no run to resume, saying what to run instead."""
    if not run_dir.is_dir():
        raise MissingFileError(f"--resume: no run folder {run_dir}; start the run with longtail train CONFIG "
                               f"--out {run_dir}")
    if RunDir(run_dir).config.is_file():
        return
    command = startup_command(run_dir)
    if command is not None:
        raise MissingFileError(f"{run_dir} stopped during start-up, before it saved config.yaml, so there is "
                               f"nothing to resume; start it again with: {command}")
    raise MissingFileError(f"{run_dir} has no config.yaml: not a longtail run folder (nothing to resume)")


def startup_command(run_dir: Path) -> str | None:
    """The command that last started a run in ``run_dir``, from its train.log."""
    try:
        found = _COMMAND_LINE.findall(RunDir(run_dir).train_log.read_text(errors="replace"))
    except OSError:
        return None
    return found[-1].strip() if found else None


def remove_orphans(run_dir: Path) -> list[str]:
    """Delete the temporary files that writes killed half-way left in the run folder and its sub-folders
    (SIGKILL during an atomic write). Safe only with the folder's lock held. Returns their names."""
    removed = []
    for d in (run_dir, *(run_dir / n for n in RUN_DIRS)):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if _is_tmp(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(run_dir)))
    return removed


def unique_run_dir(parent: Path, stem: str) -> Path:
    """Create and return a new folder ``parent/stem``, or ``stem-2``, ``stem-3``... when that exists: mkdir is
    atomic, so two runs started in the same second get different folders."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            d = parent / (stem if i == 1 else f"{stem}-{i}")
            try:
                d.mkdir()
                return d
            except FileExistsError:
                continue
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(parent, e) from None
        raise
    raise RunFolderError(f"{parent}: no free run folder name for {stem}; pass --out")


LATEST = "latest"  # runs/latest: a link to the newest run started in the default folder runs/


def point_latest(run_dir: Path) -> Path | None:
    """Make ``<parent>/latest`` a relative symbolic link to ``run_dir`` (replacing an older link atomically), so
    ``longtail eval runs/latest`` names the newest run. Returns the link, or None where it cannot be made (no
    symlinks on this file system, or a real ``latest`` file or folder that is not ours to replace)."""
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        return None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except (OSError, NotImplementedError):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return None
    return link


def drop_latest_duplicates(names: list[str]) -> list[str]:
    """The run folders ``names``, less a ``latest`` link whose run is named too (``runs/*/`` matches both)."""

    def is_latest(n: str) -> bool:
        return Path(n).is_symlink() and Path(n).name == LATEST

    targets = {Path(n).resolve() for n in names if not is_latest(n)}
    return [n for n in names if not (is_latest(n) and Path(n).resolve() in targets)]


def unfinished_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` has no results yet (for ``longtail report``), or None when it is not a run that stopped."""
    state = folder_state(run_dir)
    if state.kind == "unfinished":
        return (f"{run_dir} is an unfinished run (no metrics.json); continue it with: longtail train --resume "
                f"--out {run_dir}")
    if state.kind in ("leftovers", "unsaved"):
        return f"{run_dir} stopped before its first checkpoint (no metrics.json); its train.log says why"
    return None


# ----------------------------------------------------------------------------------------------- the lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def read_lock(run_dir: str | Path) -> dict | None:
    """The holder a run folder's lock file names (pid, host, started, command), or None without one."""
    try:
        info = json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_holder(run_dir: str | Path) -> dict | None:
    """The lock's holder when, as far as this machine can tell, a process trains in ``run_dir`` now: a lock file
    naming a live process of this host, or another host's (which cannot be checked from here). For messages
    only: it does not touch the lock itself, so it never gets in the way of a run starting."""
    info = read_lock(run_dir)
    if info is None:
        return None
    if info.get("host") != socket.gethostname():
        return info
    pid = info.get("pid")
    return info if isinstance(pid, int) and pid != os.getpid() and _process_alive(pid) else None


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
            + (f", since {info['started']}" if info.get("started") else ""))


class RunLock:
    """The exclusive lock of the process training in ``run_dir`` (rank 0 only under DDP)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.notes: list[str] = []  # for the run's log, once it is open

    def acquire(self, command: str) -> RunLock:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().isoformat(timespec="seconds"), "command": command}
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunFolderError(f"--out {self.path.parent} is a file, not a folder; pick a folder for the run")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fcntl is None:
                self._acquire_exclusive_file(info)
            else:
                self._acquire_flock(info)
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_error(self.path, e) from None
            raise
        return self

    def _busy(self, holder: dict | None) -> RunFolderError:
        run_dir = self.path.parent
        who = _describe(holder) if holder else "another process"
        return RunFolderError(f"{run_dir} is in use: {who} trains there (lock {self.path}); wait for it to "
                              f"finish or stop it, or pick another --out")

    def _acquire_flock(self, info: dict) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy(read_lock(self.path.parent)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and flock: lock the new one
                os.close(fd)
                continue
            old = os.read(fd, 65536)
            if old.strip():
                try:
                    prev = json.loads(old)
                except ValueError:
                    prev = {}
                self.notes.append(f"took over the stale lock {self.path} of {_describe(prev)}: that process "
                                  f"is gone (killed?)")
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise self._busy(read_lock(self.path.parent))

    def _acquire_exclusive_file(self, info: dict) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock(self.path.parent) or {}
                pid = holder.get("pid")
                if holder.get("host") == socket.gethostname() and isinstance(pid, int) and (
                        pid == os.getpid() or not _process_alive(pid)):
                    self.notes.append(f"took over the stale lock {self.path} of {_describe(holder)}: that process "
                                      f"is gone (killed?)")
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(holder) from None
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.close(fd)
            self._fd = -1
            return
        raise self._busy(read_lock(self.path.parent))

    def release(self) -> None:
        """Remove the lock file and drop the lock (on every exit: success, error, interrupt)."""
        if self._fd is None:
            return
        try:
            if self._fd >= 0:
                same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
            else:
                same = (read_lock(self.path.parent) or {}).get("pid") == os.getpid()
            if same:
                self.path.unlink()
        except OSError:
            pass  # already gone, or a read-only folder: the kernel still drops the flock below
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = None


def default_command() -> str:
    """This process's command line, as recorded in a run's log and lock."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
