"""CellViT++-compatible ``cells.json`` and ``cell_detection.json``.

Layout (as written by CellViT++ / CellViT-Inference ``process_wsi``)::

    {"wsi_metadata": {...},
     "type_map": {"1": "Neoplastic", ...},
     "cells": [ {cell}, ... ]}

``cells.json`` records::

    {"bbox": [[rmin, cmin], [rmax, cmax]],   # row/col, max exclusive
     "centroid": [x, y],
     "contour": [[x, y], ...],                # outer boundary, not repeated at the end
     "type_prob": 0.93, "type": 1,
     "patch_coordinates": [row, col], "cell_status": 0, "offset_global": [row_off, col_off],
     "edge_position": false,
     "cell_id": 17}

``cell_detection.json`` records hold ``bbox``, ``centroid``, ``type`` (and ``cell_id``).

Differences from the official files, on purpose:

- ``type_prob`` is the real class probability of the CellSet (a float; ``null`` when unknown). The official
  classifier path int-casts it to 0 (a bug), and the pixel-vote path stores a vote fraction.
- ``centroid`` keeps its fractional part (CellViT++ rounds global centroids to integers).
- ``cell_id`` is an extra key linking each record to the GeoJSON / Parquet outputs.
- ``edge_information`` (neighbour patches of border cells) is not written: cells are final, already
  de-duplicated.
- Patch fields come from ``patches`` (tile index -> :class:`PatchInfo`). Without it, or for cells whose tile
  is not listed, the image is treated as a single patch at the origin: ``patch_coordinates`` [0, 0],
  ``offset_global`` [0, 0], ``cell_status`` 0 and ``edge_position`` false.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.export._stream import JsonCellWriter, number_lists, split_number_lists
from cytoken.types import CellSet

__all__ = [
    "CellViTJSONWriter",
    "PatchInfo",
    "cell_status",
    "default_type_map",
    "write_cell_detection_json",
    "write_cellvit_json",
]

_DUMPS = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}


@dataclass(frozen=True)
class PatchInfo:
    """Where a tile sits, for CellViT's per-cell patch fields.

    Attributes:
        row: patch grid row.
        col: patch grid column.
        x: column of the patch's top-left pixel in output coordinates.
        y: row of the patch's top-left pixel in output coordinates.
        size: patch side in pixels (CellViT uses 1024).
    """

    row: int
    col: int
    x: int
    y: int
    size: int = 1024


def cell_status(local_bbox: tuple[int, int, int, int], size: int, margin: int = 64) -> int:
    """CellViT's position code of a cell inside its patch: 0 = interior, 1..8 = margin regions.

    The codes run clockwise from the top-left corner: 1 top-left, 2 top, 3 top-right, 4 right, 5 bottom-right,
    6 bottom, 7 bottom-left, 8 left. A side counts when the bbox reaches into the ``margin`` px band along it.

    Args:
        local_bbox: (x0, y0, x1, y1) relative to the patch, x1/y1 exclusive.
        size: patch side in pixels.
        margin: width of the border band.

    Returns:
        The status code.

    Example:
        >>> cell_status((500, 500, 520, 520), 1024), cell_status((3, 3, 20, 20), 1024)
        (0, 1)
        >>> cell_status((3, 500, 20, 520), 1024)
        8
    """
    x0, y0, x1, y1 = local_bbox
    top, left = y0 < margin, x0 < margin
    bottom, right = y1 > size - margin, x1 > size - margin
    if top:
        return 1 if left else 3 if right else 2
    if right:
        return 5 if bottom else 4
    if bottom:
        return 7 if left else 6
    return 8 if left else 0


def default_type_map(cells: CellSet) -> dict[int, str]:
    """``{0: "unclassified", 1: class_names[0], ...}`` for a CellSet.

    Example:
        >>> default_type_map(CellSet.empty(0.25, class_names=("tumor", "immune")))
        {0: 'unclassified', 1: 'tumor', 2: 'immune'}
    """
    return {0: cells.class_name(0), **{i + 1: name for i, name in enumerate(cells.class_names)}}


class CellViTJSONWriter(JsonCellWriter):
    """Stream cells into a CellViT++ ``cells.json`` (or ``cell_detection.json`` with ``detection=True``).

    Args:
        path: output file (``.gz`` suffix -> gzip).
        detection: write the detection layout (bbox, centroid, type) instead of the full one.
        type_map: class id -> name written as ``type_map``; every class id in the cells must be a key.
            Default: :func:`default_type_map` of the first CellSet.
        wsi_metadata: written as ``wsi_metadata``; default ``{"base_mpp": <mpp>, "target_patch_mpp": <mpp>}``
            of the first CellSet.
        patches: tile index -> :class:`PatchInfo` for the patch fields (see the module notes).
        margin: border band for ``cell_status`` in pixels (CellViT: 64).
        gzip: force compression on or off.
        decimals: coordinates are rounded to this many decimals (integers stay integers).

    Example:
        >>> import tempfile, pathlib
        >>> sq = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
        >>> cs = CellSet(ids=[1], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]], contours=[sq], area_px=[25],
        ...              class_ids=[1], class_probs=[0.9], mpp=0.25, class_names=("tumor",))
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cells.json"
        >>> with CellViTJSONWriter(out) as w:
        ...     w.add(cs)
        1
        >>> json.loads(out.read_text())["cells"][0]["bbox"]
        [[0, 0], [5, 5]]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        detection: bool = False,
        type_map: Mapping[int, str] | None = None,
        wsi_metadata: Mapping[str, Any] | None = None,
        patches: Mapping[int, PatchInfo] | None = None,
        margin: int = 64,
        gzip: bool | None = None,
        decimals: int = 3,
    ) -> None:
        super().__init__(path, gzip=gzip)
        self.detection = detection
        self._type_map = None if type_map is None else {int(k): str(v) for k, v in type_map.items()}
        self._wsi_metadata = None if wsi_metadata is None else dict(wsi_metadata)
        self._patches = dict(patches or {})
        self._margin = margin
        self._decimals = decimals
        self._mpp: float | None = None

    def _begin(self, cells: CellSet | None) -> None:
        if self._type_map is None:
            self._type_map = default_type_map(cells) if cells is not None else {}
        if self._wsi_metadata is None:
            mpp = None if cells is None else float(cells.mpp)
            self._wsi_metadata = {"base_mpp": mpp, "target_patch_mpp": mpp}
        head = (
            '{"wsi_metadata":'
            + json.dumps(self._wsi_metadata, default=str, **_DUMPS)
            + ',"type_map":'
            + json.dumps({str(k): v for k, v in sorted(self._type_map.items())}, **_DUMPS)
            + ',"cells":['
        )
        self._stream.begin(head)

    def _patch_fields(self, tile: int, bbox: np.ndarray) -> dict[str, Any]:
        info = self._patches.get(tile)
        if info is None:
            return {
                "patch_coordinates": [0, 0],
                "cell_status": 0,
                "offset_global": [0, 0],
                "edge_position": False,
            }
        x0, y0, x1, y1 = (int(v) for v in bbox)
        local = (x0 - info.x, y0 - info.y, x1 - info.x, y1 - info.y)
        edge = min(local) <= 0 or local[2] >= info.size or local[3] >= info.size
        return {
            "patch_coordinates": [int(info.row), int(info.col)],
            "cell_status": cell_status(local, info.size, self._margin),
            "offset_global": [int(info.y), int(info.x)],
            "edge_position": bool(edge),
        }

    def add(self, cells: CellSet) -> int:
        """Append the cells of one CellSet; returns how many were written.

        Raises:
            ValueError: when a class id of the cells is missing from ``type_map``, the µm/px differs from
                the first CellSet's, or the writer is closed.
        """
        return super().add(cells)

    def _add(self, cells: CellSet) -> int:
        if self._mpp is None:
            self._mpp = float(cells.mpp)
            self._begin(cells)
        elif not math.isclose(float(cells.mpp), self._mpp, rel_tol=1e-6):
            raise ValueError(f"CellViTJSONWriter: cells at {cells.mpp} µm/px cannot join a file at {self._mpp} µm/px")
        type_map = self._type_map if self._type_map is not None else {}
        missing = sorted(set(np.unique(cells.class_ids).tolist()) - set(type_map))
        if missing:
            raise ValueError(f"CellViTJSONWriter: class ids {missing} are not in type_map (keys {sorted(type_map)})")
        d = self._decimals
        centroids = number_lists(cells.centroids, d)
        contours: list[Any] = []
        if not self.detection and len(cells):
            lengths = [len(c) for c in cells.contours]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            flat = np.concatenate([np.asarray(c, np.float64).reshape(-1, 2) for c in cells.contours])
            contours = split_number_lists(flat, bounds, d)
        tiles = cells.tiles if cells.tiles is not None else np.full(len(cells), -1, np.int64)
        for i in range(len(cells)):
            x0, y0, x1, y1 = (int(v) for v in cells.bboxes[i])
            rec: dict[str, Any] = {"bbox": [[y0, x0], [y1, x1]], "centroid": centroids[i]}
            if not self.detection:
                rec["contour"] = contours[i]
                prob = float(cells.class_probs[i])
                rec["type_prob"] = round(prob, 6) if math.isfinite(prob) else None
            rec["type"] = int(cells.class_ids[i])
            if not self.detection:
                rec.update(self._patch_fields(int(tiles[i]), cells.bboxes[i]))
            rec["cell_id"] = int(cells.ids[i])
            self._stream.item(json.dumps(rec, **_DUMPS))
        return len(cells)


