"""``cytoken label-from-if``: H&E + registered immunofluorescence → per-cell positive/negative labels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytoken.cli._common import load_model_or_fail, mpp_arg, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "label-from-if",
        help="label H&E cells from an IF marker: register, threshold, overlap >= 15 %% -> positive",
        description="Registers the IF image onto the H&E (hematoxylin vs the nuclear channel; rigid/affine then "
        "B-spline), thresholds the marker, and labels every H&E cell by the fraction of its area on the "
        "marker. An image larger than --tile-px on a side is handled as a slide: the H&E is read tile by tile "
        "through the slide readers (svs, ndpi, tiled TIFF, ...), the IF crop by crop (TIFF/OME-TIFF/QPTIFF), "
        "registered tile by tile (overview from block-averaged reads, then per-tile refinement) and "
        "thresholded with ONE threshold for the whole slide, computed from a pooled histogram of the marker "
        "signal of all tiles; the marker mask is written tile by tile as marker_mask.tif, so memory does not "
        "grow with the slide's area (only the per-cell tables grow with the number of cells). Writes "
        "registration.json, marker_mask.png (slides: .tif), labels.parquet, labels.csv, qc.png and "
        "summary.json (with the registration quality), in image mode if_on_he.ome.tif (every IF channel "
        "resampled onto the H&E grid), and without --cells segmentation/<H&E stem>/, the `cytoken segment` "
        "output whose cells were labelled. Channels (--marker, --nuclear-channel) are given by name "
        "(case-insensitive) or by 0-based index: a number selects by index unless a channel is named that "
        "way. Registration that fails the nucleus guard stops the command with the measured numbers and "
        "writes nothing.",
    )
    p.add_argument("--he", required=True, type=Path, help="H&E image (PNG/JPEG/TIFF)")
    p.add_argument(
        "--if",
        dest="if_path",
        required=True,
        action="append",
        metavar="IF",
        help="IF image: one multi-channel file (OME-TIFF, qptiff, TIFF), or one single-channel file per channel, "
        "repeated as NAME=FILE (e.g. --if DAPI=dapi.png --if CD3=cd3.tif; a FILE without NAME= is named by its "
        "file stem)",
    )
    p.add_argument(
        "--marker",
        required=True,
        help="IF channel to threshold: a name, or a 0-based index when no channel has that name",
    )
    p.add_argument(
        "--nuclear-channel", default="DAPI", help="IF nuclear channel: name or 0-based index (default DAPI)"
    )
    p.add_argument("--he-mpp", type=mpp_arg, default=None, help="µm/px of the H&E when the file does not say")
    p.add_argument("--if-mpp", type=mpp_arg, default=None, help="µm/px of the IF when the file does not say")
    p.add_argument(
        "--transform",
        choices=("rigid", "affine"),
        default="rigid",
        help="linear registration stage: rigid (rotation + translation) or affine (rigid, then a full affine)",
    )
    p.add_argument(
        "--bspline-grid-um",
        type=_bspline_grid,
        default=32.0,
        help="B-spline control-point spacing in µm of the non-rigid stage; 0 or none = no B-spline (default 32)",
    )
    p.add_argument(
        "--max-residual-px",
        type=positive_float,
        default=4.0,
        help="registration guard: largest accepted median nucleus residual in H&E pixels (default 4)",
    )
    p.add_argument("--threshold", default="otsu", help="otsu, triangle, percentile:P or a fixed value")
    p.add_argument(
        "--background",
        default="none",
        help="background subtraction before thresholding: none, gaussian:R, tophat:R or rolling_ball:R "
        "(R = radius in H&E pixels, e.g. tophat:40)",
    )
    p.add_argument("--smooth-px", type=float, default=0.0, help="Gaussian smoothing sigma before thresholding")
    p.add_argument("--min-object-px", type=int, default=0, help="drop marker regions smaller than this")
    p.add_argument("--overlap", type=float, default=0.15, help="positive when this fraction of a cell is on marker")
    p.add_argument("--negative-margin", type=float, default=0.0, help="drop cells just below the overlap cut")
    p.add_argument(
        "--cells",
        type=Path,
        default=None,
        help="the H&E cells: an instance-map image (PNG/TIFF; in slide mode a TIFF is read tile by tile, a PNG "
        "whole) or a `cytoken segment` output folder (cells.parquet); else the H&E is segmented with --model and "
        "the full segment output is kept in OUT/segmentation/<H&E stem>/ (the --cells folder for "
        "`classifier dataset --if-labels OUT`)",
    )
    p.add_argument("--model", default="cytoken-default", help="segmentation model when --cells is not given")
    p.add_argument(
        "--registration",
        type=Path,
        default=None,
        help="reuse a saved registration.json (a tiled one switches to slide mode); the registration options "
        "are then ignored",
    )
    p.add_argument(
        "--tile-px",
        type=positive_int,
        default=2048,
        help="H&E tile size of slide mode, a multiple of 16 (the marker mask TIFF uses these tiles); images larger "
        "than this on a side are processed as a slide (default 2048)",
    )
    p.add_argument(
        "--failed-tiles",
        choices=("skip", "overview"),
        default="skip",
        help="slide mode: tiles whose registration refinement fails are left out (skip: their cells get "
        "no_coverage), or (overview) use the overview transform on those where it passes the same nucleus guard "
        "(the others are still left out)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=run)


def _bspline_grid(text: str) -> float | None:
    """``--bspline-grid-um``: a spacing in µm, or None for 0 / none (no non-rigid stage)."""
    if text.strip().lower() in ("none", "0", "0.0", "off"):
        return None
    return positive_float(text)


def _single_if_file(values: list[str]) -> Path | None:
    """The one multi-channel file of ``--if`` values, or None when they name single-channel files (NAME=FILE)."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return Path(values[0])
    return None


