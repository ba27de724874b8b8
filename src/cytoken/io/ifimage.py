"""Immunofluorescence (IF) images: multi-channel OME-TIFF, Akoya/Vectra ``.qptiff`` and one file per marker.

:func:`read_if` returns an :class:`IFImage`, a ``(C, H, W)`` array with channel names and µm/px. Channels are chosen
by name (case-insensitive) or index; an unknown name raises :class:`~cytoken.types.CytokenError` listing the names
the file has. :func:`write_ome_tiff` writes the same structure back as an OME-TIFF (channel names and pixel size in
the OME-XML), so that a synthetic or resampled IF image can be saved and read again.

Formats:
    * OME-TIFF: series 0 (the full-resolution level of a pyramid), axes reduced to ``CYX``; channel names from
      ``Pixels/Channel/@Name``; µm/px from ``Pixels/@PhysicalSizeX`` (and its unit).
    * Akoya/Vectra QPTIFF (PerkinElmer): series 0 is the full-resolution stack with one page per channel; each
      page's ImageDescription is PerkinElmer XML whose top-level ``<Name>`` is the channel name. µm/px from the TIFF
      resolution tags (pixels per centimetre), falling back to ``ScanProfile//PixelSizeMicrons`` in the XML.
    * Any other TIFF: series 0 as ``CYX`` (a 2-D image is one channel), names ``ch0, ch1, ...``, µm/px from the
      resolution tags when the unit is centimetre or inch.
    * NumPy ``.npy``: a ``(C, H, W)`` array (a 2-D array is one channel); names from a sidecar text file
      ``<stem>.channels.txt`` (one name per line) when present, else ``ch0, ch1, ...``; µm/px only from the caller.
    * One single-channel file per marker (TIFF, PNG, ...): pass several paths (names = file stems) or a
      ``{name: path}`` mapping. An RGB export of one marker is reduced to one channel by its per-pixel maximum.

Model inputs: :func:`match_channels`, :func:`intensity_ranges` and :func:`to_unit` live in
:mod:`cytoken.io.channels` and are re-exported here.

This module is layer 1 (io): numpy, tifffile and Pillow only.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import atomic_path
from cytoken.io.channels import (
    INTENSITY_RULES,
    PERCENTILES,
    ChannelKey,
    IntensityRule,
    channel_index,
    intensity_ranges,
    match_channels,
    to_unit,
)
from cytoken.types import CytokenError, validate_mpp

__all__ = [
    "INTENSITY_RULES",
    "PERCENTILES",
    "IFImage",
    "IntensityRule",
    "intensity_ranges",
    "match_channels",
    "read_if",
    "tiff_channel_info",
    "to_unit",
    "write_ome_tiff",
]

PathLike = str | Path

_UNIT_TO_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "å": 1e-4,
}


@dataclass
class IFImage:
    """A multi-channel immunofluorescence image.

    Attributes:
        data: (C, H, W) array, one plane per channel, dtype as stored (or float32 after resampling).
        channel_names: C channel names, in ``data`` order.
        mpp: µm/px of the pixel grid, or None when neither the file nor the caller gave it.
        path: the file (or first file) the image was read from, None for in-memory images.
        meta: free-form extra information (format, per-channel source files, ...).
    """

    data: np.ndarray
    channel_names: tuple[str, ...]
    mpp: float | None = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"IFImage.data must be (C, H, W), got shape {data.shape}")
        self.data = data
        self.channel_names = tuple(str(n) for n in self.channel_names)
        if len(self.channel_names) != data.shape[0]:
            raise ValueError(f"IFImage: {len(self.channel_names)} channel names for {data.shape[0]} channels")
        if self.mpp is not None:
            self.mpp = validate_mpp(self.mpp, source="IFImage.mpp")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every channel."""
        return int(self.data.shape[1]), int(self.data.shape[2])

    def index(self, key: ChannelKey) -> int:
        """Position of a channel given by name (case-insensitive) or index (negative counts from the end).

        Raises:
            CytokenError: when the name is not a channel or the index is out of range; lists the channels.

        Example:
            >>> img = IFImage(np.zeros((2, 4, 4)), ("DAPI", "CD45"))
            >>> img.index("cd45"), img.index(-1)
            (1, 1)
        """
        return channel_index(key, self.channel_names, self.path)

    def channel(self, key: ChannelKey) -> np.ndarray:
        """One (H, W) plane, by name (case-insensitive) or index.

        Example:
            >>> IFImage(np.arange(8).reshape(2, 2, 2), ("DAPI", "CD3")).channel("dapi").tolist()
            [[0, 1], [2, 3]]
        """
        return self.data[self.index(key)]

    def select(self, channels: ChannelKey | Sequence[ChannelKey]) -> IFImage:
        """A new image with only the given channels, in the given order.

        Example:
            >>> IFImage(np.zeros((3, 2, 2)), ("DAPI", "FITC", "Cy3")).select(["cy3", 0]).channel_names
            ('Cy3', 'DAPI')
        """
        keys = [channels] if isinstance(channels, str | int) else list(channels)
        if not keys:
            raise CytokenError("no channels selected; give at least one channel name or index")
        idx = [self.index(k) for k in keys]
        return IFImage(
            data=self.data[idx],
            channel_names=tuple(self.channel_names[i] for i in idx),
            mpp=self.mpp,
            path=self.path,
            meta=dict(self.meta),
        )


