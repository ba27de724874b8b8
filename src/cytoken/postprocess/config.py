"""Parameters of the HoVer post-processing (:class:`HoverConfig`) and their conversion to pixels at a given µm/px.

Torch-free; imports only numpy and :mod:`cytoken.types`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cytoken.types import validate_mpp

__all__ = ["HoverConfig", "PixelParams"]

_SOBEL_MAX_KSIZE = 31  # OpenCV's limit for cv2.Sobel


def _odd(value: float, minimum: int = 3) -> int:
    """Nearest odd integer >= ``minimum`` (half-way values round up), capped at OpenCV's Sobel limit."""
    k = 2 * math.floor((value - 1) / 2 + 0.5) + 1
    return int(min(max(k, minimum), _SOBEL_MAX_KSIZE))


@dataclass(frozen=True)
class PixelParams:
    """The parameters of a :class:`HoverConfig` converted to pixels for one µm/px (see :meth:`HoverConfig.at`)."""

    fg_threshold: float
    min_object_px: int
    marker_threshold: float
    sobel_ksize: int
    fine_ksize: int | None
    fine_drop: float
    fine_minmax: bool
    watershed_ksize: int | None
    marker_open_radius: int
    min_marker_px: int
    rescue_markers: bool
    centre_seeds: bool
    seed_hv_max: float
    keep_unmarked: bool
    merge_unsupported: bool
    merge_delta: float
    merge_max_fraction: float
    energy_blur: bool
    min_mean_prob: float


