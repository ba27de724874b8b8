"""The model manifest: which weight sets cytoken knows, where they are, and what they are for.

Every weight set has an entry (tiatoolbox's ``pretrained_model.yaml`` idea): name, file, sha256, licence, input
µm/px, tile size and overlap, class names, training data and metrics. Embedded weights live in the package's
``zoo/`` folder. Layer 0: no torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["ModelEntry", "ModelInfo", "file_sha256", "get_entry", "list_models", "zoo_dir"]


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry (see ``zoo/manifest.json``)."""

    name: str
    file: str | None
    sha256: str | None
    licence: str
    description: str
    mpp: float = 0.25
    tile_size: int = 256
    overlap: int = 64
    class_names: tuple[str, ...] = ()
    training_data: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    card: str = ""
    version: str = ""
    postprocess: str = ""
    classifier: str | None = None

    @property
    def path(self) -> Path | None:
        """Local path of the embedded weights, or None."""
        return None if self.file is None else zoo_dir() / self.file

    @property
    def classifier_path(self) -> Path | None:
        """Folder of the model's default cell classifier bundle (applied to its embeddings), or None."""
        return None if self.classifier is None else zoo_dir() / self.classifier


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, recorded in every output (``run.json``, classifier bundles)."""

    name: str
    sha256: str
    source: str
    licence: str = "unknown"
    classifier: str | None = None  # folder of the model's default classifier bundle (embedded models only)


def zoo_dir() -> Path:
    """The package folder holding embedded weights and the manifest."""
    return Path(str(resources.files("cytoken") / "zoo"))


def list_models() -> list[ModelEntry]:
    """All manifest entries.

    Example:
        >>> any(e.name == "cytoken-default" for e in list_models())
        True
    """
    raw = json.loads((zoo_dir() / "manifest.json").read_text())
    out = []
    for item in raw["models"]:
        item = dict(item)
        item["class_names"] = tuple(item.get("class_names", ()))
        out.append(ModelEntry(**item))
    return out


def get_entry(name: str) -> ModelEntry:
    """The manifest entry called ``name``; an unknown name lists the known ones."""
    entries = {e.name: e for e in list_models()}
    if name not in entries:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))} (or pass a weights file)")
    return entries[name]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
