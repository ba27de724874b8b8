"""CRCHisto label efficiency: a cell classifier on cytoken embeddings trained on 1, 5, 10 and all 70 labelled images.

Data: ``../shared/data/crchisto`` (CRCHistoPhenotypes, Sirinukunwattana et al. 2016; 500x500 colorectal H&E at 20x,
classified nucleus points, 4 classes). Its ``split.csv`` (a common unofficial split) gives 70 training and 10
validation images; the 10 validation images are the held-out test set here and are never used for any choice.

Protocol:

1. Segment every image once with the model (0.55 µm/px resampled to the model's 0.25 µm/px). Cells, instance maps
   and embeddings are cached under ``--cache`` (keyed by model sha256 + image hash + settings), so re-runs and the
   classifier sweeps never run the model again.
2. Match the labelled points one-to-one to detected cell centroids within 3.75 µm (6.8 px at 0.55 µm/px; Hungarian
   assignment). Reported per split and class: labels, matched labels, match rate (= recall of the detector on the
   labelled nuclei; CRCHisto's classified points do not cover every nucleus, so detector precision is not
   measurable here).
3. For each n in ``--sizes`` (default 1, 5, 10, all): draw n training images at random (``numpy`` seed s); for
   n < all repeat with seeds 0..``--seeds``-1 and report mean ± sd. Model selection (hyper-parameter search and early
   stopping) uses 20 % of the chosen images (at least one; split by image, like the held-out validation images,
   see :func:`inner_split`); the classifier is fitted on the other images. A single image cannot be split by image:
   its runs select on a stratified 20 % of its labelled cells. ``--trials N``: Optuna TPE search over hidden size,
   lr, weight decay and schedule (seed s, float32), best configuration kept; ``--trials 0``: fixed ``TrainConfig``
   defaults. Classes absent from the fitting images cannot be learnt: the classifier is trained on the classes
   present and gives the others probability 0.
4. Score on the matched cells of the 10 validation images: per-class precision/recall/F1, weighted and macro F1,
   accuracy, macro AUROC. "End-to-end" weighted F1 also counts every unmatched validation label as a miss of its
   class (detection and classification together).

Reference: SC-CNN weighted F1 0.784 (Sirinukunwattana et al. 2016), obtained with the paper's own evaluation protocol
and data division, not this split: quoted side by side for orientation only.

Usage:
    python benchmarks/bench_crchisto.py [--model cytoken-default] [--trials 30] [--seeds 3] [--sizes 1,5,10,all]
        [--cache runs/bench_crchisto_cache] [--threads 2] [--quick]

``--quick`` (script check only: first 3 training and 2 validation images, 5 trials, sizes 1 and all) writes
``benchmarks/results/crchisto_quick.{md,json}``; the full run writes ``benchmarks/results/crchisto.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "crchisto"
OUT = ROOT / "benchmarks" / "results"
SC_CNN_WEIGHTED_F1 = 0.784


def inner_split(
    y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, *, attempts: int = 20
) -> tuple[np.ndarray, np.ndarray, str]:
    """Model-selection split of the chosen training images: ``(fit, select, how)`` cell indices.

    By image (``how == "images"``): ``fraction`` of the images (at least one) go to selection, so selection sees
    images the classifier was not fitted on, as the held-out validation images are. A draw whose fitting images
    lack a class still keeps it out of selection; a draw whose selection would hold fewer than 2 of the fitted
    classes is redrawn (up to ``attempts`` times). With one image there is nothing to split by image: a stratified
    ``fraction`` of its cells per class goes to selection (``how == "cells"``).
    """
    rng = np.random.default_rng(seed)
    names = np.unique(groups)
    if len(names) < 2:
        fit, sel = [], []
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            k = max(1, round(fraction * len(idx))) if len(idx) >= 2 else 0
            sel.append(idx[:k])
            fit.append(idx[k:])
        return np.sort(np.concatenate(fit)), np.sort(np.concatenate(sel)), "cells"
    k = max(1, round(fraction * len(names)))
    for _ in range(attempts):
        held = np.isin(groups, rng.permutation(names)[:k])
        fitted = np.unique(y[~held])
        sel = np.flatnonzero(held & np.isin(y, fitted))
        if len(fitted) >= 2 and len(np.unique(y[sel])) >= 2:
            return np.flatnonzero(~held), sel, "images"
    raise ValueError(f"no split of the {len(names)} images gives selection images with 2 of the fitted classes")


def train_one(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, *, trials: int, seed: int
) -> tuple[object, dict]:
    """Train on the classes present in the fitting images; returns a predict_proba over all ``n_classes`` and a
    summary."""
    from cytoken.classify import TrainConfig, search, train_classifier

    if len(np.unique(y)) < 2:
        raise ValueError(f"only class {np.unique(y).tolist()} in the subset")
    fit, sel, how = inner_split(y, groups, 0.2, seed)
    present = np.unique(y[fit])
    if len(present) < 2 or len(np.unique(y[sel])) < 2:
        raise ValueError("the fitting or selection cells hold fewer than 2 classes")
    remap = np.full(n_classes, -1)
    remap[present] = np.arange(len(present))
    xf, yf, xs, ys = x[fit], remap[y[fit]], x[sel], remap[y[sel]]
    base = TrainConfig(batch_size=256, patience=10, seed=seed)
    info: dict = {"classes_present": present.tolist(), "n_fit": len(fit), "n_select": len(sel), "selection": how,
                  "select_images": sorted(set(groups[sel].tolist())) if how == "images" else None}  # fmt: skip
    t0 = time.time()
    if trials > 0:
        res = search(xf, yf, xs, ys, n_trials=trials, sampler="tpe", seed=seed, base_config=base,
                     num_classes=len(present), precision="float32")  # fmt: skip
        model = res.best_model or train_classifier(xf, yf, xs, ys, res.best_config, num_classes=len(present))
        info.update(best_params=res.best_params, select_macro_auroc=round(float(res.best_value), 4))
    else:
        model = train_classifier(xf, yf, xs, ys, base, num_classes=len(present))
        info.update(config=base.to_dict(), select_macro_auroc=round(float(model.val_auroc), 4))
    info["train_seconds"] = round(time.time() - t0, 2)

    def predict_proba(emb: np.ndarray) -> np.ndarray:
        out = np.zeros((len(emb), n_classes), np.float32)
        out[:, present] = model.predict_proba(emb)
        return out

    return predict_proba, info


def end_to_end_weighted_f1(y: np.ndarray, pred: np.ndarray, unmatched: np.ndarray) -> float:
    """Weighted F1 where the ``unmatched[c]`` validation labels of class c count as missed (false negatives)."""
    c = len(unmatched)
    tp = np.array([np.sum((y == k) & (pred == k)) for k in range(c)], float)
    predicted = np.bincount(pred, minlength=c).astype(float)
    support = np.bincount(y, minlength=c) + unmatched
    prec = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(c), where=(prec + rec) > 0)
    return float((f1 * support).sum() / support.sum())


def mean_sd(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def render_markdown(res: dict) -> str:
    """The results page."""
    names = res["class_names"]
    lines = [
        f"# CRCHisto label efficiency{' (QUICK SCRIPT CHECK, not a result)' if res['quick'] else ''}",
        "",
        f"Model `{res['model']}` (sha256 `{res['model_sha256']}`), embeddings `{res['embeddings']}`. Data "
        f"`../shared/data/crchisto`, `split.csv`: {res['n_train_images']} training images, "
        f"{res['n_val_images']} validation images (held out; never used for selection). Produced by "
        "`benchmarks/bench_crchisto.py` (protocol in its docstring; raw records in the `.json`).",
        "",
        "Reproduce:",
        "",
        "```",
        res["command"],
        "```",
        "",
        "## Detection: labels matched to detected cells (one-to-one within 3.75 µm)",
        "",
        "| split | images | labels | matched | match rate | " + " | ".join(f"{n} rate (labels)" for n in names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for split in ("train", "validation"):
        d = res["detection"][split]
        rates = [f"{m / n:.3f} ({n})" if n else "- (0)" for m, n in zip(d["matched_per_class"], d["labels_per_class"])]
        lines.append(f"| {split} | {d['images']} | {d['n_labels']} | {d['n_matched']} | {d['match_rate']:.3f} | "
                     + " | ".join(rates) + " |")  # fmt: skip
    lines += [
        "",
        f"Segmentation and matching of all images: {res['timing']['segment_s']} s wall (about a second when every "
        f"image comes from the cache; 1-minute load average {res['machine']['loadavg_at_start'][0]} at start on a "
        f"shared {res['machine']['cpu_count']}-core machine).",
        "",
        "## Classification on the matched validation cells",
        "",
        f"Training: {'Optuna TPE, ' + str(res['trials']) + ' trials' if res['trials'] else 'fixed TrainConfig'} per "
        "run; model selection on 20 % of the chosen images (at least one, split by image; a run on a single "
        "image selects on a stratified 20 % of its cells). Mean ± sd over the seeds "
        f"({res['seeds']} per size below all images).",
        "",
        "| train images | runs | labelled cells | weighted F1 | macro F1 | accuracy | macro AUROC | "
        + " | ".join(f"F1 {n}" for n in names)
        + " | end-to-end weighted F1 |",
        "|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in res["summary"]:
        lines.append(
            f"| {row['n_images']} | {row['runs']} | {row['train_cells']} | {row['weighted_f1']} | {row['macro_f1']} "
            f"| {row['accuracy']} | {row['macro_auroc']} | " + " | ".join(row["f1_per_class"]) +
            f" | {row['e2e_weighted_f1']} |"
        )  # fmt: skip
    failed = [r for r in res["runs"] if "error" in r]
    if failed:
        lines += ["", "Runs that could not train: " + "; ".join(f"n={r['n_images']} seed {r['seed']}: "
                                                                   f"{r['error']}" for r in failed)]  # fmt: skip
    lines += [
        "",
        f"Published reference: SC-CNN weighted F1 **{SC_CNN_WEIGHTED_F1}** (Sirinukunwattana et al. 2016), from the "
        "paper's own evaluation protocol and data division, not the 70/10 unofficial split used here: orientation "
        "only, not a like-for-like comparison. Here only detected cells are scored; the end-to-end column also "
        "charges every unmatched validation label as a miss.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cytoken-default")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--trials", type=int, default=30, help="search trials per run (0: fixed hyper-parameters)")
    ap.add_argument("--seeds", type=int, default=3, help="repeats (subset + training seeds) for sizes below all")
    ap.add_argument("--sizes", default="1,5,10,all", help="numbers of training images, comma-separated")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_crchisto_cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="script check: 3 train / 2 val images, 5 trials")
    ap.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/results/crchisto)")
    args = ap.parse_args()

    import torch

    from cytoken.classify import evaluate
    from cytoken.io.datasets import CRCHisto
    from cytoken.models.store import load_model
    from cytoken.pipeline.classifier import build_embedding_set
    from cytoken.pipeline.image import SegmentConfig
    from cytoken.pipeline.predictor import Predictor

    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        sys.exit(f"CRCHisto data not found at {args.data}")
    command = "python benchmarks/bench_crchisto.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"reproduce with: {command}", flush=True)
    trials = 5 if args.quick and args.trials == 30 else args.trials
    limits = (3, 2) if args.quick else (None, None)
    stem = args.out or OUT / ("crchisto_quick" if args.quick else "crchisto")
    model, info = load_model(args.model)
    predictor = Predictor(model)
    config = SegmentConfig()
    load0 = list(os.getloadavg())
    t0 = time.time()
    sets, detection = {}, {}
    for split, limit in zip(("train", "validation"), limits):
        ds = CRCHisto(args.data, split)
        cells, rep = build_embedding_set(ds, predictor, info, cache_dir=args.cache, limit=limit, config=config,
                                         progress=True)  # fmt: skip
        sets[split] = cells
        detection[split] = {"images": len(rep["images"]), **{k: rep[k] for k in ("n_labels", "n_matched", "n_cells",
                            "match_rate", "labels_per_class", "matched_per_class")}}  # fmt: skip
        print(f"{split}: {rep['n_matched']} of {rep['n_labels']} labels matched ({rep['match_rate']:.1%}) "
              f"in {len(rep['images'])} images", flush=True)  # fmt: skip
    segment_s = round(time.time() - t0, 1)
    train, val = sets["train"], sets["validation"]
    names = train.class_names
    n_classes = len(names)
    unmatched = np.array(detection["validation"]["labels_per_class"]) - np.array(
        detection["validation"]["matched_per_class"]
    )
    images = np.array(sorted(set(train.groups.tolist()), key=lambda g: int(g.rsplit("img", 1)[1])))
    sizes = [len(images) if s == "all" else int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [1, len(images)]
    runs = []
    for n in sizes:
        if not 1 <= n <= len(images):
            sys.exit(f"size {n} is outside 1..{len(images)}")
        for seed in range(args.seeds if n < len(images) else 1):
            chosen = np.sort(np.random.default_rng(seed).choice(images, n, replace=False))
            idx = np.flatnonzero(np.isin(train.groups, chosen))
            rec: dict = {"n_images": n, "seed": seed, "images": [g.rsplit("/", 1)[1] for g in chosen],
                         "train_cells": len(idx)}  # fmt: skip
            try:
                proba_fn, info_run = train_one(train.embeddings[idx], train.labels[idx], train.groups[idx], n_classes,
                                               trials=trials, seed=seed)  # fmt: skip
            except ValueError as exc:
                rec["error"] = str(exc)
                runs.append(rec)
                print(f"n={n} seed={seed}: cannot train ({exc})", flush=True)
                continue
            proba = proba_fn(val.embeddings)
            report = evaluate(val.labels, proba, names)
            rec.update(
                info_run,
                validation=report.to_dict(),
                e2e_weighted_f1=round(end_to_end_weighted_f1(val.labels, proba.argmax(1), unmatched), 4),
            )
            runs.append(rec)
            print(f"n={n} seed={seed}: {len(idx)} cells, weighted F1 {report.weighted_f1:.3f}, macro F1 "
                  f"{report.macro_f1:.3f}, e2e weighted F1 {rec['e2e_weighted_f1']:.3f}", flush=True)  # fmt: skip
    summary = []
    for n in sizes:
        ok = [r for r in runs if r["n_images"] == n and "error" not in r]
        v = [r["validation"] for r in ok]
        summary.append({
            "n_images": n, "runs": f"{len(ok)}/{len([r for r in runs if r['n_images'] == n])}",
            "train_cells": int(np.mean([r["train_cells"] for r in ok])) if ok else 0,
            **{k: mean_sd([x[k] for x in v]) for k in ("weighted_f1", "macro_f1", "accuracy", "macro_auroc")},
            "f1_per_class": [mean_sd([x["per_class"][c]["f1"] for x in v]) for c in names],
            "e2e_weighted_f1": mean_sd([r["e2e_weighted_f1"] for r in ok]),
        })  # fmt: skip
    results = {
        "quick": args.quick, "command": command, "model": info.name, "model_sha256": info.sha256,
        "embeddings": config.embeddings, "class_names": list(names), "trials": trials, "seeds": args.seeds,
        "n_train_images": len(images), "n_val_images": detection["validation"]["images"], "detection": detection,
        "summary": summary, "runs": runs, "published": {"sc_cnn_weighted_f1": SC_CNN_WEIGHTED_F1},
        "timing": {"segment_s": segment_s, "total_s": round(time.time() - t0, 1)},
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": load0, "loadavg_at_end": list(os.getloadavg())},
    }  # fmt: skip
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=float))
    md = render_markdown(results)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"-> {stem}.md, {stem}.json\nreproduce with: {command}")


if __name__ == "__main__":
    main()
