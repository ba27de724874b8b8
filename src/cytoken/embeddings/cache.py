"""An on-disk cache of per-cell embeddings, keyed by model sha256, input hash and cell id.

Layout: ``<root>/<model_sha256>/<input_hash>.safetensors`` holding two arrays, ``ids`` (N,) int64 and
``embeddings`` (N, D), plus metadata (model sha256, input hash, dim). One file per (model, input): a tile, an
image or a slide region, whatever the caller hashes. Files are written atomically (temporary file in the same
folder, then ``os.replace``), so a crash never leaves a half-written entry. Numpy + safetensors only (no
torch, no pickle).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cytoken.io.atomic import atomic_write_bytes

__all__ = ["EmbeddingCache", "array_sha256"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        from safetensors.numpy import load_file

        p = self.path(model_sha256, input_hash)
        if not p.exists():
            return None
        data = load_file(str(p))
        return data["ids"], data["embeddings"]

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
    def put(self, model_sha256: str, input_hash: str, ids: Sequence[int] | np.ndarray, embeddings: np.ndarray) -> Path:
        """Store embeddings, merged into the entry (new rows replace old ones with the same id).

        Args:
            model_sha256: sha256 of the model weights.
            input_hash: hash of the input.
            ids: (N,) unique cell ids.
            embeddings: (N, D) float array.

        Returns:
            The entry's file path.

        Raises:
            ValueError: for mismatched lengths, repeated ids, or a dimension different from the cached one.
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
        old = self.load(model_sha256, input_hash)
        if old is not None:
            old_ids, old_emb = old
            if old_emb.shape[1] != emb.shape[1]:
                raise ValueError(
                    f"cache entry {p} holds {old_emb.shape[1]}-d embeddings, cannot add {emb.shape[1]}-d ones"
                )
            keep = ~np.isin(old_ids, ids_arr)
            ids_arr = np.concatenate([old_ids[keep], ids_arr])
            emb = np.concatenate([old_emb[keep].astype(emb.dtype), emb])
        order = np.argsort(ids_arr, kind="stable")
        meta = {"model_sha256": model_sha256, "input_hash": input_hash, "dim": str(emb.shape[1])}
        blob = save(
            {"ids": np.ascontiguousarray(ids_arr[order]), "embeddings": np.ascontiguousarray(emb[order])},
            metadata=meta,
        )
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


def _rows_of(sorted_ids: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row of each wanted id in a sorted id array, -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(want), -1, np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, want), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == want, pos, -1)
