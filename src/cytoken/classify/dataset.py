"""Build a labelled cell set for the classifier: match labels to cells, split by image, check the result.

Torch-free (numpy + scipy) and independent of the pipeline: inputs are plain arrays (centroids, instance
maps).

* :func:`match_points` pairs labelled points with detected cell centroids one-to-one within a radius
  (Hungarian assignment on KD-tree candidates, so a crowded spot does not lose labels to greedy
  nearest-neighbour choices).
* :func:`match_instances` / :func:`label_cells_from_masks` pair ground-truth instances with predicted
  instances by IoU > 0.5 and hand over the ground-truth type.
* :func:`split_by_group` / :func:`split_from_files` split by image or slide, never by cell.
* :class:`LabelledCells` holds embeddings + labels + groups and raises clear errors for wrong dimensions or
  classes with fewer than two examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.types import CytokenError, validate_mpp

__all__ = [
    "DEFAULT_MATCH_RADIUS_UM",
    "GroupSplit",
    "InstanceMatch",
    "LabelledCells",
    "PointMatch",
    "instance_types",
    "label_cells_from_masks",
    "match_instances",
    "match_points",
    "read_split_file",
    "split_by_group",
    "split_from_files",
]

DEFAULT_MATCH_RADIUS_UM = 15 * 0.25
"""CellViT++ pairs labels and detections within 15 px at 0.25 µm/px, i.e. 3.75 µm."""


# ------------------------------------------------------------ points


@dataclass(frozen=True)
class PointMatch:
    """One-to-one pairs of labelled points and detected cells.

    Attributes:
        label_index: (M,) indices into the labelled points.
        cell_index: (M,) indices into the cell centroids.
        distance: (M,) pair distances in pixels.
        n_labels: number of labelled points.
        n_cells: number of detected cells.
        radius_px: matching radius used, in pixels.
    """

    label_index: np.ndarray
    cell_index: np.ndarray
    distance: np.ndarray
    n_labels: int
    n_cells: int
    radius_px: float

    @property
    def n_matched(self) -> int:
        """Number of matched pairs."""
        return len(self.label_index)

    @property
    def unmatched_labels(self) -> np.ndarray:
        """Indices of labelled points with no cell."""
        return np.setdiff1d(np.arange(self.n_labels), self.label_index)

    def report(self) -> dict[str, Any]:
        """Counts for logging: labels, cells, matched, unmatched, radius and mean distance."""
        return {
            "n_labels": self.n_labels,
            "n_cells": self.n_cells,
            "n_matched": self.n_matched,
            "n_unmatched_labels": self.n_labels - self.n_matched,
            "radius_px": self.radius_px,
            "mean_distance_px": float(self.distance.mean()) if self.n_matched else None,
        }


def match_points(
    points: np.ndarray | Sequence[Sequence[float]],
    centroids: np.ndarray | Sequence[Sequence[float]],
    *,
    mpp: float,
    radius_um: float = DEFAULT_MATCH_RADIUS_UM,
    require_all: bool = False,
) -> PointMatch:
    """Match labelled points to detected cell centroids one-to-one within a radius, minimising total distance.

    The radius is ``radius_um / mpp`` pixels: 15 px at 0.25 µm/px (CellViT++'s value), 7.5 px at 0.5 µm/px.
    Candidate pairs come from a KD-tree; each connected group of candidates is solved with the Hungarian
    algorithm (``scipy.optimize.linear_sum_assignment``), first maximising the number of pairs, then
    minimising their total distance.

    Args:
        points: (M, 2) labelled points ``(x, y)`` in pixels of the same grid as ``centroids``.
        centroids: (N, 2) detected cell centroids ``(x, y)``.
        mpp: µm/px of that pixel grid.
        radius_um: matching radius in µm.
        require_all: raise when any label has no cell (default: only when none has).

    Returns:
        A :class:`PointMatch`.

    Raises:
        CytokenError: when labels exist but none (or, with ``require_all``, not all) match a cell.

    Example:
        >>> m = match_points([[0, 0], [10, 0]], [[6, 0], [-8, 0]], mpp=0.25)
        >>> sorted(zip(m.label_index.tolist(), m.cell_index.tolist()))  # greedy: label 0 -> cell 0
        [(0, 1), (1, 0)]
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    mpp = validate_mpp(mpp, source="match_points mpp")
    if not radius_um > 0:
        raise ValueError(f"radius_um must be positive, got {radius_um!r}")
    radius = float(radius_um) / mpp
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    cen = np.asarray(centroids, np.float64).reshape(-1, 2)
    m, n = len(pts), len(cen)
    empty = PointMatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), m, n, radius)
    if m == 0:
        return empty
    if n == 0:
        raise CytokenError(f"{m} labelled points but no detected cell to match them to")
    pairs = cKDTree(pts).sparse_distance_matrix(cKDTree(cen), radius, output_type="ndarray")
    li, ci, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)
    if len(li) == 0:
        raise CytokenError(
            f"none of the {m} labelled points lies within {radius:.1f} px ({radius_um:g} µm at "
            f"{mpp:g} µm/px) of any of the {n} detected cells; check that points are (x=column, y=row), "
            "0-based, and on the same pixel grid and µm/px as the cells"
        )
    graph = coo_matrix((np.ones(len(li)), (li, m + ci)), shape=(m + n, m + n))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[li]
    order = np.argsort(edge_comp, kind="stable")
    li, ci, dist, edge_comp = li[order], ci[order], dist[order], edge_comp[order]
    starts = np.flatnonzero(np.r_[True, edge_comp[1:] != edge_comp[:-1]])
    ends = np.r_[starts[1:], len(li)]
    out_l, out_c, out_d = [], [], []
    single = (ends - starts) == 1  # one candidate pair: nothing to decide
    out_l.append(li[starts[single]])
    out_c.append(ci[starts[single]])
    out_d.append(dist[starts[single]])
    for s, e in zip(starts[~single], ends[~single]):
        ul, inv_l = np.unique(li[s:e], return_inverse=True)
        uc, inv_c = np.unique(ci[s:e], return_inverse=True)
        big = radius * (min(len(ul), len(uc)) + 1) + 1.0
        cost = np.full((len(ul), len(uc)), big)
        cost[inv_l, inv_c] = dist[s:e]
        r, c = linear_sum_assignment(cost)
        real = cost[r, c] < big
        out_l.append(ul[r[real]])
        out_c.append(uc[c[real]])
        out_d.append(cost[r[real], c[real]])
    lab = np.concatenate(out_l)
    o = np.argsort(lab, kind="stable")
    result = PointMatch(lab[o], np.concatenate(out_c)[o], np.concatenate(out_d)[o], m, n, radius)
    if require_all and result.n_matched < m:
        first = result.unmatched_labels[:5].tolist()
        raise CytokenError(
            f"{m - result.n_matched} of {m} labelled points match no cell within {radius:.1f} px "
            f"(first label indices: {first})"
        )
    return result


