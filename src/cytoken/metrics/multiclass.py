"""Multi-class panoptic quality: per-image mPQ, PanNuke's mPQ/bPQ and CoNIC's dataset-level mPQ+.

Classes are given as pixel-level type maps beside the instance maps (HoVer-Net/CoNIC layout):
``type_map[y, x]`` is the class id (1..num_classes, 0 = background/none) of the pixel. The instance map of
class ``c`` is the instance map restricted to pixels of type ``c`` (CoNIC's ``get_multi_pq_info``; equivalent
to PanNuke's per-class channels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cytoken.metrics._overlap import as_instance_map
from cytoken.metrics.instance import PQResult, _check_threshold, panoptic_quality

__all__ = ["MPQPlusAccumulator", "MPQResult", "PanNukeResult", "mpq", "pannuke_mpq"]


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """np.nanmean without the all-nan warning: nan when nothing is finite."""
    arr = np.asarray(values, np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def _check_num_classes(num_classes: int) -> int:
    if int(num_classes) != num_classes or int(num_classes) < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_type_map(
    type_map: np.ndarray, inst_shape: tuple[int, ...], num_classes: int, name: str
) -> np.ndarray:
    t = as_instance_map(type_map, name)
    if t.shape != inst_shape:
        raise ValueError(f"{name} must have the shape of its instance map {inst_shape}, got {t.shape}")
    if t.size and int(t.max()) > num_classes:
        raise ValueError(f"{name} holds class id {int(t.max())}; allowed: 0 (none) .. {num_classes}")
    return t


def _class_instance_maps(
    inst: np.ndarray, type_map: np.ndarray, num_classes: int, name: str
) -> list[np.ndarray]:
    i = as_instance_map(inst, f"{name}_inst")
    t = _check_type_map(type_map, i.shape, num_classes, f"{name}_type")
    zero = np.zeros((), i.dtype)
    return [np.where(t == c, i, zero) for c in range(1, num_classes + 1)]


@dataclass(frozen=True)
class MPQResult:
    """Multi-class panoptic quality.

    Attributes:
        mpq: mean of the per-class PQ over the classes whose PQ is defined (nan-skip); see the producing
            function for how an absent class is scored.
        per_class: one :class:`PQResult` per class id 1..num_classes (index 0 is class 1).
    """

    mpq: float
    per_class: tuple[PQResult, ...]


def mpq(
    true_inst: np.ndarray,
    true_type: np.ndarray,
    pred_inst: np.ndarray,
    pred_type: np.ndarray,
    num_classes: int,
    iou_threshold: float = 0.5,
) -> MPQResult:
    """Multi-class PQ of one image: PQ of each class's instance map, averaged over the classes.

    Per class ``c`` the instance maps are restricted to pixels of type ``c`` and scored with
    :func:`~cytoken.metrics.panoptic_quality`. A class absent from both ground truth and prediction has nan PQ
    and is skipped in the mean (nan if all classes are absent); a class with predictions but no ground truth
    scores 0 (its predictions are false positives). For PanNuke's rule (skip a class whenever its ground truth
    is empty) use :func:`pannuke_mpq`; for CoNIC's dataset-level mPQ+ use :class:`MPQPlusAccumulator`.

    Args:
        true_inst: (H, W) ground-truth instance map (0 = background).
        true_type: (H, W) ground-truth class id per pixel (0 = none, 1..num_classes).
        pred_inst: (H, W) predicted instance map.
        pred_type: (H, W) predicted class id per pixel.
        num_classes: number of classes C (ids 1..C).
        iou_threshold: PQ matching threshold.

    Returns:
        An :class:`MPQResult` with the C per-class results.

    Raises:
        ValueError: on shape mismatches, class ids outside 0..C, or invalid maps.

    Example:
        >>> inst = np.zeros((4, 8), np.int32); inst[:, :4] = 1; inst[:, 4:] = 2
        >>> typ = np.where(inst == 1, 1, 2)
        >>> wrong = np.ones_like(typ)  # both nuclei predicted as class 1
        >>> r = mpq(inst, typ, inst, wrong, num_classes=2)
        >>> round(r.per_class[0].pq, 4), r.per_class[1].pq, round(r.mpq, 4)
        (0.6667, 0.0, 0.3333)
    """
    n = _check_num_classes(num_classes)
    true_maps = _class_instance_maps(true_inst, true_type, n, "true")
    pred_maps = _class_instance_maps(pred_inst, pred_type, n, "pred")
    if true_maps[0].shape != pred_maps[0].shape:
        raise ValueError(
            f"true and pred must have the same shape, got {true_maps[0].shape} and {pred_maps[0].shape}"
        )
    per_class = tuple(panoptic_quality(t, p, iou_threshold) for t, p in zip(true_maps, pred_maps))
    return MPQResult(mpq=_nanmean([r.pq for r in per_class]), per_class=per_class)


@dataclass(frozen=True)
class PanNukeResult:
    """PanNuke evaluation (Gamper et al. 2020, TissueImageAnalytics/PanNuke-metrics ``run.py``).

    Attributes:
        mpq: mean over tissues of the tissue mPQ ("Average mPQ").
        bpq: mean over tissues of the tissue binary PQ ("Average bPQ").
        tissue_mpq: tissue name -> nanmean over its images of the image mPQ.
        tissue_bpq: tissue name -> nanmean over its images of the image binary PQ.
        class_pq: per class 1..C, nanmean over all images of that class's image PQ.
        image_class_pq: (N, C) PQ per image and class; nan where the image has no ground truth of the class.
        image_mpq: (N,) nanmean over classes of ``image_class_pq``.
        image_bpq: (N,) binary PQ per image; nan where the image has no ground-truth nucleus.
    """

    mpq: float
    bpq: float
    tissue_mpq: dict[str, float]
    tissue_bpq: dict[str, float]
    class_pq: tuple[float, ...]
    image_class_pq: np.ndarray
    image_mpq: np.ndarray
    image_bpq: np.ndarray


def pannuke_mpq(
    true_inst: Sequence[np.ndarray],
    true_type: Sequence[np.ndarray],
    pred_inst: Sequence[np.ndarray],
    pred_type: Sequence[np.ndarray],
    tissues: Sequence[str],
    num_classes: int = 5,
) -> PanNukeResult:
    """PanNuke's mPQ and bPQ over a set of images, with the official script's handling of absent classes.

    Per image and class, PQ (IoU > 0.5) is computed only when the image has ground truth of that class;
    otherwise it is nan and skipped, even if the model predicted that class there (the official ``run.py``
    does this; it also means false positives of an absent class are never penalised). A class with ground
    truth but no prediction scores 0. Image mPQ is the nanmean over classes, tissue mPQ the nanmean over that
    tissue's images, and the final mPQ the mean over tissues. bPQ is the same with the class-agnostic instance
    maps (nan for an image without ground-truth nuclei). Numbers differ from the script's by its ``tp + 1e-6``
    in SQ only (< 1e-6 relative).

    Args:
        true_inst: N ground-truth instance maps (H, W), e.g. a (N, H, W) array.
        true_type: N ground-truth per-pixel class maps (0 = background, 1..C; PanNuke: 1 Neoplastic,
            2 Inflammatory, 3 Connective, 4 Dead, 5 Epithelial).
        pred_inst: N predicted instance maps.
        pred_type: N predicted per-pixel class maps.
        tissues: N tissue names (PanNuke's ``types.npy``).
        num_classes: number of classes C.

    Returns:
        A :class:`PanNukeResult`.

    Raises:
        ValueError: when the sequences differ in length, are empty, or hold invalid maps.

    Example:
        >>> inst = np.zeros((4, 8), np.int32); inst[:, :4] = 1; inst[:, 4:] = 2
        >>> typ = np.where(inst == 1, 1, 2)
        >>> r = pannuke_mpq([inst, inst], [typ, typ], [inst, inst], [typ, np.ones_like(typ)],
        ...                 ["Breast", "Colon"], num_classes=2)
        >>> r.tissue_mpq["Breast"], round(r.tissue_mpq["Colon"], 4), round(r.mpq, 4), r.bpq
        (1.0, 0.3333, 0.6667, 1.0)
    """
    n_cls = _check_num_classes(num_classes)
    n = len(true_inst)
    lengths = {len(true_type), len(pred_inst), len(pred_type), len(tissues)}
    if lengths != {n}:
        raise ValueError(
            "true_inst, true_type, pred_inst, pred_type and tissues must have the same length, got "
            f"{[len(true_inst), len(true_type), len(pred_inst), len(pred_type), len(tissues)]}"
        )
    if n == 0:
        raise ValueError("pannuke_mpq needs at least one image")
    image_class_pq = np.full((n, n_cls), np.nan)
    image_bpq = np.full(n, np.nan)
    for i in range(n):
        t_maps = _class_instance_maps(true_inst[i], true_type[i], n_cls, "true")
        p_maps = _class_instance_maps(pred_inst[i], pred_type[i], n_cls, "pred")
        for c, (t, p) in enumerate(zip(t_maps, p_maps)):
            if t.any():
                image_class_pq[i, c] = panoptic_quality(t, p).pq
        if np.any(true_inst[i]):
            image_bpq[i] = panoptic_quality(true_inst[i], pred_inst[i]).pq
    image_mpq = np.array([_nanmean(row) for row in image_class_pq])
    names = list(dict.fromkeys(str(t) for t in tissues))
    tissue_arr = np.array([str(t) for t in tissues])
    tissue_mpq = {name: _nanmean(image_mpq[tissue_arr == name]) for name in names}
    tissue_bpq = {name: _nanmean(image_bpq[tissue_arr == name]) for name in names}
    return PanNukeResult(
        mpq=_nanmean(list(tissue_mpq.values())),
        bpq=_nanmean(list(tissue_bpq.values())),
        tissue_mpq=tissue_mpq,
        tissue_bpq=tissue_bpq,
        class_pq=tuple(_nanmean(image_class_pq[:, c]) for c in range(n_cls)),
        image_class_pq=image_class_pq,
        image_mpq=image_mpq,
        image_bpq=image_bpq,
    )


class MPQPlusAccumulator:
    """CoNIC's mPQ+ (Graham et al., CoNIC challenge 2022, ``compute_stats.py``): dataset-level multi-class PQ.

    Per class, TP, FP, FN and the matched-IoU sum are summed over all images; PQ is computed once per class
    from the sums, and mPQ+ is the mean over the classes. A class with no TP, FP or FN in the whole data set
    scores 0, as in CoNIC's code (its ``+ 1e-6`` denominators turn 0/0 into 0); its ``per_class`` entry keeps
    nan scores so the absence is visible.

    Args:
        num_classes: number of classes C (ids 1..C).
        iou_threshold: PQ matching threshold.

    Example:
        >>> inst = np.zeros((4, 8), np.int32); inst[:, :4] = 1; inst[:, 4:] = 2
        >>> typ = np.where(inst == 1, 1, 2)
        >>> acc = MPQPlusAccumulator(num_classes=2)
        >>> _ = acc.add(inst, typ, inst, typ)
        >>> _ = acc.add(inst, typ, inst, np.ones_like(typ))
        >>> [round(r.pq, 4) for r in acc.per_class()], round(acc.mpq_plus, 4)
        ([0.8, 0.6667], 0.7333)
    """

    def __init__(self, num_classes: int, iou_threshold: float = 0.5) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.iou_threshold = _check_threshold(iou_threshold)
        self.tp = np.zeros(self.num_classes, np.int64)
        self.fp = np.zeros(self.num_classes, np.int64)
        self.fn = np.zeros(self.num_classes, np.int64)
        self.iou_sum = np.zeros(self.num_classes, np.float64)
        self.n_images = 0

    def add(
        self, true_inst: np.ndarray, true_type: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray
    ) -> MPQResult:
        """Score one image, add its per-class counts, and return its own :func:`mpq` result."""
        res = mpq(true_inst, true_type, pred_inst, pred_type, self.num_classes, self.iou_threshold)
        self.add_result(res)
        return res

    def add_result(self, result: MPQResult) -> None:
        """Add the per-class counts of an already computed :class:`MPQResult` (e.g. from a worker process).

        Raises:
            ValueError: when the result has a different number of classes.
        """
        if len(result.per_class) != self.num_classes:
            raise ValueError(
                f"result has {len(result.per_class)} classes, the accumulator {self.num_classes}"
            )
        for c, r in enumerate(result.per_class):
            self.tp[c] += r.tp
            self.fp[c] += r.fp
            self.fn[c] += r.fn
            self.iou_sum[c] += r.iou_sum
        self.n_images += 1

    def per_class(self) -> tuple[PQResult, ...]:
        """PQ of each class 1..C from the summed counts (nan scores for a class never seen)."""
        return tuple(
            PQResult.from_counts(self.tp[c], self.fp[c], self.fn[c], self.iou_sum[c])
            for c in range(self.num_classes)
        )

    @property
    def mpq_plus(self) -> float:
        """Mean over classes of the dataset-level PQ (an absent class counts 0, as in CoNIC); nan if empty."""
        if self.n_images == 0:
            return float("nan")
        return float(np.mean([0.0 if np.isnan(r.pq) else r.pq for r in self.per_class()]))

    def result(self) -> MPQResult:
        """The accumulated result: ``mpq`` is :attr:`mpq_plus`, ``per_class`` is :meth:`per_class`."""
        return MPQResult(mpq=self.mpq_plus, per_class=self.per_class())
