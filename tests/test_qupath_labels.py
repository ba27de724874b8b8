"""QuPath GeoJSON labels: every export form read by hand-written files, and `classifier dataset --dataset qupath` on a
real CRCHisto crop giving exactly the cells and embeddings of the CRCHisto point path."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.cli.main import main
from cytoken.io.datasets import QuPathFolder, open_dataset, read_qupath_geojson
from cytoken.io.datasets.qupath import QuPathLabelError
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
CRC = ("epithelial", "fibroblast", "inflammatory", "others")
X0, Y0, SIDE = 300, 300, 200  # a dense crop of CRCHisto img77 with all four classes


def feature(geometry: dict, cls=None, *, object_type="annotation", **extra) -> dict:
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": geometry, "properties": props, **extra}


def hexagon(x: float, y: float, r: float = 3.0, clockwise: bool = False) -> list[list[float]]:
    a = np.linspace(0, 2 * np.pi, 7)[:-1] * (-1 if clockwise else 1)
    ring = [[x + r * np.cos(t), y + r * np.sin(t)] for t in a]
    return [*ring, ring[0]]


def write(path: Path, doc) -> Path:
    text = json.dumps(doc)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ the reader
def test_every_qupath_form_gives_the_same_labels(tmp_path: Path) -> None:
    pts = np.array([[10.0, 12.0], [40.5, 8.25], [33.0, 70.0]])
    names = ["Tumor", "Tumor", "Immune cells"]
    new = {"type": "FeatureCollection", "features": [
        feature({"type": "MultiPoint", "coordinates": pts[:2].tolist()}, {"name": "Tumor", "color": [200, 0, 0]}),
        feature({"type": "Point", "coordinates": pts[2].tolist()}, {"name": "Immune cells", "color": [0, 0, 200]}),
    ]}  # fmt: skip
    old = [  # QuPath 0.2: bare list, legacy type in "id", colorRGB, detection polygons (one clockwise), a string class
        {"type": "Feature", "id": "PathDetectionObject", "geometry": {"type": "Polygon", "coordinates": [hexagon(*p)]},
         "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False}}
        for p in pts[:1]
    ] + [
        {"type": "Feature", "id": "PathDetectionObject",
         "geometry": {"type": "Polygon", "coordinates": [hexagon(*pts[1], clockwise=True)]},
         "properties": {"object_type": "detection", "classification": {"name": "Tumor", "colorRGB": -3670016}}},
        feature({"type": "Polygon", "coordinates": [hexagon(*pts[2])]}, "Immune cells", object_type="detection"),
    ]  # fmt: skip
    a = read_qupath_geojson(write(tmp_path / "new.geojson.gz", new), image_size=(100, 100))
    b = read_qupath_geojson(write(tmp_path / "old.json", old), image_size=(100, 100))
    for lab in (a, b):
        np.testing.assert_allclose(lab.points, pts, atol=1e-9)  # polygon centroid = the hexagon's centre
        assert list(lab.names) == names and lab.class_names == ("Immune cells", "Tumor")
        assert lab.class_ids(["Tumor", "Immune cells"]).tolist() == [1, 1, 2]
    assert a.from_polygon.tolist() == [False, False, False] and b.from_polygon.all()
    assert b.object_types == {"PathDetectionObject": 1, "detection": 2}
    single = read_qupath_geojson(write(tmp_path / "one.geojson", new["features"][1]))  # a lone Feature
    assert single.names == ("Immune cells",)


def test_class_forms_cells_holes_and_skipped_objects(tmp_path: Path) -> None:
    ring = [[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]
    hole = [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]  # lower-left quarter cut out
    region = [[0, 0], [900, 0], [900, 900], [0, 900], [0, 0]]
    feats = [
        feature({"type": "Point", "coordinates": [1, 2]}, {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}),
        feature({"type": "Point", "coordinates": [3, 4]},
                {"name": "Positive", "colorRGB": 5, "parentClass": {"name": "Tumor", "colorRGB": 7}}),
        feature({"type": "Polygon", "coordinates": [ring, hole]}, "Stroma"),
        feature({"type": "Polygon", "coordinates": [hexagon(50, 50, 9)]}, {"name": "Lymph", "color": [0, 0, 0]},
                object_type="cell", nucleusGeometry={"type": "Polygon", "coordinates": [hexagon(52, 47, 3)]}),
        feature({"type": "MultiPoint", "coordinates": [[5, 5], [6, 6], [7, 7]]}, None),  # unclassified: 3 labels
        feature({"type": "Point", "coordinates": [8, 8]}, {}),  # QuPath's NULL_CLASS
        feature({"type": "Point", "coordinates": [8, 9]}, "Ignore*"),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "Tumor"),
        feature({"type": "Polygon", "coordinates": [region]}, "Tumor region"),  # 810,000 px²: a tissue region
        feature({"type": "Polygon", "coordinates": [ring]}, "Tumor", object_type="tile"),
    ]  # fmt: skip
    lab = read_qupath_geojson(write(tmp_path / "x.geojson", feats), image_size=(1000, 1000), max_area_px=5000)
    assert list(lab.names) == ["Tumor: Positive", "Tumor: Positive", "Stroma", "Lymph"]
    np.testing.assert_allclose(lab.points[2], [35 / 3, 35 / 3])  # (400 * 10 - 100 * 5) / 300
    np.testing.assert_allclose(lab.points[3], [52, 47], atol=1e-9)  # the nucleus, not the cell outline
    rep = lab.report()
    assert (rep["n_features"], rep["n_labels"], rep["n_unclassified"], rep["n_unsupported"], rep["n_too_large"]) == \
        (10, 4, 5, 2, 1)  # fmt: skip
    assert rep["n_point_labels"] == 2 and rep["n_polygon_labels"] == 2
    assert len(read_qupath_geojson(tmp_path / "x.geojson").names) == 5  # no area limit: the region is a label


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"type": "FeatureCollection", "features": [', r"not valid JSON \(line 1"),
        (json.dumps({"type": "FeatureCollection", "features": []}), r"no classified object .*0 features"),
        (json.dumps([feature({"type": "Point", "coordinates": [1, 1]})] * 2), r"2 unclassified labels"),
        (json.dumps({"cells": [1, 2]}), "not QuPath GeoJSON"),
        (json.dumps([feature({"type": "Point", "coordinates": ["a", 1]}, "T")]), "feature 0 .*malformed"),
        (json.dumps([feature({"type": "Point", "coordinates": [150, 20]}, "T")]), r"outside the 100x80 image"),
    ],
)
def test_reader_errors_name_the_file(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "labels.geojson"
    path.write_text(content)
    with pytest.raises(QuPathLabelError, match=pattern) as err:
        read_qupath_geojson(path, image_size=(100, 80))
    assert str(path) in str(err.value)
    assert isinstance(err.value, CytokenError) and isinstance(err.value, ValueError)


# ------------------------------------------------------------------------------------------ real data
def crop_points() -> tuple[np.ndarray, np.ndarray]:
    """The CRCHisto img77 labels inside the crop, in crop pixels (0-based), and their class ids 1..4."""
    pts, cls = [], []
    with (SHARED / "crchisto" / "points_classified.csv").open() as f:
        for r in csv.DictReader(f):
            x, y = float(r["x"]) - 1, float(r["y"]) - 1
            if r["image"] == "img77" and X0 <= x < X0 + SIDE and Y0 <= y < Y0 + SIDE:
                pts.append((x - X0, y - Y0))
                cls.append(CRC.index(r["class"]) + 1)
    return np.array(pts), np.array(cls)


@pytest.fixture(scope="module")
def crop_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same real crop as a CRCHisto folder, a QuPath point-export folder and a QuPath polygon-export folder."""
    if not SHARED.exists():
        pytest.skip("../shared/data not present")
    base = tmp_path_factory.mktemp("crop")
    image = np.array(Image.open(SHARED / "crchisto" / "images" / "img77.png"))[Y0 : Y0 + SIDE, X0 : X0 + SIDE]
    pts, cls = crop_points()
    out = {}
    crc = base / "crchisto"
    (crc / "images").mkdir(parents=True)
    Image.fromarray(image).save(crc / "images" / "img77.png")
    rows = "".join(f"img77,{CRC[c - 1]},{x + 1},{y + 1}\n" for (x, y), c in zip(pts, cls))
    (crc / "points_classified.csv").write_text("image,class,x,y\n" + rows)
    out["crchisto"] = crc
    for kind in ("points", "polygons"):
        root = base / kind
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        Image.fromarray(image).save(root / "images" / "img77.png")
        feats = [feature({"type": "Polygon", "coordinates": [[[0, 0], [199, 0], [199, 199], [0, 0]]]}, "Tumor area")]
        feats.append(feature({"type": "MultiPoint", "coordinates": [[5, 5], [9, 9]]}))  # unclassified points
        for c in range(1, 5):
            sel = pts[cls == c]
            if kind == "points":
                feats.append(feature({"type": "MultiPoint", "coordinates": sel.tolist()}, {"name": CRC[c - 1]}))
            else:
                feats += [feature({"type": "Polygon", "coordinates": [hexagon(*p)]}, {"name": CRC[c - 1],
                          "color": [9, 9, 9]}, object_type="detection") for p in sel]  # fmt: skip
        doc = {"type": "FeatureCollection", "features": feats}
        write(root / "labels" / ("img77.geojson.gz" if kind == "points" else "img77.json"), doc if kind == "points"
              else feats)  # fmt: skip
        out[kind] = root
    return out


