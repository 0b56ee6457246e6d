"""GLT benchmarks: the released annotation format, the construction procedure, protocols end to end."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from longtail.cli import main
from longtail.config import DataConfig
from longtail.data import create_dataset
from longtail.data.base import DataError
from longtail.data.glt import read_glt_annotations
from longtail.data.glt_build import (
    attribute_groups,
    budget_shares,
    glt_splits,
    group_lists,
    heldout_shares,
    load_budgets,
)
from longtail.engine import train
from longtail.engine.build import build_config


def _released(tmp_path, with_test_lt=True):
    """A tiny file in the authors' layout: absolute paths under their machine's prefix."""
    images = make_image_folder(tmp_path / "imagenet", {"train": {"n01": 6, "n02": 4}})
    prefix = "/data4/imagenet/ILSVRC/Data/CLS-LOC"
    files = sorted((images / "train").rglob("*.png"))

    def split(sel):
        paths = [files[i] for i in sel]
        keys = [f"{prefix}/train/{p.parent.name}/{p.name}" for p in paths]
        return {"label": {k: int(p.parent.name == "n02") for k, p in zip(keys, paths, strict=True)},
                "frequency": {k: int(p.parent.name == "n02") * 2 for k, p in zip(keys, paths, strict=True)},
                "attribute": {k: i % 3 for i, k in enumerate(keys)}}

    ann = {"cat2id": {"n01": 0, "n02": 1}, "id2cat": {"0": "n01", "1": "n02"},
           "train": split([0, 1, 2, 6, 7]), "val": split([3]), "test_bl": split([4, 8]), "test_bbl": split([5, 9])}
    if with_test_lt:
        ann["test_lt"] = split([4, 5])
    path = tmp_path / "imagenet_sup_intra_lt_inter_lt.json"
    path.write_text(json.dumps(ann))
    return path, images, prefix


def test_reader_rewrites_the_authors_prefix_and_maps_splits(tmp_path):
    path, images, prefix = _released(tmp_path)
    for given in (prefix, None):  # explicit prefix, or found from the first path
        ann = read_glt_annotations(path, images, path_prefix=given)
        assert set(ann["splits"]) == {"train", "val", "test_lt", "test_cbl", "test_gbl"}
        train = ann["splits"]["train"]
        assert train.targets.tolist() == [0, 0, 0, 1, 1]
        assert train.attributes.tolist() == [0, 1, 2, 0, 1]
        assert all(p.startswith(str(images)) for p in train.paths)
        assert ann["class_names"] == ["n01", "n02"]
        assert ann["class_groups"].tolist() == [0, 2]  # from the file's frequency labels
        assert ann["protocols"] == {"CLT": "test_cbl", "GLT": "test_gbl"}
    with pytest.raises(DataError, match="path_prefix"):
        read_glt_annotations(path, images, path_prefix="/elsewhere")
    with pytest.raises(DataError, match="no tail of it exists"):
        read_glt_annotations(path, tmp_path / "empty_root_that_has_nothing")


def test_reader_cbl_file_is_alt_and_missing_files_are_named(tmp_path):
    path, images, _ = _released(tmp_path, with_test_lt=False)
    assert read_glt_annotations(path, images)["protocols"] == {"ALT": "test_gbl"}
    next((images / "train" / "n02").glob("*.png")).unlink()
    with pytest.raises(DataError, match="not found"):
        read_glt_annotations(path, images)


def _coco_released(tmp_path, variant="lt"):
    """A tiny MSCOCO-GLT annotation in exactly the layout ``_COCOGeneration/mscoco_glt_crop.py`` writes: per split
    one dict per field keyed by the object id (label, frequency, attribute, path, attribute_score, attribute_dist
    keyed by class id), top-level cat2id, id2cat (int keys, so strings in JSON) and an empty key2path; a split the
    generator skipped (test_lt of the Train-CBL file) holds empty fields and no attribute_dist. Crops are JPEGs
    named <object id>.jpg under the authors' machine prefix."""
    from torchvision.io import encode_jpeg

    out = tmp_path / "coco_glt" / ("coco_glt" if variant == "lt" else "coco_cbl")
    (out / "images").mkdir(parents=True)
    prefix = f"/data4/coco_glt/{out.name}/images"
    g = torch.Generator().manual_seed(0)
    cat2id = {"person": 0, "dog": 1, "bear": 2}
    sizes = {"train": [9, 5, 3], "val": [1, 1, 1], "test_lt": [2, 1, 1] if variant == "lt" else [0, 0, 0],
             "test_bl": [2, 2, 2], "test_bbl": [2, 2, 2]}
    ann = {"cat2id": cat2id, "id2cat": {str(i): c for c, i in cat2id.items()}, "key2path": {}}
    next_id = 1000
    for split, per_class in sizes.items():
        fields = {"label": {}, "frequency": {}, "attribute": {}, "path": {}, "attribute_score": {}}
        for c, n in enumerate(per_class):
            for _ in range(n):
                key = str(next_id)
                next_id += 7
                img = (torch.full((3, 20, 24), 60 * c + 20) + torch.randint(0, 30, (3, 20, 24), generator=g))
                (out / "images" / f"{key}.jpg").write_bytes(encode_jpeg(img.to(torch.uint8)).numpy().tobytes())
                fields["label"][key] = c
                fields["frequency"][key] = [0, 1, 2][c]
                fields["attribute"][key] = int(key) % 3
                fields["path"][key] = f"{prefix}/{key}.jpg"
                fields["attribute_score"][key] = 0.01 * (int(key) % 17)
        if fields["label"]:
            fields["attribute_dist"] = {str(c): [float(c + a) for a in range(204)] for c in range(3)}
        ann[split] = fields
    path = out / "annotation.json"
    path.write_text(json.dumps(ann))
    return path, out


