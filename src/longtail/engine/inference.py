"""Use a finished run: load its model from the run folder alone and predict images; or reload its data too and
evaluate it.

``load_model(RUN)`` needs only ``config.yaml`` and ``checkpoints/final.pt`` (whose ``inference`` record holds the
class names, input size, normalisation and class counts): a run folder moved or copied to another machine, without
its training data, still predicts and exports. ``load_trained(RUN)`` also rebuilds the run's dataset, for ``eval``,
sweeps and features.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from longtail.config import RunConfig, load_raw
from longtail.data import LTDataset, create_dataset
from longtail.data.images import DEFAULT_LIMITS, IMAGE_EXTENSIONS, ImageLimits, read_image
from longtail.data.loaders import Loader
from longtail.engine.build import build_config
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.evaluate import autocast, choose_on_val, thresholds_of
from longtail.engine.fit import build_stage_method, state_mismatch
from longtail.engine.record import InferenceInfo
from longtail.errors import CheckpointError, ConfigError, DataError, MissingFileError, UsageError, UserError
from longtail.methods import Method, MethodContext, create_method
from longtail.models import create_model
from longtail.plugins import load_plugins
from longtail.run_folder import RunDir, lock_holder
from longtail.utils import display_name, resolve_device

log = logging.getLogger("longtail")

LIST_EXTENSIONS = (".txt", ".lst", ".list")  # list files: an image path per line, optionally followed by its label


# ----------------------------------------------------------------------------- loading a run


def _final_checkpoint(run_dir: Path) -> Path:
    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise MissingFileError(f"{run_dir} is not a longtail run folder (no config.yaml)")
    final = rd.final
    if not final.is_file():
        holder = lock_holder(run_dir)
        if holder is not None:
            raise MissingFileError(f"{run_dir} has no checkpoints/final.pt yet: it is still training (pid "
                                   f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish")
        raise MissingFileError(f"{run_dir} has no checkpoints/final.pt: the run has not finished; "
                               f"continue it with longtail train --resume --out {run_dir}")
    return final


def run_config(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None) -> RunConfig:
    """The config a run was trained with (its config.yaml), its plugins imported; ``overrides`` ``method.X=V``
    address the last stage's method, the one that predicts."""
    run_dir = Path(run_dir)
    raw = load_raw(RunDir(run_dir).config)
    raw.pop("meta", None)
    plugins = raw.get("plugins") or []
    if isinstance(plugins, list):
        load_plugins([str(p) for p in plugins], needed_by=f"the run {run_dir} (config.yaml plugins)")
    ov = []
    for o in overrides or []:
        key = o.split("=", 1)[0]
        ov.append(f"stages.{len(raw.get('stages', [{}])) - 1}.{o}" if key.split(".")[0] == "method" else o)
    try:
        cfg = build_config(raw, ov)
    except ConfigError as e:
        if not any(f"unknown {kind} '" in str(e) for kind in ("dataset", "backbone", "head", "method", "sampler")):
            raise
        # A component registered by the user's own code that this process has not imported.
        raise ConfigError(f"{run_dir}: {e}; a component of your own? pass the module that registers it: "
                          f"--plugin MODULE") from None
    if device is not None:
        cfg.device = device
    return cfg


def _build_method(cfg: RunConfig, info: InferenceInfo, dev: torch.device, final: Path, overrides: list[str] | None,
                  ds: LTDataset | None = None, loader: Loader | None = None) -> Method:
    """The last stage's method with final.pt's weights, on ``dev``, in eval mode. Without ``ds`` its context holds
    the recorded class counts and no data."""
    # The weights come from final.pt: the backbone's pretrained file is not read (nor needed on this machine).
    model = create_model(dataclasses.replace(cfg.model, pretrained=None), info.num_classes).to(dev)
    last = len(cfg.stages) - 1
    if ds is not None:
        method, _ = build_stage_method(cfg, last, model, ds, loader, dev)
    else:
        st = cfg.stages[last]
        ctx = MethodContext(num_classes=info.num_classes, train_counts=torch.tensor(info.train_counts),
                            epochs=st.epochs, steps_per_epoch=0, device=dev, stage=st)
        method = create_method(st.method, model, ctx).to(dev)
    state = load_checkpoint(final)["method"]
    try:
        method.load_state_dict(state)
    except RuntimeError:  # overrides that change the architecture, or a final.pt from another run
        raise CheckpointError(f"{final} does not fit the model and method its config.yaml builds"
                              f"{' with ' + ' '.join(overrides) if overrides else ''} ("
                              f"{state_mismatch(method.state_dict(), state)}); --set may change prediction-time "
                              f"options only") from None
    return method.eval()


