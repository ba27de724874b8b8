"""Tests of cytoken.metrics detection matching, radius scaling and HoVer-Net's type F1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from cytoken.metrics import (
    DetectionAccumulator,
    TypeStats,
    detection_radius,
    detection_scores,
    hovernet_type_f1,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def brute_force_best(t: np.ndarray, p: np.ndarray, radius: float) -> tuple[int, float]:
    """Largest number of within-radius one-to-one pairs, then smallest total distance, by exhaustive
    search."""
    d = cdist(t, p) if len(t) and len(p) else np.zeros((len(t), len(p)))

    def rec(i: int, used: frozenset) -> tuple[int, float]:
        if i == len(t):
            return 0, 0.0
        best = rec(i + 1, used)
        for j in range(len(p)):
            if j not in used and d[i, j] <= radius:
                n, s = rec(i + 1, used | {j})
                cand = (n + 1, s + d[i, j])
                if cand[0] > best[0] or (cand[0] == best[0] and cand[1] < best[1] - 1e-12):
                    best = cand
        return best

    return rec(0, frozenset())


def test_hungarian_beats_greedy():
    # t0 (0,0), t1 (10,0); p0 (-5,0), p1 (1,0); radius 10. Nearest-first greedy pairs t0-p1 (1 px) and then t1
    # has no partner left (p0 is 15 px away): 1 TP. The optimal matching t0-p0 (5), t1-p1 (9) gives 2 TP.
    r = detection_scores([[0, 0], [10, 0]], [[-5, 0], [1, 0]], radius=10)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.pairs.tolist() == [[0, 0], [1, 1]]
    assert r.distances.tolist() == [5.0, 9.0]
    assert (r.precision, r.recall, r.f1) == (1.0, 1.0, 1.0)


def test_minimum_total_distance_among_maximum_matchings():
    # t0 (0,0), t1 (4,0); p0 (1,0), p1 (3,0), radius 5: both assignments give 2 TP; total distance 1+1 beats
    # 3+3.
    r = detection_scores([[0, 0], [4, 0]], [[3, 0], [1, 0]], radius=5)
    assert r.pairs.tolist() == [[0, 1], [1, 0]]
    assert r.distances.sum() == pytest.approx(2.0)


def test_hovernet_matching_can_lose_a_pair():
    # Within 12 px only t0-p0 (10 px). HoVer-Net's pair_coordinates minimises the total distance over the
    # forced 2 pairs: t0-p1 (18.11) + t1-p0 (12.08) = 30.19 < t0-p0 + t1-p1 (10 + 23.02), then drops both (>
    # 12 px).
    t = [[27, 11], [28, 6], [2, 25]]
    p = [[17, 11], [29, 29]]
    assert detection_scores(t, p, 12).tp == 1
    assert detection_scores(t, p, 12, matching="hovernet").tp == 0


def test_radius_is_inclusive_and_zero_distance_matches():
    r = detection_scores([[0, 0]], [[3, 4]], radius=5)
    assert r.tp == 1 and r.distances.tolist() == [5.0]
    assert detection_scores([[0, 0]], [[3, 4]], radius=4.999).tp == 0
    r = detection_scores([[2, 2], [7, 7]], [[7, 7], [2, 2]], radius=0)
    assert r.tp == 2 and r.pairs.tolist() == [[0, 1], [1, 0]]


def test_empty_sets():
    r = detection_scores(np.zeros((0, 2)), [[1, 1], [5, 5]], radius=12)
    assert (r.tp, r.fp, r.fn) == (0, 2, 0)
    assert r.precision == 0.0 and np.isnan(r.recall) and r.f1 == 0.0
    r = detection_scores([[1, 1]], [], radius=12)
    assert (r.tp, r.fp, r.fn) == (0, 0, 1) and np.isnan(r.precision) and r.recall == 0.0 and r.f1 == 0.0
    r = detection_scores([], [], radius=12)
    assert (r.tp, r.fp, r.fn) == (0, 0, 0) and np.isnan(r.f1)
    r = detection_scores([], [], radius=12, true_labels=[], pred_labels=[])
    assert r.type_stats().paired_true.size == 0


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_small_sets(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 25, size=(rng.integers(0, 6), 2))
    p = rng.uniform(0, 25, size=(rng.integers(0, 6), 2))
    r = detection_scores(t, p, radius=8)
    n, total = brute_force_best(t, p, 8)
    assert r.tp == n
    assert r.distances.sum() == pytest.approx(total, abs=1e-9)
    assert r.tp + r.fn == len(t) and r.tp + r.fp == len(p)
    assert sorted(r.pairs[:, 0].tolist() + r.unpaired_true.tolist()) == list(range(len(t)))
    assert sorted(r.pairs[:, 1].tolist() + r.unpaired_pred.tolist()) == list(range(len(p)))
    assert detection_scores(t, p, radius=8, matching="hovernet").tp <= r.tp


@needs_data
def test_real_centroids_against_dense_matching():
    lab = np.array(Image.open(SHARED / "monuseg" / "test" / "labels" / "TCGA-44-2665-01B-06-BS6.png"))
    ids = np.unique(lab)[1:]
    true = np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids))[:, ::-1]  # (x, y)
    rng = np.random.default_rng(0)
    keep = rng.random(len(true)) > 0.1
    pred = true[keep] + rng.normal(0, 4, size=(keep.sum(), 2))
    pred = np.concatenate([pred, rng.uniform(0, 1000, size=(60, 2))])
    radius = detection_radius(0.25)
    r = detection_scores(true, pred, radius)
    # dense reference of the same objective: weight (big - d / r) within the radius, 0 elsewhere, full
    # Hungarian
    d = cdist(true, pred)
    w = np.where(d <= radius, len(true) + 2 - d / radius, 0.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    ok = d[rows, cols] <= radius
    assert r.tp == int(ok.sum())
    assert r.distances.sum() == pytest.approx(d[rows[ok], cols[ok]].sum(), rel=1e-12)
    hv = detection_scores(true, pred, radius, matching="hovernet")
    assert r.tp >= hv.tp
    assert 0.8 < r.f1 < 0.97


def test_detection_radius_scaling():
    assert detection_radius(0.25) == 12.0
    assert detection_radius(0.5) == 6.0
    assert detection_radius(0.2) == pytest.approx(15.0)
    with pytest.raises(ValueError):
        detection_radius(0)
    with pytest.raises(ValueError):
        detection_radius(None)  # type: ignore[arg-type]


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        detection_scores([[0, 0, 0]], [[0, 0, 0]], radius=3)
    with pytest.raises(ValueError, match="radius"):
        detection_scores([[0, 0]], [[0, 0]], radius=-1)
    with pytest.raises(ValueError, match="both"):
        detection_scores([[0, 0]], [[0, 0]], radius=3, true_labels=[1])
    with pytest.raises(ValueError, match="one label per point"):
        detection_scores([[0, 0]], [[0, 0]], radius=3, true_labels=[1, 2], pred_labels=[1])
    with pytest.raises(ValueError, match="matching"):
        detection_scores([[0, 0]], [[0, 0]], radius=3, matching="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs true_labels"):
        detection_scores([[0, 0]], [[0, 0]], radius=3).type_stats()


def test_hovernet_type_f1_by_hand():
    # Pairs (true, pred): (1,1) (1,1) (1,2) (2,2) (3,1); unmatched true: [2, 3]; unmatched pred: [1].
    # F_d = 2*5 / (2*5 + 1 + 2) = 10/13; accuracy = 3/5.
    # class 1: pairs involving 1: (1,1)(1,1)(1,2)(3,1): TP 2, FP 1 (3->1), FN 1 (1->2), TN 0; FP_d 1, FN_d 0:
    #   F = 4 / (4 + 2 + 2 + 1 + 0) = 4/9; precision = 2 / (2 + 2 + 1) = 2/5; recall = 2 / (2 + 2 + 0) = 1/2.
    # class 2: (1,2)(2,2): TP 1, FP 1, FN 0; FP_d 0, FN_d 1: F = 2 / (2 + 2 + 0 + 0 + 1) = 2/5.
    # class 3: (3,1): TP 0, FN 1; FN_d 1: F = 0 / (0 + 2 + 1) = 0.
    s = TypeStats(
        paired_true=np.array([1, 1, 1, 2, 3]),
        paired_pred=np.array([1, 1, 2, 2, 1]),
        unpaired_true=np.array([2, 3]),
        unpaired_pred=np.array([1]),
    )
    r = hovernet_type_f1(s)
    assert r.f1_d == pytest.approx(10 / 13) and r.accuracy == pytest.approx(3 / 5)
    assert r.f1 == pytest.approx({1: 4 / 9, 2: 2 / 5, 3: 0.0})
    assert r.precision[1] == pytest.approx(2 / 5) and r.recall[1] == pytest.approx(1 / 2)
    assert r.counts[1] == (2, 0, 1, 1, 1, 0)
    # class_ids restricts (and may name a class never seen: 0/0 -> nan)
    r = hovernet_type_f1(s, class_ids=[2, 4])
    assert set(r.f1) == {2, 4} and np.isnan(r.f1[4])


def test_accumulator_sums_counts_and_pools_labels():
    acc = DetectionAccumulator()
    # image 1: t (0,0) class 1 pairs p (1,0) class 1; t (50,50) class 2 unmatched
    acc.add(detection_scores([[0, 0], [50, 50]], [[1, 0]], 12, true_labels=[1, 2], pred_labels=[1]))
    # image 2: t (0,0) class 2 pairs p (0,3) class 1; p (90,90) class 2 unmatched
    acc.add(detection_scores([[0, 0]], [[0, 3], [90, 90]], 12, true_labels=[2], pred_labels=[1, 2]))
    assert (acc.tp, acc.fp, acc.fn, acc.n_images) == (2, 1, 1, 2)
    assert acc.precision == pytest.approx(2 / 3) and acc.recall == pytest.approx(2 / 3)
    assert acc.f1 == pytest.approx(4 / 6)
    stats = acc.type_stats()
    assert stats.paired_true.tolist() == [1, 2] and stats.paired_pred.tolist() == [1, 1]
    assert stats.unpaired_true.tolist() == [2] and stats.unpaired_pred.tolist() == [2]
    scores = acc.type_scores()
    assert scores.f1_d == pytest.approx(4 / 6)
    # class 1: (1,1) TP, (2,1) FP -> F = 2 / (2 + 2) ; class 2: (2,1) FN, FP_d 1, FN_d 1 -> 0
    assert scores.f1 == pytest.approx({1: 0.5, 2: 0.0})
    acc.add(detection_scores([[0, 0]], [[0, 0]], 12))
    with pytest.raises(ValueError, match="no labels"):
        acc.type_stats()
