"""CoNSeP cut into 256x256 patches by a third party (the copy in ``../shared/data/consep_patched``).

Layout read::

    root/{train,test}/images/{split}_{tile}_{patch}.jpg     JPEG (lossy) RGB
    root/{train,test}/inst_maps/NAME.png                    uint16, original CoNSeP ids (not consecutive)
    root/{train,test}/type_maps/NAME.png                    uint8 0..4
    root/{train,test}/type_mat/NAME.mat                     optional: inst_type (N,1), inst_centroid (N,2) x,y

Classes are HoVer-Net's merged CoNSeP classes: 1 other, 2 inflammatory, 3 epithelial, 4 spindle-shaped.
Patches of one source tile overlap, so split by :attr:`ConsepPatched.groups` (the source tile) to avoid
leakage.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    as_label_map,
    check_class_range,
    check_same_shape,
    instance_points,
    list_files,
    optional_mpp,
    read_image,
    read_label_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample

__all__ = ["CONSEP_CLASSES", "CONSEP_MPP", "ConsepPatched", "consep_source_tile"]

CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")
CONSEP_MPP = 0.25
_NAME_RE = re.compile(r"^(?P<tile>.+)_(?P<patch>\d+)$")


def consep_source_tile(name: str) -> str:
    """The source-tile id of a patch name (``"train_10_003"`` -> ``"train_10"``); the name itself if no match.

    Example:
        >>> consep_source_tile("test_3_015")
        'test_3'
    """
    m = _NAME_RE.match(Path(name).stem)
    return m.group("tile") if m else Path(name).stem


class ConsepPatched(Dataset):
    """Patched CoNSeP (256x256 JPEG patches), splits ``train`` (432 patches, 27 tiles) and ``test`` (224, 14).

    Args:
        root: data folder holding ``train/`` and ``test/``.
        split: ``"train"`` or ``"test"``.
        mpp: µm/px to report instead of the dataset's nominal value (None keeps it).

    Samples carry ``inst_map``, ``type_map`` (0..4) and ``points``/``point_labels`` (instance centroids and
    classes, from ``type_mat/*.mat`` when present, else computed from the maps).

    Example:
        >>> ds = ConsepPatched("../shared/data/consep_patched", "train")  # doctest: +SKIP
        >>> ds.source_tiles[:2]  # doctest: +SKIP
        ['train_1', 'train_1']
    """

    name = "consep_patched"
    SPLITS = ("train", "test")

    def __init__(self, root: str | Path, split: str = "train", *, mpp: float | None = None) -> None:
        root = Path(root)
        require_dir(root, "consep_patched data root")
        available = [s for s in self.SPLITS if (root / s).is_dir()]
        split = resolve_split(split, available, "consep_patched", root=root, expected="{train,test}/images")
        super().__init__(
            root, split, class_names=CONSEP_CLASSES, mpp=optional_mpp(mpp, "consep_patched") or CONSEP_MPP
        )
        base = root / split
        self._images = list_files(base / "images", (".jpg", ".jpeg", ".png"), "consep_patched images")
        inst_dir = require_dir(base / "inst_maps", "consep_patched inst_maps")
        type_dir = require_dir(base / "type_maps", "consep_patched type_maps")
        mat_dir = base / "type_mat"
        self._inst = [inst_dir / f"{p.stem}.png" for p in self._images]
        self._type = [type_dir / f"{p.stem}.png" for p in self._images]
        self._mat = [mat_dir / f"{p.stem}.mat" for p in self._images]
        for lab in (*self._inst, *self._type):
            if not lab.is_file():
                raise FileNotFoundError(f"consep_patched: label file {str(lab)!r} does not exist")
        self._ids = [f"consep_patched/{split}/{p.stem}" for p in self._images]
        self._tiles = [consep_source_tile(p.stem) for p in self._images]

    @property
    def source_tiles(self) -> list[str]:
        """Source CoNSeP tile of each patch (``"train_10"``): patches of one tile overlap."""
        return list(self._tiles)

    @property
    def groups(self) -> list[str]:
        """Group key per patch for leakage-free splits: the source tile."""
        return self.source_tiles

    def _load(self, i: int) -> Sample:
        image = read_image(self._images[i])
        inst = read_label_image(self._inst[i], "instance map")
        types = read_label_image(self._type[i], "type map")
        check_same_shape(image, inst, self._inst[i], "instance map")
        check_same_shape(image, types, self._type[i], "type map")
        check_class_range(types, len(CONSEP_CLASSES), self._type[i])
        points, labels = self._points(i, inst, types)
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            inst_map=inst,
            type_map=types,
            points=points,
            point_labels=labels,
            class_names=self.class_names,
        )

    def _points(self, i: int, inst: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, cents, labels = instance_points(inst, types)
        mat = self._mat[i]
        if mat.is_file():
            from scipy.io import loadmat

            m = loadmat(mat)
            if "inst_type" in m and "inst_centroid" in m:
                t = as_label_map(np.asarray(m["inst_type"]).reshape(-1, 1), mat, "inst_type")[:, 0]
                c = np.asarray(m["inst_centroid"], np.float64).reshape(-1, 2)
                if len(t) == len(ids) == len(c):
                    check_class_range(t, len(CONSEP_CLASSES), mat, allow_zero=False)
                    return c, t.astype(np.int64)
        keep = labels > 0
        return cents[keep], labels[keep]
