"""Encoder interface and registry.

Every encoder returns an :class:`EncoderFeatures`: four skip feature grids from four depths (1-based
``skip_depths``), the last-layer token grid (B, D, H/p, W/p) used for cell embeddings, and an optional global token
(class token) for a tissue head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cytoken.registry import Registry

__all__ = ["ENCODERS", "Encoder", "EncoderFeatures", "EncoderSpec", "build_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    """What a pipeline needs to know about an encoder.

    Attributes:
        name: registry name.
        patch_size: token size in input pixels (16, or 14 for Virchow).
        embed_dim: token width D.
        depth: number of transformer blocks.
        skip_depths: 1-based block indices whose outputs feed the decoder (4 of them, shallow to deep).
        mean: per-channel input normalisation mean (applied to [0, 1] RGB).
        std: per-channel input normalisation std.
        native_mpp: µm/px the weights were trained at.
        in_chans: number of input channels.
        num_prefix_tokens: class + register tokens.
    """

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    skip_depths: tuple[int, int, int, int]
    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    native_mpp: float = 0.25
    in_chans: int = 3
    num_prefix_tokens: int = 1


@dataclass
class EncoderFeatures:
    """Encoder outputs: ``skips`` (4 × (B, D, h, w)), ``tokens`` (B, D, h, w) and ``cls`` (B, D) or None."""

    skips: list[torch.Tensor]
    tokens: torch.Tensor
    cls: torch.Tensor | None


class Encoder(nn.Module):
    """Base class: subclasses set ``self.spec`` and implement :meth:`forward`."""

    spec: EncoderSpec

    def forward(self, x: torch.Tensor) -> EncoderFeatures:  # pragma: no cover - abstract
        """Encode normalised images (B, C, H, W) with H, W multiples of ``spec.patch_size``."""
        raise NotImplementedError

    def tissue_features(self, feats: EncoderFeatures) -> torch.Tensor | None:
        """The vector a tissue head reads (the class token by default)."""
        return feats.cls


ENCODERS: Registry[Callable[..., Encoder]] = Registry("encoder")


def build_encoder(name: str, **kwargs: object) -> Encoder:
    """Build a registered encoder by name (``timm:<model>`` for any timm ViT).

    ``adapter={"kind": ..., ...}`` attaches a registered adapter after the encoder is built and its weights are
    loaded (see :mod:`cytoken.models.adapters`).

    Example:
        >>> enc = build_encoder("vit_tiny_test")
        >>> enc.spec.patch_size
        16
    """
    from cytoken.models.encoders import zoo  # noqa: F401  (registers the builders)

    adapter = kwargs.pop("adapter", None)
    if name.lower().startswith("timm:"):
        from cytoken.models.encoders.timm_wrapper import build_timm_encoder

        enc = build_timm_encoder(name.split(":", 1)[1], **kwargs)  # type: ignore[arg-type]
    else:
        enc = ENCODERS.get(name)(**kwargs)
    if adapter is not None:
        from cytoken.models.adapters import attach_adapter

        enc = attach_adapter(enc, adapter)  # type: ignore[arg-type]
    return enc