# ------------------------------------------------------------ masks


@dataclass(frozen=True)
class InstanceMatch:
    """Ground-truth ↔ predicted instance pairs with IoU above the threshold (one-to-one).

    Attributes:
        gt_ids: (M,) ground-truth instance ids.
        pred_ids: (M,) predicted instance ids.
        iou: (M,) IoU of each pair.
        n_gt: number of ground-truth instances.
        n_pred: number of predicted instances.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    iou: np.ndarray
    n_gt: int
    n_pred: int


def _ids_and_areas(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = inst[inst > 0]
    return np.unique(v, return_counts=True)


def match_instances(gt_inst: np.ndarray, pred_inst: np.ndarray, *, iou_threshold: float = 0.5) -> InstanceMatch:
    """Pair ground-truth and predicted instances whose IoU exceeds ``iou_threshold`` (sparse, no cell loop).

    Intersections are counted over the joint (gt, pred) labels of overlapping pixels. For a threshold of at
    least 0.5 every instance has at most one partner, so the pairing is one-to-one without an assignment step.

    Args:
        gt_inst: (H, W) ground-truth instance map, 0 = background.
        pred_inst: (H, W) predicted instance map.
        iou_threshold: pairs need IoU strictly above this; allowed range [0.5, 1).

    Returns:
        An :class:`InstanceMatch`.

    Example:
        >>> g = np.zeros((4, 4), int); g[:2, :2] = 5
        >>> p = np.zeros((4, 4), int); p[:2, :3] = 9
        >>> r = match_instances(g, p)
        >>> r.gt_ids.tolist(), r.pred_ids.tolist(), round(float(r.iou[0]), 3)
        ([5], [9], 0.667)
    """
    g = np.asarray(gt_inst)
    p = np.asarray(pred_inst)
    if g.shape != p.shape or g.ndim != 2:
        raise ValueError(f"gt_inst and pred_inst must be 2-D maps of one shape, got {g.shape} and {p.shape}")
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must be in [0.5, 1) so matches are unique, got {iou_threshold!r}")
    g = g.astype(np.int64, copy=False).ravel()
    p = p.astype(np.int64, copy=False).ravel()
    g_ids, g_area = _ids_and_areas(g)
    p_ids, p_area = _ids_and_areas(p)
    both = (g > 0) & (p > 0)
    span = int(p.max(initial=0)) + 1
    key, inter = np.unique(g[both] * span + p[both], return_counts=True)
    kg, kp = key // span, key % span
    ag = g_area[np.searchsorted(g_ids, kg)]
    ap = p_area[np.searchsorted(p_ids, kp)]
    iou = inter / (ag + ap - inter)
    ok = iou > iou_threshold
    return InstanceMatch(kg[ok], kp[ok], iou[ok], len(g_ids), len(p_ids))


def instance_types(inst_map: np.ndarray, type_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Majority type of each instance (background type 0 ignored; ties go to the smaller type id).

    Args:
        inst_map: (H, W) instance ids.
        type_map: (H, W) type ids, 0 = none.

    Returns:
        ``(ids, types)``: instance ids and their type (0 when no pixel has a type).

    Example:
        >>> inst = np.array([[1, 1, 1, 2]]); typ = np.array([[3, 3, 1, 0]])
        >>> [a.tolist() for a in instance_types(inst, typ)]
        [[1, 2], [3, 0]]
    """
    inst = np.asarray(inst_map).astype(np.int64, copy=False).ravel()
    typ = np.asarray(type_map).astype(np.int64, copy=False).ravel()
    if inst.shape != typ.shape:
        raise ValueError(f"inst_map and type_map differ in shape: {np.shape(inst_map)} vs {np.shape(type_map)}")
    ids = np.unique(inst[inst > 0])
    types = np.zeros(len(ids), np.int64)
    sel = (inst > 0) & (typ > 0)
    if sel.any():
        span = int(typ.max()) + 1
        key, cnt = np.unique(inst[sel] * span + typ[sel], return_counts=True)
        kid, kty = key // span, key % span
        # sort by id, then count descending, then type ascending: the first row per id is the vote winner
        o = np.lexsort((kty, -cnt, kid))
        kid, kty = kid[o], kty[o]
        first = np.r_[True, kid[1:] != kid[:-1]]
        types[np.searchsorted(ids, kid[first])] = kty[first]
    return ids, types


