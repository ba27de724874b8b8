"""SegPath (Komura et al. 2023, Patterns): H&E tiles paired with registered, IF-derived binary masks.

Each antibody/cell type is a separate download (Zenodo): a folder of tiles and a metadata CSV::

    root/panCK_Epithelium/NAME_HE.png      H&E tile (RGB)
    root/panCK_Epithelium/NAME_mask.png    registered binary mask of marker-positive pixels (0 / non-zero)
    root/panCK_fileinfo.csv                filename (relative to root, ..._HE.png), train_val_test, ...

Other folders: aSMA_SmoothMuscle, CD235a_RBC, CD3CD20_Lymphocyte, CD45RB_Leukocyte, ERG_Endothelium,
MIST1_PlasmaCell, MNDA_MyeloidCell. Splits come from the ``train_val_test`` column of the ``*_fileinfo.csv``
files (``"train"``, ``"val"``, ``"test"``); ``"all"`` lists every tile pair on disk.

Samples carry ``type_map`` = the binary mask (1 = marker-positive) and no instances: the masks are pixel
labels of a marker, not nucleus outlines.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    check_same_shape,
    natural_key,
    read_image,
    read_label_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample, validate_mpp

__all__ = ["SEGPATH_FOLDERS", "SegPath"]

SEGPATH_FOLDERS = (
    "aSMA_SmoothMuscle",
    "CD235a_RBC",
    "CD3CD20_Lymphocyte",
    "CD45RB_Leukocyte",
    "ERG_Endothelium",
    "MIST1_PlasmaCell",
    "MNDA_MyeloidCell",
    "panCK_Epithelium",
)
_HE, _MASK = "_HE.png", "_mask.png"


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


class SegPath(Dataset):
    """SegPath H&E tiles with IF-derived binary masks.

    Args:
        root: folder holding one or more antibody folders (and their ``*_fileinfo.csv``).
        split: ``"train"``, ``"val"``, ``"test"`` (needs the fileinfo CSVs) or ``"all"``.
        antibodies: restrict to these folders, by full name (``"panCK_Epithelium"``) or antibody prefix
            (``"panCK"``); default all present.
        mpp: µm/px of the tiles to report (the files do not record it), or None.

    Example:
        >>> ds = SegPath("segpath", split="train", antibodies=["panCK"])  # doctest: +SKIP
        >>> s = ds[0]; s.type_map.max() <= 1  # doctest: +SKIP
        True
    """

    name = "segpath"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        antibodies: Sequence[str] | None = None,
        mpp: float | None = None,
    ) -> None:
        root = Path(root)
        require_dir(root, "segpath data root")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob(f"*{_HE}")))
        if antibodies is not None:
            wanted = {a.lower() for a in antibodies}
            chosen = [
                f for f in folders if f.name.lower() in wanted or f.name.split("_")[0].lower() in wanted
            ]
            known = {f.name.lower() for f in chosen} | {f.name.split("_")[0].lower() for f in chosen}
            unknown = sorted(wanted - known)
            if unknown:
                names = [f.name for f in folders] or "(none)"
                raise ValueError(
                    f"segpath: antibodies {unknown} not found in {str(root)!r}; present: {names}"
                )
            folders = chosen
        if not folders:
            raise FileNotFoundError(
                f"segpath: no folder with *{_HE} tiles in {str(root)!r} (expected e.g. panCK_Epithelium/)"
            )
        split_of: dict[str, str] = {}
        for f in folders:
            prefix = f.name.split("_")[0]
            for cand in (
                root / f"{prefix}_fileinfo.csv",
                root / f"{f.name}_fileinfo.csv",
                f / f"{prefix}_fileinfo.csv",
            ):
                if cand.is_file():
                    for row in _read_csv_rows(cand):
                        fn, sp = row.get("filename", "").strip(), row.get("train_val_test", "").strip()
                        if fn and sp:
                            split_of[Path(fn).name] = sp
                    break
        available = ["all", *sorted(set(split_of.values()))]
        split = resolve_split(split, available, "segpath", root=root)
        super().__init__(root, split, class_names=("positive",), mpp=None)
        self.mpp = None if mpp is None else validate_mpp(mpp, source="segpath mpp")
        self._images: list[Path] = []
        self._masks: list[Path] = []
        self._ids = []
        for f in folders:
            for he in sorted(f.glob(f"*{_HE}"), key=natural_key):
                if split != "all" and split_of.get(he.name) != split:
                    continue
                mask = he.with_name(he.name[: -len(_HE)] + _MASK)
                if not mask.is_file():
                    raise FileNotFoundError(f"segpath: mask {str(mask)!r} for {he.name} does not exist")
                self._images.append(he)
                self._masks.append(mask)
                self._ids.append(f"segpath/{split}/{f.name}/{he.name[: -len(_HE)]}")
        self.antibodies = [f.name for f in folders]

    @property
    def markers(self) -> list[str]:
        """Antibody folder of each tile (``"panCK_Epithelium"``)."""
        return [p.parent.name for p in self._images]

    def _load(self, i: int) -> Sample:
        image = read_image(self._images[i])
        mask = read_label_image(self._masks[i], "mask")
        check_same_shape(image, mask, self._masks[i], "mask")
        values = np.unique(mask)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            raise ValueError(
                f"{self._masks[i]}: expected a binary mask (0 and one positive value), got {values[:6]}"
            )
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            type_map=(mask > 0).astype(np.int32),
            class_names=self.class_names,
        )
