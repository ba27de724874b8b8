"""``cytoken classifier {dataset,train,search,evaluate,apply}``: cell classifiers on cached token embeddings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytoken.cli._common import load_model_or_fail, mpp_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser("classifier", help="train and apply cell classifiers on cached embeddings")
    csub = p.add_subparsers(dest="classifier_command", metavar="SUBCOMMAND")
    csub.required = True

    d = csub.add_parser(
        "dataset",
        help="labels + images (or slides) -> cached embedding set (.npz)",
        description="One of: a labelled dataset (--dataset NAME --data-root DIR; 'qupath' reads images/ + labels/ "
        "QuPath GeoJSON exports); slides annotated in QuPath (--slide S.svs ... --labels S.geojson ...; an "
        "existing `cytoken segment` output given with --segment-output is reused, the model is not run); or "
        "IF-derived labels (--if-labels labels.parquet ... --cells SEGMENT_OUTPUT ...: the tables of "
        "`cytoken label-from-if --cells SEGMENT_OUTPUT`, joined to that output's stored embeddings; the model is "
        "not run).",
    )
    d.add_argument("--dataset", default=None,
                   help="crchisto, consep, consep_patched, pannuke, lizard, cellvit, folder, qupath")  # fmt: skip
    d.add_argument("--data-root", type=Path, default=None, help="the dataset's folder (with --dataset)")
    d.add_argument("--split", default=None, help="split to read (default: the adapter's)")
    d.add_argument("--slide", type=Path, nargs="+", default=None, help="slide (or image) files labelled in QuPath")
    d.add_argument("--labels", type=Path, nargs="+", default=None,
                   help="QuPath GeoJSON export (.geojson/.geojson.gz) of each --slide, in the same order")  # fmt: skip
    d.add_argument("--segment-output", type=Path, default=None,
                   help="slides: the `cytoken segment --out` folder holding <stem>/ per slide (reused; missing "
                   "outputs are written there)")  # fmt: skip
    d.add_argument("--class-names", default=None, help="QuPath labels: classes in this order, comma-separated "
                   "(default: every class found, sorted)")  # fmt: skip
    d.add_argument("--if-labels", type=Path, nargs="+", default=None,
                   help="`cytoken label-from-if` output folders, or their labels.parquet (or .csv) files")  # fmt: skip
    d.add_argument("--cells", type=Path, nargs="+", default=None,
                   help="with --if-labels: the `cytoken segment` output folder (DIR/<stem>) each table was "
                   "computed on (its --cells), in the same order")  # fmt: skip
    d.add_argument(
        "--max-object-um2",
        type=float,
        default=1000.0,
        help="QuPath labels: skip polygons larger than this (tissue regions, not nuclei); 0 keeps all",
    )
    d.add_argument("--model", default="cytoken-default", help="segmentation model whose embeddings are used")
    d.add_argument("--mpp", type=mpp_arg, default=None, help="override the dataset's (slides': level-0) µm/px")
    d.add_argument("--out", required=True, type=Path, help="embedding set file (.npz)")
    d.add_argument("--cache", type=Path, default=None, help="segmentation/embedding cache folder (default: OUT.cache/)")
    d.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    d.add_argument("--embeddings", choices=("mask", "bbox"), default="mask",
                   help="per-cell embedding: area-weighted mean of the tokens under the mask (default) or "
                   "CellViT++'s bounding-box mean")  # fmt: skip
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=run_dataset)

    for name, helptext in (("train", "train with fixed hyper-parameters"), ("search", "hyper-parameter search")):
        t = csub.add_parser(name, help=helptext)
        t.add_argument("--data", required=True, type=Path, help="embedding set from `classifier dataset`")
        t.add_argument("--out", required=True, type=Path, help="bundle folder to write")
        t.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images held out for validation")
        t.add_argument("--val-groups", type=Path, default=None, help="file: one image/slide id per line for validation")
        t.add_argument("--seed", type=int, default=0,
                       help="seed of the validation split and training (search: also the sampler)")  # fmt: skip
        t.add_argument("--class-balance", choices=("none", "loss_weights", "sampler"), default="none",
                       help="rare classes: loss weighted by inverse class frequency, or class-balanced "
                       "sampling (default none)")  # fmt: skip
        t.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
        if name == "train":
            t.add_argument("--hidden", type=int, default=256, choices=(128, 256, 512),
                           help="hidden units (default 256)")  # fmt: skip
            t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
            t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
            t.add_argument("--schedule", choices=("constant", "exponential"), default="constant",
                           help="learning-rate schedule (default constant)")  # fmt: skip
            t.add_argument("--epochs", type=positive_int, default=50,
                           help="at most this many epochs; early stopping on validation macro AUROC "
                           "(default 50)")  # fmt: skip
            t.set_defaults(func=run_train)
        else:
            t.add_argument("--trials", type=positive_int, default=100, help="trials in all, counting a resumed "
                           "study's finished ones (default 100)")  # fmt: skip
            t.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="Optuna sampler (default tpe)")
            t.add_argument("--storage", type=Path, default=None, help="SQLite file: resumable study")
            t.add_argument("--study-name", default="cytoken-classifier", help="study in --storage to create or resume")
            t.set_defaults(func=run_search)

    e = csub.add_parser("evaluate", help="per-class P/R/F1, macro/weighted F1, AUROC, confusion matrix")
    e.add_argument("--bundle", required=True, type=Path, help="classifier bundle folder (from train or search)")
    e.add_argument("--data", required=True, type=Path, help="embedding set to score (e.g. a test split)")
    e.add_argument("--out", type=Path, default=None, help="folder for report.json and confusion.png")
    e.set_defaults(func=run_evaluate)

    a = csub.add_parser("apply", help="re-label existing segment outputs from their stored embeddings")
    a.add_argument("outputs", nargs="+", type=Path, help="cytoken segment output folders (DIR/<stem>)")
    a.add_argument("--bundle", required=True, type=Path,
                   help="classifier bundle folder, trained on the same model's embeddings")  # fmt: skip
    a.set_defaults(func=run_apply)


def run_dataset(args: argparse.Namespace) -> int:
    """Build an embedding set from a labelled dataset or from QuPath-labelled slides."""
    from cytoken.pipeline.classifier import build_embedding_set, build_slide_embedding_set, save_embedding_set
    from cytoken.pipeline.image import SegmentConfig
    from cytoken.pipeline.predictor import Predictor
    from cytoken.types import CytokenError

    slides = args.slide is not None or args.labels is not None
    if_labels = args.if_labels is not None or args.cells is not None
    if slides + if_labels + (args.dataset is not None) != 1:
        raise CytokenError("give one of: --dataset NAME --data-root DIR; --slide FILE... --labels FILE...; "
                           "--if-labels TABLE... --cells SEGMENT_OUTPUT...")  # fmt: skip
    if if_labels:
        return _if_label_dataset(args)
    if args.max_object_um2 < 0:
        raise CytokenError(f"--max-object-um2 must be >= 0 (0 keeps every polygon), got {args.max_object_um2}")
    max_um2 = args.max_object_um2 or None
    class_names = [c.strip() for c in args.class_names.split(",") if c.strip()] if args.class_names else None
    cache = args.cache or args.out.with_suffix(".cache")
    seg = SegmentConfig(embeddings=args.embeddings)
    if slides:
        if not args.slide or not args.labels:
            raise CytokenError("--slide and --labels go together (one QuPath GeoJSON file per slide)")
        model, info = load_model_or_fail(args.model)
        cells, report = build_slide_embedding_set(
            args.slide, args.labels, info, cache_dir=cache, predictor=Predictor(model),
            segment_output=args.segment_output, mpp=args.mpp, class_names=class_names, config=seg,
            max_object_um2=max_um2, progress=not args.quiet,
        )  # fmt: skip
    else:
        if args.data_root is None:
            raise CytokenError("--dataset needs --data-root")
        from cytoken.io.datasets import open_dataset

        kw: dict = {"mpp": args.mpp} if (args.mpp and args.dataset in ("folder", "qupath")) else {}
        if args.dataset == "qupath":
            kw.update(class_names=class_names, max_object_um2=max_um2)
        try:
            ds = open_dataset(args.dataset, args.data_root, split=args.split, **kw)
        except (FileNotFoundError, ValueError) as exc:
            raise CytokenError(str(exc)) from None
        model, info = load_model_or_fail(args.model)
        cells, report = build_embedding_set(ds, Predictor(model), info, mpp=args.mpp, cache_dir=cache,
                                            limit=args.limit, config=seg, progress=not args.quiet)  # fmt: skip
    save_embedding_set(cells, args.out, model_sha256=info.sha256, report=report)
    counts = {n: int((cells.labels == i).sum()) for i, n in enumerate(cells.class_names)}
    print(f"{report['n_matched']} of {report['n_labels']} labels matched a detected cell "
          f"({report['match_rate']:.1%}); {len(cells.labels)} cells: {counts} -> {args.out}")  # fmt: skip
    skipped = {k[2:]: report[k] for k in ("n_unclassified", "n_unsupported", "n_too_large") if report.get(k)}
    if skipped:
        print("skipped QuPath objects: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items()))
    sources = [r["source"] for r in report["images"] if "source" in r]
    if sources:
        print("cells from: " + ", ".join(f"{r['image']} ({r['source']})" for r in report["images"]))
    return 0


def _if_label_dataset(args: argparse.Namespace) -> int:
    from cytoken.pipeline.classifier import save_embedding_set
    from cytoken.pipeline.if_dataset import build_if_label_set
    from cytoken.types import CytokenError

    if not args.if_labels or not args.cells:
        raise CytokenError("--if-labels and --cells go together (one segment output per label table)")
    cells, report = build_if_label_set(args.if_labels, args.cells)
    save_embedding_set(cells, args.out, model_sha256=report["model_sha256"], report=report)
    counts = {n: int((cells.labels == i).sum()) for i, n in enumerate(cells.class_names)}
    print(f"{len(cells.labels)} IF-labelled cells from {len(args.cells)} segment output(s) of model "
          f"{report['model']!r}: {counts} -> {args.out}")  # fmt: skip
    return 0


def _split(args: argparse.Namespace):
    import numpy as np

    from cytoken.classify.dataset import read_split_file, split_by_group
    from cytoken.pipeline.classifier import load_embedding_set
    from cytoken.types import CytokenError

    if args.out.exists() and not args.overwrite:  # before any training, not after it
        raise CytokenError(f"{args.out} already exists; pass --overwrite to replace it")
    cells, meta = load_embedding_set(args.data)
    try:
        cells.check()
    except CytokenError as exc:
        raise CytokenError(f"{args.data}: {exc}") from None
    if args.val_groups:
        val = set(read_split_file(args.val_groups))
        mask = np.isin(cells.groups, list(val))
        if not mask.any():
            raise CytokenError(f"{args.val_groups}: none of its ids is a group of {args.data}")
        train, held = cells.subset(np.flatnonzero(~mask)), cells.subset(np.flatnonzero(mask))
        how = f"the split of --val-groups {args.val_groups}"
    else:
        s = split_by_group(cells.groups, val_fraction=args.val_fraction, seed=args.seed)
        train, held = cells.subset(s.train), cells.subset(s.val)
        how = f"the split by image (--val-fraction {args.val_fraction}, --seed {args.seed})"
    _check_split(args.data, train, held, how)
    return train, held, meta


def _check_split(data: Path, train, val, how: str) -> None:
    """Refuse a split whose training part misses a class, or whose validation part has fewer than 2 classes."""
    import numpy as np

    from cytoken.types import CytokenError

    names = train.class_names
    missing = [names[i] for i in np.flatnonzero(np.bincount(train.labels, minlength=len(names)) == 0)]
    if missing:
        raise CytokenError(
            f"{data}: class(es) {missing} have no training example in {how} (all their cells are in the validation "
            "images); label them in more images, or choose another split (--seed, --val-fraction or --val-groups)"
        )
    present = [names[i] for i in np.unique(val.labels)]
    if len(present) < 2:
        raise CytokenError(
            f"{data}: the validation images of {how} hold cells of {len(present)} class(es) {present}; AUROC needs "
            "at least 2: choose another split (--seed, --val-fraction or --val-groups) or label more images"
        )


def _save(args: argparse.Namespace, trained, train, val, meta, extra: dict | None = None) -> None:
    from cytoken.classify import evaluate, save_bundle

    report = evaluate(val.labels, trained.predict_proba(val.embeddings), val.class_names)
    metrics = {"validation": report.to_dict(), "n_train": len(train.labels), "n_val": len(val.labels), **(extra or {})}
    save_bundle(args.out, trained, class_names=train.class_names, metrics=metrics,
                embedding_model_sha256=meta["model_sha256"], embedding_dim=train.embeddings.shape[1],
                overwrite=args.overwrite)  # fmt: skip
    print(f"validation: macro AUROC {report.macro_auroc:.4f}, macro F1 {report.macro_f1:.4f}, "
          f"weighted F1 {report.weighted_f1:.4f}, accuracy {report.accuracy:.4f} -> {args.out}")  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    """Train with fixed hyper-parameters."""
    from cytoken.classify import TrainConfig, train_classifier

    train, val, meta = _split(args)
    cfg = TrainConfig(hidden=args.hidden, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                      epochs=args.epochs, class_balance=args.class_balance, seed=args.seed)  # fmt: skip
    trained = train_classifier(train.embeddings, train.labels, val.embeddings, val.labels, cfg,
                               num_classes=len(train.class_names), class_names=train.class_names)  # fmt: skip
    _save(args, trained, train, val, meta)
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Hyper-parameter search (Optuna), then retrain the best configuration in float32."""
    from dataclasses import replace

    from cytoken.classify import TrainConfig, search, train_classifier

    train, val, meta = _split(args)
    res = search(train.embeddings, train.labels, val.embeddings, val.labels, n_trials=args.trials,
                 sampler=args.sampler, storage=args.storage, study_name=args.study_name, seed=args.seed,
                 base_config=TrainConfig(class_balance=args.class_balance, seed=args.seed),
                 num_classes=len(train.class_names))  # fmt: skip
    print(f"{res.n_new} new trials in {res.wall_time_s:.1f}s ({res.trials_per_s:.2f}/s); best val AUROC "
          f"{res.best_value:.4f} with {res.best_params}")  # fmt: skip
    best = replace(res.best_config, seed=args.seed)
    trained = train_classifier(train.embeddings, train.labels, val.embeddings, val.labels, best,
                               num_classes=len(train.class_names), class_names=train.class_names)  # fmt: skip
    _save(args, trained, train, val, meta, {"search": res.to_dict()})
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Score a bundle on an embedding set."""
    from cytoken.classify import check_compatible, evaluate, load_bundle, plot_confusion
    from cytoken.io.atomic import atomic_write_text
    from cytoken.pipeline.classifier import load_embedding_set
    from cytoken.types import CytokenError

    bundle = load_bundle(args.bundle)
    cells, meta = load_embedding_set(args.data)
    check_compatible(bundle, meta.get("model_sha256"), cells.embeddings.shape[1], source=str(args.data))
    if tuple(cells.class_names) != tuple(bundle.class_names):
        raise CytokenError(f"{args.data} has classes {list(cells.class_names)}, the bundle {list(bundle.class_names)}")
    report = evaluate(cells.labels, bundle.predict_proba(cells.embeddings), cells.class_names)
    print(f"{'class':<20}{'precision':>10}{'recall':>10}{'F1':>10}{'AUROC':>10}{'n':>8}")
    for i, name in enumerate(report.class_names):
        print(f"{name:<20}{report.precision[i]:>10.4f}{report.recall[i]:>10.4f}{report.f1[i]:>10.4f}"
              f"{report.auroc[i]:>10.4f}{int(report.support[i]):>8}")  # fmt: skip
    print(f"macro F1 {report.macro_f1:.4f}  weighted F1 {report.weighted_f1:.4f}  accuracy {report.accuracy:.4f}  "
          f"macro AUROC {report.macro_auroc:.4f}")  # fmt: skip
    print("confusion (rows true, columns predicted):")
    for i, name in enumerate(report.class_names):
        print(f"  {name:<18}" + " ".join(f"{int(v):>6}" for v in report.confusion[i]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "report.json", json.dumps(report.to_dict(), indent=2, default=float))
        plot_confusion(report.confusion, list(report.class_names), args.out / "confusion.png")
        print(f"-> {args.out}/report.json, confusion.png")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    """Re-label existing outputs."""
    from cytoken.classify import load_bundle
    from cytoken.pipeline.classifier import apply_bundle

    bundle = load_bundle(args.bundle)
    for folder in args.outputs:
        s = apply_bundle(folder, bundle)
        print(f"{folder}: {s['cells']} cells re-labelled: {s['cells_per_class']}")
    return 0
