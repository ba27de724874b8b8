"""AnnData ``.h5ad`` export: one observation per cell, the cell embeddings as ``X``, written chunk by chunk.

Layout (the AnnData on-disk format, anndata >= 0.8; every element carries its ``encoding-type`` and
``encoding-version`` attributes)::

    X                (N, D) float32 per-cell embeddings; (N, 0) when the run had no embeddings
    obs              index: cell id as a string ("1", "2", ...); columns:
                     centroid_x, centroid_y   centroid in pixels (level-0 pixels for slides)
                     area_um2                 cell area in µm²
                     class                    categorical: "unclassified", then the class names, so that
                                              obs["class"].cat.codes == the class id
                     class_prob               probability of the class (NaN when unknown)
                     tile                     tile / window index (-1 when not tiled)
    var              index "0" .. "D-1" (embedding dimensions), no columns
    obsm["spatial"]  (N, 2) float64 centroids (x, y) in pixels, where scanpy and squidpy look for positions
    uns              mpp (µm/px of the pixel coordinates), class_names (classes 1..C), class_colors (one hex
                     colour per obs["class"] category, the key scanpy uses to colour "class"), coordinates,
                     plus the writer's extra entries (e.g. the model's name and sha256)

Rows follow the order in which cells were added, i.e. the rows of ``cells.parquet`` and ``embeddings.npy``
written from the same CellSets. The file is written with h5py into resizable, chunked datasets, so a slide's
millions of cells never sit in memory at once; reading it back needs ``anndata`` (``pip install
"cytoken[anndata]"``): ``anndata.read_h5ad(path)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.export._stream import StreamingCellWriter
from cytoken.types import CellSet, CytokenError

__all__ = ["H5AD_INSTALL_HINT", "H5ADCellWriter", "h5ad_missing_dependency", "write_h5ad"]

H5AD_INSTALL_HINT = 'pip install "cytoken[anndata]"'
_OBS_COLUMNS = ("centroid_x", "centroid_y", "area_um2", "class", "class_prob", "tile")
_X_CHUNK_BYTES = 1 << 18  # 256 KiB chunks of X: well inside HDF5's default 1 MiB chunk cache


def h5ad_missing_dependency() -> str | None:
    """None when ``.h5ad`` files can be written and read (h5py and anndata installed), else the reason.

    Example:
        >>> h5ad_missing_dependency() is None or "cytoken[anndata]" in h5ad_missing_dependency()
        True
    """
    missing = []
    for module in ("h5py", "anndata"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed ({H5AD_INSTALL_HINT})"


def _attrs(obj: Any, encoding: str, version: str) -> Any:
    obj.attrs["encoding-type"] = encoding
    obj.attrs["encoding-version"] = version
    return obj


def _write_uns(group: Any, key: str, value: Any) -> None:
    """Write one ``uns`` entry with its AnnData encoding (None values are left out)."""
    import h5py

    if value is None:
        return
    if isinstance(value, Mapping):
        sub = _attrs(group.create_group(key), "dict", "0.1.0")
        for k, v in value.items():
            _write_uns(sub, str(k), v)
    elif isinstance(value, str):
        _attrs(group.create_dataset(key, data=value, dtype=h5py.string_dtype()), "string", "0.2.0")
    elif isinstance(value, bool | int | float | np.number | np.bool_):
        _attrs(group.create_dataset(key, data=np.asarray(value)), "numeric-scalar", "0.2.0")
    else:
        arr = np.asarray(value)
        if arr.size == 0 or arr.dtype.kind in "UO":
            strings = np.array([str(v) for v in arr.ravel()], dtype=object).reshape(arr.shape)
            ds = group.create_dataset(key, data=strings, dtype=h5py.string_dtype())
            _attrs(ds, "string-array", "0.2.0")
        else:
            _attrs(group.create_dataset(key, data=arr), "array", "0.2.0")


@contextlib.contextmanager
def _hdf5_errors() -> Iterator[None]:
    """Re-raise an HDF5 failure that carries an errno (h5py sometimes raises RuntimeError) as that OSError."""
    try:
        yield
    except RuntimeError as exc:
        found = re.search(r"errno\s*=\s*(\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, f"{os.strerror(code)} ({exc})") from exc


def _close_discarding(h5file: Any) -> None:
    """Close an h5py File whose content is thrown away, without letting HDF5 write to its file again.

    After a failed write (disk full, file too large) HDF5's close retries the flush, fails again and leaves freed
    objects behind that crash the interpreter when they are collected (seen with h5py 3.16). Pointing HDF5's
    file descriptor at the null device first makes that last flush succeed harmlessly.
    """
    with contextlib.suppress(Exception):
        if h5file.id.valid:
            fd = h5file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
    h5file.close()


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


class H5ADCellWriter(StreamingCellWriter):
    """Stream CellSets into an AnnData ``.h5ad`` file (see the module notes for the layout).

    Every CellSet must have the first one's µm/px and class names, and either all carry embeddings of one
    dimension or none does. Memory holds one CellSet at a time; nothing appears at ``path`` until
    :meth:`close` succeeds.

    Args:
        path: output file.
        uns: extra ``uns`` entries (str, numbers, lists, nested dicts; None values are left out). The
            ``uns`` attribute may be updated until :meth:`close`.
        chunk_rows: most rows per HDF5 chunk (chunks are as long as the first CellSet, 256 rows at least; those
            of X hold at most about 256 KiB).

    Raises:
        CytokenError: when h5py is not installed, or the temporary file cannot be created.

    Example:
        >>> import tempfile, pathlib
        >>> import anndata
        >>> sq = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
        >>> cs = CellSet(ids=[7], centroids=[[2, 2]], bboxes=[[0, 0, 5, 5]], contours=[sq], area_px=[25],
        ...              class_ids=[1], class_probs=[0.9], mpp=0.25, class_names=("tumor",),
        ...              embeddings=np.ones((1, 3), np.float32))
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "cells.h5ad"
        >>> with H5ADCellWriter(out, uns={"model": {"name": "tiny"}}) as w:
        ...     w.add(cs)
        1
        >>> a = anndata.read_h5ad(out)
        >>> a.shape, list(a.obs_names), list(a.obs["class"]), a.uns["model"]["name"]
        ((1, 3), ['7'], ['tumor'], 'tiny')
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        uns: Mapping[str, Any] | None = None,
        chunk_rows: int = 4096,
    ) -> None:
        if chunk_rows < 1:
            raise ValueError(f"H5ADCellWriter: chunk_rows must be >= 1, got {chunk_rows}")
        try:
            import h5py
        except ImportError:
            raise CytokenError(f"writing {Path(path).name} needs h5py: {H5AD_INSTALL_HINT}") from None
        super().__init__(path, None)
        self.uns: dict[str, Any] = dict(uns or {})
        self._chunk_rows = chunk_rows
        self._rows = chunk_rows
        self.count = 0
        self.dim: int | None = None
        self._mpp: float | None = None
        self._names: tuple[str, ...] = ()
        self._colors: tuple[tuple[int, int, int], ...] = ((160, 160, 160),)
        self._obs: dict[str, Any] = {}
        self._spatial: Any = None
        self._x: Any = None
        try:
            self._h5: Any = h5py.File(self._file.tmp_path, "w")
            _attrs(self._h5, "anndata", "0.1.0")
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ structure
    def _column(self, group: Any, name: str, dtype: Any, tail: tuple[int, ...] = ()) -> Any:
        chunks = (self._rows, *tail)
        ds = group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=chunks, dtype=dtype)
        kind = "string-array" if name == "_index" else "array"
        return _attrs(ds, kind, "0.2.0")

    def _begin(self, cells: CellSet | None) -> None:
        import h5py

        self._mpp = float("nan") if cells is None else float(cells.mpp)
        # chunks as long as the first CellSet (at least 256 rows), so a small image does not get 4096-row chunks
        self._rows = min(self._chunk_rows, max(256, 0 if cells is None else len(cells)))
        self._names = () if cells is None else tuple(cells.class_names)
        source = cells if cells is not None else CellSet.empty(float("nan"))
        self._colors = tuple(source.class_color(k) for k in range(len(self._names) + 1))  # 0 = unclassified
        categories = ["unclassified", *self._names]
        if len(set(categories)) != len(categories):
            raise ValueError(f"H5ADCellWriter: class names {list(self._names)} must be unique and not 'unclassified'")
        f = self._h5
        obs = _attrs(f.create_group("obs"), "dataframe", "0.2.0")
        obs.attrs["_index"] = "_index"
        obs.attrs["column-order"] = list(_OBS_COLUMNS)
        self._obs["_index"] = self._column(obs, "_index", h5py.string_dtype())
        for name in ("centroid_x", "centroid_y", "area_um2"):
            self._obs[name] = self._column(obs, name, np.float64)
        cat = _attrs(obs.create_group("class"), "categorical", "0.2.0")
        cat.attrs["ordered"] = False
        code_type = np.int8 if len(categories) < 128 else np.int16 if len(categories) < 32768 else np.int32
        self._obs["class"] = self._column(cat, "codes", code_type)
        _write_uns(cat, "categories", categories)
        self._obs["class_prob"] = self._column(obs, "class_prob", np.float32)
        self._obs["tile"] = self._column(obs, "tile", np.int64)
        obsm = _attrs(f.create_group("obsm"), "dict", "0.1.0")
        self._spatial = self._column(obsm, "spatial", np.float64, (2,))
        for name in ("layers", "obsp", "varm", "varp"):
            _attrs(f.create_group(name), "dict", "0.1.0")

    def _append(self, ds: Any, values: np.ndarray) -> None:
        n0 = ds.shape[0]
        ds.resize(n0 + len(values), axis=0)
        ds[n0:] = values

    # ------------------------------------------------------------------ writing
    def add(self, cells: CellSet) -> int:
        """Append one CellSet as rows; returns the number of rows added.

        Raises:
            ValueError: when µm/px or class names differ from the first CellSet's, embeddings are present in
                some CellSets and missing in others (or differ in dimension), or the writer is closed.
        """
        return super().add(cells)

    def _add(self, cells: CellSet) -> int:
        with _hdf5_errors():
            return self._append_cells(cells)

    def _append_cells(self, cells: CellSet) -> int:
        if self._mpp is None:
            self._begin(cells)
        elif not math.isclose(float(cells.mpp), self._mpp, rel_tol=1e-6) or tuple(cells.class_names) != self._names:
            raise ValueError(
                f"H5ADCellWriter: cells at {cells.mpp} µm/px with classes {list(cells.class_names)} cannot join a "
                f"file at {self._mpp} µm/px with classes {list(self._names)}"
            )
        n = len(cells)
        if not n:
            return 0
        emb = cells.embeddings
        dim = None if emb is None or emb.ndim != 2 or emb.shape[1] == 0 else int(emb.shape[1])
        if dim != self.dim and (self.count or self.dim is not None):
            have = "no embeddings" if self.dim is None else f"{self.dim}-d embeddings"
            got = "no embeddings" if dim is None else f"{dim}-d embeddings"
            raise ValueError(f"H5ADCellWriter: cells with {got} cannot follow cells with {have}")
        if dim is not None and self._x is None:
            self.dim = dim
            rows = max(1, min(self._rows, _X_CHUNK_BYTES // (4 * dim)))
            self._x = _attrs(
                self._h5.create_dataset(
                    "X", shape=(0, dim), maxshape=(None, dim), chunks=(rows, dim), dtype=np.float32
                ),
                "array",
                "0.2.0",
            )
        codes = cells.class_ids.copy()
        codes[(codes < 0) | (codes > len(self._names))] = 0  # unknown ids read as "unclassified", as elsewhere
        tiles = cells.tiles if cells.tiles is not None else np.full(n, -1, np.int64)
        self._append(self._obs["_index"], cells.ids.astype(str).astype(object))
        self._append(self._obs["centroid_x"], cells.centroids[:, 0])
        self._append(self._obs["centroid_y"], cells.centroids[:, 1])
        self._append(self._obs["area_um2"], cells.area_um2)
        self._append(self._obs["class"], codes.astype(self._obs["class"].dtype))
        self._append(self._obs["class_prob"], cells.class_probs.astype(np.float32))
        self._append(self._obs["tile"], tiles.astype(np.int64))
        self._append(self._spatial, cells.centroids)
        if self._x is not None:
            self._append(self._x, np.asarray(emb, np.float32))
        self.count += n
        return n

    def close(self) -> Path:
        """Write ``var`` and ``uns``, finish the file and atomically move it to ``path``; returns ``path``.

        A writer that never received a CellSet writes an empty AnnData (0 x 0, ``uns["mpp"]`` = nan).
        """
        return super().close()

    def _finish(self) -> None:
        with _hdf5_errors():
            self._write_tail()
            self._h5.flush()  # a failed write surfaces here, with the file still open and consistent
            self._h5.close()

    def _write_tail(self) -> None:
        """X when there are no embeddings, ``var`` and ``uns``."""
        if self._mpp is None:
            self._begin(None)
        f = self._h5
        if self._x is None:  # no embeddings: an (N, 0) matrix
            _attrs(f.create_dataset("X", shape=(self.count, 0), dtype=np.float32), "array", "0.2.0")
        var = _attrs(f.create_group("var"), "dataframe", "0.2.0")
        var.attrs["_index"] = "_index"
        var.attrs["column-order"] = []
        _write_uns(var, "_index", [str(i) for i in range(self.dim or 0)])
        uns = _attrs(f.create_group("uns"), "dict", "0.1.0")
        entries: dict[str, Any] = {
            "mpp": self._mpp,
            "coordinates": "pixels, x = column, y = row, origin top-left; uns['mpp'] µm per pixel",
            "class_names": list(self._names),
            "class_colors": [_hex(c) for c in self._colors],
        }
        entries.update(self.uns)
        for key, value in entries.items():
            _write_uns(uns, str(key), value)

    def _release(self) -> None:
        _close_discarding(self._h5)


def write_h5ad(
    cells: CellSet | Iterable[CellSet],
    path: str | os.PathLike[str],
    *,
    uns: Mapping[str, Any] | None = None,
) -> Path:
    """Write cells (and their embeddings as ``X``) to an AnnData ``.h5ad`` file, atomically.

    Args:
        cells: one CellSet or an iterable of CellSets (streamed, bounded memory).
        path: output file.
        uns: extra ``uns`` entries.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> import anndata
        >>> tri = np.array([[0, 0], [6, 0], [0, 6]], float)
        >>> cs = CellSet(ids=[3], centroids=[[2, 2]], bboxes=[[0, 0, 7, 7]], contours=[tri], area_px=[28],
        ...              class_ids=[0], class_probs=[float("nan")], mpp=0.5)
        >>> a = anndata.read_h5ad(write_h5ad(cs, pathlib.Path(tempfile.mkdtemp()) / "c.h5ad"))
        >>> a.shape, a.obsm["spatial"].tolist(), float(a.obs["area_um2"].iloc[0])
        ((1, 0), [[2.0, 2.0]], 7.0)
    """
    parts = [cells] if isinstance(cells, CellSet) else cells
    with H5ADCellWriter(path, uns=uns) as writer:
        for part in parts:
            writer.add(part)
    return Path(path)