def _write(cells: CellSet | Iterable[CellSet], path: str | os.PathLike[str], **kwargs: Any) -> Path:
    parts = [cells] if isinstance(cells, CellSet) else cells
    with CellViTJSONWriter(path, **kwargs) as writer:
        for part in parts:
            writer.add(part)
    return Path(path)


def write_cellvit_json(
    cells: CellSet | Iterable[CellSet],
    path: str | os.PathLike[str],
    *,
    type_map: Mapping[int, str] | None = None,
    wsi_metadata: Mapping[str, Any] | None = None,
    patches: Mapping[int, PatchInfo] | None = None,
    gzip: bool | None = None,
) -> Path:
    """Write a CellViT++ ``cells.json`` atomically (see the module notes for the layout).

    Args:
        cells: one CellSet or an iterable of CellSets on the same pixel grid.
        path: output file.
        type_map: class id -> name; default :func:`default_type_map`.
        wsi_metadata: the ``wsi_metadata`` entry.
        patches: tile index -> :class:`PatchInfo`.
        gzip: force compression on or off (default: by ``.gz`` suffix).

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> tri = np.array([[0, 0], [6, 0], [0, 6]], float)
        >>> cs = CellSet(ids=[3], centroids=[[2, 2]], bboxes=[[0, 0, 7, 7]], contours=[tri], area_px=[28],
        ...              class_ids=[1], class_probs=[0.8], mpp=0.5, class_names=("a",))
        >>> p = write_cellvit_json(cs, pathlib.Path(tempfile.mkdtemp()) / "cells.json", type_map={1: "a"})
        >>> sorted(json.loads(p.read_text()))
        ['cells', 'type_map', 'wsi_metadata']
    """
    return _write(cells, path, type_map=type_map, wsi_metadata=wsi_metadata, patches=patches, gzip=gzip)


