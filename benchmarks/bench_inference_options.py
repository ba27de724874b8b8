"""Flip test-time augmentation (``--tta``) with the default model: quality and cost, validation first.

1. **Validation** (the choice): the 4 MoNuSeg *training* images every training config holds out
   (``split_groups(groups, 0.15, seed 0)``), segmented with the model's stored post-processing, without and with
   TTA: bPQ and Dice (mean over images), detection precision / recall / F1 (summed), and the forward-pass CPU time
   ratio.
2. **Test** (reporting only, after the choice): the 14 MoNuSeg test images with ``cytoken evaluate``'s code path
   (:func:`cytoken.pipeline.evaluate.evaluate`), without and with TTA.

Run (repository root): ``python benchmarks/bench_tta.py [--model cytoken-default] [--threads 2]``
Writes ``benchmarks/results/tta.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _heldout import heldout_monuseg, score_images
from cytoken.io.datasets import open_dataset
from cytoken.models.store import load_model
from cytoken.pipeline.evaluate import EvaluateConfig, evaluate
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("bpq", "dice", "det_precision", "det_recall", "det_f1")


def validation(model: torch.nn.Module, tta: bool) -> dict:
    """Scores on the held-out MoNuSeg training images, and the CPU seconds spent."""
    return score_images(heldout_monuseg(SHARED), Predictor(model, tta=tta))


def test(model: torch.nn.Module, tta: bool) -> dict:
    """``cytoken evaluate`` on the MoNuSeg test split (same code path), and the CPU seconds spent."""
    ds = open_dataset("monuseg", SHARED / "monuseg", split="test")
    cpu = time.process_time()
    m = evaluate(ds, Predictor(model, tta=tta), EvaluateConfig(segment=SegmentConfig(tta=tta)), progress=False)
    out = {k: m[k] for k in KEYS}
    out["cpu_s"] = time.process_time() - cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (SHARED / "monuseg").is_dir():
        raise SystemExit(f"{SHARED / 'monuseg'} is missing: this benchmark needs ../shared/data")
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    doc: dict = {"model": {"name": info.name, "sha256": info.sha256}, "threads": args.threads}
    for split, fn in (("validation", validation), ("test", test)):
        doc[split] = {name: fn(model, tta) for name, tta in (("plain", False), ("tta", True))}
        print(split, json.dumps(doc[split]), flush=True)
    rows = []
    for split in ("validation", "test"):
        for name in ("plain", "tta"):
            r = doc[split][name]
            rows.append(
                f"| {split} | {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['cpu_s']:.0f} |"
            )
    v, t = doc["validation"], doc["test"]
    lines = [
        "# Flip test-time augmentation (`--tta`)",
        "",
        f"Model `{info.name}` (sha256 {info.sha256[:12]}…), its stored post-processing, {args.threads} threads. "
        f"Validation: held-out MoNuSeg training images ({', '.join(v['plain']['images'])}); test: the 14 MoNuSeg "
        "test images (reported after the choice, never used for it).",
        "",
        "| split | inference | bPQ | Dice | det P | det R | det F1 | CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"TTA costs {v['tta']['cpu_s'] / v['plain']['cpu_s']:.1f}x the CPU time (validation run; post-processing "
        f"included). Validation change: bPQ {v['tta']['bpq'] - v['plain']['bpq']:+.3f}, Dice "
        f"{v['tta']['dice'] - v['plain']['dice']:+.3f}; test change: bPQ {t['tta']['bpq'] - t['plain']['bpq']:+.3f}, "
        f"Dice {t['tta']['dice'] - t['plain']['dice']:+.3f}.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tta.json").write_text(json.dumps(doc, indent=2))
    (RESULTS / "tta.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