@needs_shared
def test_qupath_dataset_adapter_on_real_crop(crop_folders: dict[str, Path]) -> None:
    pts, cls = crop_points()
    ds = open_dataset("qupath", crop_folders["points"], mpp=0.55, class_names=CRC)
    assert isinstance(ds, QuPathFolder) and len(ds) == 1 and ds.ids == ["qupath/all/img77"]
    s = ds[0]
    assert s.image.shape == (SIDE, SIDE, 3) and s.mpp == 0.55
    order = np.lexsort((s.points[:, 1], s.points[:, 0]))
    ref = np.lexsort((pts[:, 1], pts[:, 0]))
    np.testing.assert_allclose(s.points[order], pts[ref])
    np.testing.assert_array_equal(s.point_labels[order], cls[ref])
    rep = ds.label_report(0)
    # the triangle: 19,800 px² = 5,990 µm² at 0.55 µm/px, a region, not a nucleus
    assert (rep["n_too_large"], rep["n_unclassified"], rep["n_labels"]) == (1, 2, len(pts))
    found = QuPathFolder(crop_folders["points"], mpp=0.55)
    assert found.class_names == CRC  # every class present, sorted
    with pytest.raises(QuPathLabelError, match=r"img77\.geojson\.gz: classes \['epithelial'"):
        QuPathFolder(crop_folders["points"], mpp=0.55, class_names=["fibroblast", "inflammatory", "others"])
    with pytest.raises(ValueError, match="µm/px is missing"):
        QuPathFolder(crop_folders["points"])


