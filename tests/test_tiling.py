"""Tiling geometry: cores partition the image, ownership is unique, tiling + stitching loses no nucleus."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from cytoken.io.tiling import (
    TileGrid,
    model_image_size,
    model_to_slide_bounds,
    model_to_slide_points,
    mpp_scale,
    slide_to_model_bounds,
    slide_to_model_points,
)
from cytoken.types import Bounds

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")

SIZES = [(1, 1), (100, 50), (256, 256), (257, 256), (1000, 999), (2000, 1500)]
LAYOUTS = [(256, 0), (256, 64), (256, 65), (100, 40)]


@pytest.mark.parametrize("tile_size,overlap", LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
def test_cores_partition_the_image_and_tiles_overlap_enough(size, tile_size, overlap):
    grid = TileGrid(size, tile_size, overlap)
    w, h = size
    count = np.zeros((h, w), np.int32)
    tiles = list(grid.tiles())
    assert len(tiles) == len(grid) == grid.shape[0] * grid.shape[1]
    for t in tiles:
        assert t.index == t.row * grid.shape[1] + t.col
        assert t.bounds.width == t.bounds.height == tile_size
        c = t.core
        count[c.y : c.y1, c.x : c.x1] += 1
        # the core lies in the tile; a tile reaches past the image only when the image is smaller than a tile
        assert t.bounds.x <= c.x and c.x1 <= t.bounds.x1 and t.bounds.y <= c.y and c.y1 <= t.bounds.y1
        assert t.bounds.x >= 0 and t.bounds.y >= 0
        assert t.bounds.x1 <= max(w, tile_size) and t.bounds.y1 <= max(h, tile_size)
        left, top, right, bottom = grid.internal_edges(t)
        if left:
            assert c.x - t.bounds.x >= grid.margin
        if right:
            assert t.bounds.x1 - c.x1 >= grid.margin
        if top:
            assert c.y - t.bounds.y >= grid.margin
        if bottom:
            assert t.bounds.y1 - c.y1 >= grid.margin
        if not left:
            assert c.x == 0
        if not right:
            assert c.x1 == w
    np.testing.assert_array_equal(count, 1)
    # neighbours overlap by at least `overlap`
    xs = sorted({t.bounds.x for t in tiles})
    for a, b in itertools.pairwise(xs):
        assert a + tile_size - b >= overlap


def test_owner_of_is_unique_and_agrees_with_cores():
    grid = TileGrid((1000, 700), 256, 48)
    rng = np.random.default_rng(0)
    x = rng.uniform(-50, 1050, 5000)
    y = rng.uniform(-50, 750, 5000)
    owner = grid.owner_of(x, y)
    assert owner.shape == (5000,) and owner.min() >= 0 and owner.max() < len(grid)
    hits = np.zeros(5000, np.int32)
    for t in grid.tiles():
        mine = grid.in_core(t, x, y)
        np.testing.assert_array_equal(mine, owner == t.index)
        hits += mine
        inside = (x >= 0) & (x < 1000) & (y >= 0) & (y < 700)
        np.testing.assert_array_equal(t.core.contains(x, y)[inside], mine[inside])
    np.testing.assert_array_equal(hits, 1)  # also points outside the image: they go to a border tile
    assert int(grid.owner_of(-10.0, -10.0)) == 0 and int(grid.owner_of(5000.0, 5000.0)) == len(grid) - 1


def test_small_image_gives_one_padded_tile_and_origin_shifts_everything():
    grid = TileGrid((100, 60), 256, 32)
    (t,) = list(grid.tiles())
    assert t.bounds == Bounds(0, 0, 256, 256) and t.core == Bounds(0, 0, 100, 60)
    assert grid.internal_edges(t) == (False, False, False, False)
    roi = TileGrid((600, 300), 256, 32, origin=(1000, 2000))
    plain = TileGrid((600, 300), 256, 32)
    assert roi.extent == Bounds(1000, 2000, 600, 300)
    for a, b in zip(roi.tiles(), plain.tiles()):
        assert a.bounds == Bounds(b.bounds.x + 1000, b.bounds.y + 2000, 256, 256)
        assert a.core == Bounds(b.core.x + 1000, b.core.y + 2000, b.core.width, b.core.height)
    assert int(roi.owner_of(1000.0, 2000.0)) == 0


def test_tissue_mask_keeps_exactly_the_tiles_over_tissue():
    rng = np.random.default_rng(3)
    size = (1100, 900)
    grid = TileGrid(size, 200, 40)
    mask = rng.random((45, 55)) > 0.985  # coarse mask: 1 mask px = 20 image px
    full = np.kron(mask, np.ones((20, 20), bool))  # the same mask at image resolution
    expected = [
        t.index for t in grid.tiles() if full[t.bounds.y : t.bounds.y1, t.bounds.x : t.bounds.x1].any()
    ]
    kept = [t.index for t in grid.tiles(mask)]
    assert kept == expected and 0 < len(kept) < len(grid)
    assert [t.index for t in grid.tiles(full)] == expected
    assert list(grid.tiles(np.zeros((5, 5), bool))) == []
    # a mask of the whole slide used with a grid over an ROI
    roi = TileGrid((400, 400), 200, 40, origin=(200, 100))
    slide_mask = np.zeros((90, 110), bool)  # covers 1100 x 900 at 10 px per mask pixel
    slide_mask[35:37, 55:57] = True  # image pixels x 550..569, y 350..369
    kept = list(roi.tiles(slide_mask, mask_extent=Bounds(0, 0, 1100, 900)))
    assert kept and all(t.bounds.x <= 569 and t.bounds.x1 > 550 and t.bounds.y <= 369 for t in kept)
    with pytest.raises(ValueError, match="2-D"):
        list(grid.tiles(np.zeros(5, bool)))


def test_keep_drops_cells_outside_the_core_or_touching_internal_edges():
    grid = TileGrid((1000, 1000), 300, 60)
    t = grid.tile(grid.shape[1] + 1)  # an interior tile
    assert grid.internal_edges(t) == (True, True, True, True)
    cents = np.array([[150.0, 150.0], [10.0, 150.0], [150.0, 150.0]])
    boxes = np.array([[140, 140, 160, 160], [0, 140, 20, 160], [140, 0, 160, 200]])
    assert grid.keep(t, cents, boxes).tolist() == [True, False, False]
    assert grid.keep(t, cents).tolist() == [True, False, True]
    corner = grid.tile(0)  # touching the image border is fine
    assert grid.keep(corner, np.array([[3.0, 3.0]]), np.array([[0, 0, 7, 7]])).tolist() == [True]


def test_invalid_grids():
    for kwargs, why in [
        ({"image_size": (0, 10), "tile_size": 8, "overlap": 0}, "image_size"),
        ({"image_size": (10, 10), "tile_size": 0, "overlap": 0}, "tile_size"),
        ({"image_size": (10, 10), "tile_size": 8, "overlap": 8}, "overlap"),
        ({"image_size": (10, 10), "tile_size": 8, "overlap": -1}, "overlap"),
    ]:
        with pytest.raises(ValueError, match=why):
            TileGrid(**kwargs)
    with pytest.raises(IndexError):
        TileGrid((10, 10), 8, 2).tile(99)


def test_slide_model_mapping():
    scale = mpp_scale(0.499, 0.25)
    assert scale == pytest.approx(1.996)
    assert model_image_size((2220, 2967), scale) == (round(2220 * 1.996), round(2967 * 1.996))
    pts = np.array([[0.0, 0.0], [10.5, 3.25], [2219.0, 2966.0]])
    np.testing.assert_allclose(model_to_slide_points(slide_to_model_points(pts, scale), scale), pts)
    # pixel centres map to pixel centres: the centre of slide pixel 0 is the centre of model pixels 0..1 at 2x
    np.testing.assert_allclose(slide_to_model_points(np.array([[0.0, 0.0]]), 2.0), [[0.5, 0.5]])
    b = Bounds(1001, 37, 513, 260)
    back = model_to_slide_bounds(b, scale)
    assert (
        back.x <= b.x / scale
        and back.x1 >= b.x1 / scale
        and back.y <= b.y / scale
        and back.y1 >= b.y1 / scale
    )
    assert back.width <= math.ceil(b.width / scale) + 1
    assert slide_to_model_bounds(Bounds(10, 10, 5, 5), 2.0) == Bounds(20, 20, 10, 10)
    with pytest.raises(ValueError):
        mpp_scale(0.0, 0.25)


# ---------------------------------------------------------------------- reassembly on real annotations
def _monuseg_mosaic() -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The 30 MoNuSeg training label maps (1000x1000) as a 5000 x 6000 instance map with unique ids.

    Also returns the reference table of every instance (from the full maps) and the largest offset, along x or
    y, between an instance's centroid and one of its pixels.
    """
    files = sorted((SHARED / "monuseg" / "train" / "labels").glob("*.png"))
    assert len(files) == 30
    mosaic = np.zeros((6000, 5000), np.int32)
    parts: dict[str, list[np.ndarray]] = {"area": [], "cx": [], "cy": [], "boxes": []}
    offset, reach = 0, 0.0
    for k, f in enumerate(files):
        lab = np.array(Image.open(f)).astype(np.int32)
        r, c = divmod(k, 5)
        mosaic[r * 1000 : (r + 1) * 1000, c * 1000 : (c + 1) * 1000] = np.where(lab > 0, lab + offset, 0)
        t = _instance_table(lab)
        ys, xs = np.nonzero(lab)
        ids = lab[ys, xs]
        reach = max(reach, np.abs(xs - t["cx"][ids]).max(), np.abs(ys - t["cy"][ids]).max())
        n = int(lab.max())
        parts["area"].append(t["area"][1 : n + 1])
        parts["cx"].append(t["cx"][1 : n + 1] + c * 1000)
        parts["cy"].append(t["cy"][1 : n + 1] + r * 1000)
        parts["boxes"].append(t["boxes"][1 : n + 1] + np.array([c, r, c, r]) * 1000)
        offset += n
    ref = {key: np.concatenate([np.zeros((1, *v[0].shape[1:]), v[0].dtype), *v]) for key, v in parts.items()}
    return mosaic, ref, float(reach)


