"""Inference options of the default model — flip TTA (``--tta``) and bfloat16 autocast (``--amp``): quality and cost.

1. **Validation** (the choice): the 4 MoNuSeg *training* images every training config holds out
   (``split_groups(groups, 0.15, seed 0)``), segmented with the model's stored post-processing, plain and with each
   option: bPQ and Dice (mean over images), detection precision / recall / F1 (summed), and the CPU time (process
   CPU seconds: forward, post-processing, all threads).
2. **Test** (reporting only, after the choice): the 14 MoNuSeg test images with ``cytoken evaluate``'s code path
   (:func:`cytoken.pipeline.evaluate.evaluate`), plain and with each option.

Run (repository root): ``python benchmarks/bench_inference_options.py [--model cytoken-default] [--threads 2]``
Writes ``benchmarks/results/inference_options.{md,json}``. ``--amp`` is fast only on CPUs with AVX-512-BF16 or AMX
(``lscpu | grep -o 'amx_bf16\\|avx512_bf16'``); elsewhere bfloat16 is emulated and slower than float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from _heldout import heldout_monuseg, load_for_heldout, score_images
from cytoken.io.datasets import open_dataset
from cytoken.pipeline.evaluate import EvaluateConfig, evaluate
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("bpq", "dice", "det_precision", "det_recall", "det_f1")
OPTIONS: dict[str, dict[str, bool]] = {"plain": {}, "tta": {"tta": True}, "amp": {"amp": True}}


def validation(model: torch.nn.Module, option: dict[str, bool]) -> dict:
    """Scores on the held-out MoNuSeg training images, and the CPU seconds spent."""
    return score_images(heldout_monuseg(SHARED), Predictor(model, **option))


def test(model: torch.nn.Module, option: dict[str, bool]) -> dict:
    """``cytoken evaluate`` on the MoNuSeg test split (same code path), and the CPU seconds spent."""
    ds = open_dataset("monuseg", SHARED / "monuseg", split="test")
    cpu = time.process_time()
    m = evaluate(ds, Predictor(model, **option), EvaluateConfig(segment=SegmentConfig(**option)), progress=False)
    out = {k: m[k] for k in KEYS}
    out["cpu_s"] = time.process_time() - cpu
    return out


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(have) or "none of avx512f/avx512_bf16/amx_bf16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, info = load_for_heldout(SHARED, args.model, args.threads)
    doc: dict = {
        "model": {"name": info.name, "sha256": info.sha256},
        "threads": args.threads,
        "machine": f"{platform.machine()}, CPU flags: {_cpu_flags()}, torch {torch.__version__}",
    }
    for split, fn in (("validation", validation), ("test", test)):
        doc[split] = {name: fn(model, option) for name, option in OPTIONS.items()}
        print(split, json.dumps(doc[split]), flush=True)
    rows = []
    for split in ("validation", "test"):
        for name in OPTIONS:
            r = doc[split][name]
            rows.append(f"| {split} | {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + f" | {r['cpu_s']:.0f} |")
    v, t = doc["validation"], doc["test"]

    def change(name: str) -> str:
        return (
            f"`{name}`: {v[name]['cpu_s'] / v['plain']['cpu_s']:.2f}x the CPU time of plain (validation run; "
            f"post-processing included); validation bPQ {v[name]['bpq'] - v['plain']['bpq']:+.3f}, Dice "
            f"{v[name]['dice'] - v['plain']['dice']:+.3f}, det F1 {v[name]['det_f1'] - v['plain']['det_f1']:+.3f}; "
            f"test bPQ {t[name]['bpq'] - t['plain']['bpq']:+.3f}, Dice {t[name]['dice'] - t['plain']['dice']:+.3f}, "
            f"det F1 {t[name]['det_f1'] - t['plain']['det_f1']:+.3f}."
        )

    lines = [
        "# Inference options: flip TTA (`--tta`) and bfloat16 autocast (`--amp`)",
        "",
        f"Model `{info.name}` (sha256 {info.sha256[:12]}…), its stored post-processing, {args.threads} threads; "
        f"machine: {doc['machine']}. Validation: held-out MoNuSeg training images "
        f"({', '.join(v['plain']['images'])}); test: the 14 MoNuSeg test images (reported after the choice, never "
        "used for it).",
        "",
        "| split | inference | bPQ | Dice | det P | det R | det F1 | CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *(f"- {change(name)}" for name in OPTIONS if name != "plain"),
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference_options.json").write_text(json.dumps(doc, indent=2))
    (RESULTS / "inference_options.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
