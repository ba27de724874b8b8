"""Cell classifiers on cached embeddings: building labelled sets, and re-labelling existing outputs.

``build_embedding_set`` segments every image of a dataset once (cached on disk, keyed by model sha256 + image hash),
matches the dataset's labels to the detected cells — points one-to-one within a radius (15 px at 0.25 µm/px), or
instance/type masks by IoU — and returns the matched cells' embeddings. ``apply_bundle`` re-labels the cells of an
existing ``cytoken segment`` output from its stored embeddings, without re-running segmentation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.classify.bundle import ClassifierBundle, check_compatible
from cytoken.classify.dataset import LabelledCells, label_cells_from_masks, match_points
from cytoken.embeddings import array_sha256
from cytoken.io.atomic import atomic_dir, atomic_write_bytes
from cytoken.io.cellstore import load_cells, save_cells
from cytoken.io.datasets.base import Dataset
from cytoken.pipeline.image import SegmentConfig, segment_image_with_labels
from cytoken.pipeline.outputs import CellOutputWriter
from cytoken.pipeline.predictor import Predictor
from cytoken.types import CellSet, CytokenError
from cytoken.weights import ModelInfo

__all__ = [
    "apply_bundle",
    "build_embedding_set",
    "load_embedding_set",
    "read_output_cells",
    "relabel",
    "save_embedding_set",
]


def _segment_cached(
    image: np.ndarray, mpp: float, predictor: Predictor, info: ModelInfo, cache: Path | None, config: SegmentConfig
) -> tuple[CellSet, np.ndarray]:
    if cache is None:
        return segment_image_with_labels(image, predictor, mpp, config=config)
    key = array_sha256(image)[:24] + f"_{mpp:.4f}_{config.embeddings}"
    folder = cache / info.sha256[:16]
    cells_f, lab_f = folder / f"{key}.cells.npz", folder / f"{key}.labels.npz"
    if cells_f.is_file() and lab_f.is_file():
        with np.load(lab_f) as z:
            return load_cells(cells_f), z["labels"]
    cells, labels = segment_image_with_labels(image, predictor, mpp, config=config)
    folder.mkdir(parents=True, exist_ok=True)
    save_cells(cells, cells_f)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels)
    atomic_write_bytes(lab_f, buf.getvalue())
    return cells, labels


def build_embedding_set(
    dataset: Dataset,
    predictor: Predictor,
    info: ModelInfo,
    *,
    mpp: float | None = None,
    cache_dir: Path | None = None,
    limit: int | None = None,
    config: SegmentConfig | None = None,
    progress: bool = True,
) -> tuple[LabelledCells, dict[str, Any]]:
    """Segment each image (once, cached), match its labels to detected cells and collect their embeddings.

    Returns:
        The labelled cells (embeddings, class index 0..C-1, image as group) and a match report per image plus
        totals (``n_labels``, ``n_matched``).
    """
    config = config or SegmentConfig()
    if config.embeddings == "none":
        raise CytokenError("a classifier dataset needs embeddings (use --embeddings mask or bbox)")
    names = dataset.class_names
    if not names:
        raise CytokenError(f"dataset {dataset.name} has no classes to learn")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    xs, ys, gs, per_image = [], [], [], []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"embeddings {dataset.name}/{dataset.split}", unit="img")
    for i in it:
        s = dataset[i]
        m = mpp or s.mpp or dataset.mpp
        if m is None:
            raise CytokenError(f"{s.source_id}: µm/px unknown; pass --mpp")
        cells, labels = _segment_cached(s.image, m, predictor, info, cache_dir, config)
        if cells.embeddings is None:
            raise CytokenError("the segmentation produced no embeddings")
        if s.inst_map is not None and s.type_map is not None:
            pred_ids, cls, rep = label_cells_from_masks(s.inst_map, s.type_map, labels)
            index = np.searchsorted(cells.ids, pred_ids)
            rep = {"n_labels": rep["n_gt"], "n_matched": rep["n_labelled"], "n_cells": len(cells)}
        elif s.points is not None and s.point_labels is not None:
            pm = match_points(s.points, cells.centroids, mpp=m) if len(s.points) else None
            if pm is None:
                continue
            index, cls = pm.cell_index, s.point_labels[pm.label_index]
            rep = {"n_labels": pm.n_labels, "n_matched": pm.n_matched, "n_cells": len(cells)}
        else:
            raise CytokenError(f"{s.source_id}: no labels (points or instance+type maps) to build a classifier set")
        keep = cls > 0
        xs.append(cells.embeddings[index[keep]].astype(np.float32))
        ys.append(cls[keep].astype(np.int64) - 1)
        gs += [s.source_id] * int(keep.sum())
        per_image.append({"image": s.source_id, **rep})
    if not xs or not sum(len(x) for x in xs):
        raise CytokenError(f"no label of {dataset.name}/{dataset.split} matched a detected cell")
    cells_set = LabelledCells(np.concatenate(xs), np.concatenate(ys), np.array(gs), names)
    total = {k: int(sum(r[k] for r in per_image)) for k in ("n_labels", "n_matched", "n_cells")}
    total["match_rate"] = round(total["n_matched"] / max(1, total["n_labels"]), 4)
    return cells_set, {"images": per_image, **total}


def save_embedding_set(cells: LabelledCells, path: Path, *, model_sha256: str, report: dict[str, Any]) -> Path:
    """Write a labelled embedding set (``.npz``) atomically."""
    import io

    meta = {"class_names": list(cells.class_names), "model_sha256": model_sha256, "report": report}
    buf = io.BytesIO()
    np.savez(buf, embeddings=cells.embeddings.astype(np.float32), labels=cells.labels, groups=cells.groups,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())


def load_embedding_set(path: Path) -> tuple[LabelledCells, dict[str, Any]]:
    """Read a set written by :func:`save_embedding_set`; returns the cells and the metadata."""
    path = Path(path)
    if not path.is_file():
        raise CytokenError(f"embedding set not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            cells = LabelledCells(z["embeddings"], z["labels"], z["groups"], tuple(meta["class_names"]))
    except (KeyError, ValueError, OSError) as exc:
        raise CytokenError(f"{path} is not a cytoken embedding set ({exc})") from None
    return cells, meta


def read_output_cells(folder: Path) -> tuple[CellSet, dict[str, Any]]:
    """The cells of a ``cytoken segment`` output folder (from ``cells.parquet`` + ``embeddings.npy``)."""
    import pyarrow.parquet as pq
    import shapely

    folder = Path(folder)
    run_f, pq_f, emb_f = folder / "run.json", folder / "cells.parquet", folder / "embeddings.npy"
    for f in (run_f, pq_f):
        if not f.is_file():
            raise CytokenError(f"{folder} is not a cytoken segment output: {f.name} is missing")
    if not emb_f.is_file():
        raise CytokenError(f"{folder} has no embeddings.npy (segmented with --embeddings none?)")
    run = json.loads(run_f.read_text())
    t = pq.read_table(pq_f)
    meta = t.schema.metadata or {}
    mpp = float(meta.get(b"cytoken.mpp", run.get("mpp", 0.25)))
    polys = shapely.from_wkb(t.column("polygon_wkb").to_numpy(zero_copy_only=False))
    contours = [np.asarray(p.exterior.coords)[:-1] if p is not None else np.zeros((0, 2)) for p in polys]
    col = lambda name: t.column(name).to_numpy()  # noqa: E731
    cells = CellSet(
        ids=col("id"), centroids=np.stack([col("x"), col("y")], 1),
        bboxes=np.stack([col("bbox_x0"), col("bbox_y0"), col("bbox_x1"), col("bbox_y1")], 1), contours=contours,
        area_px=col("area_px"), class_ids=col("class_id"), class_probs=col("class_prob"), mpp=mpp,
        tiles=col("tile"), embeddings=np.load(emb_f).astype(np.float32),
    )  # fmt: skip
    return cells, run


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


def apply_bundle(folder: Path, bundle: ClassifierBundle) -> dict[str, Any]:
    """Re-label the cells of an existing output folder with a classifier bundle; rewrites every file atomically.

    Raises:
        CytokenError: the bundle was trained on another segmentation model's embeddings, or dimensions differ.
    """
    folder = Path(folder)
    cells, run = read_output_cells(folder)
    sha = run.get("model", {}).get("sha256")
    check_compatible(bundle, sha, cells.embeddings.shape[1] if cells.embeddings is not None else None)
    new = relabel(cells, bundle)
    gz = (folder / "cells.geojson.gz").is_file()
    type_map = {0: "unclassified", **{i + 1: n for i, n in enumerate(bundle.class_names)}}
    image = None
    if (folder / "overlay.png").is_file() and run.get("input"):
        try:
            from cytoken.io.image import read_image

            image = read_image(run["input"], run.get("mpp")).array
        except CytokenError:
            image = None
    with atomic_dir(folder) as tmp:
        writer = CellOutputWriter(tmp, gzip_geojson=gz, type_map=type_map,
                                  geojson_meta={"classifier": str(bundle.path)})  # fmt: skip
        writer.add(new)
        if image is not None:
            CellOutputWriter.overlay(tmp, image, new)
        info = {k: v for k, v in run.items() if k not in ("cells", "cells_per_class", "embedding_dim", "versions",
                                                          "wall_seconds", "output")}  # fmt: skip
        info["classifier"] = {"bundle": str(bundle.path), "class_names": list(bundle.class_names)}
        info["class_names"] = list(bundle.class_names)
        summary = writer.close(info)
    summary["output"] = str(folder)
    return summary