@dataclass(frozen=True)
class HoverConfig:
    """Parameters of :func:`cytoken.postprocess.decode_hover` (HoVer-Net style instance separation).

    Sizes are given at ``reference_mpp`` (0.25 µm/px, 40x) and scaled to the µm/px of the maps being decoded:
    lengths by ``reference_mpp / mpp`` (kernel sizes rounded to the nearest odd number), areas by its square
    (rounded up). At 0.25 µm/px the defaults reproduce the CellViT++ post-processing (FACTS.md section 5): foreground
    ``p >= 0.5``, foreground components under 10 px removed, Sobel kernel 21, boundary threshold 0.4 on the
    min-max normalised Sobel energy, marker holes filled, opening with a 5x5 ellipse, markers under 10 px removed,
    marker-controlled watershed restricted to the foreground. At 0.5 µm/px the kernel becomes 11 and the minimum
    sizes 3 px, which are the values of the original CellViT at 20x (CellViT++ itself always uses 10/21, a bug).

    Where we deviate (each switch below; :meth:`cellvit` turns all of them off to get the CellViT++ recipe):

    * ``fine_ksize``: the 21-px Sobel blurs the interface between nuclei narrower than the kernel (dense
      lymphocytes, ~10 px across at 40x), so their markers fuse. A fine-scale term (5-px Sobel) also marks as
      boundary every pixel where an HV map drops by more than ``fine_drop`` per pixel (inside a nucleus both maps
      rise, so noise there does not create boundaries).
    * ``rescue_markers``: a marker core that the opening erases completely (a thin or small nucleus) is kept
      when it has at least ``min_marker_px`` pixels; CellViT++ loses such nuclei or floods them from a neighbour.
    * ``centre_seeds``: the pixels near a nucleus centre (``|h|, |v| < seed_hv_max`` with both HV maps
      increasing there, i.e. not an interface) are added as a marker when no marker lies within one pixel; this
      recovers small nuclei whose whole body is a boundary band at the 21-px scale.
    * ``keep_unmarked``: a foreground component without any marker becomes one instance instead of being dropped.
    * ``merge_unsupported``: two touching watershed regions are merged back when the HV maps keep increasing
      across their shared border (fewer than ``merge_max_fraction`` of the border pixel pairs drop by more than
      ``merge_delta``): a real interface between two nuclei is a drop of the HV map, a cut through one nucleus
      is not. This removes the splits of large, concave nuclei.
    * ``energy_blur``: CellViT++ floods ``-GaussianBlur((1 - energy) * fg, 3x3)``; we flood the unblurred energy,
      combined (maximum) with the HV drop measured by a 3-px Sobel (a drop of 0.5 per pixel = highest energy), which
      puts the cut within a pixel of the HV sign flip.
    * ``min_mean_prob`` (0 = off in every preset): an instance whose mean nucleus probability is below this is
      dropped. With a low foreground threshold (which outlines nuclei best) the model's faint, uncertain blobs
      become instances too; their mean probability tells them apart from real nuclei, whose centres are confident.

    Decoding the HV targets of the 30 MoNuSeg training label maps with :meth:`exact_maps` reproduces them with
    binary PQ >= 0.99 per image; the CellViT++ recipe falls below 0.99 on 8 of them (dense small nuclei, thin
    spindle nuclei). On noisy synthetic maps the two are within 0.002 PQ (``benchmarks/results/postprocess.md``),
    and on the embedded default model's real outputs (held-out MoNuSeg-train images) the CellViT++ recipe with a
    lower foreground threshold scored best (bPQ 0.532 vs 0.498 for these defaults), so that model stores its own,
    tuned parameters (``SegmenterConfig.postprocess``, used by the pipeline unless the user passes a config). Tune
    per model: the refinements help where the maps are sharp, not where the model is blurry.

    Attributes:
        fg_threshold: a pixel is foreground when ``nuclei_prob >= fg_threshold`` (CellViT++ takes the argmax of the
            two-class softmax, the same up to ties at exactly 0.5; TIAToolbox uses ``>=``).
        min_object_px: foreground components and final instances smaller than this are removed (px at
            ``reference_mpp``).
        marker_threshold: pixels whose normalised Sobel energy is at least this are boundary; the others are
            marker candidates.
        sobel_ksize: Sobel kernel size at ``reference_mpp`` (odd, 21 = CellViT++/HoVer-Net at 40x).
        fine_ksize: kernel size of the fine-scale term at ``reference_mpp``, or None to switch it off.
        fine_drop: HV drop per pixel (at ``reference_mpp``) above which the fine term marks a boundary.
        fine_minmax: min-max normalise the fine term like the coarse one instead (see :meth:`exact_maps`).
        marker_open_radius: radius of the elliptical opening applied to the markers (2 = 5x5 ellipse), at
            ``reference_mpp``; 0 switches the opening off.
        min_marker_px: markers smaller than this are removed (px at ``reference_mpp``).
        rescue_markers: keep marker cores erased by the opening (see above).
        centre_seeds: add centre seeds to nuclei without a marker (see above).
        seed_hv_max: largest ``|h|`` and ``|v|`` of a centre-seed pixel.
        keep_unmarked: keep foreground components without a marker as one instance each.
        merge_unsupported: merge watershed regions whose border shows no HV interface (see above).
        merge_delta: an HV drop larger than this across a border pixel pair counts as interface evidence.
        merge_max_fraction: regions are merged when at most this fraction of their border pairs show evidence.
        energy_blur: flood the 3x3 Gaussian-blurred coarse energy as CellViT++ does (instead of the unblurred
            coarse + 3-px energy).
        min_mean_prob: final instances whose mean ``nuclei_prob`` is below this are removed (0 switches it off).
        reference_mpp: the µm/px at which the pixel sizes above are given.

    Example:
        >>> HoverConfig().at(0.5).sobel_ksize, HoverConfig().at(0.25).sobel_ksize
        (11, 21)
        >>> HoverConfig.cellvit().fine_ksize is None
        True
    """

    fg_threshold: float = 0.5
    min_object_px: float = 10.0
    marker_threshold: float = 0.4
    sobel_ksize: int = 21
    fine_ksize: int | None = 5
    fine_drop: float = 0.05
    fine_minmax: bool = False
    marker_open_radius: int = 2
    min_marker_px: float = 10.0
    rescue_markers: bool = True
    centre_seeds: bool = True
    seed_hv_max: float = 0.5
    keep_unmarked: bool = True
    merge_unsupported: bool = True
    merge_delta: float = 0.1
    merge_max_fraction: float = 0.1
    energy_blur: bool = False
    min_mean_prob: float = 0.0
    reference_mpp: float = 0.25

    def __post_init__(self) -> None:
        for name in ("fg_threshold", "marker_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"HoverConfig.{name} must be in (0, 1), got {value!r}")
        for name in ("min_object_px", "min_marker_px", "merge_delta"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"HoverConfig.{name} must be >= 0, got {value!r}")
        if not 0.0 <= self.min_mean_prob < 1.0:
            raise ValueError(f"HoverConfig.min_mean_prob must be in [0, 1), got {self.min_mean_prob!r}")
        if not 0.0 <= self.merge_max_fraction < 1.0:
            raise ValueError(f"HoverConfig.merge_max_fraction must be in [0, 1), got {self.merge_max_fraction!r}")
        if not 0.0 < self.seed_hv_max <= 1.0:
            raise ValueError(f"HoverConfig.seed_hv_max must be in (0, 1], got {self.seed_hv_max!r}")
        for name in ("sobel_ksize", "fine_ksize"):
            k = getattr(self, name)
            if k is None and name == "fine_ksize":
                continue
            if not isinstance(k, int) or k < 3 or k % 2 == 0 or k > _SOBEL_MAX_KSIZE:
                raise ValueError(f"HoverConfig.{name} must be an odd integer in [3, 31], got {k!r}")
        if not isinstance(self.marker_open_radius, int) or self.marker_open_radius < 0:
            raise ValueError(
                f"HoverConfig.marker_open_radius must be a non-negative integer, got {self.marker_open_radius!r}"
            )
        validate_mpp(self.reference_mpp, source="HoverConfig.reference_mpp")

    @classmethod
    def cellvit(cls) -> HoverConfig:
        """The CellViT++ recipe: every cytoken extension switched off, blurred flooding energy."""
        return cls(
            fine_ksize=None,
            rescue_markers=False,
            centre_seeds=False,
            keep_unmarked=False,
            merge_unsupported=False,
            energy_blur=True,
        )

    @classmethod
    def exact_maps(cls) -> HoverConfig:
        """For noise-free maps (``hv_targets`` of labels, e.g. to check or convert annotations).

        The fine-scale energy is min-max normalised like the coarse one instead of thresholded at an absolute drop:
        on exact maps every HV drop is an interface, and this splits the densest small nuclei (>= 0.99 PQ on all 30
        MoNuSeg training maps). On noisy model output it over-splits; use the default there.
        """
        return cls(fine_minmax=True)

    @classmethod
    def from_file(cls, path: str | Path) -> HoverConfig:
        """Read parameters from a YAML or JSON mapping of field names (unset fields keep their defaults).

        A ``preset`` key (``default``, ``cellvit`` or ``exact_maps``) picks the starting point.

        Raises:
            ValueError: unreadable file, not a mapping, unknown field or preset, or an out-of-range value.

        Example:
            >>> import tempfile, pathlib
            >>> f = pathlib.Path(tempfile.mkdtemp()) / "hover.json"
            >>> _ = f.write_text('{"preset": "cellvit", "fg_threshold": 0.3}')
            >>> c = HoverConfig.from_file(f); (c.fg_threshold, c.energy_blur)
            (0.3, True)
        """
        import yaml

        from cytoken.io.yamlfile import read_yaml

        path = Path(path)
        try:
            raw = read_yaml(path)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read post-processing parameters from {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of HoverConfig fields, got {type(raw).__name__}")
        return cls.from_mapping(raw, where=str(path))

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any], *, where: str = "post-processing parameters") -> HoverConfig:
        """Build from a mapping of field names (e.g. a model's stored ``SegmenterConfig.postprocess``).

        A ``preset`` key (``default``, ``cellvit`` or ``exact_maps``) picks the starting point; unset fields keep
        its values.

        Raises:
            ValueError: unknown field or preset, or an out-of-range value; the message starts with ``where``.

        Example:
            >>> HoverConfig.from_mapping({"preset": "cellvit", "fg_threshold": 0.3}).fg_threshold
            0.3
        """
        raw = dict(params)
        presets = {"default": cls, "cellvit": cls.cellvit, "exact_maps": cls.exact_maps}
        preset = raw.pop("preset", "default")
        if preset not in presets:
            raise ValueError(f"{where}: unknown preset {preset!r}; choose from {sorted(presets)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown post-processing parameters {unknown}; known: {sorted(known)}")
        try:
            return replace(presets[preset](), **raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def at(self, mpp: float) -> PixelParams:
        """The parameters in pixels of an image at ``mpp`` µm/px.

        Args:
            mpp: µm/px of the maps to decode.

        Returns:
            The scaled parameters.

        Raises:
            ValueError: when ``mpp`` is not a plausible µm/px value.
        """
        scale = self.reference_mpp / validate_mpp(mpp, source="decode_hover mpp")
        area = scale * scale
        return PixelParams(
            fg_threshold=float(self.fg_threshold),
            min_object_px=math.ceil(self.min_object_px * area - 1e-9),
            marker_threshold=float(self.marker_threshold),
            sobel_ksize=_odd(self.sobel_ksize * scale),
            fine_ksize=None if self.fine_ksize is None else _odd(self.fine_ksize * scale),
            fine_drop=float(self.fine_drop) / scale,
            fine_minmax=self.fine_minmax,
            watershed_ksize=None if self.energy_blur else 3,
            marker_open_radius=math.floor(self.marker_open_radius * scale + 0.5),
            min_marker_px=math.ceil(self.min_marker_px * area - 1e-9),
            rescue_markers=self.rescue_markers,
            centre_seeds=self.centre_seeds,
            seed_hv_max=float(self.seed_hv_max),
            keep_unmarked=self.keep_unmarked,
            merge_unsupported=self.merge_unsupported,
            merge_delta=float(self.merge_delta),
            merge_max_fraction=float(self.merge_max_fraction),
            energy_blur=self.energy_blur,
            min_mean_prob=float(self.min_mean_prob),
        )
