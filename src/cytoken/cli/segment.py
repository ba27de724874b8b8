"""``cytoken segment INPUT... --out DIR``: images and whole slides → cells, outlines, classes, embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

from cytoken.cli._common import cell_classifier, hover_config_arg, load_model_or_fail, mpp_arg, positive_int

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".qptiff", ".tiff", ".tif"}
IMAGE_TIFF_MAX_PIXELS = 8192 * 8192  # TIFFs up to this size go through the image path, larger ones are slides


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "segment",
        help="find, outline and classify every nucleus in images or slides",
        description="Segment H&E images (PNG/JPEG/TIFF) or whole slides. Writes DIR/<stem>/ with cells.geojson, "
        "cells.json, cell_detection.json, cells.parquet, embeddings.npy, cells.h5ad (with the anndata extra), "
        "overlay.png (images) and run.json. "
        "Models with named input channels (e.g. DAPI,CD3,PanCK) read multi-channel TIFF/OME-TIFF/QPTIFF/.npy "
        "files and pick their channels by name (see docs/multichannel.md).",
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or slide files")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--model", default="cytoken-default", help="model name (see `cytoken models`) or weights file")
    p.add_argument("--mpp", type=mpp_arg, default=None, help="µm/px of the inputs when the files do not say")
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
    p.add_argument("--tile-size", type=positive_int, default=None, help="window size in model px")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in model px")
    p.add_argument(
        "--embeddings",
        choices=("mask", "bbox", "none"),
        default="mask",
        help="per-cell token embeddings: mask-weighted mean (default), CellViT++ bbox mean, or none",
    )
    p.add_argument(
        "--classifier",
        default=None,
        metavar="BUNDLE|none",
        help="classifier bundle applied to the cells' embeddings in the same run (default: the model's own default "
        "classifier when it ships one, as cytoken-default does; 'none': the model's type head)",
    )
    p.add_argument(
        "--channels",
        default=None,
        help="multi-channel models: image channels feeding the model's channels, either one per model channel in "
        "its order (DAPI,FITC,Cy3; names or 0-based indices) or model=image pairs (CD3=FITC,PanCK=Cy3); "
        "default: match by name, case-insensitive",
    )
    p.add_argument(
        "--he",
        type=Path,
        default=None,
        help="H&E RGB image registered to the (single) IF input, stacked as channels R,G,B for models that read "
        "R,G,B plus fluorescence channels",
    )
    p.add_argument(
        "--intensity",
        choices=("dtype", "percentile"),
        default="dtype",
        help="multi-channel models: raw intensity -> [0, 1] by the dtype maximum (default; uint16 / 65535) or by "
        "each channel's 0.5-99.5 percentile range over the image (images only); use the model's training rule",
    )
    p.add_argument("--slide", action="store_true", help="treat every input as a whole slide (streaming pipeline)")
    p.add_argument("--roi", default=None, help="slides: only this level-0 region x,y,w,h")
    p.add_argument("--tissue-mask", type=Path, default=None, help="slides: binary tissue mask image")
    p.add_argument("--resume", action="store_true", help="slides: continue an interrupted run")
    p.add_argument("--read-workers", type=int, default=1, help="slides: tile-reading processes (default 1)")
    p.add_argument("--decode-workers", type=int, default=1, help="slides: post-processing processes (default 1)")
    p.add_argument(
        "--plain-geojson",
        action="store_true",
        help="slides: write cells.geojson uncompressed instead of cells.geojson.gz (geopandas reads the .gz as "
        "gpd.read_file('/vsigzip/PATH'); QuPath 0.4+ reads both)",
    )
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _is_slide(path: Path, multichannel: bool = False) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff") or (multichannel and suffix in (".qptiff", ".btf")):
        from cytoken.io.image import read_image_size

        try:
            w, h = read_image_size(path)
        except Exception:  # unreadable as a plain image: let the slide readers try (and report)
            return True
        return w * h > IMAGE_TIFF_MAX_PIXELS
    return suffix in SLIDE_SUFFIXES


def run(args: argparse.Namespace) -> int:
    """Execute the command."""
    from tqdm.auto import tqdm

    from cytoken.io.atomic import check_writable_dir
    from cytoken.pipeline.image import SegmentConfig, is_multichannel
    from cytoken.pipeline.predictor import Predictor
    from cytoken.pipeline.run import segment_image_file
    from cytoken.types import CytokenError

    out = check_writable_dir(args.out)
    for path in args.inputs:
        if not path.exists():
            raise CytokenError(f"input not found: {path}")
    model, info = load_model_or_fail(args.model)
    channels = tuple(c.strip() for c in args.channels.split(",") if c.strip()) if args.channels else None
    config = SegmentConfig(batch_size=args.batch_size, tile_size=args.tile_size, overlap=args.overlap,
                           device=args.device, tta=args.tta, amp=args.amp, embeddings=args.embeddings,
                           channels=channels, intensity=args.intensity,
                           hover=hover_config_arg(args.hover_config))  # fmt: skip
    multichannel = is_multichannel(model.config)
    if args.he is not None:
        if len(args.inputs) != 1:
            raise CytokenError(f"--he pairs one H&E image with one IF image; got {len(args.inputs)} inputs")
        if not args.he.exists():
            raise CytokenError(f"--he image not found: {args.he}")
    if (args.channels or args.intensity != "dtype") and not multichannel:
        raise CytokenError("--channels and --intensity are for models with multi-channel inputs; this model reads RGB")
    predictor = Predictor(model, config.device, amp=config.amp, tta=config.tta)
    bundle = cell_classifier(args.classifier, info, model, embeddings=args.embeddings)
    bar = tqdm(args.inputs, desc="inputs", unit="file", disable=args.quiet or len(args.inputs) < 2)
    for path in bar:
        if args.slide or _is_slide(path, multichannel):
            if args.he is not None:
                raise CytokenError(f"{path}: --he works with images, not whole slides; stack the H&E and IF into one "
                                   "multi-channel pyramidal OME-TIFF (see docs/multichannel.md)")  # fmt: skip
            from cytoken.io.slide.tissue import parse_roi
            from cytoken.pipeline.run import segment_slide_file

            summary = segment_slide_file(
                path, out, predictor, info, config, mpp=args.mpp, progress=not args.quiet,
                roi=parse_roi(args.roi) if args.roi else None, tissue_mask=args.tissue_mask, resume=args.resume,
                read_workers=max(0, args.read_workers), decode_workers=max(0, args.decode_workers),
                classifier=bundle, gzip_geojson=not args.plain_geojson,
            )  # fmt: skip
        else:
            show = not args.quiet and len(args.inputs) < 2
            summary = segment_image_file(
                path,
                out,
                predictor,
                info,
                config,
                mpp=args.mpp,
                overlay=not args.no_overlay,
                progress=show,
                classifier=bundle,
                he=args.he,
            )
        counts = ", ".join(f"{k} {v}" for k, v in summary["cells_per_class"].items()) or "none"
        print(f"{path.name}: {summary['cells']} cells ({counts}) -> {summary['output']}")
        if "tiles_segmented" in summary:
            print(slide_summary(summary))
    return 0


def slide_summary(run: dict) -> str:
    """The end-of-run lines of a slide run: tiles done and skipped, wall time by stage, peak memory."""
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in run.get("stage_seconds", {}).items())
    tree = run.get("peak_rss_tree_mb")
    return (
        f"  tiles: {run['tiles_segmented']} segmented, {run['tiles_resumed']} resumed, "
        f"{run['tiles_without_tissue']} skipped without tissue (grid of {run['tiles_in_grid']})\n"
        f"  wall time {run['wall_seconds']:.1f} s ({stages}); peak memory {tree:.0f} MB with the worker processes "
        f"({run['peak_rss_main_mb']:.0f} MB main process)"
    )
