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
3. ``label_cells``, positive at overlap >= 0.15, with two kinds of cells (two result rows):

   a. the GROUND-TRUTH instance maps: labels compared with "type == inflammatory" on the kept cells;
   b. the cells of the segmentation model (default ``cytoken-default``, ``segment_image_with_labels`` on each
      patch): each model cell gets the expert type of the ground-truth nucleus it matches one-to-one with
      IoU > 0.5 (:func:`cytoken.classify.match_instances`); labels are scored on matched, kept cells, and the
      matched fractions (of model cells, of ground-truth nuclei) are reported.

Model outputs and registrations are cached under ``--cache`` (default ``/work/runs/if_loop_cache``), keyed by the
model sha256 (segmentation) and by the tile, seed and settings (registration), so a rerun with a new model only
segments again. The helpers here are shared with ``bench_if_loop.py``.

Run: ``OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_if_labels.py`` (about 2-3 CPU minutes without a cache).
Writes ``benchmarks/results/if_labels.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from cytoken.classify.dataset import instance_types, match_instances
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
CONSEP_ROOT = SHARED / "consep_patched"
CONSEP = CONSEP_ROOT / "test"
DEFAULT_CACHE = Path("/work/runs/if_loop_cache")
HE_MPP = 0.25
IF_MPP = 0.5
INFLAMMATORY = 2
IOU_MATCH = 0.5
SIGNAL = ThresholdConfig(background="tophat", background_radius_px=40, smooth_sigma_px=1.0, min_object_px=20)
SYNTH_VERSION = "synthesize_if/1"  # change when the IF generator changes, so cached registrations are rebuilt


# ------------------------------------------------------------------------------------------------ data
def source_of(name: str) -> str:
    """Source image of a patch name (``test_13_005`` -> ``test_13``)."""
    return name.rsplit("_", 1)[0]


def _order(name: str) -> tuple[int, int]:
    _, src, k = name.split("_")
    return int(src), int(k)


def split_names(split: str) -> list[str]:
    """Every patch of a split, ordered by source number then patch index."""
    return sorted((p.stem for p in (CONSEP_ROOT / split / "images").glob("*.jpg")), key=_order)


def tile_names() -> list[str]:
    sources = sorted({source_of(n) for n in split_names("test")}, key=lambda s: int(s.split("_")[1]))
    return [f"{s}_{k:03d}" for s in sources for k in (5, 10)]


