"""Per-cell labels from a marker mask: overlap fraction, positive/negative, an ambiguity band, a table and a QC image.

For each cell (pixels of one id in an instance map on the H&E grid, or a :class:`~cytoken.types.CellSet`
rasterised onto it), with ``covered`` = its pixels inside the IF overlap (``valid``) and ``marked`` = its covered
pixels inside the marker mask:

* ``coverage = covered / area`` and ``overlap_fraction = marked / covered`` (NaN when nothing is covered);
* ``status``, checked in this order:

  - ``"missing"``: the id has no pixel in the instance map;
  - ``"no_coverage"``: ``coverage < min_coverage``;
  - ``"positive"``: ``overlap_fraction >= positive_fraction``;
  - ``"ambiguous"``: ``0 < overlap_fraction`` and ``overlap_fraction >= positive_fraction - negative_margin``
    (only when ``negative_margin > 0``): a negative that touches the marker almost enough to be positive;
  - ``"negative"``: everything else (including every cell with no marked pixel).

* ``label`` is 1 for positive, 0 otherwise; ``kept`` is True for ``"positive"`` and ``"negative"`` only. A training
  set uses the kept rows. The band never drops positives and never drops a cell with zero overlap.

All counts are vectorised with :func:`numpy.bincount` over the pixel ids, so cost is linear in the image size.
:func:`overlap_counts` returns the three counts of one map (or one tile of a slide: tile counts add up) and
:func:`labels_from_counts` applies the rules above to them; :func:`label_cells` is the two in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cytoken.io.atomic import atomic_path
from cytoken.types import CellSet, CytokenError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = [
    "CellLabelConfig",
    "CellLabels",
    "label_cells",
    "labels_from_counts",
    "overlap_counts",
    "qc_overlay",
    "rasterize_cells",
]

STATUSES = ("positive", "negative", "ambiguous", "no_coverage", "missing")


@dataclass(frozen=True)
class CellLabelConfig:
    """Settings of :func:`label_cells` (the rules are in the module docstring).

    Attributes:
        positive_fraction: a cell is positive when at least this fraction of its covered pixels is marked.
        negative_margin: width of the ambiguity band below ``positive_fraction`` (0 = no band).
        min_coverage: fewest fraction of a cell's pixels that must lie inside the IF overlap.
    """

    positive_fraction: float = 0.15
    negative_margin: float = 0.0
    min_coverage: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.positive_fraction <= 1:
            raise ValueError(f"CellLabelConfig.positive_fraction must be in (0, 1], got {self.positive_fraction}")
        if not 0 <= self.negative_margin <= self.positive_fraction:
            raise ValueError(
                f"CellLabelConfig.negative_margin must be in [0, positive_fraction={self.positive_fraction}], "
                f"got {self.negative_margin}"
            )
        if not 0 <= self.min_coverage <= 1:
            raise ValueError(f"CellLabelConfig.min_coverage must be in [0, 1], got {self.min_coverage}")


@dataclass
class CellLabels:
    """One row per cell: the label table of an IF-derived dataset.

    Attributes:
        ids: (N,) int64 cell ids.
        overlap_fraction: (N,) float64 marked / covered pixels (NaN when no pixel is covered).
        label: (N,) int8, 1 = marker-positive, 0 = not.
        kept: (N,) bool, True for confident rows (status positive or negative).
        status: (N,) str, one of positive, negative, ambiguous, no_coverage, missing.
        area_px: (N,) int64 pixels of the cell on the grid.
        coverage: (N,) float64 fraction of the cell inside the IF overlap.
        marker: marker (channel) name.
        config: the rules used.
    """

    ids: np.ndarray
    overlap_fraction: np.ndarray
    label: np.ndarray
    kept: np.ndarray
    status: np.ndarray
    area_px: np.ndarray
    coverage: np.ndarray
    marker: str
    config: CellLabelConfig

    def __len__(self) -> int:
        return len(self.ids)

    def counts(self) -> dict[str, int]:
        """Number of cells per status."""
        return {s: int((self.status == s).sum()) for s in STATUSES}

    def to_arrow(self) -> pa.Table:
        """The table as pyarrow (columns cell_id, overlap_fraction, label, kept, status, area_px, coverage, marker)."""
        import pyarrow as pa

        table = pa.table(
            {
                "cell_id": pa.array(self.ids, pa.int64()),
                "overlap_fraction": pa.array(self.overlap_fraction, pa.float64()),
                "label": pa.array(self.label, pa.int8()),
                "kept": pa.array(self.kept, pa.bool_()),
                "status": pa.array(self.status.tolist(), pa.string()),
                "area_px": pa.array(self.area_px, pa.int64()),
                "coverage": pa.array(self.coverage, pa.float64()),
                "marker": pa.array([self.marker] * len(self), pa.string()),
            }
        )
        meta = {
            b"cytoken.marker": self.marker.encode(),
            b"cytoken.positive_fraction": str(self.config.positive_fraction).encode(),
            b"cytoken.negative_margin": str(self.config.negative_margin).encode(),
            b"cytoken.min_coverage": str(self.config.min_coverage).encode(),
        }
        return table.replace_schema_metadata(meta)

    def write(self, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the table as Parquet (``.parquet``) or CSV (``.csv``), atomically (temporary file + rename).

        ``metadata`` (e.g. which cells the labels refer to) is added to the Parquet schema metadata under
        ``cytoken.<key>``; CSV has no place for it.
        """
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise ValueError(f"CellLabels.write: use a .parquet or .csv path, got {path.name!r}")
        with atomic_path(path) as tmp:
            if suffix == ".parquet":
                table = self.to_arrow()
                extra = {f"cytoken.{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()}
                pq.write_table(table.replace_schema_metadata({**table.schema.metadata, **extra}), tmp)
            else:
                pacsv.write_csv(self.to_arrow(), tmp)
        return path


def rasterize_cells(cells: CellSet, shape: tuple[int, int], *, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Paint the cells' contours as an (H, W) int64 instance map holding their ids (later cells overwrite earlier).

    Args:
        cells: the cells, in pixel coordinates of the full image.
        shape: (H, W) of the map to paint.
        origin: (x, y) of the map's pixel (0, 0) in the full image, to paint one tile of a large image; only the
            cells whose bounding box meets the tile are drawn.

    Example:
        >>> cs = CellSet(ids=[7], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]],
        ...              contours=[np.array([[1.0, 1], [3, 1], [3, 3], [1, 3]])], area_px=[9],
        ...              class_ids=[0], class_probs=[np.nan], mpp=0.25)
        >>> int((rasterize_cells(cs, (6, 6)) == 7).sum())
        9
        >>> int((rasterize_cells(cs, (4, 4), origin=(2, 2)) == 7).sum())
        4
    """
    import cv2

    h, w = shape
    pad = 2  # polygons are clipped at the canvas edge, which OpenCV may paint: paint a border and cut it off
    out = np.zeros((h + 2 * pad, w + 2 * pad), np.int32)
    ox, oy = int(origin[0]), int(origin[1])
    if len(cells):
        b = np.asarray(cells.bboxes, np.float64).reshape(-1, 4)
        near = (b[:, 2] >= ox - pad) & (b[:, 0] <= ox + w + pad) & (b[:, 3] >= oy - pad) & (b[:, 1] <= oy + h + pad)
        shift = np.array([ox - pad, oy - pad], np.float64)
        for i in np.flatnonzero(near):
            contour = np.asarray(cells.contours[i])
            if len(contour) < 3:
                continue
            pts = np.rint(contour - shift).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(out, [pts], int(cells.ids[i]))
    return out[pad : pad + h, pad : pad + w].astype(np.int64)


def _lookup(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value, whether it is a non-zero entry of ``ids`` (bool mask) and, for those, its index in ``ids``."""
    values = np.asarray(values).astype(np.int64, copy=False)
    n = len(ids)
    if n == 0:
        return np.zeros(values.shape, bool), np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    sids = np.asarray(ids, np.int64)[order]
    pos = np.clip(np.searchsorted(sids, values), 0, n - 1)
    hit = (values > 0) & (sids[pos] == values)
    return hit, order[pos[hit]]


