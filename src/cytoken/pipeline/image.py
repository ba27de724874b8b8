"""Segmenting in-memory images: resample to the model's µm/px, sliding window, keep each cell once, map back."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np

from cytoken.io.tiling import TileGrid
from cytoken.models.segmenter import CellSegmenter
from cytoken.pipeline.predictor import Predictor
from cytoken.pipeline.tiles import DecodeSpec, decode_tile
from cytoken.postprocess.hover import HoverConfig
from cytoken.types import CellSet, CytokenError, validate_mpp

__all__ = ["SegmentConfig", "segment_image", "segment_image_with_labels", "to_model_resolution"]

MIN_SIDE = 32
MPP_TOLERANCE = 0.05  # relative µm/px difference below which no resampling is done


@dataclass(frozen=True)
class SegmentConfig:
    """Options of :func:`segment_image` (and of the slide pipeline).

    Attributes:
        batch_size: tiles per forward pass.
        tile_size: window size in model pixels (default: the model's, usually 256).
        overlap: window overlap in model pixels (default: the model's; must exceed the largest nucleus diameter).
        device: ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
        amp: mixed-precision inference.
        embeddings: per-cell embeddings: ``mask`` (default), ``bbox`` (CellViT++ parity) or ``none``.
        hover: post-processing parameters (default :class:`HoverConfig`).
    """

    batch_size: int = 8
    tile_size: int | None = None
    overlap: int | None = None
    device: str = "cpu"
    amp: bool = False
    embeddings: Literal["mask", "bbox", "none"] = "mask"
    hover: HoverConfig | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CytokenError(f"batch size must be >= 1, got {self.batch_size}")
        if self.tile_size is not None and self.tile_size < MIN_SIDE:
            raise CytokenError(f"tile size must be >= {MIN_SIDE}, got {self.tile_size}")


def to_model_resolution(image: np.ndarray, mpp: float, model_mpp: float) -> tuple[np.ndarray, float]:
    """Resample an image to the model's µm/px; returns the image and the scale (model px per input px)."""
    scale = mpp / model_mpp
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        return image, 1.0
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
    return cv2.resize(image, size, interpolation=interp), scale


def _window(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """A ``size``² window at (x, y), padded with white where it leaves the image."""
    h, w = image.shape[:2]
    win = image[max(0, y) : min(h, y + size), max(0, x) : min(w, x + size)]
    if win.shape[:2] == (size, size):
        return win
    out = np.full((size, size, 3), 255, np.uint8)
    out[: win.shape[0], : win.shape[1]] = win
    return out


def decode_spec(model: CellSegmenter, config: SegmentConfig) -> DecodeSpec:
    """The :class:`DecodeSpec` for a model and options."""
    mc = model.config  # type: ignore[attr-defined]
    colors = tuple(tuple(c) for c in mc.class_colors) if mc.class_colors else ()
    return DecodeSpec(
        mpp=mc.mpp,
        patch_size=model.patch_size,
        class_names=mc.names if mc.num_classes else (),
        class_colors=colors,  # type: ignore[arg-type]
        hover=config.hover,
        embeddings=config.embeddings,
    )


def segment_image(
    image: np.ndarray,
    model: CellSegmenter | Predictor,
    mpp: float,
    *,
    config: SegmentConfig | None = None,
    progress: bool = False,
) -> CellSet:
    """Find, outline and classify every nucleus of an RGB image (see :func:`segment_image_with_labels`).

    Example:
        >>> from cytoken.models import build_segmenter, SegmenterConfig
        >>> m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test"))
        >>> cells = segment_image(np.full((64, 64, 3), 255, np.uint8), m, mpp=0.25)
        >>> len(cells) >= 0
        True
    """
    return _segment(image, model, mpp, config or SegmentConfig(), progress, with_labels=False)[0]


def segment_image_with_labels(
    image: np.ndarray,
    model: CellSegmenter | Predictor,
    mpp: float,
    *,
    config: SegmentConfig | None = None,
    progress: bool = False,
) -> tuple[CellSet, np.ndarray]:
    """Like :func:`segment_image`, also returning the (H, W) int32 instance map of the kept cells.

    The map is assembled at the model's µm/px from each tile's owned cells (ids = the CellSet's ids) and resized
    back to the input by nearest neighbour; it is what ``cytoken evaluate`` scores.
    """
    cells, labels = _segment(image, model, mpp, config or SegmentConfig(), progress, with_labels=True)
    if labels is None:  # pragma: no cover - with_labels=True always assembles a map
        raise RuntimeError("label map was not assembled")
    return cells, labels


def _segment(
    image: np.ndarray,
    model: CellSegmenter | Predictor,
    mpp: float,
    config: SegmentConfig,
    progress: bool,
    *,
    with_labels: bool,
) -> tuple[CellSet, np.ndarray | None]:
    """Shared implementation (``with_labels`` also assembles the instance map).

    The image is resampled to the model's µm/px, cut into overlapping windows (batched through the model), each
    window is decoded, and a cell is kept only from the window whose core holds its centroid. Coordinates are
    mapped back to the input image's pixels.

    Args:
        image: (H, W, 3) uint8 RGB.
        model: a segmenter (or a :class:`Predictor` wrapping one).
        mpp: µm/px of ``image``.
        config: options (:class:`SegmentConfig`).
        progress: show a progress bar over windows.
        with_labels: also assemble the instance map of the kept cells.

    Returns:
        A :class:`~cytoken.types.CellSet` in input pixel coordinates (``mpp`` = the input's), with embeddings, and
        the instance map when ``with_labels``.
    """
    mpp = validate_mpp(mpp, source="mpp")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CytokenError(f"segment_image expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise CytokenError(f"image of {image.shape[1]}x{image.shape[0]} px is too small (minimum {MIN_SIDE} px)")
    predictor = model if isinstance(model, Predictor) else Predictor(model, config.device, amp=config.amp)
    seg = predictor.model
    mc = seg.config  # type: ignore[attr-defined]
    work, scale = to_model_resolution(image, mpp, mc.mpp)
    tile = config.tile_size or mc.tile_size
    overlap = mc.overlap if config.overlap is None else config.overlap
    if overlap >= tile:
        raise CytokenError(f"overlap {overlap} must be smaller than the tile size {tile}")
    h, w = work.shape[:2]
    grid = TileGrid((w, h), tile, overlap)
    spec = decode_spec(seg, config)
    tiles = list(grid.tiles())
    parts: list[CellSet] = []
    labels = np.zeros((h, w), np.int32) if with_labels else None
    next_id = 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="windows", unit="tile", leave=False)
    for i in range(0, len(tiles), config.batch_size):
        chunk = tiles[i : i + config.batch_size]
        batch = np.stack([_window(work, t.bounds.x, t.bounds.y, tile) for t in chunk])
        for t, out in zip(chunk, predictor(batch)):
            tc = decode_tile(out.nuclei_prob, out.hv, out.type_prob, out.tokens, t, grid, spec,
                             with_labels=with_labels)  # fmt: skip
            if labels is not None and tc.inst_map is not None and len(tc.cells):
                lut = np.zeros(int(tc.inst_map.max()) + 1, np.int32)
                lut[tc.cells.ids] = np.arange(next_id, next_id + len(tc.cells), dtype=np.int32)
                x0, y0 = t.bounds.x, t.bounds.y
                sub = tc.inst_map[: h - y0, : w - x0]
                view = labels[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]]
                m = sub > 0
                view[m] = lut[sub[m]]
            next_id += len(tc.cells)
            parts.append(tc.cells)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    cells = CellSet.concat(parts) if parts else CellSet.empty(mc.mpp, spec.class_names, spec.class_colors)
    if scale != 1.0:
        cells = cells.transformed(1.0 / scale, mpp=mpp)
        if labels is not None:
            yi = np.minimum(((np.arange(image.shape[0]) + 0.5) * scale).astype(np.int64), h - 1)
            xi = np.minimum(((np.arange(image.shape[1]) + 0.5) * scale).astype(np.int64), w - 1)
            labels = labels[yi[:, None], xi[None, :]]
    meta = {**cells.meta, "model_mpp": mc.mpp, "scale": scale, "tiles": len(tiles)}
    return replace(cells, meta=meta), labels
