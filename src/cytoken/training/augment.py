"""H&E training augmentation on numpy arrays (OpenCV + numpy only; safe inside DataLoader workers).

:func:`augment` applies, in this order, with the probabilities and magnitudes of an :class:`AugmentConfig`:

1. geometric transforms, applied identically to the image and the label maps: horizontal/vertical flips and
   90° rotations (exact array ops), then one combined resampling for zoom/rotation (affine) and elastic
   deformation (image: bilinear; label maps: nearest neighbour, so ids stay valid integers);
2. photometric transforms, image only: HED stain jitter (colour deconvolution with the Ruifrok-Johnston matrix
   used by ``skimage.color.rgb2hed``), brightness/contrast, resolution loss (down-then-up sampling), Gaussian
   blur, Gaussian noise and JPEG re-compression.

Geometric transforms only move pixels of the image and the label maps. Per-pixel regression targets such as
HoVer-Net's horizontal/vertical distance maps are **not** transformed here: the caller recomputes them from
the returned instance map (a flip would otherwise need the sign of a channel changed, a rotation would mix
channels). Pixels that come from outside the input (zoom out, rotation corners) get the image ``fill`` value
and label 0. Instances cut by a border or an elastic fold keep their id (an id may then cover two small
pieces).

All randomness comes from the ``rng`` argument: the same seed gives the same output. Outputs never share
memory with the inputs. Inside DataLoader workers, ``cv2.setNumThreads(1)`` (set once by the training loop)
keeps OpenCV from oversubscribing the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np

__all__ = ["AugmentConfig", "augment", "random_crop"]

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), the matrix of skimage.color.rgb_from_hed.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``*_p``, each in [0, 1]) and magnitudes of the augmentations of :func:`augment`.

    Attributes:
        flip_p: probability of a horizontal flip, and independently of a vertical flip.
        rot90_p: probability of a rotation by a random multiple of 90° (90, 180 or 270; only 180 for
            non-square inputs, so the output keeps the input's height and width).
        affine_p: probability of a zoom (and optional free rotation) about the image centre.
        scale_range: (min, max) zoom factor of the affine step (> 1 zooms in); drawn log-uniformly.
        rotate_deg: maximal free rotation in degrees of the affine step (0 = none; corners get ``fill``).
        elastic_p: probability of an elastic deformation.
        elastic_alpha: maximal elastic displacement in pixels.
        elastic_grid: spacing in pixels of the random control points (larger = smoother deformation).
        hed_p: probability of HED stain jitter.
        hed_scale: each stain's optical density is multiplied by a factor in ``1 ± hed_scale``.
        hed_shift: and shifted by a value in ``± hed_shift`` (optical-density units).
        brightness_p: probability of a brightness change.
        brightness: maximal additive brightness change as a fraction of 255.
        contrast_p: probability of a contrast change.
        contrast: contrast is multiplied by a factor in ``1 ± contrast`` (about the image mean).
        downscale_p: probability of resolution loss (down-sample by a factor in ``downscale_range``, then
            back).
        downscale_range: (min, max) factor of the down-sampling, in (0, 1].
        blur_p: probability of Gaussian blur.
        blur_sigma: (min, max) Gaussian blur sigma in pixels.
        noise_p: probability of additive Gaussian noise.
        noise_std: (min, max) noise standard deviation in grey levels (0-255).
        jpeg_p: probability of JPEG re-compression.
        jpeg_quality: (min, max) JPEG quality (1-100).
        fill: grey level for image pixels that come from outside the input (255 = white glass).

    Example:
        >>> AugmentConfig(elastic_p=0.0).flip_p
        0.5
    """

    flip_p: float = 0.5
    rot90_p: float = 0.5
    affine_p: float = 0.3
    scale_range: tuple[float, float] = (0.8, 1.25)
    rotate_deg: float = 0.0
    elastic_p: float = 0.2
    elastic_alpha: float = 4.0
    elastic_grid: int = 32
    hed_p: float = 0.5
    hed_scale: float = 0.05
    hed_shift: float = 0.02
    brightness_p: float = 0.3
    brightness: float = 0.1
    contrast_p: float = 0.3
    contrast: float = 0.15
    downscale_p: float = 0.1
    downscale_range: tuple[float, float] = (0.5, 0.9)
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (2.0, 8.0)
    jpeg_p: float = 0.1
    jpeg_quality: tuple[int, int] = (50, 95)
    fill: int = 255

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_p"):
                v = getattr(self, f.name)
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"AugmentConfig.{f.name} must be a probability in [0, 1], got {v!r}")
        for name, lo_min in (
            ("scale_range", 1e-3),
            ("downscale_range", 1e-3),
            ("blur_sigma", 0.0),
            ("noise_std", 0.0),
            ("jpeg_quality", 1),
        ):
            lo, hi = getattr(self, name)
            if not lo_min <= lo <= hi:
                raise ValueError(
                    f"AugmentConfig.{name} must be (min, max) with {lo_min} <= min <= max, got {(lo, hi)}"
                )
        if self.downscale_range[1] > 1.0:
            raise ValueError(f"AugmentConfig.downscale_range must lie in (0, 1], got {self.downscale_range}")
        if self.jpeg_quality[1] > 100:
            raise ValueError(f"AugmentConfig.jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        for name in ("rotate_deg", "elastic_alpha", "hed_scale", "hed_shift", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.elastic_grid < 2:
            raise ValueError(f"AugmentConfig.elastic_grid must be >= 2 pixels, got {self.elastic_grid!r}")
        if not 0 <= self.fill <= 255:
            raise ValueError(f"AugmentConfig.fill must be a grey level in [0, 255], got {self.fill!r}")


def _check_inputs(
    image: np.ndarray, inst_map: np.ndarray | None, type_map: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    out = []
    for name, m in (("inst_map", inst_map), ("type_map", type_map)):
        if m is None:
            out.append(None)
            continue
        m = np.asarray(m)
        if m.shape != image.shape[:2]:
            raise ValueError(f"{name} has shape {m.shape} but the image is {image.shape[:2]}")
        if m.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integers, got dtype {m.dtype}")
        out.append(m.astype(np.int32, copy=False))
    return image, out[0], out[1]


def augment(
    image: np.ndarray,
    inst_map: np.ndarray | None,
    type_map: np.ndarray | None,
    rng: np.random.Generator,
    config: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Randomly augment an H&E image and its label maps consistently.

    Args:
        image: (H, W, 3) uint8 RGB.
        inst_map: (H, W) integer instance ids (0 = background), or None.
        type_map: (H, W) integer class ids (0 = background), or None.
        rng: the only source of randomness (``np.random.default_rng(seed)``; one per DataLoader worker).
        config: probabilities and magnitudes (default :class:`AugmentConfig`).

    Returns:
        ``(image, inst_map, type_map)``: uint8 RGB and int32 maps (None stays None), same height and width as
        the input. Label maps only hold values present in the input (nearest-neighbour resampling) or 0.
        HV/distance targets must be recomputed from the returned ``inst_map`` by the caller.

    Raises:
        ValueError: when shapes or dtypes are wrong.

    Example:
        >>> img = np.full((64, 64, 3), 200, np.uint8)
        >>> lab = np.zeros((64, 64), np.int32); lab[10:20, 10:20] = 3
        >>> out, inst, _ = augment(img, lab, None, np.random.default_rng(0))
        >>> out.shape, inst.dtype, set(np.unique(inst)) <= {0, 3}
        ((64, 64, 3), dtype('int32'), True)
    """
    cfg = config or AugmentConfig()
    image, inst, types = _check_inputs(image, inst_map, type_map)
    maps = [m for m in (inst, types) if m is not None]
    image_in, maps_in = image, list(maps)

    # --- exact geometric ops
    if rng.random() < cfg.flip_p:
        image, maps = image[:, ::-1], [m[:, ::-1] for m in maps]
    if rng.random() < cfg.flip_p:
        image, maps = image[::-1], [m[::-1] for m in maps]
    if rng.random() < cfg.rot90_p:
        k = int(rng.integers(1, 4))
        if image.shape[0] != image.shape[1]:
            k = 2  # 90° turns would swap height and width of a non-square input
        image, maps = np.rot90(image, k), [np.rot90(m, k) for m in maps]

    # --- one resampling for affine + elastic
    do_affine = rng.random() < cfg.affine_p
    do_elastic = rng.random() < cfg.elastic_p and cfg.elastic_alpha > 0
    if do_affine or do_elastic:
        h, w = image.shape[:2]
        mapx, mapy = _sampling_grid(h, w, rng, cfg, do_affine, do_elastic)
        image = cv2.remap(
            np.ascontiguousarray(image),
            mapx,
            mapy,
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(cfg.fill, cfg.fill, cfg.fill),
        )
        maps = [_remap_nearest(m, mapx, mapy) for m in maps]

    image = _fresh(_photometric(np.ascontiguousarray(image), rng, cfg), image_in)
    maps = [_fresh(np.ascontiguousarray(m, dtype=np.int32), src) for m, src in zip(maps, maps_in)]
    it = iter(maps)
    inst_out = next(it) if inst is not None else None
    type_out = next(it) if types is not None else None
    return image, inst_out, type_out


def _fresh(out: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``out``, copied if it still shares memory with the caller's input (outputs never alias inputs)."""
    return out.copy() if np.may_share_memory(out, source) else out


def _remap_nearest(label: np.ndarray, mapx: np.ndarray, mapy: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of an int32 label map (0 outside the input)."""
    try:
        return cv2.remap(
            np.ascontiguousarray(label, np.int32),
            mapx,
            mapy,
            interpolation=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    except cv2.error:  # pragma: no cover - OpenCV builds without int32 remap
        h, w = label.shape
        xi = np.rint(mapx).astype(np.intp)
        yi = np.rint(mapy).astype(np.intp)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        return np.where(inside, label[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0).astype(np.int32)


def _sampling_grid(
    h: int, w: int, rng: np.random.Generator, cfg: AugmentConfig, do_affine: bool, do_elastic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates (float32 maps for ``cv2.remap``) of every output pixel."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    if do_elastic:
        gh = max(2, int(np.ceil(h / cfg.elastic_grid)) + 1)
        gw = max(2, int(np.ceil(w / cfg.elastic_grid)) + 1)
        coarse = rng.uniform(-cfg.elastic_alpha, cfg.elastic_alpha, size=(2, gh, gw)).astype(np.float32)
        xs = xs + cv2.resize(coarse[0], (w, h), interpolation=cv2.INTER_CUBIC)
        ys = ys + cv2.resize(coarse[1], (w, h), interpolation=cv2.INTER_CUBIC)
    if do_affine:
        lo, hi = cfg.scale_range
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        angle = float(np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))) if cfg.rotate_deg > 0 else 0.0
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        # inverse map: source = R(-angle) (dest - c) / scale + c
        c, s = np.cos(angle) / scale, np.sin(angle) / scale
        dx, dy = xs - cx, ys - cy
        xs, ys = c * dx + s * dy + cx, -s * dx + c * dy + cy
    return np.ascontiguousarray(xs, np.float32), np.ascontiguousarray(ys, np.float32)


def _photometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    img: np.ndarray | None = None  # float32 working copy, created lazily

    def as_float() -> np.ndarray:
        return image.astype(np.float32) if img is None else img

    if rng.random() < cfg.hed_p:
        img = _hed_jitter(image, rng, cfg.hed_scale, cfg.hed_shift)
    if rng.random() < cfg.brightness_p:
        img = as_float() + np.float32(rng.uniform(-cfg.brightness, cfg.brightness) * 255.0)
    if rng.random() < cfg.contrast_p:
        f = as_float()
        mean = np.asarray(cv2.mean(f)[:3], np.float32)
        img = (f - mean) * np.float32(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) + mean
    if rng.random() < cfg.downscale_p:
        f = as_float()
        h, w = f.shape[:2]
        factor = rng.uniform(*cfg.downscale_range)
        small = cv2.resize(
            f, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA
        )
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < cfg.blur_p:
        sigma = float(rng.uniform(*cfg.blur_sigma))
        if sigma > 0:
            img = cv2.GaussianBlur(as_float(), (0, 0), sigmaX=sigma, sigmaY=sigma)
    if rng.random() < cfg.noise_p:
        std = float(rng.uniform(*cfg.noise_std))
        img = as_float() + rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(std)
    out = image if img is None else np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if rng.random() < cfg.jpeg_p:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(
            ".jpg", np.ascontiguousarray(out[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(out)


_OD_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)


def _hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """Scale and shift the H, E and DAB optical densities of a uint8 RGB image; float32 RGB in 0..255 out.

    The per-stain change ``hed' = hed * alpha + beta`` with ``hed = od @ HED_FROM_RGB`` and
    ``od' = hed' @ RGB_FROM_HED`` folds into one affine map of the optical density.
    """
    od = _OD_LUT[image]
    alpha = rng.uniform(1 - scale, 1 + scale, size=3)
    beta = rng.uniform(-shift, shift, size=3)
    lin = _HED_FROM_RGB @ np.diag(alpha) @ _RGB_FROM_HED  # row-vector convention: od' = od @ lin + beta @ R
    off = beta @ _RGB_FROM_HED
    m = np.concatenate([lin.T, off[:, None]], axis=1).astype(
        np.float32
    )  # cv2.transform: dst = m[:, :3] @ src + m[:, 3]
    od2 = cv2.transform(od, m)
    np.maximum(od2, 0.0, out=od2)
    return cv2.exp(-od2) * np.float32(255.0)


def random_crop(
    image: np.ndarray,
    inst_map: np.ndarray | None,
    type_map: np.ndarray | None,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    fill: int = 255,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Cut the same random window out of an image and its label maps.

    Inputs smaller than ``size`` are padded (image with ``fill``, labels with 0) and the window is placed at a
    random offset in the padded area.

    Args:
        image: (H, W, 3) uint8 RGB.
        inst_map: (H, W) integer map, or None.
        type_map: (H, W) integer map, or None.
        size: crop size, an int (square) or (height, width).
        rng: random generator for the offset.
        fill: grey level of image padding.

    Returns:
        ``(image, inst_map, type_map)`` crops of shape ``size`` (maps int32; None stays None).

    Raises:
        ValueError: when ``size`` is not positive or shapes disagree.

    Example:
        >>> img = np.zeros((300, 280, 3), np.uint8)
        >>> random_crop(img, None, None, 256, np.random.default_rng(0))[0].shape
        (256, 256, 3)
    """
    ch, cw = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if ch <= 0 or cw <= 0:
        raise ValueError(f"random_crop: size must be positive, got {size!r}")
    image, inst, types = _check_inputs(image, inst_map, type_map)
    h, w = image.shape[:2]
    ph, pw = max(0, ch - h), max(0, cw - w)
    if ph or pw:
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        pad = ((top, ph - top), (left, pw - left))
        image = np.pad(image, (*pad, (0, 0)), constant_values=fill)
        inst = None if inst is None else np.pad(inst, pad)
        types = None if types is None else np.pad(types, pad)
        h, w = image.shape[:2]
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    win = (slice(y0, y0 + ch), slice(x0, x0 + cw))
    return (
        np.ascontiguousarray(image[win]),
        None if inst is None else np.ascontiguousarray(inst[win]),
        None if types is None else np.ascontiguousarray(types[win]),
    )
