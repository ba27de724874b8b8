"""Turning one tile's model maps into the cells that tile owns (torch-free, runs in worker processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cytoken.embeddings import bbox_mean_embeddings, mask_weighted_embeddings
from cytoken.io.tiling import Tile, TileGrid
from cytoken.postprocess.hover import HoverConfig, decode_hover
from cytoken.types import CellSet

__all__ = ["DecodeSpec", "TileCells", "decode_tile"]


@dataclass(frozen=True)
class DecodeSpec:
    """How tiles are decoded.

    Attributes:
        mpp: µm/px of the model grid.
        patch_size: token size of the model (for embeddings).
        class_names: names of classes 1..C.
        class_colors: their colours.
        hover: post-processing parameters (default: :class:`HoverConfig` defaults for ``mpp``).
        embeddings: ``mask`` (area-weighted token mean, default), ``bbox`` (CellViT++'s bbox mean) or ``none``.
    """

    mpp: float
    patch_size: int
    class_names: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    hover: HoverConfig | None = None
    embeddings: Literal["mask", "bbox", "none"] = "mask"
    extra: dict = field(default_factory=dict)


@dataclass
class TileCells:
    """The cells a tile owns (grid coordinates) and, optionally, the tile's instance map restricted to them.

    Attributes:
        cells: kept cells; ``cells.ids`` are the tile-local instance ids of ``inst_map``.
        inst_map: (tile, tile) local instance map with only the kept cells (others zeroed), or None.
    """

    cells: CellSet
    inst_map: np.ndarray | None = None


def decode_tile(
    nuclei_prob: np.ndarray,
    hv: np.ndarray,
    type_prob: np.ndarray | None,
    tokens: np.ndarray | None,
    tile: Tile,
    grid: TileGrid,
    spec: DecodeSpec,
    *,
    with_labels: bool = False,
) -> TileCells:
    """Decode a tile and keep the cells it owns, in the grid's pixel coordinates.

    A cell is kept when its centroid lies in the tile's core and it does not touch an edge shared with another
    tile (:meth:`TileGrid.keep`), so every cell of the image is kept exactly once.
    """
    res = decode_hover(
        nuclei_prob, hv, type_prob, spec.mpp, config=spec.hover, class_names=spec.class_names,
        class_colors=spec.class_colors,
    )  # fmt: skip
    cells = res.cells
    # centroid-in-core only: a large nucleus that reaches an internal tile edge is kept (truncated) rather than
    # lost, since no other tile can own it; overlap >= the largest nucleus diameter avoids truncation.
    keep = grid.keep(tile, cells.centroids)
    cells = cells.select(keep)
    if tokens is not None and spec.embeddings != "none" and len(cells):
        if spec.embeddings == "bbox":
            emb = bbox_mean_embeddings(tokens, cells.bboxes, spec.patch_size)
        else:
            emb = mask_weighted_embeddings(tokens, res.inst_map, cells.ids, spec.patch_size)
        cells.embeddings = emb.astype(np.float32)
    elif tokens is not None and spec.embeddings != "none":
        cells.embeddings = np.zeros((0, tokens.shape[0]), np.float32)
    cells.tiles = np.full(len(cells), tile.index, np.int64)
    labels = None
    if with_labels:
        labels = np.where(np.isin(res.inst_map, cells.ids), res.inst_map, 0).astype(np.int32)
    return TileCells(cells.transformed(1.0, tile.bounds.x, tile.bounds.y, mpp=spec.mpp), labels)