def read_if(
    path: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
    *,
    channels: ChannelKey | Sequence[ChannelKey] | None = None,
    mpp: float | None = None,
) -> IFImage:
    """Read an immunofluorescence image as ``(C, H, W)`` with channel names and µm/px.

    Args:
        path: one multi-channel file (OME-TIFF, QPTIFF, TIFF), several single-channel files (channel names are the
            file stems) or a ``{channel name: file}`` mapping.
        channels: channel names (case-insensitive) or indices to keep, in that order; None keeps all.
        mpp: µm/px to use instead of the file's (required for formats that do not store it, e.g. PNG).

    Returns:
        The image; ``mpp`` is None when neither the file nor ``mpp`` gives it.

    Raises:
        CytokenError: a missing file, an unsupported layout, files of different sizes, or a channel that is not in
            the file (the message lists the available channels).

    Example:
        >>> img = read_if("small_vectra.qptiff", channels=["DAPI"])  # doctest: +SKIP
        >>> img.data.shape, img.channel_names, round(img.mpp, 4)  # doctest: +SKIP
        ((1, 1440, 1920), ('DAPI',), 0.4965)
    """
    if isinstance(path, Mapping):
        if not path:
            raise CytokenError("read_if: the {name: path} mapping is empty")
        img = _read_per_marker([Path(p) for p in path.values()], [str(k) for k in path])
    elif isinstance(path, str | Path):
        img = _read_multichannel(Path(path), channels)
    else:
        paths = [Path(p) for p in path]
        if not paths:
            raise CytokenError("read_if: no paths given")
        if len(paths) == 1:
            img = _read_multichannel(paths[0], channels)
        else:
            img = _read_per_marker(paths, [p.stem for p in paths])
    if channels is not None and not img.meta.pop("_selected", False):
        img = img.select(channels)
    if mpp is not None:
        img.mpp = validate_mpp(mpp, source="read_if(mpp=...)")
    return img


