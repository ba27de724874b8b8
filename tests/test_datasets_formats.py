"""Adapters for datasets not staged here (CoNSeP, PanNuke, Lizard, SegPath, generic folder).

Tested on small files written by the test in each dataset's published layout.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from cytoken.io.datasets import DATASETS, open_dataset, pannuke_maps

RNG = np.random.default_rng(0)


def _img(h, w):
    return RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _two_cells(h=40, w=48):
    inst = np.zeros((h, w), np.int32)
    inst[2:10, 3:11] = 1  # centroid (6.5, 5.5)
    inst[20:30, 30:40] = 2  # centroid (34.5, 24.5)
    return inst


def test_all_adapters_registered():
    assert DATASETS.names() == sorted(
        [
            "cellvit",
            "consep",
            "consep_patched",
            "crchisto",
            "folder",
            "lizard",
            "qupath",
            "monuseg",
            "pannuke",
            "segpath",
        ]
    )


# ----------------------------------------------------------------------------------------------- CoNSeP
def _write_consep(root: Path):
    for split, n in (("Train", 2), ("Test", 1)):
        (root / split / "Images").mkdir(parents=True)
        (root / split / "Labels").mkdir()
        for k in range(1, n + 1):
            rgba = np.dstack([_img(40, 48), np.full((40, 48), 255, np.uint8)])  # CoNSeP PNGs are RGBA
            Image.fromarray(rgba).save(root / split / "Images" / f"{split.lower()}_{k}.png")
            inst = _two_cells()
            types = np.where(inst == 1, 4, np.where(inst == 2, 7, 0))
            savemat(
                root / split / "Labels" / f"{split.lower()}_{k}.mat",
                {
                    "inst_map": inst.astype(np.float64),  # MATLAB doubles, as published
                    "type_map": types.astype(np.float64),
                    "inst_type": np.array([[4.0], [7.0]]),
                    "inst_centroid": np.array([[7.5, 6.5], [35.5, 25.5]]),
                },
            )


def test_consep_original_layout_and_class_merge(tmp_path):
    _write_consep(tmp_path)
    ds = open_dataset("consep", tmp_path, split="Train")
    assert len(ds) == 2 and ds.split == "train" and ds.ids[0] == "consep/train/train_1"
    s = ds[0]
    assert s.image.shape == (40, 48, 3) and s.inst_map.dtype == np.int32 and s.mpp == 0.25
    assert s.type_map[5, 5] == 3 and s.type_map[25, 35] == 4  # 4 dysplastic epi -> 3, 7 endothelial -> 4
    np.testing.assert_allclose(s.points, [[6.5, 5.5], [34.5, 24.5]])
    assert s.point_labels.tolist() == [3, 4]
    raw = open_dataset("consep", tmp_path, split="test", merge_classes=False)
    assert len(raw.class_names) == 7 and raw[0].type_map[25, 35] == 7
    with pytest.raises(ValueError, match="unknown split 'val'"):
        open_dataset("consep", tmp_path, split="val")


def test_consep_errors_name_the_file(tmp_path):
    _write_consep(tmp_path)
    bad = tmp_path / "Train" / "Labels" / "train_2.mat"
    savemat(bad, {"inst_map": _two_cells() + 0.5, "type_map": np.zeros((40, 48))})
    with pytest.raises(ValueError, match=r"train_2\.mat: inst_map holds non-integer values"):
        open_dataset("consep", tmp_path)[1]
    savemat(bad, {"inst_map": _two_cells()[:, :40], "type_map": np.zeros((40, 40))})
    with pytest.raises(ValueError, match=r"train_2\.mat: inst_map is 40x40 \(WxH\) but its image is 48x40"):
        open_dataset("consep", tmp_path)[1]
    savemat(bad, {"inst_map": _two_cells(), "type_map": np.full((40, 48), 9)})
    with pytest.raises(ValueError, match=r"train_2\.mat: class ids \[9\] outside the declared range 0\.\.7"):
        open_dataset("consep", tmp_path)[1]
    savemat(bad, {"inst_map": _two_cells()})
    with pytest.raises(ValueError, match=r"train_2\.mat: missing variables \['type_map'\]"):
        open_dataset("consep", tmp_path)[1]
    (tmp_path / "Test" / "Labels" / "test_1.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_1\.mat"):
        open_dataset("consep", tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="no split found"):
        open_dataset("consep", tmp_path / "Train")


# ----------------------------------------------------------------------------------------------- PanNuke
def _pannuke_arrays(n=3):
    images = RNG.integers(0, 255, (n, 32, 32, 3)).astype(np.float64)  # the official files are float64
    masks = np.zeros((n, 32, 32, 6), np.float64)
    masks[:, 2:6, 2:6, 0] = 1  # neoplastic id 1
    masks[:, 10:14, 10:14, 0] = 7  # neoplastic id 7
    masks[:, 20:24, 20:24, 1] = 1  # inflammatory id 1: same id as a neoplastic cell
    masks[:, 26:30, 2:6, 4] = 3  # epithelial id 3
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(np.float64)
    types = np.array(["Breast", "Colon", "Lung"][:n])
    return images, masks, types


@pytest.mark.parametrize("layout", ["official", "flat"])
def test_pannuke_layouts_memmap_and_unique_ids(tmp_path, layout):
    images, masks, types = _pannuke_arrays()
    if layout == "official":
        img_dir = tmp_path / "Fold 2" / "images" / "fold2"
        mask_dir = tmp_path / "Fold 2" / "masks" / "fold2"
    else:
        img_dir = mask_dir = tmp_path / "fold2"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    np.save(img_dir / "images.npy", images)
    np.save(img_dir / "types.npy", types)
    np.save(mask_dir / "masks.npy", masks)
    for split in ("fold2", "2", "Fold 2"):
        ds = open_dataset("pannuke", tmp_path, split=split)
        assert ds.split == "fold2" and len(ds) == 3
    assert isinstance(ds._images, np.memmap) and isinstance(ds._masks, np.memmap)  # never loaded whole
    blob = pickle.dumps(ds)  # DataLoader workers (spawn) get the paths, not the arrays
    assert len(blob) < images.nbytes / 4
    np.testing.assert_array_equal(pickle.loads(blob)[2].inst_map, ds[2].inst_map)
    s = ds[1]
    assert s.image.dtype == np.uint8 and s.tissue == "Colon" and s.source_id == "pannuke/fold2/1"
    np.testing.assert_array_equal(s.image, images[1].astype(np.uint8))
    assert sorted(np.unique(s.inst_map).tolist()) == [0, 1, 2, 3, 4]  # 4 distinct cells, ids unique
    assert s.type_map[3, 3] == 1 and s.type_map[21, 21] == 2 and s.type_map[27, 3] == 5
    assert s.inst_map[3, 3] != s.inst_map[21, 21]
    assert sorted(s.point_labels.tolist()) == [1, 1, 2, 5]
    with pytest.raises(ValueError, match="unknown split 'fold1'; available: fold2"):
        open_dataset("pannuke", tmp_path, split="fold1")


def test_pannuke_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no split found"):
        open_dataset("pannuke", tmp_path)
    images, masks, _ = _pannuke_arrays()
    (tmp_path / "fold1").mkdir()
    np.save(tmp_path / "fold1" / "images.npy", images)
    np.save(tmp_path / "fold1" / "masks.npy", masks[:2])
    with pytest.raises(ValueError, match=r"masks\.npy: masks shape \(2, 32, 32\) does not match"):
        open_dataset("pannuke", tmp_path)
    with pytest.raises(ValueError, match=r"must be \(H, W, 6\)"):
        pannuke_maps(np.zeros((4, 4, 3)))


# ----------------------------------------------------------------------------------------------- Lizard
def _write_lizard(root: Path):
    img1 = root / "lizard_images1" / "Lizard_Images1"
    img2 = root / "lizard_images2" / "Lizard_Images2"
    labels = root / "lizard_labels" / "Lizard_Labels" / "Labels"
    for d in (img1, img2, labels):
        d.mkdir(parents=True)
    rows = [("consep_1", "consep", 1), ("glas_2", "glas", 2), ("crag_3", "crag", 1)]
    for name, _, _ in rows:
        folder = img1 if name.startswith("consep") else img2
        Image.fromarray(_img(40, 48)).save(folder / f"{name}.png")
        inst = _two_cells()
        inst[inst == 2] = 5  # ids need not be consecutive
        savemat(
            labels / f"{name}.mat",
            {
                "inst_map": inst,
                "id": np.array([[5], [1]]),  # listed in a different order than the ids
                "class": np.array([[6], [3]]),
                "bbox": np.array([[20, 30, 30, 40], [2, 10, 3, 11]]),
                "centroid": np.array([[34.5, 24.5], [6.5, 5.5]]),
            },
        )
    text = "Filename,Source,Split\n" + "".join(f"{n},{s},{k}\n" for n, s, k in rows)
    (root / "lizard_labels" / "Lizard_Labels" / "info.csv").write_text(text)


def test_lizard_layout_splits_and_classes(tmp_path):
    _write_lizard(tmp_path)
    all_ = open_dataset("lizard", tmp_path)
    assert all_.split == "all" and len(all_) == 3 and all_.mpp == 0.5
    fold1 = open_dataset("lizard", tmp_path, split="fold1")
    assert fold1.ids == ["lizard/fold1/consep_1", "lizard/fold1/crag_3"]
    assert len(open_dataset("lizard", tmp_path, split="2")) == 1
    s = fold1[0]
    assert s.type_map[5, 5] == 3 and s.type_map[25, 35] == 6 and s.tissue == "colon"
    assert s.class_names[2] == "lymphocyte" and s.class_names[5] == "connective"
    np.testing.assert_allclose(s.points, [[6.5, 5.5], [34.5, 24.5]])
    assert s.point_labels.tolist() == [3, 6]
    with pytest.raises(ValueError, match="available: all, fold1, fold2"):
        open_dataset("lizard", tmp_path, split="fold3")


def test_lizard_class_errors(tmp_path):
    _write_lizard(tmp_path)
    path = tmp_path / "lizard_labels" / "Lizard_Labels" / "Labels" / "glas_2.mat"
    savemat(path, {"inst_map": _two_cells(), "id": np.array([[1]]), "class": np.array([[2]])})
    with pytest.raises(ValueError, match=r"glas_2\.mat: instance ids \[2\] of the map have no class"):
        open_dataset("lizard", tmp_path, split="fold2")[0]
    savemat(path, {"inst_map": _two_cells(), "id": np.array([[1], [2]]), "class": np.array([[2], [7]])})
    with pytest.raises(ValueError, match=r"glas_2\.mat: class ids \[7\] outside the declared range 1\.\.6"):
        open_dataset("lizard", tmp_path, split="fold2")[0]
    with pytest.raises(FileNotFoundError, match="Lizard_Labels"):
        open_dataset("lizard", tmp_path / "lizard_images1")


# ----------------------------------------------------------------------------------------------- SegPath
def _write_segpath(root: Path):
    rows = ["filename,organ,train_val_test"]
    for folder, prefix in (("panCK_Epithelium", "panCK"), ("CD3CD20_Lymphocyte", "CD3CD20")):
        (root / folder).mkdir(parents=True)
        for k, split in enumerate(("train", "train", "val", "test")):
            stem = f"{folder}_{k}_{k * 984}_{k * 984}"
            Image.fromarray(_img(32, 32)).save(root / folder / f"{stem}_HE.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[4 : 8 + k, 4:12] = 255
            Image.fromarray(mask).save(root / folder / f"{stem}_mask.png")
            rows.append(f"{folder}/{stem}_HE.png,Lung,{split}")
        (root / f"{prefix}_fileinfo.csv").write_text(
            "\n".join(r for r in rows if r.startswith(("file", folder)))
        )


def test_segpath_layout_splits_and_binary_mask(tmp_path):
    _write_segpath(tmp_path)
    train = open_dataset("segpath", tmp_path, split="train")
    assert len(train) == 4 and train.class_names == ("positive",) and train.mpp is None
    assert train.markers == ["CD3CD20_Lymphocyte"] * 2 + ["panCK_Epithelium"] * 2
    s = train[2]
    assert s.source_id == "segpath/train/panCK_Epithelium/panCK_Epithelium_0_0_0"
    assert s.inst_map is None and s.type_map.dtype == np.int32
    assert set(np.unique(s.type_map)) == {0, 1} and s.type_map.sum() == 4 * 8
    only = open_dataset("segpath", tmp_path, split="val", antibodies=["panCK"], mpp=0.22)
    assert len(only) == 1 and only.mpp == 0.22 and only[0].mpp == 0.22
    assert len(open_dataset("segpath", tmp_path, split="all")) == 8
    with pytest.raises(ValueError, match=r"antibodies \['erg'\] not found"):
        open_dataset("segpath", tmp_path, antibodies=["ERG"])
    bad = tmp_path / "panCK_Epithelium" / "panCK_Epithelium_0_0_0_mask.png"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 3).save(bad)
    with pytest.raises(ValueError, match=r"_mask\.png: expected a binary mask"):
        train[2]
    bad.unlink()
    with pytest.raises(FileNotFoundError, match=r"_mask\.png"):
        open_dataset("segpath", tmp_path)


# ------------------------------------------------------------------------------------------ generic folder
def test_folder_adapter(tmp_path):
    for split in ("a", "b"):
        for sub in ("images", "labels", "types"):
            (tmp_path / split / sub).mkdir(parents=True)
        Image.fromarray(_img(40, 48)).save(tmp_path / split / "images" / "x.jpg")
        Image.fromarray(_two_cells().astype(np.uint16)).save(tmp_path / split / "labels" / "x.png")
        Image.fromarray((_two_cells() * 2).astype(np.uint8)).save(tmp_path / split / "types" / "x.png")
    with pytest.raises(ValueError, match="µm/px is missing"):
        open_dataset("folder", tmp_path, split="a")
    with pytest.raises(ValueError, match="pass class_names"):
        open_dataset("folder", tmp_path, split="a", mpp=0.5)
    ds = open_dataset("folder", tmp_path, split="b", mpp=0.5, class_names=["p", "q", "r", "s"])
    s = ds[0]
    assert s.mpp == 0.5 and s.source_id == "folder/b/x" and s.inst_map.max() == 2
    assert s.point_labels.tolist() == [2, 4]
    ds_small = open_dataset("folder", tmp_path, split="a", mpp=0.5, class_names=["p"])
    with pytest.raises(
        ValueError, match=r"types/x\.png: class ids \[2, 4\] outside the declared range 0\.\.1"
    ):
        ds_small[0]
    with pytest.raises(ValueError, match="unknown split 'all'; available: a, b"):
        open_dataset("folder", tmp_path, mpp=0.5)
    flat = tmp_path / "b"
    (flat / "types" / "x.png").unlink()
    (flat / "types").rmdir()
    s2 = open_dataset("folder", flat, mpp=0.25)[0]
    assert s2.type_map is None and s2.points is None
