"""Lightweight cell classifier on cached per-cell token embeddings.

CellViT++'s idea: segment once with a frozen model, then train a tiny MLP on the cached per-cell tokens.

Layer 3. Public names are loaded lazily, so ``import cytoken.classify.dataset`` (torch-free helpers that build
a labelled set) and the numpy metrics do not import torch; the model, trainers, search and bundles do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cytoken.classify.bundle import ClassifierBundle, check_compatible, load_bundle, save_bundle
    from cytoken.classify.config import MAX_EPOCHS, TrainConfig
    from cytoken.classify.dataset import (
        GroupSplit,
        InstanceMatch,
        LabelledCells,
        PointMatch,
        label_cells_from_masks,
        match_instances,
        match_points,
        read_split_file,
        split_by_group,
        split_from_files,
    )
    from cytoken.classify.evaluation import (
        ClassificationReport,
        auroc_per_class,
        confusion_matrix,
        evaluate,
        macro_auroc,
        plot_confusion,
    )
    from cytoken.classify.model import CellClassifier, init_parameters
    from cytoken.classify.search import SearchResult, search
    from cytoken.classify.trainer import TrainedClassifier, train_classifier, train_many

_EXPORTS = {
    "ClassifierBundle": "bundle",
    "check_compatible": "bundle",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "MAX_EPOCHS": "config",
    "TrainConfig": "config",
    "GroupSplit": "dataset",
    "InstanceMatch": "dataset",
    "LabelledCells": "dataset",
    "PointMatch": "dataset",
    "label_cells_from_masks": "dataset",
    "match_instances": "dataset",
    "match_points": "dataset",
    "read_split_file": "dataset",
    "split_by_group": "dataset",
    "split_from_files": "dataset",
    "ClassificationReport": "evaluation",
    "auroc_per_class": "evaluation",
    "confusion_matrix": "evaluation",
    "evaluate": "evaluation",
    "macro_auroc": "evaluation",
    "plot_confusion": "evaluation",
    "CellClassifier": "model",
    "init_parameters": "model",
    "SearchResult": "search",
    "search": "search",
    "TrainedClassifier": "trainer",
    "train_classifier": "trainer",
    "train_many": "trainer",
}

__all__ = [
    "MAX_EPOCHS",
    "CellClassifier",
    "ClassificationReport",
    "ClassifierBundle",
    "GroupSplit",
    "InstanceMatch",
    "LabelledCells",
    "PointMatch",
    "SearchResult",
    "TrainConfig",
    "TrainedClassifier",
    "auroc_per_class",
    "check_compatible",
    "confusion_matrix",
    "evaluate",
    "init_parameters",
    "label_cells_from_masks",
    "load_bundle",
    "macro_auroc",
    "match_instances",
    "match_points",
    "plot_confusion",
    "read_split_file",
    "save_bundle",
    "search",
    "split_by_group",
    "split_from_files",
    "train_classifier",
    "train_many",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cytoken.classify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cytoken.classify.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
