"""The output folder of one image or slide, written in a stream and committed atomically.

``DIR/<stem>/`` holds:

- ``cells.geojson`` (``.gz`` for slides): QuPath / geopandas FeatureCollection, one Polygon per cell;
- ``cells.json`` and ``cell_detection.json``: CellViT++'s layouts;
- ``cells.parquet``: one row per cell (id, centroid, bbox, polygon WKB, area µm², class, probability, tile);
- ``embeddings.npy``: (N, D) float16, row i belongs to the i-th row of ``cells.parquet`` (an output without cells
  has a (0, D) one, unless segmented with ``--embeddings none``);
- ``cells.h5ad``: AnnData for scanpy / squidpy: X = the embeddings (float32), obs = the cell table (same row
  order), obsm["spatial"] = centroids (needs ``pip install "cytoken[anndata]"``; skipped with a warning
  otherwise; see :mod:`cytoken.io.export.h5ad`);
- ``overlay.png``: contours coloured by class (images up to 4096²);
- ``run.json``: model id and sha256, µm/px, parameters, versions, timings, counts.

Everything is built in a temporary sibling folder and renamed into place at the end, so a failed or interrupted run
never leaves a half-written output. A failed write (disk full, permission denied, read-only file system) stops
the run with one :class:`OutputWriteError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import struct
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import AtomicFile, atomic_dir, atomic_write_text
from cytoken.io.export import (
    CellViTJSONWriter,
    GeoJSONWriter,
    H5ADCellWriter,
    ParquetCellWriter,
    h5ad_missing_dependency,
    write_overlay,
)
from cytoken.types import CellSet, CytokenError

__all__ = ["CellOutputWriter", "OutputWriteError", "output_folder", "versions", "writing"]

# errors that only a write can cause: an OSError with one of these is reported as a failed write
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputWriteError(CytokenError):
    """An output file could not be written (disk full, permission denied, read-only file system, ...)."""


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


def _reason(exc: OSError) -> str:
    """The OS reason of ``exc`` in lower case, e.g. ``"no space left on device"``."""
    code = exc.errno
    if not code:  # h5py and pyarrow sometimes only put the errno in the message
        found = re.search(r"errno\s*=?\s*(\d+)", str(exc))
        code = int(found.group(1)) if found else None
    text = os.strerror(code) if code else (exc.strerror or str(exc) or type(exc).__name__)
    return text[:1].lower() + text[1:]


def write_error(exc: OSError, path: str | os.PathLike[str]) -> OutputWriteError:
    """An :class:`OutputWriteError` saying why writing ``path`` failed.

    Example:
        >>> str(write_error(OSError(errno.ENOSPC, "No space left on device"), "out/cells.geojson"))
        'no space left on device while writing out/cells.geojson'
    """
    return OutputWriteError(f"{_reason(exc)} while writing {path}")


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError raised inside the block into one :class:`OutputWriteError` naming ``path``.

    Example:
        >>> try:
        ...     with writing("out/cells.parquet"):
        ...         raise OSError(errno.EROFS, "Read-only file system")
        ... except OutputWriteError as e:
        ...     print(e)
        read-only file system while writing out/cells.parquet
    """
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path) from exc