def load(name: str, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """H&E (H, W, 3), ground-truth instance map, its ids and each id's majority type."""
    root = CONSEP_ROOT / split
    he = np.asarray(Image.open(root / "images" / f"{name}.jpg").convert("RGB"))
    inst = np.asarray(Image.open(root / "inst_maps" / f"{name}.png")).astype(np.int32)
    types = np.asarray(Image.open(root / "type_maps" / f"{name}.png"))
    ids, majority = instance_types(inst, types)
    return he, inst, ids.astype(np.int64), majority


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _save_npz(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ model cells
class ModelCells:
    """Cells of a segmentation model on a patch (instance map, ids, embeddings), cached on disk by model sha256."""

    def __init__(self, model: str, cache: Path | None) -> None:
        from cytoken.models.store import load_model
        from cytoken.pipeline import Predictor

        self.model, self.info = load_model(model)
        self.predictor = Predictor(self.model)
        self.folder = None if cache is None else cache / "seg" / self.info.sha256[:16]
        self.hits = 0
        self.misses = 0
        self.cpu_seconds = 0.0

    def __call__(self, he: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from cytoken.embeddings import array_sha256
        from cytoken.pipeline import segment_image_with_labels

        path = None if self.folder is None else self.folder / f"{key}.npz"
        img_sha = array_sha256(he)
        if path is not None and path.is_file():
            with np.load(path) as z:
                if str(z["image_sha256"]) == img_sha:
                    self.hits += 1
                    return z["inst"], z["ids"], z["embeddings"]
        t0 = time.process_time()
        cells, inst = segment_image_with_labels(he, self.predictor, HE_MPP)
        self.cpu_seconds += time.process_time() - t0
        self.misses += 1
        emb = np.zeros((len(cells), 0), np.float32) if cells.embeddings is None else cells.embeddings
        ids = np.asarray(cells.ids, np.int64)
        if path is not None:
            _save_npz(
                path, inst=inst.astype(np.int32), ids=ids, embeddings=emb.astype(np.float32), image_sha256=img_sha
            )
        return inst.astype(np.int32), ids, emb.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.info.name, "sha256": self.info.sha256, "source": self.info.source}


def expert_of_model_cells(
    gt_inst: np.ndarray, gt_ids: np.ndarray, gt_types: np.ndarray, model_inst: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Model cell ids matched one-to-one (IoU > 0.5) to a ground-truth nucleus, and that nucleus' expert type."""
    m = match_instances(gt_inst, model_inst, iou_threshold=IOU_MATCH)
    if not len(m.gt_ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return m.pred_ids.astype(np.int64), gt_types[np.searchsorted(gt_ids, m.gt_ids)].astype(np.int64)


# ------------------------------------------------------------------------------------------------ registration
def registered(
    split: str,
    name: str,
    he: np.ndarray,
    inst: np.ndarray,
    ids: np.ndarray,
    positive_ids: np.ndarray,
    *,
    seed: int,
    reg_cfg: RegistrationConfig,
    cache: Path | None,
) -> dict[str, Any]:
    """Synthesise the IF of a patch, register it, and return the warped marker, overlap and errors (cached).

    Keys: ``ok`` (registration ran), ``error`` (its message otherwise), ``marker`` (H, W) float32 on the H&E grid,
    ``overlap`` (H, W) bool, ``err`` / ``before`` (per ground-truth nucleus, H&E px, after / before),
    ``quality`` (dict), ``guard`` (bool), ``guard_message``, ``cached``, ``cpu`` (seconds spent now).
    """
    key = _digest({"v": SYNTH_VERSION, "reg": asdict(reg_cfg), "he_mpp": HE_MPP, "if_mpp": IF_MPP, "seed": seed})
    path = None if cache is None else cache / "reg" / split / f"{name}_s{seed}_{key}.npz"
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            out = {**meta, "cached": True, "cpu": 0.0}
            if meta["ok"]:
                out.update(marker=z["marker"], overlap=z["overlap"], err=z["err"], before=z["before"])
            return out
    t0 = time.process_time()
    synth = synthesize_if(inst, positive_ids, he_mpp=HE_MPP, if_mpp=IF_MPP, seed=seed)
    centres = np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids))[:, ::-1]
    before = synth.warp.error_px(centres, centres * HE_MPP / IF_MPP, he_mpp=HE_MPP, if_mpp=IF_MPP)
    try:
        reg = register(he, synth.image, he_mpp=HE_MPP, config=replace(reg_cfg, check=False))
    except CytokenError as exc:
        meta = {"ok": False, "error": str(exc)}
        if path is not None:
            _save_npz(path, meta=json.dumps(meta))
        return {**meta, "cached": False, "cpu": time.process_time() - t0}
    err = synth.warp.error_px(centres, reg.transform_points(centres), he_mpp=HE_MPP, if_mpp=IF_MPP)
    try:
        check_registration(reg.quality, reg_cfg)
        guard, reason = True, None
    except CytokenError as exc:
        guard, reason = False, str(exc)
    marker = reg.warp_if_to_he(synth.image).channel("MARKER").astype(np.float32)
    overlap = reg.overlap_mask(synth.image.shape)
    meta = {"ok": True, "error": None, "quality": reg.quality.to_dict(), "guard": guard, "guard_message": reason}
    if path is not None:
        _save_npz(path, meta=json.dumps(meta), marker=marker, overlap=overlap, err=err, before=before)
    out = {**meta, "marker": marker, "overlap": overlap, "err": err, "before": before}
    return {**out, "cached": False, "cpu": time.process_time() - t0}


def pooled_threshold(markers: list[np.ndarray], overlaps: list[np.ndarray]) -> float:
    """One Otsu threshold over the marker signal of many tiles (as over a slide)."""
    pooled = np.concatenate([marker_signal(m, SIGNAL, valid=o)[o] for m, o in zip(markers, overlaps)])
    return compute_threshold(pooled, SIGNAL)


def fixed_signal(threshold: float) -> ThresholdConfig:
    """The signal settings with the pooled threshold applied as a fixed value."""
    return replace(SIGNAL, method="fixed", value=threshold, min_positive_px=0)


# ------------------------------------------------------------------------------------------------ scoring
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


@dataclass
class _Work:
    inst: np.ndarray
    ids: np.ndarray
    truth: np.ndarray
    marker: np.ndarray
    overlap: np.ndarray
    err: np.ndarray
    model: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # inst, ids, matched ids, expert


def _model_tile(w: _Work, mask: np.ndarray, label_cfg: CellLabelConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    m_inst, m_ids, matched, expert = w.model  # type: ignore[misc]
    labels = label_cells(m_inst, mask, cell_ids=m_ids, valid=w.overlap, config=label_cfg, marker="MARKER")
    pos = np.searchsorted(m_ids, matched)
    kept = labels.kept[pos]
    pred = labels.label[pos][kept] == 1
    gt = expert[kept]
    unmatched = np.ones(len(m_ids), bool)
    unmatched[pos] = False
    row = {
        "n_model_cells": len(m_ids),
        "n_gt_nuclei": len(w.ids),
        "n_matched": len(matched),
        **binary_scores(pred, gt),
        "unmatched_kept": int((unmatched & labels.kept).sum()),
        "unmatched_kept_positive": int((unmatched & labels.kept & (labels.label == 1)).sum()),
    }
    return row, pred, gt


def run(names: list[str], reg_cfg: RegistrationConfig, cache: Path | None, cells: ModelCells | None) -> dict:
    tiles = []
    reg_cpu = 0.0
    n_cached = 0
    for k, name in enumerate(names):
        he, inst, ids, types = load(name)
        truth = types == INFLAMMATORY
        if len(ids) == 0:
            tiles.append({"tile": name, "n_cells": 0, "n_inflammatory": 0, "seed": k, "skipped": "no nuclei"})
            continue
        row: dict[str, Any] = {"tile": name, "n_cells": len(ids), "n_inflammatory": int(truth.sum()), "seed": k}
        r = registered("test", name, he, inst, ids, ids[truth], seed=k, reg_cfg=reg_cfg, cache=cache)
        reg_cpu += r["cpu"]
        n_cached += int(r["cached"])
        if not r["ok"]:
            tiles.append({**row, "registration_error": r["error"], "guard_passed": False})
            continue
        row.update(
            err_median_px=float(np.median(r["err"])),
            err_p90_px=float(np.percentile(r["err"], 90)),
            err_before_median_px=float(np.median(r["before"])),
            quality=r["quality"],
            guard_passed=r["guard"],
            guard_message=r["guard_message"],
        )
        work = _Work(inst, ids, truth, r["marker"], r["overlap"], r["err"])
        if cells is not None:
            m_inst, m_ids, _ = cells(he, f"test/{name}")
            matched, expert = expert_of_model_cells(inst, ids, types, m_inst)
            work.model = (m_inst, m_ids, matched, expert == INFLAMMATORY)
        row["_work"] = work
        tiles.append(row)

    usable = [t for t in tiles if t.get("guard_passed")]
    threshold = pooled_threshold([t["_work"].marker for t in usable], [t["_work"].overlap for t in usable])
    fixed = fixed_signal(threshold)
    label_cfg = CellLabelConfig()
    all_pred, all_truth, m_pred, m_truth = [], [], [], []
    for t in usable:
        w: _Work = t["_work"]
        mask = threshold_marker(w.marker, fixed, valid=w.overlap).mask
        labels = label_cells(w.inst, mask, cell_ids=w.ids, valid=w.overlap, config=label_cfg, marker="MARKER")
        kept = labels.kept
        pred = labels.label[kept] == 1
        gt = w.truth[kept]
        t["labels"] = {**binary_scores(pred, gt), "counts": labels.counts()}
        all_pred.append(pred)
        all_truth.append(gt)
        if w.model is not None:
            t["model_labels"], p, g = _model_tile(w, mask, label_cfg)
            m_pred.append(p)
            m_truth.append(g)

    errs_all = np.concatenate([t["_work"].err for t in tiles if "_work" in t])
    errs_ok = np.concatenate([t["_work"].err for t in usable])
    for t in tiles:
        t.pop("_work", None)
    overall: dict[str, Any] = {
        "n_tiles": len(tiles),
        "n_tiles_skipped_no_nuclei": sum(1 for t in tiles if t.get("skipped")),
        "n_tiles_guard_passed": len(usable),
        "registration_err_median_px_all_tiles": float(np.median(errs_all)),
        "registration_err_p90_px_all_tiles": float(np.percentile(errs_all, 90)),
        "registration_err_median_px_guard_passed": float(np.median(errs_ok)),
        "registration_err_before_median_px": float(
            np.median([t["err_before_median_px"] for t in tiles if "err_before_median_px" in t])
        ),
        "labels_guard_passed_tiles": binary_scores(np.concatenate(all_pred), np.concatenate(all_truth)),
    }
    if m_pred:
        ml = [t["model_labels"] for t in usable]
        n_model, n_gt, n_match = (sum(r[k] for r in ml) for k in ("n_model_cells", "n_gt_nuclei", "n_matched"))
        overall["model_cells_guard_passed_tiles"] = {
            **binary_scores(np.concatenate(m_pred), np.concatenate(m_truth)),
            "n_model_cells": n_model,
            "n_gt_nuclei": n_gt,
            "n_matched": n_match,
            "matched_fraction_of_model_cells": n_match / max(1, n_model),
            "matched_fraction_of_gt_nuclei": n_match / max(1, n_gt),
            "unmatched_kept": sum(r["unmatched_kept"] for r in ml),
            "unmatched_kept_positive": sum(r["unmatched_kept_positive"] for r in ml),
        }
    return {
        "tiles": tiles,
        "threshold": threshold,
        "overall": overall,
        "cpu_seconds": {
            "registration_uncached": reg_cpu,
            "registrations_from_cache": n_cached,
            "segmentation_uncached": None if cells is None else cells.cpu_seconds,
            "segmentations_from_cache": None if cells is None else cells.hits,
        },
        "model": None if cells is None else cells.describe(),
        "config": {
            "registration": asdict(reg_cfg),
            "signal": asdict(SIGNAL),
            "labels": asdict(label_cfg),
            "he_mpp": HE_MPP,
            "if_mpp": IF_MPP,
            "match": f"one-to-one, IoU > {IOU_MATCH} (cytoken.classify.match_instances)",
            "synth_version": SYNTH_VERSION,
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


def fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _label_row(what: str, lab: dict, matched: str) -> str:
    return (
        f"| {what} | {lab['n']} | {matched} | {lab['accuracy']:.4f} | {fmt(lab['f1'])} | {fmt(lab['precision'])} | "
        f"{fmt(lab['recall'])} | {lab['tp']} / {lab['fp']} / {lab['fn']} / {lab['tn']} |"
    )


def write_md(res: dict, path: Path, command: str) -> None:
    o = res["overall"]
    lab = o["labels_guard_passed_tiles"]
    ml = o.get("model_cells_guard_passed_tiles")
    ok_reg = o["registration_err_median_px_all_tiles"] < 1.5
    ok_lab = lab["accuracy"] >= 0.95 and lab["f1"] >= 0.9
    model = res.get("model")
    lines = [
        "# IF-derived cell labels on real H&E (CoNSeP test patches, synthetic IF, known deformation)",
        "",
        "Generated by `benchmarks/bench_if_labels.py` (see its docstring for the protocol). H&E: real CoNSeP test",
        "patches (JPEG, 256 x 256, ~0.25 µm/px). IF: synthetic, rendered from the expert annotation under a random",
        "known rigid + elastic deformation at 0.5 µm/px. Truth: nucleus type == inflammatory. Tiles: patches _005 and",
        "_010 of each test source image. Cells: (a) the ground-truth instance maps, (b) the cells of the segmentation",
        f"model {'`' + model['name'] + '` (sha256 `' + model['sha256'] + '`)' if model else '(not run)'}, each given",
        "the expert type of the ground-truth nucleus it matches one-to-one with IoU > 0.5.",
        "",
        f"Reproduce: `{command}`",
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
        f"| label accuracy, ground-truth cells (kept cells, guard-passing tiles) | {lab['accuracy']:.4f} | >= 0.95 "
        f"({'met' if ok_lab else 'NOT met'}) |",
        f"| positive-class F1 / precision / recall, ground-truth cells | {fmt(lab['f1'])} / {fmt(lab['precision'])} / "
        f"{fmt(lab['recall'])} | F1 >= 0.9 |",
        f"| pooled Otsu threshold (top-hat signal, 8-bit units) | {res['threshold']:.1f} | |",
        "",
        "## Labels by kind of cell (guard-passing tiles, one pooled threshold)",
        "",
        "| cells | scored | matched to ground truth | accuracy | F1 (inflammatory) | precision | recall |"
        " TP / FP / FN / TN |",
        "|---|---|---|---|---|---|---|---|",
        _label_row("ground-truth instance maps", lab, "all (they are the truth)"),
    ]
    if ml:
        matched = (
            f"{ml['n_matched']} of {ml['n_model_cells']} model cells ({ml['matched_fraction_of_model_cells']:.1%}); "
            f"{ml['matched_fraction_of_gt_nuclei']:.1%} of {ml['n_gt_nuclei']} GT nuclei"
        )
        lines.append(_label_row(f"model cells (`{model['name']}`), matched, kept", ml, matched))
    lines += [
        "",
        "Scored = kept cells (status positive/negative: at least 50 % of the cell inside the IF overlap); for model",
        "cells only those matched to a ground-truth nucleus (IoU > 0.5, one-to-one), since only they have an expert",
        "label.",
    ]
    if ml:
        lines += [
            f"Unmatched model cells that were kept: {ml['unmatched_kept']}, of which IF-positive: "
            f"{ml['unmatched_kept_positive']} (no expert label; not scored).",
        ]
    cpu = res["cpu_seconds"]
    lines += [
        "",
        f"CPU seconds this run: registration {cpu['registration_uncached']:.0f} "
        f"({cpu['registrations_from_cache']} registrations from the cache), segmentation "
        f"{cpu['segmentation_uncached'] or 0:.0f} ({cpu['segmentations_from_cache']} patches from the cache).",
        "",
        "## Per tile: registration and ground-truth cells",
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
    if ml:
        lines += [
            "",
            "## Per tile: model cells (guard-passing tiles)",
            "",
            "| tile | GT nuclei | model cells | matched | scored | TP | FP | FN | acc | F1 | unmatched kept (IF+) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in res["tiles"]:
            r = t.get("model_labels")
            if r:
                lines.append(
                    f"| {t['tile']} | {r['n_gt_nuclei']} | {r['n_model_cells']} | {r['n_matched']} | {r['n']} | "
                    f"{r['tp']} | {r['fp']} | {r['fn']} | {fmt(r['accuracy'])} | {fmt(r['f1'])} | "
                    f"{r['unmatched_kept']} ({r['unmatched_kept_positive']}) |"
                )
    refused = [t for t in res["tiles"] if not t.get("guard_passed") and not t.get("skipped")]
    lines += [
        "",
        "## Notes",
        "",
        "- Errors are distances, at every ground-truth nucleus centroid of the tile, between the H&E position and the",
        "  known true H&E position of the IF point the fitted registration maps it to (H&E pixels, 0.25 µm).",
        "- Label metrics count only kept cells of tiles that pass the registration guard; refused tiles produce no",
        "  labels, by design.",
        "- `residual px` / `matched` are the registration's own quality report (nuclei detected independently in",
        "  hematoxylin and registered DAPI, mutual nearest neighbours within 2 µm); the guard defaults",
        "  (max 4 px, matched >= 0.4) were chosen on these same synthetic tiles.",
        "- The IF is synthetic and rendered from the expert annotation (nuclei + membrane ring of the inflammatory",
        "  cells): real DAPI/marker images differ (autofluorescence, tissue damage between stains, unmixing",
        "  artefacts); this proves the mechanics and accuracy of the chain, not a real-IF accuracy. With model cells,",
        "  the remaining errors come from registration, threshold and the model's outlines (a model cell that covers",
        "  only part of a positive nucleus, or spills over a neighbour's membrane ring).",
        "- SimpleITK results vary between runs at the floating-point level (even single-threaded); tiles near a guard",
        "  limit can flip between pass and refused from run to run (seen: test_5_010, residual 3.4 vs 4.1 px). The",
        "  registrations are cached (see `--cache`), so reruns (e.g. with a new model) reuse the same ones.",
    ]
    if refused:
        lines.append(f"- Refused by the guard: {', '.join(t['tile'] for t in refused)}.")
    lines.append(f"- Environment: Python {platform.python_version()}, {platform.machine()}; seeds = tile index.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", nargs="*", help="tile names (default: _005 and _010 of every test source image)")
    ap.add_argument("--model", default="cytoken-default", help="segmentation model for the model-cells row")
    ap.add_argument("--no-model", action="store_true", help="ground-truth cells only")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache of model outputs and registrations")
    ap.add_argument("--no-cache", action="store_true", help="recompute everything, write no cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "if_labels")
    args = ap.parse_args(argv)
    if not CONSEP.exists():
        print(f"CoNSeP patches not found at {CONSEP}", file=sys.stderr)
        return 1
    command = "cd /work/main && OMP_NUM_THREADS=1 nice -n 19 python benchmarks/bench_if_labels.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"reproduce: {command.strip()}", flush=True)
    cache = None if args.no_cache else args.cache
    cells = None if args.no_model else ModelCells(args.model, cache)
    names = args.tiles or tile_names()
    res = run(names, RegistrationConfig(threads=1), cache, cells)
    res["command"] = command.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(finite(res), indent=1, allow_nan=False))
    write_md(res, args.out.with_suffix(".md"), command.strip())
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
