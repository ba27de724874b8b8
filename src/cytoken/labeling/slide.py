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

Memory: one halo-grown tile of float signal at a time and the histogram (the slide's signal values are never
held), plus the (H, W) bool marker mask and IF overlap kept for the outputs (1 byte per pixel each).

Tiles whose refinement failed are left out by default (``failed_tiles="skip"``: their pixels are not valid, so
their cells come out ``no_coverage``); ``"overview"`` uses the overview transform there instead, but only on the
tiles where that transform passed the nucleus guard
(:attr:`~cytoken.labeling.tiled.TiledRegistration.overview_errors`); the others are still skipped. When no tile is
usable, or the slide-wide mask is empty or all positive, :class:`~cytoken.types.CytokenError` is raised with the
numbers, and nothing is labelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from cytoken.io.atomic import atomic_path
from cytoken.io.ifimage import IFImage
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
from cytoken.labeling.threshold import ThresholdConfig, _remove_small, marker_signal
from cytoken.labeling.tiled import TiledRegistration, register_tiled
from cytoken.types import Bounds, CellSet, CytokenError

__all__ = ["SlideLabelResult", "label_from_if_slide", "slide_qc", "slide_threshold"]

FailedTiles = Literal["skip", "overview"]


@dataclass
class SlideLabelResult:
    """Everything :func:`label_from_if_slide` computed.

    Attributes:
        registration: the tiled registration (fitted or given).
        threshold: the one marker threshold applied to every tile.
        histogram: the pooled histogram of the marker signal it was computed from.
        mask: (H, W) bool marker mask on the H&E grid.
        overlap: (H, W) bool H&E pixels covered by the IF image on usable tiles.
        labels: the per-cell label table.
        cells: the cells the labels refer to (instance map or CellSet, as given).
        tiles_used: (T,) bool, tiles whose pixels were used.
        stats: signal statistics, the threshold, positive pixels and fraction, tile counts.
    """

    registration: TiledRegistration
    threshold: float
    histogram: SignalHistogram
    mask: np.ndarray
    overlap: np.ndarray
    labels: CellLabels
    cells: np.ndarray | CellSet
    tiles_used: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


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
    tr: TiledRegistration, i: int, plane: IFImage, cfg: ThresholdConfig, halo: int
) -> tuple[np.ndarray, np.ndarray, Bounds, tuple[slice, slice]]:
    """Signal and IF coverage of tile ``i`` grown by ``halo`` (clipped to the H&E grid), and the core's slices."""
    b = tr.tiles[i]
    h, w = tr.he_shape
    x0, y0 = max(0, b.x - halo), max(0, b.y - halo)
    x1, y1 = min(w, b.x1 + halo), min(h, b.y1 + halo)
    reg = replace(tr.for_tile(i), he_shape=(y1 - y0, x1 - x0), he_origin_px=(float(x0), float(y0)))
    core = (slice(b.y - y0, b.y1 - y0), slice(b.x - x0, b.x1 - x0))
    warped = reg.warp_if_to_he(plane, fill_value=np.nan).data[0]  # NaN = outside the IF image (overlap_mask's rule)
    valid = np.isfinite(warped)
    if not valid.any():
        return np.zeros(valid.shape, np.float32), valid, Bounds(x0, y0, x1 - x0, y1 - y0), core
    return marker_signal(warped, cfg, valid=valid), valid, Bounds(x0, y0, x1 - x0, y1 - y0), core


def _tile_cells(cells: CellSet, b: Bounds) -> np.ndarray:
    return rasterize_cells(cells, (b.height, b.width), origin=(b.x, b.y))


def _marker_plane(if_image: IFImage, marker: str | int) -> IFImage:
    k = if_image.index(marker)
    return IFImage(if_image.data[k : k + 1], (if_image.channel_names[k],), mpp=if_image.mpp, path=if_image.path)


