"""Dataset adapters: each public nucleus dataset read as a lazy list of :class:`cytoken.types.Sample`.

Use :func:`open_dataset` with a registered name (``DATASETS.names()``), a data folder and an explicit split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cytoken.io.datasets.base import Dataset, instance_points
from cytoken.io.datasets.cellvit import CellViTDataset, read_label_map_yaml
from cytoken.io.datasets.consep import CONSEP_CLASSES_ORIGINAL, Consep
from cytoken.io.datasets.consep_patched import CONSEP_CLASSES, ConsepPatched, consep_source_tile
from cytoken.io.datasets.crchisto import CRCHISTO_CLASSES, CRCHisto
from cytoken.io.datasets.folder import ImageFolder
from cytoken.io.datasets.lizard import LIZARD_CLASSES, Lizard
from cytoken.io.datasets.monuseg import MoNuSeg, rasterize_polygons, read_aperio_xml
from cytoken.io.datasets.pannuke import PANNUKE_CLASSES, PanNuke, pannuke_maps
from cytoken.io.datasets.qupath import QuPathFolder, read_qupath_geojson
from cytoken.io.datasets.segpath import SegPath
from cytoken.registry import Registry

__all__ = [
    "CONSEP_CLASSES",
    "CONSEP_CLASSES_ORIGINAL",
    "CRCHISTO_CLASSES",
    "DATASETS",
    "LIZARD_CLASSES",
    "PANNUKE_CLASSES",
    "CRCHisto",
    "CellViTDataset",
    "Consep",
    "ConsepPatched",
    "Dataset",
    "ImageFolder",
    "Lizard",
    "MoNuSeg",
    "PanNuke",
    "QuPathFolder",
    "SegPath",
    "consep_source_tile",
    "instance_points",
    "open_dataset",
    "pannuke_maps",
    "rasterize_polygons",
    "read_aperio_xml",
    "read_label_map_yaml",
    "read_qupath_geojson",
]

DATASETS: Registry[type[Dataset]] = Registry("dataset")
for _cls in (
    MoNuSeg,
    ConsepPatched,
    Consep,
    PanNuke,
    Lizard,
    CRCHisto,
    CellViTDataset,
    SegPath,
    ImageFolder,
    QuPathFolder,
):
    DATASETS.register(_cls.name)(_cls)
del _cls


def open_dataset(name: str, root: str | Path, split: str | None = None, **kwargs: Any) -> Dataset:
    """Open one split of a registered dataset.

    Args:
        name: adapter name, one of ``DATASETS.names()`` (case-insensitive).
        root: the dataset folder.
        split: the split to read (default: the adapter's default, usually ``"train"``; ``"fold1"`` for
            PanNuke, ``"all"`` for Lizard and ``"folder"``); an unknown split raises ValueError listing the
            available ones.
        **kwargs: adapter-specific options (e.g. ``mpp=`` for ``"folder"``).

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: for an unknown dataset name or split.
        FileNotFoundError: when ``root`` does not have the dataset's layout.

    Example:
        >>> ds = open_dataset("monuseg", "../shared/data/monuseg", split="test")  # doctest: +SKIP
        >>> len(ds)  # doctest: +SKIP
        14
    """
    try:
        factory = DATASETS.get(name)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    if split is None:
        return factory(root, **kwargs)
    return factory(root, split=split, **kwargs)
