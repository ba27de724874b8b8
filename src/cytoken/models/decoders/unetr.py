"""CellViT's UNETR-style decoder: skips from four encoder depths plus the input image, one branch per output.

Module and parameter names follow CellViT (``decoder0``…``decoder3`` shared skip paths; per branch
``bottleneck_upsampler``, ``decoder3_upsampler``, ``decoder2_upsampler``, ``decoder1_upsampler``,
``decoder0_header``) so official checkpoints map one-to-one (see :mod:`cytoken.models.cellvit`). The final 1×1
convolution of each branch is a *head* (:class:`cytoken.models.heads.HoverHeads`), not part of the decoder.

Two CPU-oriented options, both off for CellViT checkpoints:
- ``shared=True``: one branch decoder feeds all heads (CellViT's "Shared" variants), a third of the cost.
- ``out_stride=2``: the last stage runs at half resolution and the heads' outputs are upsampled bilinearly, a quarter
  of the full-resolution cost; nuclei at 0.25 µm/px are still ≥ 10 px wide at that stride.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.blocks import Conv2DBlock, Deconv2DBlock

__all__ = ["BRANCHES", "UnetrDecoder", "UnetrWidths"]

BRANCHES = ("nuclei", "hv", "types")
# CellViT attribute name of each branch decoder.
CELLVIT_BRANCH_NAMES = {
    "nuclei": "nuclei_binary_map_decoder",
    "hv": "hv_map_decoder",
    "types": "nuclei_type_maps_decoder",
}


@dataclass(frozen=True)
class UnetrWidths:
    """Channel widths of the UNETR decoder.

    CellViT uses (256, 128, 312) skip/bottleneck widths for D < 512 and (512, 256, 512) above, with stage widths
    c0a=32, c0=64, c1=128, c2=256.
    """

    skip11: int
    skip12: int
    bottleneck: int
    c0a: int = 32
    c0: int = 64
    c1: int = 128
    c2: int = 256

    @classmethod
    def cellvit(cls, embed_dim: int) -> UnetrWidths:
        """CellViT's widths for an encoder of width ``embed_dim``."""
        return cls(256, 128, 312) if embed_dim < 512 else cls(512, 256, 512)

    @classmethod
    def scaled(cls, embed_dim: int, factor: float) -> UnetrWidths:
        """CellViT's widths multiplied by ``factor`` (at least 8 channels each)."""
        base = cls.cellvit(embed_dim)
        f = lambda c: max(8, round(c * factor))  # noqa: E731
        return cls(f(base.skip11), f(base.skip12), f(base.bottleneck), f(32), f(64), f(128), f(256))


class _Branch(nn.Module):
    def __init__(self, d: int, w: UnetrWidths, out_stride: int, dropout: float) -> None:
        super().__init__()
        b = w.bottleneck
        self.bottleneck_upsampler = nn.ConvTranspose2d(d, b, 2, stride=2)
        self.decoder3_upsampler = nn.Sequential(
            Conv2DBlock(2 * b, b, dropout=dropout),
            Conv2DBlock(b, b, dropout=dropout),
            Conv2DBlock(b, b, dropout=dropout),
            nn.ConvTranspose2d(b, w.c2, 2, stride=2),
        )
        self.decoder2_upsampler = nn.Sequential(
            Conv2DBlock(2 * w.c2, w.c2, dropout=dropout),
            Conv2DBlock(w.c2, w.c2, dropout=dropout),
            nn.ConvTranspose2d(w.c2, w.c1, 2, stride=2),
        )
        last: nn.Module = (
            nn.ConvTranspose2d(w.c1, w.c0, 2, stride=2) if out_stride == 1 else nn.Conv2d(w.c1, w.c0, 1)
        )
        self.decoder1_upsampler = nn.Sequential(
            Conv2DBlock(2 * w.c1, w.c1, dropout=dropout), Conv2DBlock(w.c1, w.c1, dropout=dropout), last
        )
        self.decoder0_header = nn.Sequential(
            Conv2DBlock(2 * w.c0, w.c0, dropout=dropout), Conv2DBlock(w.c0, w.c0, dropout=dropout)
        )

    def forward(self, z: list[torch.Tensor], d: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        b4 = self.bottleneck_upsampler(z[3])
        b3 = self.decoder3_upsampler(torch.cat([d[3], b4], dim=1))
        b2 = self.decoder2_upsampler(torch.cat([d[2], b3], dim=1))
        b1 = self.decoder1_upsampler(torch.cat([d[1], b2], dim=1))
        d0 = d[0]
        if b1.shape[-2:] != size:
            b1 = F.interpolate(b1, size=size, mode="bilinear", align_corners=False)
        if d0.shape[-2:] != size:
            d0 = F.interpolate(d0, size=size, mode="bilinear", align_corners=False)
        return self.decoder0_header(torch.cat([d0, b1], dim=1))


class UnetrDecoder(nn.Module):
    """UNETR decoder over 4 token grids (B, D, h, w) and the input image.

    Args:
        embed_dim: encoder width D.
        in_chans: input image channels.
        widths: channel widths (default: CellViT's for ``embed_dim``).
        shared: one branch decoder for all outputs instead of one per output.
        out_stride: 1 (full resolution, CellViT) or 2 (half-resolution last stage).
        dropout: dropout inside conv blocks (CellViT's ``drop_rate``).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        in_chans: int = 3,
        widths: UnetrWidths | None = None,
        shared: bool = False,
        out_stride: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if out_stride not in (1, 2):
            raise ValueError(f"out_stride must be 1 or 2, got {out_stride}")
        w = widths or UnetrWidths.cellvit(embed_dim)
        d = embed_dim
        self.out_stride = out_stride
        self.out_channels = w.c0
        self.decoder0 = nn.Sequential(
            Conv2DBlock(in_chans, w.c0a, stride=out_stride, dropout=dropout),
            Conv2DBlock(w.c0a, w.c0, dropout=dropout),
        )
        self.decoder1 = nn.Sequential(
            Deconv2DBlock(d, w.skip11, dropout=dropout),
            Deconv2DBlock(w.skip11, w.skip12, dropout=dropout),
            Deconv2DBlock(w.skip12, w.c1, dropout=dropout),
        )
        self.decoder2 = nn.Sequential(
            Deconv2DBlock(d, w.skip11, dropout=dropout), Deconv2DBlock(w.skip11, w.c2, dropout=dropout)
        )
        self.decoder3 = nn.Sequential(Deconv2DBlock(d, w.bottleneck, dropout=dropout))
        names = ("shared",) if shared else BRANCHES
        self.branches = nn.ModuleDict({n: _Branch(d, w, out_stride, dropout) for n in names})

    def forward(
        self, image: torch.Tensor, skips: list[torch.Tensor], out_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """Decode to per-branch feature maps at ``out_size / out_stride``.

        Args:
            image: the (normalised) encoder input (B, C, H', W').
            skips: four token grids (B, D, h, w), shallow to deep.
            out_size: the output size (H, W); features come out at (H/s, W/s).

        Returns:
            ``{"nuclei"|"hv"|"types": features}`` (the same tensor for all three when shared).
        """
        size = (out_size[0] // self.out_stride, out_size[1] // self.out_stride)
        d = [self.decoder0(image), self.decoder1(skips[0]), self.decoder2(skips[1]), self.decoder3(skips[2])]
        if "shared" in self.branches:
            f = self.branches["shared"](skips, d, size)
            return dict.fromkeys(BRANCHES, f)
        return {n: self.branches[n](skips, d, size) for n in BRANCHES}
