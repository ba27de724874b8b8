"""Plain images (PNG, JPEG, BMP, ...) through Pillow, decoded whole into memory at open."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from cytoken.io.slide.array_backend import as_channels_last
from cytoken.io.slide.base import Slide, SlideOpenError, resolve_mpp

__all__ = ["PILSlide"]

_INCH_UM = 25400.0


class PILSlide(Slide):
    """A single-level image file decoded with Pillow.

    µm/px comes from the file's dpi (PNG pHYs, JPEG JFIF density) when plausible; the usual 72/96-dpi defaults
    count as missing, so most images need ``mpp=``. TIFF files are refused (the OpenSlide and tifffile
    backends read them, with their metadata). 16-bit and other non-8-bit images are read for
    :meth:`read_channels` only. Pillow's decompression-bomb limit applies (about 179 megapixels): convert
    larger images to a tiled TIFF.

    Args:
        path: image file.
        mpp: level-0 µm/px; overrides the file's dpi.

    Raises:
        SlideOpenError: when Pillow cannot decode the file.
        CytokenError: when µm/px is missing or too coarse.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> p = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(p)
        >>> PILSlide(p, mpp=0.5).dimensions
        (30, 20)
    """

    backend: ClassVar[str] = "pil"

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_argument = mpp
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings on files it then fails to decode
                with Image.open(self.path) as img:
                    if img.format == "TIFF":
                        raise SlideOpenError("TIFF files are read by the OpenSlide and tifffile backends")
                    img.load()
                    dpi = img.info.get("dpi")
                    arr = _to_array(img)
        except Image.DecompressionBombError as exc:
            raise SlideOpenError(f"image too large for Pillow ({exc}); convert it to a tiled TIFF") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise SlideOpenError(f"{type(exc).__name__}: {exc}") from exc
        arr, is_rgb = as_channels_last(arr, what=str(self.path))
        self._array = arr
        self._levels = [(arr.shape[1], arr.shape[0])]
        self._downsamples = [1.0]
        self._dtype = arr.dtype
        self._is_rgb = is_rgb
        self._channel_names = ("R", "G", "B") if is_rgb else tuple(f"C{i}" for i in range(arr.shape[2]))
        metadata_mpp = None
        if dpi and float(dpi[0]) > 0:
            metadata_mpp = _INCH_UM / float(dpi[0])
        self._mpp, self.mpp_source = resolve_mpp(metadata_mpp, mpp, what=str(self.path))

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array[y : y + height, x : x + width]


def _to_array(img: Image.Image) -> np.ndarray:
    """Pillow image -> array: RGB(A) for colour/palette/grey 8-bit images, raw values otherwise."""
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img)
    if img.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "L", "1"):
        return np.asarray(img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB"))
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return np.asarray(img)
    raise SlideOpenError(f"unsupported Pillow image mode {img.mode!r}")
