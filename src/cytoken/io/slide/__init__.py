"""Whole-slide and plain-image reading behind one factory, :func:`open_slide`, with reads in µm/px.

Backends: OpenSlide (vendor WSI formats, generic tiled TIFF), tifffile (OME-TIFF,
plain/pyramidal/multi-channel TIFF), Pillow (PNG/JPEG) and an in-memory :class:`ArraySlide`. See
:mod:`cytoken.io.slide.base` for the :class:`Slide` interface, coordinate conventions and thread/process
safety; :mod:`cytoken.io.slide.tissue` for tissue masks and ROIs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from cytoken.io.image import CytokenWarning
from cytoken.io.slide.array_backend import ArraySlide
from cytoken.io.slide.base import MAX_SLIDE_MPP, Slide, SlideOpenError, resolve_mpp
from cytoken.io.slide.openslide_backend import OpenSlideSlide
from cytoken.io.slide.pil_backend import PILSlide
from cytoken.io.slide.tifffile_backend import TiffSlide
from cytoken.io.slide.tissue import detect_tissue, load_tissue_mask, parse_roi, tissue_fraction
from cytoken.types import CytokenError

__all__ = [
    "BACKENDS",
    "MAX_SLIDE_MPP",
    "ArraySlide",
    "OpenSlideSlide",
    "PILSlide",
    "Slide",
    "SlideOpenError",
    "TiffSlide",
    "backend_order",
    "detect_tissue",
    "load_tissue_mask",
    "native_backends",
    "open_slide",
    "parse_roi",
    "resolve_mpp",
    "tissue_fraction",
]

#: File backends by name, in the default fallback order.
BACKENDS: dict[str, type[Slide]] = {"openslide": OpenSlideSlide, "tifffile": TiffSlide, "pil": PILSlide}

_OPENSLIDE_EXT = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff"}
_TIFFFILE_EXT = {
    ".qptiff",
    ".btf",
    ".tf2",
    ".tf8",
    ".ome.tif",
    ".ome.tiff",
    ".ome.tf2",
    ".ome.tf8",
    ".ome.btf",
}
_PIL_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _suffixes(path: str | Path) -> set[str]:
    name = Path(path).name.lower()
    return {s for s in (Path(name).suffix, "".join(Path(name).suffixes[-2:])) if s}


def native_backends(path: str | Path) -> tuple[str, ...]:
    """The backends a file's extension implies; empty for an extension no backend claims.

    Example:
        >>> native_backends("a.svs"), native_backends("a.tiff"), native_backends("a.xyz")
        (('openslide',), ('openslide', 'tifffile'), ())
    """
    suffixes = _suffixes(path)
    if suffixes & _TIFFFILE_EXT:
        return ("tifffile",)
    if suffixes & _PIL_EXT:
        return ("pil",)
    if suffixes & {".tif", ".tiff"}:  # generic tiled TIFF through OpenSlide, the rest through tifffile
        return ("openslide", "tifffile")
    if suffixes & _OPENSLIDE_EXT:
        return ("openslide",)
    return ()


def backend_order(path: str | Path) -> list[str]:
    """The backends :func:`open_slide` tries for a file, preferred first, chosen by its extension.

    Vendor formats and ``.tif``/``.tiff`` go to OpenSlide first (it reads generic tiled TIFF pyramids; untiled
    TIFFs fall through to tifffile); OME-TIFF, qptiff and BigTIFF extensions to tifffile first; PNG/JPEG to
    Pillow first. Every other backend follows as a fallback, so a file with the wrong extension still opens.

    Args:
        path: file name.

    Returns:
        Backend names in the order they will be tried.

    Example:
        >>> backend_order("a.ome.tiff")
        ['tifffile', 'openslide', 'pil']
        >>> backend_order("a.png")
        ['pil', 'tifffile', 'openslide']
    """
    native = native_backends(path)
    if native and native[0] != "openslide":
        return [native[0], *(b for b in ("tifffile", "openslide", "pil") if b != native[0])]
    return ["openslide", "tifffile", "pil"]


def open_slide(
    path_or_array: str | Path | np.ndarray, *, mpp: float | None = None, backend: str | None = None
) -> Slide:
    """Open a whole-slide image, a TIFF, a plain image or an in-memory array as a :class:`Slide`.

    Backends are tried in :func:`backend_order` (by extension) until one opens the file; a file with a
    misleading extension (e.g. a PNG renamed ``.svs``) therefore opens through the fallback, with one
    :class:`~cytoken.io.image.CytokenWarning` naming the file, its extension and the backend used (also for
    an extension no backend claims); ``slide.backend`` says which backend it was. ``backend=`` forces one
    backend (no fallback, no warning).
    Errors about µm/px are final and not retried with another backend.

    Args:
        path_or_array: slide file, or an ``(H, W, 3)`` uint8 array (needs ``mpp``).
        mpp: level-0 µm/px; overrides the file's metadata (``--mpp``). Required when the file has none.
        backend: ``"openslide"``, ``"tifffile"``, ``"pil"`` or ``"array"``; None picks by extension.

    Returns:
        The open slide (use it as a context manager, or call ``close()``).

    Raises:
        CytokenError: when the file does not exist, no backend can open it (the message names every backend
            tried and its error), µm/px is missing (pass ``--mpp``), or coarser than 0.75 µm/px.
        ValueError: for an unknown ``backend`` name.

    Example:
        >>> import numpy as np
        >>> with open_slide(np.zeros((64, 64, 3), np.uint8), mpp=0.5) as s:
        ...     s.dimensions, s.backend
        ((64, 64), 'array')
    """
    if isinstance(path_or_array, np.ndarray):
        if backend not in (None, "array"):
            raise ValueError(f"open_slide: an array needs backend 'array' or None, got {backend!r}")
        return ArraySlide(path_or_array, mpp)
    if backend == "array":
        raise ValueError("open_slide: backend 'array' needs an array, not a path")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"open_slide: unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or 'array'"
        )
    path = Path(path_or_array)
    if not path.exists():
        raise CytokenError(f"slide file not found: {path}")
    order = [backend] if backend is not None else backend_order(path)
    failures = []
    for name in order:
        try:
            slide = BACKENDS[name](path, mpp=mpp)
        except SlideOpenError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if backend is None:
            _warn_unexpected_backend(path, name, failures)
        return slide
    tried = "; ".join(failures)
    raise CytokenError(f"cannot open {path} as a slide or image (tried {tried})")


def _warn_unexpected_backend(path: Path, used: str, failures: list[str]) -> None:
    """Warn when a file opened through a backend its extension does not imply (renamed or unknown file type)."""
    native = native_backends(path)
    if used in native:
        return
    known = _TIFFFILE_EXT | _PIL_EXT | _OPENSLIDE_EXT
    ext = max((s for s in _suffixes(path) if s in known), key=len, default=Path(path).suffix.lower() or "(none)")
    if not native:
        warnings.warn(f"{path}: extension {ext} is not a known slide or image type; opened it with the {used} "
                      "backend", CytokenWarning, stacklevel=3)  # fmt: skip
        return
    why = "; ".join(f for f in failures if f.split(":", 1)[0] in native)
    if len(why) > 200:
        why = why[:197] + "..."
    message = (f"{path}: extension {ext} implies the {' or '.join(native)} backend, but the file opened with the "
               f"{used} backend (wrong extension?)" + (f"; {why}" if why else ""))  # fmt: skip
    warnings.warn(message, CytokenWarning, stacklevel=3)
