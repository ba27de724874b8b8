from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from cytoken.metrics import panoptic_quality
from cytoken.postprocess import (
    HoverConfig,
    cells_from_instances,
    decode_hover,
    hover_instances_map,
    hv_targets,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def binary_pq(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary PQ (unique IoU > 0.5 matching) from the metrics module."""
    return panoptic_quality(gt, pred).pq


def disk(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def two_touching_disks() -> np.ndarray:
    gt = np.zeros((64, 80), np.int32)
    gt[disk(gt.shape, 28, 32, 12)] = 1
    gt[disk(gt.shape, 50, 32, 12) & (gt == 0)] = 2  # overlaps 1 by ~2 px: one foreground blob
    return gt


def test_binary_pq_by_hand():
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1
    gt[6:10, 6:10] = 2
    pred = np.zeros_like(gt)
    pred[0:4, 0:2] = 5  # IoU 0.5 exactly: not a match
    pred[6:10, 6:10] = 9
    # tp = 1 (IoU 1), fp = 1, fn = 1 -> PQ = 1 / (1 + 0.5 + 0.5)
    assert binary_pq(gt, pred) == pytest.approx(0.5)


def test_two_touching_disks_are_separated():
    gt = two_touching_disks()
    assert len(np.unique((gt > 0).astype(np.uint8))) == 2  # one connected blob
    res = decode_hover((gt > 0).astype(np.float32), hv_targets(gt))
    assert res.inst_map.dtype == np.int32
    assert res.inst_map.max() == 2
    assert binary_pq(gt, res.inst_map) > 0.97
    assert len(res.cells) == 2
    assert sorted(res.cells.ids.tolist()) == [1, 2]
    # centroids near the disk centres (x, y)
    cents = sorted(map(tuple, np.round(res.cells.centroids).tolist()))
    assert cents[0] == pytest.approx((28, 32), abs=1.5)
    assert cents[1] == pytest.approx((50, 32), abs=1.5)


def test_cellvit_recipe_also_separates_disks():
    gt = two_touching_disks()
    inst = hover_instances_map((gt > 0).astype(np.float32), hv_targets(gt), config=HoverConfig.cellvit())
    assert inst.max() == 2
    assert binary_pq(gt, inst) > 0.95


def test_empty_input():
    prob = np.zeros((40, 50), np.float32)
    hv = np.zeros((2, 40, 50), np.float32)
    res = decode_hover(prob, hv, np.ones((3, 40, 50), np.float32) / 3, class_names=("a", "b"))
    assert res.inst_map.shape == (40, 50)
    assert not res.inst_map.any()
    assert len(res.cells) == 0
    assert res.cells.class_names == ("a", "b")


def test_single_blob_without_hv_is_one_instance_or_dropped():
    prob = np.zeros((30, 30), np.float32)
    prob[5:15, 5:15] = 0.9
    hv = np.zeros((2, 30, 30), np.float32)
    assert hover_instances_map(prob, hv).max() == 1  # keep_unmarked
    assert hover_instances_map(prob, hv, config=HoverConfig.cellvit()).max() == 0  # CellViT++ drops it


def test_type_and_class_prob_by_hand():
    inst = np.zeros((20, 20), np.int32)
    inst[2:6, 2:7] = 3  # 20 px
    inst[10:15, 10:14] = 8  # 20 px
    tp = np.zeros((3, 20, 20), np.float32)
    tp[0] = 1.0  # background everywhere
    # cell 3: 12 px vote class 2 (p=0.7), 8 px vote background (class probs 0.1 / 0.3 there)
    a = np.zeros((20, 20), bool)
    a[2:6, 2:5] = True  # 12 px
    b = (inst == 3) & ~a
    tp[:, a] = np.array([0.2, 0.1, 0.7])[:, None]
    tp[:, b] = np.array([0.6, 0.1, 0.3])[:, None]
    # cell 8: all pixels vote background (0.5 / 0.3 / 0.2): fall back to the most probable class (1)
    tp[:, inst == 8] = np.array([0.5, 0.3, 0.2])[:, None]
    cells = cells_from_instances(inst, tp, mpp=0.5, class_names=("x", "y"))
    assert cells.ids.tolist() == [3, 8]
    assert cells.class_ids.tolist() == [2, 1]
    assert cells.class_probs[0] == pytest.approx((12 * 0.7 + 8 * 0.3) / 20)
    assert cells.class_probs[1] == pytest.approx(0.3)
    assert cells.area_px.tolist() == [20, 20]
    assert cells.area_um2.tolist() == pytest.approx([5.0, 5.0])
    assert cells.class_name(2) == "y"


def test_no_type_prob_gives_class_zero_and_nan():
    inst = np.zeros((10, 10), np.int32)
    inst[2:6, 2:6] = 1
    cells = cells_from_instances(inst)
    assert cells.class_ids.tolist() == [0]
    assert np.isnan(cells.class_probs[0])


def test_non_consecutive_ids_and_geometry():
    inst = np.zeros((30, 40), np.int32)
    inst[3:8, 10:20] = 1000  # x 10..19, y 3..7
    inst[20:27, 2:5] = 7
    cells = cells_from_instances(inst)
    assert cells.ids.tolist() == [7, 1000]
    assert cells.bboxes.tolist() == [[2, 20, 5, 27], [10, 3, 20, 8]]
    assert cells.centroids.tolist() == [[3.0, 23.0], [14.5, 5.0]]
    assert cells.area_px.tolist() == [21, 50]
    # contours in image coordinates, on the pixel centres of the boundary, ring not repeated
    c = cells.contours[1]
    assert c[:, 0].min() == 10 and c[:, 0].max() == 19 and c[:, 1].min() == 3 and c[:, 1].max() == 7
    assert not np.array_equal(c[0], c[-1])
    assert shapely.Polygon(c).area == pytest.approx(9 * 4)


def test_contours_valid_closed_and_degenerate_dropped():
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 5:15] = 1
    inst[10, 15:25] = 1  # 1-px spike traced out and back: invalid ring, must be repaired
    inst[25:35, 25:27] = 2  # 2-px wide bar: valid
    inst[30, 2:20] = 3  # 1-px line: no area -> dropped
    inst[0, 39] = 4  # single pixel: < 3 points -> dropped
    cells = cells_from_instances(inst)
    assert cells.ids.tolist() == [1, 2]
    for c in cells.contours:
        poly = shapely.Polygon(c)
        assert poly.is_valid and poly.area > 0
        assert len(c) >= 3 and not np.array_equal(c[0], c[-1])
    # the repaired spike cell keeps its square body
    assert 81 <= shapely.Polygon(cells.contours[0]).area <= 83


def test_mpp_scaling_of_min_sizes():
    cfg = HoverConfig()
    p25, p50, p125 = cfg.at(0.25), cfg.at(0.5), cfg.at(0.125)
    assert (p25.min_object_px, p25.min_marker_px, p25.sobel_ksize, p25.marker_open_radius) == (10, 10, 21, 2)
    assert (p50.min_object_px, p50.min_marker_px, p50.sobel_ksize, p50.marker_open_radius) == (3, 3, 11, 1)
    assert (p125.min_object_px, p125.sobel_ksize) == (40, 31)
    # an 8-px blob survives at 0.5 µm/px (min 3 px) but not at 0.25 µm/px (min 10 px)
    prob = np.zeros((20, 20), np.float32)
    prob[5:7, 5:9] = 1.0
    hv = np.zeros((2, 20, 20), np.float32)
    assert hover_instances_map(prob, hv, 0.5).max() == 1
    assert hover_instances_map(prob, hv, 0.25).max() == 0


@pytest.mark.parametrize("recipe", [HoverConfig, HoverConfig.cellvit])
def test_min_mean_prob_drops_faint_instances_only(recipe):
    # three separate disks: confident (p 0.9), in between (0.6), faint (0.35); all above the 0.3 foreground threshold
    gt = np.zeros((64, 120), np.int32)
    for i, cx in enumerate((20, 60, 100), start=1):
        gt[disk(gt.shape, cx, 32, 9)] = i
    prob = np.select([gt == 1, gt == 2, gt == 3], [0.9, 0.6, 0.35], 0.0).astype(np.float32)
    hv = hv_targets(gt)
    base = recipe()
    off = hover_instances_map(prob, hv, config=replace(base, fg_threshold=0.3))
    assert off.max() == 3
    on = hover_instances_map(prob, hv, config=replace(base, fg_threshold=0.3, min_mean_prob=0.5))
    assert on.max() == 2 and sorted(np.unique(on).tolist()) == [0, 1, 2]  # ids stay consecutive
    assert (on[gt == 3] == 0).all() and (on[gt == 1] > 0).all() and (on[gt == 2] > 0).all()
    assert hover_instances_map(prob, hv, config=replace(base, fg_threshold=0.3, min_mean_prob=0.7)).max() == 1
    # off by default in every preset
    assert base.min_mean_prob == 0.0 and HoverConfig.exact_maps().min_mean_prob == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="hv must have shape"):
        decode_hover(np.zeros((10, 10)), np.zeros((10, 10)))
    with pytest.raises(ValueError, match="outside the plausible range"):
        decode_hover(np.zeros((10, 10)), np.zeros((2, 10, 10)), mpp=50)
    with pytest.raises(ValueError, match="class names"):
        cells_from_instances(np.ones((4, 4), np.int32), np.ones((3, 4, 4)), class_names=("a",))
    with pytest.raises(ValueError, match="odd integer"):
        HoverConfig(sobel_ksize=20)
    with pytest.raises(ValueError, match="min_mean_prob"):
        HoverConfig(min_mean_prob=1.0)


@needs_data
def test_round_trip_monuseg_train_labels():
    files = sorted((SHARED / "monuseg" / "train" / "labels").glob("*.png"))
    assert len(files) == 30
    cfg = HoverConfig.exact_maps()  # the preset for noise-free maps (HoverConfig docs; the default gets 29 of 30)
    scores = {}
    for path in files:
        gt = np.array(Image.open(path)).astype(np.int32)
        res = decode_hover((gt > 0).astype(np.float32), hv_targets(gt), mpp=0.25, config=cfg)
        inst = res.inst_map
        assert inst.max() == len(np.unique(inst)) - 1  # consecutive ids
        assert len(res.cells) >= inst.max() - 2  # a record per cell; only 1-px-wide slivers are dropped
        scores[path.stem] = binary_pq(gt, inst)
    bad = {k: round(v, 4) for k, v in scores.items() if v < 0.99}
    assert not bad, f"round-trip PQ < 0.99: {bad}"


@needs_data
def test_decode_hover_cells_on_real_labels():
    path = sorted((SHARED / "monuseg" / "train" / "labels").glob("*.png"))[0]
    gt = np.array(Image.open(path)).astype(np.int32)
    res = decode_hover((gt > 0).astype(np.float32), hv_targets(gt))
    cells = res.cells
    n = int(res.inst_map.max())
    assert n >= 0.98 * (len(np.unique(gt)) - 1)
    assert len(cells) >= n - 2  # only degenerate cells may be dropped
    assert np.all(shapely.is_valid(shapely.polygons([shapely.linearrings(c) for c in cells.contours])))
    h, w = gt.shape
    for c, (x0, y0, x1, y1) in zip(cells.contours, cells.bboxes):
        assert x0 <= c[:, 0].min() and c[:, 0].max() < x1 and y0 <= c[:, 1].min() and c[:, 1].max() < y1
    assert np.all((cells.bboxes[:, 2] <= w) & (cells.bboxes[:, 3] <= h))
    assert np.array_equal(cells.area_px, np.bincount(res.inst_map.ravel())[cells.ids])
