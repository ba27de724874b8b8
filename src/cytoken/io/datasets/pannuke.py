"""PanNuke (Gamper et al. 2019/2020): 256x256 H&E patches of 19 tissues at 40x, 5 nucleus classes, 3 folds.

Layouts read (either)::

    root/Fold 1/images/fold1/images.npy   (N,256,256,3) float64 or uint8, 0..255   (official release)
    root/Fold 1/images/fold1/types.npy    (N,) tissue names
    root/Fold 1/masks/fold1/masks.npy     (N,256,256,6) instance ids per class channel

    root/fold1/{images,masks,types}.npy                                              (flat copy)

Mask channels: 0 neoplastic, 1 inflammatory, 2 connective, 3 dead, 4 epithelial, 5 background. Instance ids
are unique within a channel only; the adapter renumbers them 1..N across channels. The arrays are
memory-mapped (``np.load(mmap_mode="r")``), so only the requested patch is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    as_label_map,
    instance_points,
    optional_mpp,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample

__all__ = ["PANNUKE_CLASSES", "PANNUKE_MPP", "PanNuke", "pannuke_maps"]

PANNUKE_CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
PANNUKE_MPP = 0.25
_LAYOUT = "'Fold 1/images/fold1/images.npy' + 'Fold 1/masks/fold1/masks.npy', or 'fold1/{images,masks}.npy'"


def pannuke_maps(mask: np.ndarray, path: Path | str = "masks.npy") -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps from one PanNuke mask (H, W, 6).

    Args:
        mask: per-class instance ids in channels 0..4 (channel 5 is background and ignored).
        path: file named in error messages.

    Returns:
        ``(inst_map, type_map)`` int32: instances renumbered 1..N (channel by channel, ids in increasing
        order), type = channel index + 1. Where channels overlap, the later channel wins.

    Example:
        >>> m = np.zeros((4, 4, 6)); m[0, 0, 0] = 3; m[1, 1, 1] = 3
        >>> inst, types = pannuke_maps(m)
        >>> int(inst[0, 0]), int(inst[1, 1]), int(types[1, 1])
        (1, 2, 2)
    """
    m = np.asarray(mask)
    if m.ndim != 3 or m.shape[2] < len(PANNUKE_CLASSES):
        raise ValueError(f"{path}: PanNuke mask must be (H, W, 6), got shape {m.shape}")
    h, w = m.shape[:2]
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.int32)
    next_id = 1
    for c in range(len(PANNUKE_CLASSES)):
        ch = as_label_map(m[..., c], path, f"mask channel {c}")
        ids = np.unique(ch)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        lut = np.zeros(int(ids.max()) + 1, np.int32)
        lut[ids] = np.arange(next_id, next_id + len(ids), dtype=np.int32)
        fg = ch > 0
        inst[fg] = lut[ch[fg]]
        types[fg] = c + 1
        next_id += len(ids)
    return inst, types


def _fold_number(split: str) -> int | None:
    m = re.fullmatch(r"\s*(?:fold[\s_-]*)?(\d+)\s*", str(split), flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def _fold_files(root: Path, k: int) -> tuple[Path, Path, Path | None] | None:
    """(images, masks, types) of fold k in the official or the flat layout, or None when absent."""
    official = root / f"Fold {k}"
    candidates = [
        (
            official / "images" / f"fold{k}" / "images.npy",
            official / "masks" / f"fold{k}" / "masks.npy",
            [official / "images" / f"fold{k}" / "types.npy", official / "masks" / f"fold{k}" / "types.npy"],
        ),
        (
            root / f"fold{k}" / "images.npy",
            root / f"fold{k}" / "masks.npy",
            [root / f"fold{k}" / "types.npy"],
        ),
    ]
    for images, masks, types in candidates:
        if images.is_file() and masks.is_file():
            return images, masks, next((t for t in types if t.is_file()), None)
    return None


class PanNuke(Dataset):
    """One PanNuke fold (``"fold1"``, ``"fold2"``, ``"fold3"``; ``"1"`` and ``"Fold 1"`` work too).

    Args:
        root: folder holding ``Fold 1/``... (official) or ``fold1/``... (flat).
        split: the fold.
        mpp: µm/px to report instead of the dataset's nominal value (None keeps it).

    Samples carry ``inst_map``, ``type_map`` (1..5), ``points``/``point_labels`` and ``tissue``.

    Example:
        >>> ds = PanNuke("pannuke", split="fold1")  # doctest: +SKIP
        >>> ds[0].tissue  # doctest: +SKIP
        'Breast'
    """

    name = "pannuke"

    def __init__(self, root: str | Path, split: str = "fold1", *, mpp: float | None = None) -> None:
        root = Path(root)
        require_dir(root, "pannuke data root")
        folds = {k: f for k in range(1, 10) if (f := _fold_files(root, k)) is not None}
        available = [f"fold{k}" for k in folds]
        asked = _fold_number(split)
        canonical = resolve_split(
            f"fold{asked}" if asked is not None else str(split),
            available,
            "pannuke",
            root=root,
            expected=_LAYOUT,
        )
        k = int(canonical[len("fold") :])
        mpp_value = optional_mpp(mpp, "pannuke") or PANNUKE_MPP
        super().__init__(root, f"fold{k}", class_names=PANNUKE_CLASSES, mpp=mpp_value)
        self._image_path, self._mask_path, types_path = folds[k]
        self._open()
        if self._images.ndim != 4 or self._images.shape[-1] != 3:
            raise ValueError(
                f"{self._image_path}: expected (N, H, W, 3) images, got shape {self._images.shape}"
            )
        if self._masks.ndim != 4 or self._masks.shape[-1] != 6:
            raise ValueError(f"{self._mask_path}: expected (N, H, W, 6) masks, got shape {self._masks.shape}")
        if self._masks.shape[:3] != self._images.shape[:3]:
            raise ValueError(
                f"{self._mask_path}: masks shape {self._masks.shape[:3]} does not match images "
                f"{self._images.shape[:3]} in {self._image_path}"
            )
        n = len(self._images)
        self._tissues: list[str | None] = [None] * n
        if types_path is not None:
            tissues = np.load(types_path, allow_pickle=False)
            if len(tissues) != n:
                raise ValueError(f"{types_path}: {len(tissues)} tissue types for {n} images")
            self._tissues = [str(t) for t in tissues]
        self._ids = [f"pannuke/fold{k}/{i}" for i in range(n)]

    def _open(self) -> None:
        self._images = np.load(self._image_path, mmap_mode="r")
        self._masks = np.load(self._mask_path, mmap_mode="r")

    def __getstate__(self) -> dict[str, object]:
        # Pickling a memmap copies its whole content: send the paths to DataLoader workers instead.
        state = dict(self.__dict__)
        state.pop("_images", None)
        state.pop("_masks", None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._open()

    def _load(self, i: int) -> Sample:
        raw = np.asarray(self._images[i])
        if raw.dtype != np.uint8:
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                raise ValueError(f"{self._image_path}: image {i} has values outside 0..255")
            raw = np.clip(np.rint(raw), 0, 255).astype(np.uint8)
        inst, types = pannuke_maps(np.asarray(self._masks[i]), self._mask_path)
        _, points, labels = instance_points(inst, types)
        return Sample(
            image=np.ascontiguousarray(raw),
            mpp=self.mpp,
            source_id=self._ids[i],
            inst_map=inst,
            type_map=types,
            points=points,
            point_labels=labels,
            class_names=self.class_names,
            tissue=self._tissues[i],
        )
