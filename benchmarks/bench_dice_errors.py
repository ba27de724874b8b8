"""Where a model's Dice is lost: boundaries of found nuclei, spurious objects, or missed nuclei.

On the 4 held-out MoNuSeg *training* images (``_heldout.py``; the test split is never used for a choice), the model
segments each whole image with its stored post-processing, and the foreground pixels it gets wrong are split into:

- **spurious**: predicted-only pixels of predicted objects that lie (< 10 % of their area) off the true foreground;
- **missed**: true-only pixels of true nuclei that lie (< 10 %) off the predicted foreground;
- **boundary**: every other wrong pixel — disagreement about the outline of nuclei both sides found.

Also the median area ratio predicted / true over matched pairs (IoU > 0.5), which says whether outlines are too
large or too small. Dice here is pooled over the images (one ratio of pixel sums), unlike ``cytoken evaluate``'s mean
over images; the split of the errors is what this is for.

Run (repository root): ``python benchmarks/bench_dice_errors.py [--model NAME|FILE] [--tag NAME]``
Writes ``benchmarks/results/dice_errors[_TAG].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _heldout import heldout_monuseg, load_for_heldout
from cytoken.pipeline.image import SegmentConfig, segment_image_with_labels
from cytoken.pipeline.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
OFF = 0.1  # an object with less than this fraction of its area on the other side's foreground is spurious/missed


def _off_objects(labels: np.ndarray, other_fg: np.ndarray) -> int:
    """Pixels of the objects of ``labels`` that have < ``OFF`` of their area on ``other_fg``."""
    ids, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape)
    area = np.bincount(inv.ravel())
    on = np.bincount(inv.ravel(), weights=other_fg.ravel())
    off = on / np.maximum(area, 1) < OFF
    off[ids == 0] = False
    return int(area[off].sum())


def _matched_area_ratios(true: np.ndarray, pred: np.ndarray) -> list[float]:
    """Area predicted / true of each true nucleus whose best-overlapping prediction has IoU > 0.5."""
    out = []
    fg = true > 0
    pair, count = np.unique(np.stack([true[fg], pred[fg]]), axis=1, return_counts=True)
    t_area = np.bincount(true.ravel())
    p_area = np.bincount(pred.ravel())
    best: dict[int, tuple[int, int]] = {}
    for (t, p), c in zip(pair.T, count, strict=True):
        if p and c > best.get(int(t), (0, 0))[1]:
            best[int(t)] = (int(p), int(c))
    for t, (p, inter) in best.items():
        if inter / (t_area[t] + p_area[p] - inter) > 0.5:
            out.append(p_area[p] / t_area[t])
    return out


def analyse(predictor: Predictor, samples: list) -> dict:
    rows, ratios = [], []
    for s in samples:
        _, pred = segment_image_with_labels(s.image, predictor, 0.25, config=SegmentConfig(embeddings="none"))
        true = s.inst_map
        p, t = pred > 0, true > 0
        inter = int((p & t).sum())
        spurious, missed = _off_objects(pred, t), _off_objects(true, p)
        pred_only, true_only = int(p.sum()) - inter, int(t.sum()) - inter
        rows.append({
            "image": s.source_id,
            "dice": 2 * inter / max(1, int(p.sum()) + int(t.sum())),
            "pred_px": int(p.sum()), "true_px": int(t.sum()), "intersection_px": inter,
            "spurious_px": spurious, "missed_px": missed,
            "boundary_px": pred_only - spurious + true_only - missed,
        })  # fmt: skip
        ratios += _matched_area_ratios(true, pred)
    tot = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith("_px")}
    wrong = tot["spurious_px"] + tot["missed_px"] + tot["boundary_px"]
    return {
        "images": rows,
        "pooled_dice": 2 * tot["intersection_px"] / (tot["pred_px"] + tot["true_px"]),
        **tot,
        "share_boundary": tot["boundary_px"] / wrong,
        "share_spurious": tot["spurious_px"] / wrong,
        "share_missed": tot["missed_px"] / wrong,
        "matched_pairs": len(ratios),
        "median_area_ratio_pred_over_true": float(np.median(ratios)) if ratios else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. the model compared)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, info = load_for_heldout(SHARED, args.model, args.threads)
    doc = {"model": {"name": info.name, "sha256": info.sha256}, **analyse(Predictor(model), heldout_monuseg(SHARED))}
    lines = [
        f"# Where the Dice is lost: `{info.name}` (sha256 {info.sha256[:12]}…)",
        "",
        "Held-out MoNuSeg training images, whole, the model's stored post-processing "
        "(`benchmarks/bench_dice_errors.py`; definitions in its docstring).",
        "",
        "| image | Dice | boundary px | spurious px | missed px |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['image']} | {r['dice']:.3f} | {r['boundary_px']} | {r['spurious_px']} | {r['missed_px']} |"
            for r in doc["images"]
        ),
        f"| **pooled** | **{doc['pooled_dice']:.3f}** | {doc['boundary_px']} | {doc['spurious_px']} | "
        f"{doc['missed_px']} |",
        "",
        f"Wrong pixels: {doc['share_boundary']:.0%} boundary, {doc['share_spurious']:.0%} spurious objects, "
        f"{doc['share_missed']:.0%} missed nuclei. Matched pairs (IoU > 0.5): {doc['matched_pairs']}, median area "
        f"predicted / true {doc['median_area_ratio_pred_over_true']:.3f}.",
        "",
    ]
    stem = "dice_errors" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
