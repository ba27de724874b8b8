"""End-to-end segmentation speed of a model on 2 CPU threads, against the machine's own FLOP rate.

Measures, in one process:
- the machine's fp32 matmul rate (GFLOP/s, 2 threads, 2048² x 2048² torch.mm);
- the model's forward FLOPs per 256² tile (torch.utils.flop_counter);
- forward-only throughput (tiles/s) -> achieved GFLOP/s and the fraction of the matmul rate, for the model as loaded
  (``plain``) and for the inference copy the ``Predictor`` runs (``fast``: batch norms folded into the convolutions,
  channels-last; ``cytoken.models.inference``), timed in interleaved repeats (median per batch) so that machine noise
  hits both alike; the FLOPs are the plain model's for both (folding removes no matmul/conv work);
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
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cytoken.models.inference import inference_copy
from cytoken.models.store import load_model
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.predictor import Predictor
from cytoken.pipeline.run import segment_image_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "monuseg" / "test" / "images"
OUT = ROOT / "benchmarks" / "results"


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


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
    x = torch.randint(0, 255, (args.batch_size, 256, 256, 3), dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(model.preprocess(x[:1]))
    flops_tile = fc.get_total_flops()
    peak = matmul_gflops()
    variants = {"plain": model, "fast": inference_copy(model)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for m in variants.values():  # warm-up (oneDNN primitives for these shapes)
            m(m.preprocess(x))
        for _ in range(args.repeats):
            for k, m in variants.items():
                t = time.perf_counter()
                m(m.preprocess(x))
                times[k].append(time.perf_counter() - t)
    per_tile = {k: statistics.median(v) / args.batch_size for k, v in times.items()}
    fwd_s = per_tile["fast"]
    achieved = flops_tile / fwd_s / 1e9
    peak_after = matmul_gflops()
    images = sorted(DATA.glob("*.png"))[: args.images]
    predictor = Predictor(model, "cpu")
    cfg = SegmentConfig(batch_size=args.batch_size)
    tiles = 0
    cells = 0
    with tempfile.TemporaryDirectory() as tmp:
        segment_image_file(images[0], Path(tmp), predictor, info, cfg, mpp=0.25)  # warm-up
        t = time.perf_counter()
        for p in images:
            s = segment_image_file(p, Path(tmp), predictor, info, cfg, mpp=0.25, overlay=True)
            tiles += s["tiles"]
            cells += s["cells"]
        e2e = time.perf_counter() - t
    peak_gflops = max(peak, peak_after)
    res = {
        "model": info.name,
        "model_sha256": info.sha256,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "matmul_gflops": round(peak_gflops, 1),
        "forward_gflop_per_tile": round(flops_tile / 1e9, 3),
        "forward_tiles_per_s": round(1 / fwd_s, 2),
        "forward_gflops_achieved": round(achieved, 1),
        "fraction_of_matmul_rate": round(achieved / peak_gflops, 3),
        "plain_forward_tiles_per_s": round(1 / per_tile["plain"], 2),
        "plain_fraction_of_matmul_rate": round(flops_tile / per_tile["plain"] / 1e9 / peak_gflops, 3),
        "fast_over_plain_speed": round(per_tile["plain"] / per_tile["fast"], 3),
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
