"""``label-from-if`` slide mode: peak memory at 1x and 4x the slide area (target: flat, <= 1.2x).

Inputs, built in a temp dir for each size: a mosaic of real CoNSeP test fields (256² H&E patches at 0.25 µm/px,
distinct patches side by side) written as a tiled TIFF, its expert instance map as a tiled int32 TIFF (``--cells``,
so the run measures the labelling, not the segmentation model), and a **synthetic** two-channel IF (DAPI + MARKER on
the expert inflammatory nuclei, :func:`~cytoken.labeling.synthesize_if`: 0.5 µm/px, under a random rigid + elastic
warp) written as an OME-TIFF. Each size runs ``cytoken label-from-if --tile-px 512`` (slide mode: overview, per-tile
registration, one pooled threshold, labels, tiled marker mask, QC) in a fresh subprocess that reports its peak RSS
(``VmHWM``) and its RSS after the imports. ``--baseline-src DIR`` runs the same command with another checkout's
``src`` (e.g. the code before the window-by-window reading) for comparison.

Run: ``python benchmarks/bench_if_slide_memory.py [--reps 6 12] [--baseline-src ../main/src]``.
Writes benchmarks/results/if_slide_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONSEP = ROOT.parent / "shared" / "data" / "consep_patched" / "test"
OUT = ROOT / "benchmarks" / "results"
HE_MPP, IF_MPP, TILE_PX = 0.25, 0.5, 512


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(argv: list[str]) -> None:
    """Run the command in this process; print its RSS after the imports and its peak RSS (MB) as JSON.

    The peak is ``VmHWM``, the high-water mark of this process image: ``ru_maxrss`` would also count the parent's
    RSS at the fork (Linux keeps it across ``execve``).
    """
    import cytoken.cli.label_from_if
    import cytoken.labeling  # noqa: F401
    from cytoken.cli.main import main

    base = _status_mb("VmRSS")
    rc = main(argv)
    peak = _status_mb("VmHWM")
    print(json.dumps({"rc": rc, "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak, 1)}))


def build(tmp: Path, reps: int) -> dict:
    """A ``reps x reps`` mosaic of distinct CoNSeP test patches: H&E, instance map and synthetic IF files."""
    import tifffile
    from PIL import Image

    from cytoken.classify.dataset import instance_types
    from cytoken.io.ifimage import write_ome_tiff
    from cytoken.labeling import synthesize_if

    names = sorted(p.stem for p in (CONSEP / "images").glob("*.jpg"))[: reps * reps]
    if len(names) < reps * reps:
        raise SystemExit(f"{reps}x{reps} patches needed, {len(names)} found in {CONSEP}")
    rows_he, rows_inst, rows_type = [], [], []
    for r in range(reps):
        he, inst, typ = [], [], []
        for c in range(reps):
            k = r * reps + c
            name = names[k]
            he.append(np.asarray(Image.open(CONSEP / "images" / f"{name}.jpg").convert("RGB")))
            m = np.asarray(Image.open(CONSEP / "inst_maps" / f"{name}.png")).astype(np.int64)
            inst.append(np.where(m > 0, m + 10_000 * k, 0))
            typ.append(np.asarray(Image.open(CONSEP / "type_maps" / f"{name}.png")))
        rows_he.append(np.concatenate(he, 1))
        rows_inst.append(np.concatenate(inst, 1))
        rows_type.append(np.concatenate(typ, 1))
    he, inst = np.concatenate(rows_he, 0), np.concatenate(rows_inst, 0)
    ids, types = instance_types(inst, np.concatenate(rows_type, 0))
    synth = synthesize_if(inst, ids[types == 2], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=0)
    tifffile.imwrite(tmp / "he.tif", he, tile=(256, 256), photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp / "cells.tif", inst.astype(np.int32), tile=(256, 256), compression="zlib")
    write_ome_tiff(synth.image, tmp / "if.ome.tif")
    return {"he_px": list(he.shape[:2]), "if_px": list(synth.image.shape), "cells": len(ids),
            "positive_cells": int((types == 2).sum())}  # fmt: skip


def measure(tmp: Path, src: Path | None) -> dict:
    """One run of the command on the files in ``tmp`` in a fresh subprocess."""
    argv = ["label-from-if", "--he", str(tmp / "he.tif"), "--he-mpp", str(HE_MPP), "--if", str(tmp / "if.ome.tif"),
            "--marker", "MARKER", "--cells", str(tmp / "cells.tif"), "--tile-px", str(TILE_PX),
            "--background", "tophat:40", "--smooth-px", "1", "--min-object-px", "20",
            "--out", str(tmp / "out")]  # fmt: skip
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"label-from-if failed: {proc.stderr[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    return {**res, "wall_s": round(wall, 1), "tiles": len(summary["tiles"]), "counts": summary["counts"],
            "mask_file": sorted(p.name for p in (tmp / "out").glob("marker_mask.*"))}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":  # in its own process, so the runs do not inherit its memory
        print(json.dumps(build(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, nargs="+", default=[6, 12], help="mosaic side in 256-px patches")
    ap.add_argument("--baseline-src", type=Path, default=None, help="also run another checkout's src (before)")
    args = ap.parse_args()
    results: dict = {"tile_px": TILE_PX, "he_mpp": HE_MPP, "if_mpp": IF_MPP, "runs": []}
    for reps in args.reps:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            made = subprocess.run([sys.executable, __file__, "--build", str(tmp), str(reps)], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            info = json.loads(made.stdout.strip().splitlines()[-1])
            for label, src in (("this", None), ("baseline", args.baseline_src)):
                if label == "baseline" and src is None:
                    continue
                run = {"reps": reps, "code": label, **info, **measure(tmp, src)}
                print(json.dumps(run), flush=True)
                results["runs"].append(run)
    this = [r for r in results["runs"] if r["code"] == "this"]
    if len(this) >= 2:
        results["growth"] = round(this[-1]["peak_rss_mb"] / this[0]["peak_rss_mb"], 3)
        results["area_ratio"] = round(np.prod(this[-1]["he_px"]) / np.prod(this[0]["he_px"]), 2)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "if_slide_memory.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# label-from-if slide mode: peak memory against slide area",
        "",
        "Real CoNSeP test H&E patches (distinct 256² fields at 0.25 µm/px) tiled into a mosaic, their expert instance "
        "map as `--cells`, and a **synthetic** IF (DAPI + MARKER on the expert inflammatory nuclei, 0.5 µm/px, random "
        f"rigid + elastic warp); `cytoken label-from-if --tile-px {TILE_PX}` in a fresh process per run "
        "(`benchmarks/bench_if_slide_memory.py`).",
        "",
        "| code | H&E px | IF px | tiles | cells | RSS after imports (MB) | peak RSS (MB) | wall (s) | mask |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['code']} | {r['he_px'][0]}² | {r['if_px'][0]}² | {r['tiles']} | {r['cells']} | "
            f"{r['rss_after_imports_mb']} | {r['peak_rss_mb']} | {r['wall_s']} | {', '.join(r['mask_file'])} |"
        )
    if "growth" in results:
        lines += ["", f"Peak RSS growth from the smallest to the largest run of this code: **{results['growth']}x** "
                  f"for {results['area_ratio']}x the area (target <= 1.2x)."]  # fmt: skip
    (OUT / "if_slide_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
