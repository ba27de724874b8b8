"""Synthetic immunofluorescence from an annotated H&E tile, under a known deformation: ground truth for the IF workflow.

Given the nucleus instance map of an H&E tile and the ids of the marker-positive cells, :func:`synthesize_if`
renders a two-channel IF image (``DAPI`` from every nucleus, ``MARKER`` from the positive cells' nuclei and a
membrane ring around them), as a scanner at another µm/px would see it after the section moved: a known rigid
motion plus a smooth elastic displacement (:class:`KnownWarp`), optical blur, area sampling at the IF µm/px, an
uneven background, DAPI bleed-through into the marker channel, noise and 8-bit quantisation.

Because the deformation is known, a fitted registration can be scored exactly (:meth:`KnownWarp.error_px`), and
because the positive cells are known, so can the labels derived from the IF. Nothing here is tissue-specific; the
defaults are those of the cytoken IF-labelling benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cytoken.io.ifimage import IFImage
from cytoken.types import validate_mpp

__all__ = ["KnownWarp", "SyntheticIF", "synthesize_if"]


@dataclass(frozen=True)
class KnownWarp:
    """Map from IF physical coordinates (µm) to H&E physical coordinates (µm): rotation, translation, elastic bumps.

    ``W(q) = R (q - c) + c + t + sum_k a_k exp(-|q - c_k|^2 / (2 s^2))``

    Attributes:
        angle_deg: rotation angle.
        centre_um: (x, y) rotation centre c.
        translation_um: (x, y) translation t.
        bump_centres_um: (K, 2) elastic bump centres c_k.
        bump_vectors_um: (K, 2) elastic bump displacements a_k.
        bump_sigma_um: bump width s.
    """

    angle_deg: float
    centre_um: tuple[float, float]
    translation_um: tuple[float, float]
    bump_centres_um: np.ndarray
    bump_vectors_um: np.ndarray
    bump_sigma_um: float

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """Map (..., 2) IF µm (x, y) to H&E µm (x, y)."""
        q = np.asarray(q, np.float64)
        th = np.deg2rad(self.angle_deg)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        c = np.asarray(self.centre_um)
        out = (q - c) @ rot.T + c + np.asarray(self.translation_um)
        for ck, ak in zip(self.bump_centres_um, self.bump_vectors_um):
            d2 = ((q - ck) ** 2).sum(-1, keepdims=True)
            out = out + ak * np.exp(-d2 / (2 * self.bump_sigma_um**2))
        return out

    def error_px(self, he_xy_px: np.ndarray, if_xy_px: np.ndarray, *, he_mpp: float, if_mpp: float) -> np.ndarray:
        """Registration error in H&E pixels of predicted IF positions ``if_xy_px`` for H&E points ``he_xy_px``.

        The true H&E position of IF point q is ``W(q)``; the error is ``|W(q) - p|`` for each pair (p, q).
        """
        he = np.asarray(he_xy_px, np.float64).reshape(-1, 2)
        q = np.asarray(if_xy_px, np.float64).reshape(-1, 2) * if_mpp
        return np.linalg.norm(self(q) / he_mpp - he, axis=1)


@dataclass(frozen=True)
class SyntheticIF:
    """A synthetic IF image and the deformation it was rendered under.

    Attributes:
        image: two-channel uint8 :class:`IFImage` (``DAPI``, ``MARKER``) at the IF µm/px.
        warp: IF µm -> H&E µm ground-truth mapping.
    """

    image: IFImage
    warp: KnownWarp


def _random_warp(
    rng: np.random.Generator, size_um: tuple[float, float], max_angle_deg: float, max_shift_um: float, elastic_um: float
) -> KnownWarp:
    w, h = size_um
    k = 4
    angles = rng.uniform(0, 2 * np.pi, k)
    mags = rng.uniform(0.5, 1.0, k) * elastic_um
    return KnownWarp(
        angle_deg=float(rng.uniform(-max_angle_deg, max_angle_deg)),
        centre_um=(w / 2, h / 2),
        translation_um=(
            float(rng.uniform(-max_shift_um, max_shift_um)),
            float(rng.uniform(-max_shift_um, max_shift_um)),
        ),
        bump_centres_um=np.stack([rng.uniform(0, w, k), rng.uniform(0, h, k)], 1),
        bump_vectors_um=np.stack([mags * np.cos(angles), mags * np.sin(angles)], 1),
        bump_sigma_um=float(max(w, h) / 4),
    )


def _he_signals(
    inst_map: np.ndarray, positive: np.ndarray, rng: np.random.Generator, ring_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """DAPI-like and marker-like signals on the H&E grid (float, ~[0, 1])."""
    ids, compact = np.unique(inst_map, return_inverse=True)
    compact = compact.reshape(inst_map.shape)
    n = len(ids)
    bright = rng.uniform(0.55, 1.0, n)
    bright[ids == 0] = 0.0
    is_pos = np.isin(ids, positive) & (ids != 0)
    mark = np.where(is_pos, rng.uniform(0.5, 1.0, n), 0.0)
    texture = 1.0 + 0.15 * ndi.gaussian_filter(rng.standard_normal(inst_map.shape), 1.5) / 0.19
    dapi = bright[compact] * np.clip(texture, 0.5, 1.5)
    inside = 0.6 * mark[compact]
    pos_mask = is_pos[compact]
    if pos_mask.any():
        dist, (ri, ci) = ndi.distance_transform_edt(~pos_mask, return_indices=True)
        ring = (dist > 0) & (dist <= ring_px) & (inst_map == 0)
        edge = pos_mask & (ndi.distance_transform_edt(pos_mask) <= max(1.0, ring_px / 2))
        nearest = mark[compact[ri, ci]]
        marker = inside + np.where(ring | edge, nearest, 0.0) * 0.4 + np.where(ring, nearest, 0.0) * 0.6
    else:
        marker = inside
    return dapi.astype(np.float32), marker.astype(np.float32)


def synthesize_if(
    inst_map: np.ndarray,
    positive_ids: np.ndarray | list[int],
    *,
    he_mpp: float,
    if_mpp: float = 0.5,
    seed: int = 0,
    max_angle_deg: float = 4.0,
    max_shift_um: float = 4.0,
    elastic_um: float = 1.5,
    psf_sigma_um: float = 0.4,
    ring_um: float = 1.0,
    noise: float = 0.03,
    bleed_through: float = 0.05,
    background: float = 0.15,
) -> SyntheticIF:
    """Render a synthetic two-channel IF image of an annotated H&E tile under a random known deformation.

    Args:
        inst_map: (H, W) nucleus instance map of the H&E tile (0 = background).
        positive_ids: instance ids of the marker-positive cells.
        he_mpp: µm/px of the H&E tile.
        if_mpp: µm/px of the IF image to render.
        seed: random seed (deformation, intensities, background, noise).
        max_angle_deg: rotation drawn uniformly from ±max_angle_deg.
        max_shift_um: translation components drawn uniformly from ±max_shift_um.
        elastic_um: magnitude scale of the four Gaussian elastic bumps (each 0.5-1 x this, width 1/4 of the tile).
        psf_sigma_um: optical blur (Gaussian sigma).
        ring_um: width of the membrane ring around positive nuclei.
        noise: Gaussian noise sigma (intensity units, signal peak ~1).
        bleed_through: fraction of the DAPI signal that leaks into the marker channel.
        background: peak amplitude of the smooth uneven background (both channels).

    Returns:
        The image (same field of view as the H&E tile, at ``if_mpp``) and its ground-truth :class:`KnownWarp`.

    Example:
        >>> m = np.zeros((64, 64), np.int32); m[10:20, 10:20] = 1; m[40:50, 30:40] = 2
        >>> s = synthesize_if(m, [2], he_mpp=0.25, if_mpp=0.5, seed=1)
        >>> s.image.data.shape, s.image.channel_names
        ((2, 32, 32), ('DAPI', 'MARKER'))
    """
    he_mpp = validate_mpp(he_mpp, source="synthesize_if(he_mpp=...)")
    if_mpp = validate_mpp(if_mpp, source="synthesize_if(if_mpp=...)")
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise ValueError(f"synthesize_if expects a 2-D instance map, got shape {inst_map.shape}")
    rng = np.random.default_rng(seed)
    h, w = inst_map.shape
    size_um = (w * he_mpp, h * he_mpp)
    warp = _random_warp(rng, size_um, max_angle_deg, max_shift_um, elastic_um)
    dapi_h, marker_h = _he_signals(inst_map, np.asarray(positive_ids), rng, ring_um / he_mpp)

    # render on a fine IF-space grid (about the H&E pixel size), then area-sample to the IF pixel size
    ss = max(1, round(if_mpp / he_mpp))
    fine = if_mpp / ss
    ih, iw = max(1, round(size_um[1] / if_mpp)), max(1, round(size_um[0] / if_mpp))
    fy, fx = np.mgrid[0 : ih * ss, 0 : iw * ss].astype(np.float64)
    # centre of fine pixel j inside IF pixel i: (i - 0.5) * if_mpp + (j + 0.5) * fine
    qx = (fx + 0.5) * fine - 0.5 * if_mpp
    qy = (fy + 0.5) * fine - 0.5 * if_mpp
    p = warp(np.stack([qx, qy], -1)) / he_mpp
    coords = np.stack([p[..., 1], p[..., 0]])
    planes = []
    for sig in (dapi_h, marker_h):
        img = ndi.map_coordinates(sig, coords, order=1, mode="constant", cval=0.0)
        img = ndi.gaussian_filter(img, psf_sigma_um / fine)
        planes.append(img.reshape(ih, ss, iw, ss).mean(axis=(1, 3)))
    dapi, marker = planes
    marker = marker + bleed_through * dapi
    out = []
    for img in (dapi, marker):
        field = ndi.gaussian_filter(rng.standard_normal((ih, iw)), max(ih, iw) / 6)
        field = (field - field.min()) / (np.ptp(field) + 1e-12)
        ramp = np.linspace(0, 1, iw)[None, :] * rng.uniform(0, 1)
        bg = background * (0.3 + 0.7 * field) * (0.6 + 0.4 * ramp)
        img = img + bg + rng.normal(0, noise, img.shape)
        out.append(np.clip(np.rint(img * 200), 0, 255).astype(np.uint8))
    image = IFImage(np.stack(out), ("DAPI", "MARKER"), mpp=if_mpp, meta={"format": "synthetic", "seed": seed})
    return SyntheticIF(image=image, warp=warp)
