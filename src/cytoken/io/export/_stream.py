"""A JSON document written piece by piece (header, array items, tail) to an atomic, optionally gzip'ed file.

Shared by the GeoJSON and CellViT writers so that millions of cells stream to disk with bounded memory.
"""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import os
from pathlib import Path
from typing import IO, Any

from cytoken.io.atomic import AtomicFile

__all__ = ["JsonArrayStream", "number_lists", "split_number_lists"]

_FLUSH_BYTES = 1 << 20


class JsonArrayStream:
    """A JSON head, items joined by commas and newlines, and a tail, written to a temporary file.

    The file is renamed onto ``path`` by :meth:`finish` and deleted by :meth:`abort`.

    Args:
        path: final path. A name ending in ``.gz`` is gzip-compressed unless ``gzip`` says otherwise.
        gzip: force compression on (True) or off (False); None decides from the suffix.
    """

    def __init__(self, path: str | os.PathLike[str], *, gzip: bool | None = None) -> None:
        self.path = Path(path)
        self.compressed = self.path.suffix.lower() == ".gz" if gzip is None else bool(gzip)
        self._file = AtomicFile(self.path, "wb")
        self._out: IO[bytes] = self._file.file  # type: ignore[assignment]
        self._gz: gzip_module.GzipFile | None = None
        if self.compressed:
            self._gz = gzip_module.GzipFile(
                filename=self.path.name, mode="wb", fileobj=self._out, compresslevel=6, mtime=0
            )
            self._out = self._gz  # type: ignore[assignment]
        self._parts: list[str] = []
        self._pending = 0
        self.started = False
        self.items = 0

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

    def finish(self, tail: str) -> Path:
        """Write the tail, close compression and atomically move the file into place."""
        self._write(("\n" if self.items else "") + tail + "\n")
        try:
            self._flush()
            if self._gz is not None:
                self._gz.close()
        except BaseException:
            self.abort()
            raise
        self._file.commit()
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the target path is not touched."""
        if self._gz is not None:
            with contextlib.suppress(Exception):  # the data is being discarded anyway
                self._gz.close()
        self._file.abort()

    @property
    def closed(self) -> bool:
        """True after :meth:`finish` or :meth:`abort`."""
        return self._file.closed


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
