"""A bounded-memory histogram of marker signal, filled tile by tile, for one threshold over a whole slide.

A data-driven threshold (Otsu, triangle) computed on one field splits whatever that field holds into two classes: on
a field without any positive cell it splits noise. Over a slide the threshold must therefore come from the signal of
the whole slide, which does not fit in memory as a list of values. :class:`SignalHistogram` keeps a fine histogram
(default 16384 bins over the range the signal can take) plus the exact minimum, maximum, count and sum; tiles are
added one at a time and the threshold is computed at the end.

How the thresholds match :func:`~cytoken.labeling.threshold.compute_threshold` (which sees every value):

* ``"otsu"`` and ``"triangle"``: the fine histogram is re-binned to 256 bins over the observed [min, max] (each fine
  bin goes to the coarse bin holding its centre), the binning those methods use on raw values
  (:func:`skimage.filters.threshold_otsu`), so the result differs from the all-values threshold by at most about
  one fine bin;
* ``"percentile"``: linear interpolation inside the fine bin that holds the requested rank;
* ``"fixed"``: the value; ``min_threshold`` raises any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cytoken.labeling.threshold import ThresholdConfig
from cytoken.types import CytokenError

__all__ = ["SignalHistogram", "signal_range"]

COARSE_BINS = 256


def signal_range(image: np.ndarray | tuple[float, float], config: ThresholdConfig | None = None) -> tuple[float, float]:
    """The interval the marker signal of ``image`` can take after :func:`~cytoken.labeling.marker_signal`.

    Bilinear warping, filling, smoothing and background subtraction (clipped at 0) never leave it: ``[min, max]`` of
    the finite intensities without background subtraction, ``[0, max - min]`` with it.

    Args:
        image: the marker plane, or its ``(min, max)`` finite intensities when the plane is too large to hold
            (e.g. from :meth:`~cytoken.io.ifreader.IFReader.value_range`).
        config: the signal settings.

    Example:
        >>> signal_range(np.array([[10, 200]], np.uint8), ThresholdConfig(background="tophat"))
        (0.0, 190.0)
        >>> signal_range((10.0, 200.0))
        (10.0, 200.0)
    """
    cfg = config or ThresholdConfig()
    if isinstance(image, tuple):
        lo, hi = float(image[0]), float(image[1])
    else:
        img = np.asarray(image)
        if np.issubdtype(img.dtype, np.floating):
            finite = img[np.isfinite(img)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        else:
            lo, hi = float(img.min()), float(img.max())
    if cfg.background != "none":
        lo, hi = 0.0, hi - lo
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


@dataclass
class SignalHistogram:
    """Fine histogram of signal values over a fixed range, with the exact min, max, count and sum.

    Values outside [low, high] are counted in the end bins (and in the exact min / max).

    Attributes:
        low: lower edge of the first bin.
        high: upper edge of the last bin.
        bins: number of bins.
        counts: (bins,) int64 counts.
        n: number of values added.
        total: sum of the values added.
        vmin: smallest value added (inf before any).
        vmax: largest value added (-inf before any).

    Example:
        >>> h = SignalHistogram(0.0, 10.0, bins=1000)
        >>> h.add(np.r_[np.zeros(90), np.full(10, 8.0)])
        >>> round(h.threshold(ThresholdConfig(method="otsu")), 1), round(h.threshold(
        ...     ThresholdConfig(method="percentile", value=50)), 2)
        (0.0, 0.01)
    """

    low: float
    high: float
    bins: int = 16384
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    n: int = 0
    total: float = 0.0
    vmin: float = float("inf")
    vmax: float = float("-inf")

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"SignalHistogram needs finite low < high, got [{self.low}, {self.high}]")
        if int(self.bins) < COARSE_BINS:
            raise ValueError(f"SignalHistogram.bins must be >= {COARSE_BINS}, got {self.bins}")
        self.bins = int(self.bins)
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)
        elif np.shape(self.counts) != (self.bins,):
            raise ValueError(f"SignalHistogram.counts must have {self.bins} entries, got {np.shape(self.counts)}")

    @property
    def width(self) -> float:
        """Bin width."""
        return (self.high - self.low) / self.bins

    @property
    def centers(self) -> np.ndarray:
        """(bins,) bin centres."""
        return self.low + (np.arange(self.bins) + 0.5) * self.width

    def add(self, values: np.ndarray) -> None:
        """Count finite values (e.g. one tile's signal on its valid pixels)."""
        v = np.asarray(values, np.float64).ravel()
        v = v[np.isfinite(v)]
        if not v.size:
            return
        idx = np.clip(((v - self.low) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)
        self.n += int(v.size)
        self.total += float(v.sum())
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))

    def merge(self, other: SignalHistogram) -> None:
        """Add another histogram over the same bins (e.g. from another worker)."""
        if (other.low, other.high, other.bins) != (self.low, self.high, self.bins):
            raise ValueError("SignalHistogram.merge: the histograms have different ranges or bin counts")
        self.counts += other.counts
        self.n += other.n
        self.total += other.total
        self.vmin = min(self.vmin, other.vmin)
        self.vmax = max(self.vmax, other.vmax)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0-1), linearly interpolated inside its bin and clipped to [vmin, vmax]."""
        if self.n == 0:
            raise CytokenError("SignalHistogram.quantile: no values were added")
        cum = np.cumsum(self.counts)
        rank = q * self.n
        i = int(np.searchsorted(cum, rank, side="left"))
        i = min(i, self.bins - 1)
        below = cum[i - 1] if i > 0 else 0
        inside = self.counts[i]
        frac = (rank - below) / inside if inside else 0.5
        value = self.low + (i + frac) * self.width
        return float(np.clip(value, self.vmin, self.vmax))

    def coarse(self, nbins: int = COARSE_BINS) -> tuple[np.ndarray, np.ndarray]:
        """Counts and centres of ``nbins`` equal bins over the observed [vmin, vmax] (fine bins moved by centre)."""
        if self.n == 0:
            raise CytokenError("SignalHistogram: no values were added")
        lo, hi = self.vmin, self.vmax
        c = self.centers.clip(lo, hi)
        step = (hi - lo) / nbins
        j = np.clip(((c - lo) / step).astype(np.int64), 0, nbins - 1)
        counts = np.bincount(j, weights=self.counts, minlength=nbins).astype(np.int64)
        return counts, lo + (np.arange(nbins) + 0.5) * step

    def stats(self) -> dict[str, float]:
        """Count, min, 1st percentile, median, mean, 99th percentile and max (percentiles from the bins)."""
        if self.n == 0:
            return {"n_valid": 0.0}
        return {
            "n_valid": float(self.n),
            "min": self.vmin,
            "p1": self.quantile(0.01),
            "median": self.quantile(0.5),
            "mean": self.total / self.n,
            "p99": self.quantile(0.99),
            "max": self.vmax,
        }

    def threshold(self, config: ThresholdConfig | None = None) -> float:
        """The threshold of ``config.method`` over every value added (raised to ``config.min_threshold``).

        Raises:
            CytokenError: no values, or constant values with a data-driven method.
        """
        cfg = config or ThresholdConfig()
        if cfg.method == "fixed":
            thr = float(cfg.value)  # type: ignore[arg-type]
        else:
            if self.n == 0 or self.vmax <= self.vmin:
                stats = ", ".join(f"{k}={v:.4g}" for k, v in self.stats().items())
                raise CytokenError(f"marker signal is empty or constant over the slide, nothing to threshold ({stats})")
            if cfg.method == "percentile":
                thr = self.quantile(float(cfg.value) / 100.0)  # type: ignore[arg-type]
            else:
                counts, centers = self.coarse()
                thr = _otsu(counts, centers) if cfg.method == "otsu" else _triangle(counts, centers)
        if cfg.min_threshold is not None:
            thr = max(thr, float(cfg.min_threshold))
        return float(thr)


def _otsu(counts: np.ndarray, centers: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(hist=(counts, centers)))


def _triangle(counts: np.ndarray, centers: np.ndarray) -> float:
    """Triangle (Zack) threshold on a histogram.

    The bin farthest below the line from the histogram peak to the end of its longer tail (that end at height 0).
    """
    h = counts.astype(np.float64)
    nz = np.flatnonzero(h)
    first, last = int(nz[0]), int(nz[-1])
    peak = int(np.argmax(h))
    end = last if last - peak > peak - first else first  # the longer tail
    if end == peak:
        return float(centers[peak])
    j = np.arange(end, peak) if end < peak else np.arange(peak + 1, end + 1)  # the tail side, peak excluded
    run = abs(peak - end)
    dist = h[peak] * np.abs(j - end) - run * h[j]  # proportional to the distance below the line
    return float(centers[j[int(np.argmax(dist))]])
