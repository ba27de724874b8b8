"""Cell records (centroid, bbox, contour, area, class) from an instance map: :func:`cells_from_instances`.

Per-cell statistics are computed for all cells at once (``bincount`` over the foreground pixels,
``scipy.ndimage.find_objects`` for the boxes); only the contour tracing loops over cells, on each cell's crop.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi

from cytoken.types import CellSet, validate_mpp

__all__ = ["cells_from_instances"]

_MAX_LUT_IDS = 1 << 26  # above this, compact ids with np.unique instead of a lookup table


def consecutive_labels(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels 1..N (int32, same shape) and the original id of each label (int64, (N,))."""
    if inst.size == 0:
        return inst.astype(np.int32), np.zeros(0, np.int64)
    lo, hi = int(inst.min()), int(inst.max())
    if lo < 0:
        raise ValueError(f"instance ids must be >= 0 (0 = background), got a minimum of {lo}")
    if hi <= _MAX_LUT_IDS:
        present = np.bincount(inst.ravel(), minlength=hi + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        if len(ids) == hi:  # already 1..N
            return inst.astype(np.int32, copy=False), ids
        lut = np.zeros(hi + 1, np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return lut[inst], ids
    uniq, inv = np.unique(inst, return_inverse=True)
    inv = inv.reshape(inst.shape).astype(np.int32)
    if uniq[0] != 0:
        inv += 1
        return inv, uniq.astype(np.int64)
    return inv, uniq[1:].astype(np.int64)


def _trace(crop: np.ndarray) -> np.ndarray | None:
    """Largest external contour of a uint8 mask as (K, 2) int (x, y), or None when it has < 3 points."""
    found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not found:
        return None
    best = found[0] if len(found) == 1 else max(found, key=lambda c: (cv2.contourArea(c), len(c)))
    pts = best.reshape(-1, 2)
    return pts if len(pts) >= 3 else None


def _valid_contours(contours: list[np.ndarray]) -> list[np.ndarray | None]:
    """Check each ring with shapely; repair invalid ones (largest polygon part of ``make_valid``) or drop them."""
    import shapely

    if not contours:
        return []
    lens = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    coords = np.concatenate(contours).astype(np.float64)
    rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(contours)), lens))
    polys = shapely.polygons(rings)
    ok = shapely.is_valid(polys)
    out: list[np.ndarray | None] = [c.astype(np.float64) for c in contours]
    for i in np.flatnonzero(~ok):
        fixed = shapely.make_valid(polys[i])
        parts = [g for g in shapely.get_parts(fixed) if g.geom_type == "Polygon" and g.area > 0]
        if not parts:
            out[i] = None
            continue
        ring = np.asarray(max(parts, key=lambda g: g.area).exterior.coords)[:-1]
        out[i] = ring if len(ring) >= 3 else None
    return out


