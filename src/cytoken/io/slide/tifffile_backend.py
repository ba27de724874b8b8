"""TIFF through tifffile: OME-TIFF, plain (striped or tiled) TIFF, pyramidal series, multi-channel (qptiff).

Regions are decoded tile by tile (or strip by strip) straight from the file, so huge TIFFs are never loaded
whole; decoded segments are kept in a small per-slide cache (64 MB) so neighbouring overlapping reads do not
decode twice. JPEG, LZW, JPEG 2000 and most other compressions need the ``imagecodecs`` package.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cytoken.io.slide.base import MAX_SLIDE_MPP, Slide, SlideOpenError, resolve_mpp
from cytoken.types import CytokenError

__all__ = ["TiffSlide"]

_CACHE_BYTES = 64 * 1024 * 1024
_SKIP_SERIES = {"thumbnail", "label", "macro", "overview"}
_CHANNEL_AXES = "CSIQE"
_RGB_NAMES = {"r", "g", "b", "red", "green", "blue"}
_UNIT_UM = {"um": 1.0, "µm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_PHOTOMETRIC_RGB = (2, 6)  # RGB, YCbCr


class TiffSlide(Slide):
    """A TIFF image read with tifffile.

    The first image series that is not a thumbnail, label or macro image is used; its pyramid levels (SubIFDs
    or reduced-resolution pages, as tifffile finds them) become the slide's levels. A channel axis (C, or the
    samples of an RGB page) gives :attr:`channels`; other non-trivial axes (time, z) are read at index 0
    (listed in ``meta["ignored_axes"]``). Three-channel uint8 data is RGB unless the file names its channels
    otherwise (e.g. the DAPI/FITC/Cy3 of a fluorescence qptiff, which :meth:`read_region` refuses; use
    :meth:`read_channels`).

    µm/px, first found wins: ``mpp=`` argument, OME ``PhysicalSizeX``, Aperio ``MPP =`` in the description,
    the TIFF ``XResolution``/``ResolutionUnit`` tags (inch or centimetre).

    Args:
        path: TIFF file.
        mpp: level-0 µm/px; overrides the metadata.
        max_mpp: coarsest level-0 µm/px accepted (default 0.75, see :func:`resolve_mpp`); None accepts any, for
            images that are only read channel by channel (:meth:`read_plane`), e.g. a 10x IF image.
        cache_bytes: size of the cache of decoded tiles/strips (default 64 MB).

    Raises:
        SlideOpenError: when the file is not a TIFF tifffile can decode (wrong format, unsupported layout or
            compression without ``imagecodecs``).
        CytokenError: when µm/px is missing or too coarse.

    Example:
        >>> s = TiffSlide("CMU-1-Small-Region_pyramid_generic.tiff")  # doctest: +SKIP
        >>> [lvl[:2] for lvl in s.levels]  # doctest: +SKIP
        [(2220, 2967), (1110, 1483), (555, 741)]
    """

    backend: ClassVar[str] = "tifffile"

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        max_mpp: float | None = MAX_SLIDE_MPP,
        cache_bytes: int = _CACHE_BYTES,
    ) -> None:
        import tifffile

        self.path = Path(path)
        self._mpp_argument = mpp
        self.meta: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        with _tifffile_log() as log:  # e.g. "invalid page offset" of a truncated file: kept, not printed
            try:
                self._tf = tifffile.TiffFile(self.path)
            except Exception as exc:
                raise SlideOpenError(f"not a readable TIFF: {type(exc).__name__}: {exc}{_said(log)}") from exc
            try:
                self._setup()
                self._probe()
                self._mpp, self.mpp_source = resolve_mpp(
                    self._metadata_mpp(), mpp, what=str(self.path), max_mpp=max_mpp
                )
            except SlideOpenError as exc:
                self._tf.close()
                raise SlideOpenError(f"{exc}{_said(log)}") from exc
            except CytokenError:
                self._tf.close()
                raise
            except Exception as exc:
                self._tf.close()
                raise SlideOpenError(f"unsupported TIFF layout: {type(exc).__name__}: {exc}{_said(log)}") from exc
        if log:
            self.meta["tifffile_log"] = log

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        tf = self._tf
        candidates = [
            i
            for i, s in enumerate(tf.series)
            if (s.name or "").strip().lower() not in _SKIP_SERIES and "Y" in s.axes and "X" in s.axes
        ]
        if not candidates:
            raise SlideOpenError("no readable image series in the TIFF (truncated or corrupt file?)")
        self.series_index = candidates[0]
        series = tf.series[self.series_index]
        keyframe = series.keyframe
        if keyframe.imagedepth > 1:
            raise SlideOpenError("volumetric (tiled-depth) TIFF pages are not supported")
        page_axes = keyframe.axes
        if not series.axes.endswith(page_axes) or page_axes.replace("S", "") not in ("YX",):
            raise SlideOpenError(f"unsupported axes: series {series.axes!r}, pages {page_axes!r}")
        lead_axes = series.axes[: len(series.axes) - len(page_axes)]
        lead_shape = tuple(series.shape[: len(lead_axes)])
        samples = int(keyframe.samplesperpixel)
        chan_axis = _channel_axis(lead_axes, lead_shape)
        n_lead_channels = lead_shape[chan_axis] if chan_axis is not None else 1
        if samples > 1 and n_lead_channels > 1:
            raise SlideOpenError(f"unsupported: {n_lead_channels} channel pages of {samples} samples each")
        ignored = {a: n for i, (a, n) in enumerate(zip(lead_axes, lead_shape)) if n > 1 and i != chan_axis}
        if ignored:
            self.meta["ignored_axes"] = ignored
        self._lead_shape = lead_shape
        self._chan_axis = chan_axis
        photometric = int(keyframe.photometric)
        self._alpha = samples == 4 and photometric == 2 and keyframe.dtype == np.uint8
        n_channels = 3 if self._alpha else max(samples, n_lead_channels)
        self._samples = samples
        self._dtype = np.dtype(keyframe.dtype)
        self._level_series = list(series.levels)
        self._levels = []
        for lvl in self._level_series:
            shape = dict(zip(lvl.axes, lvl.shape))
            self._levels.append((int(shape["X"]), int(shape["Y"])))
        w0, h0 = self._levels[0]
        self._downsamples = [(w0 / w + h0 / h) / 2 for w, h in self._levels]
        names = self._metadata_channel_names(n_channels)
        rgb_like = names is None or {n.strip().lower() for n in names} <= _RGB_NAMES
        self._is_rgb = bool(
            n_channels == 3 and self._dtype == np.uint8 and (photometric in _PHOTOMETRIC_RGB or rgb_like)
        )
        if names is None:
            names = ("R", "G", "B") if self._is_rgb else tuple(f"C{i}" for i in range(n_channels))
        self._channel_names = tuple(names)

    def _probe(self) -> None:
        """Decode one segment now, so an undecodable file fails at open (and open_slide can fall back)."""
        page = self._page(0, 0)
        counts = page.databytecounts
        index = next((i for i, c in enumerate(counts) if c > 0), None)
        if index is None:
            return
        try:
            self._segment(0, 0, page, index)
        except ValueError as exc:
            hint = "; pip install imagecodecs" if "imagecodecs" in str(exc) else ""
            raise SlideOpenError(f"cannot decode the image data: {exc}{hint}") from exc

    def _metadata_mpp(self) -> float | None:
        tf = self._tf
        if tf.is_ome:
            pixels = self._ome_pixels()
            if pixels is not None and pixels.get("PhysicalSizeX"):
                unit = _UNIT_UM.get(pixels.get("PhysicalSizeXUnit", "µm").strip())
                if unit is not None:
                    return float(pixels.get("PhysicalSizeX")) * unit  # type: ignore[arg-type]
        keyframe = self._tf.series[self.series_index].keyframe
        if tf.is_svs:
            found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", keyframe.description or "")
            if found:
                return float(found.group(1))
        unit = {2: 25400.0, 3: 10000.0}.get(int(keyframe.resolutionunit))
        xres = float(keyframe.resolution[0])
        if unit is not None and xres > 0:
            return unit / xres
        return None

    def _ome_pixels(self) -> ET.Element | None:
        try:
            root = ET.fromstring(self._tf.ome_metadata or "")
        except ET.ParseError:
            return None
        images = [el for el in root.iter() if _local(el.tag) == "Image"]
        if not images:
            return None
        image = images[min(self.series_index, len(images) - 1)]
        return next((el for el in image.iter() if _local(el.tag) == "Pixels"), None)

    def _metadata_channel_names(self, n_channels: int) -> tuple[str, ...] | None:
        names: list[str] = []
        if self._tf.is_ome:
            pixels = self._ome_pixels()
            if pixels is not None:
                names = [
                    el.get("Name", "")
                    for el in pixels.iter()
                    if _local(el.tag) == "Channel" and el.get("Name")
                ]
        elif self._tf.is_qpi and self._samples == 1:
            for c in range(n_channels):
                page = self._page(0, c)
                desc = getattr(page, "description", "") or ""
                found = re.search(r"<Name>([^<]*)</Name>", desc)
                if found:
                    names.append(found.group(1).strip())
        return tuple(names) if len(names) == n_channels else None

    # ------------------------------------------------------------------ reading
    def _page(self, level: int, channel: int) -> Any:
        index = [0] * len(self._lead_shape)
        if self._chan_axis is not None and self._samples == 1:
            index[self._chan_axis] = channel
        flat = int(np.ravel_multi_index(index, self._lead_shape)) if self._lead_shape else 0
        page = self._level_series[level].pages[flat]
        if page is None:
            raise CytokenError(f"{self.path}: level {level} page {flat} is missing")
        return page

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._samples > 1:
            arr = self._read_page(level, 0, x, y, width, height)
        else:
            arr = np.concatenate(
                [self._read_page(level, c, x, y, width, height) for c in range(len(self._channel_names))],
                axis=2,
            )
        if self._alpha:
            a = arr[:, :, 3:4].astype(np.float32) / 255.0
            arr = np.rint(arr[:, :, :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
        return arr

    def read_plane(self, channel: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """One channel of a level-0 window lying inside the image, as stored (no resampling, no fill).

        Only the tiles or strips of that channel's page that meet the window are decoded, so a marker can be read
        crop by crop from a many-channel image.

        Args:
            channel: channel index (a page of a multi-page image, or a sample of an RGB-like page).
            x: left column.
            y: top row.
            width: columns (>= 1).
            height: rows (>= 1).

        Returns:
            ``(height, width)`` array of :attr:`dtype`.

        Raises:
            ValueError: a channel out of range or a window that leaves the image.
            CytokenError: the file cannot be decoded there.
        """
        w0, h0 = self._levels[0]
        if not 0 <= channel < self.channels:
            raise ValueError(f"read_plane: channel {channel} out of range (the image has {self.channels})")
        if width < 1 or height < 1 or x < 0 or y < 0 or x + width > w0 or y + height > h0:
            raise ValueError(f"read_plane: window x={x} y={y} {width}x{height} leaves the {w0}x{h0} image")
        if self._closed:
            raise CytokenError(f"{self.path}: the slide is closed")
        page_channel, sample = (0, channel) if self._samples > 1 else (channel, 0)
        try:
            return self._read_page(0, page_channel, x, y, width, height)[:, :, sample]
        except CytokenError:
            raise
        except Exception as exc:
            raise CytokenError(
                f"{self.path}: failed to read channel {channel} window x={x} y={y} {width}x{height}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _read_page(self, level: int, channel: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._page(level, channel)
        kf = page.keyframe
        img_h, img_w = int(kf.imagelength), int(kf.imagewidth)
        if kf.is_tiled:
            th, tw = int(kf.tilelength), int(kf.tilewidth)
        else:
            th, tw = min(int(kf.rowsperstrip), img_h), img_w
        ny, nx = math.ceil(img_h / th), math.ceil(img_w / tw)
        samples = int(kf.samplesperpixel)
        separate = int(kf.planarconfig) == 2 and samples > 1
        out = np.zeros((height, width, samples), self._dtype)
        for s in range(samples if separate else 1):
            for r in range(y // th, math.ceil((y + height) / th)):
                for c in range(x // tw, math.ceil((x + width) / tw)):
                    seg = self._segment(level, channel, page, (s * ny + r) * nx + c)
                    if seg is None:  # sparse TIFF: segment not stored
                        continue
                    sy0, sx0 = r * th, c * tw
                    y0, y1 = max(y, sy0), min(y + height, sy0 + seg.shape[0])
                    x0, x1 = max(x, sx0), min(x + width, sx0 + seg.shape[1])
                    if y1 <= y0 or x1 <= x0:
                        continue
                    block = seg[y0 - sy0 : y1 - sy0, x0 - sx0 : x1 - sx0]
                    if separate:
                        out[y0 - y : y1 - y, x0 - x : x1 - x, s] = block[:, :, 0]
                    else:
                        out[y0 - y : y1 - y, x0 - x : x1 - x] = block
        return out

    def _segment(self, level: int, channel: int, page: Any, index: int) -> np.ndarray | None:
        """Decoded strip or tile ``index`` of a page as ``(rows, cols, samples)``, cached."""
        key = (level, channel, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            if count == 0 or offset == 0:
                seg = None
            else:
                fh = self._tf.filehandle
                fh.seek(offset)
                data = fh.read(count)
                if len(data) < count:
                    raise CytokenError(
                        f"{self.path}: truncated file: segment {index} of level {level} needs {count} bytes "
                        f"at offset {offset}, got {len(data)}"
                    )
                kf = page.keyframe
                jpegtables = getattr(page, "jpegtables", None) or kf.jpegtables
                decoded = kf.decode(data, index, jpegtables=jpegtables, jpegheader=kf.jpegheader)[0]
                seg = decoded.reshape(
                    decoded.shape[-3:]
                )  # (depth=1, rows, cols, samples) -> (rows, cols, samples)
            self._cache[key] = seg
            self._cache_bytes += 0 if seg is None else seg.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
            return seg

    def _close(self) -> None:
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()
        self._cache.clear()


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_log() -> Any:
    """Collect tifffile's log messages (warnings and errors) in a list while the block runs.

    With a handler on its logger, Python's last-resort handler no longer prints them as stray stderr lines; a
    failed open reports them in its error (:func:`_said`), a successful one keeps them in ``meta``.
    """
    records: list[str] = []
    handler = _ListHandler(records)
    log = logging.getLogger("tifffile")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def _said(log: list[str]) -> str:
    return f" (tifffile: {'; '.join(dict.fromkeys(log))})" if log else ""


def _channel_axis(axes: str, shape: tuple[int, ...]) -> int | None:
    """Index of the leading axis holding channels (C preferred, else another channel-like axis), or None."""
    for letter in _CHANNEL_AXES:
        if letter in axes and shape[axes.index(letter)] > 1:
            return axes.index(letter)
    return None


def _local(tag: str) -> str:
    """XML tag without its namespace."""
    return tag.rsplit("}", 1)[-1]
