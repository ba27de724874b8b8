"""Reading ``cytoken segment`` output folders back, and re-labelling them with a classifier (``classifier apply``).

:func:`apply_bundle` changes only what depends on the classes: the class ids, names, colours and probabilities of
every file, the ``type_map`` of the CellViT++ files, the GeoJSON collection's ``class_names`` / ``class_colors`` and
``classifier``, ``run.json``'s ``class_names``, ``cells_per_class`` and ``classifier``, and ``overlay.png``. Cell
ids, geometry, embeddings, GeoJSON feature ids and collection metadata, CellViT++ ``wsi_metadata`` and every other
``run.json`` entry stay as they were. Files apply does not know are copied unchanged. The classifier sees the
float32 embeddings of ``cells.h5ad`` when there is one (as ``segment --classifier`` does), else the float16
``embeddings.npy``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.classify.bundle import ClassifierBundle, check_compatible
from cytoken.io.atomic import atomic_write_text
from cytoken.io.export import feature_id, read_json_head
from cytoken.pipeline.outputs import CellOutputWriter, output_folder, writing
from cytoken.types import CellSet, CytokenError

__all__ = [
    "apply_bundle",
    "classifier_record",
    "read_output_cells",
    "read_output_columns",
    "relabel",
    "resolve_input",
    "segment_output_files",
]

# the files CellOutputWriter writes (everything else in an output folder is copied as it is)
_WRITTEN = ("cells.geojson", "cells.geojson.gz", "cells.json", "cell_detection.json", "cells.parquet",
            "embeddings.npy", "cells.h5ad", "overlay.png", "run.json")  # fmt: skip
# GeoJSON collection metadata set from the cells themselves (class-dependent) or by apply
_GEOJSON_OWN = ("coordinates", "class_names", "class_colors", "classifier")


def segment_output_files(folder: str | Path) -> tuple[Path, Path, Path]:
    """``run.json``, ``cells.parquet`` and ``embeddings.npy`` of a ``cytoken segment`` output folder.

    Raises:
        CytokenError: one of them is missing (the message names it and, for ``embeddings.npy``, why).
    """
    folder = Path(folder)
    run_f, pq_f, emb_f = folder / "run.json", folder / "cells.parquet", folder / "embeddings.npy"
    for f in (run_f, pq_f):
        if not f.is_file():
            raise CytokenError(f"{folder} is not a cytoken segment output: {f.name} is missing")
    if not emb_f.is_file():
        try:
            run = json.loads(run_f.read_text())
        except ValueError:
            run = {}
        if run.get("embeddings") == "none":
            raise CytokenError(f"{folder} has no embeddings.npy: it was segmented with --embeddings none; "
                               "segment again with --embeddings mask (or bbox)")  # fmt: skip
        if run.get("cells") == 0:
            raise CytokenError(f"{folder} found no cells and, written by an older cytoken, has no embeddings.npy; "
                               "segment it again (empty outputs now hold a (0, D) embeddings.npy)")  # fmt: skip
        raise CytokenError(f"{folder} has no embeddings.npy (segmented with --embeddings none?)")
    return run_f, pq_f, emb_f


def read_output_columns(folder: str | Path, columns: Sequence[str]) -> tuple[Any, np.ndarray]:
    """``columns`` of a segment output's ``cells.parquet`` (a pyarrow Table) and its ``embeddings.npy``.

    Raises:
        CytokenError: a file is missing, or the two do not have one row per cell.
    """
    import pyarrow.parquet as pq

    _, pq_f, emb_f = segment_output_files(folder)
    table = pq.read_table(pq_f, columns=list(columns))
    emb = np.load(emb_f)
    if len(emb) != table.num_rows:
        raise CytokenError(f"{folder}: embeddings.npy has {len(emb)} rows but cells.parquet {table.num_rows}")
    return table, emb


def read_output_cells(folder: Path) -> tuple[CellSet, dict[str, Any]]:
    """The cells of a ``cytoken segment`` output folder (from ``cells.parquet`` + ``embeddings.npy``) and its run.

    Raises:
        CytokenError: a file is missing, or the two do not have one row per cell.
    """
    import pyarrow.parquet as pq
    import shapely

    run_f, pq_f, emb_f = segment_output_files(folder)
    run = json.loads(run_f.read_text())
    t = pq.read_table(pq_f)
    emb = np.load(emb_f)
    if len(emb) != t.num_rows:
        raise CytokenError(f"{folder}: embeddings.npy has {len(emb)} rows but cells.parquet {t.num_rows}")
    meta = t.schema.metadata or {}
    mpp = float(meta.get(b"cytoken.mpp", "nan"))
    if not math.isfinite(mpp):  # an empty table has no µm/px of its own
        mpp = float(run.get("mpp") or 0.25)
    polys = shapely.from_wkb(t.column("polygon_wkb").to_numpy(zero_copy_only=False))
    contours = [np.asarray(p.exterior.coords)[:-1] if p is not None else np.zeros((0, 2)) for p in polys]
    col = lambda name: t.column(name).to_numpy()  # noqa: E731
    cells = CellSet(
        ids=col("id"), centroids=np.stack([col("x"), col("y")], 1).reshape(-1, 2),
        bboxes=np.stack([col("bbox_x0"), col("bbox_y0"), col("bbox_x1"), col("bbox_y1")], 1).reshape(-1, 4),
        contours=contours, area_px=col("area_px"), class_ids=col("class_id"), class_probs=col("class_prob"),
        mpp=mpp, tiles=col("tile"), embeddings=emb.astype(np.float32),
    )  # fmt: skip
    return cells, run


def classifier_record(bundle: ClassifierBundle | None) -> dict[str, Any] | None:
    """What ``run.json`` records about the classifier that set the classes (None: the model's type head)."""
    if bundle is None:
        return None
    return {"bundle": os.path.abspath(bundle.path), "class_names": list(bundle.class_names)}


def relabel(cells: CellSet, bundle: ClassifierBundle) -> CellSet:
    """Cells with classes and probabilities from a classifier bundle applied to their embeddings."""
    if cells.embeddings is None:
        raise CytokenError("cells have no embeddings to classify (segment with --embeddings mask or bbox)")
    if len(cells):
        class_ids, probs = bundle.predict_class_ids(cells.embeddings)
    else:
        class_ids, probs = np.zeros(0, np.int64), np.zeros(0, np.float32)
    return replace(cells, class_ids=class_ids, class_probs=probs, class_names=tuple(bundle.class_names),
                   class_colors=tuple(bundle.class_colors))  # fmt: skip


def resolve_input(folder: Path, run: dict[str, Any]) -> Path | None:
    """The input file of a segment output (``run.json``'s ``input``), or None when it is not found.

    ``input`` is stored absolute; a relative one (outputs of earlier versions) is tried from the current folder and
    from the output's three nearest ancestors (callers check that the file found has the recorded size).
    """
    given = run.get("input")
    if not given:
        return None
    path = Path(str(given))
    if path.is_absolute():
        return path if path.is_file() else None
    # older outputs stored the path as typed: try the current folder, then the output's nearest ancestors
    candidates = [path, *(up / path for up in Path(folder).absolute().parents[:3])]
    return next((p for p in candidates if p.is_file()), None)


def _overlay_image(folder: Path, run: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """The RGB background to redraw ``overlay.png`` on, or None and the reason it cannot be redrawn."""
    if "channels" in run:
        return None, "it was drawn from a multi-channel input, which apply does not read"
    src = resolve_input(folder, run)
    if src is None:
        return None, f"its input {run.get('input')!r} was not found"
    from cytoken.io.image import read_image

    try:
        image = read_image(src, run.get("mpp")).array
    except CytokenError as exc:
        return None, f"its input {src} cannot be read ({exc})"
    size = run.get("image_size")
    if size is not None and [image.shape[1], image.shape[0]] != [int(v) for v in size]:
        return None, f"its input {src} is now {image.shape[1]}x{image.shape[0]} px, not {size[0]}x{size[1]}"
    return image, ""


def _geojson_layout(folder: Path, run: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """Name, collection metadata (minus class-dependent entries) and feature-id seed of an output's GeoJSON."""
    name = "cells.geojson.gz" if (folder / "cells.geojson.gz").is_file() else "cells.geojson"
    try:
        head, first = read_json_head(folder / name)
    except (OSError, ValueError):
        return name, {}, None
    meta = {k: v for k, v in (head.get("cytoken") or {}).items() if k not in _GEOJSON_OWN}
    sha = (run.get("model") or {}).get("sha256")
    seed = f"{Path(str(run.get('input', ''))).name}:{sha}"
    if first is not None and first.get("id") != feature_id(seed, 0):
        warnings.warn(f"{folder / name}: its feature ids were not made by cytoken segment; new ids are written",
                      stacklevel=3)  # fmt: skip
        seed = None
    return name, meta, seed


def _h5ad_embeddings(path: Path, n: int) -> np.ndarray | None:
    """The float32 embeddings (``X``) of an output's ``cells.h5ad``; None without the file, h5py or ``n`` rows."""
    if not path.is_file():
        return None
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            x = h5.get("X")
            if not isinstance(x, h5py.Dataset) or x.ndim != 2 or x.shape[0] != n or not x.shape[1]:
                return None
            return np.asarray(x[:], np.float32)
    except (ImportError, OSError):
        return None


def apply_bundle(folder: Path, bundle: ClassifierBundle) -> dict[str, Any]:
    """Re-label the cells of an existing output folder with a classifier bundle; rewrites it atomically.

    Only the class-dependent content changes (see the module docstring). ``overlay.png`` is redrawn from the
    input image (``run.json``'s ``input``); when that image cannot be read, the old overlay is kept and a warning
    says so.

    Args:
        folder: a ``cytoken segment`` output folder (``DIR/<stem>``).
        bundle: the classifier, trained on the same model's embeddings.

    Returns:
        The new ``run.json`` content plus ``output`` (the folder).

    Raises:
        CytokenError: a missing file, or the bundle was trained on another model's embeddings or another width.
    """
    folder = Path(folder)
    cells, run = read_output_cells(folder)
    exact = _h5ad_embeddings(folder / "cells.h5ad", len(cells))
    if exact is not None:  # the float32 embeddings segment classified (embeddings.npy holds them as float16)
        cells = replace(cells, embeddings=exact)
    dim = 0 if cells.embeddings is None else cells.embeddings.shape[1]  # read_output_cells always sets them
    check_compatible(bundle, (run.get("model") or {}).get("sha256"), dim, source=str(folder))
    new = relabel(cells, bundle)
    type_map = {0: "unclassified", **{i + 1: n for i, n in enumerate(bundle.class_names)}}
    geo_name, geo_meta, seed = _geojson_layout(folder, run)
    record = classifier_record(bundle)
    geo_meta["classifier"] = record["bundle"]  # type: ignore[index]
    try:
        wsi_metadata = read_json_head(folder / "cells.json")[0].get("wsi_metadata")
    except (OSError, ValueError):
        wsi_metadata = None
    image, why = _overlay_image(folder, run) if (folder / "overlay.png").is_file() else (None, "")
    keep = [p for p in folder.iterdir() if p.name not in _WRITTEN]
    if why:
        warnings.warn(f"{folder / 'overlay.png'} kept with the old classes: {why}", stacklevel=2)
        keep.append(folder / "overlay.png")
    with output_folder(folder) as tmp:  # a failed write names the file and leaves the old outputs as they were
        writer = CellOutputWriter(tmp, gzip_geojson=geo_name.endswith(".gz"), type_map=type_map, final=folder,
                                  wsi_metadata=wsi_metadata, geojson_meta=geo_meta, id_seed=seed,
                                  embedding_dim=dim, h5ad=(folder / "cells.h5ad").is_file())  # fmt: skip
        try:
            writer.add(new)
            if image is not None:
                writer.write_overlay(image, new)
            for p in keep:
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
            counts = writer.close(run)["cells_per_class"]
            # run.json: the segmentation's record, with only the class-dependent entries replaced
            summary = {**run, "class_names": list(bundle.class_names), "cells_per_class": counts, "classifier": record}
            with writing(folder / "run.json"):
                atomic_write_text(tmp / "run.json", json.dumps(summary, indent=2, default=str))
        except BaseException:
            writer.abort()
            raise
    summary["output"] = str(folder)
    return summary
