"""Tune a model's HoVer post-processing on held-out MoNuSeg *training* images (never the test split).

The validation images are the ones the training configs hold out (``split_groups(groups, 0.15, seed 0)`` of MoNuSeg
train: 4 of 30 images). Each image is segmented once (model outputs are cached by tile), then every configuration of
the grid is decoded and scored (bPQ and Dice averaged over images, detection precision/recall/F1 summed). The best
configuration by bPQ + Dice + detection F1 (the three floors of the default model) is what ``cytoken-default`` stores
in ``SegmenterConfig.postprocess``. (Up to v2 the choice was by bPQ alone; with the confidence filter in the grid,
bPQ alone picked a setting that gave up 0.007 Dice and 0.008 F1 for 0.0015 bPQ.)

Run (repository root): ``python benchmarks/tune_postprocess.py --model runs/default_model_stage2/final.safetensors``
Writes ``benchmarks/results/postprocess_tuning.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from _heldout import heldout_monuseg, score_images
from cytoken.models.store import load_model
from cytoken.pipeline.predictor import Predictor
from cytoken.postprocess import HoverConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


class CachedPredictor(Predictor):
    """Runs the model once per distinct batch of tiles; post-processing variants reuse the maps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache: dict[str, list] = {}

    def __call__(self, tiles: np.ndarray) -> list:
        key = hashlib.sha1(np.ascontiguousarray(tiles).tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = super().__call__(tiles)
        return self.cache[key]


def grid() -> dict[str, HoverConfig]:
    """The configurations tried: both recipes at their defaults, thresholds x minimum sizes, marker thresholds,
    and the CellViT++ recipe with the confidence filter (``min_mean_prob``)."""
    out = {"HoverConfig()": HoverConfig(), "HoverConfig.cellvit()": HoverConfig.cellvit()}
    for base_name, base in (("refined", HoverConfig()), ("cellvit", HoverConfig.cellvit())):
        for fg, mo in itertools.product([0.3, 0.4, 0.5], [10.0, 30.0, 50.0]):
            out[f"{base_name} fg={fg} min={mo:g}"] = replace(base, fg_threshold=fg, min_object_px=mo)
        for mt in (0.35, 0.45):
            out[f"{base_name} fg=0.3 min=50 marker={mt}"] = replace(
                base, fg_threshold=0.3, min_object_px=50.0, marker_threshold=mt
            )
    # the confidence filter (min_mean_prob) on the CellViT++ recipe, which scored best before it existed
    for fg, mt, mp in itertools.product([0.3, 0.4], [0.4, 0.45], [0.5, 0.55, 0.6, 0.65, 0.7, 0.75]):
        out[f"cellvit fg={fg} min=50 marker={mt} conf={mp}"] = replace(
            HoverConfig.cellvit(), fg_threshold=fg, min_object_px=50.0, marker_threshold=mt, min_mean_prob=mp
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cytoken-default", help="model name or weights file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = SHARED / "monuseg"
    if not root.is_dir():
        print(f"no MoNuSeg data under {root}; nothing to tune")
        return 0
    samples = heldout_monuseg(SHARED)
    model, info = load_model(args.model)
    predictor = CachedPredictor(model)
    rows = []
    t0 = time.time()
    for name, cfg in grid().items():
        sc = score_images(samples, predictor, cfg)
        row = {"name": name, "bpq": sc["bpq"], "dice": sc["dice"], "det_f1": sc["det_f1"],
               "score": sc["bpq"] + sc["dice"] + sc["det_f1"], "precision": sc["det_precision"],
               "recall": sc["det_recall"], "config": asdict(cfg)}  # fmt: skip
        rows.append(row)
        print(f"{name}: bPQ {row['bpq']:.4f} Dice {row['dice']:.4f} F1 {row['det_f1']:.4f} ({time.time() - t0:.0f} s)",
              flush=True)  # fmt: skip
    best = max(rows, key=lambda r: r["score"])
    report = {"model": {"name": info.name, "sha256": info.sha256}, "validation_images": [s.source_id for s in samples],
              "rows": rows, "best": best}  # fmt: skip
    table = [
        f"| {r['name']} | {r['bpq']:.4f} | {r['dice']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
        f"{r['det_f1']:.4f} | {r['score']:.4f} |"
        for r in sorted(rows, key=lambda r: -r["score"])
    ]
    lines = [
        "# Post-processing tuning on held-out MoNuSeg training images",
        "",
        f"Model `{info.name}` (sha256 {info.sha256[:12]}…); validation images: "
        + ", ".join(s.source_id for s in samples) + " (never the test split).",
        "",
        "| configuration | bPQ | Dice | det P | det R | det F1 | bPQ + Dice + F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *table,
        "",
        f"Best by bPQ + Dice + det F1: **{best['name']}**.",
    ]
    print(f"best: {best['name']}")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "postprocess_tuning.json").write_text(json.dumps(report, indent=2))
        (RESULTS / "postprocess_tuning.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
