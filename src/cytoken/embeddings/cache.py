"""An on-disk cache of per-cell embeddings, keyed by model sha256, input hash and cell id.

Layout: ``<root>/<model_sha256>/<input_hash>.safetensors`` holding ``ids`` (N,) int64 and ``embeddings``
(N, D), optional per-cell columns (``col.<name>``, e.g. ``col.centroids`` (N, 2)), plus metadata (model
sha256, input hash, dim, and a caller's JSON ``meta``). One file per (model, input): a tile, an image or a
whole slide, whatever the caller hashes. Files are written atomically (temporary file in the same folder, then
``os.replace``), so a crash never leaves a half-written entry. Numpy + safetensors only (no torch, no pickle).

Input hashes:

* in-memory arrays (tiles, images): :func:`array_sha256`, a content hash;
* files too large to read just for a key (whole slides): :func:`file_fingerprint`, a cheap fingerprint of the
  file's size, modification time and first and last MiB. Copying a slide without keeping its mtime (``cp``
  without ``-p``) or touching it makes a new key (a recompute, never a wrong hit); an edit that changes
  neither the size, the mtime nor the first/last MiB would go unnoticed (slide files are written once). For
  multi-file formats (MIRAX ``.mrxs``) only the named file is fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.atomic import atomic_write_bytes

__all__ = ["FINGERPRINT_BLOCK", "CacheEntry", "EmbeddingCache", "array_sha256", "file_fingerprint"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_COL_PREFIX = "col."

FINGERPRINT_BLOCK = 1 << 20
"""Bytes read from each end of a file by :func:`file_fingerprint` (1 MiB)."""


def array_sha256(*arrays: np.ndarray) -> str:
    """Content hash of arrays (shape, dtype and bytes), for use as an input hash.

    Args:
        *arrays: one or more arrays (e.g. the RGB tile, or the tile plus its instance map).

    Returns:
        64 lower-case hex characters.

    Example:
        >>> len(array_sha256(np.zeros((2, 2), np.uint8)))
        64
    """
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike[str], *, block_bytes: int = FINGERPRINT_BLOCK) -> str:
    """A cheap input hash of a (possibly huge) file: sha256 of its size, mtime and first and last ``block_bytes``.

    Reads at most ``2 * block_bytes`` bytes whatever the file size, so a 3 GB slide is keyed in milliseconds.
    Any change of size or modification time gives a new key; see the module docstring for what it cannot see.

    Args:
        path: the file (a slide, an image).
        block_bytes: bytes hashed from each end (default 1 MiB).

    Returns:
        64 lower-case hex characters.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when ``block_bytes`` is not positive.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.bin"; _ = p.write_bytes(b"slide")
        >>> file_fingerprint(p) == file_fingerprint(p), len(file_fingerprint(p))
        (True, 64)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot fingerprint {str(p)!r}: not a file")
    if int(block_bytes) != block_bytes or block_bytes < 1:
        raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    st = p.stat()
    h = hashlib.sha256(f"cytoken-file-fingerprint-v1;{st.st_size};{st.st_mtime_ns};{block_bytes};".encode())
    with p.open("rb") as f:
        h.update(f.read(block_bytes))
        if st.st_size > block_bytes:
            f.seek(max(block_bytes, st.st_size - block_bytes))
            h.update(f.read(block_bytes))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """Everything stored for one (model, input).

    Attributes:
        ids: (N,) int64 cell ids, sorted.
        embeddings: (N, D) embeddings (dtype as stored), row i belongs to ``ids[i]``.
        columns: extra per-cell arrays (N, ...) by name, rows aligned with ``ids``.
        meta: the caller's metadata (JSON), e.g. where the cells came from.
    """

    ids: np.ndarray
    embeddings: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id (-1 where the entry does not hold it)."""
        return _rows_of(self.ids, np.asarray(ids, np.int64).reshape(-1))


class EmbeddingCache:
    """Per-cell embeddings on disk, one safetensors file per (model sha256, input hash).

    Args:
        root: cache folder (created on first write).

    Attributes:
        hits: number of :meth:`get` / :meth:`get_or_compute` ids served from disk.
        misses: number of ids that were not in the cache.

    Example:
        >>> import tempfile
        >>> cache = EmbeddingCache(tempfile.mkdtemp())
        >>> sha = "a" * 64
        >>> _ = cache.put(sha, "tile-0", [3, 5], np.ones((2, 4), np.float32))
        >>> cache.get(sha, "tile-0", [5]).shape
        (1, 4)
        >>> cache.get(sha, "tile-0", [9]) is None
        True
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------ keys
    def path(self, model_sha256: str, input_hash: str) -> Path:
        """File holding the entries of one (model, input); the name is checked to be a safe file name."""
        if not isinstance(model_sha256, str) or not _SHA256.match(model_sha256):
            raise ValueError(f"model_sha256 must be 64 lower-case hex characters, got {model_sha256!r}")
        if not isinstance(input_hash, str) or not _SAFE_KEY.match(input_hash):
            raise ValueError(
                "input_hash must be 1-128 characters from [A-Za-z0-9._-] not starting with '.', "
                f"got {input_hash!r} (use array_sha256(...) or another hash)"
            )
        return self.root / model_sha256 / f"{input_hash}.safetensors"

    # ------------------------------------------------------------ read
    def load(self, model_sha256: str, input_hash: str) -> tuple[np.ndarray, np.ndarray] | None:
        """All cached ``(ids, embeddings)`` of one (model, input), or None when there is no entry."""
        entry = self.load_entry(model_sha256, input_hash)
        return None if entry is None else (entry.ids, entry.embeddings)

    def load_entry(self, model_sha256: str, input_hash: str) -> CacheEntry | None:
        """The whole entry of one (model, input) (ids, embeddings, columns, meta), or None when there is none.

        Raises:
            ValueError: when the file exists but is not a readable cache entry (it names the file; delete it).
        """
        from safetensors import safe_open
        from safetensors.numpy import load_file

        p = self.path(model_sha256, input_hash)
        if not p.exists():
            return None
        try:
            data = load_file(str(p))
            with safe_open(str(p), framework="numpy") as f:
                raw_meta = f.metadata() or {}
            meta = json.loads(raw_meta.get("meta", "{}"))
            ids, emb = data["ids"], data["embeddings"]
        except Exception as exc:  # safetensors raises several types for damaged files
            raise ValueError(f"embedding cache entry {p} is unreadable ({exc}); delete it to recompute") from None
        cols = {k[len(_COL_PREFIX) :]: v for k, v in data.items() if k.startswith(_COL_PREFIX)}
        return CacheEntry(ids, emb, cols, meta if isinstance(meta, dict) else {})

    def has(self, model_sha256: str, input_hash: str, ids: Sequence[int] | np.ndarray | None = None) -> bool:
        """Whether the (model, input) entry exists and, if ``ids`` are given, holds all of them."""
        entry = self.load(model_sha256, input_hash)
        if entry is None:
            return False
        return ids is None or bool(np.isin(np.asarray(ids, np.int64), entry[0]).all())

    def get(self, model_sha256: str, input_hash: str, ids: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """Embeddings of ``ids`` in the given order, or None (a miss) unless every id is cached.

        Args:
            model_sha256: sha256 of the model weights that produced the tokens.
            input_hash: hash of the input (see :func:`array_sha256`).
            ids: cell ids.

        Returns:
            (N, D) array or None.
        """
        want = np.asarray(ids, np.int64).reshape(-1)
        entry = self.load(model_sha256, input_hash)
        if entry is None:
            self.misses += len(want)
            return None
        rows = _rows_of(entry[0], want)
        found = rows >= 0
        if not found.all():
            self.misses += int((~found).sum())
            return None
        self.hits += len(want)
        return entry[1][rows]

    # ------------------------------------------------------------ write
    def put(
        self,
        model_sha256: str,
        input_hash: str,
        ids: Sequence[int] | np.ndarray,
        embeddings: np.ndarray,
        *,
        columns: Mapping[str, np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Path:
        """Store embeddings, merged into the entry (new rows replace old ones with the same id).

        Args:
            model_sha256: sha256 of the model weights.
            input_hash: hash of the input.
            ids: (N,) unique cell ids.
            embeddings: (N, D) float array (float16 is kept as float16).
            columns: extra per-cell arrays of N rows by name (``[a-z][a-z0-9_]*``), e.g. ``{"centroids": xy}``.
                Merging into an existing entry needs the same column names.
            meta: JSON-serialisable metadata; merged over the entry's metadata.
            replace: drop the existing entry instead of merging into it.

        Returns:
            The entry's file path.

        Raises:
            ValueError: for mismatched lengths, repeated ids, a dimension or column set different from the
                cached one, or a bad column name.

        Example:
            >>> import tempfile
            >>> cache = EmbeddingCache(tempfile.mkdtemp())
            >>> xy = np.array([[10.0, 5.0], [3.0, 4.0]])
            >>> _ = cache.put("c" * 64, "slide", [2, 1], np.ones((2, 3), np.float16), columns={"centroids": xy},
            ...               meta={"source": "run-1"})
            >>> e = cache.load_entry("c" * 64, "slide")
            >>> e.ids.tolist(), e.columns["centroids"][0].tolist(), e.meta["source"], e.embeddings.dtype.name
            ([1, 2], [3.0, 4.0], 'run-1', 'float16')
        """
        from safetensors.numpy import save

        p = self.path(model_sha256, input_hash)
        ids_arr = np.asarray(ids, np.int64).reshape(-1)
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or len(emb) != len(ids_arr):
            raise ValueError(f"embeddings must be (N, D) with N = len(ids) = {len(ids_arr)}, got {emb.shape}")
        if not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"embeddings must be floating point, got dtype {emb.dtype}")
        if len(np.unique(ids_arr)) != len(ids_arr):
            raise ValueError("ids passed to EmbeddingCache.put must be unique")
        cols = _check_columns(columns, len(ids_arr))
        info: dict[str, Any] = dict(meta or {})
        old = None if replace else self.load_entry(model_sha256, input_hash)
        if old is not None:
            if old.embeddings.shape[1] != emb.shape[1]:
                raise ValueError(
                    f"cache entry {p} holds {old.embeddings.shape[1]}-d embeddings, cannot add {emb.shape[1]}-d ones"
                )
            if set(old.columns) != set(cols):
                raise ValueError(
                    f"cache entry {p} has columns {sorted(old.columns)}, got {sorted(cols)}; pass replace=True"
                )
            keep = ~np.isin(old.ids, ids_arr)
            ids_arr = np.concatenate([old.ids[keep], ids_arr])
            emb = np.concatenate([old.embeddings[keep].astype(emb.dtype), emb])
            cols = {k: np.concatenate([old.columns[k][keep].astype(v.dtype), v]) for k, v in cols.items()}
            info = {**old.meta, **info}
        order = np.argsort(ids_arr, kind="stable")
        tensors = {"ids": np.ascontiguousarray(ids_arr[order]), "embeddings": np.ascontiguousarray(emb[order])}
        tensors.update({_COL_PREFIX + k: np.ascontiguousarray(v[order]) for k, v in cols.items()})
        header = {"model_sha256": model_sha256, "input_hash": input_hash, "dim": str(emb.shape[1]),
                  "meta": json.dumps(info, sort_keys=True)}  # fmt: skip
        blob = save(tensors, metadata=header)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, blob)
        return p

    def get_or_compute(
        self,
        model_sha256: str,
        input_hash: str,
        ids: Sequence[int] | np.ndarray,
        compute: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """Embeddings of ``ids``; only ids missing from the cache are computed (by ``compute``) and stored.

        For entries without per-cell columns (an entry with columns is written whole, with :meth:`put`).

        Args:
            model_sha256: sha256 of the model weights.
            input_hash: hash of the input.
            ids: cell ids (unique).
            compute: function mapping an (M,) id array to (M, D) embeddings.

        Returns:
            (N, D) embeddings in the order of ``ids``.

        Example:
            >>> import tempfile
            >>> cache = EmbeddingCache(tempfile.mkdtemp())
            >>> f = lambda ids: np.repeat(ids[:, None], 2, axis=1).astype(np.float32)
            >>> cache.get_or_compute("b" * 64, "img", [1, 2], f)[:, 0].tolist()
            [1.0, 2.0]
            >>> cache.misses, cache.hits
            (2, 0)
        """
        want = np.asarray(ids, np.int64).reshape(-1)
        entry = self.load(model_sha256, input_hash)
        rows = _rows_of(entry[0], want) if entry is not None else np.full(len(want), -1, np.int64)
        missing = want[rows < 0]
        self.hits += len(want) - len(missing)
        self.misses += len(missing)
        if entry is not None and not len(missing):
            return entry[1][rows]
        new = np.asarray(compute(missing))
        if new.ndim != 2 or len(new) != len(missing):
            raise ValueError(f"compute returned shape {new.shape}, expected ({len(missing)}, D)")
        self.put(model_sha256, input_hash, missing, new)
        out = np.empty((len(want), new.shape[1]), new.dtype)
        out[rows < 0] = new
        if entry is not None:
            out[rows >= 0] = entry[1][rows[rows >= 0]]
        return out


def _check_columns(columns: Mapping[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, arr in (columns or {}).items():
        if not isinstance(name, str) or not _COLUMN.match(name):
            raise ValueError(f"column name must match [a-z][a-z0-9_]* (at most 64 characters), got {name!r}")
        a = np.asarray(arr)
        if a.ndim < 1 or len(a) != n:
            raise ValueError(f"column {name!r} must have one row per id ({n}), got shape {a.shape}")
        if a.dtype.kind not in "biuf":
            raise ValueError(f"column {name!r} must be numeric or boolean, got dtype {a.dtype}")
        out[name] = a
    return out


def _rows_of(sorted_ids: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row of each wanted id in a sorted id array, -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(want), -1, np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, want), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == want, pos, -1)
