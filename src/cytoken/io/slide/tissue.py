"""Where to look on a slide: tissue detection, user tissue masks (``--tissue-mask``) and ROIs (``--roi``).

Every mask here covers the whole slide at its own, usually coarse, resolution: mask pixel ``(i, j)`` covers
level-0 ``[i * W / w, (i + 1) * W / w) x [j * H / h, (j + 1) * H / h)`` for a ``w x h`` mask on a ``W x H``
slide. :meth:`cytoken.io.tiling.TileGrid.tiles` takes such masks directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from cytoken.types import Bounds, CytokenError

__all__ = ["detect_tissue", "load_tissue_mask", "parse_roi", "tissue_fraction"]

_ASPECT_TOLERANCE = 0.02
_UNIFORM_SPREAD = 12  # saturation range (2nd to 98th percentile) below which a thumbnail counts as uniform


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    *,
    min_saturation: int = 15,
    max_threshold: int = 30,
    closing_fraction: float = 0.01,
    min_object_fraction: float = 0.0005,
) -> np.ndarray:
    """Tissue mask of a thumbnail: Otsu on HSV saturation, then closing, hole filling, small-object removal.

    Stained tissue is coloured while glass, white background and black borders are not, so the threshold on
    saturation (0..255) is Otsu's, clamped to ``[min_saturation, max_threshold]``: the floor keeps an empty
    white slide empty (Otsu would split its noise), the ceiling keeps pale tissue when the thumbnail is almost
    all tissue (Otsu would then split haematoxylin from eosin). A thumbnail of nearly uniform saturation
    (blank or tinted glass, or tissue everywhere) is all background when its median saturation is at most
    ``max_threshold``, else all tissue.

    Args:
        thumbnail_rgb: ``(H, W, 3)`` uint8 RGB thumbnail (e.g. from ``Slide.thumbnail()``; 1-4 k px per side
            is plenty).
        min_saturation: lowest saturation threshold.
        max_threshold: highest saturation threshold.
        closing_fraction: radius of the morphological closing as a fraction of the longer side.
        min_object_fraction: connected tissue pieces smaller than this fraction of the thumbnail's area are
            dropped (dust, debris).

    Returns:
        ``(H, W)`` bool mask, True on tissue.

    Raises:
        ValueError: when the thumbnail is not an ``(H, W, 3)`` uint8 array.

    Example:
        >>> img = np.full((100, 100, 3), 250, np.uint8)
        >>> img[30:70, 30:70] = (180, 80, 160)  # a pink square of "tissue"
        >>> mask = detect_tissue(img)
        >>> bool(mask[50, 50]), bool(mask[5, 5])
        (True, False)
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(
            f"detect_tissue: expected an (H, W, 3) uint8 RGB image, got shape {rgb.shape} {rgb.dtype}"
        )
    h, w = rgb.shape[:2]
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]
    if min(h, w) >= 5:
        sat = cv2.medianBlur(sat, 5)
    low, median, high = np.percentile(sat, [2, 50, 98])
    if high - low < _UNIFORM_SPREAD:
        # one uniform colour (blank glass, possibly tinted, or a field filled with tissue): Otsu has nothing
        # to split, so decide on the level alone
        return np.full((h, w), bool(median > max_threshold))
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(np.clip(otsu, min_saturation, max_threshold))
    mask = sat > threshold
    radius = round(closing_fraction * max(h, w))
    if radius >= 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        # pad so the closing does not erode tissue that touches the image border
        padded = cv2.copyMakeBorder(
            mask.astype(np.uint8), radius, radius, radius, radius, cv2.BORDER_REPLICATE
        )
        mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[radius:-radius, radius:-radius].astype(bool)
    mask = ndi.binary_fill_holes(mask)
    min_size = min_object_fraction * h * w
    if min_size >= 1:
        labels, n = ndi.label(mask)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_size
            keep[0] = False
            mask = keep[labels]
    return mask


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of mask pixels that are tissue.

    Example:
        >>> tissue_fraction(np.array([[True, False], [False, False]]))
        0.25
    """
    m = np.asarray(mask, bool)
    return float(m.mean()) if m.size else 0.0


def load_tissue_mask(path: str | Path, slide_dims: tuple[int, int]) -> np.ndarray:
    """Read a ``--tissue-mask`` image: any binary image covering the whole slide, at any resolution.

    Non-zero pixels are tissue (for greyscale or colour images with values above 1, pixels brighter than half
    the maximum). The mask keeps its own resolution: it is mapped onto the slide by scaling (see the module
    docstring); its aspect ratio must match the slide's within 2%.

    Args:
        path: image file readable by Pillow (PNG, TIFF, JPEG, ...).
        slide_dims: level-0 ``(width, height)`` of the slide.

    Returns:
        ``(h, w)`` bool mask.

    Raises:
        CytokenError: when the file cannot be read, is empty, has no tissue, or its aspect ratio does not
            match the slide.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> p = Path(tempfile.mkdtemp()) / "mask.png"
        >>> Image.fromarray(np.eye(4, 8, dtype=np.uint8) * 255).save(p)
        >>> load_tissue_mask(p, (2000, 1000)).shape
        (4, 8)
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L") if img.mode not in ("1", "L", "I;16", "I", "F") else img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CytokenError(f"--tissue-mask {path}: cannot read the image ({exc})") from exc
    if arr.ndim != 2 or 0 in arr.shape:
        raise CytokenError(f"--tissue-mask {path}: expected a 2-D image, got shape {arr.shape}")
    peak = float(arr.max())
    mask = arr > (peak / 2 if peak > 1 else 0)
    if not mask.any():
        raise CytokenError(f"--tissue-mask {path}: the mask has no tissue (all pixels are zero)")
    sw, sh = slide_dims
    if sw <= 0 or sh <= 0:
        raise ValueError(f"load_tissue_mask: slide_dims must be positive, got {slide_dims}")
    mh, mw = mask.shape
    ratio_mask, ratio_slide = mw / mh, sw / sh
    # a rounding of one mask pixel on either side is always allowed
    slack = max(_ASPECT_TOLERANCE, 1.0 / mh + 1.0 / mw)
    if abs(ratio_mask / ratio_slide - 1) > slack:
        raise CytokenError(
            f"--tissue-mask {path}: a {mw}x{mh} mask does not have the aspect ratio of the {sw}x{sh} slide "
            "(the mask must cover the whole slide, at any resolution)"
        )
    return mask


