"""``cytoken evaluate``: score a model (or saved predictions) on a dataset with the metrics module.

Conventions (also written into ``metrics.json``): bPQ/bDQ/bSQ, Dice, AJI and AJI+ are means over images (images
whose score is undefined — no nuclei in truth and prediction — are skipped); detection precision/recall/F1 sum
TP/FP/FN over the dataset (optimal one-to-one matching within 12 px at 0.25 µm/px, scaled with µm/px); per-class F1
is HoVer-Net's type F1 over matched detections; mPQ follows PanNuke's convention (per image, per tissue, mean) for
PanNuke and per-class means over images elsewhere; mPQ+ is CoNIC's dataset-level per-class PQ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import atomic_write_text, check_writable_dir
from cytoken.io.datasets.base import Dataset, read_label_image
from cytoken.metrics import (
    DetectionAccumulator,
    MPQPlusAccumulator,
    detection_radius,
    detection_scores,
    instance_centroids,
    instance_scores,
    pannuke_mpq,
)
from cytoken.pipeline.classifier import relabel
from cytoken.pipeline.image import SegmentConfig, segment_image_with_labels
from cytoken.pipeline.predictor import Predictor
from cytoken.types import CytokenError

__all__ = ["EvaluateConfig", "evaluate"]

CONVENTIONS = {
    "bpq_dice_aji": "mean over images (nan-skipping images without nuclei in truth and prediction)",
    "detection": "TP/FP/FN summed over the dataset; optimal one-to-one matching within 12 px at 0.25 µm/px",
    "type_f1": "HoVer-Net per-class F1 over matched detections (unmatched weighted as in HoVer-Net)",
    "mpq": "per-class PQ averaged over classes, mean over images (PanNuke: per image, per tissue, then mean)",
    "mpq_plus": "CoNIC mPQ+: TP/FP/FN/IoU summed over the dataset per class",
}


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of :func:`evaluate`.

    Attributes:
        mpp: override the dataset's µm/px.
        save_predictions: folder to write the scored instance maps (``<stem>.png``, uint16).
        predictions: score saved instance maps from this folder instead of running a model.
        limit: evaluate only the first N images.
        segment: inference options.
    """

    mpp: float | None = None
    save_predictions: Path | None = None
    predictions: Path | None = None
    limit: int | None = None
    segment: SegmentConfig = field(default_factory=SegmentConfig)


