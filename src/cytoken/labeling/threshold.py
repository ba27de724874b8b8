"""Marker thresholding: background subtraction, a global threshold, cleanup, refusal of empty/all-positive masks.

The steps of :func:`threshold_marker`, in order, each optional except the threshold:

1. background subtraction (``background``): ``"gaussian"`` subtracts a Gaussian blur of sigma ``background_radius_px``;
   ``"tophat"`` is a white top-hat with a disk of that radius (image minus its morphological opening);
   ``"rolling_ball"`` subtracts the rolling-ball background of that radius (slow for radii over ~50 px);
2. Gaussian smoothing (``smooth_sigma_px``);
3. the threshold, computed on the valid pixels only: ``"otsu"``, ``"triangle"``, ``"percentile"`` (``value`` in
   [0, 100]) or ``"fixed"`` (``value`` in the units of the background-subtracted signal), raised to ``min_threshold``
   when given; positive = signal > threshold. A data-driven threshold splits whatever it is given into two classes:
   on a field without any positive cell it splits noise, so compute it over a whole slide (or many fields, see
   :func:`marker_signal`) and apply it as ``"fixed"``, or set ``min_threshold``;
4. cleanup: connected positive regions smaller than ``min_object_px`` are removed, then holes smaller than
   ``fill_holes_px`` filled.

A mask with fewer than ``min_positive_px`` positive pixels, or a positive fraction above ``max_positive_fraction``,
raises :class:`~cytoken.types.CytokenError` with the signal statistics, rather than labelling every cell one class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from cytoken.io.atomic import atomic_path
from cytoken.types import CytokenError

__all__ = [
    "MarkerMask",
    "ThresholdConfig",
    "compute_threshold",
    "marker_signal",
    "save_mask_png",
    "save_mask_tiff",
    "subtract_background",
    "threshold_marker",
]

Method = Literal["otsu", "triangle", "percentile", "fixed"]
Background = Literal["none", "gaussian", "tophat", "rolling_ball"]


@dataclass(frozen=True)
class ThresholdConfig:
    """Settings of :func:`threshold_marker` (see the module docstring for the order of the steps).

    Attributes:
        method: ``"otsu"``, ``"triangle"``, ``"percentile"`` or ``"fixed"``.
        value: the percentile (0-100) for ``"percentile"``, the threshold for ``"fixed"``; unused otherwise.
        background: ``"none"``, ``"gaussian"``, ``"tophat"`` or ``"rolling_ball"``.
        background_radius_px: radius (sigma for ``"gaussian"``) of the background filter, in pixels.
        smooth_sigma_px: Gaussian smoothing before thresholding (0 = none).
        min_object_px: positive regions smaller than this are removed (0 = keep all).
        fill_holes_px: holes smaller than this inside positive regions are filled (0 = none).
        min_threshold: a floor for the computed threshold (e.g. from a negative control or a slide-wide threshold),
            so that a field with no positive cell does not have its noise split into two classes; None = no floor.
        min_positive_px: fewer positive pixels than this is refused as an empty mask.
        max_positive_fraction: a larger positive fraction of the valid pixels is refused as all-positive.
    """

    method: Method = "otsu"
    value: float | None = None
    background: Background = "none"
    background_radius_px: float = 50.0
    smooth_sigma_px: float = 0.0
    min_object_px: int = 0
    fill_holes_px: int = 0
    min_threshold: float | None = None
    min_positive_px: int = 1
    max_positive_fraction: float = 0.95

    def __post_init__(self) -> None:
        if self.method not in ("otsu", "triangle", "percentile", "fixed"):
            raise ValueError(
                f"ThresholdConfig.method must be one of otsu, triangle, percentile, fixed; got {self.method!r}"
            )
        if self.method == "percentile" and (self.value is None or not 0 <= self.value <= 100):
            raise ValueError(f"ThresholdConfig: method 'percentile' needs value in [0, 100], got {self.value!r}")
        if self.method == "fixed" and (self.value is None or not np.isfinite(self.value)):
            raise ValueError(f"ThresholdConfig: method 'fixed' needs a finite value, got {self.value!r}")
        if self.background not in ("none", "gaussian", "tophat", "rolling_ball"):
            raise ValueError(
                "ThresholdConfig.background must be one of none, gaussian, tophat, rolling_ball; "
                f"got {self.background!r}"
            )
        if self.background != "none" and not self.background_radius_px > 0:
            raise ValueError(f"ThresholdConfig.background_radius_px must be > 0, got {self.background_radius_px}")
        if self.smooth_sigma_px < 0 or self.min_object_px < 0 or self.fill_holes_px < 0:
            raise ValueError("ThresholdConfig: smooth_sigma_px, min_object_px and fill_holes_px must be >= 0")
        if not 0 < self.max_positive_fraction <= 1:
            raise ValueError(
                f"ThresholdConfig.max_positive_fraction must be in (0, 1], got {self.max_positive_fraction}"
            )


@dataclass(frozen=True)
class MarkerMask:
    """A thresholded marker.

    Attributes:
        mask: (H, W) bool, True = marker-positive (always False outside the valid pixels).
        threshold: the threshold applied to ``signal``.
        signal: (H, W) float32 background-subtracted, smoothed signal the threshold was applied to.
        stats: signal statistics over the valid pixels, the threshold and the positive fraction.
    """

    mask: np.ndarray
    threshold: float
    signal: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def positive_fraction(self) -> float:
        """Fraction of valid pixels that are positive."""
        return float(self.stats.get("positive_fraction", float(self.mask.mean())))


def subtract_background(image: np.ndarray, method: Background, radius_px: float) -> np.ndarray:
    """Remove a smooth background from a fluorescence image (result clipped at 0).

    Example:
        >>> img = np.full((32, 32), 10.0); img[10:13, 10:13] = 50
        >>> out = subtract_background(img, "tophat", 5)
        >>> float(out[0, 0]), float(out[11, 11])
        (0.0, 40.0)
    """
    img = np.asarray(image, np.float32)
    if method == "none":
        return img.copy()
    if method == "gaussian":
        bg = ndi.gaussian_filter(img, radius_px)
    elif method == "tophat":
        import cv2

        r = max(1, round(radius_px))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        bg = cv2.morphologyEx(img, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    elif method == "rolling_ball":
        from skimage.restoration import rolling_ball

        bg = rolling_ball(img, radius=float(radius_px)).astype(np.float32)
    else:
        raise ValueError(f"background method must be none, gaussian, tophat or rolling_ball; got {method!r}")
    return np.clip(img - bg, 0, None)


def marker_signal(
    image: np.ndarray, config: ThresholdConfig | None = None, *, valid: np.ndarray | None = None
) -> np.ndarray:
    """The signal :func:`threshold_marker` thresholds: background-subtracted and smoothed (steps 1-2).

    Pixels outside ``valid`` are set to the median of the valid ones before filtering. Use it to pool the signal of
    many fields and compute one threshold for all of them (then ``ThresholdConfig(method="fixed", value=...)``).

    Example:
        >>> img = np.zeros((8, 8)); img[2:4, 2:4] = 5
        >>> float(marker_signal(img).max())
        5.0
    """
    cfg = config or ThresholdConfig()
    img = np.asarray(image, np.float32)
    ok = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    fill = float(np.median(img[ok])) if ok.any() else 0.0
    work = np.where(ok, img, fill).astype(np.float32)
    work = subtract_background(work, cfg.background, cfg.background_radius_px)
    if cfg.smooth_sigma_px > 0:
        work = ndi.gaussian_filter(work, cfg.smooth_sigma_px)
    return work


def compute_threshold(values: np.ndarray, config: ThresholdConfig | None = None) -> float:
    """The threshold of ``config.method`` over a set of signal values (raised to ``config.min_threshold``).

    Raises:
        CytokenError: no finite values, or constant values with a data-driven method.

    Example:
        >>> compute_threshold(np.arange(11.0), ThresholdConfig(method="percentile", value=50))
        5.0
    """
    cfg = config or ThresholdConfig()
    vals = np.asarray(values, np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if cfg.method == "fixed":
        thr = float(cfg.value)  # type: ignore[arg-type]
    else:
        if vals.size == 0 or np.ptp(vals) == 0:
            raise CytokenError(f"marker signal is empty or constant, nothing to threshold ({_fmt(_stats(vals))})")
        if cfg.method == "otsu":
            from skimage.filters import threshold_otsu

            thr = float(threshold_otsu(vals))
        elif cfg.method == "triangle":
            from skimage.filters import threshold_triangle

            thr = float(threshold_triangle(vals))
        else:
            thr = float(np.percentile(vals, float(cfg.value)))  # type: ignore[arg-type]
    if cfg.min_threshold is not None:
        thr = max(thr, float(cfg.min_threshold))
    return thr


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n_valid": 0.0}
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    return {
        "n_valid": float(values.size),
        "min": float(values.min()),
        "p1": float(p1),
        "median": float(p50),
        "mean": float(values.mean()),
        "p99": float(p99),
        "max": float(values.max()),
    }


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in stats.items())


def remove_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its connected components (default connectivity) of fewer than ``min_px`` pixels."""
    if min_px <= 0 or not mask.any():
        return mask
    lab, _ = ndi.label(mask)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def threshold_marker(
    image: np.ndarray, config: ThresholdConfig | None = None, *, valid: np.ndarray | None = None
) -> MarkerMask:
    """Threshold one marker channel into a positive mask.

    Args:
        image: (H, W) marker intensities (e.g. one channel of an IF image warped onto the H&E grid).
        config: settings; defaults to ``ThresholdConfig()`` (Otsu, no background subtraction).
        valid: optional (H, W) bool mask of usable pixels (e.g. the IF overlap); others are never positive and do
            not enter the threshold.

    Returns:
        The mask, the threshold and the statistics.

    Raises:
        CytokenError: no valid pixels, a constant signal, an empty mask or an all-positive mask (with statistics).

    Example:
        >>> img = np.zeros((20, 20)); img[5:10, 5:10] = 1.0
        >>> m = threshold_marker(img)
        >>> int(m.mask.sum()), bool(0 <= m.threshold < 1)
        (25, True)
    """
    cfg = config or ThresholdConfig()
    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise ValueError(f"threshold_marker expects a 2-D image, got shape {img.shape}")
    ok = np.isfinite(img)
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != img.shape:
            raise ValueError(f"threshold_marker: valid mask shape {valid.shape} differs from image {img.shape}")
        ok &= valid
    if not ok.any():
        raise CytokenError("threshold_marker: no valid pixels (the IF image does not overlap the H&E grid)")
    work = marker_signal(img, cfg, valid=ok)
    vals = work[ok]
    stats = _stats(vals)
    thr = compute_threshold(vals, cfg)
    mask = (work > thr) & ok
    mask = remove_small_components(mask, cfg.min_object_px)
    if cfg.fill_holes_px > 0:
        mask = (~remove_small_components(~mask, cfg.fill_holes_px)) & ok
    n_pos = int(mask.sum())
    frac = n_pos / vals.size
    stats.update(threshold=thr, positive_px=float(n_pos), positive_fraction=float(frac))
    if n_pos < cfg.min_positive_px:
        raise CytokenError(
            f"marker mask is empty ({n_pos} positive px < min_positive_px={cfg.min_positive_px}) with method "
            f"{cfg.method!r}: {_fmt(stats)}"
        )
    if frac > cfg.max_positive_fraction:
        raise CytokenError(
            f"marker mask is (almost) all positive ({frac:.1%} > max_positive_fraction={cfg.max_positive_fraction}) "
            f"with method {cfg.method!r}: {_fmt(stats)}"
        )
    return MarkerMask(mask=mask, threshold=thr, signal=work, stats=stats)


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Save a boolean mask as an 8-bit PNG (0 / 255), written to a temporary file and renamed (atomic).

    Example:
        >>> p = save_mask_png(np.eye(4, dtype=bool), "/tmp/_cytoken_mask.png")
        >>> from PIL import Image; np.asarray(Image.open(p)).max()
        np.uint8(255)
    """
    from PIL import Image

    path = Path(path)
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"save_mask_png expects a 2-D mask, got shape {arr.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(arr.astype(bool).view(np.uint8) * np.uint8(255)).save(tmp, format="PNG")
    return path


def save_mask_tiff(
    tiles: Iterable[np.ndarray], shape: tuple[int, int], tile: tuple[int, int], path: str | Path
) -> Path:
    """Write a boolean mask given tile by tile as a tiled, zlib-compressed 8-bit TIFF (0 / 255), atomically.

    Only one tile is held at a time, so a slide-sized mask never is.

    Args:
        tiles: the (h, w) bool tiles of a ``tile`` grid over ``shape``, row by row (edge tiles smaller).
        shape: (H, W) of the mask.
        tile: (rows, columns) of the TIFF tiles, multiples of 16.
        path: the file.

    Raises:
        ValueError: a tile size that is not a positive multiple of 16.

    Example:
        >>> m = np.eye(40, dtype=bool)
        >>> p = save_mask_tiff((m[y:y + 32, x:x + 32] for y in (0, 32) for x in (0, 32)), (40, 40), (32, 32),
        ...                    "/tmp/_cytoken_mask.tif")
        >>> import tifffile; bool((tifffile.imread(p) > 0).sum() == 40)
        True
    """
    import tifffile

    if any(t < 16 or t % 16 for t in tile):
        raise ValueError(f"save_mask_tiff: TIFF tiles must be positive multiples of 16, got {tile}")
    path = Path(path)
    frames = (np.asarray(t, bool).view(np.uint8) * np.uint8(255) for t in tiles)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tw:
        tw.write(frames, shape=tuple(shape), dtype=np.uint8, tile=tuple(tile), compression="zlib",
                 photometric="minisblack")  # fmt: skip
    return path
