# ruff: noqa: E402
"""HoVer post-processing speed and quality: cytoken ``decode_hover`` vs TIAToolbox and the PyPI ``cellvit`` package.

Inputs are built from real MoNuSeg label maps (default: the 14 official test images, ~480 nuclei each; labels are
1000x1000 and padded to 1024x1024): ``nuclei_prob`` = Gaussian-blurred foreground + noise, ``hv`` =
``hv_targets(labels)`` blurred + noise, ``type_prob`` = a 6-channel softmax (background + 5 classes, one random class
per nucleus) with noisy logits; all clipped to their ranges and seeded. Every method gets the same maps (in its own
layout, converted outside the timer) and runs in this one process, single-threaded, round-robin per map. Quality is
binary PQ (unique IoU > 0.5 matching) of each instance map against the noise-free labels.

Two levels are timed:

* ``instances``: instance map only. cytoken ``hover_instances_map``; TIAToolbox ``HoVerNet._proc_np_hv``;
  cellvit ``DetectionCellPostProcessor._get_pred_inst_tensor`` (``_proc_np_hv`` + ``remap_label``).
* ``full``: instance map + per-cell records (bbox, centroid, contour, class). cytoken ``decode_hover``;
  TIAToolbox ``_proc_np_hv`` + ``get_instance_info``; cellvit ``post_process_single_image``.

cytoken is run twice: with the default :class:`HoverConfig` and with ``HoverConfig.cellvit()`` (the CellViT++
recipe, to compare building blocks on the same algorithm).

Run (from the repository root, cytoken installed in the active venv)::

    python benchmarks/bench_postprocess.py                      # writes benchmarks/results/postprocess.{json,md}
    python benchmarks/bench_postprocess.py --images 3 --repeats 2 --no-write   # quick look

Peers are NOT dependencies of cytoken. They are installed into a separate directory that this script appends to
``sys.path`` (default ``../peers/site`` next to the repository, or ``--peers-site`` / ``$CYTOKEN_PEERS_SITE``); a
missing or broken peer is skipped with a message::

    pip install --no-deps --target ../peers/site tiatoolbox==2.1.3 cellvit==1.0.9 \\
        dask toolz cloudpickle fsspec partd locket packaging importlib_metadata lazy_importer joblib psutil \\
        requests urllib3 idna certifi charset-normalizer matplotlib pyparsing cycler kiwisolver fonttools \\
        zarr donfig numcodecs google-crc32c einops ray msgpack protobuf jsonschema jsonschema-specifications \\
        attrs referencing rpds-py

torch, numpy, scipy, scikit-image, opencv, pandas, pyyaml, shapely, pillow, tifffile, tqdm and filelock come from the
cytoken venv. TIAToolbox's ``tiatoolbox.models`` package imports timm/torchvision, which do not work beside the CPU
torch here, so only its ``hovernet`` module file is imported (its two parent packages are registered without
running their ``__init__``); the post-processing code itself is TIAToolbox's, unmodified.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import importlib
import json
import platform
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cytoken.metrics import panoptic_quality
from cytoken.postprocess import HoverConfig, decode_hover, hover_instances_map, hv_targets

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
SIZE = 1024
N_TYPES = 6  # background + 5 classes, as PanNuke/CellViT


# ----------------------------------------------------------------------------------------------------------- data
def make_maps(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Noisy model-like maps from a label image padded/cropped to SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    h, w = labels.shape
    gt = np.zeros((SIZE, SIZE), np.int32)
    oy, ox = max(0, (SIZE - h) // 2), max(0, (SIZE - w) // 2)
    crop = labels[: SIZE - oy, : SIZE - ox].astype(np.int32)
    gt[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
    fg = (gt > 0).astype(np.float32)
    prob = cv2.GaussianBlur(fg, (0, 0), 1.0) + rng.normal(0, 0.1, fg.shape).astype(np.float32)
    prob = np.clip(prob, 0, 1).astype(np.float32)
    hv = hv_targets(gt)
    hv = np.stack([cv2.GaussianBlur(c, (0, 0), 1.0) for c in hv])
    hv = np.clip(hv + rng.normal(0, 0.1, hv.shape).astype(np.float32), -1, 1).astype(np.float32)
    cls = np.concatenate([[0], rng.integers(1, N_TYPES, gt.max())])
    logits = rng.normal(0, 0.5, (N_TYPES, SIZE, SIZE)).astype(np.float32)
    logits[0] += 3.0 * (1 - fg)
    onehot = np.eye(N_TYPES, dtype=np.float32)[cls[gt]].transpose(2, 0, 1)
    logits += 2.5 * onehot * fg
    e = np.exp(logits - logits.max(0))
    type_prob = (e / e.sum(0)).astype(np.float32)
    return {"gt": gt, "prob": prob, "hv": hv, "type_prob": type_prob}


# ----------------------------------------------------------------------------------------------------------- metric
def binary_pq(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary panoptic quality with unique IoU > 0.5 matching (:func:`cytoken.metrics.panoptic_quality`)."""
    return float(panoptic_quality(gt, pred).pq)


