"""Checkpoints: written atomically, loaded with ``weights_only=True``.

Layout of a run folder's ``checkpoints/``:
  last.pt           rolling resume point (method + optimiser state, stage, epoch, step, RNG state)
  stage_<name>.pt   the method state at the end of each stage (``init_from`` loads its model part)
  best.pt           best-on-val method state, when eval.select=best_val
  final.pt          the weights that were evaluated (last or best), used by eval / predict
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longtail.utils import atomic_torch_save

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    atomic_torch_save({"format": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"{path} is not a longtail checkpoint (format {FORMAT_VERSION})")
    return ckpt


def model_state(method_state: dict) -> dict:
    """The ``model.*`` part of a method state dict, with the prefix removed."""
    return {k[len("model."):]: v for k, v in method_state.items() if k.startswith("model.")}
