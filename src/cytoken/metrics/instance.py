"""Binary instance-segmentation metrics: panoptic quality, AJI, AJI+ and Dice.

Definitions follow the papers and the reference code that produced the published numbers (HoVer-Net's
``metrics/stats_utils.py``: ``get_fast_pq``, ``get_fast_aji``, ``get_fast_aji_plus``, ``get_dice_1``),
re-derived here on a sparse overlap table (see :mod:`cytoken.metrics._overlap`) so that a 1000 x 1000 map with
~800 nuclei takes milliseconds. Instance ids may be arbitrary, non-consecutive non-negative integers; 0 is
background.

Empty maps (a convention shared by all functions in this module):

* ground truth and prediction both empty: the value is 0/0 and returned as ``nan`` (with all counts 0). This
  matches the official references: HoVer-Net's ``get_dice_1`` and ``get_fast_aji`` give nan, ``get_fast_pq``
  raises ZeroDivisionError, the PanNuke evaluation sets nan for an image without ground-truth nuclei and
  averages with ``np.nanmean``, and the COCO panoptic API skips a category with no TP/FP/FN. Average over
  images with ``np.nanmean`` to skip such images, as PanNuke does.
* only one of them empty: every score is 0 (PQ: all instances are FP or FN; HoVer-Net's AJI functions would
  raise on an empty prediction, we return 0, the limit of the definition).

Deliberate differences from HoVer-Net, all below 1e-6 relative: HoVer-Net divides the IoU sum by ``tp + 1e-6``
for SQ, we divide by ``tp`` (Kirillov et al.'s definition). Ties are broken exactly as HoVer-Net does after
``remap_label`` (lowest id first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoken.metrics._overlap import Overlap, as_instance_map, compute_overlap, max_weight_matching

__all__ = ["InstanceScores", "PQResult", "aji", "aji_plus", "dice", "instance_scores", "panoptic_quality"]

# HoVer-Net adds this to the union before ranking pairs by IoU in AJI/AJI+; it only decides ties (equal IoU ->
# larger intersection wins), so we rank with the same expression to pick the same pairs.
_HOVERNET_UNION_EPS = 1.0e-6


@dataclass(frozen=True)
class PQResult:
    """Panoptic quality of one image (or one class, or a sum over a data set).

    Attributes:
        dq: detection quality, ``tp / (tp + fp/2 + fn/2)`` (an F1 score).
        sq: segmentation quality, mean IoU of the matched pairs (``iou_sum / tp``; 0 when tp = 0).
        pq: ``dq * sq``.
        tp: matched pairs (IoU above the threshold).
        fp: unmatched predicted instances.
        fn: unmatched ground-truth instances.
        iou_sum: sum of the IoU of the matched pairs.
    """

    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, iou_sum: float) -> PQResult:
        """Build the result from counts: nan scores when tp = fp = fn = 0 (nothing to evaluate).

        Example:
            >>> r = PQResult.from_counts(tp=3, fp=1, fn=0, iou_sum=2.4)
            >>> round(r.dq, 4), round(r.sq, 4), round(r.pq, 4)
            (0.8571, 0.8, 0.6857)
        """
        tp, fp, fn = int(tp), int(fp), int(fn)
        if tp + fp + fn == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0, 0, 0, 0.0)
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou_sum) / tp if tp > 0 else 0.0
        return cls(dq, sq, dq * sq, tp, fp, fn, float(iou_sum))

    def __add__(self, other: PQResult) -> PQResult:
        """Sum the counts of two results (as CoNIC's mPQ+ does over images) and recompute the scores."""
        return PQResult.from_counts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum
        )


@dataclass(frozen=True)
class InstanceScores:
    """All binary instance metrics of one image, computed from a single overlap table.

    Attributes:
        pq: panoptic quality (see :func:`panoptic_quality`).
        aji: aggregated Jaccard index (see :func:`aji`).
        aji_plus: AJI+ (see :func:`aji_plus`).
        dice: foreground Dice (see :func:`dice`).
    """

    pq: PQResult
    aji: float
    aji_plus: float
    dice: float


def _check_threshold(iou_threshold: float) -> float:
    thr = float(iou_threshold)
    if not 0.0 <= thr < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}")
    return thr


