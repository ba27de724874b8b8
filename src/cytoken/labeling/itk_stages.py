"""The SimpleITK stages of :func:`~cytoken.labeling.registration.register`.

Working-grid images, the phase-correlation start, the linear (rigid/affine) stage and the B-spline stage, each in
physical units (µm).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cytoken.labeling.regconfig import RegistrationConfig, import_sitk

__all__ = ["itk_message", "normalise", "resample_to", "run_bspline", "run_linear", "to_sitk"]


def normalise(img: np.ndarray) -> np.ndarray:
    """Clip to the 1st-99.5th percentile and scale to [0, 1] (zeros for a flat image)."""
    img = np.asarray(img, np.float32)
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def resample_to(img: np.ndarray, mpp: float, target_mpp: float, origin_px: tuple[float, float]) -> tuple:
    """Area/linear resize to ``target_mpp``; returns (array, spacing (sx, sy), physical origin (ox, oy))."""
    import cv2

    h, w = img.shape
    scale = mpp / target_mpp
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        out = img.astype(np.float32)
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        out = cv2.resize(img.astype(np.float32), (nw, nh), interpolation=interp)
    sx, sy = mpp * w / nw, mpp * h / nh
    # centre of new pixel 0 = centre of its footprint in the old grid
    ox = origin_px[0] * mpp + 0.5 * sx - 0.5 * mpp
    oy = origin_px[1] * mpp + 0.5 * sy - 0.5 * mpp
    return out, (sx, sy), (ox, oy)


def to_sitk(arr: np.ndarray, spacing: tuple[float, float], origin: tuple[float, float]) -> Any:
    """A float32 SimpleITK image with the given spacing and physical origin (µm)."""
    sitk = import_sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    return img


def _shrink_factors(shape: tuple[int, int], levels: int) -> tuple[list[int], list[float]]:
    n = max(1, levels)
    while n > 1 and min(shape) / 2 ** (n - 1) < 48:
        n -= 1
    shrink = [2**k for k in range(n - 1, -1, -1)]
    return shrink, [float(s) / 2 if s > 1 else 0.0 for s in shrink]


def _phase_translation(fixed: Any, moving: Any) -> tuple[float, float]:
    """Physical translation t with fixed point x ~ moving point x + t, from phase correlation on the working grid."""
    from skimage.registration import phase_cross_correlation

    sitk = import_sitk()
    a = sitk.GetArrayViewFromImage(fixed)
    b = sitk.GetArrayViewFromImage(moving)
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    pa = np.zeros(shape, np.float32)
    pb = np.zeros(shape, np.float32)
    pa[: a.shape[0], : a.shape[1]] = a - a.mean()
    pb[: b.shape[0], : b.shape[1]] = b - b.mean()
    shift, _, _ = phase_cross_correlation(pa, pb, normalization=None, upsample_factor=4)
    sx, sy = fixed.GetSpacing()
    ofx, ofy = fixed.GetOrigin()
    omx, omy = moving.GetOrigin()
    return (float(omx - ofx - shift[1] * sx), float(omy - ofy - shift[0] * sy))


def _method(cfg: RegistrationConfig, fixed: Any, iterations: int, *, bspline: bool) -> Any:
    sitk = import_sitk()
    reg = sitk.ImageRegistrationMethod()
    if cfg.metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.histogram_bins)
    if cfg.sampling_fraction < 1:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(cfg.sampling_fraction, cfg.seed + 1)  # seed 0 means "wall clock" in ITK
    reg.SetInterpolator(sitk.sitkLinear)
    shrink, sigmas = _shrink_factors(fixed.GetSize()[::-1], cfg.bspline_levels if bspline else cfg.levels)
    sigmas[-1] = cfg.final_smoothing_px
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if cfg.threads is not None:
        reg.SetNumberOfThreads(int(cfg.threads))
    if bspline:
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=4 * iterations,
            costFunctionConvergenceFactor=cfg.bspline_tolerance_factor,
        )
    else:
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, gradientMagnitudeTolerance=1e-8
        )
        reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _centre(img: Any) -> tuple[float, float]:
    size = img.GetSize()
    return img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in size])


def run_linear(cfg: RegistrationConfig, fixed: Any, moving: Any, initial: Any | None) -> Any:
    """The rigid (then optionally affine) stage, from ``initial`` or a phase-correlation translation."""
    sitk = import_sitk()
    euler = sitk.Euler2DTransform()
    euler.SetCenter(_centre(fixed))
    reg = _method(cfg, fixed, cfg.iterations, bspline=False)
    if initial is not None:
        reg.SetMovingInitialTransform(initial)
    elif cfg.initial_translation == "phase":
        euler.SetTranslation(_phase_translation(fixed, moving))
    reg.SetInitialTransform(euler, inPlace=True)
    reg.Execute(fixed, moving)
    result: Any = sitk.Euler2DTransform(euler)
    if cfg.linear == "affine":
        affine = sitk.AffineTransform(2)
        affine.SetCenter(euler.GetCenter())
        affine.SetMatrix(euler.GetMatrix())
        affine.SetTranslation(euler.GetTranslation())
        reg = _method(cfg, fixed, cfg.iterations, bspline=False)
        if initial is not None:
            reg.SetMovingInitialTransform(initial)
        reg.SetInitialTransform(affine, inPlace=True)
        reg.Execute(fixed, moving)
        result = sitk.AffineTransform(affine)
    if initial is not None:
        return sitk.CompositeTransform([initial, result])
    return result


def run_bspline(cfg: RegistrationConfig, fixed: Any, moving: Any, linear: Any, grid_um: float) -> Any:
    """The cubic B-spline stage (control points every ``grid_um``) on top of the linear transform."""
    sitk = import_sitk()
    size = fixed.GetSize()
    spacing = fixed.GetSpacing()
    mesh = [max(1, round(n * s / grid_um)) for n, s in zip(size, spacing)]
    bsp = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(cfg, fixed, cfg.bspline_iterations, bspline=True)
    reg.SetMovingInitialTransform(linear)
    reg.SetInitialTransform(bsp, inPlace=True)
    reg.Execute(fixed, moving)
    return sitk.CompositeTransform([linear, bsp])


def itk_message(exc: RuntimeError) -> str:
    """The last line of an ITK exception (the readable part)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else repr(exc)
