"""Point (centroid) detection scores and HoVer-Net's classification scores of matched cells.

Matching: a true and a predicted point are candidates when their distance is at most ``radius`` (HoVer-Net and
CellViT use 12 px at 0.25 µm/px, i.e. 3 µm). Candidates come from a KD-tree, and the one-to-one matching is
solved exactly by a sparse Hungarian method (LAPJVsp, ``scipy.sparse.csgraph``) on the candidate pairs only:
it maximises the number of matches first and, among maximum matchings, minimises the total distance.

HoVer-Net's ``pair_coordinates`` (also used by CellViT) instead runs the Hungarian algorithm on the full
distance matrix, minimising the total distance over min(N, M) *forced* pairs, and then drops pairs farther
than the radius. When some points have no partner, the forced pairs pull chains of neighbours off their
nearest partner and past the radius, so it finds fewer matches: on the 14 MoNuSeg test images' centroids (2 px
jitter, 10% missed, 50 spurious points per image) it matched 5,631 of 6,697 nuclei against 6,062 for the
optimal matching; with no missed or spurious points both found all 6,697. ``matching="hovernet"`` reproduces
it exactly for comparison with published numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from cytoken.metrics._overlap import max_weight_matching
from cytoken.types import validate_mpp

__all__ = [
    "DetectionAccumulator",
    "DetectionResult",
    "TypeScores",
    "TypeStats",
    "detection_radius",
    "detection_scores",
    "hovernet_type_f1",
]

_NAN = float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else _NAN


class _CountScores:
    """Precision, recall and F1 from ``tp``/``fp``/``fn`` counts; each is nan when its denominator is 0."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """``tp / (tp + fp)``; nan without predictions."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """``tp / (tp + fn)``; nan without true points."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """``2 tp / (2 tp + fp + fn)`` (HoVer-Net's F_d); nan when both sets are empty."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def instance_centroids(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids and (x, y) centroids of the non-zero instances of a label map (vectorised, ids sorted).

    Example:
        >>> m = np.zeros((4, 4), int); m[0, :2] = 3
        >>> ids, xy = instance_centroids(m)
        >>> ids.tolist(), xy.tolist()
        ([3], [[0.5, 0.0]])
    """
    ids, inv = np.unique(np.asarray(inst).ravel(), return_inverse=True)
    rows, cols = np.indices(np.shape(inst))
    n = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    cx = np.bincount(inv, cols.ravel(), minlength=len(ids)) / np.maximum(n, 1)
    cy = np.bincount(inv, rows.ravel(), minlength=len(ids)) / np.maximum(n, 1)
    keep = ids != 0
    return ids[keep], np.stack([cx[keep], cy[keep]], axis=1)


def detection_radius(mpp: float) -> float:
    """Matching radius in pixels at ``mpp``: 12 px at 0.25 µm/px (3 µm, HoVer-Net/CellViT), scaled with µm/px.

    Args:
        mpp: micrometres per pixel of the points' coordinate frame.

    Returns:
        ``12 * 0.25 / mpp`` pixels.

    Raises:
        ValueError: when ``mpp`` is missing, not positive or implausible (see
            :func:`cytoken.types.validate_mpp`).

    Example:
        >>> detection_radius(0.25), detection_radius(0.5)
        (12.0, 6.0)
    """
    return 12.0 * 0.25 / validate_mpp(mpp, source="mpp")


def _as_points(points: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of point coordinates, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite coordinates")
    return arr


def _as_labels(labels: np.ndarray | Sequence[int] | None, n: int, name: str) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with one label per point ({n}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class DetectionResult(_CountScores):
    """Matching of true and predicted points in one image.

    Attributes:
        tp: matched pairs.
        fp: unmatched predicted points.
        fn: unmatched true points.
        pairs: (tp, 2) int64 indices (true index, pred index), sorted by true index.
        distances: (tp,) distance of each pair.
        unpaired_true: indices of unmatched true points.
        unpaired_pred: indices of unmatched predicted points.
        true_labels: class labels of the true points, when given.
        pred_labels: class labels of the predicted points, when given.
    """

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray
    distances: np.ndarray
    unpaired_true: np.ndarray
    unpaired_pred: np.ndarray
    true_labels: np.ndarray | None = None
    pred_labels: np.ndarray | None = None

    def type_stats(self) -> TypeStats:
        """The class labels split into paired/unpaired, for :func:`hovernet_type_f1`.

        Raises:
            ValueError: when the result was computed without labels.
        """
        if self.true_labels is None or self.pred_labels is None:
            raise ValueError("type_stats needs true_labels and pred_labels; pass both to detection_scores")
        return TypeStats(
            paired_true=self.true_labels[self.pairs[:, 0]],
            paired_pred=self.pred_labels[self.pairs[:, 1]],
            unpaired_true=self.true_labels[self.unpaired_true],
            unpaired_pred=self.pred_labels[self.unpaired_pred],
        )


def _match_optimal(
    true_pts: np.ndarray, pred_pts: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    cand = cKDTree(true_pts).sparse_distance_matrix(cKDTree(pred_pts), radius, output_type="ndarray")
    rows = cand["i"].astype(np.int64)
    cols = cand["j"].astype(np.int64)
    dist = cand["v"].astype(np.float64)
    if rows.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    # Weight = big - normalised distance: one more match always outweighs any distance saving (at most 1 per
    # pair), so the optimum has the maximum number of matches and, among those, the smallest total distance.
    big = float(min(true_pts.shape[0], pred_pts.shape[0]) + 2)
    scale = radius if radius > 0 else 1.0
    chosen = max_weight_matching(true_pts.shape[0], pred_pts.shape[0], rows, cols, big - dist / scale)
    order = chosen[np.argsort(rows[chosen], kind="stable")]
    return np.stack([rows[order], cols[order]], axis=1), dist[order]


def _match_hovernet(
    true_pts: np.ndarray, pred_pts: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    dist = cdist(true_pts, pred_pts)
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    return np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64), dist[rows[keep], cols[keep]]


def detection_scores(
    true_points: np.ndarray | Sequence[Sequence[float]],
    pred_points: np.ndarray | Sequence[Sequence[float]],
    radius: float,
    true_labels: np.ndarray | Sequence[int] | None = None,
    pred_labels: np.ndarray | Sequence[int] | None = None,
    matching: Literal["optimal", "hovernet"] = "optimal",
) -> DetectionResult:
    """One-to-one matching of predicted to true points within ``radius``, with TP/FP/FN and P/R/F1.

    Args:
        true_points: (N, 2) true coordinates (any consistent order, e.g. (x, y)), in pixels.
        pred_points: (M, 2) predicted coordinates in the same frame.
        radius: maximum matching distance in pixels (inclusive); see :func:`detection_radius`.
        true_labels: optional (N,) integer class of each true point (kept for :func:`hovernet_type_f1`).
        pred_labels: optional (M,) integer class of each predicted point.
        matching: ``"optimal"`` (maximum number of matches within the radius, then minimum total distance;
            sparse KD-tree candidates, exact sparse Hungarian matching) or ``"hovernet"`` (HoVer-Net/CellViT
            ``pair_coordinates``: dense Hungarian on all distances, then drop pairs beyond the radius).

    Returns:
        A :class:`DetectionResult`; with no points at all, precision/recall/F1 are nan.

    Raises:
        ValueError: on malformed points or labels, a negative radius, an unknown ``matching``, or labels given
            for only one side.

    Example:
        >>> # greedy nearest-first would pair t0 with p1 (distance 1) and leave t1 unmatched
        >>> t = [[0.0, 0.0], [10.0, 0.0]]
        >>> p = [[-5.0, 0.0], [1.0, 0.0]]
        >>> r = detection_scores(t, p, radius=10)
        >>> r.tp, r.pairs.tolist(), r.f1
        (2, [[0, 0], [1, 1]], 1.0)
    """
    t = _as_points(true_points, "true_points")
    p = _as_points(pred_points, "pred_points")
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite distance >= 0 in pixels, got {radius!r}")
    if (true_labels is None) != (pred_labels is None):
        raise ValueError("give both true_labels and pred_labels, or neither")
    t_lab = _as_labels(true_labels, t.shape[0], "true_labels")
    p_lab = _as_labels(pred_labels, p.shape[0], "pred_labels")
    if matching not in ("optimal", "hovernet"):
        raise ValueError(f"matching must be 'optimal' or 'hovernet', got {matching!r}")
    if t.shape[0] == 0 or p.shape[0] == 0:
        pairs, dists = np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    elif matching == "optimal":
        pairs, dists = _match_optimal(t, p, radius)
    else:
        pairs, dists = _match_hovernet(t, p, radius)
    unpaired_true = np.setdiff1d(np.arange(t.shape[0]), pairs[:, 0]).astype(np.int64)
    unpaired_pred = np.setdiff1d(np.arange(p.shape[0]), pairs[:, 1]).astype(np.int64)
    return DetectionResult(
        tp=int(pairs.shape[0]),
        fp=int(unpaired_pred.size),
        fn=int(unpaired_true.size),
        pairs=pairs,
        distances=dists,
        unpaired_true=unpaired_true,
        unpaired_pred=unpaired_pred,
        true_labels=t_lab,
        pred_labels=p_lab,
    )


@dataclass(frozen=True)
class TypeStats:
    """Class labels of matched and unmatched cells, pooled over one or more images.

    Attributes:
        paired_true: true class of each matched pair.
        paired_pred: predicted class of each matched pair (same order).
        unpaired_true: class of each unmatched true cell (false negatives of detection).
        unpaired_pred: class of each unmatched predicted cell (false positives of detection).
    """

    paired_true: np.ndarray
    paired_pred: np.ndarray
    unpaired_true: np.ndarray
    unpaired_pred: np.ndarray

    @staticmethod
    def concatenate(stats: Sequence[TypeStats]) -> TypeStats:
        """Pool the stats of several images (HoVer-Net pools all images before scoring)."""

        def cat(name: str) -> np.ndarray:
            parts = [np.asarray(getattr(s, name), np.int64) for s in stats]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        return TypeStats(cat("paired_true"), cat("paired_pred"), cat("unpaired_true"), cat("unpaired_pred"))


@dataclass(frozen=True)
class TypeScores:
    """HoVer-Net's classification scores (``compute_stats.py`` ``run_nuclei_type_stat``, exhaustive labels).

    Attributes:
        f1_d: detection F1, ``2 TP / (2 TP + FP + FN)`` over all cells.
        accuracy: fraction of matched pairs whose classes agree.
        f1: class id -> ``F_c``.
        precision: class id -> CellViT's per-class precision (``cell_type_detection_scores``), same weights.
        recall: class id -> CellViT's per-class recall.
        counts: class id -> (tp_c, tn_c, fp_c, fn_c, fp_d_c, fn_d_c).
    """

    f1_d: float
    accuracy: float
    f1: dict[int, float] = field(default_factory=dict)
    precision: dict[int, float] = field(default_factory=dict)
    recall: dict[int, float] = field(default_factory=dict)
    counts: dict[int, tuple[int, int, int, int, int, int]] = field(default_factory=dict)


def hovernet_type_f1(stats: TypeStats, class_ids: Sequence[int] | None = None) -> TypeScores:
    """HoVer-Net's per-class F1 of matched cells, including its weighting of unmatched cells.

    Definition (Graham et al. 2019, ``compute_stats.py`` ``run_nuclei_type_stat`` with ``exhaustive=True``):
    for class c, among matched pairs where the true or the predicted class is c, TP_c = both c, FP_c =
    predicted c but true not c, FN_c = true c but predicted not c, TN_c = neither (always 0 after that
    selection, kept for fidelity); FP_d,c / FN_d,c are unmatched predicted / true cells of class c. Then
    ``F_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c)``.
    CellViT's per-class precision ``(TP_c + TN_c) / (TP_c + TN_c + 2 FP_c + FP_d,c)`` and recall
    ``(TP_c + TN_c) / (TP_c + TN_c + 2 FN_c + FN_d,c)`` are returned too. 0/0 gives nan. HoVer-Net adds a
    dummy point at (0, 0) of class 0 to an image with no cells; we do not.

    Args:
        stats: pooled labels (:meth:`DetectionResult.type_stats`, :meth:`DetectionAccumulator.type_stats`).
        class_ids: classes to score; default: the classes present among the true labels (HoVer-Net's default).

    Returns:
        A :class:`TypeScores`.

    Example:
        >>> s = TypeStats(paired_true=np.array([1, 1, 2]), paired_pred=np.array([1, 2, 2]),
        ...               unpaired_true=np.array([2]), unpaired_pred=np.array([1]))
        >>> r = hovernet_type_f1(s)
        >>> r.f1_d, round(r.accuracy, 4), round(r.f1[1], 4), round(r.f1[2], 4)
        (0.75, 0.6667, 0.4, 0.4)
    """
    pt = np.asarray(stats.paired_true, np.int64)
    pp = np.asarray(stats.paired_pred, np.int64)
    ut = np.asarray(stats.unpaired_true, np.int64)
    up = np.asarray(stats.unpaired_pred, np.int64)
    if pt.shape != pp.shape:
        raise ValueError(f"paired_true and paired_pred differ in length: {pt.shape} vs {pp.shape}")
    tp_d, fp_d, fn_d = pt.size, up.size, ut.size
    f1_d = _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d)
    accuracy = _ratio(int(np.sum(pt == pp)), pt.size)
    if class_ids is None:
        class_ids = np.unique(np.concatenate([pt, ut])).tolist()
    scores = TypeScores(f1_d=f1_d, accuracy=accuracy)
    for c in class_ids:
        c = int(c)
        sel = (pt == c) | (pp == c)
        t_c, p_c = pt[sel], pp[sel]
        tp_c = int(np.sum((t_c == c) & (p_c == c)))
        tn_c = int(np.sum((t_c != c) & (p_c != c)))
        fp_c = int(np.sum((t_c != c) & (p_c == c)))
        fn_c = int(np.sum((t_c == c) & (p_c != c)))
        fpd_c = int(np.sum(up == c))
        fnd_c = int(np.sum(ut == c))
        good = tp_c + tn_c
        scores.f1[c] = _ratio(2 * good, 2 * good + 2 * fp_c + 2 * fn_c + fpd_c + fnd_c)
        scores.precision[c] = _ratio(good, good + 2 * fp_c + fpd_c)
        scores.recall[c] = _ratio(good, good + 2 * fn_c + fnd_c)
        scores.counts[c] = (tp_c, tn_c, fp_c, fn_c, fpd_c, fnd_c)
    return scores


class DetectionAccumulator(_CountScores):
    """Sums TP/FP/FN (and pools class labels) over a data set: micro-averaged precision, recall and F1 (of the sums).

    Example:
        >>> acc = DetectionAccumulator()
        >>> acc.add(detection_scores([[0, 0], [50, 50]], [[1, 1]], radius=12))
        >>> acc.add(detection_scores([[0, 0]], [[0, 2], [90, 90]], radius=12))
        >>> acc.tp, acc.fp, acc.fn, round(acc.f1, 4)
        (2, 1, 1, 0.6667)
    """

    def __init__(self) -> None:
        self.tp = 0
        self.fp = 0
        self.fn = 0
        self.n_images = 0
        self._stats: list[TypeStats] = []
        self._labelled = True

    def add(self, result: DetectionResult) -> None:
        """Add one image's :class:`DetectionResult`."""
        self.tp += result.tp
        self.fp += result.fp
        self.fn += result.fn
        self.n_images += 1
        if result.true_labels is None or result.pred_labels is None:
            self._labelled = False
        elif self._labelled:
            self._stats.append(result.type_stats())

    def type_stats(self) -> TypeStats:
        """Pooled class labels of all added images.

        Raises:
            ValueError: when some added result had no labels.
        """
        if not self._labelled:
            raise ValueError(
                "an added DetectionResult had no labels; pass true_labels/pred_labels everywhere"
            )
        return TypeStats.concatenate(self._stats)

    def type_scores(self, class_ids: Sequence[int] | None = None) -> TypeScores:
        """:func:`hovernet_type_f1` of the pooled labels."""
        return hovernet_type_f1(self.type_stats(), class_ids)