def _pq_from_overlap(ov: Overlap, thr: float) -> PQResult:
    n_true, n_pred = ov.true_ids.size, ov.pred_ids.size
    iou = ov.iou
    if thr >= 0.5:
        # IoU > 0.5 can hold for at most one partner on each side, so thresholding is already a unique
        # matching.
        matched = np.flatnonzero(iou > thr)
    else:
        # HoVer-Net: Hungarian matching maximising the total IoU over all overlapping pairs, then the
        # threshold.
        chosen = max_weight_matching(n_true, n_pred, ov.pair_true, ov.pair_pred, iou)
        matched = chosen[iou[chosen] > thr]
    tp = int(matched.size)
    # Pairs are sorted by true index, the order in which HoVer-Net sums, so iou_sum agrees to the last bit.
    iou_sum = float(np.sum(iou[matched])) if tp else 0.0
    return PQResult.from_counts(tp, n_pred - tp, n_true - tp, iou_sum)


def _aji_from_parts(ov: Overlap, pair_idx: np.ndarray) -> float:
    """AJI-style ratio: matched intersections over matched unions plus every unmatched instance's area."""
    inter = int(ov.inter[pair_idx].sum())
    union = int(ov.union[pair_idx].sum())
    true_unpaired = np.ones(ov.true_ids.size, bool)
    true_unpaired[ov.pair_true[pair_idx]] = False
    pred_unpaired = np.ones(ov.pred_ids.size, bool)
    pred_unpaired[ov.pair_pred[pair_idx]] = False
    union += int(ov.true_areas[true_unpaired].sum()) + int(ov.pred_areas[pred_unpaired].sum())
    if union == 0:
        return float("nan")
    return inter / union


def _aji_from_overlap(ov: Overlap) -> float:
    if ov.inter.size == 0:
        return _aji_from_parts(ov, np.zeros(0, np.int64))
    score = ov.inter / (ov.union + _HOVERNET_UNION_EPS)
    # For each true instance, the pred with the highest score; ties -> lowest pred index (np.argmax's choice).
    order = np.lexsort((ov.pair_pred, -score, ov.pair_true))
    first = np.ones(order.size, bool)
    first[1:] = ov.pair_true[order][1:] != ov.pair_true[order][:-1]
    return _aji_from_parts(ov, order[first])


def _aji_plus_from_overlap(ov: Overlap) -> float:
    score = ov.inter / (ov.union + _HOVERNET_UNION_EPS)
    chosen = max_weight_matching(ov.true_ids.size, ov.pred_ids.size, ov.pair_true, ov.pair_pred, score)
    return _aji_from_parts(ov, chosen)