def test_reader_reads_the_authors_mscoco_glt_layout_and_trains(tmp_path):
    path, root = _coco_released(tmp_path)
    ann = read_glt_annotations(path, root)  # root: the folder holding images/<id>.jpg
    assert set(ann["splits"]) == {"train", "val", "test_lt", "test_cbl", "test_gbl"}
    tr = ann["splits"]["train"]
    raw = json.loads(path.read_text())["train"]
    assert tr.targets.tolist() == list(raw["label"].values())  # in the file's order
    assert [p.rsplit("/", 1)[1] for p in tr.paths] == [f"{k}.jpg" for k in raw["label"]]  # ids -> their crops
    assert all(p.startswith(str(root / "images")) for p in tr.paths)
    assert tr.attributes.tolist() == list(raw["attribute"].values())
    assert ann["class_names"] == ["person", "dog", "bear"] and ann["class_groups"].tolist() == [0, 1, 2]
    assert ann["protocols"] == {"CLT": "test_cbl", "GLT": "test_gbl"}
    bl_path, bl_root = _coco_released(tmp_path, "cbl")
    assert read_glt_annotations(bl_path, bl_root)["protocols"] == {"ALT": "test_gbl"}  # empty test_lt: skipped
    # A label without its path is named, not silently taken as a file name.
    broken = json.loads(path.read_text())
    del broken["val"]["path"][next(iter(broken["val"]["label"]))]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="have no 'path'"):
        read_glt_annotations(tmp_path / "broken.json", root)
    # ... and trainable through the mscoco_glt dataset: CLT and GLT scored.
    raw_cfg = {"name": "c", "data": {"name": "mscoco_glt", "root": str(root), "annotation": str(path),
                                     "image_size": 16, "augment": "glt_coco", "num_workers": 0},
               "model": {"backbone": "tiny", "head_bias": False},
               "stages": [{"name": "main", "method": {"name": "ifl", "base": "ce"}, "epochs": 2, "batch_size": 8,
                           "optim": {"lr": 0.05}}], "eval": {"plots": False}}
    run = train(build_config(raw_cfg), out=tmp_path / "run", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["protocols"] == {"CLT": "test_cbl", "GLT": "test_gbl"}
    assert 0 <= m["splits"]["test_cbl"]["top1"] <= 100


def test_imagenet_glt_dataset_needs_its_annotation(tmp_path):
    with pytest.raises(DataError, match="data.options.annotation"):
        create_dataset(DataConfig(name="imagenet_glt", root=str(tmp_path)))
    path, images, _ = _released(tmp_path)
    ds = create_dataset(DataConfig(name="imagenet_glt", root=str(images), options={"annotation": str(path)}))
    assert ds.eval_splits == ["test_lt", "test_cbl", "test_gbl"] and ds.image_size == 112


def test_shares_and_attribute_groups():
    assert heldout_shares(60) == [42, 12, 6] and heldout_shares(30) == [21, 6, 3]  # Test-CBL, Train-CBL val
    assert heldout_shares(6) == [0, 0, 0]  # r_i * int(6 / 10): the reference's arithmetic, not a rounding of ours
    assert budget_shares(145) == [101, 29, 14]  # the BL file's 101/29/14
    assert budget_shares(1500) == [1050, 300, 150] and budget_shares(18) == [12, 3, 1]
    assert group_lists(torch.tensor([1, 0, 2, 0, 3, 5, 4, 1]).numpy(), 6, 3) == [[1, 3, 0, 7], [2, 4], [6, 5]]
    g = torch.Generator().manual_seed(0)
    # Six well separated blobs of sizes 30, 25, 12, 10, 5, 3: groups {30, 25} -> 0, {12, 10} -> 1, {5, 3} -> 2.
    sizes = [30, 25, 12, 10, 5, 3]
    feats = torch.cat([torch.randn(n, 4, generator=g) * 0.01 + 10 * i for i, n in enumerate(sizes)]).numpy()
    groups = attribute_groups(feats, clusters=6, groups=3, seed=0)
    expect = [0] * 55 + [1] * 22 + [2] * 8
    assert groups.tolist() == expect


def _reference_generation(cls_data: dict, budgets: list[int], inter: str, TEST_SIZE=20, VAL_SIZE=10) -> dict:
    """The split arithmetic of the authors' ``generate_train_val_test`` (imagenet_glt_generation.py), transcribed
    step by step on ``{class: {group: [items]}}``: the front pops exactly, the i.i.d. draws by their counts."""
    cls_data = {k: {g: list(v) for g, v in val.items()} for k, val in cls_data.items()}
    intra, num_att = [7, 2, 1], 3
    bbl, bl = {}, {}
    for key, val in cls_data.items():  # generate_balanced_test
        att_size = TEST_SIZE
        for c_val in val.values():
            att_size = min(att_size, len(c_val) // 4)
        for c_key, c_val in val.items():
            for _ in range(att_size):
                bbl[c_val.pop(0)] = (key, c_key)
    multi_weight = int(TEST_SIZE * num_att / sum(intra))  # generate_intra_lt_test
    for key, val in cls_data.items():
        for i, (c_key, c_val) in enumerate(val.items()):
            for _ in range(intra[i] * multi_weight):
                bl[c_val.pop(0)] = (key, c_key)
    sizes = [sum(len(c_val) for c_val in val.values()) for val in cls_data.values()]
    img_num_per_cls = budgets if inter == "lt" else [min(145, n) for n in sizes]  # predefined / bl
    att_dist = torch.FloatTensor(intra)
    for val, num_imgs in zip(cls_data.values(), img_num_per_cls, strict=True):  # get_long_tailed_data
        num_atts = ((att_dist / att_dist.sum()) * num_imgs).long().tolist()
        for att_idx, c_val in enumerate(val.values()):
            del c_val[min(num_atts[att_idx], len(c_val)):]
    out = {"test_bbl": bbl, "test_bl": bl}
    if inter == "lt":  # generate_iid_set twice: Test-GLT, then val
        out["pool"] = {x: (k, g) for k, val in cls_data.items() for g, c_val in val.items() for x in c_val}
        out["n_test_lt"], out["n_val"] = len(cls_data) * TEST_SIZE * num_att, len(cls_data) * VAL_SIZE * num_att
        return out
    multi_weight, val_set = int(VAL_SIZE * num_att / sum(intra)), {}
    for key, val in cls_data.items():
        for i, (c_key, c_val) in enumerate(val.items()):
            for _ in range(intra[i] * multi_weight):
                val_set[c_val.pop(0)] = (key, c_key)
    out["val"] = val_set
    out["train"] = {x: (k, g) for k, val in cls_data.items() for g, c_val in val.items() for x in c_val}
    return out


def test_glt_splits_match_the_reference_arithmetic_on_a_synthetic_pool():
    # 20 classes (rank order), groups shrinking with the rank: Test-GBL's |group| // 4 binds for the small classes,
    # the budgets exceed what the big classes' group 0 has, the last classes hold fewer than 145 images.
    cls_data = {c: {0: [f"{c}/0/{i}" for i in range(400 - 15 * c)], 1: [f"{c}/1/{i}" for i in range(110 - 4 * c)],
                    2: [f"{c}/2/{i}" for i in range(90 - 3 * c)]} for c in range(20)}
    budgets = [int(600 * 0.05 ** (c / 19)) for c in range(20)]
    pools = [[cls_data[c][g] for g in range(3)] for c in range(20)]
    ours = glt_splits(pools, budgets, rng=np.random.default_rng(0))
    assert ours["notes"] == []
    as_dict = lambda items: {x: (c, g) for c, x, g in items}  # noqa: E731
    ref_lt, ref_bl = (_reference_generation(cls_data, budgets, inter) for inter in ("lt", "bl"))
    for split in ("test_bbl", "test_bl"):  # shared by both files, the same items as the reference's front pops
        assert as_dict(ours[split]) == ref_lt[split] == ref_bl[split]
    gbl = Counter((c, g) for c, _, g in ours["test_bbl"])
    assert all(len({gbl[c, g] for g in range(3)}) == 1 for c in range(20))  # one Test-GBL size per class
    assert gbl[0, 0] == 20 and gbl[19, 0] == (90 - 57) // 4  # 20 per group, or what the smallest group allows
    # Train-GLT: the budgeted pool item for item; Test-GLT / val of exactly the reference's sizes, drawn from it.
    lt = ours["lt"]
    assert len(lt["test_lt"]) == ref_lt["n_test_lt"] == 1200 and len(lt["val"]) == ref_lt["n_val"] == 600
    assert as_dict(lt["train"] + lt["val"] + lt["test_lt"]) == ref_lt["pool"]
    assert len(lt["train"]) == len(ref_lt["pool"]) - 1800
    # Train-CBL: train and val item for item (min(145, n) per class, val 21/6/3 from the front).
    assert as_dict(ours["cbl"]["train"]) == ref_bl["train"] and as_dict(ours["cbl"]["val"]) == ref_bl["val"]
    assert Counter(c for c, _, _ in ours["cbl"]["train"] + ours["cbl"]["val"])[0] == 144  # 101 + 29 + 14
    # select=random: the same sizes, other images; too small a pool for Test-GLT + val: both scaled to half of it.
    rnd = glt_splits(pools, budgets, select="random", rng=np.random.default_rng(0))
    assert {k: len(rnd["lt"][k]) for k in lt} == {k: len(lt[k]) for k in lt}
    assert len(rnd["test_bbl"]) == len(ours["test_bbl"]) and as_dict(rnd["test_bbl"]) != as_dict(ours["test_bbl"])
    small = glt_splits(pools, [30] * 20)
    assert len(small["lt"]["test_lt"]) + len(small["lt"]["val"]) <= len(small["lt"]["train"]) + 1
    assert any("reduced" in n for n in small["notes"])
    with pytest.raises(DataError, match="one per class"):
        glt_splits(pools, budgets[:-1])
    with pytest.raises(DataError, match="multiple of 30"):
        glt_splits(pools, budgets, test_per_class=6)


def test_budgets_file_formats(tmp_path):
    profile = [1500, 1500, 646, 18]
    torch.save(profile, tmp_path / "long-tail-distribution.pytorch")  # the reference's format: a saved list
    (tmp_path / "b.json").write_text(json.dumps(profile))
    (tmp_path / "b.txt").write_text("1500\n1500, 646\n18\n")
    for name in ("long-tail-distribution.pytorch", "b.json", "b.txt"):
        assert load_budgets(tmp_path / name) == profile
    (tmp_path / "up.json").write_text("[10, 20]")
    with pytest.raises(DataError, match="must not increase"):
        load_budgets(tmp_path / "up.json")
    with pytest.raises(DataError, match="no such file"):
        load_budgets(tmp_path / "none.json")


def test_build_glt_end_to_end_with_a_tiny_backbone(tmp_path, capsys):
    counts = {"a": 160, "b": 120, "c": 100, "d": 90}
    root = make_image_folder(tmp_path / "mine", {"train": counts}) / "train"
    args = ["data", "glt", str(root), "--out", str(tmp_path / "glt"), "--backbone", "tiny", "--image-size", "16",
            "--test-per-class", "30", "--val-per-class", "30",
            "--imbalance-ratio", "3", "--num-workers", "0", "--seed", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 classes" in printed and "data.options.annotation=" in printed
    lt_file = tmp_path / "glt" / "glt_intra_lt_inter_lt.json"
    lt = json.loads(lt_file.read_text())
    all_paths = [p for s in ("train", "val", "test_lt", "test_bl", "test_bbl") for p in lt[s]["label"]]
    assert len(all_paths) == len(set(all_paths))  # the splits are disjoint
    assert lt["cat2id"] == {"a": 0, "b": 1, "c": 2, "d": 3}  # re-indexed by count, descending
    gbl = torch.tensor([[list(lt["test_bbl"]["attribute"].values()).count(g)] for g in range(3)]).flatten()
    assert (gbl > 0).all()  # Test-GBL draws from every attribute group
    bl = json.loads((tmp_path / "glt" / "glt_intra_lt_inter_bl.json").read_text())
    assert bl["test_bbl"] == lt["test_bbl"] and "test_lt" not in bl
    # Deterministic for a seed (features cached; k-means and draws seeded).
    assert main(args) == 0
    assert json.loads(lt_file.read_text()) == lt
    assert lt["meta"]["normalize"] is False and lt["meta"]["select"] == "front"  # the reference's defaults
    # --budgets: the reference's profile format (a torch.save'd list, largest class first) sets Train-GLT.
    torch.save([40, 30, 20, 10], tmp_path / "profile.pytorch")
    assert main([*args, "--name", "b", "--budgets", str(tmp_path / "profile.pytorch")]) == 0
    b = json.loads((tmp_path / "glt" / "b_intra_lt_inter_lt.json").read_text())
    per_class = Counter(c for s in ("train", "val", "test_lt") for c in b[s]["label"].values())
    assert [per_class[c] for c in range(2)] == [sum(budget_shares(n)) for n in (40, 30)]
    assert all(per_class[c] <= n for c, n in enumerate([40, 30, 20, 10]))  # smaller where a group has too few
    assert b["test_bbl"] == lt["test_bbl"] and b["meta"]["budgets"].endswith("profile.pytorch")
    # ... and trainable: protocols CLT / GLT in metrics.json and the table.
    raw = {"name": "g", "data": {"name": "glt", "root": str(root), "annotation": str(lt_file), "image_size": 16,
                                 "in_memory": "always", "augment": "cifar"},
           "model": {"backbone": "tiny"},
           "stages": [{"name": "main", "method": "ifl", "epochs": 2, "batch_size": 8, "optim": {"lr": 0.05}}]}
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["protocols"] == {"CLT": "test_cbl", "GLT": "test_gbl"}
    assert m["splits"]["test_gbl"]["protocols"] == ["GLT"]
    assert set(m["splits"]["test_gbl"]["per_attribute"]) == {"0", "1", "2"}
    assert m["thresholds"].startswith("the benchmark's class-rank groups")


def test_evaluate_protocol_api_and_cli(tmp_path, capsys):
    import longtail

    raw = {"name": "s", "data": {"name": "shapes_glt", "max_per_class": 40, "imbalance_ratio": 10},
           "model": {"backbone": "tiny"},
           "stages": [{"name": "main", "method": "ce", "epochs": 1, "batch_size": 32, "optim": {"lr": 0.05}}],
           "eval": {"plots": False}}
    run = train(build_config(raw), out=tmp_path / "lt", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    glt = longtail.evaluate_protocol(run, "glt")
    assert glt["top1"] == m["splits"]["test_gbl"]["top1"] and glt["protocols"] == ["GLT"]
    with pytest.raises(ValueError, match="Train-CBL"):
        longtail.evaluate_protocol(run, "ALT")
    assert main(["eval", str(run), "--protocol", "CLT", "--no-write"]) == 0
    assert "test_cbl (CLT)" in capsys.readouterr().out
    assert main(["eval", str(run), "--protocol", "XLT", "--no-write"]) == 2


def test_posthoc_logit_adjustment_is_a_no_op_under_alt():
    """Spec glt_ifl.md 9.2: with Train-CBL's uniform class prior, post-hoc LA predicts exactly as CE."""
    from longtail.config import ModelConfig
    from longtail.methods import MethodContext, create_method
    from longtail.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="tiny"), 4)
    ctx = MethodContext(num_classes=4, train_counts=torch.full((4,), 37), epochs=1, steps_per_epoch=1,
                        device=torch.device("cpu"))
    la = create_method({"name": "logit_adjust_posthoc", "tau": 1.0}, model, ctx).eval()
    feats = torch.randn(64, model.feature_dim)
    assert torch.equal(la.predict_features(feats).argmax(1), model.forward_head(feats).argmax(1))
    skewed = create_method({"name": "logit_adjust_posthoc", "tau": 1.0}, model,
                           MethodContext(num_classes=4, train_counts=torch.tensor([1000, 100, 10, 1]), epochs=1,
                                         steps_per_epoch=1, device=torch.device("cpu"))).eval()
    assert not torch.equal(skewed.predict_features(feats).argmax(1), model.forward_head(feats).argmax(1))


# ----------------------------------------------------------------------------- MSCOCO-GLT construction


def _tiny_coco(tmp_path):
    """COCO 2014 in its own format (annotations/instances_{train,val}2014.json, train2014/, val2014/) with 4
    attributed classes of 40 / 30 / 24 / 20 objects, and COCO-Attributes in its authors' documented layout
    (genp/cocottributes DATA.md: ann_vecs by patch id, patch_id_to_ann_id, attributes [{id, name}], split), pickled
    with joblib as their .jbl. Each image is one flat colour, so a crop's pixels tell where it came from."""
    import joblib
    from torchvision.io import encode_jpeg

    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 23, "name": "bear"},
            {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}]  # toothbrush: no attributed object
    counts = {1: 40, 18: 30, 23: 24, 5: 20}
    ann_id, patch, vecs, to_ann, split_of, colours = 100, 5000, {}, {}, {}, {}
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(3):
            img_id = len(colours) + 1
            name = f"COCO_{split}_{img_id:012d}.jpg"
            colours[img_id] = (40 + 60 * i, 200 - 50 * i, 90 + 70 * (split == "val2014"))
            pixels = torch.tensor(colours[img_id], dtype=torch.uint8).view(3, 1, 1).expand(3, 240, 320).contiguous()
            (root / split / name).write_bytes(encode_jpeg(pixels, quality=95).numpy().tobytes())
            images.append({"id": img_id, "file_name": name, "width": 320, "height": 240})
        for cat, n in counts.items():
            for _ in range(n // 2):
                img = images[int(rng.integers(3))]
                w, h = (float(rng.integers(10, 90)), float(rng.integers(10, 90))) if rng.random() < 0.5 else \
                       (float(rng.integers(100, 200)), float(rng.integers(100, 140)))
                x, y = float(rng.integers(0, 320 - int(w))), float(rng.integers(0, 240 - int(h)))
                anns.append({"id": ann_id, "image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
                votes = rng.random(12) * (rng.random() > 0.1)  # one object in ten without any positive attribute
                vecs[patch], to_ann[patch], split_of[patch] = votes, ann_id, split
                ann_id, patch = ann_id + 1, patch + 3
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    attrs = {"ann_vecs": vecs, "patch_id_to_ann_id": to_ann, "split": split_of,
             "attributes": [{"id": j, "name": f"attr{j}"} for j in reversed(range(12))]}
    joblib.dump(attrs, tmp_path / "cocottributes_py3.jbl", compress=True)
    plain = {str(to_ann[p]): v.tolist() for p, v in vecs.items()}  # the undocumented fallback: annotation id -> votes
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    return root, tmp_path / "cocottributes_py3.jbl", attrs, colours


def _reference_balanced_test(c_val: dict, size: int) -> list:
    """The reference's generate_balanced_test for one class, transcribed (a dict of key -> votes, in order)."""
    c_val, out = dict(c_val), []
    test_dist = np.array([0.0 for _ in range(len(next(iter(c_val.values()))))])
    for _ in range(size):
        min_std, min_key, min_val = 999999999.9, None, None
        for key, val in c_val.items():
            val = (val > 0.5).astype(np.float32)
            if val.sum() == 0:
                continue
            tmp = test_dist + val
            if (tmp / (tmp.sum() + 1e-9)).std() < min_std:
                min_std, min_key, min_val = (tmp / (tmp.sum() + 1e-9)).std(), key, val
        out.append(min_key)
        test_dist += min_val
        del c_val[min_key]
    return out


def test_coco_glt_builds_the_authors_procedure_end_to_end(tmp_path, capsys):
    from PIL import Image

    from longtail.data.coco_glt_build import crop_box, load_coco_instances

    coco, attr_file, attrs, colours = _tiny_coco(tmp_path)
    out = tmp_path / "coco_glt"
    args = ["data", "coco-glt", str(coco), str(attr_file), "--out", str(out), "--test-per-class", "4",
            "--val-per-class", "2", "--imbalance-factor", "0.5"]
    assert main(args) == 0
    assert "4 classes" in capsys.readouterr().out
    lt = json.loads((out / "coco_intra_lt_inter_lt" / "annotation.json").read_text())
    bl = json.loads((out / "coco_intra_lt_inter_bl" / "annotation.json").read_text())
    # The crop script's layout: every field keyed by object id (the COCO-Attributes patch id), key2path empty.
    assert set(lt) == {"cat2id", "id2cat", "key2path", "train", "val", "test_lt", "test_bl", "test_bbl", "meta"}
    assert lt["key2path"] == {} and lt["cat2id"] == {"person": 0, "dog": 1, "bear": 2, "airplane": 3}
    fields = {"label", "frequency", "attribute", "path", "attribute_score", "attribute_dist"}
    assert all(set(lt[s]) == fields for s in ("train", "val", "test_lt", "test_bl", "test_bbl"))
    assert bl["test_lt"] == {"label": {}, "frequency": {}, "attribute": {}, "path": {}, "attribute_score": {}}
    sizes = lambda d: {s: len(d[s]["label"]) for s in ("train", "val", "test_lt", "test_bl", "test_bbl")}  # noqa: E731
    # Train-GLT: N = 4; left 32/22/16/12 -> min(int(32 * 0.5^(i/3)), n_i) = 32/22/16/12 -> 82, Test-GLT 16, val 8.
    assert sizes(lt) == {"train": 58, "val": 8, "test_lt": 16, "test_bl": 16, "test_bbl": 16}
    # Train-CBL: N = 2; left 36/26/20/16 -> 16 per class, val 4 from it.
    assert sizes(bl) == {"train": 60, "val": 4, "test_lt": 0, "test_bl": 8, "test_bbl": 8}
    keys = [set(lt[s]["label"]) for s in ("train", "val", "test_lt", "test_bl", "test_bbl")]
    assert sum(map(len, keys)) == len(set().union(*keys))  # disjoint
    assert {lt["train"]["label"][k]: f for k, f in lt["train"]["frequency"].items()} == {0: 0, 1: 0, 2: 1, 3: 2}
    # Test-GBL item for item as the reference's greedy minimum-std loop over each class's objects in file order.
    cat_of = {1: 0, 18: 1, 23: 2, 5: 3}
    anns = {a["id"]: a for s in ("train", "val") for a in json.loads(
        (coco / "annotations" / f"instances_{s}2014.json").read_text())["annotations"]}
    for c in range(4):
        c_val = {str(p): v for p, v in attrs["ann_vecs"].items()
                 if cat_of[anns[attrs["patch_id_to_ann_id"][p]]["category_id"]] == c}
        ours = [k for k, lab in lt["test_bbl"]["label"].items() if lab == c]
        assert ours == _reference_balanced_test(c_val, 4)
    # Attribute groups: terciles of the frequent-attribute score within the split.
    score, group = lt["test_bl"]["attribute_score"], lt["test_bl"]["attribute"]
    ranked = sorted(score.values(), reverse=True)
    assert all(group[k] == (0 if s > ranked[5] else 1 if s > ranked[10] else 2) for k, s in score.items())
    # Crops: the widened box, padded to a square with black, cut from the right image.
    padded, large = 0, 0
    for key in list(lt["test_bbl"]["label"])[:12]:
        ann = anns[attrs["patch_id_to_ann_id"][int(key)]]
        x1, y1, x2, y2 = crop_box(ann["bbox"], 320, 240)
        large += ann["bbox"][2] >= 100
        with Image.open(out / lt["test_bbl"]["path"][key]) as im:
            crop = np.asarray(im.convert("RGB")).astype(float)
        assert abs(crop.shape[0] - crop.shape[1]) <= 1 and abs(max(crop.shape[:2]) - max(x2 - x1, y2 - y1)) <= 2
        centre = crop[crop.shape[0] // 2, crop.shape[1] // 2]
        assert np.abs(centre - colours[ann["image_id"]]).max() < 12
        if abs((x2 - x1) - (y2 - y1)) > 8:  # padded: the first row or column is black
            edge = crop[0] if (x2 - x1) > (y2 - y1) else crop[:, 0]
            assert edge.mean() < 12
            padded += 1
    assert padded and large  # both kinds of box and the padding were looked at
    # Deterministic for a seed (annotations and crop bytes); another seed draws other objects.
    assert main([*args[:5], str(tmp_path / "again"), *args[6:]]) == 0
    assert json.loads((tmp_path / "again" / "coco_intra_lt_inter_lt" / "annotation.json").read_text()) == lt
    some = next(iter(lt["train"]["path"].values()))
    assert (tmp_path / "again" / some).read_bytes() == (out / some).read_bytes()
    assert main([*args[:5], str(tmp_path / "seed7"), *args[6:], "--seed", "7", "--no-crops"]) == 0
    other = json.loads((tmp_path / "seed7" / "coco_intra_lt_inter_lt" / "annotation.json").read_text())
    assert other["test_bl"]["label"] != lt["test_bl"]["label"]
    assert other["test_bbl"]["label"] == lt["test_bbl"]["label"]  # the greedy Test-GBL draws nothing at random
    assert not (tmp_path / "seed7" / "images").exists()
    # The plain JSON {annotation id: votes} fallback gives the same benchmark, keyed by annotation id.
    assert main(["data", "coco-glt", str(coco), str(tmp_path / "plain.json"), "--out", str(tmp_path / "plain"),
                 *args[6:], "--no-crops"]) == 0
    plain = json.loads((tmp_path / "plain" / "coco_intra_lt_inter_lt" / "annotation.json").read_text())
    assert sizes(plain) == sizes(lt)
    patch_to_ann = attrs["patch_id_to_ann_id"]
    assert set(plain["test_bbl"]["label"]) == {str(patch_to_ann[int(k)]) for k in lt["test_bbl"]["label"]}
    # ... and the mscoco_glt dataset trains on it: CLT / GLT from the Train-GLT file.
    raw = {"name": "c", "data": {"name": "mscoco_glt", "root": str(out), "image_size": 16, "num_workers": 0,
                                 "annotation": str(out / "coco_intra_lt_inter_lt" / "annotation.json")},
           "model": {"backbone": "tiny", "head_bias": False},
           "stages": [{"name": "main", "method": "ce", "epochs": 1, "batch_size": 16, "optim": {"lr": 0.05}}],
           "eval": {"plots": False}}
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    assert json.loads((run / "metrics.json").read_text())["protocols"] == {"CLT": "test_cbl", "GLT": "test_gbl"}
    with pytest.raises(DataError, match="instances_train2014"):
        load_coco_instances(tmp_path)
    assert main(["data", "coco-glt", str(tmp_path), str(attr_file), "--out", str(tmp_path / "x")]) == 2
