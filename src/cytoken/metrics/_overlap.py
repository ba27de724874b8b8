"""Sparse pairwise overlaps of two instance maps and one-to-one matching on sparse candidate pairs.

Everything here is linear in the number of pixels plus the number of *overlapping* (true, pred) pairs: no
dense N x M IoU matrix is ever built. Pairwise intersections come from one ``np.unique`` over a combined int64
key of the pixels that are foreground in both maps; instance areas come from ``np.bincount``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

__all__ = ["Overlap", "as_instance_map", "compute_overlap", "max_weight_matching"]

# Above this largest id, areas are counted with np.unique instead of a bincount of length max_id + 1.
_BINCOUNT_MAX_ID = 1 << 22


def as_instance_map(arr: np.ndarray, name: str) -> np.ndarray:
    """Check one instance map and return it as a non-negative integer array of a bincount-safe dtype.

    Args:
        arr: (H, W) instance map: 0 = background, any other non-negative integer = one instance. bool is
            accepted (one instance).
        name: argument name used in error messages.

    Returns:
        The same values with an integer dtype that ``np.bincount`` accepts (bool becomes uint8, uint64 int64).

    Raises:
        ValueError: when the map is not 2-D, not integer/bool, or holds negative ids.
    """
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D instance map (H, W), got shape {a.shape}")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance ids (0 = background), got dtype {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and int(a.min()) < 0:
        raise ValueError(f"{name} holds negative ids (min {int(a.min())}); allowed: 0 = background, ids > 0")
    if a.dtype == np.uint64:
        if a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds ids above the int64 range (max {int(a.max())})")
        a = a.astype(np.int64)
    return a


def _ids_and_areas(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero ids of a flat label array and their pixel counts (both int64)."""
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    max_id = int(flat.max())
    if max_id == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if max_id <= max(_BINCOUNT_MAX_ID, 4 * flat.size):
        counts = np.bincount(flat, minlength=max_id + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        return ids.astype(np.int64), counts[ids].astype(np.int64)
    ids, counts = np.unique(flat[flat > 0], return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


@dataclass(frozen=True)
class Overlap:
    """The sparse overlap structure of a (true, pred) pair of instance maps.

    Instances are addressed by their index into ``true_ids`` / ``pred_ids`` (sorted ascending, the order
    HoVer-Net reaches after ``remap_label``). Pairs are sorted by (true index, pred index).

    Attributes:
        true_ids: (Nt,) sorted non-zero ids of the ground truth.
        true_areas: (Nt,) pixel count of each true instance.
        pred_ids: (Np,) sorted non-zero ids of the prediction.
        pred_areas: (Np,) pixel count of each predicted instance.
        pair_true: (K,) true index of each overlapping pair.
        pair_pred: (K,) pred index of each overlapping pair.
        inter: (K,) intersection in pixels (> 0) of each pair.
    """

    true_ids: np.ndarray
    true_areas: np.ndarray
    pred_ids: np.ndarray
    pred_areas: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """(K,) union in pixels of each overlapping pair."""
        return self.true_areas[self.pair_true] + self.pred_areas[self.pair_pred] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """(K,) exact intersection over union of each overlapping pair."""
        return self.inter / self.union


def compute_overlap(true: np.ndarray, pred: np.ndarray) -> Overlap:
    """Instance areas and all non-zero pairwise intersections of two instance maps.

    Args:
        true: (H, W) ground-truth instance map (0 = background, ids arbitrary and not necessarily
            consecutive).
        pred: (H, W) predicted instance map, same shape.

    Returns:
        The sparse :class:`Overlap`.

    Raises:
        ValueError: on shape mismatch or invalid maps (see :func:`as_instance_map`).
    """
    t = as_instance_map(true, "true")
    p = as_instance_map(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same shape, got {t.shape} and {p.shape}")
    tf = t.ravel()
    pf = p.ravel()
    true_ids, true_areas = _ids_and_areas(tf)
    pred_ids, pred_areas = _ids_and_areas(pf)
    empty = np.zeros(0, np.int64)
    if true_ids.size == 0 or pred_ids.size == 0:
        return Overlap(true_ids, true_areas, pred_ids, pred_areas, empty, empty, empty)
    both = (tf > 0) & (pf > 0)
    tv = tf[both].astype(np.int64)
    pv = pf[both].astype(np.int64)
    if tv.size == 0:
        return Overlap(true_ids, true_areas, pred_ids, pred_areas, empty, empty, empty)
    stride = int(pred_ids[-1]) + 1
    if int(true_ids[-1]) < (1 << 62) // stride:
        keys, inter = np.unique(tv * stride + pv, return_counts=True)
        tid, pid = np.divmod(keys, stride)
        pair_true = np.searchsorted(true_ids, tid)
        pair_pred = np.searchsorted(pred_ids, pid)
    else:  # huge ids: compress to indices first so the combined key cannot overflow
        n_pred = pred_ids.size
        keys, inter = np.unique(
            np.searchsorted(true_ids, tv) * n_pred + np.searchsorted(pred_ids, pv), return_counts=True
        )
        pair_true, pair_pred = np.divmod(keys, n_pred)
    return Overlap(
        true_ids,
        true_areas,
        pred_ids,
        pred_areas,
        pair_true.astype(np.int64),
        pair_pred.astype(np.int64),
        inter.astype(np.int64),
    )


def max_weight_matching(
    n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """One-to-one matching of maximum total weight over sparse candidate edges (exact, sparse Hungarian).

    A maximum-weight matching that may leave nodes unmatched is reduced to a minimum-cost *perfect* matching
    on a sparse (R + C) x (C + R) graph and solved with
    ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp, an exact shortest-augmenting-path
    Hungarian method): edge (i, j) costs ``B - w_ij`` (``B = max w + 1``); every row i has a private dummy
    column and every column j a private dummy row at cost ``B`` ("unmatched"); the two dummies of an edge are
    joined at cost ``B`` so that they can pair up when the edge is used. Every perfect matching then costs
    ``(R + C) B - sum(matched w)``, so the optimum is the maximum-weight matching, the same optimum a dense
    ``linear_sum_assignment`` on the full R x C weight matrix finds, in memory linear in the number of edges.

    Args:
        n_rows: number of row nodes.
        n_cols: number of column nodes.
        rows: (K,) row index of each candidate edge.
        cols: (K,) column index of each candidate edge (at most one edge per (row, col)).
        weights: (K,) strictly positive weight of each edge.

    Returns:
        Sorted indices into the K edges of the chosen matching.
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    weights = np.asarray(weights, np.float64)
    if rows.size == 0:
        return np.zeros(0, np.int64)
    big = float(weights.max()) + 1.0
    r_ids = np.arange(n_rows)
    c_ids = np.arange(n_cols)
    graph = csr_matrix(
        (
            np.concatenate(
                [big - weights, np.full(n_rows, big), np.full(n_cols, big), np.full(rows.size, big)]
            ),
            (
                np.concatenate([rows, r_ids, n_rows + c_ids, n_rows + cols]),
                np.concatenate([cols, n_cols + r_ids, c_ids, n_cols + rows]),
            ),
        ),
        shape=(n_rows + n_cols, n_cols + n_rows),
    )
    _, col_of_row = min_weight_full_bipartite_matching(graph)
    matched_rows = np.flatnonzero(col_of_row[:n_rows] < n_cols)
    matched_keys = matched_rows * n_cols + col_of_row[matched_rows]
    edge_keys = rows * n_cols + cols
    order = np.argsort(edge_keys, kind="stable")
    return np.sort(order[np.searchsorted(edge_keys[order], matched_keys)]).astype(np.int64)
