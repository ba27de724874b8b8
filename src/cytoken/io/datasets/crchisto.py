"""CRCHistoPhenotypes (Sirinukunwattana et al. 2016): 500x500 colorectal H&E at 20x, nucleus points.

Layout read (the staged copy in ``../shared/data/crchisto``)::

    root/images/imgN.png
    root/points_classified.csv     image,class,x,y   (MATLAB 1-based, x = column)
    root/split.csv                 image,split       (optional: train / validation)
    root/labels_mat/imgN/imgN_{epithelial,fibroblast,inflammatory,others}.mat   (used when the CSV is absent)

Points only (no masks). Coordinates are converted to 0-based by subtracting 1; the few points annotated just
outside the image (< 1 px) are clipped onto its edge. The images are 20x; their µm/px
is not stated in the dataset's Readme, 0.55 is the commonly quoted value (resample to the model's µm/px).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    list_files,
    load_mat,
    natural_key,
    read_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample

__all__ = ["CRCHISTO_CLASSES", "CRCHISTO_MPP", "CRCHisto"]

CRCHISTO_CLASSES = ("epithelial", "fibroblast", "inflammatory", "others")
CRCHISTO_MPP = 0.55


def _clip_to_image(points: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """Clip points lying less than 1 px beyond the image edges onto them; farther out is an error.

    5 of the 17,801 published points lie up to 0.85 px outside the 500x500 images (annotation on the border).
    """
    h, w = shape[:2]
    lo = np.array([-0.5, -0.5])
    hi = np.array([w - 0.5, h - 0.5])
    far = np.any((points < lo - 1.0) | (points > hi + 1.0), axis=1)
    if far.any():
        raise ValueError(f"{path}: {int(far.sum())} labelled points fall outside the {w}x{h} image")
    return np.clip(points, lo, hi)


class CRCHisto(Dataset):
    """CRCHistoPhenotypes classified nucleus points (4 classes, 20x).

    Args:
        root: data folder (``images/``, ``points_classified.csv`` or ``labels_mat/``, optional ``split.csv``).
        split: a split named in ``split.csv`` (``"train"``, ``"validation"``) or ``"all"``.
        mpp: µm/px to report (default 0.55).

    Samples carry ``points`` (0-based x, y) and ``point_labels`` (1..4); no masks.

    Example:
        >>> ds = CRCHisto("../shared/data/crchisto", split="validation")  # doctest: +SKIP
        >>> len(ds)  # doctest: +SKIP
        10
    """

    name = "crchisto"

    def __init__(self, root: str | Path, split: str = "train", *, mpp: float = CRCHISTO_MPP) -> None:
        root = Path(root)
        require_dir(root, "crchisto data root")
        images = list_files(root / "images", (".png", ".bmp", ".tif"), "crchisto images")
        by_name = {p.stem: p for p in images}
        split_of = self._read_split(root / "split.csv")
        available = ["all", *sorted(set(split_of.values()))]
        split = resolve_split(split, available, "crchisto", root=root)
        super().__init__(root, split, class_names=CRCHISTO_CLASSES, mpp=mpp)
        if split == "all":
            names = sorted(by_name, key=natural_key)
        else:
            names = sorted((n for n, s in split_of.items() if s == split), key=natural_key)
            missing = [n for n in names if n not in by_name]
            if missing:
                raise FileNotFoundError(
                    f"crchisto: images {missing[:5]} listed in split.csv are not in images/"
                )
        self._images = [by_name[n] for n in names]
        self._names = names
        csv_path = root / "points_classified.csv"
        self._points: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        if csv_path.is_file():
            self._points = self._read_points_csv(csv_path)
        elif not (root / "labels_mat").is_dir():
            raise FileNotFoundError(
                f"crchisto: neither {str(csv_path)!r} nor {str(root / 'labels_mat')!r} exists "
                "(one of them holds the point labels)"
            )
        self._ids = [f"crchisto/{split}/{n}" for n in names]

    @staticmethod
    def _read_split(path: Path) -> dict[str, str]:
        if not path.is_file():
            return {}
        with path.open(newline="") as f:
            return {row["image"].strip(): row["split"].strip() for row in csv.DictReader(f)}

    @staticmethod
    def _read_points_csv(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
        labs: dict[str, list[int]] = defaultdict(list)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "class", "x", "y"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected columns image,class,x,y, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                cls = row["class"].strip().lower()
                if cls not in CRCHISTO_CLASSES:
                    raise ValueError(
                        f"{path}:{line}: class {row['class']!r} is not one of {CRCHISTO_CLASSES}"
                    )
                pts[row["image"].strip()].append((float(row["x"]) - 1.0, float(row["y"]) - 1.0))
                labs[row["image"].strip()].append(CRCHISTO_CLASSES.index(cls) + 1)
        return {
            k: (np.asarray(pts[k], np.float64).reshape(-1, 2), np.asarray(labs[k], np.int64)) for k in pts
        }

    def _points_from_mat(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        folder = self.root / "labels_mat" / name
        pts, labs = [], []
        for c, cls in enumerate(CRCHISTO_CLASSES, start=1):
            path = folder / f"{name}_{cls}.mat"
            if not path.is_file():
                raise FileNotFoundError(f"crchisto: label file {str(path)!r} does not exist")
            d = np.asarray(load_mat(path, ("detection",))["detection"], np.float64).reshape(-1, 2)
            pts.append(d - 1.0)
            labs.append(np.full(len(d), c, np.int64))
        return np.concatenate(pts), np.concatenate(labs)

    def _load(self, i: int) -> Sample:
        name = self._names[i]
        image = read_image(self._images[i])
        if self._points is not None:
            points, labels = self._points.get(name, (np.zeros((0, 2)), np.zeros(0, np.int64)))
        else:
            points, labels = self._points_from_mat(name)
        points = _clip_to_image(points, image.shape[:2], self._images[i])
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            points=points.copy(),
            point_labels=labels.copy(),
            class_names=self.class_names,
        )
