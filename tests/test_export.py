import gc
import gzip
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely

from cytoken.io.atomic import (
    AtomicFile,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_dir,
)
from cytoken.io.export import (
    MAX_OVERLAY_SIDE,
    CellViTJSONWriter,
    GeoJSONWriter,
    ParquetCellWriter,
    PatchInfo,
    cell_polygons,
    cell_status,
    render_overlay,
    write_cell_detection_json,
    write_cellvit_json,
    write_geojson,
    write_overlay,
    write_parquet,
)
from cytoken.io.image import CytokenWarning
from cytoken.types import CellSet, CytokenError

NAMES = ("tumor", "immune")
COLORS = ((255, 0, 0), (0, 0, 255))


def _square(x: float, y: float, s: float, *, cw: bool = False) -> np.ndarray:
    sq = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], np.float64)
    return sq[::-1].copy() if cw else sq


def _cells(offset: int = 0, mpp: float = 0.25) -> CellSet:
    """Five cells: two squares (one clockwise), a triangle, a self-intersecting bow-tie, a 2-point cell."""
    o = offset
    contours = [
        _square(10 + o, 10, 10),
        _square(40 + o, 10, 8, cw=True),
        np.array([[10 + o, 40], [30 + o, 40], [10 + o, 60]], np.float64),
        np.array([[50 + o, 50], [60 + o, 60], [60 + o, 50], [50 + o, 60]], np.float64),  # bow-tie
        np.array([[80 + o, 80], [80 + o, 80]], np.float64),  # degenerate
    ]
    bboxes = [
        [10 + o, 10, 21 + o, 21],
        [40 + o, 10, 49 + o, 19],
        [10 + o, 40, 31 + o, 61],
        [50 + o, 50, 61 + o, 61],
        [80 + o, 80, 81 + o, 81],
    ]
    centroids = [[15 + o, 15], [44 + o, 14], [16.7 + o, 46.7], [55 + o, 55], [80 + o, 80]]
    return CellSet(
        ids=np.arange(1, 6) + offset,
        centroids=centroids,
        bboxes=bboxes,
        contours=contours,
        area_px=[121, 81, 231, 60, 1],
        class_ids=[1, 2, 1, 0, 2],
        class_probs=[0.9, 0.75, 0.6, np.nan, 0.5],
        mpp=mpp,
        class_names=NAMES,
        class_colors=COLORS,
        tiles=[0, 0, 1, 1, -1],
    )


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ geometry
def test_cell_polygons_valid_ccw_and_repaired():
    cells = _cells()
    polys = cell_polygons(cells)
    assert len(polys) == len(cells)
    assert all(p.geom_type == "Polygon" and p.is_valid and p.area > 0 for p in polys)
    assert all(p.exterior.is_ccw for p in polys)
    assert polys[0].area == pytest.approx(100.0)  # the square is kept as drawn
    assert polys[4].bounds == (79.5, 79.5, 80.5, 80.5)  # degenerate -> bbox pixel footprint


def test_split_number_lists():
    from cytoken.io.export._stream import split_number_lists

    coords = np.array([[0, 0], [1, 2], [0.5, 1], [3, 4], [5, 6]])
    out = split_number_lists(coords, [0, 2, 2, 4, 5], 3)
    assert out == [[[0, 0], [1, 2]], [], [[0.5, 1.0], [3.0, 4.0]], [[5, 6]]]
    assert isinstance(out[0][0][0], int) and isinstance(out[2][1][0], float)


# ------------------------------------------------------------------------------------------------ GeoJSON
def test_geojson_round_trip_geopandas(tmp_path):
    gpd = pytest.importorskip("geopandas")
    cells = _cells()
    path = write_geojson(cells, tmp_path / "cells.geojson")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    assert doc["cytoken"]["mpp"] == 0.25 and doc["cytoken"]["class_names"] == list(NAMES)
    feats = doc["features"]
    assert len(feats) == len(cells)
    for f, cid, prob in zip(feats, cells.ids, cells.class_probs):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4  # closed ring
        assert str(uuid.UUID(f["id"])) == f["id"]
        props = f["properties"]
        assert props["objectType"] == "detection"
        m = props["measurements"]
        assert isinstance(m, dict) and m["cell_id"] == cid == props["cell_id"]
        assert ("class_prob" in m) == bool(np.isfinite(prob))
    assert feats[0]["properties"]["classification"] == {"name": "tumor", "color": [255, 0, 0]}
    assert feats[1]["properties"]["classification"] == {"name": "immune", "color": [0, 0, 255]}
    assert "classification" not in feats[3]["properties"]  # class 0 -> unclassified in QuPath
    assert feats[0]["properties"]["measurements"]["area_um2"] == pytest.approx(121 * 0.25**2)
    assert len({f["id"] for f in feats}) == len(feats)
    assert feats[0]["geometry"]["coordinates"][0][0] == [10, 10]  # integral rings stay ints
    assert [79.5, 79.5] in feats[4]["geometry"]["coordinates"][0]  # bbox footprint of the 2-point cell

    gdf = gpd.read_file(path)
    assert len(gdf) == len(cells)
    assert gdf.geometry.is_valid.all()
    assert all(shapely.Polygon(g.exterior).exterior.is_ccw for g in gdf.geometry)
    assert gdf["class_name"].tolist() == ["tumor", "immune", "tumor", "unclassified", "immune"]
    assert gdf["cell_id"].tolist() == [1, 2, 3, 4, 5]
    assert gdf.geometry.iloc[0].area == pytest.approx(100.0)


