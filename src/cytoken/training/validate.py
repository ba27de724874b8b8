"""Per-epoch validation with the metrics module (bPQ, Dice, detection F1) on fixed crops."""

from __future__ import annotations

import numpy as np
import torch

from cytoken.metrics import detection_radius, detection_scores, dice, instance_centroids, panoptic_quality
from cytoken.models.segmenter import CellSegmenter
from cytoken.postprocess import hover as _hover
from cytoken.training.data import ValCrop

__all__ = ["validate"]


@torch.no_grad()
def validate(model: CellSegmenter, crops: list[ValCrop], device: torch.device, *, mpp: float = 0.25,
             batch_size: int = 8) -> dict[str, float]:  # fmt: skip
    """Segment every crop and score it: mean bPQ and Dice over crops, detection F1 from summed TP/FP/FN."""
    was_training = model.training
    model.eval()
    pqs, dices = [], []
    tp = fp = fn = 0
    radius = detection_radius(mpp)
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        x = torch.from_numpy(np.stack([c.image for c in chunk])).to(device)
        out = model(model.preprocess(x))
        nuc = out.nuclei_prob[:, 1].float().cpu().numpy()
        hv = out.hv.float().cpu().numpy()
        tprob = None if out.type_prob is None else out.type_prob.float().cpu().numpy()
        for j, crop in enumerate(chunk):
            res = _hover.decode_hover(nuc[j], hv[j], None if tprob is None else tprob[j], mpp)
            pqs.append(panoptic_quality(crop.inst, res.inst_map).pq)
            dices.append(dice(crop.inst, res.inst_map))
            det = detection_scores(instance_centroids(crop.inst)[1], res.cells.centroids, radius)
            tp, fp, fn = tp + det.tp, fp + det.fp, fn + det.fn
    model.train(was_training)
    f1 = 2 * tp / max(1, 2 * tp + fp + fn)
    return {"bpq": float(np.nanmean(pqs)), "dice": float(np.nanmean(dices)), "det_f1": float(f1)}
