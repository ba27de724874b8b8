"""A compact, lossless on-disk form of a :class:`~cytoken.types.CellSet` (``.npz``), for resumable runs and caches.

Ragged contours are stored as one vertex array plus offsets; metadata (µm/px, class names and colours) as JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from cytoken.io.atomic import atomic_write_bytes
from cytoken.types import CellSet

__all__ = ["load_cells", "save_cells"]


def save_cells(cells: CellSet, path: str | Path) -> Path:
    """Write ``cells`` to ``path`` (``.npz``) atomically.

    Example:
        >>> import tempfile, pathlib
        >>> cs = CellSet.empty(0.25, ("a",))
        >>> p = save_cells(cs, pathlib.Path(tempfile.mkdtemp()) / "c.npz")
        >>> len(load_cells(p)), load_cells(p).class_names
        (0, ('a',))
    """
    lengths = np.array([len(c) for c in cells.contours], np.int64)
    xy = np.concatenate([np.asarray(c, np.float64).reshape(-1, 2) for c in cells.contours]) if len(cells) else \
        np.zeros((0, 2))  # fmt: skip
    meta = {"mpp": cells.mpp, "class_names": list(cells.class_names),
            "class_colors": [list(c) for c in cells.class_colors]}  # fmt: skip
    arrays = {
        "ids": cells.ids, "centroids": cells.centroids, "bboxes": cells.bboxes, "area_px": cells.area_px,
        "class_ids": cells.class_ids, "class_probs": cells.class_probs, "contour_lengths": lengths,
        "contour_xy": xy, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
    }  # fmt: skip
    if cells.tiles is not None:
        arrays["tiles"] = cells.tiles
    if cells.embeddings is not None:
        arrays["embeddings"] = cells.embeddings
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_cells(path: str | Path) -> CellSet:
    """Read a CellSet written by :func:`save_cells`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        offsets = np.concatenate([[0], np.cumsum(z["contour_lengths"])])
        xy = z["contour_xy"]
        contours = [xy[offsets[i] : offsets[i + 1]].copy() for i in range(len(offsets) - 1)]
        return CellSet(
            ids=z["ids"], centroids=z["centroids"], bboxes=z["bboxes"], contours=contours, area_px=z["area_px"],
            class_ids=z["class_ids"], class_probs=z["class_probs"], mpp=float(meta["mpp"]),
            class_names=tuple(meta["class_names"]), class_colors=tuple(tuple(c) for c in meta["class_colors"]),
            tiles=z["tiles"] if "tiles" in z.files else None,
            embeddings=z["embeddings"] if "embeddings" in z.files else None,
        )  # fmt: skip
