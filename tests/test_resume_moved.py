"""A run folder whose data moved (copied to another machine, data elsewhere) resumes with ``data.root=``: only file
locations may change on --resume, the moved location is written into config.yaml, and data other than the run's
is refused."""

import shutil

import pytest
import yaml

from longtail.cli import main
from longtail.engine import Interrupted, train
from longtail.engine.build import build_config
from longtail.errors import DataError
from test_engine_cli import assert_same_state, final_weights, tiny_raw


@pytest.fixture
def interrupted_run(image_folder, tmp_path, interrupt_method):
    """(run folder interrupted mid-epoch 2, its data folder) with the data moved away from where the run saw it."""
    data = tmp_path / "old_place"
    shutil.copytree(image_folder, data)
    cfg = build_config(tiny_raw(data, method="interrupt_test", at_step=6))
    with pytest.raises(Interrupted):
        train(cfg, out=tmp_path / "run", progress=False)
    moved = tmp_path / "new_place"
    data.rename(moved)
    return tmp_path / "run", moved


def test_a_moved_run_resumes_with_data_root_and_ends_as_if_never_moved(interrupted_run, image_folder, tmp_path,
                                                                       capsys):
    run, moved = interrupted_run
    meta = yaml.safe_load((run / "config.yaml").read_text())["meta"]
    # Without the new location: the data error says how to point the run at it.
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "old_place" in err and f"longtail train --resume --out {run} data.root=PATH" in err
    assert main(["train", "--resume", "--out", str(run), f"data.root={moved}", "--quiet"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == str(moved) and saved["meta"] == meta  # what it started on is kept
    assert "data.root moved: " in (run / "train.log").read_text()
    ref = train(build_config(tiny_raw(image_folder)), out=tmp_path / "ref", progress=False)
    assert_same_state(final_weights(ref), final_weights(run))


def test_resume_refuses_a_change_of_settings_and_other_data(interrupted_run, tmp_path, capsys):
    run, moved = interrupted_run
    assert main(["train", "--resume", "--out", str(run), "optim.lr=0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr cannot change (only where its files are can: data.root, " in err and "drop optim.lr=0.1" in err
    assert main(["train", "--resume", "--out", str(run), f"data.root={moved}", "seed=3", "--quiet"]) == 2
    assert "seed cannot change" in capsys.readouterr().err
    # Data with other class counts: not the run's data, whatever its path.
    shutil.rmtree(moved / "train" / "cat")
    shutil.copytree(moved / "train" / "bee", moved / "train" / "cat")
    with pytest.raises(DataError, match="class 2 had 3 training images then, 8 now"):
        train(out=run, resume=True, moved=[f"data.root={moved}"], progress=False)
    with pytest.raises(ValueError, match="moved file locations are for --resume"):
        train(build_config(tiny_raw(moved)), out=tmp_path / "new", moved=[f"data.root={moved}"], progress=False)
