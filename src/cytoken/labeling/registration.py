"""Register an immunofluorescence (IF) image to an H&E image of the same tissue, nucleus channel to hematoxylin.

Both images are first brought to a common µm/px (the working grid, by default the coarser of the two): the
hematoxylin channel of the H&E (colour deconvolution, :func:`skimage.color.rgb2hed`) and the nuclear IF channel
(DAPI), each clipped to its 1st-99.5th percentile and scaled to [0, 1]. Registration (SimpleITK) then runs on that
pair in physical units (µm), in three stages over an image pyramid:

1. translation from phase correlation (:func:`skimage.registration.phase_cross_correlation`), unless an initial
   transform is given;
2. a rigid (rotation + translation) or affine transform maximising Mattes mutual information;
3. a cubic B-spline deformation (control points every ``bspline_grid_um``) on top of it, L-BFGS-B.

The result maps H&E physical coordinates (µm from the centre of H&E pixel (0, 0)) to IF physical coordinates (µm
from the centre of IF pixel (0, 0)), so it does not depend on the working grid and applies at full resolution:
:meth:`Registration.warp_if_to_he` resamples the IF image onto the H&E pixel grid.

Quality (:class:`~cytoken.labeling.quality.RegistrationQuality`): normalised mutual information and the median
nucleus-centroid residual (nuclei detected separately in the hematoxylin channel and the registered DAPI, paired by
mutual nearest neighbours within ``match_radius_um``), each before (identity in µm) and after registration. When
the residual after registration exceeds ``max_residual_px`` H&E pixels or too few nuclei pair up, :func:`register`
raises :class:`~cytoken.types.CytokenError` with the measured numbers: the images do not overlap or did not align.

SimpleITK is an optional dependency (``pip install 'cytoken[labeling]'``), imported only when needed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import atomic_write_text
from cytoken.io.ifimage import IFImage
from cytoken.labeling.itk_stages import itk_message, normalise, resample_to, run_bspline, run_linear, to_sitk
from cytoken.labeling.quality import (
    RegistrationQuality,
    detect_nuclei,
    match_points,
    normalized_mutual_information,
)
from cytoken.labeling.regconfig import RegistrationConfig, import_sitk
from cytoken.types import CytokenError, validate_mpp

__all__ = [
    "Registration",
    "RegistrationConfig",
    "assess",
    "check_registration",
    "fit_transform",
    "hematoxylin",
    "register",
]

_FORMAT = "cytoken.registration/1"
_HED_PIXELS = 1 << 18  # pixels per colour-deconvolution block of hematoxylin()


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of an RGB H&E image (colour deconvolution, Ruifrok & Johnston).

    Example:
        >>> rgb = np.full((4, 4, 3), 255, np.uint8); rgb[1, 1] = (60, 40, 140)
        >>> h = hematoxylin(rgb); bool(h[1, 1] > h[0, 0])
        True
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"hematoxylin expects an (H, W, 3) RGB image, got shape {rgb.shape}")
    out = np.empty(rgb.shape[:2], np.float32)
    rows = max(1, _HED_PIXELS // max(1, rgb.shape[1]))  # rgb2hed holds ~74 B per pixel: convert in row blocks
    for y in range(0, rgb.shape[0], rows):
        out[y : y + rows] = rgb2hed(rgb[y : y + rows, :, :3])[..., 0]
    return out


@dataclass
class Registration:
    """A fitted IF-to-H&E mapping and its quality.

    Attributes:
        transform: SimpleITK transform from H&E physical coordinates (µm) to IF physical coordinates (µm).
        he_shape: (H, W) of the H&E grid the IF image is resampled onto.
        he_mpp: µm/px of the H&E grid.
        if_mpp: µm/px of the IF image.
        he_origin_px: (x, y) of H&E pixel (0, 0) in the full H&E image (non-zero for a tile of a slide).
        nuclear_channel: the IF channel that was registered.
        quality: measures before and after registration (None for a transform built by hand).
    """

    transform: Any
    he_shape: tuple[int, int]
    he_mpp: float
    if_mpp: float
    he_origin_px: tuple[float, float] = (0.0, 0.0)
    nuclear_channel: str = "DAPI"
    quality: RegistrationQuality | None = None

    # ------------------------------------------------------------------ geometry
    def if_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """IF pixel coordinates (x, y) of the centre of every H&E grid pixel, each (H, W) float32.

        Example:
            >>> import SimpleITK as sitk  # doctest: +SKIP
            >>> reg = Registration(sitk.Transform(2, sitk.sitkIdentity), (2, 2), 0.25, 0.5)  # doctest: +SKIP
            >>> reg.if_coordinates()[0].tolist()  # doctest: +SKIP
            [[0.0, 0.5], [0.0, 0.5]]
        """
        sitk = import_sitk()
        h, w = self.he_shape
        origin = (self.he_origin_px[0] * self.he_mpp, self.he_origin_px[1] * self.he_mpp)
        field = sitk.TransformToDisplacementField(
            self.transform, sitk.sitkVectorFloat64, [w, h], origin, [self.he_mpp, self.he_mpp], [1, 0, 0, 1]
        )
        disp = sitk.GetArrayFromImage(field)  # (H, W, 2) physical (dx, dy)
        xs = origin[0] + np.arange(w) * self.he_mpp
        ys = origin[1] + np.arange(h) * self.he_mpp
        mx = ((xs[None, :] + disp[..., 0]) / self.if_mpp).astype(np.float32)
        my = ((ys[:, None] + disp[..., 1]) / self.if_mpp).astype(np.float32)
        return mx, my

    def transform_points(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) H&E pixel coordinates (x, y, relative to this grid) to IF pixel coordinates."""
        pts = np.asarray(xy, np.float64).reshape(-1, 2)
        off = np.asarray(self.he_origin_px, np.float64)
        out = np.empty_like(pts)
        for i, p in enumerate((pts + off) * self.he_mpp):
            out[i] = self.transform.TransformPoint((float(p[0]), float(p[1])))
        return out / self.if_mpp

    def overlap_mask(self, if_shape: tuple[int, int], *, if_origin_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Boolean (H, W) mask of the H&E pixels that map inside an IF image of shape ``if_shape``.

        Args:
            if_shape: (H, W) of the IF image.
            if_origin_px: (x, y) of that image's pixel (0, 0) in the full IF image, when it is a crop.
        """
        mx, my = self.if_coordinates()
        mx -= np.float32(if_origin_px[0])
        my -= np.float32(if_origin_px[1])
        h, w = if_shape
        return (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)

    def warp_if_to_he(
        self, if_image: IFImage, *, fill_value: float = 0.0, if_origin_px: tuple[float, float] = (0.0, 0.0)
    ) -> IFImage:
        """Resample every channel of the IF image onto the H&E pixel grid (bilinear).

        Args:
            if_image: the IF image (its ``mpp`` must match ``if_mpp``; None is taken as ``if_mpp``).
            fill_value: value of H&E pixels that fall outside the IF image, i.e. outside the footprint of its
                pixels (see :meth:`overlap_mask`); inside the outer half pixel the edge value is used.
            if_origin_px: (x, y) of ``if_image`` pixel (0, 0) in the full IF image, when ``if_image`` is a crop.

        Returns:
            A float32 (C, H, W) :class:`IFImage` on the H&E grid, ``mpp = he_mpp``, same channel names.
        """
        import cv2

        if if_image.mpp is not None and abs(if_image.mpp - self.if_mpp) > 1e-3 * self.if_mpp:
            raise CytokenError(
                f"IF image µm/px {if_image.mpp:g} differs from the registration's {self.if_mpp:g}; "
                "warp the image the registration was fitted on (or one on the same grid)"
            )
        mx, my = self.if_coordinates()
        mx -= np.float32(if_origin_px[0])
        my -= np.float32(if_origin_px[1])
        h, w = if_image.shape
        outside = (mx < -0.5) | (mx > w - 0.5) | (my < -0.5) | (my > h - 0.5)  # same rule as overlap_mask
        planes = []
        for ch in if_image.data:
            plane = cv2.remap(
                np.asarray(ch, np.float32), mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            plane[outside] = fill_value
            planes.append(plane)
        return IFImage(
            data=np.stack(planes),
            channel_names=if_image.channel_names,
            mpp=self.he_mpp,
            path=if_image.path,
            meta={**if_image.meta, "registered_to_he": True},
        )

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The transform (ITK text) and its metadata as a JSON-ready dict (what :meth:`save` writes)."""
        sitk = import_sitk()
        tx = self.transform
        if isinstance(tx, sitk.CompositeTransform):  # nested composites (tile refinements) cannot be written as is
            tx = sitk.CompositeTransform(tx)
            tx.FlattenTransform()
        with tempfile.TemporaryDirectory() as tmp:
            tfm = Path(tmp) / "transform.tfm"
            sitk.WriteTransform(tx, str(tfm))
            text = tfm.read_text()
        return {
            "format": _FORMAT,
            "he_shape": list(self.he_shape),
            "he_mpp": self.he_mpp,
            "if_mpp": self.if_mpp,
            "he_origin_px": list(self.he_origin_px),
            "nuclear_channel": self.nuclear_channel,
            "quality": None if self.quality is None else self.quality.to_dict(),
            "itk_transform": text,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, source: str = "registration") -> Registration:
        """Rebuild a registration from :meth:`to_dict` output (``source`` names it in error messages)."""
        sitk = import_sitk()
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise CytokenError(f"{source} is not a cytoken registration (expected format {_FORMAT!r})")
        with tempfile.TemporaryDirectory() as tmp:
            tfm = Path(tmp) / "transform.tfm"
            tfm.write_text(doc["itk_transform"])
            transform = sitk.ReadTransform(str(tfm))
        quality = doc.get("quality")
        return cls(
            transform=transform,
            he_shape=(int(doc["he_shape"][0]), int(doc["he_shape"][1])),
            he_mpp=float(doc["he_mpp"]),
            if_mpp=float(doc["if_mpp"]),
            he_origin_px=(float(doc["he_origin_px"][0]), float(doc["he_origin_px"][1])),
            nuclear_channel=str(doc["nuclear_channel"]),
            quality=None if quality is None else RegistrationQuality(**quality),
        )

    def save(self, path: str | Path) -> Path:
        """Write the transform and its metadata as one JSON file (the ITK transform text embedded), atomically."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Registration:
        """Read a registration written by :meth:`save`."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CytokenError(f"cannot read registration file {path}: {exc}") from exc
        return cls.from_dict(doc, source=str(path))


def _quality(cfg: RegistrationConfig, fixed: Any, moving: Any, transform: Any, he_mpp: float) -> RegistrationQuality:
    sitk = import_sitk()
    ident = sitk.Transform(2, sitk.sitkIdentity)
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    fix = sitk.GetArrayFromImage(fixed)
    spacing = float(np.mean(fixed.GetSpacing()))
    radius_px = max(1.0, cfg.nucleus_radius_um / spacing)
    results = {}
    for key, tx in (("before", ident), ("after", transform)):
        warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        cover = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, tx, sitk.sitkNearestNeighbor, 0.0)) > 0.5
        nmi = normalized_mutual_information(fix, warped, mask=cover) if cover.any() else 1.0
        if cover.sum() > 16:
            he_nuc = detect_nuclei(fix, radius_px, mask=cover, method=cfg.nucleus_detection)
            if_nuc = detect_nuclei(warped, radius_px, mask=cover, method=cfg.nucleus_detection)
        else:
            he_nuc = if_nuc = np.zeros((0, 2))
        match = match_points(he_nuc, if_nuc, cfg.match_radius_um / spacing)
        results[key] = (nmi, match.median * spacing / he_mpp, len(he_nuc), len(if_nuc), len(match.distances), cover)
    nmi_b, res_b, *_ = results["before"]
    nmi_a, res_a, n_he, n_if, n_m, cover = results["after"]
    denom = min(n_he, n_if)
    return RegistrationQuality(
        nmi_before=float(nmi_b),
        nmi_after=float(nmi_a),
        residual_px_before=float(res_b),
        residual_px_after=float(res_a),
        n_he_nuclei=int(n_he),
        n_if_nuclei=int(n_if),
        n_matched=int(n_m),
        matched_fraction=float(n_m / denom) if denom else 0.0,
        overlap_fraction=float(cover.mean()),
    )


