"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cytoken.types import CytokenError, validate_mpp
from cytoken.weights import ModelInfo


def mpp_arg(text: str) -> float:
    """Argparse type for µm/px values (0.05-5)."""
    try:
        return validate_mpp(float(text))
    except ValueError as exc:  # argparse names the option itself: drop validate_mpp's "--mpp: " prefix
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--mpp: ")) from None


def positive_int(text: str) -> int:
    """Argparse type for integers >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """Argparse type for numbers > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def load_model_or_fail(name: str):
    """Load a model by name or path (clear error otherwise)."""
    from cytoken.models.store import load_model

    try:
        return load_model(name)
    except CytokenError:
        raise
    except (KeyError, ValueError) as exc:
        raise CytokenError(str(exc)) from None


def hover_config_arg(path: str | None):
    """``--hover-config FILE``: a :class:`~cytoken.postprocess.HoverConfig` read from YAML/JSON, or None."""
    if path is None:
        return None
    from cytoken.postprocess import HoverConfig

    try:
        return HoverConfig.from_file(path)
    except ValueError as exc:
        raise CytokenError(str(exc)) from None


def cell_classifier(choice: str | None, info: ModelInfo, model: Any, *, embeddings: str = "mask") -> Any:
    """The classifier bundle a run applies: ``--classifier`` if given, else the model's default (if any).

    ``"none"`` (or a model without a default) gives ``None``: classes come from the model's type head. A default
    classifier is skipped when the run makes no embeddings; an explicitly given one is then an error.
    """
    if choice is not None and choice.lower() == "none":
        return None
    path = choice or info.classifier
    if path is None:
        return None
    if embeddings == "none":
        if choice is None:
            return None
        raise CytokenError("--classifier needs embeddings; drop --embeddings none")
    from cytoken.classify import check_compatible, load_bundle

    bundle = load_bundle(Path(path))
    check_compatible(bundle, info.sha256, model.encoder.spec.embed_dim)
    return bundle
