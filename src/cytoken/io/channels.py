"""Channels of multi-channel images: choosing them by name or index, and scaling raw intensities to [0, 1].

:func:`match_channels` finds, for each channel a model reads, the image channel that feeds it (by name,
case-insensitive, or through an explicit mapping); :func:`intensity_ranges` and :func:`to_unit` scale raw
intensities to [0, 1] by one of two rules (see :data:`INTENSITY_RULES`), the same rules as
:func:`cytoken.models.multichannel.model_channels` uses for training inputs.

This module is layer 1 (io): numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from cytoken.types import CytokenError

__all__ = [
    "INTENSITY_RULES",
    "PERCENTILES",
    "ChannelKey",
    "IntensityRule",
    "channel_index",
    "intensity_ranges",
    "match_channels",
    "to_unit",
]

ChannelKey = str | int
IntensityRule = Literal["dtype", "percentile"]
#: ``dtype``: integers divided by their dtype's maximum (uint8 / 255, uint16 / 65535), floats kept as they are;
#: ``percentile``: per channel, the [0.5, 99.5] percentile range of the whole image stretched to [0, 1] (clipped).
INTENSITY_RULES: tuple[str, ...] = ("dtype", "percentile")
PERCENTILES = (0.5, 99.5)


def channel_index(key: ChannelKey, names: Sequence[str], path: Path | None = None) -> int:
    """Index of channel ``key`` (name, case-insensitive, or index) among ``names``; a clear error otherwise.

    A string of digits that is not a channel name is an index (so ``"1"`` from a command line selects the second
    channel, unless a channel is named ``"1"``).

    Example:
        >>> channel_index("fitc", ["DAPI", "FITC"]), channel_index("1", ["DAPI", "FITC"]), channel_index(-1, ["DAPI"])
        (1, 1, 0)
    """
    where = f" in {path}" if path is not None else ""
    if isinstance(key, bool) or not isinstance(key, str | int | np.integer):
        raise CytokenError(f"channel must be a name or an index, got {key!r}")
    if isinstance(key, int | np.integer):
        n = len(names)
        if not -n <= int(key) < n:
            raise CytokenError(f"channel index {key} out of range{where}: {n} channels {list(names)}")
        return int(key) % n
    low = [n.lower() for n in names]
    if key.lower() in low:
        return low.index(key.lower())
    if key.strip().isdigit():
        return channel_index(int(key), names, path)
    raise CytokenError(f"channel {key!r} not found{where}; available channels: {list(names)}")


def match_channels(
    available: Sequence[str],
    wanted: Sequence[str],
    override: Sequence[ChannelKey] | Mapping[str, ChannelKey] | None = None,
    *,
    where: str = "the image",
) -> list[int]:
    """For each channel a model reads, the index of the image channel that feeds it.

    Without ``override`` every wanted name is looked up among ``available`` (case-insensitive). ``override`` is
    either a list with one image channel (name or index) per wanted channel, in the model's order, or a mapping
    ``{model channel: image channel}`` for some of them (the others are matched by name). Strings of digits are
    indices, and ``"model=image"`` strings in a list are mapping entries (the form of ``--channels CD3=FITC``).

    Args:
        available: the image's channel names.
        wanted: the model's channel names, in the model's order.
        override: explicit mapping (see above), or None.
        where: names the image in error messages.

    Returns:
        ``len(wanted)`` indices into ``available``.

    Raises:
        CytokenError: one error naming every channel that cannot be found and listing ``available``.

    Example:
        >>> match_channels(("DAPI", "FITC", "Cy3"), ("dapi", "cy3"))
        [0, 2]
        >>> match_channels(("DAPI", "FITC", "Cy3"), ("DAPI", "CD3"), ["CD3=FITC"])
        [0, 1]
        >>> match_channels(("DAPI", "FITC", "Cy3"), ("DAPI", "CD3"), ["0", "2"])
        [0, 2]
    """
    avail = [str(a) for a in available]
    want = [str(w) for w in wanted]
    pairs: dict[str, ChannelKey] = {}
    positional: list[ChannelKey] | None = None
    if isinstance(override, Mapping):
        pairs = {str(k).strip().lower(): v for k, v in override.items()}
    elif override is not None:
        items = [o.strip() if isinstance(o, str) else o for o in override]
        with_eq = [isinstance(o, str) and "=" in o for o in items]
        if any(with_eq) and not all(with_eq):
            raise CytokenError(f"channel mapping {list(items)}: give either one image channel per model channel "
                               "(DAPI,FITC,Cy3) or model=image pairs (CD3=FITC,PanCK=Cy3), not a mix")  # fmt: skip
        if items and all(with_eq):
            for o in items:
                k, _, v = str(o).partition("=")
                pairs[k.strip().lower()] = v.strip()
        else:
            positional = list(items)
            if len(positional) != len(want):
                raise CytokenError(f"channel mapping {positional} gives {len(positional)} channels; the model reads "
                                   f"{len(want)}: {want}")  # fmt: skip
    unknown = [k for k in pairs if k not in {w.lower() for w in want}]
    if unknown:
        raise CytokenError(f"channel mapping names {unknown}, which the model does not read; its channels: {want}")
    out: list[int] = []
    missing: list[str] = []
    for i, name in enumerate(want):
        key: ChannelKey = positional[i] if positional is not None else pairs.get(name.lower(), name)
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        try:
            out.append(channel_index(key, avail))
        except CytokenError:
            missing.append(name if key == name else f"{name} (mapped to {key!r})")
    if missing:
        raise CytokenError(
            f"{where} lacks channel(s) the model reads: {', '.join(missing)}; available channels: {avail}. "
            f"The model reads {want}: map image channels to them, e.g. --channels {want[0]}={avail[0]} "
            "or one image channel per model channel in order"
        )
    return out


def intensity_ranges(data: np.ndarray, rule: IntensityRule = "dtype") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) intensities that :func:`to_unit` maps to 0 and 1.

    Args:
        data: (C, H, W) raw channels (any dtype).
        rule: ``dtype`` (low 0, high = the integer dtype's maximum; 1 for floats and booleans) or ``percentile``
            (the 0.5 and 99.5 percentiles of each channel over the whole array).

    Returns:
        ``(low, high)``, two (C,) float32 arrays.

    Example:
        >>> lo, hi = intensity_ranges(np.zeros((2, 4, 4), np.uint16))
        >>> lo.tolist(), hi.tolist()
        ([0.0, 0.0], [65535.0, 65535.0])
    """
    a = np.asarray(data)
    if a.ndim != 3:
        raise ValueError(f"intensity_ranges: data must be (C, H, W), got shape {a.shape}")
    c = a.shape[0]
    if rule == "percentile":
        lo, hi = np.empty(c, np.float32), np.empty(c, np.float32)
        for i in range(c):
            lo[i], hi[i] = np.percentile(a[i].astype(np.float32), PERCENTILES)
        return lo, hi
    if rule != "dtype":
        raise ValueError(f"intensity rule must be one of {INTENSITY_RULES}, got {rule!r}")
    top = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 1.0
    return np.zeros(c, np.float32), np.full(c, top, np.float32)


