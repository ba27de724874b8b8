"""Map cells from slide coordinates to the model's pixel and token grid when the slide was resampled.

A slide scanned at ``slide_mpp`` is often resized before the model sees it (CellViT++ upsamples 0.5 µm/px
slides by 2 to run its 0.25 µm/px network). If the cells are reported in slide pixels, their tokens are found
by undoing that resize. With a tile read from the slide at ``origin`` (slide pixels, the tile's top-left
corner) and resized by

    ``scale = slide_mpp / model_mpp``   (2.0 for a 0.5 µm/px slide and a 0.25 µm/px model),

a *continuous* slide coordinate ``s`` (pixel ``i`` covers ``[i, i + 1)``) lands at ``(s - origin) * scale`` on
the model grid. Box edges are continuous coordinates, so they map with that formula directly. Centroids in
cytoken are pixel-*index* coordinates (the centre of pixel ``i`` is ``i``), so they map as ``(i + 0.5 -
origin) * scale - 0.5``. Token ``(r, c)`` then holds model pixel rows ``r*p .. r*p+p-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cytoken.types import validate_mpp

__all__ = ["resample_scale", "slide_bboxes_to_model", "slide_points_to_model", "token_positions"]


def resample_scale(slide_mpp: float, model_mpp: float) -> float:
    """Factor by which slide pixels were resized to reach the model's µm/px.

    Args:
        slide_mpp: µm/px of the coordinates the cells are given in.
        model_mpp: µm/px of the model's input grid.

    Returns:
        ``slide_mpp / model_mpp`` (> 1 means the slide was upsampled).

    Example:
        >>> resample_scale(0.5, 0.25)
        2.0
    """
    return validate_mpp(slide_mpp, source="slide_mpp") / validate_mpp(model_mpp, source="model_mpp")


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (slide_mpp / model_mpp), got {scale!r}")
    return scale


def slide_points_to_model(
    xy: np.ndarray | Sequence[Sequence[float]], *, scale: float, origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Pixel-index points ``(x, y)`` in slide pixels → pixel-index points on the model grid.

    Args:
        xy: (N, 2) points, ``x`` = column, ``y`` = row, pixel-index convention (centre of pixel i is i).
        scale: ``slide_mpp / model_mpp`` (see :func:`resample_scale`).
        origin: the tile's top-left corner ``(x, y)`` in slide pixels.

    Returns:
        (N, 2) float64 points on the model grid of that tile.

    Example:
        >>> slide_points_to_model([[10.0, 4.0]], scale=2.0, origin=(8, 0))  # slide px 10 -> model px 4, 5
        array([[4.5, 8.5]])
    """
    s = _check_scale(scale)
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return (pts + 0.5 - np.asarray(origin, np.float64)) * s - 0.5


def slide_bboxes_to_model(
    bboxes: np.ndarray | Sequence[Sequence[float]], *, scale: float, origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Boxes ``(x0, y0, x1, y1)`` (exclusive x1/y1) in slide pixels → integer boxes on the model grid.

    Edges map as ``(e - origin) * scale``; the min corner is floored and the max corner ceiled so the box
    still covers every model pixel the cell touches. The result feeds
    :func:`~cytoken.embeddings.bbox_mean_embeddings`.

    Args:
        bboxes: (N, 4) slide-pixel boxes.
        scale: ``slide_mpp / model_mpp``.
        origin: the tile's top-left corner ``(x, y)`` in slide pixels.

    Returns:
        (N, 4) int64 boxes on the model grid.

    Example:
        >>> slide_bboxes_to_model([[10, 4, 13, 7]], scale=2.0, origin=(8, 0))
        array([[ 4,  8, 10, 14]])
    """
    s = _check_scale(scale)
    bb = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    off = np.tile(np.asarray(origin, np.float64), 2)
    m = (bb - off) * s
    # tolerate float noise so exact multiples do not grow by a pixel
    lo = np.floor(m[:, :2] + 1e-9)
    hi = np.ceil(m[:, 2:] - 1e-9)
    return np.concatenate([lo, hi], axis=1).astype(np.int64)


def token_positions(
    xy_model: np.ndarray | Sequence[Sequence[float]],
    patch_size: int,
    grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Token ``(row, col)`` holding each pixel-index point of the model grid.

    Args:
        xy_model: (N, 2) points ``(x, y)`` on the model grid (e.g. from :func:`slide_points_to_model`).
        patch_size: token size in pixels.
        grid_shape: optional ``(h, w)`` token grid; positions are clipped into it when given.

    Returns:
        (N, 2) int64 ``(row, col)``.

    Example:
        >>> token_positions([[4.5, 8.5], [31.4, 0.0], [32.0, 40.0]], 16)
        array([[0, 0],
               [0, 1],
               [2, 2]])
    """
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    pts = np.asarray(xy_model, dtype=np.float64).reshape(-1, 2)
    # the pixel containing a pixel-index point is round(point); its token is pixel // p
    px = np.floor(pts + 0.5).astype(np.int64)
    rc = np.stack([px[:, 1] // int(patch_size), px[:, 0] // int(patch_size)], axis=1)
    if grid_shape is not None:
        rc[:, 0] = np.clip(rc[:, 0], 0, grid_shape[0] - 1)
        rc[:, 1] = np.clip(rc[:, 1], 0, grid_shape[1] - 1)
    return rc
