"""An in-memory slide over a NumPy array: for tests, and for the plain-image path of the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cytoken.io.slide.base import Slide, resolve_mpp
from cytoken.types import CytokenError

__all__ = ["ArraySlide", "as_channels_last"]


def as_channels_last(image: np.ndarray, *, what: str) -> tuple[np.ndarray, bool]:
    """Normalise an image array to ``(H, W, C)``; RGBA uint8 is composited onto white.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` array.
        what: name used in error messages.

    Returns:
        ``(array, is_rgb)`` where ``is_rgb`` says the result is 3-channel uint8.

    Raises:
        CytokenError: for arrays that are not 2-D or 3-D, or are empty.

    Example:
        >>> arr, rgb = as_channels_last(np.zeros((4, 5), np.uint8), what="x")
        >>> arr.shape, rgb
        ((4, 5, 1), False)
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise CytokenError(f"{what}: expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    if arr.dtype == np.uint8 and arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return arr, bool(arr.dtype == np.uint8 and arr.shape[2] == 3)


class ArraySlide(Slide):
    """A single-level slide held in memory (picklable: pickles its array).

    Args:
        array: ``(H, W, 3)`` uint8 RGB (RGBA is composited onto white), or any ``(H, W)`` / ``(H, W, C)``
            image for :meth:`read_channels`.
        mpp: µm/px of the array (required).
        channel_names: names of the channels (default R, G, B for RGB, else C0, C1, ...).

    Raises:
        CytokenError: when ``mpp`` is missing, implausible or coarser than 0.75, or the array is not an image.

    Example:
        >>> import numpy as np
        >>> from cytoken.types import Bounds
        >>> s = ArraySlide(np.full((64, 64, 3), 200, np.uint8), mpp=0.5)
        >>> s.read_region(Bounds(-8, -8, 16, 16), mpp=0.5)[0, 0].tolist()  # outside the slide: white
        [255, 255, 255]
    """

    backend: ClassVar[str] = "array"

    def __init__(
        self, array: np.ndarray, mpp: float | None = None, *, channel_names: Sequence[str] | None = None
    ) -> None:
        arr, is_rgb = as_channels_last(array, what="ArraySlide")
        self.path = None
        self._array = arr
        self._mpp_argument = mpp
        self._mpp, self.mpp_source = resolve_mpp(None, mpp, what="in-memory image")
        self._levels = [(arr.shape[1], arr.shape[0])]
        self._downsamples = [1.0]
        self._dtype = arr.dtype
        self._is_rgb = is_rgb
        if channel_names is None:
            channel_names = ("R", "G", "B") if is_rgb else tuple(f"C{i}" for i in range(arr.shape[2]))
        if len(channel_names) != arr.shape[2]:
            raise CytokenError(f"ArraySlide: {len(channel_names)} channel names for {arr.shape[2]} channels")
        self._channel_names = tuple(channel_names)

    @property
    def array(self) -> np.ndarray:
        """The stored ``(H, W, C)`` array."""
        return self._array

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array[y : y + height, x : x + width]

    def reopen(self) -> ArraySlide:
        """The same slide (in-memory slides share their read-only array).

        Returns:
            This object.
        """
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._array, self._mpp_argument, self._channel_names))


def _rebuild(array: np.ndarray, mpp: float | None, channel_names: tuple[str, ...]) -> ArraySlide:
    return ArraySlide(array, mpp, channel_names=channel_names)
