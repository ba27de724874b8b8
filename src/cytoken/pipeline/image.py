"""Segmenting in-memory images: resample to the model's µm/px, sliding window, keep each cell once, map back.

RGB models read (H, W, 3) uint8 images. Models with other input channels (``SegmenterConfig.channels``, see
:mod:`cytoken.models.multichannel`) read an :class:`~cytoken.io.ifimage.IFImage` (or an (H, W, C) array in the
model's channel order), optionally stacked with an H&E image (``he``, channels ``R``, ``G``, ``B``): the model's
channels are picked by name (:func:`select_model_channels`), scaled per channel to [0, 1] by
``SegmentConfig.intensity`` and windowed as (C, tile, tile) float inputs (:class:`~cytoken.pipeline.tiles.
ChannelPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from cytoken.io.ifimage import INTENSITY_RULES, IFImage, intensity_ranges, match_channels, read_if, to_unit
from cytoken.io.tiling import TileGrid
from cytoken.models.segmenter import CellSegmenter
from cytoken.pipeline.predictor import Predictor
from cytoken.pipeline.tiles import ChannelPlan, DecodeSpec, decode_tile
from cytoken.postprocess.hover import HoverConfig
from cytoken.types import CellSet, CytokenError, validate_mpp

__all__ = [
    "LoadedInput",
    "SegmentConfig",
    "input_overlay",
    "is_multichannel",
    "load_input",
    "overlay_image",
    "segment_image",
    "segment_image_with_labels",
    "select_model_channels",
    "slide_channel_plan",
    "to_model_resolution",
]

MIN_SIDE = 32
MPP_TOLERANCE = 0.05  # relative µm/px difference below which no resampling is done
HE_NAMES = ("R", "G", "B")  # channel names of an H&E image stacked with an IF image (``he=``)
#: Channel names shown in grey on overlays of fluorescence-only models (first match wins, case-insensitive).
NUCLEAR_NAMES = ("dapi", "hoechst", "dna", "nuclear", "nuclei", "draq5", "sytox", "pi")
_CV2_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)


@dataclass(frozen=True)
class SegmentConfig:
    """Options of :func:`segment_image` (and of the slide pipeline).

    Attributes:
        batch_size: tiles per forward pass.
        tile_size: window size in model pixels (default: the model's, usually 256).
        overlap: window overlap in model pixels (default: the model's; must exceed the largest nucleus diameter).
        device: ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
        amp: mixed-precision inference.
        tta: flip test-time augmentation (4 forward passes per tile; see
            :class:`~cytoken.pipeline.predictor.Predictor`).
        embeddings: per-cell embeddings: ``mask`` (default), ``bbox`` (CellViT++ parity) or ``none``.
        hover: post-processing parameters (default :class:`HoverConfig`).
        channels: multi-channel models only: which image channel feeds each model channel, overriding the match
            by name: one image channel (name or index) per model channel in the model's order, or
            ``model=image`` pairs (see :func:`cytoken.io.ifimage.match_channels`).
        intensity: multi-channel models only: how raw intensities become [0, 1]: ``dtype`` (default; integer
            value / dtype maximum, floats unchanged) or ``percentile`` (per channel, the image's 0.5-99.5
            percentile range, clipped). Use the rule the model was trained with.

    ``device``, ``amp`` and ``tta`` say how a model is run; when a ready-made ``Predictor`` is passed instead of a
    model, its own settings apply, and asking for ``amp`` or ``tta`` that it was not built with is an error.
    """

    batch_size: int = 8
    tile_size: int | None = None
    overlap: int | None = None
    device: str = "cpu"
    amp: bool = False
    tta: bool = False
    embeddings: Literal["mask", "bbox", "none"] = "mask"
    hover: HoverConfig | None = None
    channels: tuple[str, ...] | None = None
    intensity: Literal["dtype", "percentile"] = "dtype"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CytokenError(f"batch size must be >= 1, got {self.batch_size}")
        if self.tile_size is not None and self.tile_size < MIN_SIDE:
            raise CytokenError(f"tile size must be >= {MIN_SIDE}, got {self.tile_size}")
        if self.intensity not in INTENSITY_RULES:
            raise CytokenError(f"intensity must be one of {INTENSITY_RULES}, got {self.intensity!r}")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))


# ---------------------------------------------------------------------------------------------------- channels
def _model_names(model_config: Any) -> tuple[str, ...]:
    return tuple(c.name for c in getattr(model_config, "channels", ()) or ())


def is_multichannel(model_config: Any) -> bool:
    """True when a model reads something other than plain RGB (C ≠ 3, or named channels that are not R, G, B).

    Example:
        >>> from cytoken.models import SegmenterConfig
        >>> is_multichannel(SegmenterConfig()), is_multichannel(SegmenterConfig(in_chans=2, channels=["DAPI", "CD3"]))
        (False, True)
    """
    names = [n.lower() for n in _model_names(model_config)]
    return int(getattr(model_config, "in_chans", 3)) != 3 or (bool(names) and names != ["r", "g", "b"])


def select_model_channels(
    image: IFImage | np.ndarray,
    model_config: Any,
    *,
    he: np.ndarray | None = None,
    channels: tuple[str, ...] | None = None,
    intensity: str = "dtype",
) -> tuple[np.ndarray, ChannelPlan]:
    """Pick, order and describe the channels a model reads from a multi-channel image (and an optional H&E image).

    Channels are matched by name, case-insensitively, against the model's ``config.channels`` (``channels``
    overrides the match, see :func:`cytoken.io.ifimage.match_channels`). ``he`` (H, W, 3) uint8 contributes
    channels named ``R``, ``G``, ``B``; the model must name them so. A model without channel names reads the
    image's channels in order (their count must be ``in_chans``). An (H, W, C) array is taken as channels in the
    model's order (named as the model's channels).

    Args:
        image: the multi-channel image.
        model_config: the model's :class:`~cytoken.models.SegmenterConfig`.
        he: an RGB image on the same pixel grid (registered), or None.
        channels: explicit mapping (``SegmentConfig.channels``).
        intensity: ``dtype`` or ``percentile`` (ranges computed here, on the whole image, per source channel).

    Returns:
        ``(data, plan)``: the raw (H, W, C) channels in model order (dtype kept when OpenCV can resample it,
        float32 otherwise) and the :class:`ChannelPlan` that scales and windows them.

    Raises:
        CytokenError: a channel the model reads is missing (one message listing the image's channels), sizes
            differ, or the channel count does not fit an unnamed model.

    Example:
        >>> from cytoken.models import SegmenterConfig
        >>> cfg = SegmenterConfig(in_chans=2, channels=["DAPI", "CD3"])
        >>> img = IFImage(np.zeros((3, 8, 8), np.uint16), ("cd3", "FITC", "dapi"))
        >>> data, plan = select_model_channels(img, cfg)
        >>> data.shape, plan.sources, plan.high
        ((8, 8, 2), ('dapi', 'cd3'), (65535.0, 65535.0))
    """
    if intensity not in INTENSITY_RULES:
        raise CytokenError(f"intensity must be one of {INTENSITY_RULES}, got {intensity!r}")
    c = int(model_config.in_chans)
    names = _model_names(model_config)
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3:
            raise CytokenError(f"a multi-channel image array must be (H, W, C), got shape {image.shape}")
        own = names if names and arr.shape[2] == c and he is None else tuple(f"ch{i}" for i in range(arr.shape[2]))
        image = IFImage(np.moveaxis(arr, -1, 0), own)
    where = str(image.path) if image.path is not None else "the image"
    planes: list[np.ndarray] = list(image.data)
    avail = list(image.channel_names)
    if he is not None:
        he = np.asarray(he)
        if he.ndim != 3 or he.shape[2] != 3 or he.dtype != np.uint8:
            raise CytokenError(f"the H&E image must be (H, W, 3) uint8 RGB, got {he.shape} {he.dtype}")
        if he.shape[:2] != image.shape:
            raise CytokenError(
                f"the H&E image is {he.shape[1]}x{he.shape[0]} px and {where} is "
                f"{image.shape[1]}x{image.shape[0]} px: register them onto one pixel grid first"
            )
        if not {n.lower() for n in names} & {n.lower() for n in HE_NAMES}:
            raise CytokenError(f"an H&E image was given but the model reads no {'/'.join(HE_NAMES)} channels; "
                               f"its channels: {list(names)}")  # fmt: skip
        planes = [he[..., k] for k in range(3)] + planes
        avail = list(HE_NAMES) + avail
        where = f"{where} + H&E"
    if names:
        idx = match_channels(avail, names, channels, where=where)
    elif channels is not None:
        names = tuple(f"ch{i}" for i in range(c))
        idx = match_channels(avail, names, list(channels), where=where)
    else:
        if len(avail) != c:
            raise CytokenError(f"the model reads {c} unnamed channels; {where} has {len(avail)} ({', '.join(avail)}): "
                               "choose them with --channels (one image channel per model channel)")  # fmt: skip
        names, idx = tuple(avail), list(range(c))
    if len(idx) != c:
        raise CytokenError(f"the model reads {c} channels but names {len(idx)}")
    lows, highs = [], []
    for i in idx:
        lo, hi = intensity_ranges(planes[i][None], intensity)  # type: ignore[arg-type]
        lows.append(float(lo[0]))
        highs.append(float(hi[0]))
    dtype = np.result_type(*(planes[i].dtype for i in idx))
    if dtype not in _CV2_DTYPES:
        dtype = np.dtype(np.float32)
    data = np.stack([planes[i] for i in idx], axis=-1).astype(dtype, copy=False)
    plan = ChannelPlan(tuple(names), tuple(avail[i] for i in idx), tuple(idx), tuple(lows), tuple(highs),
                       intensity)  # fmt: skip
    return data, plan


def slide_channel_plan(slide: Any, model_config: Any, config: SegmentConfig) -> ChannelPlan | None:
    """The :class:`ChannelPlan` for streaming a multi-channel slide, or None for an RGB model on an RGB slide.

    Raises:
        CytokenError: an RGB model on a non-RGB slide, a missing channel, or ``percentile`` scaling (it needs the
            whole image in memory; slides are scaled by ``dtype``).
    """
    avail = list(slide.channel_names)
    if not is_multichannel(model_config):
        if not slide.is_rgb:
            raise CytokenError(
                f"{slide.path}: the model reads RGB but the slide has {len(avail)} channel(s) of "
                f"{slide.dtype} ({', '.join(avail)}); use a model with named input channels"
            )
        return None
    if config.intensity != "dtype":
        raise CytokenError("--intensity percentile needs the whole image in memory and is not available for "
                           "whole slides; use --intensity dtype (or segment regions as images)")  # fmt: skip
    names = _model_names(model_config) or tuple(f"ch{i}" for i in range(int(model_config.in_chans)))
    if not _model_names(model_config) and config.channels is None and len(avail) == len(names):
        idx = list(range(len(names)))
    else:
        idx = match_channels(avail, names, config.channels, where=str(slide.path))
    top = float(np.iinfo(slide.dtype).max) if np.issubdtype(slide.dtype, np.integer) else 1.0
    return ChannelPlan(tuple(names), tuple(avail[i] for i in idx), tuple(idx), (0.0,) * len(idx), (top,) * len(idx))


def _nuclear_channel(names: tuple[str, ...]) -> int | None:
    low = [n.lower() for n in names]
    for key in NUCLEAR_NAMES:
        for i, n in enumerate(low):
            if n == key or n.startswith(key + " ") or (len(key) > 2 and n.startswith(key)):
                return i
    return None


def _display(plane: np.ndarray) -> np.ndarray:
    """One channel contrast-stretched (0.5-99.5 percentile) to uint8, for display only."""
    lo, hi = intensity_ranges(plane[None], "percentile")
    return np.rint(to_unit(plane[None], lo, hi, clip=True)[0] * 255).astype(np.uint8)


def overlay_image(data: np.ndarray, plan: ChannelPlan) -> np.ndarray:
    """The (H, W, 3) uint8 background of an overlay for multi-channel input (display only).

    R/G/B model channels (H&E + IF) are shown as the RGB image; otherwise a nuclear channel (DAPI, Hoechst, ...)
    in grey; otherwise the first three channels as red, green and blue (or the first channel in grey when C < 3).
    Fluorescence channels are contrast-stretched to their 0.5-99.5 percentile range.
    """
    low = [n.lower() for n in plan.names]
    rgb = [next((i for i, n in enumerate(low) if n in group), None) for group in (("r", "red"), ("g", "green"),
                                                                                  ("b", "blue"))]  # fmt: skip
    if all(i is not None for i in rgb):
        lo = np.asarray([plan.low[i] for i in rgb])  # type: ignore[index]
        hi = np.asarray([plan.high[i] for i in rgb])  # type: ignore[index]
        unit = to_unit(data[..., rgb], lo, hi, clip=True, axis=-1)
        return np.rint(unit * 255).astype(np.uint8)
    k = _nuclear_channel(plan.names)
    if k is None and plan.channels >= 3:
        return np.stack([_display(data[..., i]) for i in range(3)], axis=-1)
    grey = _display(data[..., 0 if k is None else k])
    return np.repeat(grey[..., None], 3, axis=-1)


# ---------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class LoadedInput:
    """An input file read for a model: RGB pixels, or a multi-channel image plus an optional H&E image.

    Attributes:
        image: (H, W, 3) uint8 RGB (RGB models) or the multi-channel :class:`IFImage`.
        mpp: µm/px.
        mpp_source: ``argument``, ``metadata`` or the RGB reader's source name.
        path: the file.
        he: the H&E (H, W, 3) uint8 image stacked with ``image`` (``--he``), or None.
    """

    image: np.ndarray | IFImage
    mpp: float
    mpp_source: str
    path: Path
    he: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        h, w = self.image.shape if isinstance(self.image, IFImage) else self.image.shape[:2]
        return int(w), int(h)


def load_input(
    path: str | Path, model_config: Any, *, mpp: float | None = None, he: str | Path | None = None
) -> LoadedInput:
    """Read an input file the way a model needs it.

    RGB models: :func:`cytoken.io.image.read_image`. Multi-channel models (:func:`is_multichannel`), or when
    ``he`` is given: :func:`cytoken.io.ifimage.read_if` (OME-TIFF, QPTIFF, multi-channel TIFF, ``.npy``) and
    the H&E image with ``read_image``. µm/px: ``mpp``, else the IF file's, else the H&E file's.

    Raises:
        CytokenError: unreadable files, or µm/px unknown (pass ``--mpp``).

    Example:
        >>> from cytoken.models import SegmenterConfig
        >>> cfg = SegmenterConfig(in_chans=3, channels=["DAPI", "FITC", "Cy3"])
        >>> load_input("small_vectra.qptiff", cfg).image.channel_names  # doctest: +SKIP
        ('DAPI', 'FITC', 'Cy3')
    """
    from cytoken.io.image import read_image

    path = Path(path)
    if he is None and not is_multichannel(model_config):
        loaded = read_image(path, mpp)
        return LoadedInput(loaded.array, float(loaded.mpp), loaded.mpp_source, path)  # type: ignore[arg-type]
    if not path.is_file():
        raise CytokenError(f"image file not found: {path}")
    if mpp is not None:
        try:
            mpp = validate_mpp(mpp, source="--mpp")
        except ValueError as exc:
            raise CytokenError(str(exc)) from None
    image = read_if(path)
    he_arr, he_mpp = None, None
    if he is not None:
        loaded = read_image(he, require_mpp=False)
        he_arr, he_mpp = loaded.array, loaded.mpp
    value, source = (mpp, "argument") if mpp is not None else (image.mpp or he_mpp, "metadata")
    if value is None:
        raise CytokenError(f"{path}: the µm/px of this image is unknown; pass it explicitly, e.g. --mpp 0.5")
    if min(image.shape) < MIN_SIDE:
        raise CytokenError(f"{path} is {image.shape[1]}x{image.shape[0]} px; images must be at least {MIN_SIDE} px")
    return LoadedInput(image, float(value), source, path, he_arr)


def input_overlay(loaded: LoadedInput, model_config: Any, config: SegmentConfig) -> np.ndarray:
    """The overlay background of a :class:`LoadedInput` (the RGB pixels, or :func:`overlay_image`)."""
    if isinstance(loaded.image, np.ndarray) and loaded.he is None and not is_multichannel(model_config):
        return loaded.image
    data, plan = select_model_channels(loaded.image, model_config, he=loaded.he, channels=config.channels,
                                       intensity=config.intensity)  # fmt: skip
    return overlay_image(data, plan)


# ---------------------------------------------------------------------------------------------------- windows
def to_model_resolution(image: np.ndarray, mpp: float, model_mpp: float) -> tuple[np.ndarray, float]:
    """Resample an (H, W[, C]) image to the model's µm/px; returns the image and the scale (model px per input px).

    Any channel count works for uint8, uint16, int16 and float32 data (bilinear when enlarging, area when
    shrinking).
    """
    scale = mpp / model_mpp
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        return image, 1.0
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
    out = cv2.resize(image, size, interpolation=interp)
    return (out[..., None] if image.ndim == 3 and out.ndim == 2 else out), scale


def _window(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """A ``size``² window at (x, y), padded with white where it leaves the image."""
    h, w = image.shape[:2]
    win = image[max(0, y) : min(h, y + size), max(0, x) : min(w, x + size)]
    if win.shape[:2] == (size, size):
        return win
    out = np.full((size, size, 3), 255, np.uint8)
    out[: win.shape[0], : win.shape[1]] = win
    return out


def decode_spec(model: CellSegmenter, config: SegmentConfig) -> DecodeSpec:
    """The :class:`DecodeSpec` for a model and options."""
    mc = model.config  # type: ignore[attr-defined]
    colors = tuple(tuple(c) for c in mc.class_colors) if mc.class_colors else ()
    return DecodeSpec(
        mpp=mc.mpp,
        patch_size=model.patch_size,
        class_names=mc.names if mc.num_classes else (),
        class_colors=colors,  # type: ignore[arg-type]
        hover=config.hover if config.hover is not None else model_hover_config(mc),
        embeddings=config.embeddings,
    )


def model_hover_config(model_config: Any) -> HoverConfig | None:
    """The post-processing parameters stored with a model (``SegmenterConfig.postprocess``), or None for defaults.

    Raises:
        CytokenError: when the stored parameters are not :class:`HoverConfig` fields or out of range.
    """
    params = dict(getattr(model_config, "postprocess", None) or {})
    if not params:
        return None
    try:
        return HoverConfig.from_mapping(params, where="the model's post-processing parameters")
    except ValueError as exc:
        raise CytokenError(str(exc)) from None


def segment_image(
    image: np.ndarray | IFImage,
    model: CellSegmenter | Predictor,
    mpp: float | None = None,
    *,
    config: SegmentConfig | None = None,
    progress: bool = False,
    he: np.ndarray | None = None,
) -> CellSet:
    """Find, outline and classify every nucleus of an image (see :func:`segment_image_with_labels`).

    Args:
        image: (H, W, 3) uint8 RGB for RGB models; for multi-channel models an :class:`IFImage` (channels picked
            by name, see :func:`select_model_channels`) or an (H, W, C) array in the model's channel order.
        model: a segmenter (or a :class:`Predictor` wrapping one).
        mpp: µm/px of ``image`` (default: the IFImage's own).
        config: options (:class:`SegmentConfig`), including the channel mapping and intensity rule.
        progress: show a progress bar over windows.
        he: an H&E (H, W, 3) uint8 image registered to ``image``, for models that read ``R``, ``G``, ``B`` plus
            fluorescence channels.

    Returns:
        The cells, in ``image`` pixel coordinates.

    Example:
        >>> from cytoken.models import build_segmenter, SegmenterConfig
        >>> m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test"))
        >>> cells = segment_image(np.full((64, 64, 3), 255, np.uint8), m, mpp=0.25)
        >>> len(cells) >= 0
        True
    """
    return _segment(image, model, mpp, config or SegmentConfig(), progress, with_labels=False, he=he)[0]


def segment_image_with_labels(
    image: np.ndarray | IFImage,
    model: CellSegmenter | Predictor,
    mpp: float | None = None,
    *,
    config: SegmentConfig | None = None,
    progress: bool = False,
    he: np.ndarray | None = None,
) -> tuple[CellSet, np.ndarray]:
    """Like :func:`segment_image`, also returning the (H, W) int32 instance map of the kept cells.

    The map is assembled at the model's µm/px from each tile's owned cells (ids = the CellSet's ids) and resized
    back to the input by nearest neighbour; it is what ``cytoken evaluate`` scores.
    """
    cells, labels = _segment(image, model, mpp, config or SegmentConfig(), progress, with_labels=True, he=he)
    if labels is None:  # pragma: no cover - with_labels=True always assembles a map
        raise RuntimeError("label map was not assembled")
    return cells, labels


def _segment(
    image: np.ndarray | IFImage,
    model: CellSegmenter | Predictor,
    mpp: float | None,
    config: SegmentConfig,
    progress: bool,
    *,
    with_labels: bool,
    he: np.ndarray | None = None,
) -> tuple[CellSet, np.ndarray | None]:
    """Shared implementation (``with_labels`` also assembles the instance map).

    The image is resampled to the model's µm/px, cut into overlapping windows (batched through the model), each
    window is decoded, and a cell is kept only from the window whose core holds its centroid. Coordinates are
    mapped back to the input image's pixels.

    Returns:
        A :class:`~cytoken.types.CellSet` in input pixel coordinates (``mpp`` = the input's), with embeddings, and
        the instance map when ``with_labels``.
    """
    if mpp is None and isinstance(image, IFImage):
        mpp = image.mpp
    mpp = validate_mpp(mpp, source="mpp")
    if isinstance(model, Predictor):
        predictor = model
        predictor.require(tta=config.tta, amp=config.amp)
    else:
        predictor = Predictor(model, config.device, amp=config.amp, tta=config.tta)
    seg = predictor.model
    mc = seg.config  # type: ignore[attr-defined]
    plan: ChannelPlan | None = None
    if isinstance(image, IFImage) or he is not None or is_multichannel(mc):
        image, plan = select_model_channels(image, mc, he=he, channels=config.channels, intensity=config.intensity)
    else:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CytokenError(f"segment_image expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise CytokenError(f"image of {image.shape[1]}x{image.shape[0]} px is too small (minimum {MIN_SIDE} px)")
    work, scale = to_model_resolution(image, mpp, mc.mpp)
    tile = config.tile_size or mc.tile_size
    overlap = mc.overlap if config.overlap is None else config.overlap
    if overlap >= tile:
        raise CytokenError(f"overlap {overlap} must be smaller than the tile size {tile}")
    h, w = work.shape[:2]
    grid = TileGrid((w, h), tile, overlap)
    spec = decode_spec(seg, config)
    tiles = list(grid.tiles())
    parts: list[CellSet] = []
    labels = np.zeros((h, w), np.int32) if with_labels else None
    next_id = 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="windows", unit="tile", leave=False)
    for i in range(0, len(tiles), config.batch_size):
        chunk = tiles[i : i + config.batch_size]
        if plan is None:
            batch = np.stack([_window(work, t.bounds.x, t.bounds.y, tile) for t in chunk])
        else:  # (B, C, tile, tile) float32 in [0, 1]; model.preprocess applies the per-channel mean/std
            batch = np.stack([plan.window(work, t.bounds.x, t.bounds.y, tile) for t in chunk])
        for t, out in zip(chunk, predictor(batch)):
            tc = decode_tile(out.nuclei_prob, out.hv, out.type_prob, out.tokens, t, grid, spec,
                             with_labels=with_labels)  # fmt: skip
            if labels is not None and tc.inst_map is not None and len(tc.cells):
                lut = np.zeros(int(tc.inst_map.max()) + 1, np.int32)
                lut[tc.cells.ids] = np.arange(next_id, next_id + len(tc.cells), dtype=np.int32)
                x0, y0 = t.bounds.x, t.bounds.y
                sub = tc.inst_map[: h - y0, : w - x0]
                view = labels[y0 : y0 + sub.shape[0], x0 : x0 + sub.shape[1]]
                m = sub > 0
                view[m] = lut[sub[m]]
            next_id += len(tc.cells)
            parts.append(tc.cells)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    cells = CellSet.concat(parts) if parts else CellSet.empty(mc.mpp, spec.class_names, spec.class_colors)
    if scale != 1.0:
        cells = cells.transformed(1.0 / scale, mpp=mpp)
        if labels is not None:
            yi = np.minimum(((np.arange(image.shape[0]) + 0.5) * scale).astype(np.int64), h - 1)
            xi = np.minimum(((np.arange(image.shape[1]) + 0.5) * scale).astype(np.int64), w - 1)
            labels = labels[yi[:, None], xi[None, :]]
    meta = {**cells.meta, "model_mpp": mc.mpp, "scale": scale, "tiles": len(tiles)}
    if plan is not None:
        meta["channels"] = plan.describe()
    return replace(cells, meta=meta), labels