def check_registration(q: RegistrationQuality, config: RegistrationConfig | None = None) -> None:
    """Raise :class:`CytokenError` (with the numbers) when a registration's quality fails the config's guard.

    The guard: at least ``min_nuclei`` hematoxylin nuclei, median residual <= ``max_residual_px`` and matched
    fraction >= ``min_matched_fraction``. :func:`register` applies it when ``config.check`` is True.
    """
    cfg = config or RegistrationConfig()
    stats = (
        f"median nucleus residual {q.residual_px_after:.2f} H&E px (before {q.residual_px_before:.2f}), "
        f"{q.n_matched} pairs of {q.n_he_nuclei} H&E / {q.n_if_nuclei} IF nuclei "
        f"(matched fraction {q.matched_fraction:.2f}), NMI {q.nmi_before:.3f} -> {q.nmi_after:.3f}, "
        f"overlap {q.overlap_fraction:.2f}"
    )
    if q.n_he_nuclei < cfg.min_nuclei:
        raise CytokenError(
            f"registration cannot be verified: {q.n_he_nuclei} nuclei found in the H&E overlap "
            f"(min_nuclei={cfg.min_nuclei}); {stats}"
        )
    if not q.residual_px_after <= cfg.max_residual_px or q.matched_fraction < cfg.min_matched_fraction:
        raise CytokenError(
            f"registration failed (images do not overlap or did not align): {stats}; limits: "
            f"max_residual_px={cfg.max_residual_px}, min_matched_fraction={cfg.min_matched_fraction}"
        )


