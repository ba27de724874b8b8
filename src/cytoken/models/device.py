"""Choosing a torch device: CPU by default, CUDA/MPS only when present and asked for."""

from __future__ import annotations

import torch

from cytoken.types import CytokenError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``cpu`` (default), ``cuda``, ``mps`` or ``auto``; asking for an absent accelerator is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CytokenError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CytokenError("device 'mps' was asked for but MPS is not available; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise CytokenError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or auto")
    return torch.device(name)