@dataclass
class TrainedModel:
    """A finished run's model, ready to predict and export; built from its run folder alone (``load_model``).

    ``predict`` and ``logits`` take image files, folders (recursive), list files, PIL images, and (3, H, W) or
    (B, 3, H, W) tensors (uint8, or float in [0, 1]); every image is prepared as the run's own evaluation images
    were (``info.preprocess_image``) and scored with the method's prediction (TDE, post-hoc adjustments, NCM, ...).
    """

    run_dir: Path
    cfg: RunConfig
    info: InferenceInfo
    method: Method
    device: torch.device
    # ``chosen_on_val`` records of options chosen when the run was loaded (see ``TrainedRun.choices``); the values
    # are in the method's ``chosen_<option>`` buffers, so predict and export use them.
    choices: list[dict] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 or float in [0, 255] -> normalised float: exactly ``Loader.normalize``."""
        mean = torch.tensor(self.info.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.info.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x.float() - mean) / std

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) prepared images in [0, 255] -> (B, C) float scores of the method, on the CPU."""
        x = self.normalize(images.to(self.device))
        with autocast(self.device, self.cfg.amp):
            return self.method.predict(x).float().cpu()

    def batches(self, inputs: Any, batch_size: int = 64, num_workers: int = 0,
                progress: bool = False) -> Iterator[tuple[list[Sample], torch.Tensor]]:
        """(samples, (B, C) scores) per batch of ``inputs``, in order: streaming, so memory stays constant however
        many images a folder holds."""
        samples = inputs if isinstance(inputs, list) and all(isinstance(s, Sample) for s in inputs) else \
            collect_inputs(inputs, self.class_names)
        yield from _score_batches(self, samples, batch_size, num_workers, progress)

    def logits(self, inputs: Any, batch_size: int = 64) -> torch.Tensor:
        """(N, C) float scores of every image in ``inputs`` (argmax: the prediction; softmax: probabilities)."""
        out = [s for _, s in self.batches(inputs, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, inputs: Any, topk: int = 5, batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for every image in ``inputs``, in order."""
        k = check_topk(topk, self.num_classes)
        return self.top(self.logits(inputs, batch_size), k)

    def top(self, scores: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        p, idx = scores.float().softmax(1).topk(min(k, self.num_classes), dim=1)
        return [[(self.class_names[int(i)], float(v)) for v, i in zip(pr, ix, strict=True)]
                for pr, ix in zip(p, idx, strict=True)]

    def export(self, out: str | Path | None = None, format: str = "torchscript", input: str = "uint8") -> Path:
        """Write one TorchScript / ONNX module (prediction-time settings baked in) and its ``.json`` record; see
        ``longtail.engine.export.export_model``."""
        from longtail.engine.export import export_model

        return export_model(self, format=format, out=out, input=input)


def load_model(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None) -> TrainedModel:
    """A finished run's model from its folder alone: ``config.yaml`` and ``checkpoints/final.pt``; the training
    data is never read (for a run written before final.pt held its inference record, it is, once, with a note; and
    so it is when ``overrides`` set an option to ``val`` that the checkpoint holds no choice for, to choose it on
    the val split). An option the run chose on val is predicted and exported with the value it chose.

    ``overrides`` (``method.X=V``) change prediction-time settings, e.g. ``method.alpha=2``; they must not change
    the architecture (the weights are loaded strictly).
    """
    run_dir = Path(run_dir)
    final = _final_checkpoint(run_dir)
    cfg = run_config(run_dir, overrides, device)
    dev = resolve_device(cfg.device)
    record = load_checkpoint(final).get("inference")
    ds = None
    if record is None:
        ds = _dataset_for_old_run(run_dir, cfg)
        info = InferenceInfo.from_dataset(ds)
    else:
        info = InferenceInfo.from_dict(record, str(final))
    method = _build_method(cfg, info, dev, final, overrides)
    choices = []
    if _unchosen(method):  # e.g. --set method.alpha=val on a run trained with a number: only its val split can say
        if ds is None:
            ds = _dataset_to_choose(run_dir, cfg, _unchosen(method))
        choices = choose_unchosen(method, cfg, Loader(ds, dev, cfg.data.augment, cfg.data.num_workers,
                                                      cfg.data.fast_path))
    return TrainedModel(run_dir, cfg, info, method, dev, choices)


def _unchosen(method: Method) -> list[str]:
    """The options the method predicts with as chosen on val whose checkpoint holds no choice (NaN)."""
    return [option for option in method.options_to_choose() if method.chosen_buffer(option).isnan()]


def choose_unchosen(method: Method, cfg: RunConfig, loader: Loader) -> list[dict]:
    """Choose every ``_unchosen`` option on the run's val split (never on test) and store it in the method's
    ``chosen_<option>`` buffer, which predict and export read; returns the ``chosen_on_val`` records."""
    choices = []
    for option, grid in method.options_to_choose().items():
        if method.chosen_buffer(option).isnan():
            choice = choose_on_val(method, loader, option, grid, cfg.eval, cfg.amp)
            method.set_chosen(option, choice["value"])
            choices.append({"stage": cfg.stages[-1].name, **choice})
    return choices


def _dataset_to_choose(run_dir: Path, cfg: RunConfig, options: list[str]) -> LTDataset:
    opts = ", ".join(f"method.{o}=val" for o in options)
    log.warning("%s: %s and its checkpoint holds no value chosen on val, so it is chosen now on the run's val split "
                "(%s, data.root=%s); give a number (--set method.%s=V) to predict without the data",
                run_dir, opts, cfg.data.name, cfg.data.root, options[0])
    try:
        return create_dataset(cfg.data)
    except UserError as e:
        raise DataError(f"{run_dir}: {opts} is chosen on the run's val split (its checkpoint holds no chosen value), "
                        f"whose data cannot be read here: {e}; give a number instead: --set method.{options[0]}=V"
                        ) from None


def _dataset_for_old_run(run_dir: Path, cfg: RunConfig) -> LTDataset:
    log.warning("%s: its final.pt predates the inference record (class names, input size, normalisation), so "
                "they are read from its training data (%s, data.root=%s) this time; runs trained now stand alone",
                run_dir, cfg.data.name, cfg.data.root)
    try:
        return create_dataset(cfg.data)
    except UserError as e:
        raise DataError(f"{run_dir} was trained before runs saved what prediction needs, so its class names, input "
                        f"size and normalisation come from its training data, which cannot be read here: {e}") from None


@dataclass
class TrainedRun:
    """A finished run with its data: what ``eval``, sweeps and features need (``load_trained``)."""

    run_dir: Path
    cfg: RunConfig
    dataset: LTDataset
    loader: Loader
    method: Method
    model: TrainedModel | None = None
    # Options set to "val" by the overrides of a run whose checkpoint holds no choice for them, chosen on its val
    # split when it was loaded (records as metrics.json's ``chosen_on_val``; never on test).
    choices: list[dict] = field(default_factory=list)


def load_trained(run_dir: str | Path, overrides: list[str] | None = None, device: str | None = None) -> TrainedRun:
    """Rebuild a run's last-stage method with the weights it was evaluated with (``final.pt``), and its dataset.

    ``overrides`` (``key=value``) change prediction-time settings such as ``method.<option>``; they
    must not change the architecture (the weights are loaded strictly).
    """
    run_dir = Path(run_dir)
    final = _final_checkpoint(run_dir)
    cfg = run_config(run_dir, overrides, device)
    dev = resolve_device(cfg.device)
    ds = create_dataset(cfg.data)
    loader = Loader(ds, dev, cfg.data.augment, cfg.data.num_workers, cfg.data.fast_path)
    record = load_checkpoint(final).get("inference")
    info = InferenceInfo.from_dict(record, str(final)) if record is not None else InferenceInfo.from_dataset(ds)
    if info.num_classes != ds.num_classes:
        raise DataError(f"{run_dir} was trained on {info.num_classes} classes and its data ({cfg.data.name}, "
                        f"data.root={cfg.data.root}) now has {ds.num_classes}; point data.root at the data it was "
                        f"trained on")
    method = _build_method(cfg, info, dev, final, overrides, ds, loader)
    choices = choose_unchosen(method, cfg, loader)
    return TrainedRun(run_dir, cfg, ds, loader, method, TrainedModel(run_dir, cfg, info, method, dev, choices),
                      choices)


def protocol_split(ds, protocol: str) -> str:
    """The split a dataset scores a GLT ``protocol`` on (CLT / GLT: Train-GLT runs; ALT: Train-CBL runs)."""
    protocol = protocol.upper()
    if protocol not in ("CLT", "ALT", "GLT"):
        raise UsageError(f"unknown protocol {protocol!r}: CLT, ALT or GLT")
    if protocol not in ds.protocols:
        have = ", ".join(ds.protocols) or "none (not a GLT dataset)"
        hint = (" ALT scores a model trained on Train-CBL (data.options.train_variant=cbl, or an ..._inter_bl "
                "annotation)" if protocol == "ALT" else " CLT and GLT score a model trained on Train-GLT")
        raise UsageError(f"{ds.name} as trained here is scored under {have}, not {protocol}.{hint}")
    return ds.protocols[protocol]


def evaluate_protocol(run: TrainedRun | str | Path, protocol: str) -> dict:
    """Metrics of a trained run under a GLT protocol (spec glt_ifl.md 3): accuracy, macro precision, many /
    medium / few (and their precision), per attribute group; the dict of one split of ``metrics.json``."""
    from longtail.engine.fit import evaluate_run

    run = load_trained(run) if not isinstance(run, TrainedRun) else run
    split = protocol_split(run.dataset, protocol)
    return evaluate_run(run.method, run.loader, run.cfg, splits=[split])["splits"][split]


def predict_images(run: TrainedRun | TrainedModel, paths: Any, topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image (files, folders, list files, PIL images, tensors), with the
    run's test-time preprocessing. Kept for older code: ``load_model(RUN).predict(...)`` does the same."""
    model = run if isinstance(run, TrainedModel) else run.model
    return model.predict(paths, topk)


# ----------------------------------------------------------------------------- inputs


@dataclass
class Sample:
    """One image to predict: a file path, or an in-memory image (a tensor or PIL image); its label when known."""

    source: str  # what the output calls it: the path as given, or <tensor i> / <image i>
    image: Any = None  # None: read ``source`` from disk
    label: int | None = None


def check_topk(topk: int, num_classes: int | None = None) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise UsageError(f"topk must be at least 1, got {topk}")
    return topk if num_classes is None else min(topk, num_classes)


def _label_of(text: str, index: dict[str, int], num_classes: int) -> int | None:
    if text in index:
        return index[text]
    try:
        label = int(text)
    except ValueError:
        return None
    return label if 0 <= label < num_classes else None


def _read_list(path: Path, index: dict[str, int], num_classes: int) -> list[Sample]:
    """`path [label]` lines; paths relative to the list file's folder; labels a class name or index."""
    try:
        lines = path.read_text(errors="surrogateescape").splitlines()
    except OSError as e:
        raise DataError(f"cannot read list file {path}: {e.strerror or e}") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = None
        if len(parts) == 2 and Path(parts[1]).suffix.lower() not in IMAGE_EXTENSIONS:
            label = _label_of(parts[1], index, num_classes)
            if label is None:
                raise DataError(f"{path}:{lineno}: label {parts[1]!r} is neither one of the run's {num_classes} "
                                f"class names nor a class index 0..{num_classes - 1}")
            line = parts[0]
        p = Path(line).expanduser()
        out.append(Sample(str(p if p.is_absolute() else path.parent / p), label=label))
    if not out:
        raise DataError(f"{path}: no image paths (one per line, optionally followed by its label)")
    return out


def _walk(folder: Path, index: dict[str, int]) -> list[Sample]:
    """Every image under ``folder`` (sorted, recursive); a first-level sub-folder named after a class labels the
    images below it (the image-folder layout ``<class>/<image>``)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder).parts
        label = index.get(display_name(rel[0])) if rel else None
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Sample(os.path.join(dirpath, name), label=label))
    if not out:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    return out


def collect_inputs(inputs: Any, class_names: list[str]) -> list[Sample]:
    """The images ``inputs`` names, in order: image files, folders (recursive, ``<class>/`` sub-folders give
    labels), list files (.txt: a path per line, optionally followed by its label), PIL images and tensors
    ((3, H, W) or (B, 3, H, W); uint8, or float in [0, 1]); or a list of any of those."""
    index = {display_name(c): i for i, c in enumerate(class_names)}
    items = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
    out: list[Sample] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            p = Path(item)
            if p.is_dir():
                out += _walk(p, index)
            elif not p.exists():
                raise MissingFileError(f"{p}: no such image, folder or list file")
            elif p.suffix.lower() in LIST_EXTENSIONS:
                out += _read_list(p, index, len(class_names))
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Sample(str(p)))
            else:
                raise DataError(f"{p}: neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a list file "
                                f"({', '.join(LIST_EXTENSIONS)}: an image path per line, optionally with a label)")
        elif isinstance(item, torch.Tensor):
            if item.dim() == 3:
                item = item[None]
            if item.dim() != 4 or item.shape[1] != 3:
                raise UsageError(f"an image tensor is (3, H, W) or (B, 3, H, W) RGB, got shape {tuple(item.shape)}")
            _check_range(item)
            out += [Sample(f"<tensor {len(out) + i}>", image=img) for i, img in enumerate(item)]
        elif hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            out.append(Sample(f"<image {len(out)}>", image=item))
        else:
            raise UsageError(f"cannot predict a {type(item).__name__}: give image paths, folders, list files, PIL "
                             f"images or image tensors")
    return out


def _check_range(x: torch.Tensor) -> None:
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    if not x.is_floating_point():
        raise UsageError(f"image tensors are uint8 (0-255) or float in [0, 1], got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UsageError(f"float image tensors are raw images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; pass "
                         f"uint8 for 0-255 images (normalised tensors: call model.method.predict directly)")


class _Images(Dataset):
    """Sample i -> ((3, S, S) float in [0, 255], i, error message or ""): decoding errors travel to the main
    process as text, which raises them there as one line (a DataLoader worker would wrap them in a traceback)."""

    def __init__(self, samples: list[Sample], info: InferenceInfo, limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.samples, self.info, self.limits = samples, info, limits  # limits: the run's data.max_image_pixels ...

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        s = self.samples[i]
        try:
            img = s.image
            if img is None:
                img = read_image(s.source, self.limits)
            elif not isinstance(img, torch.Tensor):  # PIL
                from torchvision.transforms.v2.functional import pil_to_tensor

                img = pil_to_tensor(img.convert("RGB"))
            img = self.info.preprocess_image(img)
            img = img.float() if img.dtype == torch.uint8 else img.float() * 255  # float images are in [0, 1]
            return img, i, ""
        except UserError as e:
            size = self.info.image_size
            return torch.zeros(3, size, size), i, str(e)


def _score_batches(model: TrainedModel, samples: list[Sample], batch_size: int, num_workers: int,
                   progress: bool) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    in_memory = any(s.image is not None for s in samples)
    dl = DataLoader(_Images(samples, model.info, ImageLimits.of(model.cfg.data)), batch_size=batch_size, shuffle=False,
                    num_workers=0 if in_memory else num_workers)
    with tqdm(total=len(samples), unit="img", desc="predict", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for x, idx, errors in dl:
            bad = next((e for e in errors if e), None)
            if bad:
                raise DataError(bad)
            yield [samples[int(i)] for i in idx], model.scores(x)
            bar.update(len(idx))


# ----------------------------------------------------------------------------- predicting to a file


def labelled_metrics(model: TrainedModel, preds: list[int], labels: list[int]) -> dict:
    """Accuracy (top-1, mean per class, many / medium / few by the run's training counts) of labelled predictions."""
    from longtail.evaluation.metrics import classification_metrics

    groups = model.info.class_groups
    return classification_metrics(torch.tensor(preds), torch.tensor(labels), torch.tensor(model.info.train_counts),
                                  thresholds_of(model.cfg.eval),
                                  class_groups=torch.tensor(groups) if groups is not None else None)


def predict_to(model: TrainedModel, samples: list[Sample], out: str | Path | None, topk: int, batch_size: int = 64,
               num_workers: int = 0, progress: bool = False, echo: Any = None) -> dict:
    """Predict ``samples`` in batches and stream the rows to ``out`` (.csv or .json; None: only ``echo``, called
    with each printed line). Returns {"count", "labelled", "metrics" (None without labels), "out"}.

    CSV columns: path, label (when any image has one), then class_1, prob_1, ..., class_k, prob_k. JSON:
    {"run", "topk", "predictions": [{"path", "label", "topk": [{"class", "prob"}, ...]}, ...], "metrics"}.
    """
    k = check_topk(topk, model.num_classes)
    writer = _Writer(out, model, k, any(s.label is not None for s in samples)) if out is not None else None
    preds, labels, count = [], [], 0
    try:
        for batch, scores in model.batches(samples, batch_size, num_workers, progress):
            tops = model.top(scores, k)
            for s, top, pred in zip(batch, tops, scores.argmax(1).tolist(), strict=True):
                count += 1
                if s.label is not None:
                    preds.append(pred)
                    labels.append(s.label)
                if writer is not None:
                    writer.row(s, top)
                elif echo is not None:
                    echo(display_name(f"{s.source}: " + ", ".join(f"{name} {p:.1%}" for name, p in top)))
        metrics = labelled_metrics(model, preds, labels) if labels else None
        if writer is not None:
            writer.close(metrics)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {"count": count, "labelled": len(labels), "metrics": metrics, "out": None if out is None else str(out)}


class _Writer:
    """Rows of predictions streamed to a temporary file beside ``out``, renamed to ``out`` when complete."""

    def __init__(self, out: str | Path, model: TrainedModel, k: int, labels: bool) -> None:
        import tempfile

        from longtail.errors import WRITE_ERRNOS, write_error

        self.out = Path(out)
        self.kind = self.out.suffix.lower().lstrip(".")
        if self.kind not in ("csv", "json"):
            raise UsageError(f"--out {out}: write predictions to a .csv or .json file")
        if self.out.is_dir():
            raise UsageError(f"--out {out} is a folder; name a .csv or .json file")
        self.names, self.k, self.labels, self.first = model.class_names, k, labels, True
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp")
        except OSError as e:
            if e.errno in WRITE_ERRNOS:
                raise write_error(self.out, e) from None
            raise
        self.f = os.fdopen(fd, "w", newline="", encoding="utf-8", errors="replace")
        if self.kind == "csv":
            import csv

            self.csv = csv.writer(self.f)
            head = ["path", *(["label"] if labels else [])]
            self.csv.writerow(head + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")])
        else:
            import json

            self.f.write('{"run": ' + json.dumps(display_name(str(model.run_dir))) + f', "topk": {k}, "predictions": [')

    def row(self, s: Sample, top: list[tuple[str, float]]) -> None:
        label = self.names[s.label] if s.label is not None else None
        if self.kind == "csv":
            cells = [display_name(s.source), *([label or ""] if self.labels else [])]
            self.csv.writerow(cells + [c for name, p in top for c in (name, f"{p:.6f}")])
            return
        import json

        row = {"path": display_name(s.source), "label": label,
               "topk": [{"class": name, "prob": round(p, 6)} for name, p in top]}
        self.f.write(("\n  " if self.first else ",\n  ") + json.dumps(row))
        self.first = False

    def close(self, metrics: dict | None) -> None:
        if self.kind == "json":
            import json

            slim = None if metrics is None else {k: v for k, v in metrics.items() if k != "confusion"}
            self.f.write("\n], \"metrics\": " + json.dumps(slim) + "}\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        Path(self.tmp).unlink(missing_ok=True)
