"""The :class:`Slide` interface shared by every backend, with resampled reads in physical units (µm/px).

A backend only has to say what the slide looks like (level sizes, µm/px, channels) and read an integer window
of one pyramid level (:meth:`Slide._read_level`). Everything else lives here, once: choosing the pyramid level
for a requested µm/px, clipping to the slide and padding outside it, and resampling.

Coordinates: ``x`` is the column and ``y`` the row. Level-0 pixel ``(i, j)`` covers the continuous square
``[i, i+1) x [j, j+1)``; a read of a rectangle in these continuous coordinates keeps its exact scale and
sub-pixel offset (no rounding of the window; OpenCV shortcuts interpolate to 1/32 pixel).

Thread and process safety: a Slide may be shared between threads for reading (OpenSlide is thread-safe; the
tifffile backend serialises file access with a lock; in-memory slides are read-only). Do not share an open
file handle between processes: give each worker process its own Slide. File-backed slides pickle by path
(unpickling re-opens the file, with the same backend and µm/px) and :meth:`Slide.reopen` gives a fresh handle;
:class:`~cytoken.io.slide.array_backend.ArraySlide` pickles its array.
"""

from __future__ import annotations

import abc
import contextlib
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cytoken.types import MPP_MAX, MPP_MIN, Bounds, CytokenError, validate_mpp

__all__ = ["LEVEL_TOLERANCE", "MAX_SLIDE_MPP", "Slide", "SlideOpenError", "resolve_mpp"]

#: Coarsest level-0 µm/px accepted for cell-level analysis (20x scans are ~0.5 µm/px, 10x ~1.0).
MAX_SLIDE_MPP = 0.75

#: A pyramid level is used for a read when its µm/px is at most ``requested * (1 + LEVEL_TOLERANCE)``; the
#: slack absorbs pyramids whose level sizes are rounded (a 2967-px level-0 height over 1483 px is a 2.0007
#: downsample).
LEVEL_TOLERANCE = 0.01

_BLOCK = 2048  # largest window (level pixels per side) read at once by thumbnail()


class SlideOpenError(CytokenError):
    """A backend could not open a file (wrong format, missing library, corrupt header).

    :func:`cytoken.io.slide.open_slide` catches it and tries the next backend; any other :class:`CytokenError`
    (e.g. a missing µm/px) is final.
    """


def resolve_mpp(
    metadata_mpp: float | None, argument_mpp: float | None, *, what: str, max_mpp: float | None = MAX_SLIDE_MPP
) -> tuple[float, str]:
    """Pick the level-0 µm/px of a slide: an explicit argument wins over the file's metadata.

    Metadata values outside the plausible range [0.05, 5] µm/px (e.g. a 72-dpi default resolution tag) count
    as missing.

    Args:
        metadata_mpp: µm/px read from the file, or None.
        argument_mpp: µm/px given by the user (``--mpp``), or None.
        what: the slide's name for error messages.
        max_mpp: coarsest µm/px accepted (default 0.75, for cell-level H&E); None accepts any plausible value
            (e.g. a 10x immunofluorescence image read for registration).

    Returns:
        ``(mpp, source)`` where source is ``"argument"`` or ``"metadata"``.

    Raises:
        CytokenError: when neither value is usable, or the resolution is coarser than 0.75 µm/px.

    Example:
        >>> resolve_mpp(0.499, None, what="a.svs")
        (0.499, 'metadata')
        >>> resolve_mpp(0.499, 0.5, what="a.svs")
        (0.5, 'argument')
    """
    if argument_mpp is not None:
        try:
            mpp = validate_mpp(argument_mpp, source="--mpp")
        except ValueError as exc:
            raise CytokenError(f"{what}: {exc}") from None
        source = "argument"
    else:
        usable = metadata_mpp is not None and np.isfinite(metadata_mpp) and MPP_MIN <= metadata_mpp <= MPP_MAX
        if not usable:
            said = (
                ""
                if metadata_mpp is None
                else f" (its resolution tags say {metadata_mpp:g} µm/px, not plausible)"
            )
            raise CytokenError(
                f"{what}: the file does not record its resolution in µm/px{said}; pass it with --mpp "
                "(e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x) or open_slide(..., mpp=...)"
            )
        mpp = float(metadata_mpp)  # type: ignore[arg-type]
        source = "metadata"
    if max_mpp is not None and mpp > max_mpp:
        raise CytokenError(
            f"{what}: {mpp:g} µm/px ({source}) is coarser than {max_mpp:g} µm/px: cell-level models need "
            "scans at 20x (~0.5 µm/px) or finer, nuclei are only a few pixels wide below that"
        )
    return mpp, source


