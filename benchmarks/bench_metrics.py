"""Time cytoken's instance metrics on real 1000 x 1000 MoNuSeg test label maps against a perturbed copy.

Single thread (BLAS/OpenMP pinned to 1 before numpy loads), median of repeats per call. Writes
``benchmarks/results/metrics.json`` and ``benchmarks/results/metrics.md``.

Usage: python benchmarks/bench_metrics.py [--repeats 21] [--images 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from cytoken.metrics import (  # noqa: E402
    aji,
    aji_plus,
    detection_radius,
    detection_scores,
    dice,
    instance_scores,
    panoptic_quality,
)

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT.parent / "shared" / "data" / "monuseg" / "test" / "labels"
RESULTS = ROOT / "benchmarks" / "results"


def perturb(lab: np.ndarray, seed: int) -> np.ndarray:
    """Drop 5% of nuclei, grow the rest by one pixel, shift by 2 px, add 20 false-positive disks, relabel."""
    rng = np.random.default_rng(seed)
    out = lab.astype(np.int64)
    ids = np.unique(out)[1:]
    out[np.isin(out, rng.choice(ids, size=ids.size // 20, replace=False))] = 0
    out = np.where(out == 0, ndi.grey_dilation(out, size=(3, 3)), out)
    out = np.roll(out, (2, -2), axis=(0, 1))
    yy, xx = np.mgrid[: out.shape[0], : out.shape[1]]
    next_id = int(ids.max()) + 1
    for _ in range(20):
        cy, cx, r = rng.integers(0, 1000), rng.integers(0, 1000), rng.integers(4, 9)
        out[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (out == 0)] = next_id
        next_id += 1
    new_ids = rng.choice(60000, size=next_id, replace=False).astype(np.int64) + 1
    new_ids[0] = 0
    return new_ids[out].astype(np.int32)


def centroids(lab: np.ndarray) -> np.ndarray:
    ids = np.unique(lab)[1:]
    return np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids))[:, ::-1]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--images", type=int, default=3, help="how many of the most crowded test images")
    args = parser.parse_args()
    if not LABELS.exists():
        raise SystemExit(f"MoNuSeg test labels not found at {LABELS}")

    maps = {p.stem: np.array(Image.open(p)) for p in sorted(LABELS.glob("*.png"))}
    counts = {k: len(np.unique(v)) - 1 for k, v in maps.items()}
    chosen = sorted(counts, key=counts.get, reverse=True)[: args.images]

    radius = detection_radius(0.25)
    rows = []
    for seed, name in enumerate(chosen):
        true = maps[name]
        pred = perturb(true, seed)
        t_pts, p_pts = centroids(true), centroids(pred)
        timings = {
            "pq": median_ms(lambda t=true, p=pred: panoptic_quality(t, p), args.repeats),
            "aji": median_ms(lambda t=true, p=pred: aji(t, p), args.repeats),
            "aji_plus": median_ms(lambda t=true, p=pred: aji_plus(t, p), args.repeats),
            "dice": median_ms(lambda t=true, p=pred: dice(t, p), args.repeats),
            "instance_scores": median_ms(lambda t=true, p=pred: instance_scores(t, p), args.repeats),
            "detection": median_ms(lambda a=t_pts, b=p_pts: detection_scores(a, b, radius), args.repeats),
        }
        s = instance_scores(true, pred)
        det = detection_scores(t_pts, p_pts, radius)
        rows.append(
            {
                "image": name,
                "shape": list(true.shape),
                "true_nuclei": counts[name],
                "pred_nuclei": int(len(np.unique(pred)) - 1),
                "ms": {k: round(v, 2) for k, v in timings.items()},
                "values": {
                    "pq": s.pq.pq,
                    "dq": s.pq.dq,
                    "sq": s.pq.sq,
                    "aji": s.aji,
                    "aji_plus": s.aji_plus,
                    "dice": s.dice,
                    "detection_f1": det.f1,
                },
            }
        )
        print(name, counts[name], {k: round(v, 1) for k, v in timings.items()})

    meta = {
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "threads": 1,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "data": "MoNuSeg 2018 test labels (../shared/data/monuseg/test/labels), the most crowded images; "
        "prediction = same map with 5% nuclei dropped, +1 px growth, (2, -2) px shift, 20 false-positive "
        "disks, random non-consecutive ids",
        "repeats": args.repeats,
        "statistic": "median wall time per call, ms",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metrics.json").write_text(json.dumps(meta, indent=2) + "\n")

    lines = [
        "# cytoken.metrics timings",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['logical_cpus']} logical CPUs (shared; load "
        f"average {meta['machine']['load_average_at_start']} at start), Python {meta['machine']['python']}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, 1 thread.",
        "",
        f"Data: {meta['data']}. Median of {args.repeats} calls after one warm-up.",
        "",
        "| image | nuclei (true/pred) | PQ ms | AJI ms | AJI+ ms | Dice ms | all four ms | detection ms | "
        "PQ | AJI | AJI+ | Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms, v = r["ms"], r["values"]
        lines.append(
            f"| {r['image']} | {r['true_nuclei']}/{r['pred_nuclei']} | {ms['pq']:.1f} | {ms['aji']:.1f} | "
            f"{ms['aji_plus']:.1f} | {ms['dice']:.1f} | {ms['instance_scores']:.1f} | "
            f"{ms['detection']:.1f} | "
            f"{v['pq']:.4f} | {v['aji']:.4f} | {v['aji_plus']:.4f} | {v['dice']:.4f} |"
        )
    lines += [
        "",
        "'all four' is `instance_scores` (PQ, AJI, AJI+ and Dice from one overlap table); 'detection' is",
        "`detection_scores` on the instance centroids with the 12 px radius.",
        "",
    ]
    (RESULTS / "metrics.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
