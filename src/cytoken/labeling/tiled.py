"""Registration of large images: a coarse overview registration, refined tile by tile.

:func:`register_tiled` reads both images window by window (an H&E :class:`~cytoken.io.slide.Slide` and an
:class:`~cytoken.io.ifreader.IFReader`; arrays in memory are wrapped), so its memory does not grow with the slide
beyond the overview:

1. **Overview**: block-averaged reads of the whole H&E (hematoxylin) and IF nuclear channel are registered at
   ``overview_mpp`` (default 2 µm/px; coarser for slides over :data:`OVERVIEW_MAX_PX` overview pixels) with the
   linear stage only (no B-spline, no nucleus guard: nuclei are not resolved at that scale). This captures the
   global rotation/translation of the section; the transform is in µm, so it holds at full resolution.
2. **Tiles**: the H&E grid is cut into non-overlapping ``tile_px`` tiles. For each tile, the IF region it maps to
   under the overview transform (plus a ``margin_um`` border) is cropped, and the tile is registered at full
   resolution starting from the overview transform (linear refinement + B-spline, with the nucleus-residual guard
   of :class:`~cytoken.labeling.registration.RegistrationConfig`).
3. A tile whose refinement fails (the optimiser left the images, too few nuclei, residual over the limit) is tried
   once more with every pixel sampled by the metric instead of a random ``sampling_fraction`` (slower, but no
   sampling luck); when that fails too, the error messages are recorded in :attr:`TiledRegistration.errors`, and
   the overview transform is judged on that tile by the same nucleus guard (:func:`~cytoken.labeling.registration.
   assess`): :attr:`TiledRegistration.overview_errors` records why it fails there, or None when it may stand in for
   the failed refinement. The overview alone is never trusted: unrelated images pass no tile's guard.

Every per-tile transform maps global H&E µm to global IF µm, so tiles can be warped independently (there is no
blending between tiles: a seam may show where neighbouring tiles' deformations differ).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import atomic_write_text
from cytoken.io.ifimage import IFImage
from cytoken.io.ifreader import IFReader
from cytoken.io.slide import ArraySlide, Slide
from cytoken.labeling.registration import (
    Registration,
    RegistrationConfig,
    assess,
    check_registration,
    fit_transform,
    hematoxylin,
    register,
)
from cytoken.types import Bounds, CytokenError, validate_mpp

__all__ = [
    "OVERVIEW_MAX_PX",
    "TiledRegistration",
    "he_source",
    "if_source",
    "read_registration",
    "read_tile",
    "register_tiled",
    "tile_grid",
]

_FORMAT = "cytoken.tiled_registration/1"


def tile_grid(shape: tuple[int, int], tile_px: int) -> list[Bounds]:
    """Non-overlapping tiles covering an (H, W) grid, row by row; edge tiles are smaller.

    Example:
        >>> [(b.x, b.y, b.width, b.height) for b in tile_grid((10, 20), 16)]
        [(0, 0, 16, 10), (16, 0, 4, 10)]
    """
    if tile_px < 8:
        raise ValueError(f"tile_px must be >= 8, got {tile_px}")
    h, w = shape
    return [
        Bounds(x, y, min(tile_px, w - x), min(tile_px, h - y))
        for y in range(0, h, tile_px)
        for x in range(0, w, tile_px)
    ]


@dataclass
class TiledRegistration:
    """An overview registration and one refined registration per H&E tile.

    Attributes:
        overview: the coarse whole-image registration.
        tiles: the H&E tiles (pixels of the full H&E grid).
        registrations: per tile, the refined registration, or None when refinement failed.
        errors: per tile, the error message of a failed refinement, else None.
        he_shape: (H, W) of the full H&E grid.
        overview_errors: per tile whose refinement failed, why the overview transform fails the nucleus guard on
            that tile, or None when it passes (then it may stand in for the refinement); None for refined tiles.
            None as a whole: not checked (a file written before this check), so no overview fallback is trusted.
    """

    overview: Registration
    tiles: list[Bounds]
    registrations: list[Registration | None]
    errors: list[str | None]
    he_shape: tuple[int, int]
    overview_errors: list[str | None] | None = None

    def overview_usable(self) -> np.ndarray:
        """(T,) bool: tiles whose refinement failed but whose overview transform passed the guard on the tile."""
        failed = np.array([r is None for r in self.registrations], bool)
        if self.overview_errors is None:
            return np.zeros_like(failed)
        return failed & np.array([e is None for e in self.overview_errors], bool)

    def for_tile(self, i: int) -> Registration:
        """The registration to use for tile ``i`` (the overview transform on that tile when refinement failed)."""
        reg = self.registrations[i]
        if reg is not None:
            return reg
        b = self.tiles[i]
        return replace(self.overview, he_shape=(b.height, b.width), he_origin_px=(float(b.x), float(b.y)), quality=None)

    def warp_if_to_he(self, if_image: IFImage, *, fill_value: float = 0.0) -> IFImage:
        """Resample the IF image onto the full H&E grid, each tile with its own registration."""
        h, w = self.he_shape
        out = np.full((if_image.data.shape[0], h, w), fill_value, np.float32)
        for i, b in enumerate(self.tiles):
            part = self.for_tile(i).warp_if_to_he(if_image, fill_value=fill_value)
            out[:, b.y : b.y1, b.x : b.x1] = part.data
        return IFImage(
            out, if_image.channel_names, mpp=self.overview.he_mpp, path=if_image.path, meta=dict(if_image.meta)
        )

    @property
    def n_refined(self) -> int:
        """Number of tiles whose refinement succeeded."""
        return sum(r is not None for r in self.registrations)

    def save(self, path: str | Path) -> Path:
        """Write the overview and every tile's registration as one JSON file, atomically."""
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "he_shape": list(self.he_shape),
            "overview": self.overview.to_dict(),
            "tiles": [[b.x, b.y, b.width, b.height] for b in self.tiles],
            "registrations": [None if r is None else r.to_dict() for r in self.registrations],
            "errors": list(self.errors),
            "overview_errors": None if self.overview_errors is None else list(self.overview_errors),
        }
        return atomic_write_text(Path(path), json.dumps(doc))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, source: str = "tiled registration") -> TiledRegistration:
        """Rebuild from the document :meth:`save` writes."""
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise CytokenError(f"{source} is not a cytoken tiled registration (expected format {_FORMAT!r})")
        return cls(
            overview=Registration.from_dict(doc["overview"], source=source),
            tiles=[Bounds(*map(int, t)) for t in doc["tiles"]],
            registrations=[
                None if r is None else Registration.from_dict(r, source=source) for r in doc["registrations"]
            ],
            errors=list(doc["errors"]),
            he_shape=(int(doc["he_shape"][0]), int(doc["he_shape"][1])),
            overview_errors=None if doc.get("overview_errors") is None else list(doc["overview_errors"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> TiledRegistration:
        """Read a file written by :meth:`save`."""
        doc = _read_json(path)
        return cls.from_dict(doc, source=str(path))

    def overlap_mask(self, if_shape: tuple[int, int]) -> np.ndarray:
        """(H, W) bool H&E pixels covered by the IF image, each tile with its own registration."""
        out = np.zeros(self.he_shape, bool)
        for i, b in enumerate(self.tiles):
            out[b.y : b.y1, b.x : b.x1] = self.for_tile(i).overlap_mask(if_shape)
        return out


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CytokenError(f"cannot read registration file {path}: {exc}") from exc


def read_registration(path: str | Path) -> Registration | TiledRegistration:
    """Read a registration file of either kind (:meth:`Registration.save` or :meth:`TiledRegistration.save`).

    Example:
        >>> reg = read_registration("out/registration.json")  # doctest: +SKIP
    """
    doc = _read_json(path)
    if isinstance(doc, dict) and doc.get("format") == _FORMAT:
        return TiledRegistration.from_dict(doc, source=str(path))
    return Registration.from_dict(doc, source=str(path))


def if_crop_box(reg: Registration, b: Bounds, if_shape: tuple[int, int], margin_um: float) -> tuple[int, int, int, int]:
    """IF pixel box (x0, y0, x1, y1) that tile ``b`` maps to under ``reg``, grown by ``margin_um``."""
    xs = np.linspace(b.x, b.x1 - 1, 9)
    ys = np.linspace(b.y, b.y1 - 1, 9)
    pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2) - np.asarray(reg.he_origin_px)
    q = reg.transform_points(pts)
    m = margin_um / reg.if_mpp
    h, w = if_shape
    x0 = int(np.clip(np.floor(q[:, 0].min() - m), 0, w))
    x1 = int(np.clip(np.ceil(q[:, 0].max() + m) + 1, 0, w))
    y0 = int(np.clip(np.floor(q[:, 1].min() - m), 0, h))
    y1 = int(np.clip(np.ceil(q[:, 1].max() + m) + 1, 0, h))
    return x0, y0, x1, y1


def _refine_tile(
    he_tile: np.ndarray,
    crop: IFImage,
    he_mpp: float,
    cfg: RegistrationConfig,
    overview: Registration,
    b: Bounds,
    if_origin: tuple[int, int],
) -> tuple[Registration | None, str | None]:
    """One tile's refinement; a failure with random metric sampling is retried once with every pixel sampled."""
    attempts = [cfg] if cfg.sampling_fraction >= 1 else [cfg, replace(cfg, sampling_fraction=1.0)]
    errors = []
    for attempt in attempts:
        try:
            reg = register(
                he_tile, crop, he_mpp=he_mpp, config=attempt, initial=overview, he_origin_px=(b.x, b.y),
                if_origin_px=if_origin,
            )  # fmt: skip
        except CytokenError as exc:
            errors.append(str(exc))
            continue
        return reg, None
    return None, "; then with every pixel sampled: ".join(errors)


#: Longest side of the overview registration's grid: a whole slide is registered at a coarser µm/px than
#: ``overview_mpp`` when needed, so the overview stays a few tens of MB (a 100k-px slide at 0.25 µm/px: ~6 µm/px).
OVERVIEW_MAX_PX = 4096
_READ_PX = 1024  # level-0 pixels per side of one overview read


def he_source(he: np.ndarray | Slide, he_mpp: float) -> Slide:
    """The H&E as a :class:`~cytoken.io.slide.Slide` (an array is wrapped in an ArraySlide, not copied).

    Raises:
        CytokenError: a slide whose µm/px differs from ``he_mpp``, or an array that is not an RGB image.
    """
    if isinstance(he, Slide):
        if abs(he.mpp - he_mpp) > 1e-6 * he_mpp:
            raise CytokenError(f"he_mpp={he_mpp:g} differs from the slide's {he.mpp:g} µm/px")
        return he
    return ArraySlide(np.asarray(he), he_mpp)


def if_source(if_image: IFImage | IFReader) -> IFReader:
    """The IF image as an :class:`~cytoken.io.ifreader.IFReader` (an in-memory image is wrapped, not copied)."""
    return if_image if isinstance(if_image, IFReader) else IFReader.from_image(if_image)


def read_tile(slide: Slide, b: Bounds) -> np.ndarray:
    """The stored (H, W, 3) uint8 pixels of a level-0 window of the H&E."""
    return slide.read_region(b, slide.mpp)


def _he_overview(slide: Slide, mpp: float) -> tuple[np.ndarray, float, float]:
    """Hematoxylin of the H&E averaged over k x k blocks of stored pixels, read block by block.

    k is the integer factor nearest below ``mpp / slide.mpp``. Hematoxylin is taken at full resolution and then
    averaged, as :func:`register` does on a whole image. Returns the plane, the origin of its pixel (0, 0) in its
    own pixels and its µm/px.
    """
    k = max(1, math.floor(mpp / slide.mpp + 1e-9))
    w0, h0 = slide.dimensions
    nw, nh = max(1, w0 // k), max(1, h0 // k)
    k = min(k, w0, h0)
    out = np.empty((nh, nw), np.float32)
    step = k * max(1, _READ_PX // k)
    for y in range(0, nh * k, step):
        for x in range(0, nw * k, step):
            x1, y1 = min(nw * k, x + step), min(nh * k, y + step)
            h = hematoxylin(read_tile(slide, Bounds(x, y, x1 - x, y1 - y)))
            out[y // k : y1 // k, x // k : x1 // k] = h.reshape((y1 - y) // k, k, (x1 - x) // k, k).mean(axis=(1, 3))
    return out, 0.5 - 0.5 / k, k * slide.mpp


def _judge_overview(
    he_tile: np.ndarray,
    crop: IFImage,
    cfg: RegistrationConfig,
    overview: Registration,
    b: Bounds,
    if_origin: tuple[int, int],
) -> str | None:
    """Why the overview transform fails the nucleus guard on tile ``b`` (None when it passes)."""
    on_tile = replace(overview, he_shape=(b.height, b.width), he_origin_px=(float(b.x), float(b.y)), quality=None)
    try:
        check_registration(assess(on_tile, he_tile, crop, config=cfg, if_origin_px=if_origin), cfg)
    except CytokenError as exc:
        return f"overview transform on this tile: {exc}"
    return None


def register_tiled(
    he_rgb: np.ndarray | Slide,
    if_image: IFImage | IFReader,
    *,
    he_mpp: float,
    tile_px: int = 1024,
    overview_mpp: float = 2.0,
    margin_um: float = 20.0,
    config: RegistrationConfig | None = None,
) -> TiledRegistration:
    """Register a large IF image to a large H&E image: overview first, then per-tile refinement.

    Both images are read window by window: the overview from block-wise binned reads (the hematoxylin of the H&E
    and the nuclear channel, :meth:`~cytoken.io.ifreader.IFReader.binned`, each averaged over blocks of stored
    pixels), each tile from its own H&E window and the nuclear channel of the IF crop it maps to, so a slide on
    disk is never held whole.

    Args:
        he_rgb: (H, W, 3) uint8 H&E in memory, or a :class:`~cytoken.io.slide.Slide` (e.g. ``open_slide(path)``).
        if_image: the IF image with ``mpp`` set, in memory or as an :class:`~cytoken.io.ifreader.IFReader`.
        he_mpp: µm/px of the H&E.
        tile_px: H&E tile size in pixels.
        overview_mpp: µm/px of the overview registration (coarser than both images; raised so that the overview
            has at most :data:`OVERVIEW_MAX_PX` pixels on a side).
        margin_um: border added around each tile's IF crop.
        config: settings of the per-tile registrations (the overview uses the same with ``working_mpp =
            overview_mpp``, no B-spline and no guard; its guard is applied per tile where refinement fails).

    Returns:
        The overview and per-tile registrations (every one in full-resolution H&E pixels and µm/px).

    Raises:
        CytokenError: the IF image has no µm/px, or SimpleITK is missing.

    Example:
        >>> tr = register_tiled(he, if_img, he_mpp=0.25, tile_px=1024)  # doctest: +SKIP
        >>> warped = tr.warp_if_to_he(if_img)  # doctest: +SKIP
    """
    he_mpp = validate_mpp(he_mpp, source="register_tiled(he_mpp=...)")
    overview_mpp = validate_mpp(overview_mpp, source="register_tiled(overview_mpp=...)")
    slide, ifr = he_source(he_rgb, he_mpp), if_source(if_image)
    if ifr.mpp is None:
        raise CytokenError("the IF image has no µm/px; pass mpp= to read_if or set IFImage.mpp")
    cfg = config or RegistrationConfig()
    nuclear = ifr.channel_names[ifr.index(cfg.nuclear_channel)]
    cfg = replace(cfg, nuclear_channel=nuclear)  # the crops below hold that channel only
    w0, h0 = slide.dimensions
    work = max(overview_mpp, he_mpp, ifr.mpp, max(w0, h0) * he_mpp / OVERVIEW_MAX_PX)
    ov_cfg = replace(cfg, working_mpp=work, bspline_grid_um=None, check=False)
    he_ov, he_org, he_ov_mpp = _he_overview(slide, work)
    k = max(1, min(math.floor(work / ifr.mpp + 1e-9), *ifr.shape))
    if_ov = ifr.binned(nuclear, k)
    if_org = 0.5 - 0.5 / k
    transform, quality = fit_transform(
        he_ov, he_ov_mpp, (he_org, he_org), if_ov, k * ifr.mpp, (if_org, if_org), config=ov_cfg, he_mpp=he_mpp
    )
    overview = Registration(transform, (h0, w0), he_mpp, ifr.mpp, nuclear_channel=nuclear, quality=quality)
    tiles = tile_grid((h0, w0), tile_px)
    regs: list[Registration | None] = []
    errors: list[str | None] = []
    ov_errors: list[str | None] = []
    for b in tiles:
        x0, y0, x1, y1 = if_crop_box(overview, b, ifr.shape, margin_um)
        if x1 - x0 < 8 or y1 - y0 < 8:
            regs.append(None)
            errors.append("tile maps outside the IF image")
            ov_errors.append("tile maps outside the IF image")
            continue
        crop = ifr.crop([nuclear], x0, y0, x1, y1)
        he_tile = read_tile(slide, b)
        reg, error = _refine_tile(he_tile, crop, he_mpp, cfg, overview, b, (x0, y0))
        regs.append(reg)
        errors.append(error)
        ov_errors.append(None if reg is not None else _judge_overview(he_tile, crop, cfg, overview, b, (x0, y0)))
    return TiledRegistration(
        overview=overview, tiles=tiles, registrations=regs, errors=errors, he_shape=(h0, w0), overview_errors=ov_errors
    )
