"""Tiling geometry: overlapping tiles whose *cores* partition the image, so every cell is kept exactly once.

Pure geometry on integer pixel grids, no I/O. The image (usually the slide resampled to the model's µm/px, see
:func:`mpp_scale`) is covered by ``tile_size`` squares that overlap their neighbours by at least ``overlap``
pixels. Each tile owns a *core*: the tile minus half the overlap on each side that faces another tile; on the
image border the core reaches the border. Cores partition the image exactly, so the rule "keep a cell from
tile ``t`` when its centroid lies in ``t``'s core" keeps each cell exactly once (:meth:`TileGrid.owner_of`).

Overlap requirement: a cell is complete in the tile that owns it when each of its pixels lies less than
``overlap // 2 - 1`` pixels from its centroid along x and along y (then it stays clear of the tile's internal
edges). For round or elliptical nuclei that is ``overlap >= largest nucleus diameter + 4`` pixels at the
model's µm/px; for irregular shapes the margin must exceed the largest centroid-to-boundary offset. Cells that
still touch an internal tile edge are truncated and should be dropped (:meth:`TileGrid.keep`). For example, at
0.25 µm/px nuclei up to 15 µm (60 px) across need ``overlap >= 64``; in the MoNuSeg training annotations
(40x) a nucleus reaches up to 78 px from its centroid along an axis, which needs ``overlap >= 160``.

Tile placement: tiles step by ``tile_size - overlap`` from the origin; the last tile of a row or column is
shifted back to end exactly on the image border (its overlap with the previous tile is then larger), so no
tile reaches past the image unless the image is smaller than one tile, in which case one tile starts at the
origin and extends past the image (the reader pads it; see :meth:`cytoken.io.slide.Slide.read_scaled`).

Coordinates: ``x`` is the column, ``y`` the row. Bounds are integer and half-open. Points (centroids) are in
pixel-index coordinates: pixel ``(i, j)`` has its centre at ``(i, j)``, as ``skimage.measure.regionprops``
reports centroids.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cytoken.types import Bounds

__all__ = [
    "Tile",
    "TileGrid",
    "model_image_size",
    "model_to_slide_bounds",
    "model_to_slide_points",
    "mpp_scale",
    "slide_to_model_bounds",
    "slide_to_model_points",
]


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes:
        index: position in the full grid, ``row * n_cols + col`` (stable whatever tiles a mask removes).
        row: tile row.
        col: tile column.
        bounds: the tile's window in image pixels (``tile_size`` square; may reach past a small image).
        core: the part of the image this tile owns (cores of all tiles partition the image).
    """

    index: int
    row: int
    col: int
    bounds: Bounds
    core: Bounds


