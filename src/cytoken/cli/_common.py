"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse

from cytoken.types import CytokenError, validate_mpp


def mpp_arg(text: str) -> float:
    """Argparse type for µm/px values (0.05-5)."""
    try:
        return validate_mpp(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """Argparse type for integers >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


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