def fit_transform(
    he_plane: np.ndarray,
    he_plane_mpp: float,
    he_origin_px: tuple[float, float],
    if_plane: np.ndarray,
    if_plane_mpp: float,
    if_origin_px: tuple[float, float],
    *,
    config: RegistrationConfig,
    he_mpp: float,
    initial: Registration | None = None,
) -> tuple[Any, RegistrationQuality]:
    """The stages of :func:`register` on two single-channel planes of any µm/px (e.g. downsampled overviews).

    Args:
        he_plane: hematoxylin (:func:`hematoxylin`) of the H&E, or of a downsampled read of it.
        he_plane_mpp: µm/px of ``he_plane``.
        he_origin_px: centre of ``he_plane`` pixel (0, 0) in the full H&E's physical frame, in ``he_plane`` pixels
            (``0.5 - 0.5 * he_mpp / he_plane_mpp`` for a plane binned from pixel (0, 0) of the full image).
        if_plane: the nuclear IF channel (or a downsampled read of it).
        if_plane_mpp: µm/px of ``if_plane``.
        if_origin_px: as ``he_origin_px``, for the IF plane in the full IF's frame.
        config: settings (``working_mpp`` None = the coarser of the two planes).
        he_mpp: µm/px of the full H&E (the unit of the residuals in the quality report).
        initial: a registration to start from (skips phase correlation).

    Returns:
        The SimpleITK transform (global H&E µm to global IF µm) and its quality report.

    Raises:
        CytokenError: the images do not overlap / did not align, or (``config.check``) the guard refused it.
    """
    cfg = config
    fixed, moving = _working_planes((he_plane, he_plane_mpp, he_origin_px), (if_plane, if_plane_mpp, if_origin_px), cfg)
    return _fit(cfg, fixed, moving, initial, he_mpp)


