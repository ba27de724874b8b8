"""Read a single image (PNG, JPEG, TIFF) as 8-bit RGB together with its µm/px.

This is the reader of RGB models; multi-channel (fluorescence) files are read by :mod:`cytoken.io.ifimage`.

Conversions (each one announced with a :class:`CytokenWarning` through :func:`warnings.warn`, never silently):

- grayscale (1 channel, or gray + alpha) is replicated to RGB;
- 16-bit samples are reduced to 8 bits over the full range (``round(v / 257)``, so 65535 -> 255); data that
  use fewer bits (e.g. 12-bit, max 4095) will look dark and should be rescaled by the caller;
- float samples in [0, 1] are scaled by 255;
- an alpha channel is composited on white (``rgb * a + 255 * (1 - a)``), or dropped when every pixel is opaque;
  either way the warning says which.

µm/px comes from, in order: the ``mpp`` argument; for TIFF files the Aperio ``MPP =`` description, the OME-XML
``PhysicalSizeX`` or the XResolution/YResolution tags with ResolutionUnit centimetre or inch. File values
outside [0.05, 5] µm/px (e.g. the common 72 dpi default) or with x and y disagreeing by more than 5 % are
ignored as implausible. **When the argument and the file disagree, the argument wins** (with a warning).
Without either, :func:`read_image` raises a :class:`~cytoken.types.CytokenError` that says how to pass it.

Every failure (missing file, not an image, truncated or corrupt data, image smaller than 32 px, unsupported
channel layout) is a :class:`~cytoken.types.CytokenError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cytoken.types import CytokenError, validate_mpp

__all__ = [
    "MIN_IMAGE_SIDE",
    "CytokenWarning",
    "ImageSize",
    "LoadedImage",
    "read_image",
    "read_image_size",
]

MIN_IMAGE_SIDE = 32
_MAX_PIXELS_DEFAULT = 178_956_970  # Pillow's decompression-bomb error threshold (2 * MAX_IMAGE_PIXELS)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_MPP_HINT = "pass it explicitly, e.g. --mpp 0.25 for a 40x scan or --mpp 0.5 for a 20x scan"
_MPP_AGREE = 0.05  # relative tolerance between x and y resolution, and between argument and file


class CytokenWarning(UserWarning):
    """Something was converted or guessed for the user (grayscale to RGB, 16 to 8 bits, µm/px override)."""


@dataclass(frozen=True)
class LoadedImage:
    """An image read by :func:`read_image`.

    Attributes:
        array: (H, W, 3) uint8 RGB pixels.
        mpp: µm/px, or None when ``require_mpp=False`` and the file did not say.
        mpp_source: where ``mpp`` came from: ``"argument"``, ``"tiff-aperio"``, ``"tiff-ome"``,
            ``"tiff-resolution"`` or ``"none"``.
        path: the file that was read.
    """

    array: np.ndarray
    mpp: float | None
    mpp_source: str
    path: Path

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.array.shape[1])


class ImageSize(NamedTuple):
    """Width and height of an image in pixels."""

    width: int
    height: int


def _warn(message: str) -> None:
    warnings.warn(message, CytokenWarning, stacklevel=4)


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise CytokenError(f"image file not found: {p}")
    if p.is_dir():
        raise CytokenError(f"{p} is a directory, not an image file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CytokenError(f"cannot read {p}: {exc.strerror or exc}") from None
    if not head:
        raise CytokenError(f"{p} is empty (0 bytes), not an image")
    return p


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _max_pixels() -> int:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return _MAX_PIXELS_DEFAULT if limit is None else 2 * int(limit)


def _too_large(path: Path, width: int, height: int) -> CytokenError:
    size = f"{width}x{height} px" if width and height else f"over {_max_pixels():,} px"
    return CytokenError(
        f"{path} is {size}, too large to read as a single image; segment it as a whole slide, streamed tile by "
        "tile, with `cytoken segment --slide` (open_slide() in Python)"
    )


# ---------------------------------------------------------------------------------------------------- µm/px
def _plausible(value: float) -> bool:
    try:
        validate_mpp(value)
    except ValueError:
        return False
    return True


def _tiff_mpp(tf: Any) -> tuple[float | None, str, str]:
    """(mpp, source, note) from a tifffile.TiffFile; note explains an implausible value for error messages."""
    page = tf.pages[0]
    notes = []
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", desc)
    if m:
        value = float(m.group(1))
        if _plausible(value):
            return value, "tiff-aperio", ""
        notes.append(f"Aperio MPP = {value:g} is implausible")
    if getattr(tf, "is_ome", False):
        xml = tf.ome_metadata or ""
        mx = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
        if mx:
            unit_m = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
            unit = unit_m.group(1) if unit_m else "µm"
            scale = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
            if scale is not None:
                value = float(mx.group(1)) * scale
                if _plausible(value):
                    return value, "tiff-ome", ""
                notes.append(f"OME PhysicalSizeX = {value:g} µm is implausible")
    tags = page.tags
    xres, yres, unit_tag = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xres is not None and unit_tag is not None:
        unit = int(unit_tag.value)
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2 = inch, 3 = centimetre, 1 = no unit

        def per_px(tag: Any) -> float:
            num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
            return float(num) / float(den) if den else 0.0

        px_x = per_px(xres)
        px_y = per_px(yres) if yres is not None else px_x
        if um_per_unit is None:
            notes.append("resolution tags have no physical unit")
        elif px_x <= 0 or px_y <= 0:
            notes.append("resolution tags are zero")
        else:
            mx_, my_ = um_per_unit / px_x, um_per_unit / px_y
            if abs(mx_ - my_) > _MPP_AGREE * max(mx_, my_):
                notes.append(f"x and y resolution disagree ({mx_:g} vs {my_:g} µm/px)")
            elif not _plausible(mx_):
                notes.append(f"resolution tags give an implausible {mx_:g} µm/px")
            else:
                return mx_, "tiff-resolution", ""
    return None, "none", "; ".join(notes)


def _resolve_mpp(
    path: Path, arg: float | None, file_mpp: float | None, file_src: str, note: str, require: bool
) -> tuple[float | None, str]:
    if arg is not None:
        try:
            value = validate_mpp(arg, source="--mpp")
        except ValueError as exc:
            raise CytokenError(str(exc)) from None
        if file_mpp is not None and abs(value - file_mpp) > _MPP_AGREE * file_mpp:
            _warn(f"{path}: --mpp {value:g} overrides the file's {file_mpp:g} µm/px ({file_src})")
        return value, "argument"
    if file_mpp is not None:
        return file_mpp, file_src
    if not require:
        return None, "none"
    reason = f" ({note})" if note else ""
    raise CytokenError(f"{path}: the µm/px of this image is unknown{reason}; {_MPP_HINT}")


# ---------------------------------------------------------------------------------------------------- pixels
def _read_tiff(path: Path) -> tuple[np.ndarray, float | None, str, str]:
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:
        raise CytokenError(f"{path} is not a readable TIFF file: {exc}") from None
    with tf:
        if not tf.series:
            raise CytokenError(f"{path}: TIFF file contains no image")
        series = tf.series[0]
        shape, axes = tuple(series.shape), str(series.axes)
        keep = [i for i, a in enumerate(axes) if a in "YXS" or shape[i] != 1]
        shape = tuple(shape[i] for i in keep)
        axes = "".join(axes[i] for i in keep)
        if axes not in ("YX", "YXS", "SYX"):
            raise CytokenError(
                f"{path}: TIFF image has shape {shape} (axes {axes}); RGB models read one 2-D RGB or grayscale "
                "image (multi-channel fluorescence, z-stacks and multi-page files are not supported); "
                "multi-channel files need a model with named input channels (see docs/multichannel.md)"
            )
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
        if h * w > _max_pixels():
            raise _too_large(path, w, h)
        mpp, src, note = _tiff_mpp(tf)
        try:
            arr = series.asarray()
        except Exception as exc:
            error = f"{path}: TIFF pixel data could not be decoded (truncated or corrupt file?): {exc}"
        else:
            arr = arr.reshape(shape)
            return (np.moveaxis(arr, 0, -1) if axes == "SYX" else arr), mpp, src, note
    # tifffile lacks some codecs without the optional imagecodecs package: let Pillow (libtiff) try
    try:
        return _read_pil(path), mpp, src, note
    except CytokenError:
        raise CytokenError(error) from None


def _pil_to_array(im: Any, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return np.asarray(im)
    if mode in ("RGBX", "CMYK", "YCbCr", "HSV"):
        return np.asarray(im.convert("RGB"))
    if mode in ("RGBa", "La"):
        return np.asarray(im.convert(mode.upper()))
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise CytokenError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
        return arr.astype(np.uint16)
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    raise CytokenError(f"{path}: unsupported image mode {mode!r}; save it as 8-bit RGB PNG/JPEG/TIFF")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageFile, UnidentifiedImageError

    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise CytokenError(f"{path} is not a readable image (expected PNG, JPEG or TIFF)") from None
    except Image.DecompressionBombError:
        raise _too_large(path, 0, 0) from None
    except OSError as exc:
        raise CytokenError(f"cannot read {path}: {exc}") from None
    with im:
        w, h = im.size
        if w * h > _max_pixels():
            raise _too_large(path, w, h)
        wide_rgb = im.mode in ("RGB", "RGBA") and any("16" in str(t[3]) for t in (im.tile or []))
        # Decode every byte: a truncated file must fail, even if some other code enabled Pillow's
        # LOAD_TRUNCATED_IMAGES switch (then it is turned off for this read only).
        forced = ImageFile.LOAD_TRUNCATED_IMAGES
        try:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im.load()
        except Image.DecompressionBombError:
            raise _too_large(path, w, h) from None
        except Exception as exc:
            raise CytokenError(f"{path}: image data could not be decoded (truncated or corrupt file?): {exc}") from None
        finally:
            if forced:
                ImageFile.LOAD_TRUNCATED_IMAGES = forced
        if im.format == "PNG":
            with open(path, "rb") as fh:
                fh.seek(-len(_PNG_IEND), os.SEEK_END)
                if fh.read() != _PNG_IEND:
                    raise CytokenError(f"{path}: PNG file is truncated (no end-of-image chunk)")
        if getattr(im, "n_frames", 1) > 1:
            _warn(f"{path}: file holds {im.n_frames} frames; only the first is used")
        arr = _pil_to_array(im, path)
    if wide_rgb:
        _warn(f"{path}: 16-bit colour image reduced to 8 bits per channel")
    return arr


def _to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Normalise any supported array (H, W[, C]) to (H, W, 3) uint8, warning about each conversion."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise CytokenError(f"{path}: unsupported pixel array shape {arr.shape}")
    channels = arr.shape[2]
    if channels not in (1, 2, 3, 4):
        raise CytokenError(
            f"{path}: {channels} channels per pixel are not supported for RGB models "
            "(expected 1 = gray, 2 = gray+alpha, 3 = RGB, 4 = RGBA); multi-channel images need a model with "
            "named input channels (see docs/multichannel.md)"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.dtype.itemsize > 1):
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise CytokenError(f"{path}: signed pixel values below 0 are not supported")
        if arr.dtype.itemsize > 2 and arr.size and arr.max() > 65535:
            raise CytokenError(f"{path}: pixel values above 65535 are not supported")
        _warn(f"{path}: 16-bit image scaled to 8 bits (value / 257)")
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1):
            raise CytokenError(f"{path}: floating-point pixels must lie in [0, 1]")
        _warn(f"{path}: floating-point image scaled to 8 bits (value * 255)")
        arr = np.rint(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise CytokenError(f"{path}: unsupported pixel type {arr.dtype}")
    if channels in (2, 4):
        color, alpha = arr[:, :, :-1], arr[:, :, -1:]
        if (alpha < 255).any():
            _warn(f"{path}: transparent pixels composited on white")
            a = alpha.astype(np.uint32)
            arr = ((color.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        else:
            _warn(f"{path}: alpha channel dropped (every pixel is opaque)")
            arr = color
    if arr.shape[2] == 1:
        _warn(f"{path}: grayscale image converted to RGB (H&E models expect colour)")
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------------------- public
def read_image(path: str | os.PathLike[str], mpp: float | None = None, *, require_mpp: bool = True) -> LoadedImage:
    """Read a PNG, JPEG or TIFF image as (H, W, 3) uint8 RGB with its µm/px.

    Args:
        path: the image file.
        mpp: µm/px given by the user; it overrides what the file says (a warning is issued if they disagree).
        require_mpp: raise when µm/px is known neither from ``mpp`` nor from the file. With False, ``mpp`` of
            the result is None in that case.

    Returns:
        A :class:`LoadedImage`.

    Raises:
        CytokenError: file missing, not an image, truncated/corrupt, smaller than 32 px on a side, unsupported
            channels or mode, too large for single-image reading, ``mpp`` out of [0.05, 5], or µm/px unknown.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tile.png"
        >>> Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(p)
        >>> img = read_image(p, mpp=0.25)
        >>> img.array.shape, img.mpp, img.mpp_source
        ((64, 48, 3), 0.25, 'argument')
    """
    p = _check_file(path)
    if mpp is not None:  # fail fast on a bad argument, before decoding
        try:
            validate_mpp(mpp, source="--mpp")
        except ValueError as exc:
            raise CytokenError(str(exc)) from None
    if _is_tiff(p):
        raw, file_mpp, file_src, note = _read_tiff(p)
    else:
        raw, file_mpp, file_src, note = _read_pil(p), None, "none", ""
    rgb = _to_rgb8(raw, p)
    h, w = rgb.shape[:2]
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        raise CytokenError(f"{p} is {w}x{h} px; images must be at least {MIN_IMAGE_SIDE} px on each side")
    value, source = _resolve_mpp(p, mpp, file_mpp, file_src, note, require_mpp)
    return LoadedImage(array=rgb, mpp=value, mpp_source=source, path=p)


def read_image_size(path: str | os.PathLike[str]) -> ImageSize:
    """Width and height of an image from its header only (no pixel decoding).

    Args:
        path: a PNG, JPEG or TIFF file (for TIFF, the first series' full-resolution level).

    Returns:
        :class:`ImageSize` ``(width, height)``.

    Raises:
        CytokenError: file missing or not an image.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.fromarray(np.zeros((40, 70), np.uint8)).save(p)
        >>> read_image_size(p)
        ImageSize(width=70, height=40)
    """
    p = _check_file(path)
    if _is_tiff(p):
        import tifffile

        try:
            with tifffile.TiffFile(p) as tf:
                series = tf.series[0]
                shape, axes = series.shape, series.axes
        except Exception as exc:
            raise CytokenError(f"{p} is not a readable TIFF file: {exc}") from None
        if "Y" not in axes or "X" not in axes:
            raise CytokenError(f"{p}: TIFF series has no Y/X axes ({axes})")
        return ImageSize(int(shape[axes.index("X")]), int(shape[axes.index("Y")]))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            return ImageSize(int(im.size[0]), int(im.size[1]))
    except UnidentifiedImageError:
        raise CytokenError(f"{p} is not a readable image (expected PNG, JPEG or TIFF)") from None
    except Image.DecompressionBombError:
        raise _too_large(p, 0, 0) from None
    except OSError as exc:
        raise CytokenError(f"cannot read {p}: {exc}") from None
