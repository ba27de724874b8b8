"""Cell classifiers on cached embeddings: building labelled sets, and re-labelling existing outputs.

``build_embedding_set`` segments every image of a dataset once (cached on disk, keyed by model sha256 + image hash +
segmentation settings), matches the dataset's labels to the detected cells — points one-to-one within a radius
(15 px at 0.25 µm/px), or instance/type masks by IoU — and returns the matched cells' embeddings.

``build_slide_embedding_set`` does the same for slides (or any image file) labelled in QuPath (GeoJSON points or
classified objects, see :mod:`cytoken.io.datasets.qupath`). The cells of a slide come, in this order, from:

1. an existing ``cytoken segment`` output of that slide (``--segment-output``): its ``cells.parquet`` ids and
   centroids and ``embeddings.npy`` are imported, after checking that it was made by the same model (sha256), with
   the same embedding pooling, from a file of the same name and size; the model is not run;
2. the embedding cache (:class:`~cytoken.embeddings.EmbeddingCache`), keyed by model sha256 + input hash (a cheap
   fingerprint of the slide file: size, mtime and first/last MiB, plus the pooling mode) + cell id; each entry
   also stores the cells' centroids, so a repeated call needs neither the model nor the output folder;
3. otherwise the slide is segmented once (only the region around the labels plus a 64 µm margin; the folder is
   written to ``--segment-output`` or into the cache) and imported as in 1.

``apply_bundle`` (:mod:`cytoken.pipeline.apply`) re-labels the cells of an existing ``cytoken segment`` output from
its stored embeddings, without re-running segmentation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.classify.dataset import DEFAULT_MATCH_RADIUS_UM, LabelledCells, label_cells_from_masks, match_points
from cytoken.embeddings import EmbeddingCache, array_sha256
from cytoken.embeddings.cache import CacheEntry, file_fingerprint
from cytoken.io.atomic import atomic_write_bytes
from cytoken.io.cellstore import load_cells, save_cells
from cytoken.io.datasets.base import Dataset
from cytoken.io.datasets.qupath import DEFAULT_MAX_OBJECT_UM2, QuPathLabels, read_qupath_geojson
from cytoken.pipeline.apply import (
    apply_bundle,
    classifier_record,
    read_output_cells,
    read_output_columns,
    relabel,
    segment_output_files,
)
from cytoken.pipeline.image import SegmentConfig, segment_image_with_labels
from cytoken.pipeline.predictor import Predictor
from cytoken.types import Bounds, CellSet, CytokenError
from cytoken.weights import ModelInfo

__all__ = [  # the output readers and apply_bundle live in cytoken.pipeline.apply; re-exported here
    "ROI_MARGIN_UM",
    "apply_bundle",
    "build_embedding_set",
    "build_slide_embedding_set",
    "classifier_record",
    "load_embedding_set",
    "read_output_cells",
    "read_output_columns",
    "relabel",
    "save_embedding_set",
    "segment_output_files",
    "slide_input_hash",
]

ROI_MARGIN_UM = 64.0
"""Margin around the labels' bounding box when a slide has to be segmented for a classifier set."""


def _settings_key(mpp: float, config: SegmentConfig) -> str:
    """Digest of everything that changes the cells of an image (not batch size or device)."""
    text = f"{mpp:.4f};{replace(config, batch_size=1, device='cpu')!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _segment_cached(
    image: np.ndarray, mpp: float, predictor: Predictor, info: ModelInfo, cache: Path | None, config: SegmentConfig
) -> tuple[CellSet, np.ndarray]:
    """Cells + instance map of an image, cached as ``<cache>/<model sha256>/<image sha256>_<settings>.*.npz``."""
    if cache is None:
        return segment_image_with_labels(image, predictor, mpp, config=config)
    key = f"{array_sha256(image)[:32]}_{_settings_key(mpp, config)}"
    folder = cache / info.sha256
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


