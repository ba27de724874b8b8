"""A DPT-style decoder (Ranftl et al. 2021): reassemble token grids into a feature pyramid, fuse top-down.

This is the alternative to the UNETR decoder used with UNI in the seed pipeline. Reassembly projects each of the
four token grids (stride p) to strides 4, 8, 16 and 32 (relative to 16-px tokens); fusion blocks with residual conv
units merge them from coarse to fine; a light full-resolution image stem sharpens boundaries; one small conv block
per branch specialises the shared features for its head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.blocks import Conv2DBlock
from cytoken.models.decoders.unetr import BRANCHES

__all__ = ["DptDecoder"]


class _ResidualConvUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.skip_unit = _ResidualConvUnit(c)
        self.unit = _ResidualConvUnit(c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)


class DptDecoder(nn.Module):
    """DPT decoder over 4 token grids (B, D, h, w) and the input image.

    Args:
        embed_dim: encoder width D.
        in_chans: input image channels.
        features: fusion width.
        reassemble: per-level projection widths before resampling.
        out_channels: width of each branch's output features.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        in_chans: int = 3,
        features: int = 128,
        reassemble: tuple[int, int, int, int] = (64, 128, 256, 256),
        out_channels: int = 32,
    ) -> None:
        super().__init__()
        d = embed_dim
        r = reassemble
        self.out_stride = 1
        self.out_channels = out_channels
        self.resample = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(d, r[0], 1), nn.ConvTranspose2d(r[0], r[0], 4, stride=4)),
                nn.Sequential(nn.Conv2d(d, r[1], 1), nn.ConvTranspose2d(r[1], r[1], 2, stride=2)),
                nn.Conv2d(d, r[2], 1),
                nn.Sequential(nn.Conv2d(d, r[3], 1), nn.Conv2d(r[3], r[3], 3, stride=2, padding=1)),
            ]
        )
        self.project = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in r)
        self.fusion = nn.ModuleList(_Fusion(features) for _ in range(4))
        self.head = nn.Sequential(nn.Conv2d(features, features // 2, 3, padding=1), nn.ReLU(inplace=True))
        self.stem = Conv2DBlock(in_chans, 16)
        self.merge = Conv2DBlock(features // 2 + 16, out_channels)
        self.branches = nn.ModuleDict({n: Conv2DBlock(out_channels, out_channels) for n in BRANCHES})

    def forward(
        self, image: torch.Tensor, skips: list[torch.Tensor], out_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Decode to per-branch features at ``out_size``."""
        levels = [proj(res(z)) for res, proj, z in zip(self.resample, self.project, skips)]
        x = self.fusion[3](levels[3])
        x = self.fusion[2](x, levels[2])
        x = self.fusion[1](x, levels[1])
        x = self.fusion[0](x, levels[0])  # stride 2 relative to 16-px tokens
        x = F.interpolate(self.head(x), size=out_size, mode="bilinear", align_corners=False)
        stem = self.stem(image)
        if stem.shape[-2:] != tuple(out_size):
            stem = F.interpolate(stem, size=out_size, mode="bilinear", align_corners=False)
        f = self.merge(torch.cat([x, stem], dim=1))
        return {n: self.branches[n](f) for n in BRANCHES}
