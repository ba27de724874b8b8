"""IF -> H&E registration -> marker threshold -> per-cell labels, proven on real H&E tiles with known answers.

Data: the CoNSeP patch copy (``../shared/data/consep_patched/test``): real 40x H&E JPEG patches (256 x 256,
~0.25 µm/px) with expert nucleus instance maps and types (2 = inflammatory). Tiles: patches ``_005`` and ``_010`` of
each of the 14 test source images (28 tiles, fixed before any run; interior patches of each source's 4 x 4 grid).

Per tile, a synthetic IF image (DAPI from every nucleus, MARKER from the inflammatory cells' nuclei + membrane ring;
blur, 0.5 µm/px area sampling, uneven background, 5 % DAPI bleed-through, noise, 8-bit) is rendered under a random
known rigid (±4°, ±4 µm) + smooth elastic (four Gaussian bumps of 0.75-1.5 µm) deformation
(:func:`cytoken.labeling.synthesize_if`, seed = tile index). Then, as a user would:

1. ``register`` (hematoxylin vs DAPI at a common 0.5 µm/px; rigid + B-spline); the error is measured at every
   ground-truth nucleus centroid against the known deformation, in H&E pixels;
2. the marker signal (white top-hat r = 40 px, Gaussian 1 px) of all tiles that pass the registration guard is pooled
   and one Otsu threshold computed (as one would over a slide), then applied to every tile;
3. ``label_cells`` with the GROUND-TRUTH instance map as the cells (the segmentation model is not ready), positive at
   overlap >= 0.15; labels compared with "type == inflammatory" on the kept cells.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_if_labels.py`` (about 1-2 CPU minutes). Writes
``benchmarks/results/if_labels.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from cytoken.labeling import (
    CellLabelConfig,
    RegistrationConfig,
    ThresholdConfig,
    check_registration,
    compute_threshold,
    label_cells,
    marker_signal,
    register,
    synthesize_if,
    threshold_marker,
)
from cytoken.types import CytokenError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONSEP = SHARED / "consep_patched" / "test"
HE_MPP = 0.25
IF_MPP = 0.5
INFLAMMATORY = 2
SIGNAL = ThresholdConfig(background="tophat", background_radius_px=40, smooth_sigma_px=1.0, min_object_px=20)


def tile_names() -> list[str]:
    sources = sorted({p.stem.rsplit("_", 1)[0] for p in (CONSEP / "images").glob("*.jpg")}, key=lambda s: int(s[5:]))
    return [f"{s}_{k:03d}" for s in sources for k in (5, 10)]


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    he = np.asarray(Image.open(CONSEP / "images" / f"{name}.jpg").convert("RGB"))
    inst = np.asarray(Image.open(CONSEP / "inst_maps" / f"{name}.png")).astype(np.int32)
    types = np.asarray(Image.open(CONSEP / "type_maps" / f"{name}.png"))
    ids = np.unique(inst[inst > 0])
    majority = np.array([np.bincount(types[inst == i]).argmax() for i in ids], np.int64)
    return he, inst, ids, majority == INFLAMMATORY


def binary_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    tn = int((~pred & ~truth).sum())
    n = tp + fp + fn + tn
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
    }


def run(names: list[str], reg_cfg: RegistrationConfig) -> dict:
    tiles = []
    t0 = time.process_time()
    for k, name in enumerate(names):
        he, inst, ids, truth = load(name)
        if len(ids) == 0:
            tiles.append({"tile": name, "n_cells": 0, "n_inflammatory": 0, "seed": k, "skipped": "no nuclei"})
            continue
        synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=k)
        centres = np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids))[:, ::-1]
        before = synth.warp.error_px(centres, centres * HE_MPP / IF_MPP, he_mpp=HE_MPP, if_mpp=IF_MPP)
        row = {"tile": name, "n_cells": len(ids), "n_inflammatory": int(truth.sum()), "seed": k}
        try:
            reg = register(he, synth.image, he_mpp=HE_MPP, config=replace(reg_cfg, check=False))
        except CytokenError as exc:
            tiles.append({**row, "registration_error": str(exc), "guard_passed": False})
            continue
        err = synth.warp.error_px(centres, reg.transform_points(centres), he_mpp=HE_MPP, if_mpp=IF_MPP)
        try:
            check_registration(reg.quality, reg_cfg)
            guard, reason = True, None
        except CytokenError as exc:
            guard, reason = False, str(exc)
        warped = reg.warp_if_to_he(synth.image)
        overlap = reg.overlap_mask(synth.image.shape)
        row.update(
            err_median_px=float(np.median(err)),
            err_p90_px=float(np.percentile(err, 90)),
            err_before_median_px=float(np.median(before)),
            quality=reg.quality.to_dict(),
            guard_passed=guard,
            guard_message=reason,
        )
        tiles.append(row)
        row["_work"] = (inst, ids, truth, warped, overlap, err)
    reg_cpu = time.process_time() - t0

    usable = [t for t in tiles if t.get("guard_passed")]
    pooled = np.concatenate(
        [marker_signal(t["_work"][3].channel("MARKER"), SIGNAL, valid=t["_work"][4])[t["_work"][4]] for t in usable]
    )
    threshold = compute_threshold(pooled, SIGNAL)
    fixed = replace(SIGNAL, method="fixed", value=threshold, min_positive_px=0)
    label_cfg = CellLabelConfig()
    all_pred, all_truth = [], []
    for t in usable:
        inst, ids, truth, warped, overlap, _ = t["_work"]
        mask = threshold_marker(warped.channel("MARKER"), fixed, valid=overlap)
        labels = label_cells(inst, mask.mask, cell_ids=ids, valid=overlap, config=label_cfg, marker="MARKER")
        kept = labels.kept
        pred = labels.label[kept] == 1
        gt = truth[kept]
        t["labels"] = {**binary_scores(pred, gt), "counts": labels.counts()}
        all_pred.append(pred)
        all_truth.append(gt)
    cpu = time.process_time() - t0

    errs_all = np.concatenate([t["_work"][5] for t in tiles if "_work" in t])
    errs_ok = np.concatenate([t["_work"][5] for t in usable])
    for t in tiles:
        t.pop("_work", None)
    overall_labels = binary_scores(np.concatenate(all_pred), np.concatenate(all_truth))
    return {
        "tiles": tiles,
        "threshold": threshold,
        "overall": {
            "n_tiles": len(tiles),
            "n_tiles_skipped_no_nuclei": sum(1 for t in tiles if t.get("skipped")),
            "n_tiles_guard_passed": len(usable),
            "registration_err_median_px_all_tiles": float(np.median(errs_all)),
            "registration_err_p90_px_all_tiles": float(np.percentile(errs_all, 90)),
            "registration_err_median_px_guard_passed": float(np.median(errs_ok)),
            "registration_err_before_median_px": float(
                np.median([t["err_before_median_px"] for t in tiles if "err_before_median_px" in t])
            ),
            "labels_guard_passed_tiles": overall_labels,
        },
        "cpu_seconds": {"registration": reg_cpu, "total": cpu},
        "config": {
            "registration": asdict(reg_cfg),
            "signal": asdict(SIGNAL),
            "labels": asdict(label_cfg),
            "he_mpp": HE_MPP,
            "if_mpp": IF_MPP,
        },
    }


def finite(obj):
    """NaN / inf -> None, recursively, so that the JSON file is strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def write_md(res: dict, path: Path) -> None:
    o = res["overall"]
    lab = o["labels_guard_passed_tiles"]
    ok_reg = o["registration_err_median_px_all_tiles"] < 1.5
    ok_lab = lab["accuracy"] >= 0.95 and lab["f1"] >= 0.9
    lines = [
        "# IF-derived cell labels on real H&E (CoNSeP test patches, synthetic IF, known deformation)",
        "",
        "Generated by `benchmarks/bench_if_labels.py` (see its docstring for the protocol). H&E: real CoNSeP test",
        "patches (JPEG, 256 x 256, ~0.25 µm/px). IF: synthetic, rendered from the expert annotation under a random",
        "known rigid + elastic deformation at 0.5 µm/px. Cells: the GROUND-TRUTH instance maps (no segmentation model",
        "yet). Truth: nucleus type == inflammatory. Tiles: patches _005 and _010 of each test source image.",
        "",
        "## Overall",
        "",
        "| measure | value | required |",
        "|---|---|---|",
        f"| tiles / without nuclei (skipped) / passing the registration guard | {o['n_tiles']} / "
        f"{o['n_tiles_skipped_no_nuclei']} / {o['n_tiles_guard_passed']} | |",
        f"| registration error, median over all cells of all tiles (H&E px) | "
        f"{o['registration_err_median_px_all_tiles']:.2f} | < 1.5 ({'met' if ok_reg else 'NOT met'}) |",
        f"| registration error, 90th percentile, all tiles (H&E px) | {o['registration_err_p90_px_all_tiles']:.2f} | |",
        f"| registration error, median, guard-passing tiles (H&E px) | "
        f"{o['registration_err_median_px_guard_passed']:.2f} | |",
        f"| error before registration (identity in µm), median of tiles (H&E px) | "
        f"{o['registration_err_before_median_px']:.2f} | |",
        f"| label accuracy (kept cells, guard-passing tiles) | {lab['accuracy']:.4f} | >= 0.95 "
        f"({'met' if ok_lab else 'NOT met'}) |",
        f"| positive-class F1 / precision / recall | {fmt(lab['f1'])} / {fmt(lab['precision'])} / "
        f"{fmt(lab['recall'])} | F1 >= 0.9 |",
        f"| cells scored (TP / FP / FN / TN) | {lab['n']} ({lab['tp']} / {lab['fp']} / {lab['fn']} / {lab['tn']}) | |",
        f"| pooled Otsu threshold (top-hat signal, 8-bit units) | {res['threshold']:.1f} | |",
        f"| CPU seconds (registration / total) | {res['cpu_seconds']['registration']:.0f} / "
        f"{res['cpu_seconds']['total']:.0f} | |",
        "",
        "## Per tile",
        "",
        "| tile | cells | inflam. | err med | err p90 | before | NMI before -> after | residual px | matched | guard |"
        " kept | TP | FP | FN | acc | F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in res["tiles"]:
        if t.get("skipped"):
            lines.append(f"| {t['tile']} | 0 | 0 | skipped: {t['skipped']} |")
            continue
        if "quality" not in t:
            lines.append(
                f"| {t['tile']} | {t['n_cells']} | {t['n_inflammatory']} | failed: {t['registration_error']} |"
            )
            continue
        q = t["quality"]
        lb = t.get("labels")
        lab_cols = (
            f"{lb['n']} | {lb['tp']} | {lb['fp']} | {lb['fn']} | {fmt(lb['accuracy'])} | {fmt(lb['f1'])}"
            if lb
            else "- | - | - | - | - | -"
        )
        lines.append(
            f"| {t['tile']} | {t['n_cells']} | {t['n_inflammatory']} | {t['err_median_px']:.2f} | "
            f"{t['err_p90_px']:.2f} | {t['err_before_median_px']:.1f} | "
            f"{q['nmi_before']:.3f} -> {q['nmi_after']:.3f} | {q['residual_px_after']:.1f} | "
            f"{q['matched_fraction']:.2f} | {'pass' if t['guard_passed'] else 'REFUSED'} | {lab_cols} |"
        )
    refused = [t for t in res["tiles"] if not t.get("guard_passed") and not t.get("skipped")]
    lines += [
        "",
        "## Notes",
        "",
        "- Errors are distances, at every ground-truth nucleus centroid of the tile, between the H&E position and the",
        "  known true H&E position of the IF point the fitted registration maps it to (H&E pixels, 0.25 µm).",
        "- Label metrics count only kept cells (status positive/negative: at least 50 % of the cell inside the IF",
        "  overlap) of tiles that pass the registration guard; refused tiles produce no labels, by design.",
        "- `residual px` / `matched` are the registration's own quality report (nuclei detected independently in",
        "  hematoxylin and registered DAPI, mutual nearest neighbours within 2 µm); the guard defaults",
        "  (max 4 px, matched >= 0.4) were chosen on these same synthetic tiles.",
        "- The IF is synthetic: real DAPI/marker images differ (autofluorescence, tissue damage between stains,",
        "  unmixing artefacts); this proves the mechanics and accuracy of the chain, not a real-IF accuracy.",
        "- SimpleITK results vary between runs at the floating-point level (even single-threaded); tiles near a guard",
        "  limit can flip between pass and refused from run to run (seen: test_5_010, residual 3.4 vs 4.1 px).",
    ]
    if refused:
        lines.append(f"- Refused by the guard: {', '.join(t['tile'] for t in refused)}.")
    lines.append(f"- Environment: Python {platform.python_version()}, {platform.machine()}; seeds = tile index.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", nargs="*", help="tile names (default: _005 and _010 of every test source image)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "if_labels")
    args = ap.parse_args(argv)
    if not CONSEP.exists():
        print(f"CoNSeP patches not found at {CONSEP}", file=sys.stderr)
        return 1
    names = args.tiles or tile_names()
    res = run(names, RegistrationConfig(threads=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(finite(res), indent=1, allow_nan=False))
    write_md(res, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