def _per_class(labels: np.ndarray, matched: np.ndarray, n_classes: int) -> dict[str, list[int]]:
    """Labels and matched labels per class id 1..C (lists of C counts)."""
    lab = np.asarray(labels, np.int64)
    ok = np.zeros(len(lab), bool)
    ok[np.asarray(matched, np.int64)] = True
    count = lambda v: np.bincount(v[(v >= 1) & (v <= n_classes)] - 1, minlength=n_classes).tolist()  # noqa: E731
    return {"labels_per_class": count(lab), "matched_per_class": count(lab[ok])}


def match_totals(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-image label/match counts (and per-class counts) into one record with the overall match rate."""
    keys = ("n_labels", "n_matched", "n_cells", "n_unclassified", "n_unsupported", "n_too_large")
    total = {k: int(sum(r.get(k, 0) for r in per_image)) for k in keys if any(k in r for r in per_image)}
    total["match_rate"] = round(total["n_matched"] / max(1, total["n_labels"]), 4)
    for k in ("labels_per_class", "matched_per_class"):
        rows = [r[k] for r in per_image if k in r]
        if rows:
            total[k] = np.sum(rows, axis=0).astype(int).tolist()
    return total


def _no_match_message(dataset: Dataset, per_image: list[dict[str, Any]]) -> str:
    """Why a dataset gave no labelled cell, naming its label files (QuPath) or its folder."""
    files = [str(r["labels_file"]) for r in per_image if r.get("labels_file")]
    where = f"{dataset.name}/{dataset.split} in {dataset.root}"
    if files:
        where = ", ".join(files[:3]) + (f" and {len(files) - 3} more label files" if len(files) > 3 else "")
    n_labels, n_cells = sum(r.get("n_labels", 0) for r in per_image), sum(r.get("n_cells", 0) for r in per_image)
    if not n_labels:
        return f"no label in {where} (no labelled cell to learn from)"
    if not n_cells:
        return f"no label of {where} matched a detected cell: no cell was detected in its {len(per_image)} image(s)"
    return (f"no label of {where} matched a detected cell ({n_labels} labels, {n_cells} cells detected): are the "
            "labels in the images' pixel coordinates, and is --mpp right?")  # fmt: skip


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

    Args:
        dataset: a dataset adapter with classes (points or instance + type maps).
        predictor: the segmentation model.
        info: its identity (the sha256 keys the cache).
        mpp: µm/px overriding the dataset's.
        cache_dir: segmentation cache folder (None: no cache).
        limit: only the first ``limit`` images.
        config: segmentation options (``embeddings`` must not be ``"none"``).
        progress: show a progress bar.

    Returns:
        The labelled cells (embeddings, class index 0..C-1, and as group the dataset's group of the image — the
        image itself unless the dataset knows more, e.g. the source tile of overlapping patches) and a match report
        per image plus totals (``n_labels``, ``n_matched``, ``n_cells``, ``match_rate``, per-class label and match
        counts for point labels, and the skipped-object counts of QuPath label files).

    Raises:
        CytokenError: no embeddings, no classes, an unreadable sample or label file, or no label matched.
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
    label_report = getattr(dataset, "label_report", None)
    groups = dataset.groups  # split groups (the CoNSeP patch copy's overlapping patches: their source tile)
    for i in it:
        try:
            s = dataset[i]
        except (ValueError, FileNotFoundError) as exc:  # a bad sample is the user's data, not a crash
            raise CytokenError(str(exc)) from None
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
            if not len(s.points):
                continue
            try:
                pm = match_points(s.points, cells.centroids, mpp=m)
                index, matched = pm.cell_index, pm.label_index
            except CytokenError:  # no label of this image near a cell: counted, the other images still count
                index = matched = np.zeros(0, np.int64)
            cls = s.point_labels[matched]
            rep = {"n_labels": len(s.points), "n_matched": len(matched), "n_cells": len(cells),
                   **_per_class(s.point_labels, matched, len(names))}  # fmt: skip
        else:
            raise CytokenError(f"{s.source_id}: no labels (points or instance+type maps) to build a classifier set")
        keep = cls > 0
        xs.append(cells.embeddings[index[keep]].astype(np.float32))
        ys.append(cls[keep].astype(np.int64) - 1)
        gs += [groups[i]] * int(keep.sum())
        extra = label_report(i) if callable(label_report) else {}
        per_image.append({"image": s.source_id, **{k: v for k, v in extra.items() if k != "n_labels"}, **rep})
    if not xs or not sum(len(x) for x in xs):
        raise CytokenError(_no_match_message(dataset, per_image))
    cells_set = LabelledCells(np.concatenate(xs), np.concatenate(ys), np.array(gs), names)
    return cells_set, {"images": per_image, **match_totals(per_image)}


# ------------------------------------------------------------------------------------------------ slides
def slide_input_hash(path: str | Path, embeddings: str) -> str:
    """The cache input hash of a slide file: its :func:`~cytoken.embeddings.cache.file_fingerprint` + pooling mode.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "s.svs"; _ = p.write_bytes(b"x")
        >>> slide_input_hash(p, "mask").endswith("-mask")
        True
    """
    return f"slide-{file_fingerprint(path)}-{embeddings}"


def _output_folder(segment_output: Path | None, slide: Path) -> tuple[Path | None, Path | None]:
    """``(existing output folder or None, parent to segment into or None)`` for a slide."""
    if segment_output is None:
        return None, None
    if (segment_output / "run.json").is_file():  # the output folder itself
        return segment_output, segment_output.parent
    own = segment_output / slide.stem
    return (own if (own / "run.json").is_file() else None), segment_output


def _import_output(
    folder: Path, slide: Path, dims: tuple[int, int], info: ModelInfo, embeddings: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Ids, centroids and embeddings of a ``cytoken segment`` output, checked against the slide and model."""
    raw = (folder / "run.json").read_bytes()
    run = json.loads(raw)
    sha = run.get("model", {}).get("sha256")
    if sha != info.sha256:
        raise CytokenError(
            f"{folder} was segmented with model {run.get('model', {}).get('name')!r} (sha256 {str(sha)[:12]}...), "
            f"not {info.name!r} (sha256 {info.sha256[:12]}...): its embeddings do not fit; segment the slide with "
            f"--model {info.name} or drop --segment-output"
        )
    if run.get("embeddings", "mask") != embeddings:
        raise CytokenError(f"{folder} holds {run.get('embeddings')!r} embeddings, not {embeddings!r}: pass "
                           f"--embeddings {run.get('embeddings')} or re-segment")  # fmt: skip
    src = Path(str(run.get("input", "")))
    if src.name != slide.name:
        raise CytokenError(f"{folder} is the output of {src.name!r}, not of {slide.name!r}")
    size = run.get("slide_dimensions") or run.get("image_size")
    if size is not None and tuple(int(v) for v in size) != tuple(dims):
        raise CytokenError(f"{folder} was made from a {size[0]}x{size[1]} image, but {slide} is {dims[0]}x{dims[1]}")
    table, emb = read_output_columns(folder, ["id", "x", "y"])
    ids = table.column("id").to_numpy().astype(np.int64)
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], 1).astype(np.float64)
    meta = {"source": str(folder), "source_sig": hashlib.sha256(raw).hexdigest()[:16], "roi": run.get("roi"),
            "slide": str(slide)}  # fmt: skip
    return ids, xy, emb, meta