def _read_if_arg(values: list[str], mpp: float | None):
    """``--if`` values -> the IF image: one multi-channel file, or single-channel files as NAME=FILE (or FILE)."""
    from cytoken.io.ifimage import read_if
    from cytoken.types import CytokenError

    single = _single_if_file(values)
    if single is not None:
        return read_if(single, mpp=mpp)
    files: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or Path(v).exists():
            name, path = Path(v).stem, v
        name = name.strip()
        if not name or not path:
            raise CytokenError(f"--if {v!r}: give NAME=FILE (e.g. --if DAPI=dapi.png)")
        if name.lower() in {k.lower() for k in files}:
            raise CytokenError(f"--if: channel name {name!r} is given twice ({values})")
        files[name] = Path(path)
    return read_if(files, mpp=mpp)


def _channel(key: str, image) -> str:
    """A channel argument: the name when a channel has it, else digits as a 0-based index (resolved, or error)."""
    return image.channel_names[image.index(key)]


def _registration_config(args: argparse.Namespace, nuclear_channel: str):
    """The RegistrationConfig of the command's registration options."""
    from cytoken.labeling.registration import RegistrationConfig

    return RegistrationConfig(
        nuclear_channel=nuclear_channel,
        linear=args.transform,
        bspline_grid_um=args.bspline_grid_um,
        max_residual_px=args.max_residual_px,
    )


def _tile_records(result) -> list[dict]:
    """summary.json's per-tile entries of a slide result: bounds, used, refinement error, overview check error."""
    tr = result.registration
    overview_errors = tr.overview_errors or [None] * len(tr.tiles)
    return [
        {"x": b.x, "y": b.y, "width": b.width, "height": b.height, "used": bool(u), "error": e, "overview_error": oe}
        for b, u, e, oe in zip(tr.tiles, result.tiles_used, tr.errors, overview_errors)
    ]


def _quality_dict(registration) -> dict | None:
    """A registration's quality report as a JSON-ready dict (None when it has none)."""
    q = registration.quality
    return None if q is None else q.to_dict()


