"""Saving and loading cytoken segmenters (one safetensors file with the config in its metadata)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from cytoken.io.atomic import atomic_path
from cytoken.models.config import SegmenterConfig, build_segmenter
from cytoken.models.segmenter import CellSegmenter
from cytoken.models.weights_io import WeightsError, load_state_dict_strict, read_state_dict
from cytoken.types import CytokenError
from cytoken.weights import ModelInfo, file_sha256, get_entry

__all__ = ["UntrainedModelWarning", "load_model", "load_segmenter", "save_segmenter"]

CONFIG_KEY = "cytoken.segmenter_config"


class UntrainedModelWarning(UserWarning):
    """The model in use has random weights: its results mean nothing."""


def save_segmenter(model: CellSegmenter, path: str | Path, *, half: bool = False, meta: dict | None = None) -> Path:
    """Write weights + config to one ``.safetensors`` file, atomically.

    Args:
        model: a segmenter built by :func:`build_segmenter` (it carries ``.config``).
        path: output file.
        half: store floating tensors as float16 (halves the size; loaded back as float32).
        meta: extra string metadata.
    """
    from safetensors.torch import save_file

    path = Path(path)
    config: SegmenterConfig = model.config  # type: ignore[assignment]
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = v.half() if (half and v.is_floating_point()) else v
    metadata = {CONFIG_KEY: config.model_dump_json(), **{k: str(v) for k, v in (meta or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_config(path: str | Path) -> SegmenterConfig:
    """The :class:`SegmenterConfig` stored in a cytoken weights file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    if CONFIG_KEY not in meta:
        raise WeightsError(
            f"{path} has no cytoken config in its metadata: it is not a cytoken segmenter file "
            "(CellViT checkpoints: use `cytoken models convert` or pass the .pth directly)"
        )
    return SegmenterConfig.model_validate(json.loads(meta[CONFIG_KEY]))


def load_segmenter(path: str | Path) -> CellSegmenter:
    """Load a segmenter written by :func:`save_segmenter` (strictly; float16 files come back as float32)."""
    config = read_config(path)
    if "pretrained" in config.encoder_kwargs:  # the file holds all weights: do not re-read the encoder's source
        config = config.model_copy(update={"encoder_kwargs": {k: v for k, v in config.encoder_kwargs.items()
                                                              if k != "pretrained"}})  # fmt: skip
    with torch.device("meta"):  # weights are assigned from the file: skip random initialisation
        model = build_segmenter(config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in read_state_dict(path).items()}
    load_state_dict_strict(model, state, what=f"segmenter in {path}", assign=True)
    return model.eval()


def load_model(name_or_path: str | Path) -> tuple[CellSegmenter, ModelInfo]:
    """Resolve a model name from the manifest, a cytoken ``.safetensors`` file or a CellViT ``.pth`` checkpoint.

    Returns:
        The model in eval mode and its :class:`ModelInfo` (name, sha256, source, licence).

    Raises:
        CytokenError: unknown name, missing file, or weights that do not fit the architecture.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".safetensors", ".pth", ".pt") or path.exists():
        if not path.is_file():
            raise CytokenError(f"model file not found: {path}")
        if path.suffix in (".pth", ".pt"):
            from cytoken.models.cellvit import load_cellvit_checkpoint

            model = load_cellvit_checkpoint(path)
        else:
            model = load_segmenter(path)
        return model, ModelInfo(name=path.stem, sha256=file_sha256(path), source=str(path))
    try:
        entry = get_entry(text)
    except KeyError as exc:
        raise CytokenError(str(exc.args[0])) from None
    if entry.path is None or not entry.path.is_file():
        raise CytokenError(f"model {entry.name!r} has no weights file in this installation ({entry.path})")
    model = load_segmenter(entry.path)
    if "untrained" in entry.description.lower():
        warnings.warn(
            f"model {entry.name!r} is an UNTRAINED PLACEHOLDER with random weights: results are meaningless",
            UntrainedModelWarning,
            stacklevel=2,
        )
    sha = file_sha256(entry.path)
    if entry.sha256 and sha != entry.sha256:
        raise CytokenError(f"embedded weights {entry.path} are corrupt: sha256 {sha} != manifest {entry.sha256}")
    classifier = None if entry.classifier_path is None else str(entry.classifier_path)
    info = ModelInfo(name=entry.name, sha256=sha, source=str(entry.path), licence=entry.licence, classifier=classifier)
    return model.eval(), info
