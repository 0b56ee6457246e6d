"""The Method contract (longtail.methods.base): the state a method saves, its typed hooks, the losses layer.

``tests/golden/method_state_keys.json`` holds the ``state_dict()`` entries (key, shape, dtype) of every library method,
and of IFL and mixup around every loss, as the code wrote them before the losses got a layer of their own and IFL /
mixup stopped hiding their base method from the module tree (issue 14): old checkpoints and final.pt files must
keep loading, strictly. A method whose saved state changes on purpose updates its entry in the same commit (say why):
old run folders of that method then no longer load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import longtail.engine.build  # noqa: F401  (imports every plugin)
from longtail.registry import METHODS

GOLDEN = Path(__file__).resolve().parent / "golden" / "method_state_keys.json"
WRAPPED = ["ce", "focal", "cb_loss", "balanced_softmax", "logit_adjust", "logit_adjust_posthoc", "ldam_drw"]
LIBRARY_METHODS = sorted(n for n in METHODS if METHODS.get(n).__module__.startswith("longtail."))
CASES = {
    **{n: {"name": n} for n in LIBRARY_METHODS},
    "logit_adjust_posthoc/tau_val": {"name": "logit_adjust_posthoc", "tau": "val"},  # + its chosen_tau buffer
    **{f"ifl/{b}": {"name": "ifl", "base": b} for b in WRAPPED},
    **{f"mixup/{b}": {"name": "mixup", "base": b} for b in WRAPPED},
}


def tiny_dataset():
    """A 3-class in-memory dataset (train 12 / 8 / 4, val and test 2 per class) and its CPU loader."""
    from longtail.data.base import LTDataset, Split
    from longtail.data.loaders import Loader

    g = torch.Generator().manual_seed(0)

    def split(counts):
        targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        base = (targets[:, None, None, None] * 60 + 40).expand(-1, 3, 16, 16)
        noise = torch.randint(-30, 31, (len(targets), 3, 16, 16), generator=g)
        return Split(targets=targets, images=(base + noise).clamp(0, 255).to(torch.uint8))

    ds = LTDataset("tiny", ["a", "b", "c"], {"train": split([12, 8, 4]), "val": split([2, 2, 2]),
                                             "test": split([2, 2, 2])}, ["test"], 16)
    return ds, Loader(ds, torch.device("cpu"), "cifar", num_workers=0)


def build(spec: dict, ds, loader):
    """The method of ``spec`` as the fit loop builds it (its options resolved, its head the one it needs)."""
    from longtail.config import DataConfig, ModelConfig, RunConfig, StageConfig
    from longtail.engine.build import resolve
    from longtail.engine.fit import build_stage_method
    from longtail.models import create_model

    cls = METHODS.get(spec["name"])
    opts = {k: v for k, v in spec.items() if k != "name"}
    head = cls.head_needed(opts) or "linear"
    stages = [StageConfig(name="s", method=dict(spec), epochs=1 if cls.trains else 0, batch_size=8)]
    if cls.stage_two or not cls.trains:
        stages = [StageConfig(name="first", method={"name": "ce"}, epochs=1, batch_size=8),
                  StageConfig(name="s", method=dict(spec), epochs=stages[0].epochs, batch_size=8, init_from="first")]
    cfg = resolve(RunConfig(data=DataConfig(name="image_folder"), model=ModelConfig(backbone="tiny", head=head),
                            stages=stages))
    torch.manual_seed(0)
    model = create_model(cfg.model, ds.num_classes)
    return build_stage_method(cfg, len(stages) - 1, model, ds, loader, torch.device("cpu"))


def state_entries(method) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] if isinstance(v, torch.Tensor) else "extra"
            for k, v in method.state_dict().items()}


@pytest.fixture(scope="module")
def data():
    return tiny_dataset()


def test_the_golden_covers_every_library_method():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES), "add the new method's entry to tests/golden/method_state_keys.json"


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_are_those_old_checkpoints_hold(case, data):
    if case == "dlsa":
        pytest.importorskip("zuko", reason="dlsa's flows need the optional zuko (pip install 'longtail[flows]')")
    method, _ = build(CASES[case], *data)
    assert state_entries(method) == json.loads(GOLDEN.read_text())[case]


# How the golden was written (on the code before the change it guards): python tests/test_method_contract.py
if __name__ == "__main__":
    ds, loader = tiny_dataset()
    out = {case: state_entries(build(spec, ds, loader)[0]) for case, spec in sorted(CASES.items())}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
