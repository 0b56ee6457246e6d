"""Checkpoints: written atomically, loaded with ``weights_only=True``.

Layout of a run folder's ``checkpoints/``:
  last.pt           rolling resume point: method + optimiser state, stage, epoch, step, the epoch's batch
                    generator (gen_state) and every rank's global generators and worker streams (rng)
  stage_<name>.pt   the method state at the end of each stage (``init_from`` loads its model part)
  best.pt           best-on-val method state, when eval.select=best_val
  final.pt          the weights that were evaluated (last or best), used by eval / predict
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longtail.errors import CheckpointError, MissingFileError, load_failure
from longtail.utils import atomic_torch_save

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    atomic_torch_save({"format": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's payload; MissingFileError / CheckpointError (one line, naming the file) when it is absent,
    truncated, another program's file, or not longtail's format."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle is the file's: truncated, foreign, an unsafe pickle
        raise CheckpointError(f"cannot load checkpoint {path}: truncated or not a longtail checkpoint "
                              f"({load_failure(e)}); use the file a longtail run wrote there") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION or "method" not in ckpt:
        raise CheckpointError(f"{path} is not a longtail checkpoint (format {FORMAT_VERSION}, with the method's "
                              f"weights); use the file a longtail run wrote there")
    return ckpt


def model_state(method_state: dict) -> dict:
    """The ``model.*`` part of a method state dict, with the prefix removed."""
    return {k[len("model."):]: v for k, v in method_state.items() if k.startswith("model.")}