def label_cells_from_masks(
    gt_inst: np.ndarray, gt_type: np.ndarray, pred_inst: np.ndarray, *, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Give each predicted instance the type of the ground-truth instance it matches (IoU > threshold).

    Args:
        gt_inst: (H, W) ground-truth instances.
        gt_type: (H, W) ground-truth type ids (1..C, 0 = none).
        pred_inst: (H, W) predicted instances.
        iou_threshold: see :func:`match_instances`.

    Returns:
        ``(pred_ids, class_ids, report)``: predicted ids with a typed match, their type ids (1..C), and counts
        ``n_gt``, ``n_pred``, ``n_matched``, ``n_labelled``.

    Example:
        >>> g = np.zeros((4, 4), int); g[:2, :2] = 5; t = (g > 0) * 2
        >>> p = np.zeros((4, 4), int); p[:2, :3] = 9
        >>> ids, cls, rep = label_cells_from_masks(g, t, p)
        >>> ids.tolist(), cls.tolist(), rep["n_labelled"]
        ([9], [2], 1)
    """
    m = match_instances(gt_inst, pred_inst, iou_threshold=iou_threshold)
    ids, types = instance_types(gt_inst, gt_type)
    t = types[np.searchsorted(ids, m.gt_ids)] if len(m.gt_ids) else np.zeros(0, np.int64)
    typed = t > 0
    report = {"n_gt": m.n_gt, "n_pred": m.n_pred, "n_matched": len(m.gt_ids), "n_labelled": int(typed.sum())}
    return m.pred_ids[typed], t[typed], report


# ------------------------------------------------------------ splits


@dataclass(frozen=True)
class GroupSplit:
    """Cell indices of a split made by group (image or slide); no group is in two parts.

    Attributes:
        train: indices of training cells.
        val: indices of validation cells.
        test: indices of test cells (may be empty).
        train_groups: group names in train.
        val_groups: group names in val.
        test_groups: group names in test.
        unassigned: groups that were in no split file (their cells are left out).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_groups: tuple[str, ...]
    val_groups: tuple[str, ...]
    test_groups: tuple[str, ...]
    unassigned: tuple[str, ...] = ()


def _indices(groups: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return np.flatnonzero(np.isin(groups, np.asarray(list(names), dtype=groups.dtype)))


def split_by_group(
    groups: Sequence[str] | np.ndarray,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> GroupSplit:
    """Random split of groups (images/slides) into train/val/test; every cell follows its group.

    Args:
        groups: (N,) group name of each cell.
        val_fraction: fraction of groups for validation (at least one group when > 0).
        test_fraction: fraction of groups for test.
        seed: shuffling seed (the split is a function of the sorted group names and the seed only).

    Returns:
        A :class:`GroupSplit`.

    Example:
        >>> s = split_by_group(["a", "a", "b", "c", "c", "d", "e"], val_fraction=0.2, seed=1)
        >>> len(s.val_groups), len(s.train) + len(s.val) + len(s.test)
        (1, 7)
    """
    g = np.asarray(groups).astype(str)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    names = np.unique(g)
    n_val = max(1, round(val_fraction * len(names))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(names))) if test_fraction > 0 else 0
    if len(names) - n_val - n_test < 1:
        raise CytokenError(
            f"cannot split {len(names)} group(s) into train/val/test by image: need at least "
            f"{1 + n_val + n_test} distinct groups"
        )
    perm = names[np.random.default_rng(seed).permutation(len(names))]
    val_g, test_g, train_g = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    return GroupSplit(
        train=_indices(g, train_g),
        val=_indices(g, val_g),
        test=_indices(g, test_g),
        train_groups=tuple(sorted(train_g)),
        val_groups=tuple(sorted(val_g)),
        test_groups=tuple(sorted(test_g)),
    )


def read_split_file(path: str | os.PathLike[str]) -> list[str]:
    r"""Group names from a split file: one per line; blank lines and lines starting with ``#`` are skipped.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "val.txt"; _ = p.write_text("img_3\n\n# note\nimg_7\n")
        >>> read_split_file(p)
        ['img_3', 'img_7']
    """
    p = Path(path)
    if not p.is_file():
        raise CytokenError(f"split file {p} does not exist")
    out: list[str] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#") and s not in out:
            out.append(s)
    return out


def split_from_files(
    groups: Sequence[str] | np.ndarray,
    train: str | os.PathLike[str] | Sequence[str],
    val: str | os.PathLike[str] | Sequence[str],
    test: str | os.PathLike[str] | Sequence[str] | None = None,
) -> GroupSplit:
    """Split cells by user-given group lists (split files with one group name per line, or lists of names).

    Args:
        groups: (N,) group name of each cell.
        train: split file path or list of group names.
        val: split file path or list of group names.
        test: optional split file path or list.

    Returns:
        A :class:`GroupSplit`; groups in no list are reported in ``unassigned``.

    Raises:
        CytokenError: for a listed group that has no cell, or a group listed in two splits.

    Example:
        >>> s = split_from_files(["a", "b", "b", "c"], ["a", "b"], ["c"])
        >>> s.train.tolist(), s.val.tolist()
        ([0, 1, 2], [3])
    """
    g = np.asarray(groups).astype(str)
    present = set(np.unique(g).tolist())
    lists: dict[str, list[str]] = {}
    for part, src in (("train", train), ("val", val), ("test", test)):
        if src is None:
            lists[part] = []
            continue
        names = read_split_file(src) if isinstance(src, (str, os.PathLike)) else [str(s) for s in src]
        unknown = [s for s in names if s not in present]
        if unknown:
            raise CytokenError(
                f"{part} split ({src if isinstance(src, (str, os.PathLike)) else 'list'}) names "
                f"{len(unknown)} group(s) with no labelled cell, first: {unknown[:5]}"
            )
        lists[part] = names
    seen: dict[str, str] = {}
    for part, names in lists.items():
        for s in names:
            if s in seen:
                raise CytokenError(f"group {s!r} is listed in both the {seen[s]} and the {part} split")
            seen[s] = part
    return GroupSplit(
        train=_indices(g, lists["train"]),
        val=_indices(g, lists["val"]),
        test=_indices(g, lists["test"]),
        train_groups=tuple(lists["train"]),
        val_groups=tuple(lists["val"]),
        test_groups=tuple(lists["test"]),
        unassigned=tuple(sorted(present - set(seen))),
    )


# ------------------------------------------------------------ labelled set


@dataclass
class LabelledCells:
    """Embeddings with class labels and the group (image/slide) of each cell.

    Attributes:
        embeddings: (N, D) float array.
        labels: (N,) class indices 0..C-1 (CellSet class id minus one).
        groups: (N,) group names.
        class_names: names of the C classes.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings)
        self.labels = np.asarray(self.labels).reshape(-1)
        self.groups = np.asarray(self.groups).astype(str).reshape(-1)
        self.class_names = tuple(self.class_names)
        n = len(self.labels)
        if self.embeddings.ndim != 2 or len(self.embeddings) != n or len(self.groups) != n:
            raise ValueError(
                f"embeddings {self.embeddings.shape}, labels ({n},) and groups ({len(self.groups)},) must agree"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must be class indices 0..{len(self.class_names) - 1}, got "
                f"{self.labels.min()}..{self.labels.max()}"
            )

    def check(self, embedding_dim: int | None = None, *, min_per_class: int = 2) -> None:
        """Raise :class:`CytokenError` for a wrong embedding dimension, non-finite values or a rare class."""
        if embedding_dim is not None and self.embeddings.shape[1] != embedding_dim:
            raise CytokenError(
                f"embeddings have dimension {self.embeddings.shape[1]} but the model produces "
                f"{embedding_dim}-d tokens; were they computed with a different model?"
            )
        if not np.isfinite(self.embeddings).all():
            raise CytokenError("embeddings contain NaN or infinite values (cells with no pixel on the token grid?)")
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        rare = [f"{self.class_names[i]!r} ({counts[i]})" for i in np.flatnonzero(counts < min_per_class)]
        if rare:
            raise CytokenError(
                f"class(es) with fewer than {min_per_class} labelled cells: {', '.join(rare)}; "
                "add labels or drop the class"
            )

    def subset(self, index: np.ndarray) -> LabelledCells:
        """The cells at ``index``."""
        return LabelledCells(self.embeddings[index], self.labels[index], self.groups[index], self.class_names)
