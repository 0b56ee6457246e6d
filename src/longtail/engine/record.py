"""What prediction needs besides the weights, saved in ``checkpoints/final.pt`` as ``inference``.

With it a run folder stands alone: ``load_model`` / ``predict`` / ``export`` rebuild the model from config.yaml
and final.pt and never read the training data. The method's own prediction-time state (TDE's head direction and
alpha, a tau chosen on val, NCM's centroids, DLSA's cascade) is in its ``state_dict``; the class counts that some
methods predict with (post-hoc logit adjustment's prior) are here, as ``train_counts``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from longtail.errors import CheckpointError
from longtail.run_folder import FINAL

# How a run's own evaluation images reach the network, and so how any other image must:
#   resize_square  in-memory datasets (decoded once at the input size): resize the short side to image_size and
#                  centre-crop image_size (an image already image_size x image_size is used as it is)
#   resize_crop    file datasets: resize the short side to round(image_size * 256 / 224), centre-crop image_size
PREPROCESS = ("resize_square", "resize_crop")


@dataclass
class InferenceInfo:
    """Class names, input size, normalisation and training class counts of a trained run (JSON-able)."""

    class_names: list[str]
    image_size: int  # side of the square network input
    mean: list[float]  # per RGB channel, of images in [0, 1]
    std: list[float]
    preprocess: str  # one of PREPROCESS
    train_counts: list[int]  # (C,) training images per class: shot groups, and the prior of post-hoc methods
    class_groups: list[int] | None = None  # (C,) 0 many / 1 medium / 2 few, when the benchmark defines them by rank
    dataset: str = ""  # the dataset's name (for messages)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resize(self) -> int:
        """The short side an image is resized to before the centre crop."""
        return self.image_size if self.preprocess == "resize_square" else int(round(self.image_size * 256 / 224))

    @classmethod
    def from_dataset(cls, ds) -> InferenceInfo:
        return cls(
            class_names=list(ds.class_names),
            image_size=int(ds.image_size),
            mean=[float(v) for v in ds.mean],
            std=[float(v) for v in ds.std],
            preprocess="resize_square" if ds.train.in_memory else "resize_crop",
            train_counts=[int(v) for v in ds.train_counts().tolist()],
            class_groups=None if ds.class_groups is None else [int(v) for v in torch.as_tensor(ds.class_groups)],
            dataset=ds.name,
        )

    @classmethod
    def from_dict(cls, data: dict, where: str = FINAL) -> InferenceInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            info = cls(**{k: v for k, v in data.items() if k in names})  # newer keys: ignored by older code
        except TypeError as e:
            raise CheckpointError(f"{where}: its inference record is incomplete ({e}); use the file a longtail run "
                                  f"wrote") from None
        if info.preprocess not in PREPROCESS or len(info.train_counts) != info.num_classes:
            raise CheckpointError(f"{where}: its inference record is damaged (preprocess {info.preprocess!r}, "
                                  f"{len(info.train_counts)} counts for {info.num_classes} classes)")
        return info

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def preprocess_image(self, img: torch.Tensor) -> torch.Tensor:
        """(3, H, W) image (uint8, or float in [0, 1]) -> (3, S, S) of the same dtype, as the run's own
        evaluation images were prepared."""
        from longtail.data.images import resize_square
        from longtail.data.loaders import file_transform

        if self.preprocess == "resize_square":
            return resize_square(img, self.image_size)
        return file_transform("none", self.image_size, train=False)(img)


def inference_record(ds) -> dict:
    """The ``inference`` entry of final.pt for a run trained on dataset ``ds``."""
    return InferenceInfo.from_dataset(ds).to_dict()
