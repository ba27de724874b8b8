"""Worker-process housekeeping for the slide pipeline: die with the parent, and peak memory of the process tree.

* :func:`die_with_parent` (Linux) asks the kernel to SIGKILL a worker process when the process that started it
  dies, so a killed ``cytoken segment`` does not leave its reader and decoder processes (~300 MB each) behind.
  It is the ``initializer`` of the decode pool and, through :func:`loader_worker_init`, the DataLoader's
  ``worker_init_fn``.
* :class:`RssMonitor` samples the resident memory of the whole process tree (this process and every descendant,
  from ``/proc``) in a light background thread, so a run's peak memory counts its worker processes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["RssMonitor", "descendants", "die_with_parent", "loader_worker_init", "tree_rss_bytes"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROC = Path("/proc")


def die_with_parent(parent_pid: int) -> bool:
    """Make the calling process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Call it first thing in a worker process. When the parent has already died (the worker was re-parented
    before this call), the worker exits at once. Elsewhere than Linux it does nothing.

    Args:
        parent_pid: pid of the process that started this one (``os.getpid()`` in the parent).

    Returns:
        True when the death signal is set, False on other systems or when ``prctl`` is unavailable.

    Example:
        >>> import os
        >>> die_with_parent(os.getppid()) in (True, False)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return True


def loader_worker_init(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of a DataLoader: :func:`die_with_parent` (bind ``parent_pid`` with functools.partial)."""
    del worker_id
    die_with_parent(parent_pid)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            kids.extend(int(k) for k in (task / "children").read_text().split())
    return kids


def descendants(pid: int | None = None) -> list[int]:
    """Pids of every process below ``pid`` (default this process) in the process tree, from ``/proc`` (Linux).

    Example:
        >>> os.getpid() in descendants()
        False
    """
    root = os.getpid() if pid is None else pid
    seen: list[int] = []
    todo = _children(root)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo.extend(_children(p))
    return seen


def _rss_bytes(pid: int) -> int:
    try:
        return int((_PROC / str(pid) / "statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_bytes(pid: int | None = None) -> int | None:
    """Resident memory of a process and all its descendants, summed (bytes), from ``/proc``.

    Pages shared between processes (e.g. the same library mapped by every worker) are counted once per process,
    as ``ps`` and ``top`` do, so the sum is an upper bound of the physical memory used.

    Args:
        pid: root of the tree; default this process.

    Returns:
        The sum in bytes, or None where ``/proc`` lists no child processes (not Linux).

    Example:
        >>> (tree_rss_bytes() or 1) > 0
        True
    """
    root = os.getpid() if pid is None else pid
    if not (_PROC / str(root) / "task").is_dir():
        return None
    return sum(_rss_bytes(p) for p in [root, *descendants(root)])


def _own_peak_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class RssMonitor:
    """Peak resident memory of this process and of its whole process tree, sampled in a background thread.

    Use it as a context manager around the work; read :attr:`peak_main_mb` and :attr:`peak_tree_mb` after (or
    during) it. The main process peak is exact (``getrusage``); the tree peak is the largest sum seen every
    ``interval`` seconds (and never below the main peak), so a spike shorter than the interval can be missed.

    Args:
        interval: seconds between samples.

    Example:
        >>> with RssMonitor(interval=0.05) as mon:
        ...     block = bytearray(10_000_000)
        >>> mon.peak_tree_mb >= mon.peak_main_mb > 0
        True
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._peak_tree = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample of the process tree now."""
        rss = tree_rss_bytes()
        if rss is not None:
            self._peak_tree = max(self._peak_tree, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssMonitor:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="cytoken-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak_main_mb(self) -> float:
        """Peak resident memory of this process alone (MB)."""
        return round(_own_peak_bytes() / 2**20, 1)

    @property
    def peak_tree_mb(self) -> float:
        """Peak resident memory of this process plus its worker processes, summed (MB)."""
        return round(max(self._peak_tree, _own_peak_bytes()) / 2**20, 1)
