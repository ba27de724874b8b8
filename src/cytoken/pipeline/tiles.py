"""Tile-level work that runs in worker processes (torch-free): decoding tiles, cutting multi-channel inputs.

:func:`decode_tile` turns one tile's model maps into the cells that tile owns; :class:`ChannelPlan` cuts and
scales the (C, tile, tile) windows of a multi-channel model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cytoken.embeddings import bbox_mean_embeddings, mask_weighted_embeddings
from cytoken.io.ifimage import to_unit
from cytoken.io.slide import Slide
from cytoken.io.tiling import Tile, TileGrid, model_image_size, mpp_scale
from cytoken.postprocess.hover import HoverConfig, decode_hover
from cytoken.types import Bounds, CellSet

__all__ = ["RGB_CHANNEL_NAMES", "ChannelPlan", "DecodeSpec", "TileCells", "decode_tile"]

#: Channel names that mean "a colour channel of a brightfield (H&E) image": windows are padded white there.
RGB_CHANNEL_NAMES = frozenset({"r", "g", "b", "red", "green", "blue"})


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


@dataclass(frozen=True)
class ChannelPlan:
    """How the input windows of a C-channel model are cut from a multi-channel image (picklable, torch-free).

    Raw intensities are scaled per channel to [0, 1] by ``(x - low) / (high - low)`` (:func:`cytoken.io.ifimage.
    to_unit`, clipped for the ``percentile`` rule); the model's own per-channel mean/std are applied afterwards by
    ``model.preprocess``. Pixels outside the image get ``pad`` (1 = white for R/G/B channels, 0 = no signal for
    fluorescence channels).

    Attributes:
        names: the model's channel names, in the model's order.
        sources: the image channel feeding each model channel.
        indices: position of that channel in the image (or slide) the plan was made for.
        low: per-channel intensity mapped to 0.
        high: per-channel intensity mapped to 1.
        intensity: the scaling rule, ``dtype`` or ``percentile``.
        pad: per-channel value in [0, 1] outside the image.
    """

    names: tuple[str, ...]
    sources: tuple[str, ...]
    indices: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    intensity: str = "dtype"
    pad: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.sources) == len(self.indices) == len(self.low) == len(self.high) == n):
            raise ValueError(f"ChannelPlan: {n} names but sources/indices/low/high of other lengths")
        if not self.pad:
            pad = tuple(1.0 if c.lower() in RGB_CHANNEL_NAMES else 0.0 for c in self.names)
            object.__setattr__(self, "pad", pad)

    @property
    def channels(self) -> int:
        """Number of model channels C."""
        return len(self.names)

    def to_unit(self, window: np.ndarray) -> np.ndarray:
        """(h, w, C) raw window in model channel order → (C, h, w) float32 in [0, 1] (for ``percentile``)."""
        unit = to_unit(window, np.asarray(self.low), np.asarray(self.high), clip=self.intensity == "percentile",
                       axis=-1)  # fmt: skip
        return np.ascontiguousarray(np.moveaxis(unit, -1, 0))

    def window(self, image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
        """The (C, size, size) float32 model input at (x, y) of an (H, W, C) raw image, padded outside it."""
        h, w = image.shape[:2]
        win = self.to_unit(image[max(0, y) : min(h, y + size), max(0, x) : min(w, x + size)])
        if win.shape[1:] == (size, size):
            return win
        out = np.empty((self.channels, size, size), np.float32)
        out[:] = np.asarray(self.pad, np.float32)[:, None, None]
        out[:, : win.shape[1], : win.shape[2]] = win
        return out

    def read_slide_tile(self, slide: Slide, bounds: Bounds, mpp: float) -> np.ndarray:
        """A (C, h, w) float32 window of a multi-channel slide, as if the slide were resampled to ``mpp`` µm/px.

        ``bounds`` is in pixels of that resampled image (the geometry of :meth:`cytoken.io.slide.Slide.
        read_scaled`); pixels whose centre lies outside the slide get ``pad``.
        """
        s_mpp = float(slide.mpp)
        raw = slide.read_scaled_channels(bounds, mpp)
        win = self.to_unit(raw[..., list(self.indices)])
        full_w, full_h = model_image_size(slide.dimensions, mpp_scale(s_mpp, mpp))
        out_x = (bounds.x + np.arange(bounds.width)) >= full_w
        out_y = (bounds.y + np.arange(bounds.height)) >= full_h
        if out_x.any() or out_y.any() or bounds.x < 0 or bounds.y < 0:
            outside = out_y[:, None] | out_x[None, :]
            outside |= ((bounds.y + np.arange(bounds.height)) < 0)[:, None]
            outside |= ((bounds.x + np.arange(bounds.width)) < 0)[None, :]
            pad = np.asarray(self.pad, np.float32)[:, None]
            win[:, outside] = pad
        return win

    def describe(self) -> dict:
        """JSON-able summary for ``run.json``: model channel → image channel, scaling rule and ranges."""
        return {
            "map": dict(zip(self.names, self.sources)),
            "intensity": self.intensity,
            "low": [float(v) for v in self.low],
            "high": [float(v) for v in self.high],
        }