# ---------------------------------------------------------------------------------------------- multi-channel files
def _read_multichannel(path: Path, channels: ChannelKey | Sequence[ChannelKey] | None) -> IFImage:
    if not path.exists():
        raise CytokenError(f"IF image not found: {path}")
    if path.suffix.lower() == ".npy":
        return _read_npy(path, channels)
    if path.suffix.lower() not in {
        ".tif",
        ".tiff",
        ".qptiff",
        ".btf",
        ".ome",
    } and not path.name.lower().endswith(".ome.tif"):
        return _read_per_marker([path], [path.stem])
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for non-TIFF input
        raise CytokenError(f"cannot read {path} as TIFF: {exc}") from exc
    with tf:
        series = tf.series[0]
        first = series.pages[0]
        desc = getattr(first, "description", "") or ""
        if tf.is_ome and tf.ome_metadata:
            return _read_ome(tf, path)
        if "PerkinElmer-QPI-ImageDescription" in desc[:500]:
            return _read_qptiff(tf, path, channels)
        data = _as_cyx(series.asarray(), series.axes, path)
        return IFImage(
            data=data,
            channel_names=tuple(f"ch{i}" for i in range(data.shape[0])),
            mpp=_mpp_from_tags(first),
            path=path,
            meta={"format": "tiff"},
        )


def _read_npy(path: Path, channels: ChannelKey | Sequence[ChannelKey] | None) -> IFImage:
    """A (C, H, W) ``.npy`` stack, memory-mapped so only the selected channels are read."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CytokenError(f"cannot read {path} as a NumPy array: {exc}") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise CytokenError(f"{path}: a .npy image must be (C, H, W) or (H, W), got shape {arr.shape}")
    if arr.shape[2] <= 16 < min(arr.shape[0], arr.shape[1]):
        raise CytokenError(
            f"{path}: shape {arr.shape} looks like (H, W, C); save the stack channels-first, "
            "e.g. np.save(path, np.moveaxis(a, -1, 0))"
        )
    if arr.dtype.kind not in "biuf":
        raise CytokenError(f"{path}: unsupported pixel type {arr.dtype} (expected integers, floats or booleans)")
    sidecar = path.with_name(f"{path.stem}.channels.txt")
    if sidecar.is_file():
        names = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != arr.shape[0]:
            raise CytokenError(f"{sidecar} names {len(names)} channels, {path} has {arr.shape[0]}")
    else:
        names = [f"ch{i}" for i in range(arr.shape[0])]
    wanted = list(range(arr.shape[0]))
    if channels is not None:
        keys = [channels] if isinstance(channels, str | int) else list(channels)
        if not keys:
            raise CytokenError("no channels selected; give at least one channel name or index")
        wanted = [channel_index(k, names, path) for k in keys]
    return IFImage(
        data=np.asarray(arr[wanted]),
        channel_names=tuple(names[i] for i in wanted),
        path=path,
        meta={"format": "npy", "all_channels": tuple(names), "_selected": channels is not None},
    )


def _as_cyx(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reduce a tifffile series to (C, H, W); singleton non-spatial axes are dropped, 'S' (samples) counts as C."""
    axes = axes.upper()
    if len(axes) != arr.ndim:
        raise CytokenError(f"{path}: axes {axes!r} do not match array shape {arr.shape}")
    keep = []
    for i, ax in enumerate(axes):
        if ax in "YX" or arr.shape[i] > 1:
            keep.append(i)
    arr = arr.squeeze(axis=tuple(i for i in range(arr.ndim) if i not in keep))
    axes = "".join(axes[i] for i in keep)
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1:
        raise CytokenError(
            f"{path}: cannot reduce axes {axes!r} (shape {arr.shape}) to channels x rows x columns; "
            "only one non-spatial axis (C, S or a single page axis) is supported"
        )
    if not extra:
        return arr[None]
    return np.moveaxis(arr, axes.index(extra[0]), 0)


def _read_ome(tf: Any, path: Path) -> IFImage:
    series = tf.series[0]
    data = _as_cyx(series.asarray(), series.axes, path)
    names, mpp = _ome_info(tf, path)
    if len(names) != data.shape[0]:
        names = [f"ch{i}" for i in range(data.shape[0])]
    return IFImage(data=data, channel_names=tuple(names), mpp=mpp, path=path, meta={"format": "ome-tiff"})


