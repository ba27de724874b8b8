"""The output folder of one image or slide, written in a stream and committed atomically.

``DIR/<stem>/`` holds:

- ``cells.geojson`` (``.gz`` for slides): QuPath / geopandas FeatureCollection, one Polygon per cell;
- ``cells.json`` and ``cell_detection.json``: CellViT++'s layouts;
- ``cells.parquet``: one row per cell (id, centroid, bbox, polygon WKB, area µm², class, probability, tile);
- ``embeddings.npy``: (N, D) float16, row i belongs to the i-th row of ``cells.parquet``;
- ``overlay.png``: contours coloured by class (images up to 4096²);
- ``run.json``: model id and sha256, µm/px, parameters, versions, timings, counts.

Everything is built in a temporary sibling folder and renamed into place at the end, so a failed or interrupted run
never leaves a half-written output.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.export import (
    CellViTJSONWriter,
    GeoJSONWriter,
    ParquetCellWriter,
    write_overlay,
)
from cytoken.types import CellSet

__all__ = ["CellOutputWriter", "versions"]


def versions() -> dict[str, str]:
    """Versions of cytoken and its main dependencies (for ``run.json``)."""
    import cytoken

    out = {"cytoken": cytoken.__version__, "python": platform.python_version()}
    for mod in ("numpy", "torch", "scipy", "skimage", "cv2", "shapely", "pyarrow", "openslide"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:  # optional or odd module: just not reported
            continue
    return out


class _NpyAppender:
    """Append float16 rows to a raw file; :meth:`finish` turns it into a proper ``.npy``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = path.with_suffix(".raw")
        self.fh = open(self.raw, "wb")  # noqa: SIM115
        self.rows = 0
        self.dim: int | None = None

    def add(self, emb: np.ndarray | None, n: int) -> None:
        if emb is None:
            if n and self.dim is not None:
                raise ValueError("cells without embeddings after cells with embeddings")
            return
        if self.dim is None:
            self.dim = emb.shape[1]
        self.fh.write(np.ascontiguousarray(emb, np.float16).tobytes())
        self.rows += len(emb)

    def finish(self) -> None:
        self.fh.close()
        if self.dim is None:
            self.raw.unlink()
            return
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                  "shape": (self.rows, self.dim)}  # fmt: skip
        with open(self.path, "wb") as out, open(self.raw, "rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := src.read(1 << 24):
                out.write(chunk)
        self.raw.unlink()


class CellOutputWriter:
    """Stream cells into an output folder (use inside :func:`cytoken.io.atomic.atomic_dir`).

    Args:
        folder: the (temporary) folder to write into.
        gzip_geojson: write ``cells.geojson.gz`` instead of ``cells.geojson``.
        type_map: class id → name for the CellViT++ files.
        wsi_metadata: CellViT++ ``wsi_metadata``.
        geojson_meta: extra metadata in the GeoJSON collection.
        id_seed: makes GeoJSON feature ids deterministic UUIDs (same input + model -> same ids, e.g. after resume).
    """

    def __init__(
        self,
        folder: Path,
        *,
        gzip_geojson: bool = False,
        type_map: dict[int, str] | None = None,
        wsi_metadata: dict[str, Any] | None = None,
        geojson_meta: dict[str, Any] | None = None,
        id_seed: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        name = "cells.geojson.gz" if gzip_geojson else "cells.geojson"
        self.geojson = GeoJSONWriter(self.folder / name, metadata=geojson_meta, id_seed=id_seed)
        self.cellvit = CellViTJSONWriter(self.folder / "cells.json", type_map=type_map, wsi_metadata=wsi_metadata)
        self.detection = CellViTJSONWriter(
            self.folder / "cell_detection.json", detection=True, type_map=type_map, wsi_metadata=wsi_metadata
        )
        self.parquet = ParquetCellWriter(self.folder / "cells.parquet")
        self.embeddings = _NpyAppender(self.folder / "embeddings.npy")
        self.counts: Counter[str] = Counter()
        self.n = 0
        self.t0 = time.time()

    def add(self, cells: CellSet) -> None:
        """Append cells (ids must already be unique over the whole output)."""
        if not len(cells):
            return
        for w in (self.geojson, self.cellvit, self.detection, self.parquet):
            w.add(cells)
        self.embeddings.add(cells.embeddings, len(cells))
        self.counts.update(cells.class_name(int(c)) for c in cells.class_ids)
        self.n += len(cells)

    def close(self, run_info: dict[str, Any]) -> dict[str, Any]:
        """Finish every file and write ``run.json``; returns the run summary."""
        for w in (self.geojson, self.cellvit, self.detection, self.parquet):
            w.close()
        self.embeddings.finish()
        summary = {
            **run_info,
            "cells": self.n,
            "cells_per_class": dict(sorted(self.counts.items())),
            "embedding_dim": self.embeddings.dim,
            "wall_seconds": round(time.time() - self.t0, 3),
            "versions": versions(),
        }
        (self.folder / "run.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def abort(self) -> None:
        """Discard partial files (the enclosing atomic folder is removed anyway)."""
        for w in (self.geojson, self.cellvit, self.detection, self.parquet):
            try:
                w.abort()
            except Exception:  # already closed or never opened
                continue

    @staticmethod
    def overlay(folder: Path, image: np.ndarray, cells: CellSet) -> Path | None:
        """Write ``overlay.png`` (skipped with a warning above 4096²)."""
        return write_overlay(image, cells, Path(folder) / "overlay.png")
