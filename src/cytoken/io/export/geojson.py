"""GeoJSON export of cells in the layout QuPath (>= 0.4) imports as detections.

One ``Feature`` per cell inside a ``FeatureCollection``::

    {"type": "Feature", "id": "<uuid>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x0, y0]]]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "Neoplastic", "color": [255, 0, 0]},
                    "measurements": {"cell_id": 7, "area_um2": 41.5, "area_px": 664, "class_prob": 0.93},
                    "cell_id": 7, "class_name": "Neoplastic"}}

Choices, checked against QuPath's ``PathObjectTypeAdapters`` (GeoJSON reader since v0.4):

- ``measurements`` is written as a JSON object (name -> number), the form QuPath writes since v0.4; its reader
  also accepts the older list of ``{"name", "value"}``. Values must be numbers, so an unknown class
  probability (NaN) is left out rather than written as an invalid ``NaN`` token.
- ``id`` is a UUID string (QuPath ignores ids that are not UUIDs); the cell id is kept in ``measurements`` and
  as a plain ``cell_id`` property (handy in geopandas, ignored by QuPath).
- Cells with class id 0 (no class) get no ``classification``, which QuPath shows as unclassified; their
  ``class_name`` property is ``"unclassified"``.
- Coordinates are the CellSet's pixel coordinates (x = column, y = row, origin top-left), as QuPath expects.
- Every ring is closed, every polygon is valid per shapely and its exterior is counter-clockwise (RFC 7946):
  an invalid contour is repaired with ``shapely.make_valid`` keeping its largest polygon; a contour with fewer
  than three vertices or zero area becomes the pixel footprint of its bounding box.

The collection carries a foreign member ``"cytoken"`` with µm/px and class names (GeoJSON readers ignore it).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.export._stream import JsonCellWriter, split_number_lists
from cytoken.types import CellSet

__all__ = ["GeoJSONWriter", "cell_polygons", "feature_id", "write_geojson"]

_DUMPS = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}


def _repair(poly: Any, bbox: np.ndarray) -> Any:
    import shapely

    if poly is not None and not shapely.is_empty(poly):
        fixed = shapely.make_valid(poly)
        parts = [g for g in shapely.get_parts(fixed) if g.geom_type == "Polygon" and g.area > 0]
        if not parts and fixed.geom_type == "GeometryCollection":
            parts = [
                g
                for sub in shapely.get_parts(fixed)
                for g in shapely.get_parts(sub)
                if g.geom_type == "Polygon" and g.area > 0
            ]
        if parts:
            return max(parts, key=lambda g: g.area)
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return shapely.box(x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)  # pixel footprint in pixel-centre coordinates


def cell_polygons(cells: CellSet) -> np.ndarray:
    """Valid, counter-clockwise shapely Polygons for every cell (see the module notes on repairs).

    Args:
        cells: the cells.

    Returns:
        (N,) object array of :class:`shapely.Polygon`.

    Example:
        >>> sq = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
        >>> cs = CellSet(ids=[1], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]], contours=[sq], area_px=[25],
        ...              class_ids=[0], class_probs=[float("nan")], mpp=0.25)
        >>> p = cell_polygons(cs)[0]
        >>> p.is_valid, p.exterior.is_ccw
        (True, True)
    """
    import shapely

    n = len(cells)
    out = np.empty(n, dtype=object)
    lengths = np.array([len(c) for c in cells.contours], dtype=np.int64)
    idx = np.flatnonzero(lengths >= 3)
    good = np.zeros(n, dtype=bool)
    if idx.size:
        coords = np.concatenate([np.asarray(cells.contours[i], np.float64).reshape(-1, 2) for i in idx])
        finite = np.isfinite(coords).all(axis=1)
        ring_ids = np.repeat(np.arange(idx.size), lengths[idx])
        bad_rings = np.unique(ring_ids[~finite])
        keep = ~np.isin(ring_ids, bad_rings)
        kept_rings = np.setdiff1d(np.arange(idx.size), bad_rings)
        if kept_rings.size:
            # renumber the kept rings 0..k-1 for shapely's indices argument
            remap = np.full(idx.size, -1, np.int64)
            remap[kept_rings] = np.arange(kept_rings.size)
            rings = shapely.linearrings(coords[keep], indices=remap[ring_ids[keep]])
            polys = shapely.polygons(rings)
            out[idx[kept_rings]] = polys
            good[idx[kept_rings]] = shapely.is_valid(polys) & (shapely.area(polys) > 0)
    for i in np.flatnonzero(~good):
        out[i] = _repair(out[i], cells.bboxes[i])
    if n:
        out[:] = shapely.orient_polygons(out, exterior_cw=False)
    return out


def feature_id(seed: str | None, index: int) -> str:
    """The id of the ``index``-th feature of a file written with ``id_seed=seed`` (a random UUID4 without seed).

    Example:
        >>> feature_id("img.png:" + "0" * 64, 0) == feature_id("img.png:" + "0" * 64, 0)
        True
    """
    if seed is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cytoken:{seed}:{index}"))


class GeoJSONWriter(JsonCellWriter):
    """Stream cells into a GeoJSON FeatureCollection with bounded memory (one CellSet at a time).

    Use as a context manager, or call :meth:`close` (commit) / :meth:`abort` (discard) yourself. Nothing
    appears at ``path`` until :meth:`close` succeeds; an exception inside the ``with`` block leaves ``path``
    untouched.

    Args:
        path: output file; a name ending in ``.gz`` is gzip-compressed (QuPath >= 0.4 opens ``.geojson.gz``).
        gzip: force compression on or off regardless of the suffix.
        metadata: extra JSON-serialisable entries for the collection's ``"cytoken"`` member.
        id_seed: when given, feature ids are deterministic UUIDs derived from it and the feature's running
            index (reproducible files); otherwise random UUID4s.
        decimals: coordinates are rounded to this many decimals (integers stay integers).

    Example:
        >>> import tempfile, pathlib
        >>> sq = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
        >>> cs = CellSet(ids=[1], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]], contours=[sq], area_px=[25],
        ...              class_ids=[1], class_probs=[0.9], mpp=0.25, class_names=("tumor",))
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cells.geojson"
        >>> with GeoJSONWriter(out) as w:
        ...     w.add(cs)
        1
        >>> json.loads(out.read_text())["features"][0]["properties"]["classification"]["name"]
        'tumor'
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        gzip: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
        id_seed: str | None = None,
        decimals: int = 3,
    ) -> None:
        if decimals < 0:
            raise ValueError(f"GeoJSONWriter: decimals must be >= 0, got {decimals}")
        super().__init__(path, gzip=gzip)
        self._metadata = dict(metadata or {})
        self._id_seed = id_seed
        self._decimals = decimals
        self._mpp: float | None = None

    def _begin(self, cells: CellSet | None) -> None:
        meta: dict[str, Any] = {"coordinates": "pixels, x = column, y = row, origin top-left"}
        if cells is not None:
            meta.update(
                mpp=cells.mpp,
                class_names=list(cells.class_names),
                class_colors=[list(map(int, c)) for c in cells.class_colors],
            )
        meta.update(self._metadata)
        head = '{"type":"FeatureCollection","cytoken":' + json.dumps(meta, default=str, **_DUMPS) + ',"features":['
        self._stream.begin(head)

    def add(self, cells: CellSet) -> int:
        """Append the cells of one CellSet as features and return how many were written.

        Raises:
            ValueError: when ``cells.mpp`` differs from the first CellSet's (coordinates on another pixel
                grid), or the writer is closed.
        """
        return super().add(cells)

    def _add(self, cells: CellSet) -> int:
        if self._mpp is None:
            self._mpp = float(cells.mpp)
            self._begin(cells)
        elif not math.isclose(float(cells.mpp), self._mpp, rel_tol=1e-6):
            raise ValueError(
                f"GeoJSONWriter: cells at {cells.mpp} µm/px cannot join a file at {self._mpp} µm/px; "
                "transform them to one pixel grid first (CellSet.transformed)"
            )
        if not len(cells):
            return 0
        import shapely

        polys = cell_polygons(cells)
        _, coords, (ring_off, geom_off) = shapely.to_ragged_array(polys)
        per_geom = split_number_lists(coords, ring_off[geom_off], self._decimals)
        areas_um2 = cells.area_um2
        names = {cid: cells.class_name(cid) for cid in np.unique(cells.class_ids).tolist()}
        colors = {cid: list(cells.class_color(cid)) for cid in names}
        for i in range(len(cells)):
            cid = int(cells.class_ids[i])
            cell_id = int(cells.ids[i])
            r0, r1 = int(geom_off[i]), int(geom_off[i + 1])
            flat, start = per_geom[i], int(ring_off[r0])
            rings = [flat[ring_off[j] - start : ring_off[j + 1] - start] for j in range(r0, r1)]
            measurements: dict[str, float | int] = {
                "cell_id": cell_id,
                "area_um2": round(float(areas_um2[i]), 4),
                "area_px": int(cells.area_px[i]),
            }
            prob = float(cells.class_probs[i])
            if math.isfinite(prob):
                measurements["class_prob"] = round(prob, 6)
            props: dict[str, Any] = {"objectType": "detection"}
            if cid != 0:
                props["classification"] = {"name": names[cid], "color": colors[cid]}
            props["measurements"] = measurements
            props["cell_id"] = cell_id
            props["class_name"] = names[cid]
            feature = {
                "type": "Feature",
                "id": feature_id(self._id_seed, self._stream.items),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": props,
            }
            self._stream.item(json.dumps(feature, **_DUMPS))
        return len(cells)


