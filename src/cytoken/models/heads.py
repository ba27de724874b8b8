"""Output heads: 1×1 convolutions from branch features to nuclei, HV and type maps, and a tissue classifier."""

from __future__ import annotations

from typing import Literal

import torch
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
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_types: int = 0,
        tissue_in: int = 0,
        num_tissue: int = 0,
        hv_activation: Literal["tanh", "identity"] = "tanh",
    ) -> None:
        super().__init__()
        if num_types == 1:
            raise ValueError("num_types counts background too: use 0 (no type head) or >= 2")
        self.nuclei = nn.Conv2d(in_channels, 2, 1)
        self.hv = nn.Conv2d(in_channels, 2, 1)
        self.types = nn.Conv2d(in_channels, num_types, 1) if num_types else None
        self.tissue = nn.Linear(tissue_in, num_tissue) if (num_tissue and tissue_in) else None
        self.hv_activation = hv_activation

    def forward(
        self, feats: dict[str, torch.Tensor], global_feat: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return (nuclei logits, hv, type logits or None, tissue logits or None)."""
        hv = self.hv(feats["hv"])
        if self.hv_activation == "tanh":
            hv = torch.tanh(hv)
        types = self.types(feats["types"]) if self.types is not None else None
        tissue = self.tissue(global_feat) if (self.tissue is not None and global_feat is not None) else None
        return self.nuclei(feats["nuclei"]), hv, types, tissue
