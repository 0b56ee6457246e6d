"""Export a finished run to one TorchScript or ONNX module that needs neither longtail nor the run folder.

The module maps a batch of prepared images, (B, 3, S, S), to the (B, C) scores the method predicts with: the
normalisation and every prediction-time setting (TDE's alpha and head direction, post-hoc logit adjustment's tau
and prior, tau-norm, NCM's centroids, DLSA's cascade) are baked in. What it is traced from is the method's own
``Method.inference_module()``, so this file never asks which method it exports. Input, by ``input``:
  uint8        raw RGB images, 0-255 (what torchvision.io.read_image gives)
  float        RGB images as floats in [0, 1] (what ToTensor gives)
  normalized   images already normalised with the run's mean and std
Resizing stays outside (``resize`` then a centre crop of ``image_size``, both in the record), so the module is
pure tensor algebra. Beside the file, ``FILE.json`` records the class names, the input, the preprocessing and
where the model comes from; the same record is inside the file (TorchScript extra file ``longtail.json``, ONNX
metadata ``longtail``).

Before it writes anything, the export runs the exported module and the method's ``predict`` on the same
images (another batch size than the one traced) and refuses a module that does not reproduce it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from longtail.errors import UsageError, UserError
from longtail.run_folder import RunDir
from longtail.utils import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from longtail.engine.inference import TrainedModel

log = logging.getLogger("longtail")

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
INPUTS = ("uint8", "float", "normalized")
ONNX_OPSET = 17
TOLERANCE = 1e-4  # max |exported - predict| relative to the scores' scale (float32 kernels differ a little)


class ExportError(UserError, RuntimeError):
    """The exported module does not reproduce the method's prediction (a method whose prediction does not trace)."""


