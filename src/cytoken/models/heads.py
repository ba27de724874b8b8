"""Output heads: 1×1 convolutions from branch features to nuclei, HV and type maps, and a tissue classifier."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HoverHeads"]


class HoverHeads(nn.Module):
    """Heads of a HoVer-style segmenter.

    Args:
        in_channels: width of the branch features.
        num_types: type classes including background (C + 1); 0 for no type head.
        tissue_in: width of the encoder's global feature; 0 for no tissue head.
        num_tissue: tissue classes (0 for no tissue head).
        hv_activation: ``"tanh"`` bounds the HV maps to [-1, 1] in training too; ``"identity"`` is CellViT's linear
            output (cytoken clamps it to [-1, 1] at inference).
        token_types_in: width of the last-layer token grid for a token-level type head (0 = off). Its logits (a
            one-hidden-layer MLP per token, last layer zero-initialised) are bilinearly upsampled and added to the
            pixel-level type logits, so the class decision sees the encoder's context even when the decoder branch
            is narrow; the zero start leaves a model fine-tuned from weights without it unchanged at step 0.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_types: int = 0,
        tissue_in: int = 0,
        num_tissue: int = 0,
        hv_activation: Literal["tanh", "identity"] = "tanh",
        token_types_in: int = 0,
    ) -> None:
        super().__init__()
        if num_types == 1:
            raise ValueError("num_types counts background too: use 0 (no type head) or >= 2")
        self.nuclei = nn.Conv2d(in_channels, 2, 1)
        self.hv = nn.Conv2d(in_channels, 2, 1)
        self.types = nn.Conv2d(in_channels, num_types, 1) if num_types else None
        self.tissue = nn.Linear(tissue_in, num_tissue) if (num_tissue and tissue_in) else None
        self.hv_activation = hv_activation
        self.token_types: nn.Sequential | None = None
        if token_types_in and num_types:
            hidden = min(256, token_types_in)
            last = nn.Conv2d(hidden, num_types, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.token_types = nn.Sequential(nn.Conv2d(token_types_in, hidden, 1), nn.GELU(), last)

    def forward(
        self,
        feats: dict[str, torch.Tensor],
        global_feat: torch.Tensor | None,
        tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return (nuclei logits, hv, type logits or None, tissue logits or None)."""
        hv = self.hv(feats["hv"])
        if self.hv_activation == "tanh":
            hv = torch.tanh(hv)
        types = self.types(feats["types"]) if self.types is not None else None
        if types is not None and self.token_types is not None and tokens is not None:
            coarse = self.token_types(tokens)
            types = types + F.interpolate(coarse, size=types.shape[-2:], mode="bilinear", align_corners=False)
        tissue = self.tissue(global_feat) if (self.tissue is not None and global_feat is not None) else None
        return self.nuclei(feats["nuclei"]), hv, types, tissue