def _working_planes(he: tuple, nuclear: tuple, cfg: RegistrationConfig) -> tuple[Any, Any]:
    """Hematoxylin (fixed) and nuclear IF plane (moving), normalised, as SimpleITK images on the working grid.

    Each plane is given as ``(plane, µm/px, origin of its pixel (0, 0) in its own pixels)``.
    """
    work = cfg.working_mpp or max(he[1], nuclear[1])
    fix_arr, fsp, forg = resample_to(normalise(he[0]), he[1], work, he[2])
    mov_arr, msp, morg = resample_to(normalise(nuclear[0]), nuclear[1], work, nuclear[2])
    return to_sitk(fix_arr, fsp, forg), to_sitk(mov_arr, msp, morg)


def _fit(cfg: RegistrationConfig, fixed: Any, moving: Any, initial: Registration | None, he_mpp: float) -> tuple:
    """The linear then B-spline stages, the quality report and (``cfg.check``) the guard."""
    sitk = import_sitk()
    init = None if initial is None else initial.transform
    try:
        transform = run_linear(cfg, fixed, moving, init)
    except RuntimeError as exc:  # ITK raises RuntimeError, e.g. when no sample maps into the moving image
        msg = itk_message(exc)
        raise CytokenError(f"registration failed (the images do not overlap or did not align): {msg}") from exc
    deformable_error = None
    if cfg.bspline_grid_um is not None:
        # the B-spline stage only refines: when its optimiser steps out of the images (ITK raises), the linear
        # result is kept and judged by the guard like any other, and the failure is recorded in the quality report
        try:
            transform = run_bspline(cfg, fixed, moving, transform, cfg.bspline_grid_um)
        except RuntimeError as exc:
            deformable_error = itk_message(exc)
    if not isinstance(transform, sitk.CompositeTransform):
        transform = sitk.CompositeTransform([transform])
    quality = replace(_quality(cfg, fixed, moving, transform, he_mpp), deformable_error=deformable_error)
    if cfg.check:
        check_registration(quality, cfg)
    return transform, quality


