"""Shared machinery of the streaming cell writers.

- :class:`StreamingCellWriter`: the lifecycle every writer shares (``add()`` ... ``close()`` commits the
  temporary file, ``abort()`` discards it, a ``with`` block commits on success and aborts on an exception).
- :class:`JsonArrayStream`: a JSON document written piece by piece (head, array items, tail), optionally
  gzip'ed, so that millions of cells stream to disk with bounded memory (GeoJSON and CellViT writers).
"""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import json
import os
from pathlib import Path
from typing import IO, Any

from cytoken.io.atomic import AtomicFile
from cytoken.types import CellSet

__all__ = ["JsonArrayStream", "StreamingCellWriter", "number_lists", "read_json_head", "split_number_lists"]

_FLUSH_BYTES = 1 << 20


class StreamingCellWriter:
    """Base class: cells stream into a temporary file that replaces ``path`` only when :meth:`close` succeeds.

    Subclasses implement three hooks: :meth:`_add` (write one CellSet), :meth:`_finish` (write what is still
    buffered and close their library handles; the file is then committed) and :meth:`_release` (close handles
    without finishing; the temporary file is then deleted).

    Args:
        path: final file path; its directory must exist.
        mode: how the temporary file is opened: ``"wb"`` (the handle is ``self._file.file``) or None (only a
            temporary path, ``self._file.tmp_path``, for libraries that open files themselves).

    Raises:
        CytokenError: when the temporary file cannot be created.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str | None) -> None:
        self.path = Path(path)
        self._file = AtomicFile(self.path, mode)

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`."""
        return self._file.closed

    def add(self, cells: CellSet) -> int:
        """Append one CellSet; returns the number of cells written.

        Raises:
            ValueError: when the writer is closed, or the cells cannot join the file (see the subclass).
        """
        if self.closed:
            raise ValueError(f"{type(self).__name__}({self.path}) is closed")
        return self._add(cells)

    def close(self) -> Path:
        """Finish the file and atomically move it to ``path``; returns ``path``. On failure nothing is left."""
        if self.closed:
            raise ValueError(f"{type(self).__name__}({self.path}) is already closed or aborted")
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._file.commit()  # deletes the temporary file itself when it fails
        return self.path

    def abort(self) -> None:
        """Discard the output; ``path`` is left as it was. Safe to call twice."""
        if self.closed:
            return
        with contextlib.suppress(Exception):  # the data is being discarded anyway
            self._release()
        self._file.abort()

    def __enter__(self) -> StreamingCellWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _add(self, cells: CellSet) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self) -> None:
        """Write everything still buffered and close library handles (called before the commit)."""

    def _release(self) -> None:
        """Close library handles without finishing (called before the temporary file is deleted)."""


class JsonArrayStream:
    """A JSON head, items joined by commas and newlines, and a tail, written to an open binary file.

    Text is buffered and written in pieces of about 1 MiB; the file itself (atomic commit or abort) belongs
    to the caller.

    Args:
        out: the binary file to write to.
        name: file name stored in the gzip header.
        compressed: gzip the stream.
    """

    def __init__(self, out: IO[bytes], *, name: str = "", compressed: bool = False) -> None:
        self.compressed = compressed
        self._out: IO[bytes] = out
        self._gz: gzip_module.GzipFile | None = None
        if compressed:
            self._gz = gzip_module.GzipFile(filename=name, mode="wb", fileobj=out, compresslevel=6, mtime=0)
            self._out = self._gz  # type: ignore[assignment]
        self._parts: list[str] = []
        self._pending = 0
        self.started = False
        self.items = 0

    @staticmethod
    def gzip_for(path: Path, gzip: bool | None) -> bool:
        """Whether to compress: ``gzip`` when given, else a ``.gz`` suffix of ``path``."""
        return path.suffix.lower() == ".gz" if gzip is None else bool(gzip)

    def _write(self, text: str) -> None:
        self._parts.append(text)
        self._pending += len(text)
        if self._pending >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self._out.write("".join(self._parts).encode("utf-8"))
            self._parts.clear()
            self._pending = 0

    def begin(self, head: str) -> None:
        """Write the document head (e.g. ``'{"type":"FeatureCollection","features":['``); once only."""
        if self.started:
            raise ValueError("JsonArrayStream.begin called twice")
        self.started = True
        self._write(head + "\n")

    def item(self, text: str) -> None:
        """Append one serialised array item."""
        self._write(text if self.items == 0 else ",\n" + text)
        self.items += 1

    def finish(self, tail: str) -> None:
        """Write the tail and close the compression (the underlying file stays open)."""
        self._write(("\n" if self.items else "") + tail + "\n")
        self._flush()
        if self._gz is not None:
            self._gz.close()

    def release(self) -> None:
        """Drop buffered text and close the compression without finishing the document."""
        self._parts.clear()
        if self._gz is not None:
            self._gz.close()


