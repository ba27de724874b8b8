"""Lizard (Graham et al. 2021): colon H&E at 20x (0.5 µm/px) with 6 nucleus classes.

Layout read (the published archives, with or without their outer ``lizard_*`` folders)::

    root/[lizard_images1/]Lizard_Images1/NAME.png
    root/[lizard_images2/]Lizard_Images2/NAME.png
    root/[lizard_labels/]Lizard_Labels/Labels/NAME.mat   inst_map, id (N,1), class (N,1) 1..6, bbox, centroid
    root/[lizard_labels/]Lizard_Labels/info.csv          Filename,Source,Split (1..3)

Splits: ``"fold1"``, ``"fold2"``, ``"fold3"`` from ``info.csv`` (``"1"`` works too) and ``"all"``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    as_label_map,
    check_class_range,
    check_same_shape,
    instance_points,
    load_mat,
    natural_key,
    optional_mpp,
    read_image,
    require_dir,
    resolve_split,
    types_from_instances,
)
from cytoken.types import Sample

__all__ = ["LIZARD_CLASSES", "LIZARD_MPP", "Lizard"]

LIZARD_CLASSES = ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
LIZARD_MPP = 0.5
_LAYOUT = "Lizard_Images1/, Lizard_Images2/ and Lizard_Labels/Labels/ (optionally inside lizard_* folders)"


def _find_dir(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/<any>/name``, else None.

    The spelling must match exactly: the archives' outer folders are the lower-case names of the inner ones.
    """
    for base in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (base / name).is_dir():
            return base / name
    return None


class Lizard(Dataset):
    """Lizard nucleus segmentation and classification (6 classes, 0.5 µm/px).

    Args:
        root: the folder holding the (extracted) Lizard archives.
        split: ``"fold1"``/``"fold2"``/``"fold3"`` (from ``info.csv``) or ``"all"``.
        mpp: µm/px to report instead of the dataset's nominal value (None keeps it).

    Samples carry ``inst_map``, ``type_map`` (from the per-instance ``class`` list),
    ``points``/``point_labels`` (centroids of the instance map) and ``tissue="colon"``.

    Example:
        >>> ds = Lizard("lizard", split="fold1")  # doctest: +SKIP
        >>> ds.class_names[0]  # doctest: +SKIP
        'neutrophil'
    """

    name = "lizard"

    def __init__(self, root: str | Path, split: str = "all", *, mpp: float | None = None) -> None:
        root = Path(root)
        require_dir(root, "lizard data root")
        labels_root = _find_dir(root, "Lizard_Labels")
        if labels_root is None:
            raise FileNotFoundError(f"lizard: no Lizard_Labels folder in {str(root)!r} (expected {_LAYOUT})")
        label_dir = require_dir(labels_root / "Labels", "lizard labels")
        image_dirs = [
            d for n in ("Lizard_Images1", "Lizard_Images2", "Lizard_Images") if (d := _find_dir(root, n))
        ]
        if not image_dirs:
            raise FileNotFoundError(
                f"lizard: no Lizard_Images1/2 folder in {str(root)!r} (expected {_LAYOUT})"
            )
        folds = self._read_info(labels_root / "info.csv")
        available = ["all", *sorted({f"fold{k}" for k in folds.values()}, key=natural_key)]
        m = re.fullmatch(r"(?:fold)?\s*(\d+)", str(split).strip(), flags=re.IGNORECASE)
        split = resolve_split(
            f"fold{m.group(1)}" if m else split, available, "lizard", root=root, expected=_LAYOUT
        )
        super().__init__(
            root, split, class_names=LIZARD_CLASSES, mpp=optional_mpp(mpp, "lizard") or LIZARD_MPP
        )
        images = {p.stem: p for d in image_dirs for p in d.iterdir() if p.suffix.lower() == ".png"}
        if split == "all":
            names = sorted(images, key=natural_key)
        else:
            k = int(split[len("fold") :])
            names = sorted((n for n, f in folds.items() if f == k), key=natural_key)
            missing = [n for n in names if n not in images]
            if missing:
                raise FileNotFoundError(
                    f"lizard: images {missing[:5]} listed in info.csv are not in {image_dirs}"
                )
        if not names:
            raise FileNotFoundError(f"lizard: no .png images in {[str(d) for d in image_dirs]}")
        self._images = [images[n] for n in names]
        self._labels = [label_dir / f"{n}.mat" for n in names]
        for lab in self._labels:
            if not lab.is_file():
                raise FileNotFoundError(f"lizard: label file {str(lab)!r} does not exist")
        self._ids = [f"lizard/{split}/{n}" for n in names]

    @staticmethod
    def _read_info(path: Path) -> dict[str, int]:
        if not path.is_file():
            return {}
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"Filename", "Split"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected columns Filename and Split, got {reader.fieldnames}")
            out = {}
            for row in reader:
                try:
                    out[row["Filename"].strip()] = int(row["Split"])
                except ValueError:
                    raise ValueError(f"{path}: Split must be an integer, got {row['Split']!r}") from None
            return out

    def _load(self, i: int) -> Sample:
        path = self._labels[i]
        image = read_image(self._images[i])
        m = load_mat(path, ("inst_map", "id", "class"))
        inst = as_label_map(m["inst_map"], path, "inst_map")
        check_same_shape(image, inst, path, "inst_map")
        ids = as_label_map(np.asarray(m["id"]).reshape(-1, 1), path, "id")[:, 0]
        classes = as_label_map(np.asarray(m["class"]).reshape(-1, 1), path, "class")[:, 0]
        check_class_range(classes, len(LIZARD_CLASSES), path, allow_zero=False)
        types = types_from_instances(inst, ids, classes, path)
        _, points, labels = instance_points(inst, types)
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            inst_map=inst,
            type_map=types,
            points=points,
            point_labels=labels,
            class_names=self.class_names,
            tissue="colon",
        )
