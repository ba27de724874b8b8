"""Point-labelled and CellViT++-format adapters: CRCHisto (real), CellViT++ folders (NuCLS + synthetic)."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.io.datasets import CellViTDataset, CRCHisto, open_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


# ----------------------------------------------------------------------------------------------- CRCHisto
@needs_shared
def test_crchisto_splits_counts_and_one_based_conversion():
    root = SHARED / "crchisto"
    train, val = CRCHisto(root, "train"), CRCHisto(root, "validation")
    assert (len(train), len(val), len(CRCHisto(root, "all"))) == (70, 10, 80)
    assert train.class_names == ("epithelial", "fibroblast", "inflammatory", "others")
    assert train.mpp == 0.55 and train.ids[:2] == ["crchisto/train/img1", "crchisto/train/img2"]
    s = train[0]
    assert s.image.shape == (500, 500, 3) and s.inst_map is None and s.type_map is None
    with (root / "points_classified.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["image"] == "img1"]
    assert len(s.points) == len(rows) == 20
    np.testing.assert_allclose(s.points[0], [float(rows[0]["x"]) - 1, float(rows[0]["y"]) - 1])
    assert s.point_labels[0] == 2  # fibroblast
    total = sum(len(x.points) for x in train) + sum(len(x.points) for x in val)
    assert total == 17801  # every classified point of the README
    with pytest.raises(ValueError, match=r"unknown split 'test'; available: all, train, validation"):
        CRCHisto(root, "test")


@needs_shared
def test_crchisto_border_points_clipped_and_far_points_rejected(tmp_path):
    root = SHARED / "crchisto"
    s = CRCHisto(root, "train")[CRCHisto(root, "train").ids.index("crchisto/train/img13")]
    assert s.points.min() >= -0.5  # img13 has one point at x = 0.27 (1-based): clipped onto the edge
    (tmp_path / "images").mkdir()
    shutil.copy(root / "images" / "img1.png", tmp_path / "images" / "img1.png")
    (tmp_path / "points_classified.csv").write_text("image,class,x,y\nimg1,others,10,510\n")
    with pytest.raises(ValueError, match=r"img1\.png: 1 labelled points fall outside the 500x500 image"):
        CRCHisto(tmp_path, "all")[0]
    (tmp_path / "points_classified.csv").write_text("image,class,x,y\nimg1,stroma,10,10\n")
    with pytest.raises(ValueError, match="class 'stroma' is not one of"):
        CRCHisto(tmp_path, "all")


@needs_shared
def test_crchisto_mat_labels_match_csv(tmp_path):
    root = SHARED / "crchisto"
    (tmp_path / "images").mkdir()
    shutil.copy(root / "images" / "img1.png", tmp_path / "images" / "img1.png")
    shutil.copytree(root / "labels_mat" / "img1", tmp_path / "labels_mat" / "img1")
    from_mat = CRCHisto(tmp_path, "all")[0]
    from_csv = CRCHisto(root, "all")[0]
    order_m = np.lexsort((from_mat.points[:, 1], from_mat.points[:, 0]))
    order_c = np.lexsort((from_csv.points[:, 1], from_csv.points[:, 0]))
    np.testing.assert_allclose(
        from_mat.points[order_m], from_csv.points[order_c], atol=0.006
    )  # CSV has 2 decimals
    np.testing.assert_array_equal(from_mat.point_labels[order_m], from_csv.point_labels[order_c])


# --------------------------------------------------------------------------------------- CellViT++ folders
@needs_shared
def test_cellvit_nucls_segmentation_and_detection():
    root = SHARED / "nucls_sample"
    seg = open_dataset("cellvit", root, "train")
    assert seg.task == "segmentation" and len(seg) == 10 and seg.class_names == ("Non-Tumor", "Tumor")
    s = seg[0]
    z = np.load(root / "train" / "labels_seg" / "train_1.npz")
    np.testing.assert_array_equal(s.inst_map, z["inst_map"])
    np.testing.assert_array_equal(s.type_map, z["type_map"])
    assert s.image.shape == (260, 288, 3) and len(s.points) == len(np.unique(z["inst_map"])) - 1

    det = open_dataset("cellvit", root, "val", fold=0, task="detection")
    assert det.ids == ["cellvit/fold0-val/train_8", "cellvit/fold0-val/train_9", "cellvit/fold0-val/train_10"]
    assert det.class_names == ("tumor_any", "nonTIL_stromal", "sTIL", "other_nucleus")
    d = det[0]
    raw = np.loadtxt(root / "train" / "labels_det" / "train_8.csv", delimiter=",", ndmin=2)
    np.testing.assert_allclose(d.points, raw[:, :2])
    np.testing.assert_array_equal(d.point_labels, raw[:, 2].astype(int) + 1)  # 0-based file labels -> 1..C
    assert len(open_dataset("cellvit", root, "train", fold=2)) == 6
    assert len(open_dataset("cellvit", root, "test")) == 5
    with pytest.raises(ValueError, match="needs a fold"):
        open_dataset("cellvit", root, "val")
    with pytest.raises(FileNotFoundError, match="fold_7"):
        open_dataset("cellvit", root, "val", fold=7)


def _write_cellvit(tmp_path, n=3, seg=True):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir()
        for k in range(1, n + 1):
            name = f"{split}_{k}"
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(
                tmp_path / split / "images" / f"{name}.png"
            )
            inst = np.zeros((32, 40), np.int32)
            inst[2:8, 3:9] = 1
            inst[20:26, 30:36] = 2
            types = np.where(inst == 1, 1, np.where(inst == 2, 3, 0)).astype(np.int32)
            if seg:
                np.save(tmp_path / split / "labels" / f"{name}.npy", {"inst_map": inst, "type_map": types})
            else:
                (tmp_path / split / "labels" / f"{name}.csv").write_text("5,4,0\n32,22,2\n")
    (tmp_path / "splits" / "fold_0").mkdir(parents=True)
    (tmp_path / "splits" / "fold_0" / "train.csv").write_text("train_1\ntrain_2\n")
    (tmp_path / "splits" / "fold_0" / "val.csv").write_text("train_3\n")
    (tmp_path / "label_map.yaml").write_text(
        ("1: a\n2: b\n3: c\n" if seg else "0: a\n1: b\n2: c\n"),
    )


def test_cellvit_pickled_npy_dicts(tmp_path):
    _write_cellvit(tmp_path, seg=True)
    ds = CellViTDataset(tmp_path, "val", fold=0)
    assert ds.task == "segmentation" and ds.class_names == ("a", "b", "c") and len(ds) == 1
    s = ds[0]
    assert s.inst_map.max() == 2 and set(np.unique(s.type_map)) == {0, 1, 3}
    np.testing.assert_allclose(s.points, [[5.5, 4.5], [32.5, 22.5]])
    assert s.point_labels.tolist() == [1, 3]
    with pytest.raises(ValueError, match="unknown split 'validation'; available: train, test, val"):
        CellViTDataset(tmp_path, "validation")


def test_cellvit_detection_csv_and_bad_labels(tmp_path):
    _write_cellvit(tmp_path, seg=False)
    ds = CellViTDataset(tmp_path, "test")
    assert ds.task == "detection"
    s = ds[0]
    np.testing.assert_allclose(s.points, [[5, 4], [32, 22]])
    assert s.point_labels.tolist() == [1, 3]
    (tmp_path / "test" / "labels" / "test_2.csv").write_text("x,y,label\n1,2,5\n")  # header + class 6 of 3
    with pytest.raises(ValueError, match=r"test_2\.csv: class ids \[6\] outside the declared range 1\.\.3"):
        ds[1]
    (tmp_path / "test" / "labels" / "test_3.csv").write_text("1,2,0.5\n")
    with pytest.raises(ValueError, match=r"test_3\.csv:1: label '0\.5' is not an integer"):
        ds[2]


def test_cellvit_missing_label_map_and_labels(tmp_path):
    _write_cellvit(tmp_path, seg=True)
    (tmp_path / "label_map.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="pass class_names="):
        CellViTDataset(tmp_path, "train")
    assert CellViTDataset(tmp_path, "train", class_names=["x", "y", "z"]).class_names == ("x", "y", "z")
    (tmp_path / "train" / "labels" / "train_2.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no label file train_2"):
        CellViTDataset(tmp_path, "train", class_names=["x", "y", "z"])
