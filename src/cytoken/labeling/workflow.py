"""The IF labelling workflow in one call: register -> warp -> threshold -> label cells (and write the outputs).

:func:`label_from_if` chains :func:`~cytoken.labeling.registration.register`,
:meth:`~cytoken.labeling.registration.Registration.warp_if_to_he`,
:func:`~cytoken.labeling.threshold.threshold_marker` (on the IF overlap only) and
:func:`~cytoken.labeling.cell_labels.label_cells` on one image held in memory; for slides (tile by tile, one
slide-wide threshold) see :func:`~cytoken.labeling.slide.label_from_if_slide`. :func:`write_outputs` saves the
registration, the marker mask, the label table and the QC overlay of either result into one folder. A command-line
wrapper only has to parse its arguments, read the H&E, the IF image and the cells, and call these functions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytoken.io.atomic import atomic_path
from cytoken.io.ifimage import IFImage, write_ome_tiff
from cytoken.io.slide import Slide
from cytoken.labeling.cell_labels import CellLabelConfig, CellLabels, label_cells, qc_overlay, rasterize_cells
from cytoken.labeling.registration import Registration, RegistrationConfig, register
from cytoken.labeling.slide import SlideLabelResult, mask_tiff_tile, slide_qc
from cytoken.labeling.threshold import MarkerMask, ThresholdConfig, save_mask_png, save_mask_tiff, threshold_marker
from cytoken.types import CellSet, CytokenError

__all__ = ["IFLabelResult", "label_from_if", "write_outputs"]


@dataclass
class IFLabelResult:
    """Everything :func:`label_from_if` computed.

    Attributes:
        registration: the IF-to-H&E registration (fitted or given).
        warped: the IF image resampled onto the H&E grid (float32, all channels).
        overlap: (H, W) bool H&E pixels covered by the IF image.
        marker: the thresholded marker on the H&E grid.
        labels: the per-cell label table.
        cells: (H, W) instance map the labels refer to.
    """

    registration: Registration
    warped: IFImage
    overlap: np.ndarray
    marker: MarkerMask
    labels: CellLabels
    cells: np.ndarray


def label_from_if(
    he_rgb: np.ndarray,
    if_image: IFImage,
    cells: np.ndarray | CellSet,
    *,
    he_mpp: float,
    marker: str | int,
    registration: Registration | None = None,
    registration_config: RegistrationConfig | None = None,
    threshold_config: ThresholdConfig | None = None,
    label_config: CellLabelConfig | None = None,
    cell_ids: np.ndarray | None = None,
) -> IFLabelResult:
    """Label H&E cells positive/negative for an IF marker.

    Args:
        he_rgb: (H, W, 3) uint8 H&E.
        if_image: the IF image with its µm/px and a nuclear channel (``registration_config.nuclear_channel``).
        cells: (H, W) instance map on the H&E grid, or a CellSet in H&E pixel coordinates.
        he_mpp: µm/px of the H&E.
        marker: the IF channel to threshold (name, case-insensitive, or index).
        registration: a registration to reuse (e.g. :meth:`Registration.load`); None fits one.
        registration_config: settings of the registration (ignored when ``registration`` is given).
        threshold_config: settings of the marker threshold.
        label_config: settings of the per-cell rules.
        cell_ids: the cells to label (default: all).

    Returns:
        The result (registration, warped IF, overlap, marker mask, labels).

    Raises:
        CytokenError: a failed registration, an unknown channel, or an empty / all-positive marker mask.

    Example:
        >>> res = label_from_if(he, read_if("if.ome.tif"), inst_map, he_mpp=0.25, marker="CD45")  # doctest: +SKIP
        >>> res.labels.counts()["positive"]  # doctest: +SKIP
        42
    """
    he_rgb = np.asarray(he_rgb)
    marker_idx = if_image.index(marker)
    if registration is None:
        registration = register(he_rgb, if_image, he_mpp=he_mpp, config=registration_config)
    elif registration.he_shape != he_rgb.shape[:2]:
        raise CytokenError(
            f"the given registration is for an H&E grid of {registration.he_shape}, the H&E is {he_rgb.shape[:2]}"
        )
    warped = registration.warp_if_to_he(if_image)
    overlap = registration.overlap_mask(if_image.shape)
    mask = threshold_marker(warped.data[marker_idx], threshold_config, valid=overlap)
    inst = rasterize_cells(cells, he_rgb.shape[:2]) if isinstance(cells, CellSet) else np.asarray(cells)
    if cell_ids is None and isinstance(cells, CellSet):
        cell_ids = cells.ids
    labels = label_cells(
        inst,
        mask.mask,
        cell_ids=cell_ids,
        valid=overlap,
        config=label_config,
        marker=if_image.channel_names[marker_idx],
    )
    return IFLabelResult(
        registration=registration, warped=warped, overlap=overlap, marker=mask, labels=labels, cells=inst
    )


def write_outputs(
    result: IFLabelResult | SlideLabelResult,
    he_rgb: np.ndarray | Slide,
    out_dir: str | Path,
    *,
    label_metadata: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``registration.json``, the marker mask, ``labels.parquet``, ``labels.csv``, ``qc.png`` and the IF.

    For an :class:`IFLabelResult` the mask is ``marker_mask.png`` and the IF image resampled onto the H&E grid
    (every channel, float32, with its channel names and the H&E µm/px; 0 outside the IF image) is written as
    ``if_on_he.ome.tif``. For a :class:`~cytoken.labeling.slide.SlideLabelResult` the mask is ``marker_mask.tif``,
    a tiled TIFF on the slide's tile grid (already written there when the result was computed with ``mask_path`` in
    ``out_dir``), the resampled IF is not written (a slide-sized float image), the registration file holds the tiled
    registration and the QC overlay is drawn tile by tile, shrunk to at most 4096 px on a side.

    Args:
        result: the output of :func:`label_from_if` or :func:`~cytoken.labeling.slide.label_from_if_slide`.
        he_rgb: the H&E the labels were computed on (for the QC overlay): an array, or the slide of a slide result.
        out_dir: folder to write into (created if missing).
        label_metadata: extra entries for ``labels.parquet``'s metadata (see :meth:`CellLabels.write`), e.g. the
            segment output the cells came from.

    Returns:
        Name -> path of each file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if isinstance(result, SlideLabelResult):
        mask = _slide_mask(result, out / "marker_mask.tif")
        slide_qc(he_rgb, result, out / "qc.png")
        qc = out / "qc.png"
    else:
        mask = save_mask_png(result.marker.mask, out / "marker_mask.png")
        qc = _qc(result, np.asarray(he_rgb), out / "qc.png")
        written["if_on_he"] = write_ome_tiff(result.warped, out / "if_on_he.ome.tif")
    return {
        "registration": result.registration.save(out / "registration.json"),
        "mask": mask,
        "labels_parquet": result.labels.write(out / "labels.parquet", metadata=label_metadata),
        "labels_csv": result.labels.write(out / "labels.csv"),
        "qc": qc,
        **written,
    }


def _slide_mask(result: SlideLabelResult, path: Path) -> Path:
    """The slide's marker mask as a tiled TIFF at ``path`` (copied, or written from the in-memory mask)."""
    if result.mask_path is not None:
        if result.mask_path.resolve() != path.resolve():
            with atomic_path(path) as tmp:
                shutil.copyfile(result.mask_path, tmp)
        return path
    mask, tr = np.asarray(result.mask), result.registration
    return save_mask_tiff((mask[b.y : b.y1, b.x : b.x1] for b in tr.tiles), tr.he_shape, mask_tiff_tile(tr), path)


def _qc(result: IFLabelResult, he_rgb: np.ndarray, path: Path) -> Path:
    qc_overlay(he_rgb, result.marker.mask, result.cells, result.labels, path)
    return path