def write_geojson(
    cells: CellSet | Iterable[CellSet],
    path: str | os.PathLike[str],
    *,
    gzip: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    id_seed: str | None = None,
) -> Path:
    """Write cells as a GeoJSON FeatureCollection (QuPath detections), atomically.

    Args:
        cells: one CellSet or an iterable of CellSets on the same pixel grid (streamed, bounded memory).
        path: output file; ``.gz`` suffix means gzip.
        gzip: force compression on or off.
        metadata: extra entries for the collection's ``"cytoken"`` member.
        id_seed: make feature UUIDs deterministic (see :class:`GeoJSONWriter`).

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> tri = np.array([[0, 0], [6, 0], [0, 6]], float)
        >>> cs = CellSet(ids=[3], centroids=[[2, 2]], bboxes=[[0, 0, 7, 7]], contours=[tri], area_px=[28],
        ...              class_ids=[0], class_probs=[float("nan")], mpp=0.5)
        >>> p = write_geojson(cs, pathlib.Path(tempfile.mkdtemp()) / "c.geojson.gz")
        >>> p.name
        'c.geojson.gz'
    """
    parts = [cells] if isinstance(cells, CellSet) else cells
    with GeoJSONWriter(path, gzip=gzip, metadata=metadata, id_seed=id_seed) as writer:
        for part in parts:
            writer.add(part)
    return Path(path)
