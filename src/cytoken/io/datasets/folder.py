"""A generic folder of images and instance label maps, for users' own annotated data.

Layout read::

    root/[SPLIT/]images/NAME.(png|jpg|jpeg|tif|tiff)
    root/[SPLIT/]labels/NAME.png        uint16 (or uint8/int32 TIFF) instance map, 0 = background
    root/[SPLIT/]types/NAME.png         optional class map, 0 = background, 1..C

Without split folders (``root/images`` exists) the only split is ``"all"``; otherwise each sub-folder that
holds an ``images/`` folder is a split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cytoken.io.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    check_class_range,
    check_same_shape,
    instance_points,
    list_files,
    read_image,
    read_label_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample, validate_mpp

__all__ = ["ImageFolder"]


class ImageFolder(Dataset):
    """Images + instance maps (+ optional type maps) in plain folders.

    Args:
        root: the data folder.
        split: ``"all"`` when ``root/images`` exists, else the name of a sub-folder holding ``images/``.
        mpp: µm/px of the images (required: the files rarely record it reliably).
        class_names: names of classes 1..C of ``types/`` (required when ``types/`` exists).

    Example:
        >>> ds = ImageFolder("my_data", mpp=0.5)  # doctest: +SKIP
    """

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        *,
        mpp: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        require_dir(root, "folder data root")
        value = validate_mpp(mpp, source="folder dataset mpp (pass mpp=...)")
        if (root / "images").is_dir():
            available = ["all"]
        else:
            available = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
        split = resolve_split(split, available, "folder", root=root, expected="images/ and labels/")
        base = root if split == "all" else root / split
        images = list_files(base / "images", IMAGE_SUFFIXES, "folder images")
        label_dir = require_dir(base / "labels", "folder labels")
        type_dir = base / "types"
        has_types = type_dir.is_dir()
        if has_types and not class_names:
            raise ValueError(f"folder: {str(type_dir)!r} exists; pass class_names=[...] for its classes 1..C")
        super().__init__(root, split, class_names=tuple(class_names or ()), mpp=value)
        self._images = images
        self._labels = []
        self._types: list[Path | None] = []
        for p in images:
            lab = next(
                (
                    label_dir / f"{p.stem}{s}"
                    for s in (".png", ".tif", ".tiff")
                    if (label_dir / f"{p.stem}{s}").is_file()
                ),
                None,
            )
            if lab is None:
                raise FileNotFoundError(f"folder: no label file {p.stem}.png in {str(label_dir)!r}")
            self._labels.append(lab)
            if has_types:
                t = type_dir / f"{p.stem}.png"
                if not t.is_file():
                    raise FileNotFoundError(f"folder: type map {str(t)!r} does not exist")
                self._types.append(t)
            else:
                self._types.append(None)
        self._ids = [f"folder/{split}/{p.stem}" for p in images]

    def _load(self, i: int) -> Sample:
        image = read_image(self._images[i])
        inst = read_label_image(self._labels[i], "instance map")
        check_same_shape(image, inst, self._labels[i], "instance map")
        types = points = labels = None
        tpath = self._types[i]
        if tpath is not None:
            types = read_label_image(tpath, "type map")
            check_same_shape(image, types, tpath, "type map")
            check_class_range(types, len(self.class_names), tpath)
            _, pts, labs = instance_points(inst, types)
            keep = labs > 0
            points, labels = pts[keep], labs[keep]
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
