"""End-to-end segmentation speed of a model on 2 CPU threads, against the machine's own FLOP rate.

Measures, in one process:
- the machine's fp32 and bfloat16 matmul rates (GFLOP/s, 2 threads, 2048² x 2048² torch.mm), timed in the same
  interleaved loop as the forward passes below (the median of the repeats), because this shared machine's rate moves
  by 20 % from minute to minute;
- the model's forward FLOPs per 256² tile (torch.utils.flop_counter);
- forward-only throughput (tiles/s) -> achieved GFLOP/s and the fraction of the matmul rate, timed in interleaved
  repeats (median per batch) so that machine noise hits all variants alike; the FLOPs are the plain model's for all
  (folding removes no matmul/conv work). Variants: ``plain`` (the model as loaded, one batch over both threads),
  ``fast`` (the ``Predictor``'s inference copy, ``cytoken.models.inference``: batch norms folded, channels-last; one
  stream), ``streams`` (the ``Predictor`` as cytoken runs it: the inference copy with the batch split into 2 streams
  of 1 thread each) and ``amp`` (the same with bfloat16 autocast, ``--amp``, against the machine's bfloat16 matmul
  rate). The ``Predictor`` variants include turning uint8 tiles into model input and the maps into numpy;
- end to end on real images: read PNG, forward, HoVer post-processing, embeddings, writing all outputs
  (``cytoken.pipeline.run.segment_image_file``), in 256² tiles per second of wall time.

Run: ``python benchmarks/bench_segment_speed.py [--model cytoken-default] [--images N]``
Data: MoNuSeg test images from ../shared/data/monuseg/test/images (real H&E, 1000², 0.25 µm/px).
Writes benchmarks/results/segment_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cytoken.models.store import load_model
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.predictor import Predictor
from cytoken.pipeline.run import segment_image_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "test" / "images"
OUT = ROOT / "benchmarks" / "results"


MATMUL_N = 2048
MATMUL_REPS = 5
MATMUL_FLOPS = 2 * MATMUL_N**3 * MATMUL_REPS  # one call of matmul()'s function


def matmul(dtype: torch.dtype) -> Callable[[], None]:
    """``MATMUL_REPS`` products of two ``MATMUL_N``² matrices (``MATMUL_FLOPS``)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)

    def run() -> None:
        for _ in range(MATMUL_REPS):
            torch.mm(a, b)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15, help="interleaved forward timings per variant")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, info = load_model(args.model)
    model.eval()
    x_np = np.random.default_rng(0).integers(0, 256, (args.batch_size, 256, 256, 3), dtype=np.uint8)
    x = torch.from_numpy(x_np)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(model.preprocess(x[:1]))
    flops_tile = fc.get_total_flops()
    fast, streams, amp = Predictor(model, streams=1), Predictor(model), Predictor(model, amp=True)

    def plain() -> None:
        with torch.inference_mode():
            model(model.preprocess(x))

    variants: dict[str, Callable[[], object]] = {
        "plain": plain,  # the model as loaded, one batch across both threads
        "fast": lambda: fast(x_np),  # the inference copy, one stream
        "streams": lambda: streams(x_np),  # the Predictor as cytoken runs it: inference copy, 2 streams
        "amp": lambda: amp(x_np),  # the same with bfloat16 autocast (--amp)
        "matmul_fp32": matmul(torch.float32),
        "matmul_bf16": matmul(torch.bfloat16),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (oneDNN primitives for these shapes, stream threads)
        fn()
    for _ in range(args.repeats):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    per_tile = {k: statistics.median(v) / args.batch_size for k, v in times.items() if not k.startswith("matmul")}
    peak, peak_bf16 = (MATMUL_FLOPS / statistics.median(times[k]) / 1e9 for k in ("matmul_fp32", "matmul_bf16"))

    def fraction(k: str, rate: float) -> float:
        return round(flops_tile / per_tile[k] / 1e9 / rate, 3)

    images = sorted(DATA.glob("*.png"))[: args.images]
    cfg = SegmentConfig(batch_size=args.batch_size)
    tiles = 0
    cells = 0
    with tempfile.TemporaryDirectory() as tmp:
        segment_image_file(images[0], Path(tmp), streams, info, cfg, mpp=0.25)  # warm-up
        t = time.perf_counter()
        for p in images:
            s = segment_image_file(p, Path(tmp), streams, info, cfg, mpp=0.25, overlay=True)
            tiles += s["tiles"]
            cells += s["cells"]
        e2e = time.perf_counter() - t
    fwd_s = per_tile["streams"]
    res = {
        "model": info.name,
        "model_sha256": info.sha256,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "matmul_gflops": round(peak, 1),
        "forward_gflop_per_tile": round(flops_tile / 1e9, 3),
        "forward_tiles_per_s": round(1 / fwd_s, 2),
        "forward_gflops_achieved": round(flops_tile / fwd_s / 1e9, 1),
        "fraction_of_matmul_rate": fraction("streams", peak),
        "plain_forward_tiles_per_s": round(1 / per_tile["plain"], 2),
        "plain_fraction_of_matmul_rate": fraction("plain", peak),
        "fast_fraction_of_matmul_rate": fraction("fast", peak),
        "fast_over_plain_speed": round(per_tile["plain"] / per_tile["fast"], 3),
        "streams_over_fast_speed": round(per_tile["fast"] / per_tile["streams"], 3),
        "bf16_matmul_gflops": round(peak_bf16, 1),
        "amp_forward_tiles_per_s": round(1 / per_tile["amp"], 2),
        "amp_over_streams_speed": round(per_tile["streams"] / per_tile["amp"], 3),
        "amp_fraction_of_bf16_matmul_rate": fraction("amp", peak_bf16),
        "forward_repeats": args.repeats,
        "end_to_end_images": len(images),
        "end_to_end_tiles": tiles,
        "end_to_end_cells": cells,
        "end_to_end_seconds": round(e2e, 2),
        "end_to_end_tiles_per_s": round(tiles / e2e, 2),
        "data": f"MoNuSeg test images ({', '.join(p.stem for p in images)})",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "segment_speed.json").write_text(json.dumps(res, indent=2))
    md = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in res.items()]
    (OUT / "segment_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