class ExportedClassifier(nn.Module):
    """(B, 3, S, S) images -> (B, C) scores: the run's normalisation, then the method's inference module."""

    def __init__(self, core: nn.Module, mean: list[float], std: list[float], input: str) -> None:
        super().__init__()
        self.core, self.input = core, input
        # mean and std of 0-255 images, as Loader.normalize: uint8 input gives exactly predict's normalised batch
        self.register_buffer("mean255", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std255", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input == "uint8":
            images = (images.float() - self.mean255) / self.std255
        elif self.input == "float":
            images = (images * 255 - self.mean255) / self.std255
        return self.core(images)  # (B, C)


def _example(model: TrainedModel, batch: int, input: str, seed: int) -> torch.Tensor:
    """(batch, 3, S, S) random images in the exported module's input form."""
    s = model.info.image_size
    x = torch.randint(0, 256, (batch, 3, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    if input == "uint8":
        return x
    if input == "float":
        return x.float() / 255
    return model.normalize(x)


def _reference(model: TrainedModel, x: torch.Tensor, input: str) -> torch.Tensor:
    """The method's own prediction for the exported module's input ``x``."""
    with torch.no_grad():
        if input == "uint8":
            return model.scores(x)
        if input == "float":
            return model.scores(x * 255)
        return model.method.predict(x.to(model.device)).float().cpu()


def record(model: TrainedModel, fmt: str, input: str, out: Path) -> dict:
    from longtail import __version__

    info = model.info
    last = model.cfg.stages[-1].method
    return {
        "file": out.name,
        "format": fmt,
        "input": input,
        "input_name": "images",
        "input_shape": ["batch", 3, info.image_size, info.image_size],
        "output": "logits (batch, num_classes): argmax is the predicted class, softmax the probabilities",
        "class_names": info.class_names,
        "image_size": info.image_size,
        "resize": info.resize,
        "preprocess": f"resize the short side to {info.resize} (antialiased), centre-crop {info.image_size}",
        "mean": info.mean,
        "std": info.std,
        "method": dict(last),
        # the values it predicts with, baked in: a configured number, the one chosen on val (OPTION: val), or auto's
        "prediction_options": {o: model.method.option(o) for o in model.method.val_options},
        "dataset": info.dataset,
        "train_counts": info.train_counts,
        "run": str(model.run_dir.resolve()),
        "longtail": __version__,
        "torch": str(torch.__version__),
    }


@contextlib.contextmanager
def _quiet():
    """Tracing warns about every Python value it bakes in, and the legacy exporters announce their deprecation;
    baking in is the point here."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def _torchscript(wrapper: nn.Module, example: torch.Tensor, meta: str) -> tuple[bytes, object]:
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"longtail.json": meta})
    data = buf.getvalue()
    loaded = torch.jit.load(io.BytesIO(data))  # what a user gets back
    return data, lambda x: loaded(x)


def _onnx(wrapper: nn.Module, example: torch.Tensor, meta: str, class_names: list[str]) -> tuple[bytes, object]:
    try:
        import onnx
    except ImportError:
        raise UsageError("--format onnx needs the onnx package: pip install 'longtail[export]' (onnx, and "
                         "onnxruntime to check the file)") from None
    import inspect

    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET,
                          **kwargs)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (("longtail", meta), ("class_names", json.dumps(class_names))):
        proto.metadata_props.add(key=key, value=value)
    data = proto.SerializeToString()
    try:
        import onnxruntime as ort
    except ImportError:
        return data, None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def check_export(run, reference: torch.Tensor, x: torch.Tensor, what: str) -> float:
    """Max |run(x) - reference| relative to the reference's scale; ExportError past ``TOLERANCE``."""
    got = run(x).float()
    if got.shape != reference.shape:
        raise ExportError(f"{what}: the exported module gives {tuple(got.shape)} scores for a batch of {len(x)}, "
                          f"predict {tuple(reference.shape)}")
    scale = max(float(reference.abs().max()), 1.0)
    diff = float((got - reference).abs().max()) / scale
    if not diff <= TOLERANCE:  # also NaN
        raise ExportError(f"{what}: the exported module does not reproduce predict (max difference {diff:.2g} of "
                          f"the scores' scale): its Method.inference_module() must compute predict with traceable "
                          f"operations (no shape that depends on the data)")
    return diff


def export_model(model: TrainedModel, format: str = "torchscript", out: str | Path | None = None,
                 input: str = "uint8") -> Path:
    """Export ``model`` (``load_model(RUN)``) to ``out`` (default RUN/export/model.pt or model.onnx) with its record
    ``out + '.json'``; returns the path of the module. The module is checked against ``predict`` first."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}: {' or '.join(FORMATS)}")
    if input not in INPUTS:
        raise UsageError(f"unknown export input {input!r}: {', '.join(INPUTS)}")
    out = Path(out) if out is not None else RunDir(model.run_dir).export(FORMATS[format])
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write (e.g. {out / ('model' + FORMATS[format])})")
    device = model.device
    model.method.to("cpu").eval()
    model.device = torch.device("cpu")  # traced on the CPU: the file runs anywhere
    # An inference-only module: its outputs need no autograd (no requires_grad warnings for its users).
    grads = {p: p.requires_grad for p in model.method.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        what = f"export of {model.run_dir} (method {model.cfg.stages[-1].method['name']})"
        wrapper = ExportedClassifier(model.method.inference_module(), model.info.mean, model.info.std, input).eval()
        meta = json.dumps(record(model, format, input, out))
        with _quiet():
            example = _example(model, 2, input, seed=0)
            if format == "torchscript":
                data, run = _torchscript(wrapper, example, meta)
            else:
                data, run = _onnx(wrapper, example, meta, model.class_names)
            if run is not None:  # another batch size than traced: a batch size baked in would show here
                check = _example(model, 3, input, seed=1)
                check_export(run, _reference(model, check, input), check, what)
            else:
                log.warning("onnxruntime is not installed, so %s was not checked against predict (pip install "
                            "'longtail[export]')", out)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        model.method.to(device)
        model.device = device
    atomic_write_bytes(out, data)
    atomic_write_json(Path(f"{out}.json"), json.loads(meta))
    return out
