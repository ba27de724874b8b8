"""Whole-slide pipeline: the real CMU-1-Small-Region slide end to end, and memory flatness with slide size.

1. ``CMU-1-Small-Region.svs`` (real Aperio, 20x, 0.499 µm/px, upsampled to 0.25 on the fly): wall time, tiles/s,
   cells, peak RSS (``run.json``'s ``peak_rss_tree_mb``: main process + worker processes, summed; and the main
   process alone), and CPU utilisation of the run (user+sys CPU seconds / wall seconds; 2.0 = both cores busy),
   which shows reading, inference and decoding overlapping.
2. Memory flatness: pyramidal tiled TIFFs of 1x, 4x and 16x the area, built by tiling real tissue (a 1024² crop
   of the CMU-1 slide) in a temp dir, each segmented in a fresh subprocess with ``--roi``-free full runs; peak RSS
   of the process tree must stay flat (<= 1.2x from 1x to 16x, < 3 GB) and wall time should grow linearly.

Run: ``python benchmarks/bench_slide.py [--model cytoken-default] [--sizes 1 4 16] [--svs PATH]``.
Writes benchmarks/results/slide.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
OUT = ROOT / "benchmarks" / "results"


def run_cli(args: list[str]) -> dict:
    """Run ``cytoken segment`` in a subprocess; return its run.json plus wall/CPU times and peak RSS."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "cytoken.cli.main", "segment", *args, "--quiet"],
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"cytoken failed: {proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "cpu_utilisation": cpu / wall, "stdout": proc.stdout.strip()}


def make_pyramid(tile: np.ndarray, reps: int, path: Path) -> None:
    """A tiled pyramidal TIFF of ``reps x reps`` copies of ``tile`` (mirrored so seams look like tissue)."""
    import tifffile

    row = np.concatenate([tile if i % 2 == 0 else tile[:, ::-1] for i in range(reps)], axis=1)
    img = np.concatenate([row if j % 2 == 0 else row[::-1] for j in range(reps)], axis=0)
    res = 1e4 / 0.499  # pixels per cm at 0.499 µm/px
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
        tw.write(img, subifds=2, resolution=(res, res), resolutionunit="CENTIMETER", **opts)
        for k in (2, 4):
            tw.write(img[::k, ::k], subfiletype=1, **opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="area multiples (squares)")
    ap.add_argument("--svs", type=Path, default=SVS, help=f"the CMU-1-Small-Region.svs file (default {SVS})")
    args = ap.parse_args()
    svs = args.svs
    from cytoken.io.slide import open_slide
    from cytoken.types import Bounds

    results: dict = {"model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = run_cli([str(svs), "--out", str(tmp / "cmu"), "--model", args.model])
        run = json.loads((tmp / "cmu" / svs.stem / "run.json").read_text())
        results["cmu1_small_region"] = {
            "tiles": run["tiles"], "cells": run["cells"], "wall_s": round(r["wall_s"], 1),
            "tiles_per_s": round(run["tiles"] / r["wall_s"], 2), "peak_rss_mb": run["peak_rss_tree_mb"],
            "peak_rss_main_mb": run["peak_rss_main_mb"],
            "cpu_utilisation": round(r["cpu_utilisation"], 2), "cells_per_class": run["cells_per_class"],
        }  # fmt: skip
        with open_slide(svs) as s:
            crop = s.read_region(Bounds(600, 900, 1024, 1024), s.mpp)
        flat = []
        for k in args.sizes:
            reps = round(k**0.5)
            path = tmp / f"tiled_{k}x.tiff"
            make_pyramid(crop, reps, path)
            r = run_cli([str(path), "--out", str(tmp / f"o{k}"), "--model", args.model, "--slide"])
            run = json.loads((tmp / f"o{k}" / path.stem / "run.json").read_text())
            flat.append({"area_x": k, "pixels": (1024 * reps) ** 2, "tiles": run["tiles"], "cells": run["cells"],
                         "wall_s": round(r["wall_s"], 1), "peak_rss_mb": run["peak_rss_tree_mb"],
                         "peak_rss_main_mb": run["peak_rss_main_mb"],
                         "cpu_utilisation": round(r["cpu_utilisation"], 2)})  # fmt: skip
        results["memory_flatness"] = flat
    if len(flat) > 1:
        results["rss_growth_1x_to_max"] = round(flat[-1]["peak_rss_mb"] / flat[0]["peak_rss_mb"], 3)
        results["wall_per_tile_s"] = [round(f["wall_s"] / max(1, f["tiles"]), 3) for f in flat]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "slide.json").write_text(json.dumps(results, indent=2))
    c = results["cmu1_small_region"]
    md = [
        "| run | tiles | cells | wall s | tiles/s | peak RSS MB, all processes | main process | CPU utilisation "
        "(2 = both cores) |",
        "|---|---|---|---|---|---|---|---|",
        f"| CMU-1-Small-Region.svs | {c['tiles']} | {c['cells']} | {c['wall_s']} | {c['tiles_per_s']} | "
        f"{c['peak_rss_mb']} | {c['peak_rss_main_mb']} | {c['cpu_utilisation']} |",
    ]
    for f in flat:
        md.append(f"| tiled TIFF {f['area_x']}x area | {f['tiles']} | {f['cells']} | {f['wall_s']} | "
                  f"{round(f['tiles'] / f['wall_s'], 2)} | {f['peak_rss_mb']} | {f['peak_rss_main_mb']} | "
                  f"{f['cpu_utilisation']} |")  # fmt: skip
    if "rss_growth_1x_to_max" in results:
        md.append(f"\nPeak RSS (all processes) growth from {flat[0]['area_x']}x to {flat[-1]['area_x']}x area: "
                  f"{results['rss_growth_1x_to_max']}x")  # fmt: skip
    md.append("\nPeak RSS, all processes: the main process and its worker processes (1 tile reader, 1 decoder, the "
              "multiprocessing resource tracker), summed, sampled from /proc every 0.25 s (`peak_rss_tree_mb` in "
              "run.json); shared library pages count once per process, so it is an upper bound. Main process: "
              "`getrusage` of the main process alone (`peak_rss_main_mb`).")
    (OUT / "slide.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