class Slide(abc.ABC):
    """A whole-slide image (or plain image) read in level-0 pixel coordinates and resampled to any µm/px.

    Subclasses set, in ``__init__``: ``path`` (or None), ``_levels`` (list of ``(width, height)`` of every
    pyramid level, level 0 first), ``_downsamples`` (one float per level), ``_mpp``, ``mpp_source``,
    ``_channel_names``, ``_dtype`` and ``_is_rgb``; and implement :meth:`_read_level` and :meth:`_close`.

    Attributes:
        path: the file the slide was opened from (None for in-memory slides).
        backend: name of the backend (``"openslide"``, ``"tifffile"``, ``"pil"``, ``"array"``).
        mpp_source: ``"argument"`` when µm/px came from the caller, ``"metadata"`` when read from the file.
    """

    backend: ClassVar[str] = ""
    path: Path | None
    mpp_source: str
    _levels: list[tuple[int, int]]
    _downsamples: list[float]
    _mpp: float
    _mpp_argument: float | None
    _channel_names: tuple[str, ...]
    _dtype: np.dtype
    _is_rgb: bool
    _closed: bool = False

    # ------------------------------------------------------------------ description
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self._levels[0]

    @property
    def mpp(self) -> float:
        """Level-0 µm/px."""
        return self._mpp

    @property
    def levels(self) -> list[tuple[int, int, float]]:
        """Every pyramid level as ``(width, height, downsample)``, level 0 first (downsample 1.0)."""
        return [(w, h, d) for (w, h), d in zip(self._levels, self._downsamples)]

    @property
    def level_mpps(self) -> list[float]:
        """µm/px of every pyramid level."""
        return [self._mpp * d for d in self._downsamples]

    @property
    def channels(self) -> int:
        """Number of channels of the stored image (3 for RGB brightfield)."""
        return len(self._channel_names)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Channel names (``("R", "G", "B")`` for RGB; from the file's metadata for multi-channel images)."""
        return self._channel_names

    @property
    def dtype(self) -> np.dtype:
        """Pixel data type of the stored image (uint8 for RGB brightfield)."""
        return self._dtype

    @property
    def is_rgb(self) -> bool:
        """True when :meth:`read_region` can return RGB (3-channel uint8 brightfield data)."""
        return self._is_rgb

    def __repr__(self) -> str:
        w, h = self.dimensions
        where = str(self.path) if self.path is not None else "in-memory"
        return (
            f"{type(self).__name__}({where!r}, {w}x{h}, mpp={self._mpp:g} ({self.mpp_source}), "
            f"levels={len(self._levels)}, channels={self.channels})"
        )

    # ------------------------------------------------------------------ reads
    def read_region(self, bounds: Bounds, mpp: float) -> np.ndarray:
        """Read a level-0 rectangle resampled to ``mpp`` µm/px, as RGB.

        The output has ``round(bounds.width * self.mpp / mpp)`` columns and as many rows likewise (at least
        1); the rectangle is mapped exactly onto that grid. The read uses the coarsest pyramid level whose
        resolution is at least the requested one, then resamples: area averaging when shrinking, bilinear when
        enlarging (OpenCV's INTER_AREA / INTER_LINEAR, reimplemented so sub-pixel offsets are exact). A read
        at the slide's own µm/px at level 0 returns the stored pixels unchanged. Parts outside the slide are
        white (255).

        Args:
            bounds: rectangle in level-0 pixels (may extend beyond the slide).
            mpp: requested µm/px of the output.

        Returns:
            ``(H, W, 3)`` uint8 RGB array.

        Raises:
            CytokenError: when the slide is not RGB brightfield data, the file cannot be read, or ``mpp`` is
                invalid.
            ValueError: when ``bounds`` is empty.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> s = ArraySlide(np.zeros((100, 200, 3), np.uint8), mpp=0.5)
            >>> s.read_region(Bounds(0, 0, 50, 20), mpp=0.25).shape
            (40, 100, 3)
        """
        target = self._check_read(bounds, mpp)
        out_w = max(1, round(bounds.width * self._mpp / target))
        out_h = max(1, round(bounds.height * self._mpp / target))
        rect = (float(bounds.x), float(bounds.y), float(bounds.x1), float(bounds.y1))
        return self._read_rgb(rect, out_w, out_h)

    def read_scaled(self, bounds: Bounds, mpp: float) -> np.ndarray:
        """Read a window of the slide as if it were resampled as a whole to ``mpp`` µm/px, as RGB.

        ``bounds`` is given in pixels of that resampled image: its pixel ``(i, j)`` covers level-0 ``[i * f,
        (i + 1) * f)`` with ``f = mpp / self.mpp``, so windows of a tile grid laid out at the model's µm/px
        line up exactly, without per-tile rounding. The output is exactly ``bounds.height x bounds.width``.

        Args:
            bounds: window in pixels of the slide resampled to ``mpp`` (may extend beyond the slide).
            mpp: µm/px of that resampled image.

        Returns:
            ``(bounds.height, bounds.width, 3)`` uint8 RGB array; white outside the slide.

        Raises:
            CytokenError: as :meth:`read_region`.
            ValueError: when ``bounds`` is empty.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> s = ArraySlide(np.zeros((100, 200, 3), np.uint8), mpp=0.5)
            >>> s.read_scaled(Bounds(0, 0, 256, 256), mpp=0.25).shape
            (256, 256, 3)
        """
        return self._read_rgb(self._scaled_rect(bounds, mpp), bounds.width, bounds.height)

    def read_scaled_channels(self, bounds: Bounds, mpp: float) -> np.ndarray:
        """Like :meth:`read_scaled` but returns every stored channel in its own dtype, zero outside the slide.

        This is the read of multi-channel (IF, spatial-proteomics) slides tile by tile on the model's grid: the
        window geometry is exactly that of :meth:`read_scaled`.

        Args:
            bounds: window in pixels of the slide resampled to ``mpp`` (may extend beyond the slide).
            mpp: µm/px of that resampled image.

        Returns:
            ``(bounds.height, bounds.width, channels)`` array of :attr:`dtype`.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> s = ArraySlide(np.ones((10, 10, 2), np.uint16), mpp=0.5, channel_names=("DAPI", "CD3"))
            >>> s.read_scaled_channels(Bounds(0, 0, 24, 24), mpp=0.25)[..., 1].max(axis=1)[[0, 19, 20]].tolist()
            [1, 1, 0]
        """
        return self._read_rect(self._scaled_rect(bounds, mpp), bounds.width, bounds.height, fill=0)

    def _scaled_rect(self, bounds: Bounds, mpp: float) -> tuple[float, float, float, float]:
        """Level-0 rectangle of a window given in pixels of the slide resampled to ``mpp``."""
        f = self._check_read(bounds, mpp) / self._mpp
        return (bounds.x * f, bounds.y * f, bounds.x1 * f, bounds.y1 * f)

    def read_channels(self, bounds: Bounds, mpp: float) -> np.ndarray:
        """Like :meth:`read_region` but returns every stored channel in its own dtype, zero outside the slide.

        Args:
            bounds: rectangle in level-0 pixels.
            mpp: requested µm/px of the output.

        Returns:
            ``(H, W, channels)`` array of :attr:`dtype`.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> s = ArraySlide(np.zeros((10, 10, 2), np.uint16), mpp=0.5, channel_names=("DAPI", "CD3"))
            >>> s.read_channels(Bounds(0, 0, 10, 10), mpp=0.5).shape
            (10, 10, 2)
        """
        target = self._check_read(bounds, mpp)
        out_w = max(1, round(bounds.width * self._mpp / target))
        out_h = max(1, round(bounds.height * self._mpp / target))
        rect = (float(bounds.x), float(bounds.y), float(bounds.x1), float(bounds.y1))
        return self._read_rect(rect, out_w, out_h, fill=0)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """The whole slide shrunk so that its longer side is at most ``max_size`` pixels (never enlarged).

        Read block by block from the coarsest suitable pyramid level, so memory stays bounded on slides with a
        single huge level.

        Args:
            max_size: longest side of the result in pixels.

        Returns:
            ``(rgb, mpp)``: the ``(H, W, 3)`` uint8 thumbnail and its µm/px along x.

        Raises:
            ValueError: when ``max_size`` < 1.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> img, mpp = ArraySlide(np.zeros((100, 200, 3), np.uint8), mpp=0.5).thumbnail(50)
            >>> img.shape, mpp
            ((25, 50, 3), 2.0)
        """
        if int(max_size) < 1:
            raise ValueError(f"thumbnail: max_size must be >= 1, got {max_size!r}")
        self._require_rgb()
        w0, h0 = self.dimensions
        scale = min(1.0, int(max_size) / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        fx, fy = w0 / tw, h0 / th
        level = self.best_level(min(fx, fy) * self._mpp)
        lw, lh = self._levels[level]
        # output pixels per block so that each block reads at most ~_BLOCK level pixels per side
        bw = max(1, int(_BLOCK / (fx * lw / w0)))
        bh = max(1, int(_BLOCK / (fy * lh / h0)))
        out = np.empty((th, tw, 3), np.uint8)
        for r0 in range(0, th, bh):
            r1 = min(th, r0 + bh)
            for c0 in range(0, tw, bw):
                c1 = min(tw, c0 + bw)
                rect = (c0 * fx, r0 * fy, c1 * fx, r1 * fy)
                out[r0:r1, c0:c1] = self._read_rgb(rect, c1 - c0, r1 - r0)
        return out, self._mpp * fx

    def best_level(self, mpp: float) -> int:
        """Index of the coarsest pyramid level whose µm/px is at most ``mpp`` (within 1%); 0 if none.

        Args:
            mpp: requested µm/px.

        Returns:
            The level index.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> ArraySlide(np.zeros((8, 8, 3), np.uint8), mpp=0.5).best_level(2.0)
            0
        """
        w0, h0 = self._levels[0]
        best, best_mpp = 0, self._mpp
        for i, (w, h) in enumerate(self._levels):
            level_mpp = self._mpp * max(w0 / w, h0 / h)
            if best_mpp < level_mpp <= mpp * (1 + LEVEL_TOLERANCE):
                best, best_mpp = i, level_mpp
        return best

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the file handle (idempotent)."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finaliser
            self.close()

    def reopen(self) -> Slide:
        """A new, independent Slide on the same file with the same backend and µm/px (for worker processes).

        Returns:
            A freshly opened Slide; this one stays open.

        Example:
            >>> import numpy as np
            >>> from cytoken.io.slide import ArraySlide
            >>> ArraySlide(np.zeros((8, 8, 3), np.uint8), mpp=0.5).reopen().dimensions
            (8, 8)
        """
        if self.path is None:
            raise CytokenError(f"{self!r} has no file to re-open")
        return type(self)(self.path, mpp=self._mpp_argument)  # type: ignore[call-arg]

    def __reduce__(self) -> tuple[Any, ...]:
        if self.path is None:
            raise TypeError(f"{type(self).__name__} without a path cannot be pickled")
        return (_reopen, (type(self), self.path, self._mpp_argument))

    # ------------------------------------------------------------------ backend hooks
    @abc.abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read an integer window lying inside pyramid level ``level``.

        Returns:
            ``(height, width, channels)`` array of :attr:`dtype` (RGB for RGB slides).
        """

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""

    # ------------------------------------------------------------------ internals
    def _name(self) -> str:
        return str(self.path) if self.path is not None else "in-memory slide"

    def _require_rgb(self) -> None:
        if not self._is_rgb:
            names = ", ".join(self._channel_names) or "unnamed"
            raise CytokenError(
                f"{self._name()}: not an RGB brightfield image ({self.channels} channel(s) of {self._dtype}: "
                f"{names}); RGB reads need 3-channel uint8 data, use read_channels() for other images"
            )

    def _check_read(self, bounds: Bounds, mpp: float) -> float:
        if self._closed:
            raise CytokenError(f"{self._name()}: the slide is closed")
        if bounds.width <= 0 or bounds.height <= 0:
            raise ValueError(f"read: bounds must have a positive width and height, got {bounds}")
        try:
            return validate_mpp(mpp, source="read mpp")
        except ValueError as exc:
            raise CytokenError(str(exc)) from None

    def _read_rgb(self, rect: tuple[float, float, float, float], out_w: int, out_h: int) -> np.ndarray:
        self._require_rgb()
        return self._read_rect(rect, out_w, out_h, fill=255)

    def _read_rect(
        self, rect: tuple[float, float, float, float], out_w: int, out_h: int, *, fill: int
    ) -> np.ndarray:
        """Read the continuous level-0 rectangle ``(x0, y0, x1, y1)`` onto an ``out_w x out_h`` grid."""
        x0, y0, x1, y1 = rect
        kx0, ky0 = (x1 - x0) / out_w, (y1 - y0) / out_h  # level-0 px per output px
        level = self.best_level(min(kx0, ky0) * self._mpp)
        lw, lh = self._levels[level]
        sx, sy = self._levels[0][0] / lw, self._levels[0][1] / lh
        lx0, ly0, lx1, ly1 = x0 / sx, y0 / sy, x1 / sx, y1 / sy
        kx, ky = (lx1 - lx0) / out_w, (ly1 - ly0) / out_h  # level px per output px
        identity = (
            abs(kx - 1) < 1e-9 and abs(ky - 1) < 1e-9 and _integral(lx0) and _integral(ly0)
        )  # plain crop
        margin = 0 if identity else 1
        ix0, iy0 = math.floor(lx0 + 1e-9) - margin, math.floor(ly0 + 1e-9) - margin
        ix1, iy1 = math.ceil(lx1 - 1e-9) + margin, math.ceil(ly1 - 1e-9) + margin
        if identity:
            return self._read_window(level, ix0, iy0, ix1, iy1, fill)
        # resample from a canvas whose outside part repeats the slide's edge (so the slide border does not
        # blend with the fill colour), then fill the output pixels whose centres lie outside the slide
        canvas = self._read_window(level, ix0, iy0, ix1, iy1, fill, edge=True)
        out = _resample(canvas, lx0 - ix0, ly0 - iy0, kx, ky, out_w, out_h)
        w0, h0 = self._levels[0]
        cols = x0 + (np.arange(out_w) + 0.5) * kx0
        rows = y0 + (np.arange(out_h) + 0.5) * ky0
        out[:, (cols < 0) | (cols >= w0)] = fill
        out[(rows < 0) | (rows >= h0)] = fill
        return out

    def _read_window(
        self, level: int, x0: int, y0: int, x1: int, y1: int, fill: int, *, edge: bool = False
    ) -> np.ndarray:
        """Integer window of a level, clipped to the level; outside it ``fill``, or the nearest edge pixel."""
        lw, lh = self._levels[level]
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(lw, x1), min(lh, y1)
        inside = cx1 > cx0 and cy1 > cy0
        if inside and (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return self._safe_read(level, x0, y0, x1 - x0, y1 - y0)
        if not inside:
            return np.full((y1 - y0, x1 - x0, self.channels), fill, self._dtype)
        part = self._safe_read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
        if edge:
            return np.pad(part, pad, mode="edge")
        return np.pad(part, pad, mode="constant", constant_values=fill)

    def _safe_read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._closed:
            raise CytokenError(f"{self._name()}: the slide is closed")
        try:
            arr = self._read_level(level, x, y, width, height)
        except CytokenError:
            raise
        except Exception as exc:
            raise CytokenError(
                f"{self._name()}: failed to read level {level} window x={x} y={y} {width}x{height} with the "
                f"{self.backend} backend (corrupt or truncated file?): {type(exc).__name__}: {exc}"
            ) from exc
        if arr.shape != (height, width, self.channels):
            raise CytokenError(
                f"{self._name()}: the {self.backend} backend returned shape {arr.shape} for a "
                f"{width}x{height} window with {self.channels} channels"
            )
        return arr


def _reopen(cls: type[Slide], path: Path, mpp: float | None) -> Slide:
    """Unpickle a file-backed slide by opening its file again."""
    return cls(path, mpp=mpp)  # type: ignore[call-arg]


def _integral(v: float) -> bool:
    return abs(v - round(v)) < 1e-9


def _resample(
    canvas: np.ndarray, ox: float, oy: float, kx: float, ky: float, out_w: int, out_h: int
) -> np.ndarray:
    """Map a canvas onto a grid: output pixel (c, r) covers canvas edges ``[ox + c*kx, ox + (c+1)*kx)``.

    Separable and exact in geometry: axes that shrink (k > 1) average the covered area (fractional pixels
    weighted by their covered length, like OpenCV's INTER_AREA); axes that enlarge interpolate linearly
    between pixel centres (like OpenCV's INTER_LINEAR), replicating the canvas edge. Each axis is one sparse
    matrix product.
    """
    dtype = canvas.dtype
    h, w, c = canvas.shape
    if dtype.type in _CV_DTYPES and c <= 4:
        fast = _resample_cv2(canvas, ox, oy, kx, ky, out_w, out_h)
        if fast is not None:
            return fast
    work = canvas.astype(np.float32)
    from scipy import sparse

    rows = _axis_weights(oy, ky, out_h, h)
    work = rows @ work.reshape(h, w * c)  # (out_h, w * c)
    # columns: the same matrix acting on every channel of the interleaved (w * c) axis, no transpose needed
    cols = sparse.kron(_axis_weights(ox, kx, out_w, w), sparse.eye(c, dtype=np.float32), format="csr")
    work = np.asarray(work @ cols.T).reshape(out_h, out_w, c)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        work = np.clip(np.rint(work), info.min, info.max)
    return np.ascontiguousarray(work.astype(dtype))


_CV_DTYPES = (np.uint8, np.uint16, np.float32)


def _resample_cv2(
    canvas: np.ndarray, ox: float, oy: float, kx: float, ky: float, out_w: int, out_h: int
) -> np.ndarray | None:
    """OpenCV shortcuts of :func:`_resample` with the same geometry; None when no shortcut applies.

    Enlarging on both axes is an affine warp (bilinear, edge replicated); shrinking on both axes over a window
    with integral edges is ``cv2.resize`` with INTER_AREA on that window.
    """
    import cv2

    if kx <= 1 and ky <= 1:
        matrix = np.array([[kx, 0.0, ox + 0.5 * kx - 0.5], [0.0, ky, oy + 0.5 * ky - 0.5]])
        out = cv2.warpAffine(
            canvas,
            matrix,
            (out_w, out_h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
    elif kx >= 1 and ky >= 1 and all(_integral(v) for v in (ox, oy, ox + out_w * kx, oy + out_h * ky)):
        x0, y0 = round(ox), round(oy)
        window = canvas[y0 : round(oy + out_h * ky), x0 : round(ox + out_w * kx)]
        out = cv2.resize(window, (out_w, out_h), interpolation=cv2.INTER_AREA)
    else:
        return None
    return out.reshape(out_h, out_w, canvas.shape[2])


def _axis_weights(start: float, step: float, n: int, length: int) -> Any:
    """Sparse ``(n, length)`` resampling matrix for one axis (see :func:`_resample`)."""
    from scipy import sparse

    out = np.arange(n)
    if step > 1:
        # area: output bin [a, b) takes every source pixel [j, j+1) it overlaps, weighted by the overlap
        a = start + step * out
        b = a + step
        first = np.floor(a).astype(np.int64)
        span = int(np.ceil(step)) + 1
        j = first[:, None] + np.arange(span)[None, :]
        wgt = np.clip(np.minimum(b[:, None], j + 1) - np.maximum(a[:, None], j), 0, None) / step
        i = np.broadcast_to(out[:, None], j.shape)
        ok = (wgt > 0) & (j >= 0) & (j < length)
        i, j, wgt = i[ok], j[ok], wgt[ok]
    else:
        # linear: output centre at canvas index coordinate u, between pixels floor(u) and floor(u) + 1
        u = np.clip(start + step * (out + 0.5) - 0.5, 0, length - 1)
        i0 = np.minimum(np.floor(u).astype(np.int64), max(length - 2, 0))
        i1 = np.minimum(i0 + 1, length - 1)
        f = u - i0
        i = np.concatenate([out, out])
        j = np.concatenate([i0, i1])
        wgt = np.concatenate([1 - f, f])
    return sparse.csr_matrix((wgt.astype(np.float32), (i, j)), shape=(n, length))