def _working_pair(
    he_rgb: np.ndarray,
    if_image: IFImage,
    he_mpp: float,
    cfg: RegistrationConfig,
    he_origin_px: tuple[float, float],
    if_origin_px: tuple[float, float],
) -> tuple[Any, Any, int]:
    """Hematoxylin (fixed) and nuclear IF channel (moving) as SimpleITK images on the working grid, and its index."""
    if if_image.mpp is None:
        raise CytokenError("the IF image has no µm/px; pass mpp= to read_if or set IFImage.mpp")
    if he_rgb.ndim != 3 or he_rgb.shape[2] < 3 or he_rgb.shape[0] < 8 or he_rgb.shape[1] < 8:
        raise ValueError(f"register expects an (H, W, 3) RGB H&E image of at least 8 x 8, got {he_rgb.shape}")
    ch = if_image.index(cfg.nuclear_channel)
    if_mpp = float(if_image.mpp)
    fixed, moving = _working_planes(
        (hematoxylin(he_rgb), he_mpp, he_origin_px), (if_image.data[ch], if_mpp, if_origin_px), cfg
    )
    return fixed, moving, ch


def assess(
    registration: Registration,
    he_rgb: np.ndarray,
    if_image: IFImage,
    *,
    config: RegistrationConfig | None = None,
    if_origin_px: tuple[float, float] = (0.0, 0.0),
) -> RegistrationQuality:
    """The quality of a given registration on an H&E image (or tile) and the IF image (or crop), without fitting.

    Measured as :func:`register` measures its own result (NMI and nucleus residuals before/after, on the working
    grid of ``config``); apply :func:`check_registration` to judge it. Used to decide whether a slide's overview
    transform may stand in for a tile whose refinement failed.

    Args:
        registration: the registration to judge; its ``he_origin_px`` places ``he_rgb`` in the full H&E image.
        he_rgb: (H, W, 3) uint8 H&E image or tile.
        if_image: the IF image or a crop of it (``mpp`` set).
        config: working grid, nuclear channel and nucleus-detection settings (defaults: ``RegistrationConfig()``).
        if_origin_px: (x, y) of ``if_image`` pixel (0, 0) in the full IF image, when it is a crop.

    Returns:
        The quality report.

    Example:
        >>> q = assess(tiled.overview, he_tile, if_crop, if_origin_px=(x0, y0))  # doctest: +SKIP
        >>> check_registration(q)  # raises CytokenError with the numbers when it fails  # doctest: +SKIP
    """
    cfg = config or RegistrationConfig()
    fixed, moving, _ = _working_pair(
        np.asarray(he_rgb), if_image, registration.he_mpp, cfg, registration.he_origin_px, if_origin_px
    )
    return _quality(cfg, fixed, moving, registration.transform, registration.he_mpp)


