"""Per-epoch validation with the metrics module (bPQ, Dice, detection F1) on fixed crops."""

from __future__ import annotations

import numpy as np
import torch

from cytoken.metrics import (
    DetectionAccumulator,
    detection_radius,
    detection_scores,
    dice,
    instance_centroids,
    panoptic_quality,
)
from cytoken.models.segmenter import CellSegmenter
from cytoken.postprocess import hover as _hover
from cytoken.training.data import ValCrop

__all__ = ["validate"]


@torch.no_grad()
def validate(model: CellSegmenter, crops: list[ValCrop], device: torch.device, *, mpp: float = 0.25,
             batch_size: int = 8) -> dict[str, float]:  # fmt: skip
    """Segment every crop and score it: mean bPQ and Dice over crops, detection F1 from summed TP/FP/FN.

    Cells are decoded with the model's stored post-processing parameters (defaults when it has none). When the
    model has a type head and crops carry class labels, ``type_f1`` is the mean of HoVer-Net's per-class
    F1 over the classes present in the labels.
    """
    was_training = model.training
    model.eval()
    pqs, dices = [], []
    det_all, det_typed = DetectionAccumulator(), DetectionAccumulator()
    # the post-processing stored with the model (SegmenterConfig.postprocess), as the pipeline would use it
    stored = getattr(getattr(model, "config", None), "postprocess", None)
    hover = _hover.HoverConfig.from_mapping(stored, where="the model's post-processing parameters") if stored else None
    radius = detection_radius(mpp)
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        x = torch.from_numpy(np.stack([c.image for c in chunk])).to(device)
        out = model(model.preprocess(x))
        nuc = out.nuclei_prob[:, 1].float().cpu().numpy()
        hv = out.hv.float().cpu().numpy()
        tprob = None if out.type_prob is None else out.type_prob.float().cpu().numpy()
        for j, crop in enumerate(chunk):
            res = _hover.decode_hover(nuc[j], hv[j], None if tprob is None else tprob[j], mpp, config=hover)
            pqs.append(panoptic_quality(crop.inst, res.inst_map).pq)
            dices.append(dice(crop.inst, res.inst_map))
            ids, pts = instance_centroids(crop.inst)
            if crop.types is not None and tprob is not None:
                true_cls = _majority_class(crop.inst, crop.types, ids)
                keep = true_cls >= 0  # drop cells whose class is ignored (-1) in every pixel
                det_typed.add(
                    detection_scores(pts[keep], res.cells.centroids, radius, true_cls[keep], res.cells.class_ids)
                )
            det_all.add(detection_scores(pts, res.cells.centroids, radius))
    model.train(was_training)
    metrics = {
        "bpq": float(np.nanmean(pqs)),
        "dice": float(np.nanmean(dices)),
        "det_f1": float(det_all.f1) if det_all.tp + det_all.fp + det_all.fn else 0.0,
    }
    if det_typed.n_images:
        present = sorted({int(c) for c in det_typed.type_stats().paired_true} - {0})
        if present:
            scores = det_typed.type_scores(present)
            metrics["type_f1"] = float(np.nanmean([scores.f1[c] for c in present]))
    return metrics


def _majority_class(inst: np.ndarray, types: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Most frequent non-negative class id per instance id (``-1`` when none)."""
    out = np.full(len(ids), -1, np.int64)
    m = (inst > 0) & (types > 0)
    if not m.any():
        return out
    n_cls = int(types[m].max()) + 1
    pos = np.searchsorted(ids, inst[m])
    table = np.zeros((len(ids), n_cls), np.int64)
    np.add.at(table, (pos, types[m]), 1)
    has = table.sum(1) > 0
    out[has] = table[has].argmax(1)
    return out
