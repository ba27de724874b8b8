"""Training data: random augmented crops with HoVer targets, and fixed validation crops.

Targets come from the (augmented) instance map through the same :func:`cytoken.postprocess.hover.hv_targets` that
the round-trip test checks against :func:`decode_hover`, so HV targets are always recomputed after every geometric
transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from cytoken.io.datasets import open_dataset
from cytoken.io.datasets.base import Dataset
from cytoken.postprocess.hover import hv_targets
from cytoken.training.augment import AugmentConfig, augment, random_crop
from cytoken.training.config import DataSource, TrainConfig
from cytoken.types import CytokenError, Sample

__all__ = [
    "CropDataset",
    "SourceData",
    "ValCrop",
    "balanced_type_weights",
    "load_sources",
    "make_targets",
    "split_groups",
]

IGNORE = -1


@dataclass
class SourceData:
    """The samples of one source, split into train and validation, with class ids mapped to the model's."""

    source: DataSource
    train: list[Sample]
    val: list[Sample]
    class_lut: np.ndarray | None  # dataset class id -> model class id (None: no type supervision)


def split_groups(groups: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split sample indices by group (never splitting a group) into (train, val).

    Example:
        >>> split_groups(["a", "a", "b", "c"], 0.34, 0)[1] in ([0, 1], [2], [3])
        True
    """
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_val = round(len(uniq) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(uniq) > 1:
        n_val = 1
    val_groups = {uniq[i] for i in order[:n_val]}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val


def _class_lut(ds: Dataset, src: DataSource, model_names: tuple[str, ...]) -> np.ndarray | None:
    if not src.use_types or not model_names or not ds.class_names:
        return None
    lut = np.full(len(ds.class_names) + 1, IGNORE, np.int64)
    lut[0] = 0
    lower = {n.lower(): i + 1 for i, n in enumerate(model_names)}
    for i, name in enumerate(ds.class_names, start=1):
        target = src.class_map.get(name, name).lower()
        if target not in lower:
            raise CytokenError(
                f"{src.dataset}: class {name!r} has no counterpart among the model's classes {list(model_names)}; "
                "set class_map in the data source"
            )
        lut[i] = lower[target]
    return lut


def load_sources(config: TrainConfig) -> list[SourceData]:
    """Open every source, load its samples into memory and split them by group."""
    out = []
    names = config.model.names if config.model.num_classes else ()
    for k, src in enumerate(config.data):
        kw: dict[str, Any] = {"mpp": src.mpp} if src.mpp is not None else {}
        try:
            ds = open_dataset(src.dataset, src.root, split=src.split, **kw)
        except (FileNotFoundError, ValueError) as exc:
            raise CytokenError(f"data source {src.dataset} at {src.root}: {exc}") from None
        if len(ds) == 0:
            raise CytokenError(f"data source {src.dataset} at {src.root} ({src.split}) has no samples")
        seed = src.split_seed if src.split_seed is not None else k  # not the run's seed: see DataSource
        tr, va = split_groups(ds.groups, src.val_fraction, seed)
        samples = [ds[i] for i in range(len(ds))]
        for s in samples:
            if s.inst_map is None:
                raise CytokenError(f"{s.source_id}: segmentation training needs instance maps")
        if not any(s.inst_map.any() for s in samples):  # type: ignore[union-attr]
            raise CytokenError(f"data source {src.dataset} at {src.root} yields no nuclei")
        out.append(
            SourceData(src, [samples[i] for i in tr], [samples[i] for i in va], _class_lut(ds, src, names))
        )
    return out


def balanced_type_weights(sources: list[SourceData], num_classes: int, clip: float = 10.0) -> np.ndarray:
    """Median-frequency class weights (Eigen & Fergus 2015) for the type cross-entropy, background first.

    Frequencies are pixel counts over the training samples of sources with type supervision; a class that never
    occurs keeps weight 1. Weights are clipped to ``[1/clip, clip]``.

    Raises:
        CytokenError: when no source has type supervision.
    """
    counts = np.zeros(num_classes + 1, np.float64)
    for s in sources:
        if s.class_lut is None:
            continue
        for smp in s.train:
            if smp.type_map is None or smp.inst_map is None:
                continue
            t = s.class_lut[np.clip(smp.type_map, 0, len(s.class_lut) - 1)]
            t = np.where(smp.inst_map > 0, t, 0)
            counts += np.bincount(t[t >= 0].ravel(), minlength=num_classes + 1)[: num_classes + 1]
    if counts[1:].sum() == 0:
        raise CytokenError("type_class_weights 'balanced' needs a training source with type maps (use_types)")
    seen = counts > 0
    freq = counts / counts.sum()
    w = np.ones_like(freq)
    w[seen] = np.median(freq[seen]) / freq[seen]
    return np.clip(w, 1.0 / clip, clip)


def make_targets(
    image: np.ndarray, inst: np.ndarray, types: np.ndarray | None, lut: np.ndarray | None
) -> dict[str, torch.Tensor]:
    """Tensors for one crop: image uint8 (H, W, 3), nuclei (H, W), hv (2, H, W), types (H, W; -1 = ignore)."""
    nuclei = (inst > 0).astype(np.int64)
    if types is not None and lut is not None:
        t = lut[np.clip(types, 0, len(lut) - 1)]
        t[inst == 0] = 0
    else:
        t = np.full(inst.shape, IGNORE, np.int64)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "nuclei": torch.from_numpy(nuclei),
        "hv": torch.from_numpy(hv_targets(inst)),
        "types": torch.from_numpy(t),
        "inst": torch.from_numpy(inst.astype(np.int32)),
    }


class CropDataset(TorchDataset):
    """An epoch of random, augmented crops drawn from the sources by weight.

    Item ``k`` of epoch ``e`` is a pure function of (seed, epoch, rank, k), so runs are reproducible and resumable.
    """

    def __init__(self, sources: list[SourceData], config: TrainConfig, *, length: int, rank: int = 0) -> None:
        self.sources = [s for s in sources if s.train]
        if not self.sources:
            raise CytokenError("no training samples left after the validation split")
        w = np.array([s.source.weight for s in self.sources], np.float64)
        self.weights = w / w.sum()
        self.config = config
        self.length = length
        self.rank = rank
        self.epoch = 0
        self.aug = AugmentConfig() if config.augment else None
        self.sample_p = [self._sample_weights(s) for s in self.sources]

    def _sample_weights(self, s: SourceData) -> np.ndarray:
        n = len(s.train)
        if not self.config.class_weighted_sampling or s.class_lut is None:
            return np.full(n, 1.0 / n)
        # weight each image by the rarity of the classes it contains (inverse class frequency, summed)
        counts = []
        for smp in s.train:
            t = (
                s.class_lut[np.clip(smp.type_map, 0, len(s.class_lut) - 1)]
                if smp.type_map is not None
                else None
            )
            counts.append(
                np.bincount(t[t > 0].ravel(), minlength=len(s.class_lut)) if t is not None else None
            )
        total = sum(c for c in counts if c is not None) + 1.0
        score = np.array([((c > 0) / total).sum() if c is not None else 0.0 for c in counts]) + 1e-9
        return score / score.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the random crops)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, k])
        si = rng.choice(len(self.sources), p=self.weights)
        src = self.sources[si]
        smp = src.train[rng.choice(len(src.train), p=self.sample_p[si])]
        size = self.config.crop_size
        # crop with a margin so rotations/elastic warps do not bring in padding, then crop to size
        big = int(size * 1.25) if self.aug else size
        img, inst, types = random_crop(smp.image, smp.inst_map, smp.type_map, big, rng)
        if self.aug is not None:
            img, inst, types = augment(img, inst, types, rng, self.aug)
            img, inst, types = random_crop(img, inst, types, size, rng)
        return make_targets(img, inst, types, src.class_lut)  # type: ignore[arg-type]


@dataclass
class ValCrop:
    """A fixed validation crop with its ground truth."""

    image: np.ndarray
    inst: np.ndarray
    types: np.ndarray | None
    source_id: str


def validation_crops(sources: list[SourceData], size: int, max_per_image: int = 16) -> list[ValCrop]:
    """Non-overlapping ``size``² crops over every validation image (deterministic)."""
    out: list[ValCrop] = []
    for s in sources:
        for smp in s.val:
            h, w = smp.image.shape[:2]
            ys = list(range(0, max(1, h - size + 1), size))
            xs = list(range(0, max(1, w - size + 1), size))
            coords = [(y, x) for y in ys for x in xs][:max_per_image]
            for y, x in coords:
                img, inst, types = smp.image[y : y + size, x : x + size], smp.inst_map, smp.type_map
                inst = inst[y : y + size, x : x + size]  # type: ignore[index]
                t = None
                if types is not None and s.class_lut is not None:
                    t = s.class_lut[np.clip(types[y : y + size, x : x + size], 0, len(s.class_lut) - 1)]
                if img.shape[:2] != (size, size):
                    img, inst, t = random_crop(img, inst, t, size, np.random.default_rng(0))
                out.append(
                    ValCrop(np.ascontiguousarray(img), inst.astype(np.int32), t, f"{smp.source_id}@{x},{y}")
                )
    return out
