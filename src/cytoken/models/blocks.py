"""Convolution blocks with CellViT's parameter layout (``block.0`` conv, ``block.1`` BN, …)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv2DBlock", "Deconv2DBlock"]


class Conv2DBlock(nn.Module):
    """3×3 conv (with bias) → BatchNorm → ReLU → Dropout; keys ``block.0`` (conv), ``block.1`` (BN)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.block(x)


class Deconv2DBlock(nn.Module):
    """2× transposed conv → 3×3 conv → BatchNorm → ReLU → Dropout; keys ``block.0``, ``block.1``, ``block.2``."""

    def __init__(self, cin: int, cout: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, stride=2),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.block(x)
