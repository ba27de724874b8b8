"""Settings of IF-to-H&E registration (:class:`RegistrationConfig`) and the lazy SimpleITK import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cytoken.types import CytokenError, validate_mpp

__all__ = ["RegistrationConfig", "import_sitk"]


def import_sitk() -> Any:
    """SimpleITK, or a :class:`CytokenError` saying how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CytokenError(
            "IF-to-H&E registration needs SimpleITK: pip install 'cytoken[labeling]' (or pip install SimpleITK)"
        ) from exc
    return sitk


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of :func:`~cytoken.labeling.registration.register`.

    Attributes:
        nuclear_channel: IF channel with the nuclear stain (name, case-insensitive, or index).
        working_mpp: µm/px of the grid registration runs on; None = the coarser of the H&E and IF µm/px.
        linear: ``"rigid"`` (rotation + translation) or ``"affine"`` (rigid first, then a full affine refinement).
        bspline_grid_um: B-spline control-point spacing in µm; None skips the non-rigid stage.
        levels: pyramid levels (shrink factors 2**k, reduced while the smallest level would be under 48 px).
        iterations: maximum optimiser iterations of the linear stage per level.
        bspline_iterations: maximum L-BFGS-B iterations of the B-spline stage per level.
        bspline_levels: pyramid levels of the B-spline stage.
        bspline_tolerance_factor: L-BFGS-B stops when the relative cost reduction is below this times machine
            epsilon (1e12 loose, 1e7 moderate, 10 tight).
        final_smoothing_px: Gaussian smoothing (working-grid pixels) at the finest pyramid level.
        histogram_bins: Mattes mutual-information histogram bins.
        metric: ``"mattes"`` (mutual information) or ``"correlation"`` (normalised cross-correlation, for stains
            whose intensities rise together, as hematoxylin and DAPI do).
        sampling_fraction: fraction of working-grid pixels sampled by the metric (random, seeded).
        initial_translation: ``"phase"`` (phase correlation) or ``"none"`` (start from the identity in µm).
        nucleus_radius_um: typical nucleus radius for the quality check's blob detection.
        nucleus_detection: ``"peaks"`` (maxima of the smoothed image) or ``"blobs"`` (centroids of thresholded,
            watershed-split blobs), see :func:`~cytoken.labeling.quality.detect_nuclei`.
        match_radius_um: largest distance between two nuclei paired by the quality check.
        max_residual_px: largest accepted median nucleus residual after registration, in H&E pixels.
        min_matched_fraction: smallest accepted fraction of nuclei that pair up after registration.
        min_nuclei: fewest hematoxylin nuclei needed to judge the result (fewer raises ``CytokenError``).
        check: apply the ``max_residual_px`` / ``min_matched_fraction`` / ``min_nuclei`` guard.
        seed: seed of the metric sampling (>= 0; results are reproducible for a fixed seed and ``threads``).
        threads: SimpleITK threads (None = SimpleITK's default).
    """

    nuclear_channel: str | int = "DAPI"
    working_mpp: float | None = None
    linear: Literal["rigid", "affine"] = "rigid"
    bspline_grid_um: float | None = 32.0
    levels: int = 3
    iterations: int = 200
    bspline_iterations: int = 100
    bspline_levels: int = 2
    bspline_tolerance_factor: float = 1e7
    final_smoothing_px: float = 0.0
    histogram_bins: int = 32
    metric: Literal["mattes", "correlation"] = "mattes"
    sampling_fraction: float = 0.5
    initial_translation: Literal["phase", "none"] = "phase"
    nucleus_radius_um: float = 2.0
    nucleus_detection: Literal["peaks", "blobs"] = "blobs"
    match_radius_um: float = 2.0
    max_residual_px: float = 4.0
    min_matched_fraction: float = 0.4
    min_nuclei: int = 5
    check: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.working_mpp is not None:
            validate_mpp(self.working_mpp, source="RegistrationConfig.working_mpp")
        if self.linear not in ("rigid", "affine"):
            raise ValueError(f"RegistrationConfig.linear must be 'rigid' or 'affine', got {self.linear!r}")
        if self.metric not in ("mattes", "correlation"):
            raise ValueError(f"RegistrationConfig.metric must be 'mattes' or 'correlation', got {self.metric!r}")
        if self.seed < 0:
            raise ValueError(f"RegistrationConfig.seed must be >= 0, got {self.seed}")
        if self.initial_translation not in ("phase", "none"):
            raise ValueError(
                f"RegistrationConfig.initial_translation must be 'phase' or 'none', got {self.initial_translation!r}"
            )
        if self.bspline_grid_um is not None and self.bspline_grid_um <= 0:
            raise ValueError(f"RegistrationConfig.bspline_grid_um must be > 0 or None, got {self.bspline_grid_um}")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(f"RegistrationConfig.sampling_fraction must be in (0, 1], got {self.sampling_fraction}")
        for name in ("levels", "bspline_levels", "iterations", "bspline_iterations", "histogram_bins"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RegistrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nucleus_radius_um", "match_radius_um", "max_residual_px"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"RegistrationConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_matched_fraction <= 1:
            raise ValueError(
                f"RegistrationConfig.min_matched_fraction must be in [0, 1], got {self.min_matched_fraction}"
            )
