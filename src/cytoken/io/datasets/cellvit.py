"""CellViT++ classifier-training dataset folders (detection or segmentation labels).

Layout read (CellViT++ README, "Re-training your own classifier")::

    root/label_map.yaml                 {id: name}; also label_map_det.yaml / label_map_seg.yaml
    root/splits/fold_K/{train,val}.csv  one image name (no extension) per line, names from train/
    root/{train,test}/images/NAME.png   (or .jpg)
    root/{train,test}/labels/NAME.csv   detection: rows x,y,label with labels starting at 0
    root/{train,test}/labels/NAME.npy   segmentation: a pickled dict {inst_map, type_map} (type_map from 1)

``labels_det/`` and ``labels_seg/`` folders (as in CellViT++'s NuCLS test fixture) are read as well, and
segmentation labels may also be ``.npz`` files with the arrays ``inst_map`` and ``type_map``.

Detection labels start at 0 (CellViT++ convention) and become 1..C here; segmentation classes are kept.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    as_label_map,
    check_class_range,
    check_same_shape,
    instance_points,
    list_files,
    natural_key,
    read_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample

__all__ = ["CellViTDataset", "read_label_map_yaml"]

Task = Literal["auto", "segmentation", "detection"]
_SEG_SUFFIXES = (".npy", ".npz")


def read_label_map_yaml(path: str | Path) -> dict[int, str]:
    """Read a CellViT++ ``label_map.yaml`` (``{int id: name}``), sorted by id.

    Raises:
        ValueError: when the file is not such a mapping.
    """
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of integer ids to class names")
    try:
        out = {int(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: keys must be integers, got {list(data)[:5]}") from None
    ids = sorted(out)
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] not in (0, 1):
        raise ValueError(f"{path}: ids must be consecutive from 0 or 1, got {ids}")
    return {k: out[k] for k in ids}


def _read_name_list(path: Path) -> list[str]:
    names = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if row and row[0].strip():
                names.append(Path(row[0].strip()).stem)
    return names


class CellViTDataset(Dataset):
    """A CellViT++ dataset folder (detection CSVs or segmentation ``.npy``/``.npz`` labels).

    Args:
        root: the dataset folder.
        split: ``"train"`` (all of ``train/``, or the fold's training list when ``fold`` is given), ``"val"``
            (needs ``fold``) or ``"test"``.
        fold: index K of ``splits/fold_K/`` to take the train/val lists from.
        task: ``"segmentation"``, ``"detection"`` or ``"auto"`` (segmentation labels when present).
        class_names: names of classes 1..C; default from the label-map yaml.
        mpp: µm/px of the images (CellViT++ folders do not record it), or None.
        allow_pickle: CellViT++ ``.npy`` labels are pickled dicts; unpickling runs code from the file, so only
            open folders you trust (``.npz`` labels need no pickle).

    Example:
        >>> ds = CellViTDataset("../shared/data/nucls_sample", "val", fold=0)  # doctest: +SKIP
        >>> ds.task, len(ds)  # doctest: +SKIP
        ('segmentation', 3)
    """

    name = "cellvit"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        fold: int | None = None,
        task: Task = "auto",
        class_names: tuple[str, ...] | list[str] | None = None,
        mpp: float | None = None,
        allow_pickle: bool = True,
    ) -> None:
        root = Path(root)
        require_dir(root, "cellvit data root")
        if task not in ("auto", "segmentation", "detection"):
            raise ValueError(f"cellvit: task must be 'auto', 'segmentation' or 'detection', got {task!r}")
        available = [s for s in ("train", "test") if (root / s / "images").is_dir()]
        if (root / "splits").is_dir() and "train" in available:
            available.append("val")
        split = resolve_split(split, available, "cellvit", root=root, expected="train/images, test/images")
        if split == "val" and fold is None:
            raise ValueError("cellvit: split 'val' needs a fold (fold=K reads splits/fold_K/val.csv)")
        self.task, label_dir = self._find_labels(root / ("test" if split == "test" else "train"), task)
        self.fold = fold
        self.allow_pickle = allow_pickle
        offset, names = self._class_names(root, class_names)
        self._label_offset = offset
        super().__init__(root, split, class_names=names, mpp=mpp)
        images = list_files(
            root / ("test" if split == "test" else "train") / "images",
            (".png", ".jpg", ".jpeg"),
            "cellvit images",
        )
        by_name = {p.stem: p for p in images}
        if fold is not None and split in ("train", "val"):
            list_path = root / "splits" / f"fold_{fold}" / f"{split}.csv"
            if not list_path.is_file():
                folds = sorted(p.name for p in (root / "splits").glob("fold_*"))
                raise FileNotFoundError(
                    f"cellvit: split list {str(list_path)!r} does not exist (found {folds})"
                )
            wanted = _read_name_list(list_path)
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise FileNotFoundError(
                    f"cellvit: images {missing[:5]} listed in {list_path} are not in images/"
                )
            names_sel = wanted
        else:
            names_sel = sorted(by_name, key=natural_key)
        self._images = [by_name[n] for n in names_sel]
        suffixes = _SEG_SUFFIXES if self.task == "segmentation" else (".csv",)
        self._labels = []
        for n in names_sel:
            lab = next((label_dir / f"{n}{s}" for s in suffixes if (label_dir / f"{n}{s}").is_file()), None)
            if lab is None:
                raise FileNotFoundError(
                    f"cellvit: no label file {n}{'/'.join(suffixes)} in {str(label_dir)!r}"
                )
            self._labels.append(lab)
        tag = split if fold is None or split == "test" else f"fold{fold}-{split}"
        self._ids = [f"cellvit/{tag}/{n}" for n in names_sel]

    @staticmethod
    def _find_labels(base: Path, task: Task) -> tuple[str, Path]:
        """(task, label folder) for a split folder."""
        cands: list[tuple[str, Path]] = []
        plain = base / "labels"
        if plain.is_dir():
            kinds = {p.suffix.lower() for p in plain.iterdir() if p.is_file()}
            if kinds & set(_SEG_SUFFIXES):
                cands.append(("segmentation", plain))
            if ".csv" in kinds:
                cands.append(("detection", plain))
        if (base / "labels_seg").is_dir():
            cands.append(("segmentation", base / "labels_seg"))
        if (base / "labels_det").is_dir():
            cands.append(("detection", base / "labels_det"))
        for kind, folder in cands:
            if task in ("auto", kind):
                return kind, folder
        want = "labels" if task == "auto" else f"{task} labels"
        raise FileNotFoundError(
            f"cellvit: no {want} in {str(base)!r} (expected labels/, labels_seg/ or labels_det/)"
        )

    def _class_names(
        self, root: Path, given: tuple[str, ...] | list[str] | None
    ) -> tuple[int, tuple[str, ...]]:
        """(offset added to file labels to get 1..C, class names)."""
        default_offset = 1 if self.task == "detection" else 0
        if given is not None:
            return default_offset, tuple(given)
        kind = "det" if self.task == "detection" else "seg"
        for path in (root / f"label_map_{kind}.yaml", root / "label_map.yaml"):
            if path.is_file():
                lm = read_label_map_yaml(path)
                first = next(iter(lm))
                return (1 if first == 0 else 0), tuple(lm.values())
        raise FileNotFoundError(
            f"cellvit: no label_map.yaml (or label_map_{kind}.yaml) in {str(root)!r}; pass class_names="
        )

    def _load(self, i: int) -> Sample:
        path = self._labels[i]
        image = read_image(self._images[i])
        n_cls = len(self.class_names)
        if self.task == "detection":
            points, labels = self._read_csv(path)
            labels = labels + self._label_offset
            check_class_range(labels, n_cls, path, allow_zero=False)
            return Sample(
                image=image,
                mpp=self.mpp,
                source_id=self._ids[i],
                points=points,
                point_labels=labels,
                class_names=self.class_names,
            )
        inst, types = self._read_seg(path)
        check_same_shape(image, inst, path, "inst_map")
        check_same_shape(image, types, path, "type_map")
        if self._label_offset:
            types = np.where(inst > 0, types + self._label_offset, 0).astype(np.int32)
        check_class_range(types, n_cls, path)
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

    def _read_seg(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            obj = np.load(path, allow_pickle=self.allow_pickle)
            data = (
                obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
            )
        if not isinstance(data, dict) or "inst_map" not in data or "type_map" not in data:
            keys = list(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: expected a dict with 'inst_map' and 'type_map', got {keys}")
        return as_label_map(data["inst_map"], path, "inst_map"), as_label_map(
            data["type_map"], path, "type_map"
        )

    @staticmethod
    def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
        pts, labs = [], []
        with path.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 3:
                    raise ValueError(f"{path}:{line}: expected x,y,label, got {row}")
                try:
                    x, y, lab = float(row[0]), float(row[1]), float(row[2])
                except ValueError:
                    if line == 1:  # header
                        continue
                    raise ValueError(f"{path}:{line}: expected numbers x,y,label, got {row}") from None
                if lab != int(lab):
                    raise ValueError(f"{path}:{line}: label {row[2]!r} is not an integer")
                pts.append((x, y))
                labs.append(int(lab))
        return np.asarray(pts, np.float64).reshape(-1, 2), np.asarray(labs, np.int64)