def _majority_type(inst: np.ndarray, types: np.ndarray, ids: np.ndarray) -> np.ndarray:
    m = inst > 0
    key = inst[m].astype(np.int64) * 1024 + types[m].astype(np.int64)
    k, c = np.unique(key, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for kk, cc in zip(k, c):
        i, t = divmod(int(kk), 1024)
        if t and (i not in best or cc > best[i][1]):
            best[i] = (t, int(cc))
    return np.array([best.get(int(i), (0, 0))[0] for i in ids], np.int64)


def evaluate(
    dataset: Dataset,
    predictor: Predictor | None,
    config: EvaluateConfig,
    *,
    model_id: dict[str, Any] | None = None,
    classifier: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model (or saved predictions) on every image of ``dataset``; returns the ``metrics.json`` dict.

    ``classifier`` (a :class:`~cytoken.classify.ClassifierBundle`) assigns the predicted cells' classes from their
    embeddings instead of the model's type head (``config.segment.embeddings`` must not be ``"none"``).
    """
    if classifier is not None and config.segment.embeddings == "none":
        raise CytokenError("evaluate: a classifier needs embeddings (SegmentConfig.embeddings 'mask' or 'bbox')")
    if predictor is None and config.predictions is None:
        raise CytokenError("evaluate needs a model or --predictions DIR")
    if config.save_predictions is not None:
        check_writable_dir(config.save_predictions)
    n = len(dataset) if config.limit is None else min(len(dataset), config.limit)
    if n == 0:
        raise CytokenError(f"dataset {dataset.name}/{dataset.split} has no images")
    model_names: tuple[str, ...] = ()
    if predictor is not None:
        mc = predictor.model.config  # type: ignore[attr-defined]
        model_names = tuple(mc.names) if mc.num_classes else ()
        if classifier is not None:
            model_names = tuple(classifier.class_names)
    ds_names = dataset.class_names
    # class ids compared by name (dataset id -> model id); only classes present in both are scored
    shared = [(i + 1, model_names.index(nm) + 1) for i, nm in enumerate(ds_names) if nm in model_names]
    typed = bool(shared) or (config.predictions is not None and bool(ds_names))
    per_img: dict[str, list[float]] = {k: [] for k in ("pq", "dq", "sq", "aji", "aji_plus", "dice", "mpq")}
    det = DetectionAccumulator()
    mpq_plus = MPQPlusAccumulator(len(ds_names)) if (typed and ds_names) else None
    n_true = n_pred = 0
    pannuke = dataset.name == "pannuke"
    pn: dict[str, list] = {"ti": [], "tt": [], "pi": [], "pt": [], "tissue": []}  # PanNuke's per-tissue mPQ
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"evaluate {dataset.name}/{dataset.split}", unit="img")
    for i in it:
        s = dataset[i]
        mpp = config.mpp or s.mpp or dataset.mpp
        if mpp is None:
            raise CytokenError(f"{s.source_id}: µm/px unknown; pass --mpp")
        stem = Path(s.source_id).name
        pred_types_map = None
        if config.predictions is not None:
            path = Path(config.predictions) / f"{stem}.png"
            if not path.is_file():
                raise CytokenError(f"--predictions: missing instance map {path}")
            pred = read_label_image(path, "predicted instance map")
            if pred.shape != s.image.shape[:2]:
                raise CytokenError(f"{path}: size {pred.shape} differs from the image {s.image.shape[:2]}")
            pred_ids, pred_pts = instance_centroids(pred)
            pred_cls = np.zeros(len(pred_ids), np.int64)
        else:
            cells, pred = segment_image_with_labels(s.image, predictor, mpp, config=config.segment, progress=False)  # type: ignore[arg-type]
            if classifier is not None:
                cells = relabel(cells, classifier)
            pred_ids, pred_pts = cells.ids, cells.centroids
            lut_m2d = {m: d for d, m in shared}
            pred_cls = np.array([lut_m2d.get(int(c), 0) for c in cells.class_ids], np.int64)
            if shared:
                lut = np.zeros(int(pred.max()) + 1, np.int64)
                lut[cells.ids] = pred_cls
                pred_types_map = lut[pred]
        if config.save_predictions is not None:
            from PIL import Image

            from cytoken.io.atomic import atomic_path

            with atomic_path(Path(config.save_predictions) / f"{stem}.png") as tmp:
                Image.fromarray(pred.astype(np.uint16)).save(tmp, format="PNG")
        radius = detection_radius(mpp)
        if s.inst_map is not None:
            sc = instance_scores(s.inst_map, pred)
            for k, v in (("pq", sc.pq.pq), ("dq", sc.pq.dq), ("sq", sc.pq.sq), ("aji", sc.aji),
                         ("aji_plus", sc.aji_plus), ("dice", sc.dice)):  # fmt: skip
                per_img[k].append(v)
            true_ids, true_pts = instance_centroids(s.inst_map)
            true_cls = _majority_type(s.inst_map, s.type_map, true_ids) if s.type_map is not None else None
            if pred_types_map is not None and s.type_map is not None and mpq_plus is not None:
                per_img["mpq"].append(mpq_plus.add(s.inst_map, s.type_map, pred, pred_types_map).mpq)
                if pannuke:
                    for k, v in (("ti", s.inst_map), ("tt", s.type_map), ("pi", pred), ("pt", pred_types_map),
                                 ("tissue", s.tissue or "unknown")):  # fmt: skip
                        pn[k].append(v)
        elif s.points is not None:
            true_pts = s.points
            true_cls = s.point_labels
        else:
            raise CytokenError(f"{s.source_id}: the dataset gives neither instances nor points")
        labels_ok = typed and true_cls is not None
        det.add(detection_scores(true_pts, pred_pts, radius,
                                 true_labels=true_cls if labels_ok else None,
                                 pred_labels=pred_cls if labels_ok else None))  # fmt: skip
        n_true += len(true_pts)
        n_pred += len(pred_pts)

    def mean(k):
        return float(np.nanmean(per_img[k])) if per_img[k] and not np.all(np.isnan(per_img[k])) else None

    out: dict[str, Any] = {
        "bpq": mean("pq"), "bdq": mean("dq"), "bsq": mean("sq"), "aji": mean("aji"), "aji_plus": mean("aji_plus"),
        "dice": mean("dice"), "mpq": mean("mpq"),
        "mpq_plus": None if mpq_plus is None or not per_img["mpq"] else float(mpq_plus.mpq_plus),
        "det_f1": det.f1, "det_precision": det.precision, "det_recall": det.recall,
        "n_images": n, "n_true": int(n_true), "n_pred": int(n_pred),
    }  # fmt: skip
    if typed and det.tp:
        try:
            ts = det.type_scores([d for d, _ in shared] or None)
            out["type_f1"] = {ds_names[c - 1]: float(f) for c, f in ts.f1.items()}
            out["type_accuracy"] = float(ts.accuracy)
        except ValueError:
            pass
    if pannuke and pn["ti"]:
        res = pannuke_mpq(pn["ti"], pn["tt"], pn["pi"], pn["pt"], pn["tissue"], num_classes=len(ds_names))
        out["mpq"] = float(res.mpq)
        out["mpq_convention"] = "pannuke"
    out["model"] = model_id or {"predictions": str(config.predictions)}
    if predictor is not None:
        out["tta"] = bool(getattr(predictor, "tta", False))
        out["amp"] = bool(getattr(predictor, "amp", False))
        out["classifier"] = None if classifier is None else str(classifier.path)
    out["data"] = {"dataset": dataset.name, "root": str(dataset.root), "split": dataset.split}
    out["conventions"] = CONVENTIONS
    return out


def write_metrics(metrics: dict[str, Any], path: Path) -> Path:
    """Write ``metrics.json`` atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(metrics, indent=2, default=float))
