"""Core value types shared by every layer: µm/px, bounds, cell records and the cell table.

This module is layer 0: it imports nothing from cytoken and nothing heavy (numpy only; pyarrow lazily).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = [
    "MPP_MAX",
    "MPP_MIN",
    "Bounds",
    "CellRecord",
    "CellSet",
    "CytokenError",
    "Sample",
    "validate_mpp",
]

MPP_MIN = 0.05
MPP_MAX = 5.0


class CytokenError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits with status 2."""


def validate_mpp(mpp: float | None, *, source: str = "--mpp") -> float:
    """Check a µm/px value and return it as float.

    Args:
        mpp: micrometres per pixel.
        source: where the value came from, named in the error message.

    Returns:
        The value as a float.

    Raises:
        ValueError: when the value is missing, not finite, not positive or outside [0.05, 5].

    Example:
        >>> validate_mpp(0.25)
        0.25
    """
    if mpp is None:
        raise ValueError(f"{source}: µm/px is missing")
    value = float(mpp)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: µm/px must be a positive number, got {mpp!r}")
    if not MPP_MIN <= value <= MPP_MAX:
        raise ValueError(
            f"{source}: µm/px {value:g} is outside the plausible range [{MPP_MIN}, {MPP_MAX}] "
            "(40x scans are ~0.25, 20x ~0.5)"
        )
    return value


