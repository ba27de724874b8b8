"""Immunofluorescence images read window by window: :func:`open_if` and :class:`IFReader`.

:func:`~cytoken.io.ifimage.read_if` decodes every channel of an IF image at once; a whole-slide IF image (tens of
thousands of pixels on a side, many channels) does not fit in memory that way. :class:`IFReader` has the same
channel names, µm/px and channel selection (:meth:`IFReader.index`) as ``read_if`` gives for the file, but reads
pixels only on request: one channel of one window (:meth:`IFReader.read`, :meth:`IFReader.crop`), a block-averaged
overview of one channel (:meth:`IFReader.binned`) or its value range (:meth:`IFReader.value_range`), the last two
read block by block so memory stays bounded.

Formats read lazily: TIFF, OME-TIFF and QPTIFF (through :class:`~cytoken.io.slide.TiffSlide`, which decodes only
the tiles or strips a window meets, and which is opened here without the 0.75 µm/px limit of H&E slides: a 10x IF
image is fine). Every other input of ``read_if`` (PNG, ``.npy``, one file per marker) is read whole and wrapped,
as is an in-memory :class:`~cytoken.io.ifimage.IFImage` (:meth:`IFReader.from_image`).

This module is layer 1 (io).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.channels import ChannelKey, channel_index
from cytoken.io.ifimage import IFImage, read_if, tiff_channel_info
from cytoken.types import CytokenError, validate_mpp

__all__ = ["IFReader", "open_if"]

_TIFF_SUFFIXES = {".tif", ".tiff", ".qptiff", ".btf", ".ome"}
_BLOCK = 2048  # pixels per side of the blocks of binned() and value_range()
_CACHE_BYTES = 16 << 20  # decoded tiles kept: reads go row by row with small overlaps


class IFReader:
    """A (C, H, W) immunofluorescence image whose pixels are read window by window.

    Attributes:
        channel_names: C channel names (as :func:`~cytoken.io.ifimage.read_if` names them).
        mpp: µm/px, or None when neither the file nor the caller gave it.
        path: the file, None for an in-memory image.
        meta: format and other information.

    Example:
        >>> r = IFReader.from_image(IFImage(np.arange(32).reshape(2, 4, 4), ("DAPI", "CD3"), mpp=0.5))
        >>> r.shape, r.read("cd3", 1, 2, 3, 4).tolist(), r.value_range("DAPI")
        ((4, 4), [[25, 26], [29, 30]], (0.0, 15.0))
    """

    def __init__(
        self,
        source: Any,
        channel_names: Sequence[str],
        *,
        mpp: float | None = None,
        path: Path | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._source = source  # a (C, H, W) array or a TiffSlide
        self.channel_names = tuple(str(n) for n in channel_names)
        self.mpp = None if mpp is None else validate_mpp(mpp, source="IF µm/px")
        self.path = path
        self.meta = dict(meta or {})
        if isinstance(source, np.ndarray):
            self._shape = (int(source.shape[1]), int(source.shape[2]))
            self._dtype = source.dtype
            n = source.shape[0]
        else:
            w, h = source.dimensions
            self._shape, self._dtype, n = (int(h), int(w)), np.dtype(source.dtype), source.channels
        if len(self.channel_names) != n:
            raise CytokenError(f"{path or 'IF image'}: {len(self.channel_names)} channel names for {n} channels")

    @classmethod
    def from_image(cls, image: IFImage) -> IFReader:
        """Wrap an in-memory :class:`IFImage` (no copy)."""
        return cls(np.asarray(image.data), image.channel_names, mpp=image.mpp, path=image.path, meta=image.meta)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every channel."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        """Stored pixel type."""
        return self._dtype

    def index(self, key: ChannelKey) -> int:
        """Position of a channel given by name (case-insensitive) or index; unknown names list the channels."""
        return channel_index(key, self.channel_names, self.path)

    def read(self, key: ChannelKey, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """One channel of the window ``[y0, y1) x [x0, x1)`` (inside the image), as stored.

        Raises:
            ValueError: an empty window or one that leaves the image.
        """
        c = self.index(key)
        h, w = self._shape
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"IFReader.read: window x {x0}:{x1}, y {y0}:{y1} is empty or leaves the {w}x{h} image")
        if isinstance(self._source, np.ndarray):
            return np.asarray(self._source[c, y0:y1, x0:x1])
        return self._source.read_plane(c, x0, y0, x1 - x0, y1 - y0)

    def crop(self, keys: Sequence[ChannelKey], x0: int, y0: int, x1: int, y1: int) -> IFImage:
        """The given channels of a window as an :class:`IFImage` (same µm/px; its pixel (0, 0) is (x0, y0))."""
        idx = [self.index(k) for k in keys]
        data = np.stack([self.read(i, x0, y0, x1, y1) for i in idx])
        return IFImage(data, tuple(self.channel_names[i] for i in idx), mpp=self.mpp, path=self.path)

    def _blocks(self, step: int):
        h, w = self._shape
        for y in range(0, h, step):
            for x in range(0, w, step):
                yield x, y, min(w, x + step), min(h, y + step)

    def binned(self, key: ChannelKey, factor: int) -> np.ndarray:
        """One channel averaged over ``factor x factor`` blocks, read block by block (float32).

        The result has ``H // factor`` rows and ``W // factor`` columns (a last partial block is left out), so its
        pixel (i, j) is exactly the mean of the stored pixels ``[i f, (i + 1) f) x [j f, (j + 1) f)``; its µm/px is
        ``factor * mpp``.

        Raises:
            ValueError: ``factor`` < 1 or larger than the image.
        """
        f = int(factor)
        h, w = self._shape
        if f < 1 or f > min(h, w):
            raise ValueError(f"IFReader.binned: factor must be in [1, {min(h, w)}], got {factor}")
        out = np.empty((h // f, w // f), np.float32)
        step = f * max(1, _BLOCK // f)
        for x0, y0, x1, y1 in self._blocks(step):
            x1, y1 = x0 + (x1 - x0) // f * f, y0 + (y1 - y0) // f * f
            if x1 <= x0 or y1 <= y0:
                continue
            block = self.read(key, x0, y0, x1, y1).astype(np.float32)
            out[y0 // f : y1 // f, x0 // f : x1 // f] = block.reshape((y1 - y0) // f, f, (x1 - x0) // f, f).mean(
                axis=(1, 3)
            )
        return out

    def value_range(self, key: ChannelKey) -> tuple[float, float]:
        """Smallest and largest finite value of one channel, read block by block ((0, 1) when none is finite)."""
        lo, hi = np.inf, -np.inf
        for x0, y0, x1, y1 in self._blocks(_BLOCK):
            block = self.read(key, x0, y0, x1, y1)
            if np.issubdtype(block.dtype, np.floating):
                block = block[np.isfinite(block)]
            if block.size:
                lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        return (lo, hi) if lo <= hi else (0.0, 1.0)

    def close(self) -> None:
        """Release the file (idempotent)."""
        close = getattr(self._source, "close", None)
        if close is not None and not isinstance(self._source, np.ndarray):
            close()

    def __enter__(self) -> IFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_if(path: str | Path, *, mpp: float | None = None) -> IFReader:
    """Open an IF image for window-by-window reading (TIFF family lazily, anything else read whole).

    Args:
        path: an OME-TIFF, QPTIFF or plain TIFF (read lazily), or any other file :func:`read_if` reads.
        mpp: µm/px to use instead of the file's.

    Returns:
        The reader (close it, or use it as a context manager).

    Raises:
        CytokenError: as :func:`read_if`.

    Example:
        >>> with open_if("slide_if.ome.tif") as r:  # doctest: +SKIP
        ...     dapi = r.binned("DAPI", 8)
    """
    from cytoken.io.slide import SlideOpenError, TiffSlide

    path = Path(path)
    if mpp is not None:
        mpp = validate_mpp(mpp, source="open_if(mpp=...)")
    if path.suffix.lower() in _TIFF_SUFFIXES or path.name.lower().endswith(".ome.tif"):
        names, file_mpp, fmt = tiff_channel_info(path)
        try:
            # TiffSlide reads the pixels only; µm/px is ours (read_if's rules), so any value opens it
            slide = TiffSlide(path, mpp=mpp or file_mpp or 1.0, max_mpp=None, cache_bytes=_CACHE_BYTES)
        except SlideOpenError:
            slide = None  # a layout TiffSlide does not read window by window: read it whole below
        if slide is not None:
            n = slide.channels
            if names is None or len(names) != n:
                names = tuple(f"ch{i}" for i in range(n))
            return IFReader(slide, names, mpp=mpp or file_mpp, path=path, meta={"format": fmt, "lazy": True})
    return IFReader.from_image(read_if(path, mpp=mpp))