@contextlib.contextmanager
def output_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`~cytoken.io.atomic.atomic_dir` whose failed writes become one :class:`OutputWriteError`.

    The block fills a temporary sibling folder that replaces ``final`` only when the block succeeds; on any error
    it is deleted and ``final`` is left as it was. An OSError of a write inside the block (or of the final rename)
    is reported with the path it would have had inside ``final``.

    Args:
        final: the output folder.

    Yields:
        The temporary folder to fill.

    Raises:
        OutputWriteError: a write failed.
        CytokenError: ``final``'s parent cannot be created or written.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "img"
        >>> with output_folder(out) as tmp:
        ...     _ = (tmp / "run.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['run.json']
    """
    final = Path(final)
    tmp: Path | None = None
    try:
        with atomic_dir(final) as tmp:
            yield tmp
    except OSError as exc:
        where = final
        if exc.filename and tmp is not None:
            try:
                where = final / Path(os.fsdecode(exc.filename)).relative_to(tmp)
            except ValueError:  # a file outside the output folder: not one of our writes
                if exc.errno not in _WRITE_ERRNOS:
                    raise
                where = Path(os.fsdecode(exc.filename))
        raise write_error(exc, where) from exc


_NPY_HEADER = 128  # bytes; room for any (rows, dim) shape


def _npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 ``.npy`` header for a C-order (rows, dim) float16 array, padded to ``_NPY_HEADER`` bytes."""
    text = "{'descr': '<f2', 'fortran_order': False, 'shape': (" + f"{int(rows)}, {int(dim)}), }}"
    body = text.ljust(_NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class _NpyAppender:
    """Append float16 rows to an atomic ``.npy`` file in place; :meth:`finish` writes the final shape.

    ``empty_dim``: the width of the (0, D) file :meth:`finish` writes when no row came (None: no file then).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.dim: int | None = None
        self.empty_dim: int | None = None
        self._file: AtomicFile | None = None

    def _start(self, dim: int) -> None:
        self.dim = int(dim)
        self._file = AtomicFile(self.path, "wb")
        self._file.file.write(_npy_header(0, self.dim))  # type: ignore[union-attr]

    def add(self, emb: np.ndarray | None, n: int) -> None:
        if emb is None:
            if n and self.dim is not None:
                raise ValueError("cells without embeddings after cells with embeddings")
            return
        if self.dim is None:
            if self.rows:  # pragma: no cover - rows only grow with embeddings
                raise ValueError("cells with embeddings after cells without embeddings")
            self._start(int(emb.shape[1]))
        elif emb.shape[1] != self.dim:
            raise ValueError(f"{emb.shape[1]}-d embeddings cannot follow {self.dim}-d embeddings")
        self._file.file.write(np.ascontiguousarray(emb, np.float16).tobytes())  # type: ignore[union-attr]
        self.rows += len(emb)

    def finish(self) -> None:
        if self._file is None:
            if self.empty_dim is None:
                return
            self._start(self.empty_dim)
        try:
            fh = self._file.file
            fh.seek(0)  # type: ignore[union-attr]
            fh.write(_npy_header(self.rows, self.dim or 0))  # type: ignore[union-attr]
        except BaseException:
            self._file.abort()
            raise
        self._file.commit()

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()


class CellOutputWriter:
    """Stream cells into an output folder (use inside :func:`output_folder`).

    Every file is written atomically; an OSError while writing one stops with an :class:`OutputWriteError`
    naming it (as ``final/<name>``).

    Args:
        folder: the (temporary) folder to write into.
        gzip_geojson: write ``cells.geojson.gz`` instead of ``cells.geojson``.
        type_map: class id → name for the CellViT++ files.
        wsi_metadata: CellViT++ ``wsi_metadata``.
        geojson_meta: extra metadata in the GeoJSON collection.
        id_seed: makes GeoJSON feature ids deterministic UUIDs (same input + model -> same ids, e.g. after resume).
        embedding_dim: width D of the cells' embeddings, for the (0, D) ``embeddings.npy`` of an output without
            cells (an empty CellSet with embeddings also gives it; None and no such CellSet: no file).
        final: where ``folder`` will end up, for error messages (default ``folder``).
        h5ad: also write ``cells.h5ad`` (skipped with one warning when h5py / anndata are missing).
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
        embedding_dim: int | None = None,
        final: Path | None = None,
        h5ad: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.final = Path(final) if final is not None else self.folder
        self.h5ad: H5ADCellWriter | None = None
        self.streams: dict[str, Any] = {}
        self.embeddings = _NpyAppender(self.folder / "embeddings.npy")
        self.embeddings.empty_dim = embedding_dim
        try:
            name = "cells.geojson.gz" if gzip_geojson else "cells.geojson"
            self.geojson = self._open(GeoJSONWriter, name, metadata=geojson_meta, id_seed=id_seed)
            self.cellvit = self._open(CellViTJSONWriter, "cells.json", type_map=type_map, wsi_metadata=wsi_metadata)
            self.detection = self._open(
                CellViTJSONWriter, "cell_detection.json", detection=True, type_map=type_map, wsi_metadata=wsi_metadata
            )
            self.parquet = self._open(ParquetCellWriter, "cells.parquet")
            if h5ad:
                missing = h5ad_missing_dependency()
                if missing is None:
                    self.h5ad = self._open(H5ADCellWriter, "cells.h5ad")
                else:
                    warnings.warn(f"cells.h5ad not written: {missing}", stacklevel=2)
        except BaseException:
            self.abort()
            raise
        self.counts: Counter[str] = Counter()
        self.n = 0
        self.t0 = time.time()

    def _open(self, cls: Any, name: str, **kwargs: Any) -> Any:
        with writing(self.final / name):
            writer = cls(self.folder / name, **kwargs)
        self.streams[name] = writer
        return writer

    def add(self, cells: CellSet) -> None:
        """Append cells (ids must already be unique over the whole output).

        Raises:
            OutputWriteError: a file could not be written.
        """
        if not len(cells):
            if cells.embeddings is not None:  # the width of an output without cells, from the cells themselves
                self.embeddings.empty_dim = int(cells.embeddings.shape[1])
            return
        for name, w in self.streams.items():
            with writing(self.final / name):
                w.add(cells)
        with writing(self.final / "embeddings.npy"):
            self.embeddings.add(cells.embeddings, len(cells))
        self.counts.update(cells.class_name(int(c)) for c in cells.class_ids)
        self.n += len(cells)

    def close(self, run_info: dict[str, Any], *, started: float | None = None) -> dict[str, Any]:
        """Finish every file and write ``run.json``; returns the run summary.

        ``run.json`` gets ``wall_seconds``, the time since ``started`` (a ``time.time()`` value; default: since
        this writer was made), and ``write_seconds``, the time spent writing the files.

        Raises:
            OutputWriteError: a file could not be written.
        """
        if self.h5ad is not None:
            model = run_info.get("model")
            if isinstance(model, Mapping):
                self.h5ad.uns["model"] = {k: str(model[k]) for k in ("name", "sha256") if model.get(k)}
            if run_info.get("input"):
                self.h5ad.uns["input"] = str(run_info["input"])
        for name, w in self.streams.items():
            with writing(self.final / name):
                w.close()
        with writing(self.final / "embeddings.npy"):
            self.embeddings.finish()
        summary = {
            **run_info,
            "cells": self.n,
            "cells_per_class": dict(sorted(self.counts.items())),
            "embedding_dim": self.embeddings.dim,
            "wall_seconds": round(time.time() - (self.t0 if started is None else started), 3),
            "write_seconds": round(time.time() - self.t0, 3),
            "versions": versions(),
        }
        with writing(self.final / "run.json"):
            atomic_write_text(self.folder / "run.json", json.dumps(summary, indent=2, default=str))
        return summary

    def abort(self) -> None:
        """Discard partial files (the enclosing atomic folder is removed anyway)."""
        for w in self.streams.values():
            with contextlib.suppress(Exception):  # already closed or never opened
                w.abort()
        with contextlib.suppress(Exception):
            self.embeddings.abort()

    def write_overlay(self, image: np.ndarray, cells: CellSet) -> Path | None:
        """Write ``overlay.png`` (skipped with a warning above 4096²).

        Raises:
            OutputWriteError: the file could not be written.
        """
        with writing(self.final / "overlay.png"):
            return write_overlay(image, cells, self.folder / "overlay.png")

    @staticmethod
    def overlay(folder: Path, image: np.ndarray, cells: CellSet) -> Path | None:
        """Write ``overlay.png`` into ``folder`` (skipped with a warning above 4096²)."""
        return write_overlay(image, cells, Path(folder) / "overlay.png")