@dataclass(frozen=True)
class Bounds:
    """An axis-aligned rectangle in pixels: x (column), y (row), width, height."""

    x: int
    y: int
    width: int
    height: int

    @property
    def x1(self) -> int:
        """Exclusive right edge."""
        return self.x + self.width

    @property
    def y1(self) -> int:
        """Exclusive bottom edge."""
        return self.y + self.height

    def contains(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Half-open containment test ``x0 <= x < x1 and y0 <= y < y1`` (vectorised)."""
        x = np.asarray(x)
        y = np.asarray(y)
        return (x >= self.x) & (x < self.x1) & (y >= self.y) & (y < self.y1)


@dataclass(frozen=True)
class CellRecord:
    """One cell, as yielded when iterating a :class:`CellSet`.

    Coordinates are pixels of the image the cells were found in: ``x`` is the column, ``y`` the row.
    """

    id: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    contour: np.ndarray
    area_px: int
    area_um2: float
    class_id: int
    class_name: str
    class_prob: float


def _empty_contours(n: int) -> list[np.ndarray]:
    return [np.zeros((0, 2), np.float64) for _ in range(n)]


@dataclass
class CellSet:
    """A table of cells (struct of arrays) with per-row contours.

    Attributes:
        ids: (N,) int64 cell ids, unique within the set.
        centroids: (N, 2) float64, (x, y) in pixels.
        bboxes: (N, 4) int64, (x0, y0, x1, y1) with exclusive x1, y1.
        contours: N arrays of shape (K, 2) float64, (x, y) vertices of the outer boundary, not repeated at the end.
        area_px: (N,) int64 pixel count of each cell.
        class_ids: (N,) int64; 0 means "no class" (model without a type head), 1..C index ``class_names``.
        class_probs: (N,) float32 mean softmax probability of the chosen class over the cell (NaN when unknown).
        mpp: µm/px of the pixel grid the coordinates live on.
        class_names: names of classes 1..C (``class_names[0]`` is class id 1).
        class_colors: RGB colours of classes 1..C.
        tiles: optional (N,) int64 index of the tile/window each cell came from (-1 when not tiled).
        embeddings: optional (N, D) float array of per-cell token embeddings.
    """

    ids: np.ndarray
    centroids: np.ndarray
    bboxes: np.ndarray
    contours: list[np.ndarray]
    area_px: np.ndarray
    class_ids: np.ndarray
    class_probs: np.ndarray
    mpp: float
    class_names: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    tiles: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.ids = np.asarray(self.ids, np.int64).reshape(n)
        self.centroids = np.asarray(self.centroids, np.float64).reshape(n, 2)
        self.bboxes = np.asarray(self.bboxes, np.int64).reshape(n, 4)
        self.area_px = np.asarray(self.area_px, np.int64).reshape(n)
        self.class_ids = np.asarray(self.class_ids, np.int64).reshape(n)
        self.class_probs = np.asarray(self.class_probs, np.float32).reshape(n)
        if len(self.contours) != n:
            raise ValueError(f"CellSet: {len(self.contours)} contours for {n} cells")
        if self.tiles is not None:
            self.tiles = np.asarray(self.tiles, np.int64).reshape(n)
        if self.embeddings is not None and len(self.embeddings) != n:
            raise ValueError(f"CellSet: {len(self.embeddings)} embeddings for {n} cells")
        if not self.class_colors and self.class_names:
            self.class_colors = default_colors(len(self.class_names))

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(
        cls,
        mpp: float,
        class_names: Sequence[str] = (),
        class_colors: Sequence[tuple[int, int, int]] = (),
        embedding_dim: int | None = None,
    ) -> CellSet:
        """An empty set with the given metadata."""
        return cls(
            ids=np.zeros(0, np.int64),
            centroids=np.zeros((0, 2)),
            bboxes=np.zeros((0, 4), np.int64),
            contours=[],
            area_px=np.zeros(0, np.int64),
            class_ids=np.zeros(0, np.int64),
            class_probs=np.zeros(0, np.float32),
            mpp=mpp,
            class_names=tuple(class_names),
            class_colors=tuple(class_colors),
            embeddings=None if embedding_dim is None else np.zeros((0, embedding_dim), np.float32),
        )

    @classmethod
    def concat(cls, parts: Sequence[CellSet], *, renumber: bool = True) -> CellSet:
        """Concatenate sets on the same pixel grid; ids are renumbered 1..N unless ``renumber=False``."""
        if not parts:
            raise ValueError("CellSet.concat needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if p.class_names != first.class_names:
                raise ValueError("CellSet.concat: parts have different class names")
        n = sum(len(p) for p in parts)
        emb = None
        if all(p.embeddings is not None for p in parts):
            emb = np.concatenate([p.embeddings for p in parts])  # type: ignore[misc]
        tiles = None
        if all(p.tiles is not None for p in parts):
            tiles = np.concatenate([p.tiles for p in parts])  # type: ignore[misc]
        return cls(
            ids=np.arange(1, n + 1) if renumber else np.concatenate([p.ids for p in parts]),
            centroids=np.concatenate([p.centroids for p in parts]),
            bboxes=np.concatenate([p.bboxes for p in parts]),
            contours=[c for p in parts for c in p.contours],
            area_px=np.concatenate([p.area_px for p in parts]),
            class_ids=np.concatenate([p.class_ids for p in parts]),
            class_probs=np.concatenate([p.class_probs for p in parts]),
            mpp=first.mpp,
            class_names=first.class_names,
            class_colors=first.class_colors,
            tiles=tiles,
            embeddings=emb,
            meta=dict(first.meta),
        )

    # ------------------------------------------------------------------ table protocol
    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[CellRecord]:
        for i in range(len(self)):
            yield self.record(i)

    def record(self, i: int) -> CellRecord:
        """The i-th cell as a :class:`CellRecord`."""
        cid = int(self.class_ids[i])
        return CellRecord(
            id=int(self.ids[i]),
            centroid=(float(self.centroids[i, 0]), float(self.centroids[i, 1])),
            bbox=tuple(int(v) for v in self.bboxes[i]),  # type: ignore[arg-type]
            contour=self.contours[i],
            area_px=int(self.area_px[i]),
            area_um2=float(self.area_um2[i]),
            class_id=cid,
            class_name=self.class_name(cid),
            class_prob=float(self.class_probs[i]),
        )

    @property
    def area_um2(self) -> np.ndarray:
        """Cell areas in µm²."""
        return self.area_px.astype(np.float64) * self.mpp * self.mpp

    def class_name(self, class_id: int) -> str:
        """Name of a class id (``"unclassified"`` for 0 or unknown ids)."""
        if 1 <= class_id <= len(self.class_names):
            return self.class_names[class_id - 1]
        return "unclassified"

    def class_color(self, class_id: int) -> tuple[int, int, int]:
        """RGB colour of a class id (grey for unclassified)."""
        if 1 <= class_id <= len(self.class_colors):
            return tuple(int(c) for c in self.class_colors[class_id - 1])  # type: ignore[return-value]
        return (160, 160, 160)

    def select(self, mask: np.ndarray | Sequence[int]) -> CellSet:
        """Rows chosen by a boolean mask or an index array (ids kept)."""
        idx = np.asarray(mask)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return replace(
            self,
            ids=self.ids[idx],
            centroids=self.centroids[idx],
            bboxes=self.bboxes[idx],
            contours=[self.contours[int(i)] for i in idx],
            area_px=self.area_px[idx],
            class_ids=self.class_ids[idx],
            class_probs=self.class_probs[idx],
            tiles=None if self.tiles is None else self.tiles[idx],
            embeddings=None if self.embeddings is None else self.embeddings[idx],
            meta=dict(self.meta),
        )

    def transformed(
        self, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0, mpp: float | None = None
    ) -> CellSet:
        """Coordinates mapped by ``p' = p * scale + (dx, dy)``; areas rescaled; ``mpp`` set (default mpp/scale)."""
        off = np.array([dx, dy])
        new_mpp = self.mpp / scale if mpp is None else mpp
        bb = self.bboxes.astype(np.float64)
        bb = np.concatenate([np.floor(bb[:, :2] * scale + off), np.ceil(bb[:, 2:] * scale + off)], axis=1)
        return replace(
            self,
            centroids=self.centroids * scale + off,
            bboxes=bb.astype(np.int64),
            contours=[c * scale + off for c in self.contours],
            area_px=np.rint(self.area_px * scale * scale).astype(np.int64),
            mpp=new_mpp,
            meta=dict(self.meta),
        )

    def to_arrow(self) -> pa.Table:
        """The cells as a pyarrow Table (one row per cell; polygon as WKB)."""
        import pyarrow as pa
        import shapely

        polys = [shapely.Polygon(c) if len(c) >= 3 else None for c in self.contours]
        wkb = [None if p is None else shapely.to_wkb(p) for p in polys]
        cols: dict[str, Any] = {
            "id": pa.array(self.ids),
            "x": pa.array(self.centroids[:, 0]),
            "y": pa.array(self.centroids[:, 1]),
            "bbox_x0": pa.array(self.bboxes[:, 0]),
            "bbox_y0": pa.array(self.bboxes[:, 1]),
            "bbox_x1": pa.array(self.bboxes[:, 2]),
            "bbox_y1": pa.array(self.bboxes[:, 3]),
            "area_px": pa.array(self.area_px),
            "area_um2": pa.array(self.area_um2),
            "class_id": pa.array(self.class_ids),
            "class_name": pa.array([self.class_name(int(c)) for c in self.class_ids], pa.string()),
            "class_prob": pa.array(self.class_probs),
            "tile": pa.array(self.tiles if self.tiles is not None else np.full(len(self), -1, np.int64)),
            "polygon_wkb": pa.array(wkb, pa.binary()),
        }
        meta = {
            b"cytoken.mpp": str(self.mpp).encode(),
            b"cytoken.class_names": ",".join(self.class_names).encode(),
        }
        return pa.table(cols).replace_schema_metadata(meta)


def default_colors(n: int) -> tuple[tuple[int, int, int], ...]:
    """A fixed, distinguishable RGB palette of length n."""
    base = [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
    ]
    return tuple(base[i % len(base)] for i in range(n))


@dataclass
class Sample:
    """One annotated image from a dataset adapter.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mpp: µm/px of the image, or None when the dataset does not say.
        source_id: stable identifier ("monuseg/train/TCGA-...").
        inst_map: (H, W) int32 instance ids (0 = background; ids need not be consecutive), or None.
        type_map: (H, W) int32 class ids (0 = background, 1..C index ``class_names``), or None.
        points: (N, 2) float64 labelled points (x, y), 0-based pixel coordinates, or None.
        point_labels: (N,) int64 class ids (1..C) of ``points``, or None.
        class_names: names of classes 1..C (empty when the dataset has no classes).
        tissue: tissue type name where the dataset has one (PanNuke), else None.
    """

    image: np.ndarray
    mpp: float | None
    source_id: str
    inst_map: np.ndarray | None = None
    type_map: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    tissue: str | None = None