# ----------------------------------------------------------------------------------------------------------- peers
def load_tiatoolbox() -> Any:
    """TIAToolbox's HoVerNet class, imported from its module file (skipping timm-importing package inits)."""
    import tiatoolbox

    root = Path(tiatoolbox.__file__).parent
    for name in ("tiatoolbox.models", "tiatoolbox.models.architecture"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = mod
    hovernet = importlib.import_module("tiatoolbox.models.architecture.hovernet")
    return hovernet.HoVerNet, tiatoolbox.__version__


def load_cellvit() -> Any:
    """The NumPy post-processor of the PyPI ``cellvit`` package (CellViT++ inference)."""
    from importlib.metadata import version

    from cellvit.inference.postprocessing_numpy import DetectionCellPostProcessor

    return DetectionCellPostProcessor(wsi=None, nr_types=N_TYPES), version("cellvit")


def build_methods(peers: dict[str, Any]) -> dict[str, dict[str, Callable[[dict], Any]]]:
    """Per level, name -> (prepared inputs -> instance map or (map, cells))."""
    default, cellvit_cfg = HoverConfig(), HoverConfig.cellvit()
    inst = {
        "cytoken": lambda d: hover_instances_map(d["prob"], d["hv"], 0.25, config=default),
        "cytoken (CellViT++ recipe)": lambda d: hover_instances_map(d["prob"], d["hv"], 0.25, config=cellvit_cfg),
    }
    full = {
        "cytoken": lambda d: decode_hover(d["prob"], d["hv"], d["type_prob"], 0.25, config=default),
        "cytoken (CellViT++ recipe)": lambda d: decode_hover(
            d["prob"], d["hv"], d["type_prob"], 0.25, config=cellvit_cfg
        ),
    }
    if "tiatoolbox" in peers:
        hovernet = peers["tiatoolbox"]
        inst["TIAToolbox"] = lambda d: hovernet._proc_np_hv(d["tia_np"], d["tia_hv"])

        def tia_full(d: dict) -> Any:
            pred = hovernet._proc_np_hv(d["tia_np"], d["tia_hv"])
            return pred, hovernet.get_instance_info(pred, d["tia_tp"], verbose=False)

        full["TIAToolbox"] = tia_full
    if "cellvit" in peers:
        post = peers["cellvit"]
        inst["cellvit (PyPI)"] = lambda d: post._get_pred_inst_tensor(d["cv_map"])[0]
        full["cellvit (PyPI)"] = lambda d: post.post_process_single_image(d["cv_map"])
    return {"instances": inst, "full": full}


def peer_inputs(d: dict[str, np.ndarray]) -> None:
    """Peers' layouts (HWC, argmax type map), prepared outside the timer."""
    tmap = d["type_prob"].argmax(0).astype(np.int32)
    d["tia_np"] = d["prob"][..., None]
    d["tia_hv"] = np.ascontiguousarray(d["hv"].transpose(1, 2, 0))
    d["tia_tp"] = tmap.astype(np.uint8)
    d["cv_map"] = np.stack([tmap.astype(np.float32), d["prob"], d["hv"][0], d["hv"][1]], axis=-1)


def inst_of(result: Any) -> np.ndarray:
    """The instance map out of any method's result."""
    if hasattr(result, "inst_map"):
        return result.inst_map
    if isinstance(result, tuple):
        return np.asarray(result[0])
    return np.asarray(result)


# ----------------------------------------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    import scipy
    import skimage

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "opencv": cv2.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["train", "test"], help="MoNuSeg split (default test)")
    ap.add_argument("--images", type=int, default=0, help="use only the first N images (0 = all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and map (median kept)")
    ap.add_argument("--peers-site", default=os.environ.get("CYTOKEN_PEERS_SITE", str(ROOT.parent / "peers" / "site")))
    ap.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="cpu: process CPU time (default; every method is single-threaded, so other jobs on a shared machine "
        "do not inflate it); wall: elapsed time (use on an idle machine)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)
    label_dir = SHARED / "monuseg" / args.split / "labels"
    files = sorted(label_dir.glob("*.png"))
    if not files:
        print(f"no MoNuSeg labels under {label_dir}; nothing to benchmark")
        return 0
    if args.images:
        files = files[: args.images]

    peers: dict[str, Any] = {}
    versions: dict[str, str] = {}
    if Path(args.peers_site).is_dir():
        sys.path.append(args.peers_site)
    for name, loader in (("tiatoolbox", load_tiatoolbox), ("cellvit", load_cellvit)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peers[name], versions[name] = loader()
        except Exception as exc:  # a missing/broken peer is skipped, not fatal
            print(f"skipping peer {name}: {type(exc).__name__}: {exc}")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    methods = build_methods(peers)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    times: dict[str, dict[str, list[float]]] = {lvl: {m: [] for m in ms} for lvl, ms in methods.items()}
    pqs: dict[str, list[float]] = {m: [] for m in methods["instances"]}
    n_nuclei = []
    for k, path in enumerate(files):
        labels = np.array(Image.open(path))
        d = make_maps(labels, seed=k)
        peer_inputs(d)
        n_nuclei.append(int(len(np.unique(d["gt"])) - 1))
        for level, ms in methods.items():
            runs: dict[str, list[float]] = {m: [] for m in ms}
            for _ in range(args.repeats):
                for name, fn in ms.items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t0 = clock()
                        res = fn(d)
                        runs[name].append(clock() - t0)
                    if level == "instances" and len(runs[name]) == 1:
                        pqs[name].append(binary_pq(d["gt"], inst_of(res)))
            for name in ms:
                times[level][name].append(float(np.median(runs[name])))
        line = " | ".join(f"{m} {times['instances'][m][-1] * 1e3:.0f}/{times['full'][m][-1] * 1e3:.0f} ms" for m in pqs)
        print(f"[{k + 1}/{len(files)}] {path.stem} ({n_nuclei[-1]} nuclei): {line}", flush=True)

    summary: dict[str, Any] = {"levels": {}, "pq": {}}
    for level in methods:
        ours = float(np.median(times[level]["cytoken"]))
        summary["levels"][level] = {
            m: {
                "median_ms": float(np.median(v)) * 1e3,
                "per_map_ms": [t * 1e3 for t in v],
                "time_vs_cytoken": float(np.median(v)) / ours,
            }
            for m, v in times[level].items()
        }
    for m, v in pqs.items():
        summary["pq"][m] = {"mean": float(np.mean(v)), "min": float(np.min(v)), "per_map": v}
    report = {
        "benchmark": "HoVer post-processing, 1024x1024 maps, single thread",
        "machine": machine(),
        "threads": 1,
        "clock": "process CPU time" if args.clock == "cpu" else "wall time",
        "peers": versions,
        "data": {
            "dataset": f"MoNuSeg {args.split}",
            "images": [p.stem for p in files],
            "nuclei_per_map": n_nuclei,
            "maps": "labels padded to 1024x1024; prob = blur(fg, 1 px) + N(0, 0.1); hv = blur(hv_targets, 1 px) + "
            "N(0, 0.1); type_prob = softmax of noisy logits, 6 channels",
        },
        "repeats": args.repeats,
        **summary,
    }
    md = render_markdown(report)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "postprocess.json").write_text(json.dumps(report, indent=2))
        (RESULTS / "postprocess.md").write_text(md)
        print(f"wrote {RESULTS / 'postprocess.json'} and {RESULTS / 'postprocess.md'}")
    return 0


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# HoVer post-processing benchmark",
        "",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}), Python {m['python']}, numpy {m['numpy']}, "
        f"scipy {m['scipy']}, scikit-image {m['scikit-image']}, OpenCV {m['opencv']}",
        f"- threads: {r['threads']} (OMP/OpenBLAS/MKL env, cv2.setNumThreads(1), torch.set_num_threads(1))",
        f"- peers: {', '.join(f'{k} {v}' for k, v in r['peers'].items()) or 'none installed'}",
        f"- data: {r['data']['dataset']}, {len(r['data']['images'])} images "
        f"({', '.join(r['data']['images'])}), {int(np.mean(r['data']['nuclei_per_map']))} nuclei per map on average",
        f"- maps: {r['data']['maps']}",
        f"- timing: {r.get('clock', 'wall time')}, median of {r['repeats']} round-robin runs per map, then median over "
        "maps; all methods in one process",
        "",
        "| method | instances: median ms/map | x slower than cytoken | full (cells too): median ms/map "
        "| x slower than cytoken | binary PQ mean (min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in r["levels"]["instances"]:
        a, b, q = r["levels"]["instances"][name], r["levels"]["full"][name], r["pq"][name]
        lines.append(
            f"| {name} | {a['median_ms']:.1f} | {a['time_vs_cytoken']:.2f} | {b['median_ms']:.1f} | "
            f"{b['time_vs_cytoken']:.2f} | {q['mean']:.4f} ({q['min']:.4f}) |"
        )
    lines += [
        "",
        "PQ is computed on the instance maps against the noise-free labels. 'full' adds per-cell bbox, centroid,",
        "contour and class (cytoken: `decode_hover`, valid shapely contours, mean class probability).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
