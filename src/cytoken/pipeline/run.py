"""File-level runners: one input file → one atomically written output folder."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cytoken.pipeline.image import SegmentConfig, input_overlay, load_input, model_hover_config, segment_image
from cytoken.pipeline.outputs import CellOutputWriter, output_folder
from cytoken.pipeline.predictor import Predictor
from cytoken.postprocess import HoverConfig
from cytoken.types import CellSet
from cytoken.weights import ModelInfo

__all__ = ["embedding_dim_of", "run_info", "segment_image_file", "segment_slide_file", "type_map_of"]


def type_map_of(cells_or_names: CellSet | tuple[str, ...]) -> dict[int, str]:
    """CellViT++ ``type_map`` (class id → name, 0 = unclassified)."""
    names = cells_or_names.class_names if isinstance(cells_or_names, CellSet) else cells_or_names
    return {0: "unclassified", **{i: n for i, n in enumerate(names, start=1)}}


def embedding_dim_of(predictor: Predictor, config: SegmentConfig) -> int | None:
    """Width D of the cell embeddings a run writes (None with ``--embeddings none`` or an unknown encoder)."""
    spec = getattr(getattr(predictor.model, "encoder", None), "spec", None)
    return None if config.embeddings == "none" or spec is None else int(spec.embed_dim)


def run_info(path: Path, info: ModelInfo, config: SegmentConfig, predictor: Predictor, **extra: Any) -> dict:
    """The parameters part of ``run.json``."""
    mc = predictor.model.config  # type: ignore[attr-defined]
    return {
        "input": str(Path(path).absolute()),  # `classifier apply` redraws the overlay from it, from any folder
        "model": {"name": info.name, "sha256": info.sha256, "source": info.source, "licence": info.licence},
        "model_mpp": mc.mpp,
        "tile_size": config.tile_size or mc.tile_size,
        "overlap": mc.overlap if config.overlap is None else config.overlap,
        "batch_size": config.batch_size,
        "device": str(predictor.device),
        "tta": bool(getattr(predictor, "tta", False)),
        "amp": bool(getattr(predictor, "amp", False)),
        "embeddings": config.embeddings,
        # a classifier's classes when one set them (``extra["classifier"]`` is its record), else the model's
        "class_names": (extra.get("classifier") or {}).get("class_names") or (list(mc.names) if mc.num_classes else []),
        "postprocess": asdict(config.hover or model_hover_config(mc) or HoverConfig()),
        **extra,
    }


def segment_image_file(
    path: Path,
    out_dir: Path,
    predictor: Predictor,
    info: ModelInfo,
    config: SegmentConfig,
    *,
    mpp: float | None = None,
    overlay: bool = True,
    progress: bool = False,
    classifier: Any = None,
    he: Path | None = None,
) -> dict[str, Any]:
    """Segment one image file into ``out_dir/<stem>/`` (atomically). Returns the run summary.

    ``classifier`` (a :class:`~cytoken.classify.ClassifierBundle`) re-labels the cells from their embeddings.
    Multi-channel models read the file's channels by name (:func:`~cytoken.pipeline.image.load_input`); ``he``
    is an H&E image stacked with it as channels R, G, B.
    """
    started = time.time()
    mc = predictor.model.config  # type: ignore[attr-defined]
    loaded = load_input(path, mc, mpp=mpp, he=he)
    cells = segment_image(loaded.image, predictor, loaded.mpp, config=config, progress=progress, he=loaded.he)
    from cytoken.pipeline.classifier import classifier_record, relabel

    if classifier is not None:
        cells = relabel(cells, classifier)
    final = Path(out_dir) / path.stem
    meta = {"image": str(path), "mpp": loaded.mpp, "model": info.name, "model_sha256": info.sha256}
    with output_folder(final) as tmp:
        writer = CellOutputWriter(
            tmp,
            final=final,
            type_map=type_map_of(cells),
            wsi_metadata={
                "base_mpp": loaded.mpp,
                "target_patch_mpp": cells.meta.get("model_mpp", loaded.mpp),
            },
            geojson_meta=meta,
            id_seed=f"{path.name}:{info.sha256}",
            embedding_dim=embedding_dim_of(predictor, config),
        )
        try:
            writer.add(cells)
            if overlay:
                writer.write_overlay(input_overlay(loaded, mc, config), cells)
            summary = writer.close(
                run_info(
                    path,
                    info,
                    config,
                    predictor,
                    mpp=loaded.mpp,
                    mpp_source=loaded.mpp_source,
                    scale_to_model=cells.meta.get("scale"),
                    tiles=cells.meta.get("tiles"),
                    image_size=list(loaded.size),
                    **({"channels": cells.meta["channels"]} if "channels" in cells.meta else {}),
                    classifier=classifier_record(classifier),
                ),
                started=started,
            )
        except BaseException:
            writer.abort()
            raise
    summary["output"] = str(final)
    return summary


def segment_slide_file(
    path: Path,
    out_dir: Path,
    predictor: Predictor,
    info: ModelInfo,
    config: SegmentConfig,
    *,
    mpp: float | None = None,
    progress: bool = True,
    roi: Any = None,
    tissue_mask: Path | None = None,
    resume: bool = False,
    read_workers: int = 1,
    decode_workers: int = 1,
    classifier: Any = None,
    gzip_geojson: bool = True,
) -> dict[str, Any]:
    """Segment a whole slide into ``out_dir/<stem>/`` (streaming, resumable; see :mod:`cytoken.pipeline.slide`).

    ``gzip_geojson=False`` writes ``cells.geojson`` instead of ``cells.geojson.gz``.
    """
    from cytoken.pipeline.slide import SlideConfig, segment_slide

    cfg = SlideConfig(segment=config, mpp=mpp, roi=roi, tissue_mask=tissue_mask, resume=resume,
                      read_workers=read_workers, decode_workers=decode_workers, classifier=classifier,
                      gzip_geojson=gzip_geojson)  # fmt: skip
    return segment_slide(path, out_dir, predictor, info, cfg, progress=progress)