def _covers(roi: Sequence[int] | None, box: tuple[float, float, float, float]) -> bool:
    if roi is None:
        return True
    x, y, w, h = roi
    return x <= box[0] and y <= box[1] and box[2] <= x + w and box[3] <= y + h


def _slide_cells(
    slide: Path, dims: tuple[int, int], slide_mpp: float, box: tuple[float, float, float, float], info: ModelInfo,
    cache: EmbeddingCache, config: SegmentConfig, *, predictor: Predictor | None, segment_output: Path | None,
    work_dir: Path, mpp: float | None, progress: bool,
) -> tuple[CacheEntry, str, str]:  # fmt: skip
    """The slide's cell table (ids, centroids, embeddings) from an output folder, the cache, or a new segmentation."""
    key = slide_input_hash(slide, config.embeddings)
    entry = cache.load_entry(info.sha256, key)
    folder, parent = _output_folder(segment_output, slide)
    if folder is not None:
        sig = hashlib.sha256((folder / "run.json").read_bytes()).hexdigest()[:16]
        if entry is not None and entry.meta.get("source_sig") == sig:
            return entry, key, "cache"
        source = "segment-output"
    elif entry is not None and _covers(entry.meta.get("roi"), box):
        return entry, key, "cache"
    else:
        if predictor is None:
            raise CytokenError(f"{slide}: no segment output and no cached embeddings; a model is needed")
        from cytoken.pipeline.slide import SlideConfig, segment_slide

        margin = ROI_MARGIN_UM / slide_mpp
        x0, y0 = max(0, int(box[0] - margin)), max(0, int(box[1] - margin))
        x1, y1 = min(dims[0], int(np.ceil(box[2] + margin)) + 1), min(dims[1], int(np.ceil(box[3] + margin)) + 1)
        old = entry.meta.get("roi") if entry is not None else None
        if old is not None:  # grow the region of an earlier run rather than replace it
            x0, y0 = min(x0, old[0]), min(y0, old[1])
            x1, y1 = max(x1, old[0] + old[2]), max(y1, old[1] + old[3])
        roi = Bounds(x0, y0, x1 - x0, y1 - y0)
        parent = parent or work_dir / info.sha256[:16]
        cfg = SlideConfig(segment=config, mpp=mpp, roi=roi, detect_tissue=False, read_workers=0, decode_workers=0)
        segment_slide(slide, parent, predictor, info, cfg, progress=progress)
        folder, source = parent / slide.stem, "segmented"
    ids, xy, emb, meta = _import_output(folder, slide, dims, info, config.embeddings)
    cache.put(info.sha256, key, ids, emb, columns={"centroids": xy}, meta=meta, replace=True)
    entry = cache.load_entry(info.sha256, key)
    if entry is None:  # pragma: no cover - just written
        raise CytokenError(f"embedding cache entry for {slide} was not written")
    return entry, key, source