def test_geojson_gzip(tmp_path):
    gpd = pytest.importorskip("geopandas")
    cells = _cells()
    path = write_geojson(cells, tmp_path / "cells.geojson.gz")
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    doc = json.loads(gzip.decompress(raw))
    assert len(doc["features"]) == len(cells)
    assert len(gpd.read_file(f"/vsigzip/{path}")) == len(cells)
    plain = write_geojson(cells, tmp_path / "forced.geojson.gz", gzip=False)
    assert json.loads(plain.read_text())["type"] == "FeatureCollection"


def test_geojson_streaming_and_deterministic_ids(tmp_path):
    parts = [_cells(offset=100 * k) for k in range(3)]
    with GeoJSONWriter(tmp_path / "a.geojson", id_seed="slide-1") as w:
        for part in parts:
            w.add(part)
        assert w.count == 15
    write_geojson(iter(parts), tmp_path / "b.geojson", id_seed="slide-1")
    a = json.loads((tmp_path / "a.geojson").read_text())
    b = json.loads((tmp_path / "b.geojson").read_text())
    assert [f["id"] for f in a["features"]] == [f["id"] for f in b["features"]]
    assert len({f["id"] for f in a["features"]}) == 15
    assert [f["properties"]["cell_id"] for f in a["features"]] == [int(i) for p in parts for i in p.ids]