def slide_threshold(
    registration: TiledRegistration,
    if_image: IFImage,
    marker: str | int,
    config: ThresholdConfig | None = None,
    *,
    failed_tiles: FailedTiles = "skip",
    bins: int = 16384,
) -> tuple[float, SignalHistogram]:
    """One marker threshold for a whole slide, from the pooled histogram of its tiles' signal (pass 1).

    Args:
        registration: the tiled registration of the slide.
        if_image: the IF image (with ``mpp``).
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
    plane = _marker_plane(if_image, marker)
    lo, hi = signal_range(plane.data[0], cfg)
    hist = SignalHistogram(lo, hi, bins=bins)
    use = _usable(registration, failed_tiles)
    if not use.any():
        raise CytokenError(f"no tile of the slide registered: {_errors(registration, failed_tiles)}")
    halo = _halo_px(cfg)
    for i in np.flatnonzero(use):
        sig, valid, _, core = _tile_signal(registration, int(i), plane, cfg, halo)
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


def label_from_if_slide(
    he_rgb: np.ndarray,
    if_image: IFImage,
    cells: np.ndarray | CellSet,
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
) -> SlideLabelResult:
    """Label the H&E cells of a slide for an IF marker, tile by tile, with one slide-wide threshold.

    Args:
        he_rgb: (H, W, 3) uint8 H&E.
        if_image: the IF image with its µm/px and a nuclear channel (``registration_config.nuclear_channel``).
        cells: (H, W) instance map on the H&E grid, or a CellSet in H&E pixel coordinates (rasterised per tile).
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

    Returns:
        The result (registration, threshold, histogram, mask, overlap, labels).

    Raises:
        CytokenError: no usable tile, an unknown channel, or an empty / all-positive slide mask (with statistics).

    Example:
        >>> res = label_from_if_slide(he, read_if("if.qptiff"), inst_map, he_mpp=0.25, marker="CD3")  # doctest: +SKIP
        >>> res.threshold, res.labels.counts()["positive"]  # doctest: +SKIP
    """
    he_rgb = np.asarray(he_rgb)
    cfg = threshold_config or ThresholdConfig()
    if_image.index(marker)
    if registration is None:
        registration = register_tiled(
            he_rgb, if_image, he_mpp=he_mpp, tile_px=tile_px, overview_mpp=overview_mpp, config=registration_config
        )
    elif registration.he_shape != he_rgb.shape[:2]:
        raise CytokenError(
            f"the given registration is for an H&E grid of {registration.he_shape}, the H&E is {he_rgb.shape[:2]}"
        )
    tr = registration
    threshold, hist = slide_threshold(tr, if_image, marker, cfg, failed_tiles=failed_tiles, bins=bins)

    is_set = isinstance(cells, CellSet)
    if is_set:
        ids = np.asarray(cells.ids if cell_ids is None else cell_ids, np.int64).reshape(-1)
    else:
        inst_all = np.asarray(cells)
        if inst_all.shape != he_rgb.shape[:2]:
            raise CytokenError(f"the cell map is {inst_all.shape}, the H&E is {he_rgb.shape[:2]}")
        ids = np.unique(inst_all[inst_all > 0]) if cell_ids is None else np.asarray(cell_ids, np.int64).reshape(-1)
    ids = ids.astype(np.int64)
    area = np.zeros(len(ids), np.int64)
    covered = np.zeros(len(ids), np.int64)
    marked = np.zeros(len(ids), np.int64)
    mask = np.zeros(tr.he_shape, bool)
    overlap = np.zeros(tr.he_shape, bool)
    plane = _marker_plane(if_image, marker)
    use = _usable(tr, failed_tiles)
    halo = _halo_px(cfg)
    for i, b in enumerate(tr.tiles):
        tile_sl = (slice(b.y, b.y1), slice(b.x, b.x1))
        inst = _tile_cells(cells, b) if is_set else inst_all[tile_sl]  # type: ignore[arg-type]
        if use[i]:
            sig, valid, _, core = _tile_signal(tr, i, plane, cfg, halo)
            m = (sig > threshold) & valid
            m = _remove_small(m, cfg.min_object_px)
            if cfg.fill_holes_px > 0:
                m = (~_remove_small(~m, cfg.fill_holes_px)) & valid
            m, valid = m[core], valid[core]
        else:
            m = valid = np.zeros((b.height, b.width), bool)
        mask[tile_sl] = m
        overlap[tile_sl] = valid
        a, c, k = overlap_counts(inst, m, ids, valid=valid)
        area += a
        covered += c
        marked += k

    n_valid = int(overlap.sum())
    n_pos = int(mask.sum())
    frac = n_pos / max(1, n_valid)
    stats = {
        **hist.stats(),
        "threshold": threshold,
        "positive_px": float(n_pos),
        "positive_fraction": float(frac),
        "n_tiles": float(len(tr.tiles)),
        "n_tiles_used": float(use.sum()),
        "n_tiles_refinement_failed": float(len(tr.tiles) - tr.n_refined),
    }
    summary = ", ".join(f"{k}={v:.4g}" for k, v in stats.items())
    if n_pos < cfg.min_positive_px:
        raise CytokenError(
            f"slide marker mask is empty ({n_pos} positive px < min_positive_px={cfg.min_positive_px}) with method "
            f"{cfg.method!r}: {summary}"
        )
    if frac > cfg.max_positive_fraction:
        raise CytokenError(
            f"slide marker mask is (almost) all positive ({frac:.1%} > max_positive_fraction="
            f"{cfg.max_positive_fraction}) with method {cfg.method!r}: {summary}"
        )
    labels = labels_from_counts(
        ids, area, covered, marked, config=label_config, marker=if_image.channel_names[if_image.index(marker)]
    )
    return SlideLabelResult(
        registration=tr,
        threshold=threshold,
        histogram=hist,
        mask=mask,
        overlap=overlap,
        labels=labels,
        cells=cells,
        tiles_used=use,
        stats=stats,
    )


def slide_qc(
    he_rgb: np.ndarray, result: SlideLabelResult, path: str | Path | None = None, *, max_side: int = 4096
) -> np.ndarray:
    """The QC overlay of :func:`~cytoken.labeling.qc_overlay`, drawn tile by tile and shrunk to ``max_side``.

    Returns:
        (h, w, 3) uint8 overlay (the H&E size divided by ``ceil(max(H, W) / max_side)``).
    """
    import cv2
    from PIL import Image

    tr = result.registration
    h, w = tr.he_shape
    f = max(1, math.ceil(max(h, w) / max_side))
    out = np.zeros((math.ceil(h / f), math.ceil(w / f), 3), np.uint8)
    for b in tr.tiles:
        sl = (slice(b.y, b.y1), slice(b.x, b.x1))
        cells = result.cells
        inst = _tile_cells(cells, b) if isinstance(cells, CellSet) else np.asarray(cells)[sl]
        tile = qc_overlay(np.asarray(he_rgb)[sl], result.mask[sl], inst, result.labels)
        ox0, oy0 = b.x // f, b.y // f
        ox1, oy1 = math.ceil(b.x1 / f), math.ceil(b.y1 / f)
        if f > 1:
            tile = cv2.resize(tile, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
        out[oy0:oy1, ox0:ox1] = tile
    if path is not None:
        with atomic_path(path) as tmp:
            Image.fromarray(out).save(tmp, format="PNG")
    return out