def _axis_layout(length: int, tile: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile starts along one axis and the ``n + 1`` core boundaries (first 0, last ``length``)."""
    if length <= tile:
        return np.zeros(1, np.int64), np.array([0, length], np.int64)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    starts = np.array([i * stride for i in range(n - 1)] + [length - tile], np.int64)
    # boundary between tiles i-1 and i: middle of their overlap [starts[i], starts[i-1] + tile)
    mids = (starts[1:] + starts[:-1] + tile) // 2
    return starts, np.concatenate([[0], mids, [length]]).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles over an image, with cores that partition it (see the module docstring).

    Args:
        image_size: ``(width, height)`` of the image in pixels (model pixels for a slide).
        tile_size: side of a tile in pixels.
        overlap: minimum overlap between neighbouring tiles in pixels, ``0 <= overlap < tile_size``.
        origin: ``(x, y)`` of the image's top-left corner; tile bounds, cores and points are in the
            coordinates of the larger image this one sits in (e.g. an ROI of a slide). Default ``(0, 0)``.

    Raises:
        ValueError: on a non-positive image or tile size, or an overlap outside ``[0, tile_size)``.

    Example:
        >>> grid = TileGrid((1000, 600), tile_size=512, overlap=64)
        >>> grid.shape, len(grid)
        ((2, 3), 6)
        >>> grid.tile(0).core
        Bounds(x=0, y=0, width=480, height=300)
        >>> int(grid.owner_of(700.0, 10.0))
        1
    """

    image_size: tuple[int, int]
    tile_size: int
    overlap: int
    origin: tuple[int, int] = (0, 0)
    _xs: np.ndarray = field(init=False, repr=False, compare=False)
    _ys: np.ndarray = field(init=False, repr=False, compare=False)
    _cx: np.ndarray = field(init=False, repr=False, compare=False)
    _cy: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w, h = (int(v) for v in self.image_size)
        if w <= 0 or h <= 0:
            raise ValueError(f"TileGrid: image_size must be positive, got {self.image_size}")
        if int(self.tile_size) <= 0:
            raise ValueError(f"TileGrid: tile_size must be > 0, got {self.tile_size}")
        if not 0 <= int(self.overlap) < int(self.tile_size):
            raise ValueError(
                f"TileGrid: overlap must be in [0, tile_size={self.tile_size}), got {self.overlap}"
            )
        object.__setattr__(self, "image_size", (w, h))
        object.__setattr__(self, "tile_size", int(self.tile_size))
        object.__setattr__(self, "overlap", int(self.overlap))
        object.__setattr__(self, "origin", (int(self.origin[0]), int(self.origin[1])))
        xs, cx = _axis_layout(w, self.tile_size, self.overlap)
        ys, cy = _axis_layout(h, self.tile_size, self.overlap)
        object.__setattr__(self, "_xs", xs + self.origin[0])
        object.__setattr__(self, "_ys", ys + self.origin[1])
        object.__setattr__(self, "_cx", cx + self.origin[0])
        object.__setattr__(self, "_cy", cy + self.origin[1])

    # ------------------------------------------------------------------ layout
    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)``."""
        return len(self._ys), len(self._xs)

    @property
    def margin(self) -> int:
        """Smallest distance from a core edge to its tile's edge on an internal side: ``overlap // 2``."""
        return self.overlap // 2

    @property
    def extent(self) -> Bounds:
        """The image's rectangle (origin and size)."""
        return Bounds(self.origin[0], self.origin[1], self.image_size[0], self.image_size[1])

    def __len__(self) -> int:
        return len(self._xs) * len(self._ys)

    def tile(self, index: int) -> Tile:
        """The tile with grid index ``index`` (``row * n_cols + col``).

        Raises:
            IndexError: when ``index`` is outside ``[0, len(grid))``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} outside [0, {len(self)})")
        row, col = divmod(int(index), len(self._xs))
        x, y = int(self._xs[col]), int(self._ys[row])
        core = Bounds(
            int(self._cx[col]),
            int(self._cy[row]),
            int(self._cx[col + 1] - self._cx[col]),
            int(self._cy[row + 1] - self._cy[row]),
        )
        return Tile(int(index), row, col, Bounds(x, y, self.tile_size, self.tile_size), core)

    def tiles(
        self, tissue_mask: np.ndarray | None = None, mask_extent: Bounds | None = None
    ) -> Iterator[Tile]:
        """Every tile in row-major order, optionally only those over tissue.

        Args:
            tissue_mask: 2-D bool mask at any resolution covering ``mask_extent``; a tile is kept when any
                mask pixel overlapping its bounds is True (mask pixels are scaled to the image, see
                :mod:`cytoken.io.slide.tissue`).
            mask_extent: the rectangle the mask covers, in this grid's coordinates; default the grid's own
                :attr:`extent`. Pass the whole slide's extent when the grid covers only an ROI.

        Yields:
            :class:`Tile` objects.

        Raises:
            ValueError: when the mask is not 2-D or empty, or the extent is empty.

        Example:
            >>> mask = np.zeros((10, 10), bool)
            >>> mask[0, 0] = True
            >>> [t.index for t in TileGrid((1000, 1000), 256, 32).tiles(mask)]
            [0]
        """
        keep = None if tissue_mask is None else self._tissue_keep(tissue_mask, mask_extent)
        for i in range(len(self)):
            if keep is None or keep[i]:
                yield self.tile(i)

    def _tissue_keep(self, tissue_mask: np.ndarray, mask_extent: Bounds | None) -> np.ndarray:
        mask = np.asarray(tissue_mask, bool)
        if mask.ndim != 2 or 0 in mask.shape:
            raise ValueError(f"tiles: tissue_mask must be a non-empty 2-D array, got shape {mask.shape}")
        ext = self.extent if mask_extent is None else mask_extent
        if ext.width <= 0 or ext.height <= 0:
            raise ValueError(f"tiles: mask_extent must be non-empty, got {ext}")
        mh, mw = mask.shape
        fx, fy = mw / ext.width, mh / ext.height
        # summed-area table: any tissue in a mask rectangle in O(1) per tile
        sat = np.zeros((mh + 1, mw + 1), np.int64)
        sat[1:, 1:] = mask.cumsum(0).cumsum(1)
        xs = np.tile(self._xs, len(self._ys))
        ys = np.repeat(self._ys, len(self._xs))
        # every mask pixel that overlaps the tile's window (image clipped) counts
        x0 = np.clip(np.floor((np.maximum(xs, ext.x) - ext.x) * fx), 0, mw).astype(np.int64)
        x1 = np.clip(np.ceil((np.minimum(xs + self.tile_size, ext.x1) - ext.x) * fx), 0, mw).astype(np.int64)
        y0 = np.clip(np.floor((np.maximum(ys, ext.y) - ext.y) * fy), 0, mh).astype(np.int64)
        y1 = np.clip(np.ceil((np.minimum(ys + self.tile_size, ext.y1) - ext.y) * fy), 0, mh).astype(np.int64)
        x1, y1 = np.maximum(x1, x0), np.maximum(y1, y0)
        total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        return total > 0

    # ------------------------------------------------------------------ ownership
    def owner_of(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Grid index of the tile whose core contains each point (vectorised).

        Points outside the image belong to the nearest border tile, so every point has exactly one owner.

        Args:
            x: point columns (pixel-index coordinates, see module docstring).
            y: point rows.

        Returns:
            int64 array of tile indices, shaped like the broadcast of ``x`` and ``y``.

        Example:
            >>> TileGrid((100, 100), 64, 16).owner_of(np.array([0.0, 99.0]), np.array([0.0, 99.0])).tolist()
            [0, 3]
        """
        return self._row_of(y) * len(self._xs) + self._col_of(x)

    def in_core(self, tile: Tile, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Whether each point is owned by ``tile`` (same rule as :meth:`owner_of`), vectorised.

        Example:
            >>> grid = TileGrid((100, 100), 64, 16)
            >>> grid.in_core(grid.tile(0), np.array([10.0, 60.0]), np.array([10.0, 10.0])).tolist()
            [True, False]
        """
        return (self._col_of(x) == tile.col) & (self._row_of(y) == tile.row)

    def _col_of(self, x: np.ndarray | float) -> np.ndarray:
        return np.searchsorted(self._cx[1:-1], np.asarray(x, np.float64), side="right").astype(np.int64)

    def _row_of(self, y: np.ndarray | float) -> np.ndarray:
        return np.searchsorted(self._cy[1:-1], np.asarray(y, np.float64), side="right").astype(np.int64)

    def internal_edges(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """Which sides of a tile face another tile, ``(left, top, right, bottom)``; image borders: False."""
        n_rows, n_cols = self.shape
        return tile.col > 0, tile.row > 0, tile.col < n_cols - 1, tile.row < n_rows - 1

    def keep(self, tile: Tile, centroids: np.ndarray, bboxes: np.ndarray | None = None) -> np.ndarray:
        """Which cells found in a tile to keep: centroid in the tile's core, not touching an internal edge.

        Args:
            tile: the tile the cells were found in.
            centroids: ``(N, 2)`` (x, y) in tile-local pixel-index coordinates.
            bboxes: optional ``(N, 4)`` (x0, y0, x1, y1) tile-local boxes, x1/y1 exclusive; cells whose box
                touches a tile edge that faces another tile are dropped (truncated cells; with a sufficient
                overlap a cell owned by this tile never touches one).

        Returns:
            ``(N,)`` bool array.

        Example:
            >>> grid = TileGrid((100, 100), 64, 16)
            >>> t = grid.tile(0)
            >>> cents = np.array([[10.0, 10.0], [60.0, 10.0]])
            >>> grid.keep(t, cents, np.array([[0, 0, 20, 20], [55, 5, 64, 15]]))
            array([ True, False])
        """
        c = np.asarray(centroids, np.float64).reshape(-1, 2)
        ok = self.in_core(tile, c[:, 0] + tile.bounds.x, c[:, 1] + tile.bounds.y)
        if bboxes is not None:
            b = np.asarray(bboxes).reshape(-1, 4)
            left, top, right, bottom = self.internal_edges(tile)
            size = self.tile_size
            if left:
                ok &= b[:, 0] > 0
            if top:
                ok &= b[:, 1] > 0
            if right:
                ok &= b[:, 2] < size
            if bottom:
                ok &= b[:, 3] < size
        return ok


# ---------------------------------------------------------------------- slide <-> model pixels
def mpp_scale(slide_mpp: float, model_mpp: float) -> float:
    """Model pixels per level-0 slide pixel: ``slide_mpp / model_mpp``.

    Raises:
        ValueError: when either value is not positive.

    Example:
        >>> mpp_scale(0.5, 0.25)
        2.0
    """
    if not (slide_mpp > 0 and model_mpp > 0):
        raise ValueError(f"mpp_scale: µm/px must be positive, got slide {slide_mpp!r}, model {model_mpp!r}")
    return float(slide_mpp) / float(model_mpp)


def model_image_size(slide_dims: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of the slide resampled to model pixels: ``round(dim * scale)``, at least 1.

    The same rounding as :meth:`cytoken.io.slide.Slide.read_region`.

    Example:
        >>> model_image_size((2220, 2967), 0.499 / 0.25)
        (4431, 5922)
    """
    return max(1, round(slide_dims[0] * scale)), max(1, round(slide_dims[1] * scale))


def slide_to_model_points(points: np.ndarray, scale: float) -> np.ndarray:
    """Map ``(N, 2)`` (x, y) level-0 pixel-index points to model pixels: ``(p + 0.5) * scale - 0.5``.

    Example:
        >>> slide_to_model_points(np.array([[0.0, 1.0]]), 2.0).tolist()
        [[0.5, 2.5]]
    """
    return (np.asarray(points, np.float64) + 0.5) * scale - 0.5


def model_to_slide_points(points: np.ndarray, scale: float) -> np.ndarray:
    """Map ``(N, 2)`` (x, y) model pixel-index points to level-0 pixels: ``(p + 0.5) / scale - 0.5``.

    The inverse of :func:`slide_to_model_points`. (Pixel *edges* map by plain scaling, ``e / scale``; the half
    pixel terms keep pixel centres on pixel centres.)

    Example:
        >>> model_to_slide_points(np.array([[0.5, 2.5]]), 2.0).tolist()
        [[0.0, 1.0]]
    """
    return (np.asarray(points, np.float64) + 0.5) / scale - 0.5


def model_to_slide_bounds(bounds: Bounds, scale: float) -> Bounds:
    """Smallest level-0 integer rectangle covering a model-pixel rectangle (floor the start, ceil the end).

    Example:
        >>> model_to_slide_bounds(Bounds(3, 0, 5, 4), 2.0)
        Bounds(x=1, y=0, width=3, height=2)
    """
    return _scale_bounds(bounds, 1.0 / scale)


def slide_to_model_bounds(bounds: Bounds, scale: float) -> Bounds:
    """Smallest model-pixel integer rectangle covering a level-0 rectangle (floor the start, ceil the end).

    Example:
        >>> slide_to_model_bounds(Bounds(1, 0, 3, 2), 2.0)
        Bounds(x=2, y=0, width=6, height=4)
    """
    return _scale_bounds(bounds, scale)


def _scale_bounds(bounds: Bounds, factor: float) -> Bounds:
    eps = 1e-9
    x0, y0 = math.floor(bounds.x * factor + eps), math.floor(bounds.y * factor + eps)
    x1, y1 = math.ceil(bounds.x1 * factor - eps), math.ceil(bounds.y1 * factor - eps)
    return Bounds(x0, y0, max(1, x1 - x0), max(1, y1 - y0))
