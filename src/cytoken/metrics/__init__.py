"""Quality metrics for nucleus segmentation, detection and classification (torch-free, numpy/scipy only).

Every number cytoken reports comes from here. Definitions follow the papers and the official evaluation code
that produced published results; each function's docstring names its source and any convention it had to
choose:

* binary instance metrics (HoVer-Net ``stats_utils``): :func:`panoptic_quality`, :func:`aji`,
  :func:`aji_plus`, :func:`dice`, and :func:`instance_scores` for all four at once;
* multi-class PQ: :func:`mpq` (one image), :func:`pannuke_mpq` (PanNuke's tissue-averaged mPQ/bPQ),
  :class:`MPQPlusAccumulator` (CoNIC's dataset-level mPQ+);
* detection and classification: :func:`detection_scores`, :func:`detection_radius`,
  :class:`DetectionAccumulator`, :func:`hovernet_type_f1`.

Aggregating over images: bPQ, AJI and Dice are means over images (use ``np.nanmean`` so that images with
neither ground truth nor prediction are skipped, as PanNuke does); detection precision/recall/F1 sum TP/FP/FN
over images (:class:`DetectionAccumulator`).
"""

from cytoken.metrics.detection import (
    DetectionAccumulator,
    DetectionResult,
    TypeScores,
    TypeStats,
    detection_radius,
    detection_scores,
    hovernet_type_f1,
    instance_centroids,
)
from cytoken.metrics.instance import (
    InstanceScores,
    PQResult,
    aji,
    aji_plus,
    dice,
    instance_scores,
    panoptic_quality,
)
from cytoken.metrics.multiclass import MPQPlusAccumulator, MPQResult, PanNukeResult, mpq, pannuke_mpq

__all__ = [
    "DetectionAccumulator",
    "DetectionResult",
    "InstanceScores",
    "MPQPlusAccumulator",
    "MPQResult",
    "PQResult",
    "PanNukeResult",
    "TypeScores",
    "TypeStats",
    "aji",
    "aji_plus",
    "detection_radius",
    "detection_scores",
    "dice",
    "hovernet_type_f1",
    "instance_centroids",
    "instance_scores",
    "mpq",
    "pannuke_mpq",
    "panoptic_quality",
]