def _threshold_config(text: str, background: str = "none", smooth_px: float = 0.0, min_object_px: int = 0):
    from cytoken.labeling.threshold import ThresholdConfig
    from cytoken.types import CytokenError

    bg, _, radius = background.lower().partition(":")
    try:
        common = {
            "background": bg,
            "background_radius_px": float(radius) if radius else 50.0,
            "smooth_sigma_px": smooth_px,
            "min_object_px": min_object_px,
        }
        ThresholdConfig(**common)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CytokenError(f"--background {background!r} / --smooth-px / --min-object-px: {exc}") from None
    t = text.lower()
    if t in ("otsu", "triangle"):
        return ThresholdConfig(method=t, **common)  # type: ignore[arg-type]
    if t.startswith("percentile:"):
        try:
            return ThresholdConfig(method="percentile", value=float(t.split(":", 1)[1]), **common)  # type: ignore[arg-type]
        except ValueError as exc:
            raise CytokenError(f"--threshold {text!r}: {exc}") from None
    try:
        return ThresholdConfig(method="fixed", value=float(t), **common)  # type: ignore[arg-type]
    except ValueError:
        raise CytokenError(f"--threshold {text!r}: use otsu, triangle, percentile:P or a number") from None


def _read_cells(path: Path, shape: tuple[int, int], slide: bool = False):
    """The cells given by ``--cells``: the CellSet of a `cytoken segment` output folder, else an instance map.

    In slide mode the map is opened for reading tile by tile (TIFF; other formats are read whole).
    """
    import numpy as np
    from PIL import Image

    from cytoken.types import CytokenError

    if path.is_dir():
        from cytoken.pipeline.classifier import read_output_cells

        cells, _ = read_output_cells(path)
        return cells
    if slide:
        from cytoken.io.ifreader import open_if

        reader = open_if(path, mpp=1.0)  # pixels only: an instance map has no meaningful µm/px
        if reader.shape != shape:
            reader.close()
            raise CytokenError(f"--cells {path} is {reader.shape}, the H&E is {shape}")
        return reader
    try:
        cells = np.array(Image.open(path)).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise CytokenError(f"--cells {path}: cannot read an instance map ({exc})") from None
    if cells.shape != shape:
        raise CytokenError(f"--cells {path} is {cells.shape}, the H&E is {shape}")
    return cells


def _segment_link(output: Path, *, shown: Path) -> dict[str, str]:
    """The record tying labels to the segment output they were computed on (its cells.parquet sha256)."""
    from cytoken.weights import file_sha256

    return {"cells_output": str(shown), "cells_sha256": file_sha256(output / "cells.parquet")}


def _he_is_large(path: Path, tile_px: int) -> bool:
    """More than ``tile_px`` on a side, from the header; a file the image reader cannot size counts as a slide."""
    from cytoken.io.image import read_image_size
    from cytoken.types import CytokenError

    try:
        return max(read_image_size(path)) > tile_px
    except CytokenError:
        return True


def _segment(args: argparse.Namespace, dest: Path, slide: bool) -> Path:
    """Segment the H&E as ``cytoken segment`` does (its defaults and the model's classifier) into ``dest/<stem>/``."""
    from cytoken.cli._common import cell_classifier
    from cytoken.pipeline.image import SegmentConfig
    from cytoken.pipeline.predictor import Predictor
    from cytoken.pipeline.run import segment_image_file, segment_slide_file

    model, info = load_model_or_fail(args.model)
    config = SegmentConfig()
    predictor = Predictor(model, config.device)
    bundle = cell_classifier(None, info, model, embeddings=config.embeddings)
    runner = segment_slide_file if slide else segment_image_file  # a slide is streamed, an image read whole
    runner(args.he, dest, predictor, info, config, mpp=args.he_mpp, progress=False, classifier=bundle)
    return dest / args.he.stem


def _open_if_arg(values: list[str], mpp: float | None):
    """Slide mode's IF: one multi-channel file opened for crop-by-crop reading, or single-channel files read whole."""
    from cytoken.io.ifreader import open_if

    single = _single_if_file(values)
    if single is not None:
        return open_if(single, mpp=mpp)
    return _read_if_arg(values, mpp)


