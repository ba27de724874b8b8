"""HoVer-Net style maps: training targets from instance labels (``hv_targets``) and their inverse (``decode_hover``).

Both directions live in this one module so that the round trip ``decode_hover(hv_targets(gt))`` is tested as a pair
(cellpose keeps flows-from-masks beside masks-from-flows for the same reason). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cytoken.postprocess._instances import hover_instances
from cytoken.postprocess.cells import cells_from_instances, consecutive_labels
from cytoken.postprocess.config import HoverConfig
from cytoken.types import CellSet

__all__ = ["HoverConfig", "HoverResult", "cells_from_instances", "decode_hover", "hover_instances_map", "hv_targets"]


@dataclass
class HoverResult:
    """Output of :func:`decode_hover`.

    Attributes:
        inst_map: (H, W) int32 instance map, 0 = background, nuclei numbered 1..N.
        cells: one record per instance with a valid contour (ids match ``inst_map``).
    """

    inst_map: np.ndarray
    cells: CellSet


def _check_maps(nuclei_prob: np.ndarray, hv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prob = np.asarray(nuclei_prob)
    hv = np.asarray(hv)
    if prob.ndim != 2:
        raise ValueError(f"nuclei_prob must be 2-D (H, W), got shape {prob.shape}")
    if hv.shape != (2, *prob.shape):
        raise ValueError(f"hv must have shape (2, H, W) = {(2, *prob.shape)}, got {hv.shape}")
    if min(prob.shape) < 1:
        raise ValueError(f"nuclei_prob must not be empty, got shape {prob.shape}")
    return np.ascontiguousarray(prob, np.float32), np.ascontiguousarray(hv, np.float32)


def hover_instances_map(
    nuclei_prob: np.ndarray, hv: np.ndarray, mpp: float = 0.25, *, config: HoverConfig | None = None
) -> np.ndarray:
    """Instance map only (the first half of :func:`decode_hover`, without measuring the cells).

    Args:
        nuclei_prob: (H, W) nucleus probability.
        hv: (2, H, W) HV maps (channel 0 horizontal/x, channel 1 vertical/y).
        mpp: µm/px of the maps (scales the pixel parameters of ``config``).
        config: parameters (default :class:`HoverConfig`).

    Returns:
        (H, W) int32 instance map with ids 1..N.

    Example:
        >>> m = np.zeros((32, 32), np.int32); m[4:14, 4:14] = 1; m[4:14, 14:24] = 2
        >>> inst = hover_instances_map((m > 0).astype(np.float32), hv_targets(m))
        >>> int(inst.max()), len(np.unique(inst[m == 1])), len(np.unique(inst[m == 2]))
        (2, 1, 1)
    """
    prob, hv = _check_maps(nuclei_prob, hv)
    return hover_instances(prob, hv, (config or HoverConfig()).at(mpp))


def decode_hover(
    nuclei_prob: np.ndarray,
    hv: np.ndarray,
    type_prob: np.ndarray | None = None,
    mpp: float = 0.25,
    *,
    config: HoverConfig | None = None,
    class_names: Sequence[str] = (),
    class_colors: Sequence[tuple[int, int, int]] = (),
) -> HoverResult:
    """Nuclei instances and cell records from HoVer-Net style maps (CellViT/CellViT++ post-processing, faster).

    Steps (see :class:`HoverConfig` for each parameter and where cytoken deviates from CellViT++): foreground
    threshold; removal of small foreground components; Sobel energy of the HV maps, min-max normalised; markers =
    foreground below the boundary threshold, holes filled, opened, small ones removed; marker-controlled watershed
    inside the foreground; removal of small instances and, when ``min_mean_prob`` is set, of instances with a low
    mean nucleus probability. Sizes are scaled by ``mpp``. A foreground component with a single marker is taken
    whole, so the watershed only runs on components holding several markers.

    Args:
        nuclei_prob: (H, W) float nucleus probability.
        hv: (2, H, W) HV maps: channel 0 horizontal (x), channel 1 vertical (y), in [-1, 1].
        type_prob: optional (C + 1, H, W) class softmax with background in channel 0.
        mpp: µm/px of the maps.
        config: parameters (default :class:`HoverConfig`).
        class_names: names of classes 1..C.
        class_colors: RGB colours of classes 1..C.

    Returns:
        The instance map (ids 1..N) and the cells (see :func:`cells_from_instances`).

    Raises:
        ValueError: on inconsistent shapes or an implausible ``mpp``.

    Example:
        >>> m = np.zeros((32, 32), np.int32); m[4:14, 4:14] = 1; m[4:14, 14:24] = 2
        >>> res = decode_hover((m > 0).astype(np.float32), hv_targets(m))
        >>> len(res.cells), res.cells.area_px.tolist()
        (2, [100, 100])
    """
    prob, hv = _check_maps(nuclei_prob, hv)
    if type_prob is not None and np.shape(type_prob)[1:] != prob.shape:
        raise ValueError(f"type_prob must be (C + 1, H, W) with (H, W) = {prob.shape}, got {np.shape(type_prob)}")
    inst = hover_instances(prob, hv, (config or HoverConfig()).at(mpp))
    cells = cells_from_instances(inst, type_prob, mpp, class_names, class_colors)
    return HoverResult(inst_map=inst, cells=cells)


def hv_targets(inst_map: np.ndarray) -> np.ndarray:
    """Horizontal/vertical distance maps of every nucleus to its centroid (HoVer-Net, Graham et al. 2019).

    For each instance, the column (x) and row (y) offsets of its pixels from the instance centre of mass are
    scaled separately on each side of the centre: negative offsets by ``1 / |min|`` and positive offsets by
    ``1 / max``, so that each map runs from -1 to +1 across the nucleus. Background is 0. Instance ids need not be
    consecutive.

    Args:
        inst_map: (H, W) integer instance map, 0 = background.

    Returns:
        (2, H, W) float32: channel 0 horizontal (x, column direction), channel 1 vertical (y, row direction).

    Example:
        >>> m = np.zeros((5, 5), np.int32); m[1:4, 1:4] = 7
        >>> hv = hv_targets(m)
        >>> float(hv[0, 2, 1]), float(hv[0, 2, 3]), float(hv[1, 1, 2])
        (-1.0, 1.0, -1.0)
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise ValueError(f"hv_targets expects a 2-D instance map, got shape {inst_map.shape}")
    if not np.issubdtype(inst_map.dtype, np.integer):
        raise ValueError(f"hv_targets expects an integer instance map, got dtype {inst_map.dtype}")
    out = np.zeros((2, *inst_map.shape), np.float32)
    if not inst_map.any():
        return out
    labels, n = _compact(inst_map)
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat]
    rows, cols = np.divmod(flat, inst_map.shape[1])
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    count[0] = 1.0
    for ch, coord in ((0, cols), (1, rows)):
        # HoVer-Net rounds the centre to the pixel grid before normalising; we keep sub-pixel centres, which
        # makes the maps exactly antisymmetric for symmetric shapes.
        centre = np.bincount(lab, weights=coord, minlength=n + 1) / count
        offs = coord - centre[lab]
        lo = np.zeros(n + 1)
        hi = np.zeros(n + 1)
        np.minimum.at(lo, lab, offs)
        np.maximum.at(hi, lab, offs)
        scale = np.where(offs < 0, -lo[lab], hi[lab])
        vals = np.divide(offs, scale, out=np.zeros_like(offs), where=scale > 0)
        out[ch].ravel()[flat] = vals
    return out


def _compact(inst_map: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel arbitrary non-negative ids to 1..N (0 stays background)."""
    if inst_map.min() >= 0 and inst_map.max() <= 1 << 26:
        labels, ids = consecutive_labels(inst_map)
        return labels, len(ids)
    ids, inv = np.unique(inst_map, return_inverse=True)
    inv = inv.reshape(inst_map.shape)
    if ids[0] == 0:
        return inv.astype(np.int32), len(ids) - 1
    return (inv + 1).astype(np.int32), len(ids)