def write_cell_detection_json(
    cells: CellSet | Iterable[CellSet],
    path: str | os.PathLike[str],
    *,
    type_map: Mapping[int, str] | None = None,
    wsi_metadata: Mapping[str, Any] | None = None,
    gzip: bool | None = None,
) -> Path:
    """Write a CellViT++ ``cell_detection.json`` (bbox, centroid, type per cell) atomically.

    Args:
        cells: one CellSet or an iterable of CellSets on the same pixel grid.
        path: output file.
        type_map: class id -> name; default :func:`default_type_map`.
        wsi_metadata: the ``wsi_metadata`` entry.
        gzip: force compression on or off (default: by ``.gz`` suffix).

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> tri = np.array([[0, 0], [6, 0], [0, 6]], float)
        >>> cs = CellSet(ids=[3], centroids=[[2, 2]], bboxes=[[0, 0, 7, 7]], contours=[tri], area_px=[28],
        ...              class_ids=[0], class_probs=[float("nan")], mpp=0.5)
        >>> p = write_cell_detection_json(cs, pathlib.Path(tempfile.mkdtemp()) / "cell_detection.json")
        >>> json.loads(p.read_text())["cells"]
        [{'bbox': [[0, 0], [7, 7]], 'centroid': [2, 2], 'type': 0, 'cell_id': 3}]
    """
    return _write(cells, path, detection=True, type_map=type_map, wsi_metadata=wsi_metadata, gzip=gzip)