def to_unit(data: np.ndarray, low: np.ndarray, high: np.ndarray, *, clip: bool = False, axis: int = 0) -> np.ndarray:
    """Scale raw channels to [0, 1]: ``(x - low) / (high - low)`` per channel (0 where high <= low), as float32.

    Args:
        data: raw channels, the channel axis at ``axis``.
        low: (C,) values mapped to 0.
        high: (C,) values mapped to 1.
        clip: clip the result to [0, 1] (the ``percentile`` rule clips; ``dtype`` leaves floats as they are).
        axis: the channel axis of ``data`` (0 for (C, H, W), -1 for (H, W, C)).

    Returns:
        A float32 array of ``data``'s shape.

    Example:
        >>> to_unit(np.array([[[0, 255]]], np.uint8), np.array([0.0]), np.array([255.0])).tolist()
        [[[0.0, 1.0]]]
    """
    a = np.asarray(data)
    shape = [1] * a.ndim
    shape[axis] = -1
    lo = np.asarray(low, np.float32).reshape(shape)
    span = (np.asarray(high, np.float32) - np.asarray(low, np.float32)).reshape(shape)
    flat = span <= 0
    out = (a.astype(np.float32) - lo) / np.where(flat, np.float32(1), span)
    if flat.any():
        out = np.where(flat, np.float32(0), out)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- writing
