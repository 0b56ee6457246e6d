"""Use a finished run: reload its data, model and method from the run folder; evaluate or predict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from longtail.config import RunConfig, load_raw
from longtail.data import LTDataset, create_dataset
from longtail.data.images import read_image, resize_square
from longtail.data.loaders import Loader, file_transform
from longtail.engine.build import build_config
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.evaluate import choose_on_val
from longtail.engine.fit import build_stage_method, state_mismatch
from longtail.errors import CheckpointError, MissingFileError, UsageError
from longtail.methods import Method
from longtail.models import create_model
from longtail.run_folder import lock_holder
from longtail.utils import resolve_device


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: RunConfig
    dataset: LTDataset
    loader: Loader
    method: Method
    # Options set to "val" by the overrides of a run whose checkpoint holds no choice for them, chosen on its val
    # split when it was loaded (records as metrics.json's ``chosen_on_val``; never on test).
    choices: list[dict] = field(default_factory=list)


def load_trained(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None) -> TrainedRun:
    """Rebuild a run's last-stage method with the weights it was evaluated with (``final.pt``).

    ``overrides`` (``key=value``) change prediction-time settings such as ``method.<option>``; they
    must not change the architecture (the weights are loaded strictly).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MissingFileError(f"{run_dir} is not a longtail run folder (no config.yaml)")
    final = run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        holder = lock_holder(run_dir)
        if holder is not None:
            raise MissingFileError(f"{run_dir} has no checkpoints/final.pt yet: it is still training (pid "
                                   f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish")
        raise MissingFileError(f"{run_dir} has no checkpoints/final.pt: the run has not finished; "
                               f"continue it with longtail train --resume --out {run_dir}")
    raw = load_raw(run_dir / "config.yaml")
    raw.pop("meta", None)
    ov = []
    for o in overrides or []:
        key = o.split("=", 1)[0]
        # `method.x` addresses the last stage's method, the one that predicts.
        ov.append(f"stages.{len(raw.get('stages', [{}])) - 1}.{o}" if key.split(".")[0] == "method" else o)
    cfg = build_config(raw, ov)
    if device is not None:
        cfg.device = device
    dev = resolve_device(cfg.device)
    ds = create_dataset(cfg.data)
    loader = Loader(ds, dev, cfg.data.augment, cfg.data.num_workers, cfg.data.fast_path)
    model = create_model(cfg.model, ds.num_classes).to(dev)
    method, _ = build_stage_method(cfg, len(cfg.stages) - 1, model, ds, loader, dev)
    state = load_checkpoint(final)["method"]
    try:
        method.load_state_dict(state)
    except RuntimeError:  # overrides that change the architecture, or a final.pt from another run
        raise CheckpointError(f"{final} does not fit the model and method its config.yaml builds"
                              f"{' with ' + ' '.join(overrides) if overrides else ''} ("
                              f"{state_mismatch(method.state_dict(), state)}); --set may change prediction-time "
                              f"options only") from None
    method.eval()
    choices = []
    for option, grid in method.options_to_choose().items():
        if method.chosen_buffer(option).isnan():  # e.g. eval --set method.alpha=val on a fixed-alpha run
            choice = choose_on_val(method, loader, option, grid, cfg.eval, cfg.amp)
            method.set_chosen(option, choice["value"])
            choices.append({"stage": cfg.stages[-1].name, **choice})
    return TrainedRun(run_dir, cfg, ds, loader, method, choices)


def protocol_split(ds, protocol: str) -> str:
    """The split a dataset scores a GLT ``protocol`` on (CLT / GLT: Train-GLT runs; ALT: Train-CBL runs)."""
    protocol = protocol.upper()
    if protocol not in ("CLT", "ALT", "GLT"):
        raise UsageError(f"unknown protocol {protocol!r}: CLT, ALT or GLT")
    if protocol not in ds.protocols:
        have = ", ".join(ds.protocols) or "none (not a GLT dataset)"
        hint = (" ALT scores a model trained on Train-CBL (data.train_variant=cbl, or an ..._inter_bl annotation)"
                if protocol == "ALT" else " CLT and GLT score a model trained on Train-GLT")
        raise UsageError(f"{ds.name} as trained here is scored under {have}, not {protocol}.{hint}")
    return ds.protocols[protocol]


def evaluate_protocol(run: TrainedRun | str | Path, protocol: str) -> dict:
    """Metrics of a trained run under a GLT protocol (spec glt_ifl.md 3): accuracy, macro precision, many /
    medium / few (and their precision), per attribute group; the dict of one split of ``metrics.json``."""
    from longtail.engine.fit import evaluate_run

    run = load_trained(run) if not isinstance(run, TrainedRun) else run
    split = protocol_split(run.dataset, protocol)
    return evaluate_run(run.method, run.loader, run.cfg, splits=[split])["splits"][split]


@torch.no_grad()
def predict_images(run: TrainedRun, paths: list[str | Path], topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image file, with the run's test-time preprocessing."""
    size = run.dataset.image_size
    k = min(topk, run.dataset.num_classes)
    # The preprocessing of the run's own test images: in-memory datasets were resized once to `size`,
    # file datasets use the eval transform (resize, centre crop).
    if run.dataset.train.in_memory:
        prep = lambda img: resize_square(img, size)  # noqa: E731
    else:
        prep = file_transform("none", size, train=False)
    x = torch.stack([prep(read_image(p)) for p in paths]).to(run.loader.device)
    probs = run.method.predict(run.loader.normalize(x)).float().softmax(1).cpu()  # (N, C)
    p, idx = probs.topk(k, dim=1)
    return [[(run.dataset.class_names[int(i)], float(v)) for v, i in zip(pr, ix, strict=True)]
            for pr, ix in zip(p, idx, strict=True)]
