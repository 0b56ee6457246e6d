"""Small shared helpers: atomic writes, seeding, provenance."""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtail.errors import WRITE_ERRNOS, ConfigError, write_error


def _atomic(path: str | Path, write) -> None:
    # Write next to the target, then rename: a reader never sees a half-written file, and an
    # interrupted write leaves the previous version intact. A process killed in between (SIGKILL) leaves
    # `.NAME.XXXX.tmp`, which a run removes when it starts or resumes (run_folder.remove_orphans).
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in WRITE_ERRNOS:  # read-only disk, no permission, a file where a folder should be
            raise write_error(path, e) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:  # e.g. the disk filled up during the write
            raise write_error(path, e) from None
        if isinstance(e, RuntimeError) and "write" in str(e).lower() and _disk_nearly_full(path.parent):
            # torch's zip writer reports a full disk as its own RuntimeError ("... file write failed")
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's global random generators: torch's CPU one (and ``device``'s, when it is a GPU), numpy's
    and python's ``random``, as tensors and numbers only (a ``weights_only`` checkpoint holds them, and a
    DataLoader worker can send them through its queue). ``set_rng_state`` puts them back."""
    version, mt, gauss = random.getstate()  # (3, 625 ints: the MT state and its position, None or float)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),  # (5056,) uint8
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` returned: every later draw of this process is the one it would have made."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LONGTAIL_CACHE", Path.home() / ".cache" / "longtail"))


def parse_device(name: str) -> torch.device:
    """The device a ``device`` setting names (not ``auto``), without checking it is present; ConfigError when
    the text names no device."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{name}' is not a device: use auto, cpu, cuda or cuda:N (mps on a Mac)")
    return dev


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names (auto: CUDA when present, else CPU); ConfigError when it is not
    one, or not present on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' asked for, but no CUDA GPU is available; use device=cpu "
                              f"(--device cpu for eval / predict / features)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' asked for, but MPS is not available here; use device=cpu")
    return dev


def display_name(name: str) -> str:
    """``name`` as printable text: bytes that were not UTF-8 (a folder name decoded with surrogateescape)
    become U+FFFD, so plots, tables and JSON can show it."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates outside the escape range (e.g. from a JSON \ud800)
        return name.encode("utf-8", "replace").decode("utf-8")


# What the reproduction campaign writes while it trains (run folders, result records, the README's results table),
# not the code that trains.
OUTPUT_PATHS = ("benchmarks/runs", "benchmarks/results", "README.md")


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the longtail source checkout (``where``: a folder inside it; default this package's), with
    '+dirty' if a tracked file outside ``OUTPUT_PATHS`` is modified, or None outside git. A campaign's own
    checkpoints and logs change under benchmarks/runs while it trains: they do not make the code dirty."""
    here = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        pathspec = [":(top)", *(f":(top,exclude){p}" for p in OUTPUT_PATHS)]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *pathspec], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment_info(device: torch.device) -> dict:
    import torchvision

    from longtail import __version__

    return {
        "longtail": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "device": device_name(device),
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
