"""Tests of cytoken.metrics binary instance metrics: hand-checked cases, conventions, and agreement with a
dense, straightforward reference implementation on perturbed real MoNuSeg test labels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from cytoken.metrics import PQResult, aji, aji_plus, dice, instance_scores, panoptic_quality

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
MONUSEG_TEST = SHARED / "monuseg" / "test" / "labels"
# the three test images with most nuclei (818, 677, 575) plus the one with fewest (249)
REAL_IMAGES = [
    "TCGA-44-2665-01B-06-BS6",
    "TCGA-CU-A0YN-01A-02-BSB",
    "TCGA-2Z-A9J9-01A-01-TS1",
    "TCGA-HT-8564-01Z-00-DX1",
]


# ----------------------------------------------------------------------------------------------------
# Reference: dense N x M tables filled pixel by pixel, then the definitions applied literally (full-matrix
# argmax / Hungarian, as HoVer-Net's stats_utils does). Slow and obvious on purpose; shares no code with
# cytoken.
# ----------------------------------------------------------------------------------------------------
def ref_tables(true: np.ndarray, pred: np.ndarray):
    t_ids = [int(v) for v in np.unique(true) if v != 0]
    p_ids = [int(v) for v in np.unique(pred) if v != 0]
    t_index = {v: i for i, v in enumerate(t_ids)}
    p_index = {v: j for j, v in enumerate(p_ids)}
    t_lut = np.vectorize(lambda v: t_index.get(int(v), -1), otypes=[np.int64])
    p_lut = np.vectorize(lambda v: p_index.get(int(v), -1), otypes=[np.int64])
    tu, t_inv = np.unique(true, return_inverse=True)
    pu, p_inv = np.unique(pred, return_inverse=True)
    ti = t_lut(tu)[t_inv.ravel()]
    pj = p_lut(pu)[p_inv.ravel()]
    t_area = np.zeros(len(t_ids), np.int64)
    p_area = np.zeros(len(p_ids), np.int64)
    np.add.at(t_area, ti[ti >= 0], 1)
    np.add.at(p_area, pj[pj >= 0], 1)
    inter = np.zeros((len(t_ids), len(p_ids)), np.int64)
    both = (ti >= 0) & (pj >= 0)
    np.add.at(inter, (ti[both], pj[both]), 1)
    union = t_area[:, None] + p_area[None, :] - inter
    return t_area, p_area, inter, union


def ref_pq(true, pred, thr=0.5, tables=None):
    t_area, p_area, inter, union = tables or ref_tables(true, pred)
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    if thr >= 0.5:
        rows, cols = np.nonzero(iou > thr)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > thr
        rows, cols = rows[keep], cols[keep]
    tp = len(rows)
    fp = len(p_area) - tp
    fn = len(t_area) - tp
    if tp + fp + fn == 0:
        return float("nan"), float("nan"), float("nan"), 0, 0, 0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou[rows, cols].sum() / tp if tp else 0.0
    return dq, sq, dq * sq, tp, fp, fn


def _ref_aji_from_pairs(t_area, p_area, inter, union, rows, cols):
    total_inter = inter[rows, cols].sum()
    total_union = union[rows, cols].sum()
    total_union += t_area[np.setdiff1d(np.arange(len(t_area)), rows)].sum()
    total_union += p_area[np.setdiff1d(np.arange(len(p_area)), cols)].sum()
    return float("nan") if total_union == 0 else total_inter / total_union


def ref_aji(true, pred, tables=None):
    t_area, p_area, inter, union = tables or ref_tables(true, pred)
    if inter.size == 0:
        return _ref_aji_from_pairs(t_area, p_area, inter, union, np.zeros(0, int), np.zeros(0, int))
    score = inter / (union + 1.0e-6)
    best = np.argmax(score, axis=1)
    rows = np.nonzero(score[np.arange(len(t_area)), best] > 0)[0]
    return _ref_aji_from_pairs(t_area, p_area, inter, union, rows, best[rows])


def ref_aji_plus(true, pred, tables=None):
    t_area, p_area, inter, union = tables or ref_tables(true, pred)
    score = inter / (union + 1.0e-6) if inter.size else np.zeros(inter.shape)
    rows, cols = linear_sum_assignment(-score)
    keep = score[rows, cols] > 0
    return _ref_aji_from_pairs(t_area, p_area, inter, union, rows[keep], cols[keep])


def ref_dice(true, pred):
    t, p = true > 0, pred > 0
    return 2.0 * np.logical_and(t, p).sum() / (t.sum() + p.sum())


# ----------------------------------------------------------------------------------------------------
# Perturbations of real labels
# ----------------------------------------------------------------------------------------------------
def relabel(lab: np.ndarray, rng: np.random.Generator, max_id: int = 60000) -> np.ndarray:
    """Random distinct, non-consecutive ids (random order)."""
    ids = np.unique(lab)
    ids = ids[ids != 0]
    new = rng.choice(max_id, size=ids.size, replace=False).astype(np.int64) + 1
    lut = dict(zip(ids.tolist(), new.tolist()))
    out = np.zeros(lab.shape, np.int64)
    for old, sl in enumerate(ndi.find_objects(lab.astype(np.int64)), start=1):
        if sl is not None and old in lut:
            out[sl][lab[sl] == old] = lut[old]
    return out


def perturb(lab: np.ndarray, seed: int, strength: float = 1.0) -> np.ndarray:
    """Drop, split, merge, grow/shrink, shift nuclei and add false positives (fixed seed)."""
    rng = np.random.default_rng(seed)
    out = lab.astype(np.int64).copy()
    ids = np.unique(out)[1:]
    n = ids.size
    centroids = np.array(ndi.center_of_mass(np.ones_like(out), out, ids))
    next_id = int(ids.max()) + 1
    # merges: give a nucleus the id of its nearest neighbour
    lut = np.arange(int(ids.max()) + 1)
    for a in rng.choice(n, size=int(0.05 * strength * n), replace=False):
        d = np.hypot(*(centroids - centroids[a]).T)
        d[a] = np.inf
        lut[ids[int(np.argmin(d))]] = ids[a]
    out = lut[out]
    # splits along a random line through the centroid
    slices = ndi.find_objects(out)
    for a in rng.choice(n, size=int(0.08 * strength * n), replace=False):
        sl = slices[ids[a] - 1] if ids[a] - 1 < len(slices) else None
        if sl is None:
            continue
        sub = out[sl]
        yy, xx = np.nonzero(sub == ids[a])
        if yy.size < 4:
            continue
        ang = rng.uniform(0, np.pi)
        side = (xx - xx.mean()) * np.cos(ang) + (yy - yy.mean()) * np.sin(ang) > 0
        sub[yy[side], xx[side]] = next_id
        next_id += 1
    # drops
    out[np.isin(out, rng.choice(ids, size=int(0.06 * strength * n), replace=False))] = 0
    # grow (into background) or shrink (pixels whose 4-neighbours differ) by one pixel
    if rng.random() < 0.5:
        grown = ndi.grey_dilation(out, size=(3, 3))
        out = np.where(out == 0, grown, out)
    else:
        pad = np.pad(out, 1)
        same = (
            (pad[:-2, 1:-1] == out)
            & (pad[2:, 1:-1] == out)
            & (pad[1:-1, :-2] == out)
            & (pad[1:-1, 2:] == out)
        )
        out = np.where(same, out, 0)
    # global shift (1-3 px) with zero fill
    dy, dx = rng.integers(-3, 4, size=2)
    out = np.roll(out, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[dy:] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    # false positives: disks on background
    h, w = out.shape
    for _ in range(int(15 * strength)):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, 9)
        win = (slice(max(cy - r, 0), min(cy + r + 1, h)), slice(max(cx - r, 0), min(cx + r + 1, w)))
        yy, xx = np.mgrid[win]
        sub = out[win]
        sub[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (sub == 0)] = next_id
        next_id += 1
    return out


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def real_labels():
    return {name: np.array(Image.open(MONUSEG_TEST / f"{name}.png")) for name in REAL_IMAGES}


# ----------------------------------------------------------------------------------------------------
# Hand-checked cases
# ----------------------------------------------------------------------------------------------------
def rect_case():
    """20 x 20. True A (rows 0-9, cols 0-9, 100 px), B (rows 0-9, cols 10-19, 100 px), C (rows 12-15, cols
    0-4, 20 px). Pred a (rows 0-9, cols 0-7, 80 px), b (rows 0-9, cols 8-19, 120 px), d (rows 17-19, cols
    17-19, 9 px).

    IoU(A,a) = 80/100 = 0.8; IoU(B,b) = 100/120; IoU(A,b) = 20/(100+120-20) = 0.1; C and d overlap nothing.
    PQ: TP 2 (A-a, B-b), FP 1 (d), FN 1 (C): DQ = 2/3, SQ = (0.8 + 5/6)/2 = 49/60, PQ = 49/90.
    AJI: A -> a (80 / 100), B -> b (100 / 120), C unpaired (+20), d unpaired (+9): 180 / 249. AJI+ the same.
    Dice: |T| = 220, |P| = 209, |T ∩ P| = 80 + 20 + 100 = 200: 400 / 429.
    """
    t = np.zeros((20, 20), np.int32)
    t[0:10, 0:10] = 7
    t[0:10, 10:20] = 3
    t[12:16, 0:5] = 11
    p = np.zeros((20, 20), np.uint16)
    p[0:10, 0:8] = 2
    p[0:10, 8:20] = 9
    p[17:20, 17:20] = 4
    return t, p


def test_rect_case_by_hand():
    t, p = rect_case()
    r = panoptic_quality(t, p)
    assert (r.tp, r.fp, r.fn) == (2, 1, 1)
    assert r.dq == pytest.approx(2 / 3, abs=1e-15)
    assert r.sq == pytest.approx(49 / 60, abs=1e-15)
    assert r.pq == pytest.approx(49 / 90, abs=1e-15)
    assert r.iou_sum == pytest.approx(0.8 + 100 / 120, abs=1e-15)
    assert aji(t, p) == pytest.approx(180 / 249, abs=1e-15)
    assert aji_plus(t, p) == pytest.approx(180 / 249, abs=1e-15)
    assert dice(t, p) == pytest.approx(400 / 429, abs=1e-15)
    s = instance_scores(t, p)
    assert s.pq == r and s.aji == aji(t, p) and s.aji_plus == aji_plus(t, p) and s.dice == dice(t, p)


def test_aji_vs_aji_plus_one_prediction_over_two_nuclei():
    # D rows 0-3 cols 0-3 (16 px), E rows 0-3 cols 5-8 (16 px); pred e rows 0-3 cols 0-8 (36 px).
    # AJI pairs both with e: (16 + 16) / (36 + 36) = 4/9. AJI+ pairs e once: 16 / (36 + 16) = 4/13.
    # PQ: IoU = 16/36 < 0.5 for both -> TP 0, FP 1, FN 2 -> PQ 0.
    t = np.zeros((4, 9), np.int64)
    t[:, 0:4] = 1
    t[:, 5:9] = 2
    p = np.zeros((4, 9), np.int64)
    p[:, 0:9] = 5
    assert aji(t, p) == pytest.approx(4 / 9, abs=1e-15)
    assert aji_plus(t, p) == pytest.approx(4 / 13, abs=1e-15)
    r = panoptic_quality(t, p)
    assert (r.tp, r.fp, r.fn, r.pq) == (0, 1, 2, 0.0)
    # at threshold 0.4 the Hungarian matching pairs e with one nucleus (IoU 4/9 each): TP 1, FP 0, FN 1
    r = panoptic_quality(t, p, iou_threshold=0.4)
    assert (r.tp, r.fp, r.fn) == (1, 0, 1)
    assert r.sq == pytest.approx(4 / 9, abs=1e-15) and r.dq == pytest.approx(2 / 3, abs=1e-15)


def test_low_threshold_uses_maximum_total_iou_matching():
    # True X (rows 0-9, cols 0-9), Y (rows 0-9, cols 10-13, 40 px). Pred P (rows 0-9, cols 4-13, 100 px)
    # overlaps X by 60 (IoU 60/140 = 0.4286) and covers Y (IoU 40/100 = 0.4); pred Q (rows 0-9, cols 0-3, 40
    # px) IoU(X,Q) = 40/100 = 0.4. Greedy on IoU takes X-P and leaves Y, Q unmatched (1 TP); the
    # maximum-total-IoU matching takes X-Q + Y-P = 0.8 > 0.4286: 2 TP at threshold 0.3.
    t = np.zeros((10, 14), np.int32)
    t[:, 0:10] = 1
    t[:, 10:14] = 2
    p = np.zeros((10, 14), np.int32)
    p[:, 4:14] = 1
    p[:, 0:4] = 2
    r = panoptic_quality(t, p, iou_threshold=0.3)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.iou_sum == pytest.approx(0.8, abs=1e-15)


def test_aji_tie_break_follows_hovernet():
    # T: rows 0-5 x cols 0-19 (120 px). Pred 1 = rows 0-1 (40 px inside T): IoU 40/120 = 1/3.
    # Pred 2 = row 3 cols 0-9 + rows 4-5 (50 px inside T) + rows 6-7 cols 0-14 (30 px outside): IoU 50/150 =
    # 1/3. Exact tie; HoVer-Net's IoU with +1e-6 in the union prefers the larger intersection (pred 2):
    # AJI = 50 / (150 + 40 unpaired) = 5/19 (the MoNuSeg MATLAB script would take pred 1: 40/200).
    t = np.zeros((8, 20), np.int32)
    t[0:6, :] = 1
    p = np.zeros((8, 20), np.int32)
    p[0:2, :] = 1
    p[3, 0:10] = 2
    p[4:6, :] = 2
    p[6:8, 0:15] = 2
    assert aji(t, p) == pytest.approx(5 / 19, abs=1e-15)
    assert aji_plus(t, p) == pytest.approx(5 / 19, abs=1e-15)
    assert aji(t, p) == pytest.approx(ref_aji(t, p), abs=1e-15)


def test_disks_with_known_overlap():
    # Two identical disks shifted by 0 px are a perfect match; a disk against a half-disk has IoU = |half| /
    # |disk|.
    shape = (64, 64)
    t = np.where(disk(shape, 20, 20, 8), 4, 0) + np.where(disk(shape, 45, 45, 6), 9, 0)
    half = disk(shape, 20, 20, 8) & (np.arange(64)[None, :] <= 20)
    p = np.where(half, 1, 0) + np.where(disk(shape, 45, 45, 6), 2, 0)
    n_disk, n_half = int(disk(shape, 20, 20, 8).sum()), int(half.sum())
    iou_half = n_half / n_disk
    assert iou_half > 0.5  # the column through the centre belongs to the half
    r = panoptic_quality(t, p)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.sq == pytest.approx((iou_half + 1.0) / 2, abs=1e-15)
    n_small = int(disk(shape, 45, 45, 6).sum())
    assert aji(t, p) == pytest.approx((n_half + n_small) / (n_disk + n_small), abs=1e-15)
    assert dice(t, p) == pytest.approx(
        2 * (n_half + n_small) / (n_disk + n_small + n_half + n_small), abs=1e-15
    )


# ----------------------------------------------------------------------------------------------------
# Conventions: empty maps, ids, symmetry, validation
# ----------------------------------------------------------------------------------------------------
def test_both_empty_is_nan():
    z = np.zeros((8, 8), np.int32)
    r = panoptic_quality(z, z)
    assert (r.tp, r.fp, r.fn, r.iou_sum) == (0, 0, 0, 0.0)
    assert np.isnan(r.dq) and np.isnan(r.sq) and np.isnan(r.pq)
    assert np.isnan(aji(z, z)) and np.isnan(aji_plus(z, z)) and np.isnan(dice(z, z))


@pytest.mark.parametrize("empty_side", ["pred", "true"])
def test_one_side_empty_scores_zero(empty_side):
    t, p = rect_case()
    z = np.zeros_like(t)
    true, pred = (t, z) if empty_side == "pred" else (z, p)
    r = panoptic_quality(true, pred)
    assert (r.dq, r.sq, r.pq) == (0.0, 0.0, 0.0)
    assert (r.tp, r.fp, r.fn) == ((0, 0, 3) if empty_side == "pred" else (0, 3, 0))
    assert aji(true, pred) == 0.0 and aji_plus(true, pred) == 0.0 and dice(true, pred) == 0.0


def test_pqresult_sum_and_from_counts():
    a = PQResult.from_counts(2, 1, 0, 1.5)
    b = PQResult.from_counts(1, 0, 2, 0.9)
    s = a + b
    assert (s.tp, s.fp, s.fn) == (3, 1, 2)
    assert s.sq == pytest.approx(2.4 / 3) and s.dq == pytest.approx(3 / 4.5)
    assert PQResult.from_counts(0, 2, 0, 0.0).pq == 0.0


def test_ids_permutation_and_dtype_invariance():
    t, p = rect_case()
    rng = np.random.default_rng(0)
    base = instance_scores(t, p)
    for max_id in (60000, 2**40, 2**62):  # the last two exercise the huge-id code paths
        t2, p2 = relabel(t, rng, max_id), relabel(p, rng, max_id)
        s = instance_scores(t2, p2)
        assert s.pq.tp == base.pq.tp and s.pq.pq == pytest.approx(base.pq.pq, rel=1e-14)
        assert s.aji == base.aji and s.aji_plus == base.aji_plus and s.dice == base.dice
    assert instance_scores(t.astype(np.uint64), p.astype(np.int8)) == base
    assert dice(t > 0, p > 0) == base.dice


def test_pq_is_symmetric():
    t, p = rect_case()
    a, b = panoptic_quality(t, p), panoptic_quality(p, t)
    assert (a.tp, a.fp, a.fn) == (b.tp, b.fn, b.fp)
    assert a.pq == pytest.approx(b.pq, rel=1e-15)


def test_invalid_inputs():
    t, p = rect_case()
    with pytest.raises(ValueError, match="same shape"):
        panoptic_quality(t, p[:10])
    with pytest.raises(ValueError, match="integer"):
        aji(t.astype(np.float32), p)
    with pytest.raises(ValueError, match="negative"):
        aji_plus(t, -p.astype(np.int32))
    with pytest.raises(ValueError, match="2-D"):
        dice(t[None], p[None])
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(t, p, iou_threshold=1.0)


# ----------------------------------------------------------------------------------------------------
# Agreement with the dense reference on perturbed real labels
# ----------------------------------------------------------------------------------------------------
def _assert_agree(true, pred, thr=0.5):
    s = instance_scores(true, pred, iou_threshold=thr)
    tables = ref_tables(true, pred)
    dq, sq, pq, tp, fp, fn = ref_pq(true, pred, thr, tables)
    assert (s.pq.tp, s.pq.fp, s.pq.fn) == (tp, fp, fn)
    assert s.pq.dq == pytest.approx(dq, abs=1e-9)
    assert s.pq.sq == pytest.approx(sq, abs=1e-9)
    assert s.pq.pq == pytest.approx(pq, abs=1e-9)
    assert s.aji == pytest.approx(ref_aji(true, pred, tables), abs=1e-9)
    assert s.aji_plus == pytest.approx(ref_aji_plus(true, pred, tables), abs=1e-9)
    assert s.dice == pytest.approx(ref_dice(true, pred), abs=1e-9)
    return s


@needs_data
@pytest.mark.parametrize("name", REAL_IMAGES)
def test_agrees_with_dense_reference_on_perturbed_monuseg(real_labels, name):
    true = real_labels[name]
    rng = np.random.default_rng(REAL_IMAGES.index(name))
    for k, strength in enumerate((0.5, 2.0)):
        pred = perturb(true, seed=100 * REAL_IMAGES.index(name) + k, strength=strength)
        pred = relabel(pred, rng)
        s = _assert_agree(true, pred)
        assert 0.2 < s.pq.pq < 0.95  # a real, imperfect prediction
    # one crop at a low PQ threshold (Hungarian path) and with the roles of true and pred swapped
    crop = (slice(0, 500), slice(250, 750))
    pred = perturb(true, seed=7 + REAL_IMAGES.index(name), strength=3.0)[crop]
    _assert_agree(true[crop], pred, thr=0.3)
    _assert_agree(pred, true[crop])


@needs_data
def test_identity_on_real_labels(real_labels):
    true = real_labels[REAL_IMAGES[0]]
    s = instance_scores(true, relabel(true, np.random.default_rng(1)))
    n = len(np.unique(true)) - 1
    assert (s.pq.tp, s.pq.fp, s.pq.fn) == (n, 0, 0)
    assert s.pq.pq == pytest.approx(1.0, abs=1e-12)
    assert (s.aji, s.aji_plus, s.dice) == (1.0, 1.0, 1.0)


@needs_data
def test_fast_enough_on_a_full_monuseg_image(real_labels):
    # the benchmark measures ~30 ms for all four metrics; a dense N x M implementation takes seconds
    true = real_labels[REAL_IMAGES[0]]
    pred = perturb(true, seed=3)
    instance_scores(true, pred)
    start = time.perf_counter()
    instance_scores(true, pred)
    assert time.perf_counter() - start < 1.0