_ROI = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")


def parse_roi(text: str, slide_dims: tuple[int, int] | None = None) -> Bounds:
    """Parse ``--roi x,y,w,h`` (level-0 pixels) into :class:`~cytoken.types.Bounds`.

    Args:
        text: four integers separated by commas: left, top, width, height.
        slide_dims: level-0 ``(width, height)``; when given, the ROI must overlap the slide and is clipped to
            it.

    Returns:
        The region.

    Raises:
        CytokenError: on a malformed value, a negative origin, a non-positive size, or an ROI outside the
            slide.

    Example:
        >>> parse_roi("100, 200, 512, 512")
        Bounds(x=100, y=200, width=512, height=512)
        >>> parse_roi("0,0,5000,5000", slide_dims=(2220, 2967))
        Bounds(x=0, y=0, width=2220, height=2967)
    """
    found = _ROI.match(text or "")
    if not found:
        raise CytokenError(
            f"--roi {text!r}: expected four integers x,y,w,h in level-0 pixels "
            "(e.g. --roi 1000,2000,4096,4096)"
        )
    x, y, w, h = (int(v) for v in found.groups())
    if x < 0 or y < 0:
        raise CytokenError(f"--roi {text!r}: x and y must be >= 0")
    if w <= 0 or h <= 0:
        raise CytokenError(f"--roi {text!r}: width and height must be > 0")
    roi = Bounds(x, y, w, h)
    if slide_dims is not None:
        sw, sh = slide_dims
        if x >= sw or y >= sh:
            raise CytokenError(f"--roi {text!r}: starts outside the {sw}x{sh} slide")
        roi = Bounds(x, y, min(w, sw - x), min(h, sh - y))
    return roi
