"""Crash-safe file and directory writes: build in a temporary sibling, then rename into place.

Every cytoken output goes through this module, so a crash, Ctrl-C or exception never leaves a half-written
``cells.geojson`` where a complete one is expected: the target is either the old file (or absent) or the
complete new one. The temporary file lives in the same directory as the target (so :func:`os.replace` is an
atomic rename on the same file system), is flushed and fsync'ed before the rename, and is removed when the
write fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cytoken.types import CytokenError

__all__ = [
    "AtomicFile",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_dir",
]

_FILE_MODES = ("wb", "w", "wt")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by fsync'ing the directory (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _cleanup(tmp: str, handle: IO[Any] | None) -> None:
    if handle is not None:
        with contextlib.suppress(Exception):
            handle.close()
    with contextlib.suppress(FileNotFoundError, OSError):
        os.unlink(tmp)


class AtomicFile:
    """A temporary file next to ``path`` that replaces ``path`` only on :meth:`commit`.

    Use it directly for long-lived streaming writers (``add()`` ... ``close()``); for one-shot writes prefer
    the :func:`atomic_write` context manager. If the object is garbage-collected (or the interpreter exits)
    before :meth:`commit`, the temporary file is deleted and the target is left untouched.

    Args:
        path: final file path. Its directory must exist.
        mode: ``"wb"`` (binary), ``"w"``/``"wt"`` (text) or None to only reserve a temporary *path* (for
            libraries that insist on opening the file themselves, e.g. pyarrow); the temporary name keeps
            ``path``'s suffix.
        encoding: text encoding for text modes.

    Attributes:
        path: the final path.
        tmp_path: the temporary path being written.
        file: the open handle (None when ``mode`` is None).

    Raises:
        CytokenError: when the temporary file cannot be created (missing or read-only directory).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> f = AtomicFile(d / "a.txt", "w")
        >>> _ = f.file.write("hi")
        >>> f.commit()
        >>> (d / "a.txt").read_text()
        'hi'
    """

    def __init__(
        self, path: str | os.PathLike[str], mode: str | None = "wb", *, encoding: str = "utf-8"
    ) -> None:
        if mode is not None and mode not in _FILE_MODES:
            raise ValueError(f"AtomicFile: mode {mode!r} is not supported; use one of {_FILE_MODES} or None")
        self.path = Path(path)
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(
                dir=directory, prefix=f".{self.path.name}.", suffix=f".tmp{self.path.suffix}"
            )
        except FileNotFoundError:
            raise CytokenError(f"cannot write {self.path}: directory {directory} does not exist") from None
        except OSError as exc:
            raise CytokenError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.tmp_path = Path(tmp)
        self.file: IO[Any] | None
        if mode is None:
            os.close(fd)
            self.file = None
        elif mode == "wb":
            self.file = os.fdopen(fd, "wb")
        else:
            self.file = os.fdopen(fd, "w", encoding=encoding, newline="")
        self._done = False
        self._finalizer = weakref.finalize(self, _cleanup, tmp, self.file)

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._done

    def commit(self) -> None:
        """Flush, fsync, set normal permissions and rename the temporary file onto the target."""
        if self._done:
            raise ValueError(f"AtomicFile({self.path}): already committed or aborted")
        try:
            if self.file is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            else:
                with open(self.tmp_path, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(self.tmp_path, 0o666 & ~_umask())
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._finalizer.detach()
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and delete the temporary file; the target is not touched. Safe to call twice."""
        if self._done:
            return
        self._done = True
        self._finalizer.detach()
        _cleanup(str(self.tmp_path), self.file)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on normal exit it atomically replaces ``path``.

    On an exception inside the block the temporary file is deleted, ``path`` is left exactly as it was (absent
    or with its old content) and the exception propagates.

    Args:
        path: final file path; its directory must exist.
        mode: ``"wb"`` (default) or ``"w"`` (text, ``encoding``, no newline translation).
        encoding: text encoding for ``"w"``.

    Yields:
        The open file handle.

    Raises:
        CytokenError: when the directory is missing or not writable.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.bin"
        >>> with atomic_write(p) as fh:
        ...     _ = fh.write(b"abc")
        >>> p.read_bytes()
        b'abc'
    """
    af = AtomicFile(path, mode, encoding=encoding)
    try:
        yield af.file  # type: ignore[misc]
    except BaseException:
        af.abort()
        raise
    af.commit()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Reserve a temporary path next to ``path`` for a library that opens files itself; rename it on success.

    The temporary name ends with ``path``'s suffix so that format-by-extension writers (OpenCV, pyarrow) work.

    Args:
        path: final file path; its directory must exist.

    Yields:
        The temporary path to write.

    Raises:
        CytokenError: when the directory is missing or not writable.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(p) as tmp:
        ...     _ = tmp.write_text("ok")
        >>> p.read_text()
        'ok'
    """
    af = AtomicFile(path, None)
    try:
        yield af.tmp_path
    except BaseException:
        af.abort()
        raise
    af.commit()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "b", b"1").read_bytes()
        b'1'
    """
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation) and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> atomic_write_text(pathlib.Path(tempfile.mkdtemp()) / "t", "µm").read_text(encoding="utf-8")
        'µm'
    """
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``final_dir`` only when the block succeeds.

    On success an existing ``final_dir`` is replaced: it is first renamed aside, the new directory is renamed
    into place, then the old one is deleted (there is a window of two renames in which ``final_dir`` does not
    exist; portable Python has no atomic directory exchange). On an exception the temporary directory is
    deleted and an existing ``final_dir`` is left untouched.

    Args:
        final_dir: the output directory to create or replace. Its parent is created if needed.

    Yields:
        The temporary directory to fill.

    Raises:
        CytokenError: when ``final_dir`` exists as a file or its parent cannot be created or written.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with atomic_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    final = Path(final_dir)
    if final.exists() and not final.is_dir():
        raise CytokenError(f"cannot create output directory {final}: a file with that name exists")
    parent = check_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old: Path | None = None
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:  # put the previous output back
                os.replace(old / final.name, final)
                shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Make sure ``path`` is a directory we can write into (creating it and its parents if ``create``).

    Call this before long computations so a wrong ``--out`` fails in a second, not after an hour.

    Args:
        path: the directory.
        create: create it (with parents) when missing.

    Returns:
        The directory as a :class:`~pathlib.Path`.

    Raises:
        CytokenError: naming the directory and the reason (exists as a file, parent is a file, permission
            denied, read-only file system, missing and ``create`` is False).

    Example:
        >>> import tempfile, pathlib
        >>> check_writable_dir(pathlib.Path(tempfile.mkdtemp()) / "a" / "b").is_dir()
        True
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise CytokenError(f"output directory {d} is not usable: a file with that name exists")
    if not d.exists():
        if not create:
            raise CytokenError(f"output directory {d} does not exist")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CytokenError(
                f"cannot create output directory {d}: a parent path is a file, not a directory"
            ) from None
        except OSError as exc:
            raise CytokenError(f"cannot create output directory {d}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".cytoken-write-test.")
    except OSError as exc:
        raise CytokenError(f"output directory {d} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return d