def run(args: argparse.Namespace) -> int:
    """Execute the command."""
    from contextlib import ExitStack

    from cytoken.io.atomic import atomic_dir
    from cytoken.labeling.cell_labels import CellLabelConfig
    from cytoken.labeling.slide import label_from_if_slide
    from cytoken.labeling.tiled import TiledRegistration, read_registration
    from cytoken.labeling.workflow import label_from_if, write_outputs
    reg = read_registration(args.registration) if args.registration else None
    slide = isinstance(reg, TiledRegistration) or (reg is None and _he_is_large(args.he, args.tile_px))
    with ExitStack() as stack:
        if slide:  # read window by window: the H&E through open_slide, the IF crop by crop
            from cytoken.io.slide import open_slide

            he = stack.enter_context(open_slide(args.he, mpp=args.he_mpp))
            ifimg = _open_if_arg(args.if_path, args.if_mpp)
            he_mpp, shape = he.mpp, (he.dimensions[1], he.dimensions[0])
        else:
            from cytoken.io.image import read_image

            loaded = read_image(args.he, args.he_mpp)
            ifimg = _read_if_arg(args.if_path, args.if_mpp)
            he, he_mpp, shape = loaded.array, loaded.mpp, loaded.array.shape[:2]
        if hasattr(ifimg, "close"):
            stack.callback(ifimg.close)
        marker = _channel(args.marker, ifimg)  # unknown marker: clear error listing the channels, before any work
        tcfg = _threshold_config(args.threshold, args.background, args.smooth_px, args.min_object_px)
        lcfg = CellLabelConfig(positive_fraction=args.overlap, negative_margin=args.negative_margin)
        rcfg = _registration_config(args, _channel(args.nuclear_channel, ifimg))
        cells = None if args.cells is None else _read_cells(args.cells, shape, slide)
        if hasattr(cells, "close"):
            stack.callback(cells.close)
        with atomic_dir(args.out) as tmp:  # nothing is left behind when any step fails
            link = None  # which segment output the labels refer to (for the `classifier dataset --if-labels` join)
            if args.cells is None:
                from cytoken.pipeline.classifier import read_output_cells

                seg = _segment(args, tmp / "segmentation", slide)
                cells, _ = read_output_cells(seg)
                link = _segment_link(seg, shown=args.out / "segmentation" / seg.name)
            elif args.cells.is_dir():
                link = _segment_link(args.cells, shown=args.cells)
            if slide:
                result = label_from_if_slide(
                    he, ifimg, cells, he_mpp=he_mpp, marker=marker, registration=reg,  # type: ignore[arg-type]
                    tile_px=args.tile_px, registration_config=rcfg, threshold_config=tcfg, label_config=lcfg,
                    failed_tiles=args.failed_tiles, mask_path=tmp / "marker_mask.tif",
                )  # fmt: skip
                extra = {
                    "mode": "slide",
                    "threshold": result.threshold,
                    "threshold_scope": "one threshold for the whole image, from the pooled histogram of all tiles",
                    "signal": result.stats,
                    "tiles": _tile_records(result),
                    "overview_quality": _quality_dict(result.registration.overview),
                }
            else:
                result = label_from_if(
                    he, ifimg, cells, he_mpp=he_mpp, marker=marker, registration=reg,  # type: ignore[arg-type]
                    registration_config=rcfg, threshold_config=tcfg, label_config=lcfg,
                )  # fmt: skip
                extra = {
                    "mode": "image",
                    "threshold": result.marker.threshold,
                    "signal": result.marker.stats,
                    "quality": _quality_dict(result.registration),
                }
            write_outputs(result, he, tmp, label_metadata=link)
            counts = result.labels.counts()
            summary = {"counts": counts, "marker": marker, **extra}
            if link is not None:
                summary["cells"] = link
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    mode = f"slide mode, {len(extra['tiles'])} tiles, one threshold" if slide else "image mode"
    print(f"{args.he.name} ({mode}, threshold {extra['threshold']:.4g}): {counts} -> {args.out}")
    return 0
