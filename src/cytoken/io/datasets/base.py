"""The common dataset-adapter API and the small readers and checks every adapter shares.

An adapter is a :class:`Dataset`: a lazy, indexable list of :class:`cytoken.types.Sample` for one explicit
split. Nothing is read from disk until a sample is requested, except the file listing (and small index files).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cytoken.types import Sample, validate_mpp

__all__ = [
    "IMAGE_SUFFIXES",
    "Dataset",
    "as_label_map",
    "check_class_range",
    "check_same_shape",
    "instance_points",
    "list_files",
    "load_mat",
    "natural_key",
    "optional_mpp",
    "read_image",
    "read_label_image",
    "require_dir",
    "require_file",
    "resolve_split",
    "types_from_instances",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class Dataset(abc.ABC):
    """A lazily loaded, indexable list of :class:`~cytoken.types.Sample` for one split of one dataset.

    Subclasses fill ``_ids`` (stable source ids, one per sample) in ``__init__`` and implement ``_load``.

    Attributes:
        name: registry name of the adapter (``"monuseg"``).
        root: the data folder.
        split: the split this object reads (``"train"``, ``"test"``, ``"fold1"``...).
        class_names: names of classes 1..C (empty for datasets without classes).
        mpp: nominal µm/px of the dataset (samples may carry a more precise per-image value), or None.
    """

    name: str = "dataset"

    def __init__(self, root: str | Path, split: str, class_names: Sequence[str], mpp: float | None) -> None:
        self.root = Path(root)
        self.split = split
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.mpp = mpp
        self._ids: list[str] = []

    @property
    def ids(self) -> list[str]:
        """Source ids of the samples, in index order (``"monuseg/train/TCGA-..."``)."""
        return list(self._ids)

    @property
    def groups(self) -> list[str]:
        """One group key per sample for leakage-free splits (the source id unless the adapter knows more)."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Sample:
        n = len(self._ids)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range for {n} samples")
        return self._load(i)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self._load(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    @abc.abstractmethod
    def _load(self, i: int) -> Sample:
        """Read sample ``i`` (0 <= i < len) from disk."""


# ---------------------------------------------------------------------------------------------- layout checks
def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise FileNotFoundError naming it and what it should hold."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it and what was expected there."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file {str(path)!r} does not exist")
    return path


def resolve_split(
    split: str, available: Sequence[str], dataset: str, *, root: Path | None = None, expected: str = ""
) -> str:
    """Check ``split`` against the splits a dataset has (case-insensitive) and return the canonical spelling.

    Args:
        split: the split asked for.
        available: the splits found on disk.
        dataset: dataset name for messages.
        root: the data folder, named when no split at all was found.
        expected: a short description of the expected layout, for that message.

    Raises:
        FileNotFoundError: when no split was found (the folder does not have the dataset's layout).
        ValueError: naming the unknown split and listing the available ones.

    Example:
        >>> resolve_split("Train", ["train", "test"], "monuseg")
        'train'
    """
    if not available:
        where = f" in {str(root)!r}" if root is not None else ""
        hint = f" (expected {expected})" if expected else ""
        raise FileNotFoundError(f"{dataset}: no split found{where}{hint}")
    by_lower = {s.lower(): s for s in available}
    key = str(split).lower()
    if key not in by_lower:
        raise ValueError(f"{dataset}: unknown split {split!r}; available: {', '.join(available)}")
    return by_lower[key]


def natural_key(path: Path | str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers by value (``img2`` before ``img10``).

    Example:
        >>> sorted(["img10", "img2", "img1"], key=natural_key)
        ['img1', 'img2', 'img10']
    """
    parts = re.split(r"(\d+)", Path(path).name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts if p)


def list_files(folder: Path, suffixes: Sequence[str], what: str) -> list[Path]:
    """Files in ``folder`` with one of ``suffixes`` (case-insensitive), sorted by name; none is an error."""
    require_dir(folder, what)
    sfx = tuple(s.lower() for s in suffixes)
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in sfx), key=natural_key)
    if not files:
        raise FileNotFoundError(f"{what}: no {'/'.join(suffixes)} files in {str(folder)!r}")
    return files


# ---------------------------------------------------------------------------------------------- readers
def read_image(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (grey is repeated, alpha dropped).

    Raises:
        ValueError: when the file is not 8-bit grey/RGB(A).
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGBA", "P", "L", "LA", "CMYK", "YCbCr"):
            im = im.convert("RGB")
        if im.mode != "RGB":
            raise ValueError(f"{path}: expected an 8-bit RGB image, got PIL mode {im.mode!r}")
        arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def read_label_image(path: Path, what: str = "label map") -> np.ndarray:
    """Read a single-channel integer label image (PNG/TIFF) as int32, checked with :func:`as_label_map`."""
    from PIL import Image

    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im)
    return as_label_map(arr, path, what)


def as_label_map(arr: np.ndarray, path: Path | str, what: str = "label map") -> np.ndarray:
    """Check that ``arr`` is a 2-D map of non-negative integers and return it as int32.

    Float arrays are accepted when every value is integral (MATLAB files store doubles).

    Raises:
        ValueError: naming ``path`` when the array is not 2-D, holds non-integer, negative or too large
            values.

    Example:
        >>> as_label_map(np.array([[0, 2.0], [1, 1]]), "x.mat").dtype
        dtype('int32')
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{path}: {what} must be a single-channel 2-D array, got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"{path}: {what} holds non-integer values (dtype {a.dtype})")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{path}: {what} must hold integers, got dtype {a.dtype}")
    if a.size:
        lo, hi = a.min(), a.max()
        if lo < 0:
            raise ValueError(f"{path}: {what} holds negative values (min {lo})")
        if hi > np.iinfo(np.int32).max:
            raise ValueError(f"{path}: {what} value {hi} does not fit int32")
    return a.astype(np.int32, copy=False)


def check_same_shape(image: np.ndarray, label: np.ndarray, path: Path | str, what: str = "label map") -> None:
    """Raise ValueError naming ``path`` when an image and a label map differ in height/width."""
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(
            f"{path}: {what} is {label.shape[1]}x{label.shape[0]} (WxH) but its image is "
            f"{image.shape[1]}x{image.shape[0]}"
        )


def check_class_range(
    values: np.ndarray, n_classes: int, path: Path | str, *, allow_zero: bool = True
) -> None:
    """Raise ValueError naming ``path`` when class ids fall outside ``0..n_classes`` (or ``1..n_classes``)."""
    v = np.asarray(values)
    if v.size == 0:
        return
    lo = 0 if allow_zero else 1
    bad = np.unique(v[(v < lo) | (v > n_classes)])
    if bad.size:
        raise ValueError(
            f"{path}: class ids {bad[:10].tolist()} outside the declared range {lo}..{n_classes}"
        )


def instance_points(
    inst_map: np.ndarray, type_map: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid and majority class of every instance of a label map.

    Args:
        inst_map: (H, W) integer instance ids, 0 = background.
        type_map: optional (H, W) class ids; the class of an instance is its most frequent non-zero class
            (0 when it has none). Without it every label is 0.

    Returns:
        ``(ids, points, labels)``: (N,) int64 instance ids (sorted), (N, 2) float64 centroids (x, y) in
        0-based pixel coordinates, (N,) int64 class ids.

    Example:
        >>> m = np.zeros((4, 4), np.int32); m[1:3, 0:2] = 5
        >>> instance_points(m)[1]
        array([[0.5, 1.5]])
    """
    flat = np.asarray(inst_map).ravel()
    fg = np.flatnonzero(flat)
    if fg.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros(0, np.int64)
    ids, inv = np.unique(flat[fg], return_inverse=True)
    w = inst_map.shape[1]
    ys, xs = np.divmod(fg, w)
    counts = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    cx = np.bincount(inv, weights=xs, minlength=len(ids)) / counts
    cy = np.bincount(inv, weights=ys, minlength=len(ids)) / counts
    labels = np.zeros(len(ids), np.int64)
    if type_map is not None:
        t = np.asarray(type_map).ravel()[fg].astype(np.int64)
        n_cls = int(t.max()) + 1
        hist = np.bincount(inv * n_cls + t, minlength=len(ids) * n_cls).reshape(len(ids), n_cls)
        hist[:, 0] = 0
        labels = np.where(hist.max(axis=1) > 0, hist.argmax(axis=1), 0).astype(np.int64)
    return ids.astype(np.int64), np.stack([cx, cy], axis=1), labels


def types_from_instances(
    inst_map: np.ndarray, ids: np.ndarray, classes: np.ndarray, path: Path | str
) -> np.ndarray:
    """Paint a type map from per-instance classes (``classes[k]`` is the class of instance ``ids[k]``).

    Raises:
        ValueError: naming ``path`` when the map holds an instance id that has no class.

    Example:
        >>> m = np.array([[0, 4], [9, 9]], np.int32)
        >>> types_from_instances(m, np.array([9, 4]), np.array([2, 1]), "x.mat")
        array([[0, 1],
               [2, 2]], dtype=int32)
    """
    ids = np.asarray(ids, np.int64).ravel()
    classes = np.asarray(classes, np.int64).ravel()
    if len(ids) != len(classes):
        raise ValueError(f"{path}: {len(ids)} instance ids but {len(classes)} classes")
    present = np.unique(inst_map)
    present = present[present > 0]
    missing = np.setdiff1d(present, ids)
    if missing.size:
        raise ValueError(f"{path}: instance ids {missing[:10].tolist()} of the map have no class")
    size = int(max(present.max() if present.size else 0, ids.max() if ids.size else 0)) + 1
    lut = np.zeros(size, np.int32)
    keep = ids >= 0
    lut[ids[keep]] = classes[keep]
    return lut[inst_map]


def load_mat(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read variables from a MATLAB ``.mat`` file; a missing key raises ValueError naming the file."""
    from scipy.io import loadmat

    try:
        m = loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f"{path}: cannot read MATLAB file ({e})") from None
    missing = [k for k in keys if k not in m]
    if missing:
        found = sorted(k for k in m if not k.startswith("__"))
        raise ValueError(f"{path}: missing variables {missing} (found {found})")
    return m


def optional_mpp(mpp: float | None, dataset: str) -> float | None:
    """A user's µm/px override, checked with :func:`cytoken.types.validate_mpp` (None stays None)."""
    return None if mpp is None else validate_mpp(mpp, source=f"{dataset} mpp")
