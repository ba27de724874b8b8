"""Vendor whole-slide formats through OpenSlide (openslide-python + the openslide-bin wheel, lazy import).

Covers Aperio (.svs), Hamamatsu (.ndpi, .vms, .vmu), MIRAX (.mrxs), Leica (.scn), Ventana (.bif), Philips TIFF
and generic tiled TIFF pyramids. Install with ``pip install cytoken[wsi]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cytoken.io.slide.base import Slide, SlideOpenError, resolve_mpp

__all__ = ["OpenSlideSlide", "openslide_mpp"]

_UNIT_UM = {"inch": 25400.0, "centimeter": 10000.0, "millimeter": 1000.0, "micrometer": 1.0}


def openslide_mpp(properties: Any) -> float | None:
    """Level-0 µm/px from OpenSlide properties: mean of ``openslide.mpp-x``/``-y``, else TIFF resolution tags.

    Args:
        properties: an OpenSlide ``properties`` mapping.

    Returns:
        µm/px or None when the file does not say.

    Example:
        >>> openslide_mpp({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"})
        0.499
        >>> openslide_mpp({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"})
        0.5
    """
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(properties[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            values.append(v)
    if values:
        return float(np.mean(values))
    try:
        res = float(properties["tiff.XResolution"])
        unit = _UNIT_UM[str(properties.get("tiff.ResolutionUnit", "")).lower()]
    except (KeyError, ValueError):
        return None
    return unit / res if res > 0 else None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide.

    Transparent areas (outside the scanned region, e.g. between MIRAX tiles) are composited onto white.
    OpenSlide handles are thread-safe; give each process its own (see :meth:`reopen`).

    Args:
        path: slide file (for MIRAX, the ``.mrxs`` file next to its data folder).
        mpp: level-0 µm/px; overrides ``openslide.mpp-x``/``-y``.

    Raises:
        SlideOpenError: when openslide-python is missing or OpenSlide does not recognise the file.
        CytokenError: when µm/px is missing or too coarse.

    Example:
        >>> s = OpenSlideSlide("CMU-1-Small-Region.svs")  # doctest: +SKIP
        >>> s.dimensions, s.mpp  # doctest: +SKIP
        ((2220, 2967), 0.499)
    """

    backend: ClassVar[str] = "openslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        try:
            import openslide
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SlideOpenError(
                f"openslide-python is not installed ({exc}); pip install 'cytoken[wsi]'"
            ) from exc
        self.path = Path(path)
        self._mpp_argument = mpp
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideOpenError(f"format not recognised by OpenSlide ({exc or 'unsupported'})") from exc
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideOpenError(f"{type(exc).__name__}: {exc}") from exc
        try:
            props = self._osr.properties
            self.vendor = props.get("openslide.vendor", "")
            self._levels = [(int(w), int(h)) for w, h in self._osr.level_dimensions]
            self._downsamples = [float(d) for d in self._osr.level_downsamples]
            self._mpp, self.mpp_source = resolve_mpp(openslide_mpp(props), mpp, what=str(self.path))
        except BaseException:
            self._osr.close()
            raise
        self._channel_names = ("R", "G", "B")
        self._dtype = np.dtype(np.uint8)
        self._is_rgb = True

    @property
    def properties(self) -> dict[str, str]:
        """All OpenSlide properties of the file (vendor metadata)."""
        return dict(self._osr.properties)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._downsamples[level]
        # OpenSlide takes the location in level-0 pixels and divides it by the level's downsample, resampling
        # when that is fractional: rounding keeps the shift within a quarter of a level pixel (for ds ~ 2)
        loc = (round(x * ds), round(y * ds))
        rgba = np.asarray(self._osr.read_region(loc, level, (width, height)))
        alpha = rgba[:, :, 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3])
        a = alpha.astype(np.float32) / 255.0
        return np.rint(rgba[:, :, :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)

    def _close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