def test_geojson_rejects_mixed_mpp_and_writes_empty(tmp_path):
    w = GeoJSONWriter(tmp_path / "x.geojson")
    w.add(_cells(mpp=0.25))
    with pytest.raises(ValueError, match="µm/px"):
        w.add(_cells(mpp=0.5))
    w.abort()
    assert not (tmp_path / "x.geojson").exists() and _no_temp_files(tmp_path)
    empty = write_geojson(CellSet.empty(0.5), tmp_path / "empty.geojson")
    doc = json.loads(empty.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"] == []


# -------------------------------------------------------------------------------------------- CellViT JSON
def test_cellvit_cells_json_layout(tmp_path):
    cells = _cells()
    type_map = {0: "Background", 1: "tumor", 2: "immune"}
    meta = {"base_mpp": 0.25, "target_patch_mpp": 0.25, "patch_size": 1024}
    path = write_cellvit_json(cells, tmp_path / "cells.json", type_map=type_map, wsi_metadata=meta)
    doc = json.loads(path.read_text())
    assert list(doc) == ["wsi_metadata", "type_map", "cells"]
    assert doc["wsi_metadata"] == meta
    assert doc["type_map"] == {"0": "Background", "1": "tumor", "2": "immune"}
    assert len(doc["cells"]) == len(cells)
    first = doc["cells"][0]
    for key in (
        "bbox",
        "centroid",
        "contour",
        "type_prob",
        "type",
        "patch_coordinates",
        "cell_status",
        "offset_global",
    ):
        assert key in first
    assert first["bbox"] == [[10, 10], [21, 21]]  # [[rmin, cmin], [rmax, cmax]]
    assert first["centroid"] == [15, 15]
    assert first["contour"] == [[10, 10], [20, 10], [20, 20], [10, 20]]
    assert first["type"] == 1 and first["type_prob"] == pytest.approx(
        0.9
    )  # the real probability, not int-cast
    assert doc["cells"][3]["type_prob"] is None  # NaN -> null
    assert doc["cells"][2]["centroid"] == [16.7, 46.7]
    assert [c["cell_id"] for c in doc["cells"]] == [1, 2, 3, 4, 5]


def test_cellvit_patch_fields_and_status(tmp_path):
    cells = _cells()
    patches = {0: PatchInfo(row=2, col=3, x=0, y=0, size=64), 1: PatchInfo(row=0, col=1, x=8, y=30, size=64)}
    doc = json.loads(write_cellvit_json(cells, tmp_path / "c.json", patches=patches).read_text())
    c0, c2, c4 = doc["cells"][0], doc["cells"][2], doc["cells"][4]
    assert c0["patch_coordinates"] == [2, 3] and c0["offset_global"] == [0, 0]
    assert c0["cell_status"] == cell_status((10, 10, 21, 21), 64, 64) == 1
    assert c2["patch_coordinates"] == [0, 1] and c2["offset_global"] == [30, 8]
    assert c4["patch_coordinates"] == [0, 0] and c4["cell_status"] == 0  # tile -1: no patch info
    assert cell_status((500, 500, 520, 520), 1024) == 0
    assert cell_status((500, 3, 520, 20), 1024) == 2
    assert cell_status((1000, 3, 1024, 20), 1024) == 3
    assert cell_status((1000, 500, 1024, 520), 1024) == 4
    assert cell_status((1000, 1000, 1024, 1024), 1024) == 5
    assert cell_status((500, 1000, 520, 1024), 1024) == 6
    assert cell_status((3, 1000, 20, 1024), 1024) == 7
    assert cell_status((3, 500, 20, 520), 1024) == 8


def test_cell_detection_json_and_type_map_check(tmp_path):
    cells = _cells()
    doc = json.loads(write_cell_detection_json(cells, tmp_path / "cell_detection.json").read_text())
    assert list(doc) == ["wsi_metadata", "type_map", "cells"]
    assert doc["type_map"] == {"0": "unclassified", "1": "tumor", "2": "immune"}
    assert doc["wsi_metadata"]["base_mpp"] == 0.25
    assert set(doc["cells"][0]) == {"bbox", "centroid", "type", "cell_id"}
    with pytest.raises(ValueError, match=r"class ids \[0\]"):
        write_cellvit_json(cells, tmp_path / "bad.json", type_map={1: "tumor", 2: "immune"})
    assert not (tmp_path / "bad.json").exists() and _no_temp_files(tmp_path)


def test_cellvit_streaming_gzip(tmp_path):
    with CellViTJSONWriter(tmp_path / "cells.json.gz") as w:
        w.add(_cells())
        w.add(_cells(offset=100))
    doc = json.loads(gzip.decompress((tmp_path / "cells.json.gz").read_bytes()))
    assert len(doc["cells"]) == 10


# ------------------------------------------------------------------------------------------------ Parquet
def test_parquet_round_trip(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    cells = _cells()
    path = write_parquet(cells, tmp_path / "cells.parquet")
    table = pq.read_table(path)
    assert table.num_rows == len(cells)
    expected = {"id", "x", "y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "area_px", "area_um2", "class_id"}
    assert expected | {"class_name", "class_prob", "tile", "polygon_wkb"} <= set(table.column_names)
    assert table.column("id").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("class_name").to_pylist() == ["tumor", "immune", "tumor", "unclassified", "immune"]
    np.testing.assert_allclose(table.column("area_um2").to_numpy(), cells.area_um2)
    np.testing.assert_allclose(table.column("class_prob").to_numpy()[:3], [0.9, 0.75, 0.6], rtol=1e-6)
    assert table.column("tile").to_pylist() == [0, 0, 1, 1, -1]
    polys = shapely.from_wkb(table.column("polygon_wkb").to_pylist()[:3])
    assert polys[0].area == pytest.approx(100.0)
    assert table.schema.metadata[b"cytoken.mpp"] == b"0.25"


def test_parquet_streaming_row_groups(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with ParquetCellWriter(tmp_path / "s.parquet", row_group_size=7) as w:
        for k in range(4):
            w.add(_cells(offset=100 * k))
        w.add(CellSet.empty(0.25, NAMES, COLORS))
    f = pq.ParquetFile(tmp_path / "s.parquet")
    assert f.metadata.num_rows == 20 and f.metadata.num_row_groups >= 3
    w2 = ParquetCellWriter(tmp_path / "bad.parquet")
    w2.add(_cells())
    with pytest.raises(ValueError, match="cannot join"):
        w2.add(_cells(mpp=0.5))
    w2.abort()
    assert not (tmp_path / "bad.parquet").exists() and _no_temp_files(tmp_path)
    with ParquetCellWriter(tmp_path / "none.parquet"):
        pass
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0


# ------------------------------------------------------------------------------------------------ overlay
def test_overlay_colours_contours():
    img = np.zeros((100, 100, 3), np.uint8)
    out = render_overlay(img, _cells())
    assert out is not img and img.max() == 0  # input untouched
    assert out[10, 15].tolist() == [255, 0, 0]  # top edge of the tumor square
    assert out[15, 10].tolist() == [255, 0, 0]  # left edge
    assert out[15, 15].tolist() == [0, 0, 0]  # interior not filled
    assert out[10, 44].tolist() == [0, 0, 255]  # immune square edge
    assert out[55, 50].tolist() == [160, 160, 160]  # unclassified bow-tie (left edge x=50) in grey
    coloured = np.any(out != 0, axis=2)
    assert 0 < coloured.sum() < 400
    thick = render_overlay(img, _cells(), line_width=3)
    assert np.any(thick != 0, axis=2).sum() > coloured.sum()


def test_write_overlay_png_and_size_limit(tmp_path):
    from PIL import Image

    img = np.full((100, 120, 3), 255, np.uint8)
    path = write_overlay(img, _cells(), tmp_path / "o.png")
    assert path == tmp_path / "o.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), render_overlay(img, _cells()))
    big = np.zeros((8, MAX_OVERLAY_SIDE + 1, 3), np.uint8)
    with pytest.warns(CytokenWarning, match="skipped"):
        assert write_overlay(big, _cells(), tmp_path / "big.png") is None
    assert not (tmp_path / "big.png").exists()
    with pytest.raises(CytokenError, match="4096"):
        render_overlay(big, _cells())
    with pytest.raises(ValueError, match="suffix"):
        write_overlay(img, _cells(), tmp_path / "o.gif")
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(img.astype(np.float32), _cells())


# ------------------------------------------------------------------------------------------------ atomicity
class Boom(RuntimeError):
    pass


def _exploding(parts):
    yield from parts
    raise Boom("simulated crash mid-write")


@pytest.mark.parametrize(
    "writer,name",
    [
        (write_geojson, "cells.geojson"),
        (write_geojson, "cells.geojson.gz"),
        (write_cellvit_json, "cells.json"),
        (write_parquet, "cells.parquet"),
    ],
)
def test_crash_mid_write_leaves_target_untouched(tmp_path, writer, name):
    target = tmp_path / name
    with pytest.raises(Boom):
        writer(_exploding([_cells(), _cells(offset=100)]), target)
    assert not target.exists()
    assert _no_temp_files(tmp_path)
    target.write_bytes(b"previous result")
    with pytest.raises(Boom):
        writer(_exploding([_cells()]), target)
    assert target.read_bytes() == b"previous result"
    assert _no_temp_files(tmp_path)


def test_atomic_write_helpers(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "µm/px\n")
    assert p.read_text(encoding="utf-8") == "µm/px\n"
    with pytest.raises(Boom), atomic_write(p, "w") as fh:
        fh.write("half")
        raise Boom
    assert p.read_text(encoding="utf-8") == "µm/px\n" and _no_temp_files(tmp_path)
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "x.parquet") as tmp:
        assert tmp.suffix == ".parquet" and tmp.parent == tmp_path
        tmp.write_text("data")
    assert (tmp_path / "x.parquet").read_text() == "data"
    with pytest.raises(ValueError, match="mode"):
        AtomicFile(tmp_path / "m", "a")
    with pytest.raises(CytokenError, match="does not exist"):
        atomic_write_text(tmp_path / "missing" / "f.txt", "x")


def test_atomic_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "perm.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_abandoned_atomic_file_is_cleaned_up(tmp_path):
    f = AtomicFile(tmp_path / "never.txt", "w")
    f.file.write("partial")
    tmp = f.tmp_path
    assert tmp.exists()
    del f
    gc.collect()
    assert not tmp.exists() and not (tmp_path / "never.txt").exists()


def test_atomic_dir(tmp_path):
    out = tmp_path / "run"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(Boom), atomic_dir(out) as d:
        (d / "b.txt").write_text("2")
        raise Boom
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # old output untouched
    with atomic_dir(out) as d:
        (d / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]  # replaced on success
    assert _no_temp_files(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CytokenError, match="file"), atomic_dir(tmp_path / "file"):
        pass


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_check_writable_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CytokenError, match="not writable"):
            check_writable_dir(ro)
    finally:
        ro.chmod(0o755)


def test_check_writable_dir(tmp_path):
    new = check_writable_dir(tmp_path / "a" / "b")
    assert new.is_dir() and not list(new.iterdir())
    blocker = tmp_path / "regular_file"
    blocker.write_text("x")
    with pytest.raises(CytokenError, match="cannot create output directory"):
        check_writable_dir(blocker / "out")
    with pytest.raises(CytokenError, match="a file with that name exists"):
        check_writable_dir(blocker)
    with pytest.raises(CytokenError, match="does not exist"):
        check_writable_dir(tmp_path / "nope", create=False)