def _classes(
    type_prob: np.ndarray, flat_idx: np.ndarray, lab: np.ndarray, area: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Majority non-background argmax class per cell and the mean softmax probability of that class."""
    n = len(area)
    c1 = type_prob.shape[0]
    probs = type_prob.reshape(c1, -1)[:, flat_idx].astype(np.float32, copy=False)
    votes = np.bincount(lab * c1 + probs.argmax(axis=0), minlength=(n + 1) * c1).reshape(n + 1, c1)[1:, 1:]
    mean = np.stack([np.bincount(lab, weights=probs[c], minlength=n + 1)[1:] for c in range(1, c1)], axis=1)
    mean /= np.maximum(area, 1)[:, None]
    cls = votes.argmax(axis=1)
    no_vote = votes.sum(axis=1) == 0  # every pixel voted background: fall back to the most probable class
    cls[no_vote] = mean[no_vote].argmax(axis=1)
    return cls + 1, mean[np.arange(n), cls]


def cells_from_instances(
    inst_map: np.ndarray,
    type_prob: np.ndarray | None = None,
    mpp: float = 0.25,
    class_names: Sequence[str] = (),
    class_colors: Sequence[tuple[int, int, int]] = (),
) -> CellSet:
    """Measure every instance of a label map: centroid, bbox, contour, area and class.

    Contours are the largest external OpenCV contour of each cell (pixel centres, ``CHAIN_APPROX_SIMPLE``) in image
    coordinates (x = column, y = row), the first vertex not repeated at the end; every contour is a valid shapely
    polygon (an invalid one, e.g. a 1-px spike traced out and back, is replaced by the largest polygon part of
    ``shapely.make_valid``). Cells without a contour of 3 or more points or without area (1-px wide lines) are
    dropped, as in CellViT++. The centroid is the mean pixel position (= OpenCV moments m10/m00, m01/m00).

    With ``type_prob``, the class is the majority of the per-pixel argmax classes inside the cell, background votes
    excluded (CellViT++'s rule); when every pixel votes background, the class with the highest mean probability is
    taken. ``class_probs`` is the mean softmax probability of that class over the cell (CellViT++ reports a
    vote fraction, or 0 after its classifier). Without ``type_prob`` the class is 0 and the probability NaN.

    Args:
        inst_map: (H, W) integer instance map, 0 = background; ids need not be consecutive and are kept as
            ``CellSet.ids``.
        type_prob: optional (C + 1, H, W) softmax with background in channel 0.
        mpp: µm/px of the map.
        class_names: names of classes 1..C (empty, or exactly C names).
        class_colors: RGB colours of classes 1..C (default palette when empty).

    Returns:
        The cells, ordered by id.

    Raises:
        ValueError: on bad shapes, dtypes, negative ids, an implausible ``mpp`` or a wrong number of class names.

    Example:
        >>> m = np.zeros((8, 8), np.int32); m[2:5, 1:4] = 5
        >>> cells = cells_from_instances(m)
        >>> cells.ids.tolist(), cells.centroids.tolist(), cells.bboxes.tolist(), cells.area_px.tolist()
        ([5], [[2.0, 3.0]], [[1, 2, 4, 5]], [9])
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise ValueError(f"inst_map must be 2-D (H, W), got shape {inst.shape}")
    if not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
        raise ValueError(f"inst_map must hold integer ids, got dtype {inst.dtype}")
    mpp = validate_mpp(mpp, source="cells_from_instances mpp")
    if type_prob is not None:
        type_prob = np.asarray(type_prob)
        if type_prob.ndim != 3 or type_prob.shape[1:] != inst.shape or type_prob.shape[0] < 2:
            raise ValueError(
                f"type_prob must be (C + 1, H, W) with C >= 1 and (H, W) = {inst.shape}, got {type_prob.shape}"
            )
        if class_names and len(class_names) != type_prob.shape[0] - 1:
            raise ValueError(
                f"{len(class_names)} class names for {type_prob.shape[0] - 1} classes in type_prob "
                "(channel 0 is background)"
            )
    names, colors = tuple(class_names), tuple(tuple(int(v) for v in c) for c in class_colors)
    labels, ids = consecutive_labels(inst.astype(np.int64, copy=False) if inst.dtype == bool else inst)
    n = len(ids)
    if n == 0:
        return CellSet.empty(mpp, names, colors)
    width = inst.shape[1]
    flat_idx = np.flatnonzero(labels)
    lab = labels.ravel()[flat_idx]
    ys, xs = np.divmod(flat_idx, width)
    area = np.bincount(lab, minlength=n + 1)[1:]
    centroids = (
        np.stack(
            [np.bincount(lab, weights=xs, minlength=n + 1)[1:], np.bincount(lab, weights=ys, minlength=n + 1)[1:]],
            axis=1,
        )
        / area[:, None]
    )
    bboxes = np.zeros((n, 4), np.int64)
    traced: list[np.ndarray] = []
    has_contour = np.zeros(n, bool)
    for i, sl in enumerate(ndi.find_objects(labels)):
        y0, x0 = sl[0].start, sl[1].start
        bboxes[i] = (x0, y0, sl[1].stop, sl[0].stop)
        pts = _trace((labels[sl] == i + 1).view(np.uint8))
        if pts is not None:
            traced.append(pts + np.array([x0, y0]))
            has_contour[i] = True
    repaired = _valid_contours(traced)
    contours: list[np.ndarray] = []
    keep = np.zeros(n, bool)
    for i, ring in zip(np.flatnonzero(has_contour), repaired):
        if ring is not None:
            contours.append(ring)
            keep[i] = True
    if type_prob is None:
        class_ids = np.zeros(n, np.int64)
        class_probs = np.full(n, np.nan, np.float32)
    else:
        class_ids, class_probs = _classes(type_prob, flat_idx, lab, area)
    return CellSet(
        ids=ids[keep],
        centroids=centroids[keep],
        bboxes=bboxes[keep],
        contours=contours,
        area_px=area[keep],
        class_ids=class_ids[keep],
        class_probs=class_probs[keep],
        mpp=mpp,
        class_names=names,
        class_colors=colors,
    )