@needs_shared
def test_classifier_dataset_from_qupath_equals_crchisto_path(
    crop_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Same image, same labels: the QuPath files (points or polygons) give exactly the CRCHisto path's cells."""
    cache = tmp_path / "cache"  # shared: the crop is segmented once (same image hash and settings)
    sets = {}
    for kind in ("crchisto", "points", "polygons"):
        argv = ["classifier", "dataset", "--dataset", kind if kind == "crchisto" else "qupath", "--data-root",
                str(crop_folders[kind]), "--split", "all", "--mpp", "0.55", "--out", str(tmp_path / f"{kind}.npz"),
                "--cache", str(cache), "--quiet"]  # fmt: skip
        if kind != "crchisto":
            argv += ["--class-names", ",".join(CRC)]
        assert main(argv) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        with np.load(tmp_path / f"{kind}.npz") as z:
            meta = json.loads(bytes(z["meta"]).decode())
            sets[kind] = (z["embeddings"], z["labels"], meta["report"])
        if kind != "crchisto":
            assert "skipped QuPath objects: 2 unclassified, 1 too large" in printed
    n_labels = len(crop_points()[0])
    emb, lab, rep = sets["crchisto"]
    assert rep["n_labels"] == n_labels and 0.6 * n_labels <= rep["n_matched"] <= n_labels
    assert sum(rep["matched_per_class"]) == rep["n_matched"] and len(rep["labels_per_class"]) == 4
    for kind in ("points", "polygons"):
        e2, l2, r2 = sets[kind]
        assert (r2["n_labels"], r2["n_matched"], r2["n_unclassified"], r2["n_too_large"]) == \
            (n_labels, rep["n_matched"], 2, 1)  # fmt: skip
        ko, ro = np.lexsort(np.c_[e2, l2].T), np.lexsort(np.c_[emb, lab].T)
        np.testing.assert_array_equal(e2[ko], emb[ro])  # the very same cells and embeddings
        np.testing.assert_array_equal(l2[ko], lab[ro])
    assert len(list((cache).rglob("*.cells.npz"))) == 1  # segmented once for the three runs


@needs_shared
def test_cli_errors_for_bad_label_files(crop_folders: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import re
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(crop_folders["points"], root)
    label = root / "labels" / "img77.geojson.gz"
    label.unlink()
    argv = ["classifier", "dataset", "--dataset", "qupath", "--data-root", str(root), "--mpp", "0.55", "--out",
            str(tmp_path / "x.npz"), "--quiet"]  # fmt: skip
    cases = [
        ("img77.geojson", "{not json", "not valid JSON"),
        ("img77.geojson", json.dumps([feature({"type": "Point", "coordinates": [3, 3]})]), "no classified object"),
        ("img77.json", json.dumps([feature({"type": "Point", "coordinates": [3, 230]}, "T")]),
         r"1 of 1 labels lie outside the 200x200 image"),
    ]  # fmt: skip
    for name, text, pattern in cases:
        for old in (root / "labels").iterdir():
            old.unlink()
        (root / "labels" / name).write_text(text)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(root / "labels" / name) in err and re.search(pattern, err), err
    assert main(["classifier", "dataset", "--out", str(tmp_path / "x.npz")]) == 2
    assert "give one of: --dataset NAME --data-root DIR; --slide FILE" in capsys.readouterr().err
