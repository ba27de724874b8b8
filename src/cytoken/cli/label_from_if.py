"""``cytoken label-from-if``: H&E + registered immunofluorescence → per-cell positive/negative labels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytoken.cli._common import load_model_or_fail, mpp_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "label-from-if",
        help="label H&E cells from an IF marker: register, threshold, overlap >= 15 %% -> positive",
        description="Registers the IF image onto the H&E (hematoxylin vs the nuclear channel; rigid/affine then "
        "B-spline), thresholds the marker, and labels every H&E cell by the fraction of its area on the marker. "
        "Writes registration.json, marker_mask.png, labels.parquet, labels.csv, qc.png and summary.json.",
    )
    p.add_argument("--he", required=True, type=Path, help="H&E image (PNG/JPEG/TIFF)")
    p.add_argument("--if", dest="if_path", required=True, type=Path, help="IF image (OME-TIFF, qptiff, TIFF/PNG)")
    p.add_argument("--marker", required=True, help="IF channel to threshold (name or index)")
    p.add_argument("--nuclear-channel", default="DAPI", help="IF nuclear channel (default DAPI)")
    p.add_argument("--he-mpp", type=mpp_arg, default=None, help="µm/px of the H&E when the file does not say")
    p.add_argument("--if-mpp", type=mpp_arg, default=None, help="µm/px of the IF when the file does not say")
    p.add_argument("--threshold", default="otsu", help="otsu, triangle, percentile:P or a fixed value")
    p.add_argument("--overlap", type=float, default=0.15, help="positive when this fraction of a cell is on marker")
    p.add_argument("--negative-margin", type=float, default=0.0, help="drop cells just below the overlap cut")
    p.add_argument("--cells", type=Path, default=None, help="an instance-map PNG of the H&E cells (else segment)")
    p.add_argument("--model", default="cytoken-default", help="segmentation model when --cells is not given")
    p.add_argument("--registration", type=Path, default=None, help="reuse a saved registration.json")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute the command."""
    import numpy as np
    from PIL import Image

    from cytoken.io.atomic import atomic_dir
    from cytoken.io.ifimage import read_if
    from cytoken.io.image import read_image
    from cytoken.labeling.cell_labels import CellLabelConfig
    from cytoken.labeling.registration import Registration, RegistrationConfig
    from cytoken.labeling.threshold import ThresholdConfig
    from cytoken.labeling.workflow import label_from_if, write_outputs
    from cytoken.types import CytokenError

    he = read_image(args.he, args.he_mpp)
    ifimg = read_if(args.if_path, mpp=args.if_mpp)
    ifimg.index(args.marker)  # unknown marker: clear error listing the channels, before any work
    ifimg.index(args.nuclear_channel)
    t = args.threshold.lower()
    if t in ("otsu", "triangle"):
        tcfg = ThresholdConfig(method=t)
    elif t.startswith("percentile:"):
        tcfg = ThresholdConfig(method="percentile", value=float(t.split(":", 1)[1]))
    else:
        try:
            tcfg = ThresholdConfig(method="fixed", value=float(t))
        except ValueError:
            msg = f"--threshold {args.threshold!r}: use otsu, triangle, percentile:P or a number"
            raise CytokenError(msg) from None
    if args.cells is not None:
        cells = np.array(Image.open(args.cells)).astype(np.int64)
        if cells.shape != he.array.shape[:2]:
            raise CytokenError(f"--cells {args.cells} is {cells.shape}, the H&E is {he.array.shape[:2]}")
    else:
        from cytoken.pipeline import Predictor, segment_image_with_labels

        model, _ = load_model_or_fail(args.model)
        _, cells = segment_image_with_labels(he.array, Predictor(model), he.mpp)  # type: ignore[arg-type]
    reg = Registration.load(args.registration) if args.registration else None
    result = label_from_if(
        he.array, ifimg, cells, he_mpp=he.mpp, marker=args.marker, registration=reg,  # type: ignore[arg-type]
        registration_config=RegistrationConfig(nuclear_channel=args.nuclear_channel), threshold_config=tcfg,
        label_config=CellLabelConfig(positive_fraction=args.overlap, negative_margin=args.negative_margin),
    )  # fmt: skip
    with atomic_dir(args.out) as tmp:
        write_outputs(result, he.array, tmp)
        counts = result.labels.counts()
        summary = {"counts": counts, "marker": args.marker, "quality": str(result.registration.quality)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.he.name}: {counts} -> {args.out}")
    return 0
