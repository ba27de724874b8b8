"""The held-out MoNuSeg *training* images that benchmarks make their choices on, and how they are scored.

The 4 images are ``split_groups(groups, 0.15, seed 0)`` of MoNuSeg train: the validation split of the default
model's stage 1 (``configs/default_model.yaml``). The MoNuSeg test split is never used for a choice. Caveat: the
default model's stage 1b (v2 and v3) was trained with another split and saw 3 of these 4 images (TCGA-21-5786,
TCGA-B0-5698, TCGA-HE-7130; only TCGA-G9-6356 was held out of every stage), so for v2/v3 they are not held out;
a model trained with ``split_seed: 0`` for MoNuSeg has never seen them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cytoken.io.datasets import open_dataset
from cytoken.metrics import detection_radius, detection_scores, instance_centroids, instance_scores
from cytoken.models.store import load_model
from cytoken.pipeline.image import SegmentConfig, segment_image_with_labels
from cytoken.pipeline.predictor import Predictor
from cytoken.postprocess import HoverConfig
from cytoken.training.data import split_groups


def load_for_heldout(shared: Path, model: str, threads: int) -> tuple:
    """The start of a held-out benchmark: check the MoNuSeg data is there, set torch's threads, load the model.

    Returns ``load_model(model)``'s ``(model, info)``.
    """
    if not (shared / "monuseg").is_dir():
        raise SystemExit(f"{shared / 'monuseg'} is missing: this benchmark needs ../shared/data")
    torch.set_num_threads(threads)
    return load_model(model)


def heldout_monuseg(shared: Path) -> list:
    """The held-out MoNuSeg training images (dataset samples with ``image``, ``inst_map``, ``source_id``)."""
    ds = open_dataset("monuseg", shared / "monuseg", split="train")
    _, val = split_groups(ds.groups, 0.15, 0)
    return [ds[i] for i in val]


def score_images(samples: list, predictor: Predictor, hover: HoverConfig | None = None) -> dict:
    """Segment each image (at 0.25 µm/px) and score it: mean bPQ and Dice, pooled detection P/R/F1, CPU seconds."""
    pqs, dices, tp, fp, fn = [], [], 0, 0, 0
    cpu = time.process_time()
    for s in samples:
        config = SegmentConfig(embeddings="none", hover=hover, tta=predictor.tta, amp=predictor.amp)
        cells, labels = segment_image_with_labels(s.image, predictor, 0.25, config=config)
        sc = instance_scores(s.inst_map, labels)
        pqs.append(sc.pq.pq)
        dices.append(sc.dice)
        d = detection_scores(instance_centroids(s.inst_map)[1], cells.centroids, detection_radius(0.25))
        tp, fp, fn = tp + d.tp, fp + d.fp, fn + d.fn
    return {
        "images": [s.source_id for s in samples],
        "bpq": float(np.mean(pqs)),
        "dice": float(np.mean(dices)),
        "det_precision": tp / max(1, tp + fp),
        "det_recall": tp / max(1, tp + fn),
        "det_f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "cpu_s": time.process_time() - cpu,
    }