def _ome_info(tf: Any, path: Path) -> tuple[list[str], float | None]:
    """Channel names and µm/px from the OME-XML (no pixel is decoded)."""
    root = ET.fromstring(tf.ome_metadata)
    pixels = next((el for el in root.iter() if _local(el.tag) == "Pixels"), None)
    names: list[str] = []
    mpp = None
    if pixels is not None:
        names = [ch.get("Name") or f"ch{i}" for i, ch in enumerate(e for e in pixels if _local(e.tag) == "Channel")]
        size = pixels.get("PhysicalSizeX")
        if size is not None:
            unit = (pixels.get("PhysicalSizeXUnit") or "µm").strip().lower()
            factor = _UNIT_TO_UM.get(unit)
            if factor is None:
                raise CytokenError(f"{path}: unsupported OME PhysicalSizeXUnit {unit!r}; allowed {sorted(_UNIT_TO_UM)}")
            mpp = float(size) * factor
    return names, mpp


def tiff_channel_info(path: PathLike) -> tuple[tuple[str, ...] | None, float | None, str]:
    """Channel names, µm/px and format of an IF TIFF as :func:`read_if` reports them, from the metadata only.

    Args:
        path: an OME-TIFF, QPTIFF or plain TIFF.

    Returns:
        ``(names, mpp, format)``: names None when the file does not name its channels (``read_if`` then uses
        ``ch0, ch1, ...``), mpp None when it does not record it, format ``"ome-tiff"``, ``"qptiff"`` or ``"tiff"``.

    Raises:
        CytokenError: the file is missing or not a TIFF.

    Example:
        >>> tiff_channel_info("small_vectra.qptiff")  # doctest: +SKIP
        (('DAPI', 'FITC', 'Cy3'), 0.4965..., 'qptiff')
    """
    import tifffile

    path = Path(path)
    if not path.exists():
        raise CytokenError(f"IF image not found: {path}")
    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for non-TIFF input
        raise CytokenError(f"cannot read {path} as TIFF: {exc}") from exc
    with tf:
        first = tf.series[0].pages[0]
        desc = getattr(first, "description", "") or ""
        if tf.is_ome and tf.ome_metadata:
            names, mpp = _ome_info(tf, path)
            return tuple(names) or None, mpp, "ome-tiff"
        if "PerkinElmer-QPI-ImageDescription" in desc[:500]:
            qnames, mpp = _qptiff_info(list(tf.series[0].pages))
            return tuple(qnames), mpp, "qptiff"
        return None, _mpp_from_tags(first), "tiff"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _qpi_xml(description: str) -> ET.Element | None:
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", description)
    try:
        return ET.fromstring(text)
    except ET.ParseError:
        return None


def _read_qptiff(tf: Any, path: Path, channels: ChannelKey | Sequence[ChannelKey] | None) -> IFImage:
    """Read series 0 of a PerkinElmer QPTIFF, decoding only the pages of the requested channels."""
    series = tf.series[0]
    pages = list(series.pages)
    names, mpp = _qptiff_info(pages)
    if channels is None:
        wanted = list(range(len(pages)))
    else:
        keys = [channels] if isinstance(channels, str | int) else list(channels)
        if not keys:
            raise CytokenError("no channels selected; give at least one channel name or index")
        wanted = [channel_index(k, names, path) for k in keys]
    decoded = {i: pages[i].asarray() for i in set(wanted)}
    planes = [decoded[i] for i in wanted]
    if any(p.ndim != 2 for p in planes):
        raise CytokenError(f"{path}: QPTIFF series 0 pages are not single-channel planes ({planes[0].shape})")
    return IFImage(
        data=np.stack(planes),
        channel_names=tuple(names[i] for i in wanted),
        mpp=mpp,
        path=path,
        meta={"format": "qptiff", "all_channels": tuple(names), "_selected": channels is not None},
    )


