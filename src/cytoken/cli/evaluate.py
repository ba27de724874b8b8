"""``cytoken evaluate``: one honest evaluation path for models and for other tools' saved predictions."""

from __future__ import annotations

import argparse
from pathlib import Path

from cytoken.cli._common import cell_classifier, hover_config_arg, load_model_or_fail, mpp_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "evaluate",
        help="score a model (or saved instance maps) on a dataset: bPQ, Dice, AJI, detection F1, mPQ, type F1",
    )
    p.add_argument("--model", default="cytoken-default", help="model name or weights file")
    p.add_argument(
        "--dataset",
        required=True,
        help="monuseg, consep, consep_patched, pannuke, lizard, crchisto, cellvit, segpath or folder",
    )
    p.add_argument("--data-root", required=True, type=Path, help="dataset folder")
    p.add_argument("--split", default=None, help="split to score (default: the adapter's, e.g. test)")
    p.add_argument("--mpp", type=mpp_arg, default=None, help="override the dataset's µm/px")
    p.add_argument("--out", required=True, type=Path, help="metrics.json to write")
    p.add_argument("--save-predictions", type=Path, default=None, help="write scored instance maps as DIR/<stem>.png")
    p.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="score saved uint16 instance maps DIR/<stem>.png instead of running a model",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=positive_int, default=8, help="tiles per forward pass (default 8)")
    p.add_argument(
        "--hover-config",
        metavar="FILE",
        help="post-processing parameters: a YAML/JSON mapping of HoverConfig fields, optionally with "
        "preset: default|cellvit|exact_maps (default: the parameters stored with the model)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation: average 4 flipped passes (4x time)")
    p.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 autocast on CPU (float16 on CUDA): about 2x the forward speed on CPUs with AVX-512-BF16/AMX, "
        "slightly different maps (see benchmarks/results/inference_options.md)",
    )
    p.add_argument(
        "--classifier",
        default=None,
        metavar="BUNDLE|none",
        help="classifier bundle that assigns the cell classes from the cells' embeddings (default: the model's own "
        "default classifier when it ships one; 'none': the model's type head). Used on datasets with classes",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute the command."""
    from cytoken.io.datasets import open_dataset
    from cytoken.pipeline.evaluate import EvaluateConfig, evaluate, write_metrics
    from cytoken.pipeline.image import SegmentConfig
    from cytoken.pipeline.predictor import Predictor
    from cytoken.types import CytokenError

    if args.predictions is not None and args.classifier not in (None, "none"):
        raise CytokenError("--classifier needs a model run (cell embeddings); saved --predictions have none")

    kw = {"mpp": args.mpp} if (args.mpp and args.dataset == "folder") else {}
    try:
        ds = (
            open_dataset(args.dataset, args.data_root, split=args.split or "test", **kw)
            if args.split or args.dataset in ("monuseg", "consep", "consep_patched")
            else open_dataset(args.dataset, args.data_root, **kw)
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CytokenError(str(exc)) from None
    predictor = None
    model_id = None
    classifier = None
    if args.predictions is None:
        model, info = load_model_or_fail(args.model)
        predictor = Predictor(model, args.device, tta=args.tta, amp=args.amp)
        model_id = {"name": info.name, "sha256": info.sha256, "source": info.source}
        if ds.class_names:  # classes are scored: they come from the classifier when there is one
            classifier = cell_classifier(args.classifier, info, model)
    seg = SegmentConfig(
        batch_size=args.batch_size,
        device=args.device,
        tta=args.tta,
        amp=args.amp,
        hover=hover_config_arg(args.hover_config),
        embeddings="none" if classifier is None else "mask",
    )
    cfg = EvaluateConfig(mpp=args.mpp, save_predictions=args.save_predictions, predictions=args.predictions,
                         limit=args.limit, segment=seg)  # fmt: skip
    metrics = evaluate(ds, predictor, cfg, model_id=model_id, classifier=classifier, progress=not args.quiet)
    write_metrics(metrics, args.out)
    keys = (
        "bpq",
        "bdq",
        "bsq",
        "dice",
        "aji",
        "aji_plus",
        "mpq",
        "mpq_plus",
        "det_f1",
        "det_precision",
        "det_recall",
    )
    width = 2 + max([len("aji_plus"), *(len("F1 " + n) for n in (metrics.get("type_f1") or {}))])
    print(f"{'metric':<{width}}value")
    for k in keys:
        v = metrics.get(k)
        if v is not None:
            print(f"{k:<{width}}{v:.4f}")
    for name, f in (metrics.get("type_f1") or {}).items():
        print(f"{'F1 ' + name:<{width}}{f:.4f}")
    print(f"images {metrics['n_images']}, true {metrics['n_true']}, predicted {metrics['n_pred']} -> {args.out}")
    return 0
