"""Resampling images, label maps, points and whole samples to another µm/px.

Convention: pixel ``i`` covers ``[i, i + 1)`` and its centre is ``i + 0.5`` in continuous coordinates, and
the image corners stay fixed. With a factor ``s = out_size / in_size`` a point ``p`` (0-based pixel
coordinates, centre of pixel 0 at 0.0) maps to ``(p + 0.5) * s - 0.5``. Images use area averaging to shrink
(no aliasing) and bilinear interpolation to enlarge (OpenCV); label maps use nearest neighbour, so ids stay
exact.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from cytoken.types import Sample, validate_mpp

__all__ = ["resample_image", "resample_labels", "resample_points", "resample_sample", "resampled_size"]


def resampled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(height, width) of a (H, W, ...) array resampled by ``scale`` (output pixels per input pixel), >= 1.

    Example:
        >>> resampled_size((1000, 500, 3), 0.5)
        (500, 250)
    """
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _out_size(shape: tuple[int, ...], scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive (height, width), got {size!r}")
        return h, w
    if scale is None:
        raise ValueError("give either scale or size")
    return resampled_size(shape, scale)


def resample_image(
    image: np.ndarray, scale: float | None = None, *, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize an image by ``scale`` or to ``size`` (height, width): area to shrink, bilinear to enlarge.

    Args:
        image: (H, W) or (H, W, C) array (uint8 or float).
        scale: output pixels per input pixel (``source_mpp / target_mpp``).
        size: explicit output (height, width); overrides ``scale``.

    Returns:
        The resized array, same dtype.

    Example:
        >>> resample_image(np.zeros((100, 80, 3), np.uint8), 0.5).shape
        (50, 40, 3)
    """
    h, w = _out_size(image.shape, scale, size)
    if (h, w) == image.shape[:2]:
        return image.copy()
    shrinking = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
    if image.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
        out = out[..., None]
    return out


def resample_labels(
    labels: np.ndarray, scale: float | None = None, *, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize an integer label map by nearest neighbour (pixel-centre aligned; any integer dtype kept).

    Small instances may vanish when shrinking; ids are never mixed.

    Example:
        >>> resample_labels(np.array([[1, 2], [3, 4]], np.int32), 2.0)
        array([[1, 1, 2, 2],
               [1, 1, 2, 2],
               [3, 3, 4, 4],
               [3, 3, 4, 4]], dtype=int32)
    """
    h, w = _out_size(labels.shape, scale, size)
    in_h, in_w = labels.shape[:2]
    rows = np.minimum(((np.arange(h) + 0.5) * (in_h / h)).astype(np.intp), in_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (in_w / w)).astype(np.intp), in_w - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]])


def resample_points(points: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """Map (N, 2) (x, y) pixel coordinates from an image of ``in_shape`` to one of ``out_shape`` (H, W, ...).

    Example:
        >>> resample_points(np.array([[0.0, 0.0], [1.5, 3.5]]), (4, 4), (8, 8))
        array([[0.5, 0.5],
               [3.5, 7.5]])
    """
    p = np.asarray(points, np.float64).reshape(-1, 2)
    sx = out_shape[1] / in_shape[1]
    sy = out_shape[0] / in_shape[0]
    return np.stack([(p[:, 0] + 0.5) * sx - 0.5, (p[:, 1] + 0.5) * sy - 0.5], axis=1)


def resample_sample(sample: Sample, target_mpp: float) -> Sample:
    """A copy of ``sample`` resampled to ``target_mpp``: image, label maps and points together.

    The output size is rounded to whole pixels, so the effective µm/px can differ from ``target_mpp`` by less
    than half a pixel over the image (< 0.1 % for images of 500 px or more); ``mpp`` is set to ``target_mpp``.

    Args:
        sample: a sample with a known ``mpp``.
        target_mpp: the µm/px wanted (e.g. 0.25 for a 40x model).

    Returns:
        A new :class:`~cytoken.types.Sample` (the input is returned unchanged when the µm/px already match
        within 0.1 %).

    Raises:
        ValueError: when the sample has no µm/px or ``target_mpp`` is implausible.

    Example:
        >>> s = Sample(image=np.zeros((100, 100, 3), np.uint8), mpp=0.5, source_id="x",
        ...            points=np.array([[10.0, 20.0]]), point_labels=np.array([1]))
        >>> r = resample_sample(s, 0.25)
        >>> r.image.shape, r.points.tolist(), r.mpp
        ((200, 200, 3), [[20.5, 40.5]], 0.25)
    """
    target = validate_mpp(target_mpp, source="target_mpp")
    if sample.mpp is None:
        raise ValueError(f"{sample.source_id}: sample has no µm/px; cannot resample to {target:g}")
    src = validate_mpp(sample.mpp, source=f"{sample.source_id} mpp")
    if abs(src / target - 1.0) < 1e-3:
        return sample
    scale = src / target
    in_shape = sample.image.shape[:2]
    image = resample_image(sample.image, scale)
    out_shape = image.shape[:2]
    inst = None if sample.inst_map is None else resample_labels(sample.inst_map, size=out_shape)
    types = None if sample.type_map is None else resample_labels(sample.type_map, size=out_shape)
    points = None if sample.points is None else resample_points(sample.points, in_shape, out_shape)
    return replace(sample, image=image, mpp=target, inst_map=inst, type_map=types, points=points)