def _dice_from_overlap(ov: Overlap) -> float:
    # Binary Dice: instances overlapping means foreground overlapping, so the total intersection is
    # sum(inter).
    denom = int(ov.true_areas.sum()) + int(ov.pred_areas.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(ov.inter.sum()) / denom


def panoptic_quality(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> PQResult:
    """Panoptic quality of a predicted instance map against the ground truth.

    Definition (Kirillov et al., "Panoptic Segmentation", CVPR 2019; for nuclei Graham et al., HoVer-Net, 2019
    and its ``get_fast_pq``): a true and a predicted instance match when their IoU is strictly above
    ``iou_threshold``. For a threshold >= 0.5 such matches are unique by construction; below 0.5 the matching
    is HoVer-Net's: the one-to-one assignment maximising the total IoU over all overlapping pairs, then pairs
    at or below the threshold are dropped. ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU of TP) / TP``,
    ``PQ = DQ * SQ``.

    Args:
        true: (H, W) ground-truth instance map (0 = background, any non-negative integer ids).
        pred: (H, W) predicted instance map.
        iou_threshold: matching threshold in [0, 1); 0.5 is the standard.

    Returns:
        A :class:`PQResult`. Both maps empty: nan scores and zero counts (see the module docstring).

    Raises:
        ValueError: on a shape mismatch, a non-integer or negative map, or a threshold outside [0, 1).

    Example:
        >>> t = np.zeros((4, 8), np.int32); t[:, :4] = 1; t[:, 4:] = 2
        >>> p = np.zeros((4, 8), np.int32); p[:, :3] = 5
        >>> r = panoptic_quality(t, p)
        >>> (r.tp, r.fp, r.fn), round(r.sq, 4), round(r.pq, 4)
        ((1, 0, 1), 0.75, 0.5)
    """
    thr = _check_threshold(iou_threshold)
    return _pq_from_overlap(compute_overlap(true, pred), thr)


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017), as MoNuSeg and HoVer-Net's ``get_fast_aji``.

    Each ground-truth instance is paired with the predicted instance of highest IoU among those it overlaps (a
    prediction may be reused by several ground-truth instances; ties go to the larger intersection, then the
    lowest id, as in HoVer-Net). ``AJI = sum(|G ∩ S|) / (sum(|G ∪ S|) + |unpaired G| + |unpaired S|)`` over
    the pairs, where unpaired S are predictions chosen by no ground-truth instance and the areas of unpaired
    instances are added to the union.

    Args:
        true: (H, W) ground-truth instance map (0 = background).
        pred: (H, W) predicted instance map.

    Returns:
        AJI in [0, 1]; nan when both maps are empty, 0 when exactly one is.

    Raises:
        ValueError: on a shape mismatch or a non-integer or negative map.

    Example:
        >>> t = np.zeros((4, 8), np.int32); t[:, :4] = 1; t[:, 4:] = 2
        >>> p = np.zeros((4, 8), np.int32); p[:, :3] = 5
        >>> aji(t, p)  # pair (1, 5): 12 / 16, plus true 2 (16 px) unpaired
        0.375
    """
    return _aji_from_overlap(compute_overlap(true, pred))


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (Graham et al., HoVer-Net, Medical Image Analysis 2019; ``get_fast_aji_plus``).

    Like :func:`aji` but pairs are one-to-one: the assignment that maximises the total IoU (an exact sparse
    Hungarian solve over the overlapping pairs), keeping pairs that intersect. This removes AJI's
    over-penalisation when one prediction covers several nuclei.

    Args:
        true: (H, W) ground-truth instance map (0 = background).
        pred: (H, W) predicted instance map.

    Returns:
        AJI+ in [0, 1]; nan when both maps are empty, 0 when exactly one is.

    Raises:
        ValueError: on a shape mismatch or a non-integer or negative map.

    Example:
        >>> t = np.zeros((4, 8), np.int32); t[:, :4] = 1; t[:, 4:] = 2
        >>> p = np.ones((4, 8), np.int32)  # one prediction over both nuclei
        >>> aji(t, p)  # both nuclei pair with p: (16 + 16) / (32 + 32)
        0.5
        >>> round(aji_plus(t, p), 4)  # p pairs with one nucleus only: 16 / (32 + 16 unpaired)
        0.3333
    """
    return _aji_plus_from_overlap(compute_overlap(true, pred))


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice of the foreground (HoVer-Net's ``get_dice_1``).

    ``Dice = 2 |T ∩ P| / (|T| + |P|)`` with T, P the non-zero pixels of the two maps.

    Args:
        true: (H, W) ground-truth map; any non-zero value is foreground.
        pred: (H, W) predicted map.

    Returns:
        Dice in [0, 1]; nan when both maps are empty, 0 when exactly one is.

    Raises:
        ValueError: on a shape mismatch or a non-integer or negative map.

    Example:
        >>> t = np.zeros((4, 8), np.int32); t[:, :4] = 1
        >>> p = np.zeros((4, 8), np.int32); p[:, 2:6] = 3
        >>> dice(t, p)
        0.5
    """
    t = as_instance_map(true, "true")
    p = as_instance_map(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same shape, got {t.shape} and {p.shape}")
    tb = t != 0
    pb = p != 0
    denom = int(np.count_nonzero(tb)) + int(np.count_nonzero(pb))
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(tb & pb)) / denom


def instance_scores(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> InstanceScores:
    """PQ, AJI, AJI+ and Dice of one image from a single overlap computation (an evaluator's per-image call).

    Args:
        true: (H, W) ground-truth instance map (0 = background).
        pred: (H, W) predicted instance map.
        iou_threshold: PQ matching threshold in [0, 1).

    Returns:
        An :class:`InstanceScores`; the values equal those of the individual functions.

    Raises:
        ValueError: on a shape mismatch, an invalid map or threshold.

    Example:
        >>> t = np.zeros((4, 8), np.int32); t[:, :4] = 1; t[:, 4:] = 2
        >>> s = instance_scores(t, t)
        >>> s.pq.pq, s.aji, s.aji_plus, s.dice
        (1.0, 1.0, 1.0, 1.0)
    """
    thr = _check_threshold(iou_threshold)
    ov = compute_overlap(true, pred)
    return InstanceScores(
        pq=_pq_from_overlap(ov, thr),
        aji=_aji_from_overlap(ov),
        aji_plus=_aji_plus_from_overlap(ov),
        dice=_dice_from_overlap(ov),
    )