def _qptiff_info(pages: list[Any]) -> tuple[list[str], float | None]:
    """Channel names (each page's PerkinElmer XML ``<Name>``) and µm/px (tags, else the XML) of a QPTIFF."""
    names: list[str] = []
    xml0 = None
    for i, page in enumerate(pages):
        xml = _qpi_xml(page.description or "")
        if i == 0:
            xml0 = xml
        name_el = xml.find("Name") if xml is not None else None
        names.append(name_el.text.strip() if name_el is not None and name_el.text else f"ch{i}")
    mpp = _mpp_from_tags(pages[0])
    if mpp is None and xml0 is not None:
        el = xml0.find(".//ScanResolution/PixelSizeMicrons")
        if el is not None and el.text:
            mpp = float(el.text)
    return names, mpp


def _mpp_from_tags(page: Any) -> float | None:
    """µm/px from TIFF XResolution + ResolutionUnit (2 = inch, 3 = centimetre); None when absent or unitless."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den:
        return None
    px_per_unit = num / den
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)
    if um_per_unit is None:
        return None
    mpp = um_per_unit / px_per_unit
    try:
        return validate_mpp(mpp, source="TIFF resolution tags")
    except ValueError:
        return None  # default 72 dpi and similar placeholders are not a scan resolution


# ---------------------------------------------------------------------------------------------- one file per marker
def _read_plane(path: Path) -> tuple[np.ndarray, float | None]:
    if not path.exists():
        raise CytokenError(f"IF channel file not found: {path}")
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            arr = tf.series[0].asarray()
            mpp = _mpp_from_tags(tf.series[0].pages[0])
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except OSError as exc:
            raise CytokenError(f"cannot read image {path}: {exc}") from exc
        mpp = None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].max(axis=-1)  # a pseudo-coloured export of one marker
    if arr.ndim != 2:
        raise CytokenError(f"{path}: expected a single-channel image, got shape {arr.shape}")
    return arr, mpp


def _read_per_marker(paths: Sequence[Path], names: Sequence[str]) -> IFImage:
    planes, mpps = zip(*(_read_plane(p) for p in paths))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        detail = ", ".join(f"{p.name}: {a.shape}" for p, a in zip(paths, planes))
        raise CytokenError(f"single-channel IF files must all have the same size; got {detail}")
    lower = [n.lower() for n in names]
    if len(set(lower)) != len(lower):
        raise CytokenError(f"duplicate channel names {list(names)}; give a {{name: path}} mapping")
    dtype = np.result_type(*planes)
    known = [m for m in mpps if m is not None]
    return IFImage(
        data=np.stack([p.astype(dtype, copy=False) for p in planes]),
        channel_names=tuple(names),
        mpp=known[0] if known else None,
        path=paths[0],
        meta={"format": "per-marker", "files": tuple(str(p) for p in paths)},
    )


# ---------------------------------------------------------------------------------------------- model inputs
def write_ome_tiff(image: IFImage, path: PathLike) -> Path:
    """Write an :class:`IFImage` as an OME-TIFF (axes ``CYX``, channel names and PhysicalSizeX/Y in µm).

    Args:
        image: the image to write.
        path: target file; written to a temporary sibling first and then renamed (atomic).

    Returns:
        The path written.

    Example:
        >>> img = IFImage(np.zeros((2, 8, 8), np.uint8), ("DAPI", "CD45"), mpp=0.5)
        >>> p = write_ome_tiff(img, "/tmp/_cytoken_doctest.ome.tif")
        >>> read_if(p).channel_names, read_if(p).mpp
        (('DAPI', 'CD45'), 0.5)
    """
    import tifffile

    path = Path(path)
    meta: dict[str, Any] = {"axes": "CYX", "Channel": {"Name": list(image.channel_names)}}
    if image.mpp is not None:
        meta.update(PhysicalSizeX=image.mpp, PhysicalSizeY=image.mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(image.data), ome=True, metadata=meta, photometric="minisblack")
    return path
