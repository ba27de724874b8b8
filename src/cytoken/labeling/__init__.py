"""Labels without a pathologist: immunofluorescence (IF) registered to H&E, thresholded, turned into per-cell labels.

Workflow (layer 3; imports types, io, metrics and postprocess only):

* :func:`register` / :class:`Registration`: IF nuclear channel (DAPI) to H&E hematoxylin, rigid/affine then B-spline
  (SimpleITK, optional extra ``labeling``), with a quality report and a guard against failed registrations;
  :func:`register_tiled` for large images (overview + per-tile refinement).
* :func:`threshold_marker`: background subtraction, Otsu/triangle/percentile/fixed threshold, cleanup, refusal of
  empty or all-positive masks.
* :func:`label_cells`: overlap fraction of each cell with the marker mask, positive at >= 15 % by default, an optional
  ambiguity band, a Parquet/CSV label table and a QC overlay.
* :func:`label_from_if` / :func:`write_outputs`: the chain in one call;
* :func:`label_from_if_slide`: the chain on a slide, tile by tile, with ONE marker threshold for the whole slide
  from a pooled, bounded-memory histogram of the marker signal (:class:`SignalHistogram`, :func:`slide_threshold`);
  the H&E is read through a :class:`~cytoken.io.slide.Slide`, the IF through an
  :class:`~cytoken.io.ifreader.IFReader` (``open_if``) and the mask written tile by tile (:func:`save_mask_tiff`).
* :func:`synthesize_if`: a synthetic IF image of an annotated H&E tile under a known deformation (for validation).
"""

from cytoken.labeling.cell_labels import (
    CellLabelConfig,
    CellLabels,
    label_cells,
    labels_from_counts,
    overlap_counts,
    qc_overlay,
    rasterize_cells,
)
from cytoken.labeling.histogram import SignalHistogram, signal_range
from cytoken.labeling.quality import RegistrationQuality, detect_nuclei, match_points, normalized_mutual_information
from cytoken.labeling.registration import (
    Registration,
    RegistrationConfig,
    assess,
    check_registration,
    hematoxylin,
    register,
)
from cytoken.labeling.slide import SlideLabelResult, label_from_if_slide, slide_qc, slide_threshold
from cytoken.labeling.synthetic import KnownWarp, SyntheticIF, synthesize_if
from cytoken.labeling.threshold import (
    MarkerMask,
    ThresholdConfig,
    compute_threshold,
    marker_signal,
    save_mask_png,
    save_mask_tiff,
    subtract_background,
    threshold_marker,
)
from cytoken.labeling.tiled import TiledRegistration, read_registration, register_tiled, tile_grid
from cytoken.labeling.workflow import IFLabelResult, label_from_if, write_outputs

__all__ = [
    "CellLabelConfig",
    "CellLabels",
    "IFLabelResult",
    "KnownWarp",
    "MarkerMask",
    "Registration",
    "RegistrationConfig",
    "RegistrationQuality",
    "SignalHistogram",
    "SlideLabelResult",
    "SyntheticIF",
    "ThresholdConfig",
    "TiledRegistration",
    "assess",
    "check_registration",
    "compute_threshold",
    "detect_nuclei",
    "hematoxylin",
    "label_cells",
    "label_from_if",
    "label_from_if_slide",
    "labels_from_counts",
    "marker_signal",
    "match_points",
    "normalized_mutual_information",
    "overlap_counts",
    "qc_overlay",
    "rasterize_cells",
    "read_registration",
    "register",
    "register_tiled",
    "save_mask_png",
    "save_mask_tiff",
    "signal_range",
    "slide_qc",
    "slide_threshold",
    "subtract_background",
    "synthesize_if",
    "threshold_marker",
    "tile_grid",
    "write_outputs",
]