def build_slide_embedding_set(
    slides: Sequence[str | Path],
    labels: Sequence[str | Path],
    info: ModelInfo,
    *,
    cache_dir: str | Path,
    predictor: Predictor | None = None,
    segment_output: str | Path | None = None,
    mpp: float | None = None,
    class_names: Sequence[str] | None = None,
    config: SegmentConfig | None = None,
    max_object_um2: float | None = DEFAULT_MAX_OBJECT_UM2,
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
    progress: bool = True,
) -> tuple[LabelledCells, dict[str, Any]]:
    """Labelled cell embeddings of slides annotated in QuPath, reusing segment outputs and the embedding cache.

    See the module docstring for where a slide's cells come from. Labels (points, or centroids of classified
    polygons) are matched one-to-one to cell centroids within ``radius_um``; the matched cells' embeddings are
    read from the cache by cell id.

    Args:
        slides: slide (or image) files.
        labels: one QuPath GeoJSON export per slide, in level-0 pixel coordinates.
        info: the segmentation model's identity (its sha256 keys the cache and must match segment outputs).
        cache_dir: cache folder (embeddings under ``embeddings/``, slides segmented here under ``segment/``).
        predictor: the model, only used when a slide has neither a segment output nor a cache entry.
        segment_output: a ``cytoken segment --out`` folder holding ``<stem>/`` per slide (or, for one slide, the
            output folder itself); a missing slide output is written there.
        mpp: level-0 µm/px overriding the slides' metadata (required for plain images).
        class_names: classes 1..C in this order (default: every class of the label files, sorted).
        config: segmentation options (the ``embeddings`` pooling is part of the cache key).
        max_object_um2: polygons above this area are regions, not nuclei, and skipped (None keeps all).
        radius_um: matching radius in µm.
        progress: progress bars when a slide is segmented.

    Returns:
        The labelled cells (group = slide file stem) and a report: per slide the label file counts, ``n_cells``,
        ``n_matched``, ``source`` (``cache``, ``segment-output`` or ``segmented``) and the per-class counts, plus
        totals.

    Raises:
        CytokenError: mismatched inputs, a label file problem (named), a segment output from another model, or no
            label near any cell.

    Example:
        >>> cells, report = build_slide_embedding_set(["s.svs"], ["s.geojson"], info, cache_dir="cache",
        ...                                           segment_output="seg")  # doctest: +SKIP
    """
    from cytoken.io.slide import open_slide

    config = config or SegmentConfig()
    if config.embeddings == "none":
        raise CytokenError("a classifier dataset needs embeddings (use --embeddings mask or bbox)")
    slide_paths, label_paths = [Path(p) for p in slides], [Path(p) for p in labels]
    if not slide_paths or len(slide_paths) != len(label_paths):
        raise CytokenError(f"give one label file per slide: {len(slide_paths)} slides, {len(label_paths)} label files")
    stems = [p.stem for p in slide_paths]
    if len(set(stems)) != len(stems):
        raise CytokenError(f"slide names must be unique (they name the groups of the split): {stems}")
    cache_dir = Path(cache_dir)
    cache = EmbeddingCache(cache_dir / "embeddings")
    out = None if segment_output is None else Path(segment_output)
    if out is not None and len(slide_paths) > 1 and (out / "run.json").is_file():
        raise CytokenError(f"{out} is the output of one slide; for several slides pass the folder holding them")
    read: list[tuple[Path, tuple[int, int], float, QuPathLabels]] = []
    for sp, lp in zip(slide_paths, label_paths):
        if not sp.is_file():
            raise CytokenError(f"slide not found: {sp}")
        with open_slide(sp, mpp=mpp) as slide:
            dims, smpp = tuple(int(v) for v in slide.dimensions), float(slide.mpp)
        max_px = None if max_object_um2 is None else max_object_um2 / (smpp * smpp)
        read.append((sp, dims, smpp, read_qupath_geojson(lp, image_size=dims, max_area_px=max_px)))  # type: ignore[arg-type]
    names = tuple(class_names) if class_names else tuple(sorted({n for *_, lab in read for n in lab.names}))
    xs, ys, gs, per_slide = [], [], [], []
    for sp, dims, smpp, lab in read:
        cls_all = lab.class_ids(names)
        p = lab.points
        box = (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))
        entry, key, source = _slide_cells(sp, dims, smpp, box, info, cache, config, predictor=predictor,
                                          segment_output=out, work_dir=cache_dir / "segment", mpp=mpp,
                                          progress=progress)  # fmt: skip
        try:
            pm = match_points(p, entry.columns["centroids"], mpp=smpp, radius_um=radius_um)
        except CytokenError as exc:
            raise CytokenError(f"{lab.path}: no label matched a cell of {sp}: {exc}") from None
        emb = cache.get(info.sha256, key, entry.ids[pm.cell_index])
        if emb is None:  # pragma: no cover - the ids come from the entry itself
            raise CytokenError(f"embedding cache entry of {sp} lost cells")
        xs.append(emb.astype(np.float32))
        ys.append(cls_all[pm.label_index] - 1)
        gs += [sp.stem] * pm.n_matched
        per_slide.append({"image": sp.stem, "slide": str(sp), "source": source, **lab.report(),
                          "n_labels": pm.n_labels, "n_matched": pm.n_matched, "n_cells": len(entry),
                          **_per_class(cls_all, pm.label_index, len(names))})  # fmt: skip
    cells = LabelledCells(np.concatenate(xs), np.concatenate(ys), np.array(gs), names)
    return cells, {"images": per_slide, **match_totals(per_slide)}


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