@functools.lru_cache(maxsize=4)
def _coordinate_weights(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(np.arange(w, dtype=np.float64), h), np.repeat(np.arange(h, dtype=np.float64), w)


def _instance_table(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid (x, y) and bbox (x0, y0, x1, y1) of every label 0..max, computed from pixels."""
    flat = labels.ravel().astype(np.intp)
    h, w = labels.shape
    n = int(flat.max()) + 1
    area = np.bincount(flat, minlength=n)
    xw, yw = _coordinate_weights(h, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(flat, xw, minlength=n) / area
        cy = np.bincount(flat, yw, minlength=n) / area
    boxes = np.zeros((n, 4), np.int64)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is not None:
            boxes[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return {"area": area, "cx": cx, "cy": cy, "boxes": boxes}


def _tile_and_stitch(mosaic: np.ndarray, grid: TileGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut into tiles, relabel each tile locally as a model would, keep cells by the grid's rule.

    Returns the global id, area and global bbox of every kept cell; global ids are looked up only to check.
    """
    gids, areas, boxes = [], [], []
    lut = np.zeros(int(mosaic.max()) + 1, np.int32)
    for t in grid.tiles():
        b = t.bounds
        crop = mosaic[b.y : b.y1, b.x : b.x1]
        present = np.flatnonzero(np.bincount(crop.ravel(), minlength=len(lut)))
        present = present[present > 0]
        lut[present] = np.arange(1, len(present) + 1)  # local ids 1..n in this tile
        table = _instance_table(np.where(crop > 0, lut[crop], 0))
        local = np.arange(1, len(present) + 1)
        cents = np.stack([table["cx"][local], table["cy"][local]], axis=1)
        keep = local[grid.keep(t, cents, table["boxes"][local])]
        gids.append(present[keep - 1])
        areas.append(table["area"][keep])
        boxes.append(table["boxes"][keep] + np.array([b.x, b.y, b.x, b.y]))
    return np.concatenate(gids), np.concatenate(areas), np.concatenate(boxes)


@needs_shared
def test_tiling_keeps_every_real_nucleus_exactly_once():
    mosaic, ref, reach = _monuseg_mosaic()
    ids = np.flatnonzero(ref["area"][1:]) + 1
    assert len(ids) == 16958
    # overlap requirement from the data: the largest centroid-to-pixel offset along an axis, plus one pixel
    overlap = 2 * (math.floor(reach) + 2)
    assert 150 < overlap <= 192  # MoNuSeg at 40x: up to ~78 px from centroid along an axis
    grid = TileGrid((5000, 6000), 1024, overlap)
    gids, areas, boxes = _tile_and_stitch(mosaic, grid)
    assert len(gids) == len(np.unique(gids)), "a nucleus was kept twice"
    np.testing.assert_array_equal(np.sort(gids), ids)  # none lost
    # and each one whole: same pixel count and extent as in the full map
    np.testing.assert_array_equal(areas, ref["area"][gids])
    np.testing.assert_array_equal(boxes, ref["boxes"][gids])

    # with too little overlap, nuclei straddling core boundaries are lost (the check above can fail)
    corner = mosaic[:2000, :2000]
    small, _, _ = _tile_and_stitch(corner, TileGrid((2000, 2000), 512, 32))
    assert len(np.unique(small)) < len(np.unique(corner)) - 1