def register(
    he_rgb: np.ndarray,
    if_image: IFImage,
    *,
    he_mpp: float,
    config: RegistrationConfig | None = None,
    initial: Registration | None = None,
    he_origin_px: tuple[float, float] = (0.0, 0.0),
    if_origin_px: tuple[float, float] = (0.0, 0.0),
) -> Registration:
    """Register an IF image (nuclear channel) to an RGB H&E image (hematoxylin).

    Args:
        he_rgb: (H, W, 3) uint8 RGB H&E image (or tile).
        if_image: the IF image; ``if_image.mpp`` must be set.
        he_mpp: µm/px of the H&E image.
        config: settings; defaults to ``RegistrationConfig()``.
        initial: a coarser registration to start from (e.g. from a slide overview); skips phase correlation.
        he_origin_px: (x, y) of ``he_rgb`` pixel (0, 0) in the full H&E image (for tiles; H&E pixels).
        if_origin_px: (x, y) of ``if_image`` pixel (0, 0) in the full IF image (for crops; IF pixels).

    Returns:
        The fitted :class:`Registration` (H&E µm to IF µm) with its quality report.

    Raises:
        CytokenError: SimpleITK missing, IF µm/px missing, nuclear channel not found, or (``config.check``) the
            registration fails the residual / matched-fraction / nucleus-count guard (message has the numbers).

    Example:
        >>> if_img = read_if("if.ome.tif")  # doctest: +SKIP
        >>> reg = register(he, if_img, he_mpp=0.25)  # doctest: +SKIP
        >>> reg.warp_if_to_he(if_img).data.shape[1:] == he.shape[:2]  # doctest: +SKIP
        True
    """
    import_sitk()  # a clear error when SimpleITK is missing, before any work
    cfg = config or RegistrationConfig()
    he_mpp = validate_mpp(he_mpp, source="register(he_mpp=...)")
    he_rgb = np.asarray(he_rgb)
    fixed, moving, ch = _working_pair(he_rgb, if_image, he_mpp, cfg, he_origin_px, if_origin_px)
    if_mpp = float(if_image.mpp)  # type: ignore[arg-type]  # checked by _working_pair
    transform, quality = _fit(cfg, fixed, moving, initial, he_mpp)
    return Registration(
        transform=transform,
        he_shape=(int(he_rgb.shape[0]), int(he_rgb.shape[1])),
        he_mpp=he_mpp,
        if_mpp=if_mpp,
        he_origin_px=(float(he_origin_px[0]), float(he_origin_px[1])),
        nuclear_channel=if_image.channel_names[ch],
        quality=quality,
    )
