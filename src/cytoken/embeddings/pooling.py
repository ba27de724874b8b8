"""Pool a (D, h, w) token grid into one D-dim vector per cell.

Two rules are provided:

* :func:`mask_weighted_embeddings` (the cytoken default): the mean of the tokens a nucleus covers, each
  token weighted by the number of nucleus pixels inside it. A nucleus lying 3:1 across two tokens gets
  ``0.75 a + 0.25 b``.
* :func:`bbox_mean_embeddings` (CellViT++ parity): the unweighted mean over the token box that contains the
  cell's bounding box (min row/col floored, max row/col ceiled after dividing by the token size).

Both work on one tile whose pixel grid is the model's input grid: token ``(r, c)`` covers pixel rows
``r*p .. r*p+p-1`` and columns ``c*p .. c*p+p-1`` for token size ``p``. Numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["bbox_mean_embeddings", "bbox_token_boxes", "mask_weighted_embeddings"]


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (D, h, w), got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.floating):
        tokens = tokens.astype(np.float32)
    return tokens


def _check_patch_size(patch_size: int) -> int:
    if int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer (token size in px, e.g. 16), got {patch_size!r}")
    return int(patch_size)


def _grid_matches(n_px: int, n_tok: int, p: int) -> bool:
    """True when ``n_px`` pixels are the token grid cropped (floor) or padded (ceil) to whole tokens."""
    return n_tok in (n_px // p, -(-n_px // p))


def mask_weighted_embeddings(
    tokens: np.ndarray,
    inst_map: np.ndarray,
    ids: Sequence[int] | np.ndarray,
    patch_size: int,
    *,
    missing: Literal["raise", "nan"] = "raise",
) -> np.ndarray:
    """Per-cell mean of the tokens each nucleus covers, weighted by covered pixel area.

    The (cell, token) pixel counts are computed in one vectorised pass over the foreground pixels (no per-cell
    loop), then each cell's vector is ``sum_t count(cell, t) * tokens[:, t] / area(cell)``.

    ``inst_map`` may be a few pixels larger or smaller than ``h * patch_size``: when the model input was
    padded up to whole tokens, ``ceil(H / p) == h`` and every pixel falls on a token; when the token grid
    covers only the whole tokens, ``floor(H / p) == h`` and the last partial row/column of pixels is pooled
    into the edge token.

    Args:
        tokens: (D, h, w) token grid of one tile (e.g. ``(384, 64, 64)`` for a 1024 px ViT-S/16 tile).
        inst_map: (H, W) integer instance map on the same pixel grid, 0 = background.
        ids: cell ids to pool (need not be sorted; repeated ids give repeated rows).
        patch_size: token size in pixels (16 for ViT/16 models, 14 for Virchow).
        missing: what to do with an id that has no pixel in ``inst_map``: ``"raise"`` a ValueError, or return
            a row of NaN.

    Returns:
        (N, D) float32 array, row i for ``ids[i]``.

    Raises:
        ValueError: for shapes that do not fit the token grid, or (with ``missing="raise"``) ids not in the
            map.

    Example:
        >>> tok = np.zeros((1, 1, 2), np.float32); tok[0, 0] = [1.0, 5.0]
        >>> inst = np.zeros((4, 8), np.int32); inst[0:3, 1:4] = 7; inst[0:3, 4] = 7
        >>> mask_weighted_embeddings(tok, inst, [7], 4)  # 9 px on token 0, 3 px on token 1
        array([[2.]], dtype=float32)
    """
    tokens = _check_tokens(tokens)
    p = _check_patch_size(patch_size)
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2 or not np.issubdtype(inst_map.dtype, np.integer):
        raise ValueError(f"inst_map must be a 2-D integer array, got shape {inst_map.shape} dtype {inst_map.dtype}")
    if missing not in ("raise", "nan"):
        raise ValueError(f"missing must be 'raise' or 'nan', got {missing!r}")
    d, h, w = tokens.shape
    big_h, big_w = inst_map.shape
    if not (_grid_matches(big_h, h, p) and _grid_matches(big_w, w, p)):
        raise ValueError(
            f"inst_map of shape {inst_map.shape} does not fit a {h}x{w} token grid with patch_size {p} "
            f"(expected about {h * p}x{w * p} px; allowed: rows with floor or ceil(H/{p}) == {h}, "
            f"cols with floor or ceil(W/{p}) == {w})"
        )
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = len(ids_arr)
    out = np.full((n, d), np.nan, np.float32)
    if n == 0:
        return out
    uniq, inverse = np.unique(ids_arr, return_inverse=True)

    flat = inst_map.ravel().astype(np.int64, copy=False)
    fg = np.flatnonzero(flat > 0)
    lab = flat[fg]
    pos = np.searchsorted(uniq, lab)
    pos_c = np.minimum(pos, len(uniq) - 1)
    keep = uniq[pos_c] == lab
    fg, row = fg[keep], pos_c[keep]
    ty = np.minimum(fg // big_w // p, h - 1)
    tx = np.minimum(fg % big_w // p, w - 1)
    hw = h * w
    key = row * hw + ty * w + tx
    pair, count = np.unique(key, return_counts=True)
    pair_row, pair_tok = pair // hw, pair % hw

    flat_tokens = tokens.reshape(d, hw).T  # (hw, D) view
    weighted = flat_tokens[pair_tok].astype(np.float64) * count[:, None]
    # pairs are sorted by row, so each present row is one contiguous run
    starts = np.flatnonzero(np.r_[True, pair_row[1:] != pair_row[:-1]]) if len(pair) else np.zeros(0, np.int64)
    present = pair_row[starts]
    area = np.add.reduceat(count, starts) if len(pair) else np.zeros(0, np.int64)
    sums = np.add.reduceat(weighted, starts, axis=0) if len(pair) else np.zeros((0, d))
    pooled = np.full((len(uniq), d), np.nan, np.float32)
    pooled[present] = (sums / area[:, None]).astype(np.float32)

    absent = np.setdiff1d(np.arange(len(uniq)), present)
    if len(absent) and missing == "raise":
        shown = ", ".join(str(int(i)) for i in uniq[absent][:10])
        raise ValueError(
            f"{len(absent)} cell id(s) have no pixel in inst_map (first: {shown}); pass missing='nan' to get NaN rows"
        )
    out[:] = pooled[inverse]
    return out


def bbox_token_boxes(bboxes: np.ndarray, patch_size: int) -> np.ndarray:
    """Token boxes ``(r0, c0, r1, c1)`` (end exclusive) of pixel boxes, by the CellViT++ rule.

    ``r0 = floor(y0 / p)``, ``c0 = floor(x0 / p)``, ``r1 = ceil(y1 / p)``, ``c1 = ceil(x1 / p)`` where ``(x0,
    y0, x1, y1)`` is a :class:`~cytoken.types.CellSet` box with exclusive ``x1, y1`` (the same numbers as
    CellViT++'s ``[[rmin, cmin], [rmax, cmax]]`` with exclusive max).

    Args:
        bboxes: (N, 4) pixel boxes ``(x0, y0, x1, y1)``, x1/y1 exclusive, on the model's pixel grid.
        patch_size: token size in pixels.

    Returns:
        (N, 4) int64 ``(r0, c0, r1, c1)``.

    Example:
        >>> bbox_token_boxes(np.array([[17, 3, 33, 20]]), 16)
        array([[0, 1, 2, 3]])
    """
    p = _check_patch_size(patch_size)
    bb = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    r0 = np.floor(bb[:, 1] / p)
    c0 = np.floor(bb[:, 0] / p)
    r1 = np.ceil(bb[:, 3] / p)
    c1 = np.ceil(bb[:, 2] / p)
    return np.stack([r0, c0, r1, c1], axis=1).astype(np.int64)


def bbox_mean_embeddings(
    tokens: np.ndarray, bboxes: np.ndarray | Sequence[Sequence[float]], patch_size: int
) -> np.ndarray:
    """Per-cell mean over the token box covering each cell's bounding box (CellViT++'s rule).

    CellViT++ divides the patch-local box by the token size, floors the min row/col, ceils the max row/col,
    slices ``tokens[:, r0:r1, c0:c1]`` and averages. This function gives the same numbers, computed for all
    cells at once with a summed-area table. Like a numpy/torch slice, a box running past the grid edge is
    clipped to it. (CellViT++ casts the token box to uint8, which would wrap past 255 tokens; that does not
    occur for its 1024 px patches and is not reproduced.)

    Args:
        tokens: (D, h, w) token grid.
        bboxes: (N, 4) pixel boxes ``(x0, y0, x1, y1)`` with exclusive x1/y1 (CellSet convention), on the
            model grid.
        patch_size: token size in pixels.

    Returns:
        (N, D) float32.

    Raises:
        ValueError: when a box is empty or lies wholly outside the token grid.

    Example:
        >>> tok = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
        >>> bbox_mean_embeddings(tok, [[4, 0, 20, 10]], 16)  # cols 0..1 of row 0
        array([[0.5]], dtype=float32)
    """
    tokens = _check_tokens(tokens)
    d, h, w = tokens.shape
    boxes = bbox_token_boxes(np.asarray(bboxes), patch_size)
    r0 = np.clip(boxes[:, 0], 0, h)
    c0 = np.clip(boxes[:, 1], 0, w)
    r1 = np.clip(boxes[:, 2], 0, h)
    c1 = np.clip(boxes[:, 3], 0, w)
    area = (r1 - r0) * (c1 - c0)
    bad = np.flatnonzero(area <= 0)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{len(bad)} bbox(es) cover no token of the {h}x{w} grid with patch_size {patch_size} "
            f"(first: row {i}, bbox {np.asarray(bboxes)[i].tolist()}); "
            "boxes must be (x0, y0, x1, y1) on the model grid"
        )
    sat = np.zeros((h + 1, w + 1, d), np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(np.moveaxis(tokens, 0, -1).astype(np.float64), axis=0), axis=1)
    sums = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return (sums / area[:, None]).astype(np.float32)
