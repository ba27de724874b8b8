"""IF labelling of a slide, tile by tile, with ONE marker threshold for the whole slide.

A data-driven threshold computed per tile splits whatever each tile holds into two classes: a tile without a single
positive cell gets its noise labelled positive, and a tile full of positive cells gets a higher cut than its
neighbours. :func:`label_from_if_slide` therefore thresholds a slide in two passes over its H&E tiles:

1. **Registration**: :func:`~cytoken.labeling.tiled.register_tiled` (overview, then per-tile refinement), unless a
   :class:`~cytoken.labeling.tiled.TiledRegistration` is given.
2. **Threshold pass**: for each tile, the marker channel is warped onto the tile grown by a halo (so that
   background subtraction and smoothing at a tile edge see the same neighbourhood as anywhere else), its signal is
   computed with :func:`~cytoken.labeling.threshold.marker_signal`, and the tile's valid pixels are added to a
   :class:`~cytoken.labeling.histogram.SignalHistogram`. At the end, one threshold for the slide.
3. **Label pass**: each tile's signal is computed again, thresholded with the slide threshold, cleaned up (small
   objects and holes, on the halo-grown tile), and each cell's pixel counts (:func:`overlap_counts`) are summed over
   the tiles it touches; :func:`labels_from_counts` turns the sums into labels (so a cell cut by a tile border is
   labelled from all its pixels).

Reading: the H&E is read tile by tile through a :class:`~cytoken.io.slide.Slide` (``open_slide(path)``; an array
is wrapped), the IF crop by crop through an :class:`~cytoken.io.ifreader.IFReader` (``open_if(path)``; an
:class:`~cytoken.io.ifimage.IFImage` is wrapped): each pass warps only the marker crop that its halo-grown tile
maps to, and the signal range of the histogram comes from a block-wise min/max pass over the marker channel.

Memory: one halo-grown tile (signal, coverage, cells) at a time, the histogram and per-cell counts; the slide's
signal values are never held. With ``mask_path`` the marker mask is written tile by tile to a tiled TIFF and only
running pixel counts are kept, so nothing of size (H, W) is held (the overview registration is capped at
:data:`~cytoken.labeling.tiled.OVERVIEW_MAX_PX` px a side, a CellSet grows with the number of cells); without it
the (H, W) bool marker mask and IF overlap are returned (1 byte per pixel each).

Tiles whose refinement failed are left out by default (``failed_tiles="skip"``: their pixels are not valid, so
their cells come out ``no_coverage``); ``"overview"`` uses the overview transform there instead, but only on the
tiles where that transform passed the nucleus guard
(:attr:`~cytoken.labeling.tiled.TiledRegistration.overview_errors`); the others are still skipped. When no tile is
usable, or the slide-wide mask is empty or all positive, :class:`~cytoken.types.CytokenError` is raised with the
numbers, and nothing is labelled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from cytoken.io.atomic import atomic_path
from cytoken.io.ifimage import IFImage
from cytoken.io.ifreader import IFReader, open_if
from cytoken.io.slide import Slide
from cytoken.labeling.cell_labels import (
    CellLabelConfig,
    CellLabels,
    labels_from_counts,
    overlap_counts,
    qc_overlay,
    rasterize_cells,
)
from cytoken.labeling.histogram import SignalHistogram, signal_range
from cytoken.labeling.registration import RegistrationConfig
from cytoken.labeling.threshold import ThresholdConfig, marker_signal, remove_small_components, save_mask_tiff
from cytoken.labeling.tiled import (
    TiledRegistration,
    he_source,
    if_crop_box,
    if_source,
    read_tile,
    register_tiled,
    tile_grid,
)
from cytoken.types import Bounds, CellSet, CytokenError

__all__ = ["SlideLabelResult", "label_from_if_slide", "slide_qc", "slide_threshold"]

FailedTiles = Literal["skip", "overview"]
Cells = np.ndarray | CellSet | IFReader
_CROP_MARGIN_UM = 20.0  # border of each tile's IF crop beyond the box its corners and edges map to


@dataclass
class SlideLabelResult:
    """Everything :func:`label_from_if_slide` computed.

    Attributes:
        registration: the tiled registration (fitted or given).
        threshold: the one marker threshold applied to every tile.
        histogram: the pooled histogram of the marker signal it was computed from.
        labels: the per-cell label table.
        cells: the cells the labels refer to (instance map, CellSet or instance-map reader, as given).
        tiles_used: (T,) bool, tiles whose pixels were used.
        stats: signal statistics, the threshold, valid and positive pixels, positive fraction, tile counts.
        mask: (H, W) bool marker mask on the H&E grid, None when it was written to ``mask_path``.
        overlap: (H, W) bool H&E pixels covered by the IF image on usable tiles, None with ``mask_path``.
        mask_path: the tiled TIFF (0 / 255) the marker mask was written to, tile by tile, or None.
    """

    registration: TiledRegistration
    threshold: float
    histogram: SignalHistogram
    labels: CellLabels
    cells: Cells
    tiles_used: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = None
    overlap: np.ndarray | None = None
    mask_path: Path | None = None


def _halo_px(cfg: ThresholdConfig) -> int:
    """Border that makes a tile's signal equal to the whole image's inside the tile (up to negligible tails)."""
    r = cfg.background_radius_px
    bg = {"none": 0.0, "gaussian": 4.0 * r, "tophat": 2.0 * r, "rolling_ball": 2.0 * r}[cfg.background]
    return math.ceil(bg + 4.0 * cfg.smooth_sigma_px) + 2


def _usable(tr: TiledRegistration, failed_tiles: FailedTiles) -> np.ndarray:
    if failed_tiles not in ("skip", "overview"):
        raise ValueError(f"failed_tiles must be 'skip' or 'overview', got {failed_tiles!r}")
    ok = np.array([r is not None for r in tr.registrations], bool)
    return ok | tr.overview_usable() if failed_tiles == "overview" else ok


def _tile_signal(
    tr: TiledRegistration, i: int, ifr: IFReader, marker: int, cfg: ThresholdConfig, halo: int
) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """Signal and IF coverage of tile ``i`` grown by ``halo`` (clipped to the H&E grid), and the core's slices.

    Only the marker crop the grown tile maps to is read and warped.
    """
    b = tr.tiles[i]
    h, w = tr.he_shape
    x0, y0 = max(0, b.x - halo), max(0, b.y - halo)
    x1, y1 = min(w, b.x1 + halo), min(h, b.y1 + halo)
    grown = Bounds(x0, y0, x1 - x0, y1 - y0)
    reg = replace(tr.for_tile(i), he_shape=(grown.height, grown.width), he_origin_px=(float(x0), float(y0)))
    core = (slice(b.y - y0, b.y1 - y0), slice(b.x - x0, b.x1 - x0))
    cx0, cy0, cx1, cy1 = if_crop_box(reg, grown, ifr.shape, _CROP_MARGIN_UM)
    if cx1 <= cx0 or cy1 <= cy0:  # the tile maps outside the IF image
        return np.zeros((grown.height, grown.width), np.float32), np.zeros((grown.height, grown.width), bool), core
    crop = ifr.crop([marker], cx0, cy0, cx1, cy1)
    # NaN = outside the IF image (overlap_mask's rule)
    warped = reg.warp_if_to_he(crop, fill_value=np.nan, if_origin_px=(cx0, cy0)).data[0]
    valid = np.isfinite(warped)
    if not valid.any():
        return np.zeros(valid.shape, np.float32), valid, core
    return marker_signal(warped, cfg, valid=valid), valid, core


def _tile_cells(cells: Cells, b: Bounds) -> np.ndarray:
    """The (h, w) instance map of tile ``b``."""
    if isinstance(cells, CellSet):
        return rasterize_cells(cells, (b.height, b.width), origin=(b.x, b.y))
    if isinstance(cells, IFReader):
        return cells.read(0, b.x, b.y, b.x1, b.y1).astype(np.int64)
    return np.asarray(cells[b.y : b.y1, b.x : b.x1])


def _check_cells(cells: Cells, shape: tuple[int, int]) -> None:
    """An instance map (array or reader) must be integer and on the H&E grid."""
    if isinstance(cells, CellSet):
        return
    size = cells.shape if isinstance(cells, IFReader) else np.shape(cells)
    if tuple(size) != tuple(shape):
        raise CytokenError(f"the cell map is {tuple(size)}, the H&E is {tuple(shape)}")
    dtype = cells.dtype if isinstance(cells, IFReader) else np.asarray(cells).dtype
    if not np.issubdtype(dtype, np.integer):
        raise CytokenError(f"the cell map must hold integer cell ids, got {dtype}")


def _cell_ids(cells: Cells, tiles: list[Bounds]) -> np.ndarray:
    """Every cell id (an instance-map reader is read tile by tile)."""
    if isinstance(cells, CellSet):
        return np.asarray(cells.ids, np.int64).reshape(-1)
    if not isinstance(cells, IFReader):
        a = np.asarray(cells)
        return np.unique(a[a > 0]).astype(np.int64)
    parts = [np.unique(t[t > 0]) for t in (_tile_cells(cells, b) for b in tiles)]
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def mask_tiff_tile(tr: TiledRegistration) -> tuple[int, int]:
    """TIFF tile (rows, columns) of the marker mask: the slide's tile grid, which must be regular and 16-aligned."""
    return _grid_tile(tr.tiles, tr.he_shape)