def overlap_counts(
    inst_map: np.ndarray, marker_mask: np.ndarray, ids: np.ndarray, *, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell of ``ids``: its pixels, its pixels inside ``valid`` and its valid pixels inside the marker mask.

    The counts of the tiles of a large image add up to those of the whole image, so a slide can be labelled tile by
    tile (:func:`labels_from_counts` turns the sums into labels).

    Args:
        inst_map: (H, W) integer instance map (0 = background).
        marker_mask: (H, W) bool marker-positive mask.
        ids: (N,) the cells to count (other ids in the map are ignored).
        valid: (H, W) bool pixels covered by the IF image (default: all).

    Returns:
        ``(area, covered, marked)``, each (N,) int64.

    Example:
        >>> inst = np.array([[1, 1, 2, 2]]); mask = np.array([[True, False, False, False]])
        >>> [a.tolist() for a in overlap_counts(inst, mask, np.array([1, 2]))]
        [[2, 2], [2, 2], [1, 0]]
    """
    inst = np.asarray(inst_map)
    mask = np.asarray(marker_mask, bool)
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"overlap_counts: the instance map must be integer, got dtype {inst.dtype}")
    if inst.shape != mask.shape or inst.ndim != 2:
        raise CytokenError(
            f"overlap_counts: cell map shape {inst.shape} differs from marker mask shape {mask.shape}; "
            "warp the IF image onto the H&E grid first"
        )
    cov = np.ones(mask.shape, bool) if valid is None else np.asarray(valid, bool)
    if cov.shape != mask.shape:
        raise ValueError(f"overlap_counts: valid mask shape {cov.shape} differs from marker mask {mask.shape}")
    ids = np.asarray(ids, np.int64).reshape(-1)
    n = len(ids)
    hit, idx = _lookup(ids, inst.ravel())
    area = np.bincount(idx, minlength=n).astype(np.int64)
    covered = np.bincount(idx, weights=cov.ravel()[hit], minlength=n).astype(np.int64)
    marked = np.bincount(idx, weights=(mask & cov).ravel()[hit], minlength=n).astype(np.int64)
    return area, covered, marked


def labels_from_counts(
    ids: np.ndarray,
    area: np.ndarray,
    covered: np.ndarray,
    marked: np.ndarray,
    *,
    config: CellLabelConfig | None = None,
    marker: str = "marker",
) -> CellLabels:
    """Apply the labelling rules (module docstring) to per-cell pixel counts (see :func:`overlap_counts`).

    Example:
        >>> lab = labels_from_counts(np.array([1, 2]), np.array([4, 4]), np.array([4, 1]), np.array([1, 0]))
        >>> lab.status.tolist()
        ['positive', 'no_coverage']
    """
    cfg = config or CellLabelConfig()
    ids = np.asarray(ids, np.int64).reshape(-1)
    area = np.asarray(area, np.int64)
    covered = np.asarray(covered, np.float64)
    marked = np.asarray(marked, np.float64)
    n = len(ids)
    if not len(area) == len(covered) == len(marked) == n:
        raise ValueError(
            f"labels_from_counts: {n} ids but {len(area)} / {len(covered)} / {len(marked)} area / covered / marked"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(covered > 0, marked / np.maximum(covered, 1), np.nan)
        coverage = np.where(area > 0, covered / np.maximum(area, 1), 0.0)
    t = cfg.positive_fraction
    status = np.full(n, "negative", dtype=object)
    is_pos = frac >= t
    status[is_pos] = "positive"
    if cfg.negative_margin > 0:
        amb = (frac > 0) & (frac < t) & (frac >= t - cfg.negative_margin)
        status[amb] = "ambiguous"
    low_cov = coverage < cfg.min_coverage
    status[low_cov] = "no_coverage"
    status[area == 0] = "missing"
    status = status.astype(str)
    label = (status == "positive").astype(np.int8)
    kept = (status == "positive") | (status == "negative")
    return CellLabels(
        ids=ids,
        overlap_fraction=frac.astype(np.float64),
        label=label,
        kept=kept,
        status=status,
        area_px=area,
        coverage=coverage.astype(np.float64),
        marker=str(marker),
        config=cfg,
    )


def label_cells(
    cells: np.ndarray | CellSet,
    marker_mask: np.ndarray,
    *,
    cell_ids: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    config: CellLabelConfig | None = None,
    marker: str = "marker",
) -> CellLabels:
    """Label each cell marker-positive or negative by the fraction of its pixels inside the marker mask.

    Args:
        cells: (H, W) integer instance map on the marker mask's grid (0 = background), or a CellSet in that
            grid's pixel coordinates (rasterised with :func:`rasterize_cells`).
        marker_mask: (H, W) bool marker-positive mask.
        cell_ids: the cells to label (default: every non-zero id in the map / every cell of the CellSet).
        valid: (H, W) bool pixels covered by the IF image (default: all).
        config: thresholds; defaults to ``CellLabelConfig()`` (positive at >= 15 %, no band).
        marker: marker name recorded in the table.

    Returns:
        The label table, in ``cell_ids`` order (ascending ids by default).

    Example:
        >>> inst = np.zeros((4, 8), np.int32); inst[:, :4] = 1; inst[:, 4:] = 2
        >>> mask = np.zeros((4, 8), bool); mask[:, :2] = True; mask[0, 4] = True
        >>> lab = label_cells(inst, mask)
        >>> lab.overlap_fraction.tolist(), lab.label.tolist(), lab.status.tolist()
        ([0.5, 0.0625], [1, 0], ['positive', 'negative'])
    """
    mask = np.asarray(marker_mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"label_cells: marker_mask must be 2-D, got shape {mask.shape}")
    if isinstance(cells, CellSet):
        inst = rasterize_cells(cells, mask.shape)
        if cell_ids is None:
            cell_ids = cells.ids
    else:
        inst = np.asarray(cells)
        if not np.issubdtype(inst.dtype, np.integer):
            raise ValueError(f"label_cells: the instance map must be integer, got dtype {inst.dtype}")
    if inst.shape != mask.shape:
        raise CytokenError(
            f"label_cells: cell map shape {inst.shape} differs from marker mask shape {mask.shape}; "
            "warp the IF image onto the H&E grid first"
        )
    if valid is not None and np.shape(valid) != mask.shape:
        raise ValueError(f"label_cells: valid mask shape {np.shape(valid)} differs from marker mask {mask.shape}")
    ids = np.unique(inst[inst > 0]) if cell_ids is None else np.asarray(cell_ids, np.int64).reshape(-1)
    area, covered, marked = overlap_counts(inst, mask, ids, valid=valid)
    return labels_from_counts(ids, area, covered, marked, config=config, marker=marker)


COLORS: dict[str, tuple[int, int, int]] = {
    "marker": (255, 230, 0),
    "positive": (255, 40, 40),
    "negative": (40, 170, 255),
    "dropped": (150, 150, 150),
}


def qc_overlay(
    he_rgb: np.ndarray,
    marker_mask: np.ndarray,
    cells: np.ndarray,
    labels: CellLabels,
    path: str | Path | None = None,
    *,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Draw the QC image: the H&E, the marker contour, positive and negative cell outlines (dropped cells grey).

    Args:
        he_rgb: (H, W, 3) uint8 H&E.
        marker_mask: (H, W) bool marker mask.
        cells: (H, W) instance map the labels were computed on.
        labels: the labels.
        path: if given, the image is also saved there as PNG (atomically).
        colors: overrides of :data:`COLORS` (keys marker, positive, negative, dropped).

    Returns:
        (H, W, 3) uint8 overlay.
    """
    from PIL import Image
    from skimage.segmentation import find_boundaries

    col = {**COLORS, **(colors or {})}
    rgb = np.asarray(he_rgb)[..., :3].astype(np.uint8).copy()
    inst = np.asarray(cells)
    if rgb.shape[:2] != inst.shape or inst.shape != np.asarray(marker_mask).shape:
        raise ValueError(
            f"qc_overlay: shapes differ (H&E {rgb.shape[:2]}, cells {inst.shape}, mask {np.shape(marker_mask)})"
        )
    kinds = ("dropped", "negative", "positive")
    code = np.where(labels.status == "positive", 2, np.where(labels.status == "negative", 1, 0))
    edges = find_boundaries(inst, mode="inner") & (inst > 0)
    rr, cc = np.nonzero(edges)
    hit, idx = _lookup(labels.ids, inst[rr, cc])
    rr, cc, edge_code = rr[hit], cc[hit], code[idx]
    for k, kind in enumerate(kinds):
        sel = edge_code == k
        rgb[rr[sel], cc[sel]] = col[kind]
    marker_edge = find_boundaries(np.asarray(marker_mask, bool), mode="inner")
    rgb[marker_edge] = col["marker"]
    if path is not None:
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
    return rgb