class JsonCellWriter(StreamingCellWriter):
    """A :class:`StreamingCellWriter` whose file is a :class:`JsonArrayStream` closed by ``]}``.

    Subclasses implement ``_begin(cells | None)`` (writes the head) and ``_add``.
    """

    def __init__(self, path: str | os.PathLike[str], *, gzip: bool | None) -> None:
        super().__init__(path, "wb")
        self._stream = JsonArrayStream(
            self._file.file,  # type: ignore[arg-type]
            name=self.path.name,
            compressed=JsonArrayStream.gzip_for(self.path, gzip),
        )

    @property
    def count(self) -> int:
        """Records written so far."""
        return self._stream.items

    def _begin(self, cells: CellSet | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self) -> None:
        if not self._stream.started:
            self._begin(None)
        self._stream.finish("]}")

    def _release(self) -> None:
        self._stream.release()


def read_json_head(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The head of a file written by a :class:`JsonCellWriter` and its first array item, without reading the rest.

    The head is every member before the array (GeoJSON's ``"cytoken"`` metadata, CellViT++'s ``wsi_metadata``
    and ``type_map``), returned with the array empty; gzip'ed files are read transparently.

    Args:
        path: a ``.geojson``, ``.geojson.gz`` or CellViT++ ``.json`` file written by cytoken.

    Returns:
        ``(head, first item or None)``.

    Raises:
        ValueError: the file does not start like a cytoken-written JSON cell file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
        >>> lines = ['{"wsi_metadata":{"base_mpp":0.5},"cells":[', '{"type":1},', '{"type":2}', ']}']
        >>> _ = p.write_text(chr(10).join(lines))
        >>> read_json_head(p)
        ({'wsi_metadata': {'base_mpp': 0.5}, 'cells': []}, {'type': 1})
    """
    path = Path(path)
    with open(path, "rb") as raw:
        magic = raw.read(2)
    opener: Any = gzip_module.open if magic == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        head, first = fh.readline().rstrip("\n"), fh.readline().rstrip("\n").rstrip(",")
    try:
        if not head.endswith("["):
            raise ValueError("no array opens on its first line")
        meta = json.loads(head + "]}")
        item = json.loads(first) if first.startswith("{") else None
    except ValueError as exc:
        raise ValueError(f"{path} was not written by cytoken's streaming JSON writers ({exc})") from None
    return meta, item


def number_lists(values: Any, decimals: int) -> Any:
    """``values`` rounded to ``decimals`` as nested lists; ints when every value is integral."""
    import numpy as np

    arr = np.round(np.asarray(values, dtype=np.float64), decimals)
    if arr.size and np.all(arr == np.rint(arr)) and np.all(np.abs(arr) < 2**53):
        return arr.astype(np.int64).tolist()
    return arr.tolist()


def split_number_lists(coords: Any, bounds: Any, decimals: int) -> list[Any]:
    """Rows ``bounds[k]:bounds[k + 1]`` of ``coords`` as rounded nested lists, one list per segment.

    Like :func:`number_lists` per segment (ints when the whole segment is integral), but vectorised: the whole
    array is converted to Python lists once. ``bounds`` must start at 0 and end at ``len(coords)``.
    """
    import numpy as np

    rc = np.round(np.asarray(coords, dtype=np.float64), decimals)
    bounds = np.asarray(bounds, dtype=np.int64)
    n = len(bounds) - 1
    if rc.ndim == 1:
        rc = rc.reshape(-1, 1)
    pt_int = np.all((rc == np.rint(rc)) & (np.abs(rc) < 2**53), axis=1)
    seg_int = np.ones(n, dtype=bool)
    nonempty = bounds[1:] > bounds[:-1]
    if nonempty.any():
        seg_int[nonempty] = np.logical_and.reduceat(pt_int, bounds[:-1][nonempty])
    ints = np.where(pt_int[:, None], rc, 0).astype(np.int64).tolist() if seg_int.any() else []
    floats = rc.tolist() if not seg_int.all() else []
    return [(ints if seg_int[k] else floats)[bounds[k] : bounds[k + 1]] for k in range(n)]
