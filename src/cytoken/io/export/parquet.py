"""Parquet export: one row per cell, columns from :meth:`cytoken.types.CellSet.to_arrow`.

Columns: ``id``, ``x``, ``y`` (centroid), ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (x1/y1
    exclusive),
``area_px``, ``area_um2``, ``class_id``, ``class_name``, ``class_prob``, ``tile`` (-1 when not tiled) and
``polygon_wkb`` (the contour as WKB, null for contours with fewer than 3 vertices). The schema metadata holds
``cytoken.mpp`` and ``cytoken.class_names``. Embeddings are not written here.

Read back with ``pyarrow.parquet.read_table(path)`` or ``pandas.read_parquet(path)``; polygons with
``shapely.from_wkb(table["polygon_wkb"])``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cytoken.io.export._stream import StreamingCellWriter
from cytoken.types import CellSet

__all__ = ["ParquetCellWriter", "write_parquet"]


class ParquetCellWriter(StreamingCellWriter):
    """Stream CellSets into one Parquet file, buffering rows into row groups of ``row_group_size``.

    Every CellSet must have the same µm/px and class names as the first (they are stored once, in the schema
    metadata). Nothing appears at ``path`` until :meth:`close` succeeds.

    Args:
        path: output file.
        row_group_size: rows per row group (memory held before a flush is about this many rows).
        compression: Parquet codec (``"zstd"``, ``"snappy"``, ``"gzip"``, ``"none"``).

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> import pyarrow.parquet as pq
        >>> sq = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
        >>> cs = CellSet(ids=[1], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]], contours=[sq], area_px=[25],
        ...              class_ids=[1], class_probs=[0.9], mpp=0.25, class_names=("tumor",))
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cells.parquet"
        >>> with ParquetCellWriter(out) as w:
        ...     w.add(cs)
        ...     w.add(cs)
        1
        1
        >>> pq.read_table(out).num_rows
        2
    """

    def __init__(self, path: str | os.PathLike[str], *, row_group_size: int = 65536, compression: str = "zstd") -> None:
        if row_group_size < 1:
            raise ValueError(f"ParquetCellWriter: row_group_size must be >= 1, got {row_group_size}")
        super().__init__(path, None)
        self._row_group_size = row_group_size
        self._compression = compression
        self._writer: Any = None
        self._schema: Any = None
        self._buffer: list[Any] = []
        self._buffered = 0
        self.count = 0

    def _open(self, schema: Any) -> None:
        import pyarrow.parquet as pq

        self._schema = schema
        self._writer = pq.ParquetWriter(str(self._file.tmp_path), schema, compression=self._compression)

    def _flush(self) -> None:
        if not self._buffer:
            return
        import pyarrow as pa

        table = pa.concat_tables(self._buffer)
        self._writer.write_table(table, row_group_size=self._row_group_size)
        self._buffer.clear()
        self._buffered = 0

    def add(self, cells: CellSet) -> int:
        """Append one CellSet; returns the number of rows added.

        Raises:
            ValueError: when µm/px or class names differ from the first CellSet's, or the writer is closed.
        """
        return super().add(cells)

    def _add(self, cells: CellSet) -> int:
        table = cells.to_arrow()
        if self._schema is None:
            self._open(table.schema)
        elif not table.schema.equals(self._schema, check_metadata=True):
            first = {k.decode(): v.decode() for k, v in (self._schema.metadata or {}).items()}
            this = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            raise ValueError(f"ParquetCellWriter: cells with {this} cannot join a file with {first}")
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
            self.count += table.num_rows
            if self._buffered >= self._row_group_size:
                self._flush()
        return table.num_rows

    def close(self) -> Path:
        """Write buffered rows, finish the file and atomically move it to ``path``; returns ``path``.

        A writer that never received a CellSet writes an empty table (schema metadata ``cytoken.mpp`` = nan).
        """
        return super().close()

    def _finish(self) -> None:
        if self._schema is None:
            self._open(CellSet.empty(float("nan")).to_arrow().schema)
        self._flush()
        self._writer.close()
        self._writer = None

    def _release(self) -> None:
        self._buffer.clear()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def write_parquet(
    cells: CellSet | Iterable[CellSet],
    path: str | os.PathLike[str],
    *,
    row_group_size: int = 65536,
    compression: str = "zstd",
) -> Path:
    """Write cells to a Parquet file atomically (one row per cell; see the module notes for the columns).

    Args:
        cells: one CellSet or an iterable of CellSets with the same µm/px and class names.
        path: output file.
        row_group_size: rows per row group.
        compression: Parquet codec.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> import pyarrow.parquet as pq
        >>> tri = np.array([[0, 0], [6, 0], [0, 6]], float)
        >>> cs = CellSet(ids=[3], centroids=[[2, 2]], bboxes=[[0, 0, 7, 7]], contours=[tri], area_px=[28],
        ...              class_ids=[0], class_probs=[float("nan")], mpp=0.5)
        >>> p = write_parquet(cs, pathlib.Path(tempfile.mkdtemp()) / "cells.parquet")
        >>> pq.read_table(p).column("area_um2").to_pylist()
        [7.0]
    """
    parts = [cells] if isinstance(cells, CellSet) else cells
    with ParquetCellWriter(path, row_group_size=row_group_size, compression=compression) as writer:
        for part in parts:
            writer.add(part)
    return Path(path)
