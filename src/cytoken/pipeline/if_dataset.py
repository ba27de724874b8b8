"""Labelled embedding sets from IF-derived labels (``label-from-if`` tables joined to ``segment`` outputs).

The annotation-free route of CellViT++: segment the H&E once (``cytoken segment``, which stores every cell's
embedding), label its cells from a registered IF marker (``cytoken label-from-if --cells <that output>``, which
writes ``labels.parquet`` keyed by the same cell ids), then train a classifier on the labelled cells' stored
embeddings. :func:`build_if_label_set` does the join: only the rows the labelling kept (status ``positive`` or
``negative``; ambiguous and uncovered cells are left out) become examples, class 0 = marker-negative,
1 = marker-positive, group = the segment output's folder name (so a split never puts one image on both sides).
The model is not run. Every segment output numbers its cells from 1, so ids alone cannot catch a table paired with
the wrong output: ``label-from-if --cells`` records the sha256 of the ``cells.parquet`` it read in the table's
metadata, and the join refuses an output whose file differs.

Example:
    >>> cells, report = build_if_label_set(["if/labels.parquet"], ["seg/slide1"])  # doctest: +SKIP
    >>> cells.class_names  # doctest: +SKIP
    ('CD3-', 'CD3+')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.classify.dataset import LabelledCells
from cytoken.pipeline.classifier import match_totals, read_output_columns, segment_output_files
from cytoken.types import CytokenError

__all__ = ["build_if_label_set"]

_COLUMNS = ("cell_id", "label", "kept", "marker")


def _read_table(path: Path) -> tuple[dict[str, np.ndarray], dict[bytes, bytes]]:
    """The columns of a label table (``.parquet`` or ``.csv``) that the join needs, and its metadata."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.is_dir():  # a `label-from-if --out` folder
        path = path / "labels.parquet"
    if not path.is_file():
        raise CytokenError(f"IF label table not found: {path}")
    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CytokenError(f"{path}: cannot read the label table ({exc})") from None
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise CytokenError(
            f"{path} is not a `cytoken label-from-if` label table: columns {missing} are missing "
            f"(it has {table.column_names})"
        )
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in _COLUMNS}, table.schema.metadata or {}


def _read_output(folder: Path, cells_sha256: str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Cell ids, embeddings and ``run.json`` of a ``cytoken segment`` output folder.

    ``cells_sha256`` (recorded by ``label-from-if --cells``) must match its ``cells.parquet`` when given: cell ids
    alone cannot tell two outputs apart (every output numbers its cells from 1).
    """
    from cytoken.weights import file_sha256

    run_f, cells_f, _ = segment_output_files(folder)
    if cells_sha256 is not None and file_sha256(cells_f) != cells_sha256:
        raise CytokenError(
            f"the labels were computed on another segment output than {folder} (its cells.parquet differs from the "
            "one `label-from-if --cells` read); pass the folder that was given there"
        )
    table, emb = read_output_columns(folder, ["id"])
    return table.column("id").to_numpy().astype(np.int64), emb, json.loads(run_f.read_text())


def build_if_label_set(
    label_files: Sequence[str | Path], outputs: Sequence[str | Path]
) -> tuple[LabelledCells, dict[str, Any]]:
    """Join IF label tables to the stored embeddings of the segment outputs they were computed on.

    Args:
        label_files: ``labels.parquet`` (or ``labels.csv``) files written by ``cytoken label-from-if``, or its
            output folders (their ``labels.parquet`` is read).
        outputs: for each label file, in the same order, the ``cytoken segment`` output folder (``DIR/<stem>``)
            that was passed to ``label-from-if --cells``.

    Returns:
        The labelled cells (classes ``<marker>-`` and ``<marker>+``; group = output folder name) and a report:
        per image the rows, kept rows and per-class counts, ``model_sha256`` and ``model``, plus totals
        (``n_labels`` = kept rows, ``n_matched`` = those found in the output).

    Raises:
        CytokenError: unequal numbers of files, a missing or malformed file (named), label tables of different
            markers, outputs of different models, repeated output names, a table that records another segment
            output (``label-from-if --cells`` stores the sha256 of the ``cells.parquet`` it read), or a labelled
            cell id that the output does not hold.
    """
    label_paths, out_paths = [Path(p) for p in label_files], [Path(p) for p in outputs]
    if not label_paths or len(label_paths) != len(out_paths):
        raise CytokenError(
            f"give one segment output per IF label table: {len(label_paths)} tables, {len(out_paths)} outputs"
        )
    names = [p.name for p in out_paths]
    if len(set(names)) != len(names):
        raise CytokenError(f"segment output folder names must be unique (they name the groups of the split): {names}")
    xs, ys, gs, per_image = [], [], [], []
    markers: set[str] = set()
    models: dict[str, str] = {}
    for lp, op in zip(label_paths, out_paths):
        table, meta = _read_table(lp)
        link = meta.get(b"cytoken.cells_sha256")
        ids, emb, run = _read_output(op, None if link is None else link.decode())
        model = run.get("model", {})
        models[str(model.get("sha256"))] = str(model.get("name"))
        markers.update(str(m) for m in np.unique(table["marker"]))
        kept = table["kept"].astype(bool)
        cell_id, label = table["cell_id"][kept].astype(np.int64), table["label"][kept].astype(np.int64)
        order = np.argsort(ids)
        pos = np.searchsorted(ids[order], cell_id)
        found = pos < len(ids)
        found[found] = ids[order[pos[found]]] == cell_id[found]
        if not found.all():
            raise CytokenError(
                f"{lp}: {int((~found).sum())} labelled cell ids (e.g. {cell_id[~found][:3].tolist()}) are not in "
                f"{op}; pass the segment output that `label-from-if --cells` was given"
            )
        xs.append(emb[order[pos]].astype(np.float32))
        ys.append(label)
        gs += [op.name] * len(label)
        counts = np.bincount(label, minlength=2).tolist()
        per_image.append({"image": op.name, "source": str(op), "labels": str(lp), "n_rows": len(kept),
                          "n_labels": int(kept.sum()), "n_matched": int(kept.sum()), "n_cells": len(ids),
                          "labels_per_class": counts, "matched_per_class": counts})  # fmt: skip
    if not markers:
        raise CytokenError(f"the label tables {[str(p) for p in label_paths]} have no rows")
    if len(markers) != 1:
        raise CytokenError(f"the label tables are for different markers {sorted(markers)}: build one set per marker")
    if len(models) != 1:
        raise CytokenError(
            f"the segment outputs come from different models {sorted(models.values())}: their embeddings do not mix"
        )
    (marker,) = markers
    ((sha, model_name),) = models.items()
    cells = LabelledCells(np.concatenate(xs), np.concatenate(ys), np.array(gs), (f"{marker}-", f"{marker}+"))
    return cells, {"images": per_image, "model": model_name, "model_sha256": sha, "marker": marker,
                   **match_totals(per_image)}  # fmt: skip
