"""CoNSeP (Graham et al. 2019, HoVer-Net) in its published layout: 1000x1000 colorectal H&E at 40x.

Layout read::

    root/{Train,Test}/Images/NAME.png
    root/{Train,Test}/Labels/NAME.mat     inst_map, type_map (H,W) 0..7, inst_type (N,1), inst_centroid (N,2)

The 7 annotated classes are merged to HoVer-Net's 4 by default: 1 other; 2 inflammatory; 3 healthy + 4
dysplastic epithelial -> 3 epithelial; 5 fibroblast + 6 muscle + 7 endothelial -> 4 spindle-shaped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    as_label_map,
    check_class_range,
    check_same_shape,
    instance_points,
    list_files,
    load_mat,
    optional_mpp,
    read_image,
    require_dir,
    resolve_split,
)
from cytoken.io.datasets.consep_patched import CONSEP_CLASSES, CONSEP_MPP
from cytoken.types import Sample

__all__ = ["CONSEP_CLASSES_ORIGINAL", "CONSEP_MERGE", "Consep"]

CONSEP_CLASSES_ORIGINAL = (
    "other",
    "inflammatory",
    "healthy epithelial",
    "dysplastic/malignant epithelial",
    "fibroblast",
    "muscle",
    "endothelial",
)
# index = original class (0..7), value = merged class (0..4)
CONSEP_MERGE = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.int32)


class Consep(Dataset):
    """Original CoNSeP, splits ``train`` (27 images) and ``test`` (14), folders ``Train``/``Test``.

    Args:
        root: folder holding ``Train/`` and ``Test/``.
        split: ``"train"`` or ``"test"`` (case-insensitive).
        merge_classes: merge the 7 classes to HoVer-Net's 4 (default); False keeps the original 7.
        mpp: µm/px to report instead of the dataset's nominal value (None keeps it).

    Samples carry ``inst_map``, ``type_map`` and ``points``/``point_labels`` (centroids of the instance map
    and the majority class of each instance).

    Example:
        >>> ds = Consep("CoNSeP", split="test")  # doctest: +SKIP
        >>> ds.class_names  # doctest: +SKIP
        ('other', 'inflammatory', 'epithelial', 'spindle-shaped')
    """

    name = "consep"

    def __init__(
        self, root: str | Path, split: str = "train", *, merge_classes: bool = True, mpp: float | None = None
    ) -> None:
        root = Path(root)
        require_dir(root, "consep data root")
        folders = {
            p.name.lower(): p for p in root.iterdir() if p.is_dir() and p.name.lower() in ("train", "test")
        }
        split = resolve_split(
            split, sorted(folders, reverse=True), "consep", root=root, expected="Train/Images, Test/Images"
        )
        names = CONSEP_CLASSES if merge_classes else CONSEP_CLASSES_ORIGINAL
        super().__init__(root, split, class_names=names, mpp=optional_mpp(mpp, "consep") or CONSEP_MPP)
        self.merge_classes = merge_classes
        base = folders[split]
        self._images = list_files(base / "Images", (".png", ".tif", ".tiff", ".jpg"), "consep Images")
        label_dir = require_dir(base / "Labels", "consep Labels")
        self._labels = [label_dir / f"{p.stem}.mat" for p in self._images]
        for lab in self._labels:
            if not lab.is_file():
                raise FileNotFoundError(f"consep: label file {str(lab)!r} does not exist")
        self._ids = [f"consep/{split}/{p.stem}" for p in self._images]

    def _load(self, i: int) -> Sample:
        path = self._labels[i]
        image = read_image(self._images[i])
        m = load_mat(path, ("inst_map", "type_map"))
        inst = as_label_map(m["inst_map"], path, "inst_map")
        types = as_label_map(m["type_map"], path, "type_map")
        check_same_shape(image, inst, path, "inst_map")
        check_same_shape(image, types, path, "type_map")
        check_class_range(types, len(CONSEP_CLASSES_ORIGINAL), path)
        if self.merge_classes:
            types = CONSEP_MERGE[types]
        _, points, labels = instance_points(inst, types)
        keep = labels > 0
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            inst_map=inst,
            type_map=types,
            points=points[keep],
            point_labels=labels[keep],
            class_names=self.class_names,
        )
