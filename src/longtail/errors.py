"""The errors a user can fix: a setting, a file, a folder, a command line.

The CLI prints any ``UserError`` as one line (``error: ...``) and exits with 2; every other exception is a
bug and keeps its traceback (``longtail --debug`` shows the traceback of user errors too). Each class also
derives from the built-in exception its callers caught before it existed (``ConfigError`` is a ValueError,
``MissingFileError`` a FileNotFoundError, ...), so library code that catches those keeps working.
Messages say which setting or file is wrong and what to do, in one line.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Base of every error the user can fix; the CLI shows its message in one line and exits with 2."""


class UsageError(UserError, ValueError):
    """A command used wrongly: a flag out of range, flags that exclude each other."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used: unknown key, wrong type, bad value. Says what to fix."""


class DataError(UserError, ValueError):
    """Bad user data (missing root, corrupt image, label out of range, empty class). Says what to fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (a run folder, an ``init_from``, a weights file) does not exist."""


class RunFolderError(UserError, FileExistsError):
    """A run folder cannot be used as asked: it holds other files or a finished run, or another process trains
    in it (its lock)."""


class CorruptFileError(UserError, ValueError):
    """A file of a run folder (config.yaml, metrics.json) cannot be parsed."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: truncated, another program's file, or weights of another model."""


class TrainingError(UserError, FloatingPointError):
    """Training cannot go on as configured (a non-finite loss)."""


class WriteError(UserError, OSError):
    """A file could not be written: the disk is full, the folder is read-only or not ours to write."""


# The errno values of a write the user can fix (space, permissions, a path that is not a folder).
WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EISDIR",
                                                      "ENOTDIR", "ENAMETOOLONG", "EFBIG") if hasattr(errno, n))


def write_error(path: object, e: OSError) -> WriteError:
    """The one-line WriteError for an OSError of writing ``path``."""
    what = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
    if getattr(errno, "EDQUOT", None) == e.errno:
        what = "the disk quota is exceeded"
    return WriteError(f"cannot write {path}: {what}; free some space, or write somewhere else (e.g. another --out)")


def load_failure(e: BaseException) -> str:
    """A short reason why ``torch.load(..., weights_only=True)`` refused a file (torch's own message spans
    lines and suggests loading it unsafely)."""
    text = str(e).strip()
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, (EOFError, OSError)):  # what torch raises for a zip archive cut short
        return "the file ends early or is damaged"
    if isinstance(e, RuntimeError) and not text.startswith("Weights only load failed"):
        return (text.splitlines() or [type(e).__name__])[0][:200]  # e.g. a truncated zip archive
    return "it is not a PyTorch file of tensors (another format, or a pickle of other objects)"