def _grid_tile(tiles: list[Bounds], shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    p = max(tiles[0].width, tiles[0].height)
    if tiles != tile_grid((h, w), max(8, p)):
        raise CytokenError("the registration's tiles are not a regular grid from (0, 0); fit the registration again")
    ty = p if h > p else 16 * math.ceil(h / 16)  # a single tile row / column may have any size
    tx = p if w > p else 16 * math.ceil(w / 16)
    if ty % 16 or tx % 16:
        raise CytokenError(
            f"the marker mask is written as a tiled TIFF with the slide's {p}-px tiles, which must be a multiple of "
            f"16 px; fit the registration with a tile size (--tile-px) such as {16 * max(1, round(p / 16))}"
        )
    return ty, tx


def slide_threshold(
    registration: TiledRegistration,
    if_image: IFImage | IFReader,
    marker: str | int,
    config: ThresholdConfig | None = None,
    *,
    failed_tiles: FailedTiles = "skip",
    bins: int = 16384,
) -> tuple[float, SignalHistogram]:
    """One marker threshold for a whole slide, from the pooled histogram of its tiles' signal (pass 1).

    Args:
        registration: the tiled registration of the slide.
        if_image: the IF image (with ``mpp``), in memory or as an :class:`~cytoken.io.ifreader.IFReader`.
        marker: the channel to threshold (name or index).
        config: the signal and threshold settings (``method`` is applied to the pooled histogram).
        failed_tiles: ``"skip"`` tiles whose refinement failed, or use the ``"overview"`` transform on those of
            them where it passed the nucleus guard (:meth:`TiledRegistration.overview_usable`).
        bins: fine histogram bins over the range the signal can take (see :func:`signal_range`).

    Returns:
        The threshold and the histogram.

    Raises:
        CytokenError: no usable tile, or an empty / constant signal with a data-driven method.

    Example:
        >>> thr, hist = slide_threshold(tiled_reg, if_img, "CD3")  # doctest: +SKIP
    """
    cfg = config or ThresholdConfig()
    ifr = if_source(if_image)
    k = ifr.index(marker)
    use = _usable(registration, failed_tiles)
    if not use.any():
        raise CytokenError(f"no tile of the slide registered: {_errors(registration, failed_tiles)}")
    lo, hi = signal_range(ifr.value_range(k), cfg)
    hist = SignalHistogram(lo, hi, bins=bins)
    halo = _halo_px(cfg)
    for i in np.flatnonzero(use):
        sig, valid, core = _tile_signal(registration, int(i), ifr, k, cfg, halo)
        hist.add(sig[core][valid[core]])
    return hist.threshold(cfg), hist


def _errors(tr: TiledRegistration, failed_tiles: FailedTiles = "skip", limit: int = 3) -> str:
    ov = tr.overview_errors if failed_tiles == "overview" else None
    if failed_tiles == "overview" and ov is None:
        ov = ["overview transform not checked on the tiles (registration file without overview_errors)"] * len(tr.tiles)
    errs = [
        f"tile {i}: {e}" + (f"; {ov[i]}" if ov is not None and ov[i] and ov[i] != e else "")
        for i, e in enumerate(tr.errors)
        if e
    ]
    more = f" (+{len(errs) - limit} more)" if len(errs) > limit else ""
    return "; ".join(errs[:limit]) + more if errs else "no error recorded"


def _label_pass(
    tr: TiledRegistration,
    ifr: IFReader,
    marker: int,
    cells: Cells,
    ids: np.ndarray,
    cfg: ThresholdConfig,
    threshold: float,
    use: np.ndarray,
    counts: list[np.ndarray],
    totals: list[int],
) -> Iterator[tuple[Bounds, np.ndarray, np.ndarray]]:
    """Pass 2, tile by tile: yields each tile's marker mask and coverage; sums the per-cell and pixel counts."""
    halo = _halo_px(cfg)
    for i, b in enumerate(tr.tiles):
        inst = _tile_cells(cells, b)
        if use[i]:
            sig, valid, core = _tile_signal(tr, i, ifr, marker, cfg, halo)
            m = (sig > threshold) & valid
            m = remove_small_components(m, cfg.min_object_px)
            if cfg.fill_holes_px > 0:
                m = (~remove_small_components(~m, cfg.fill_holes_px)) & valid
            m, valid = m[core], valid[core]
        else:
            m = valid = np.zeros((b.height, b.width), bool)
        for acc, part in zip(counts, overlap_counts(inst, m, ids, valid=valid)):
            acc += part
        totals[0] += int(valid.sum())
        totals[1] += int(m.sum())
        yield b, m, valid


def label_from_if_slide(
    he_rgb: np.ndarray | Slide,
    if_image: IFImage | IFReader,
    cells: Cells,
    *,
    he_mpp: float,
    marker: str | int,
    registration: TiledRegistration | None = None,
    tile_px: int = 1024,
    overview_mpp: float = 2.0,
    registration_config: RegistrationConfig | None = None,
    threshold_config: ThresholdConfig | None = None,
    label_config: CellLabelConfig | None = None,
    cell_ids: np.ndarray | None = None,
    failed_tiles: FailedTiles = "skip",
    bins: int = 16384,
    mask_path: str | Path | None = None,
) -> SlideLabelResult:
    """Label the H&E cells of a slide for an IF marker, tile by tile, with one slide-wide threshold.

    Args:
        he_rgb: (H, W, 3) uint8 H&E, or a :class:`~cytoken.io.slide.Slide` read tile by tile (``open_slide``).
        if_image: the IF image with its µm/px and a nuclear channel (``registration_config.nuclear_channel``), in
            memory or as an :class:`~cytoken.io.ifreader.IFReader` read crop by crop (``open_if``).
        cells: (H, W) instance map on the H&E grid, a CellSet in H&E pixel coordinates (rasterised per tile), or
            an :class:`~cytoken.io.ifreader.IFReader` of an instance-map file (read per tile).
        he_mpp: µm/px of the H&E.
        marker: the IF channel to threshold (name, case-insensitive, or index).
        registration: a tiled registration to reuse (:meth:`TiledRegistration.load`); None fits one.
        tile_px: H&E tile size when fitting the registration (a given registration keeps its own tiles).
        overview_mpp: µm/px of the overview registration.
        registration_config: settings of the per-tile registrations.
        threshold_config: signal and threshold settings; the method runs on the slide's pooled histogram.
        label_config: settings of the per-cell rules.
        cell_ids: the cells to label (default: every id of the map / every cell of the CellSet).
        failed_tiles: ``"skip"`` tiles whose refinement failed (their cells get ``no_coverage``) or use the
            ``"overview"`` transform on those of them where it passed the nucleus guard (the others are skipped).
        bins: fine histogram bins.
        mask_path: write the marker mask there, tile by tile, as a tiled TIFF (the tiles must be a multiple of 16
            px) instead of returning (H, W) arrays; removed again when the mask is refused.

    Returns:
        The result (registration, threshold, histogram, labels, and the mask as arrays or as ``mask_path``).

    Raises:
        CytokenError: no usable tile, an unknown channel, or an empty / all-positive slide mask (with statistics).

    Example:
        >>> res = label_from_if_slide(he, read_if("if.qptiff"), inst_map, he_mpp=0.25, marker="CD3")  # doctest: +SKIP
        >>> res.threshold, res.labels.counts()["positive"]  # doctest: +SKIP
    """
    cfg = threshold_config or ThresholdConfig()
    slide, ifr = he_source(he_rgb, he_mpp), if_source(if_image)
    k = ifr.index(marker)
    shape = (slide.dimensions[1], slide.dimensions[0])
    if registration is None:
        if mask_path is not None:
            _grid_tile(tile_grid(shape, tile_px), shape)  # a tile size the mask TIFF cannot use: refused before work
        registration = register_tiled(
            slide, ifr, he_mpp=he_mpp, tile_px=tile_px, overview_mpp=overview_mpp, config=registration_config
        )
    elif registration.he_shape != shape:
        raise CytokenError(f"the given registration is for an H&E grid of {registration.he_shape}, the H&E is {shape}")
    tr = registration
    tile = _grid_tile(tr.tiles, shape) if mask_path is not None else None
    _check_cells(cells, shape)
    ids = _cell_ids(cells, tr.tiles) if cell_ids is None else np.asarray(cell_ids, np.int64).reshape(-1)
    threshold, hist = slide_threshold(tr, ifr, k, cfg, failed_tiles=failed_tiles, bins=bins)

    counts = [np.zeros(len(ids), np.int64) for _ in range(3)]  # area, covered, marked
    totals = [0, 0]  # valid px, positive px
    use = _usable(tr, failed_tiles)
    tiles = _label_pass(tr, ifr, k, cells, ids, cfg, threshold, use, counts, totals)
    mask = overlap = None
    if mask_path is not None:
        mask_path = save_mask_tiff((m for _, m, _ in tiles), shape, tile, mask_path)  # type: ignore[arg-type]
    else:
        mask, overlap = np.zeros(shape, bool), np.zeros(shape, bool)
        for b, m, valid in tiles:
            mask[b.y : b.y1, b.x : b.x1] = m
            overlap[b.y : b.y1, b.x : b.x1] = valid

    n_valid, n_pos = totals
    frac = n_pos / max(1, n_valid)
    stats = {
        **hist.stats(),
        "threshold": threshold,
        "valid_px": float(n_valid),
        "positive_px": float(n_pos),
        "positive_fraction": float(frac),
        "n_tiles": float(len(tr.tiles)),
        "n_tiles_used": float(use.sum()),
        "n_tiles_refinement_failed": float(len(tr.tiles) - tr.n_refined),
    }
    summary = ", ".join(f"{k}={v:.4g}" for k, v in stats.items())
    problem = None
    if n_pos < cfg.min_positive_px:
        problem = (
            f"slide marker mask is empty ({n_pos} positive px < min_positive_px={cfg.min_positive_px}) with method "
            f"{cfg.method!r}: {summary}"
        )
    elif frac > cfg.max_positive_fraction:
        problem = (
            f"slide marker mask is (almost) all positive ({frac:.1%} > max_positive_fraction="
            f"{cfg.max_positive_fraction}) with method {cfg.method!r}: {summary}"
        )
    if problem is not None:
        if mask_path is not None:
            Path(mask_path).unlink(missing_ok=True)
        raise CytokenError(problem)
    labels = labels_from_counts(ids, *counts, config=label_config, marker=ifr.channel_names[k])
    return SlideLabelResult(
        registration=tr,
        threshold=threshold,
        histogram=hist,
        labels=labels,
        cells=cells,
        tiles_used=use,
        stats=stats,
        mask=mask,
        overlap=overlap,
        mask_path=None if mask_path is None else Path(mask_path),
    )


def slide_qc(
    he_rgb: np.ndarray | Slide, result: SlideLabelResult, path: str | Path | None = None, *, max_side: int = 4096
) -> np.ndarray:
    """The QC overlay of :func:`~cytoken.labeling.qc_overlay`, drawn tile by tile and shrunk to ``max_side``.

    The H&E, the cells and the marker mask (``result.mask`` or the TIFF at ``result.mask_path``) are read one tile
    at a time, so only the shrunk overlay is held.

    Returns:
        (h, w, 3) uint8 overlay (the H&E size divided by ``ceil(max(H, W) / max_side)``).
    """
    import cv2
    from PIL import Image

    tr = result.registration
    slide = he_source(he_rgb, tr.overview.he_mpp)
    h, w = tr.he_shape
    f = max(1, math.ceil(max(h, w) / max_side))
    out = np.zeros((math.ceil(h / f), math.ceil(w / f), 3), np.uint8)
    reader = open_if(result.mask_path, mpp=tr.overview.he_mpp) if result.mask is None else None
    try:
        for b in tr.tiles:
            sl = (slice(b.y, b.y1), slice(b.x, b.x1))
            mask = result.mask[sl] if reader is None else reader.read(0, b.x, b.y, b.x1, b.y1) > 0  # type: ignore[index]
            tile = qc_overlay(read_tile(slide, b), mask, _tile_cells(result.cells, b), result.labels)
            ox0, oy0 = b.x // f, b.y // f
            ox1, oy1 = math.ceil(b.x1 / f), math.ceil(b.y1 / f)
            if f > 1:
                tile = cv2.resize(tile, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
            out[oy0:oy1, ox0:ox1] = tile
    finally:
        if reader is not None:
            reader.close()
    if path is not None:
        with atomic_path(path) as tmp:
            Image.fromarray(out).save(tmp, format="PNG")
    return out
