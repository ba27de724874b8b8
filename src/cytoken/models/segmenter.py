"""The cell segmenter, built from parts: ``CellSegmenter(encoder, decoder, heads)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.encoders.base import Encoder
from cytoken.models.heads import HoverHeads

__all__ = ["CellSegmenter", "HoverOutput"]


@dataclass
class HoverOutput:
    """What a forward pass returns (all at the input's resolution except ``tokens``).

    Attributes:
        nuclei_logits: (B, 2, H, W); channel 1 is "nucleus".
        hv: (B, 2, H, W) horizontal (x) then vertical (y) distance maps, in [-1, 1] at inference.
        type_logits: (B, C + 1, H, W) with background in channel 0, or None without a type head.
        tissue_logits: (B, T) or None.
        tokens: (B, D, H/p, W/p) last-layer token grid (cell embeddings are pooled from it).
    """

    nuclei_logits: torch.Tensor
    hv: torch.Tensor
    type_logits: torch.Tensor | None
    tissue_logits: torch.Tensor | None
    tokens: torch.Tensor

    @property
    def nuclei_prob(self) -> torch.Tensor:
        """(B, 2, H, W) softmax of the nuclei logits."""
        return self.nuclei_logits.softmax(1)

    @property
    def type_prob(self) -> torch.Tensor | None:
        """(B, C + 1, H, W) softmax of the type logits, or None."""
        return None if self.type_logits is None else self.type_logits.softmax(1)


class CellSegmenter(nn.Module):
    """Encoder + decoder + heads.

    The input is a normalised float tensor (B, C, H, W) (see :meth:`preprocess`). When H or W is not a multiple of
    the encoder's patch size (e.g. 14-px Virchow tokens on 256-px tiles), the encoder and the decoder's image skip see
    an area-resized copy floored to the patch grid (256 → 252, 1024 → 1022, as CellViT-Virchow does), and the decoder
    resizes its last features back to H × W, so outputs always match the input.

    Example:
        >>> from cytoken.models import build_segmenter, SegmenterConfig
        >>> m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2)).eval()
        >>> out = m(torch.zeros(1, 3, 64, 64))
        >>> tuple(out.hv.shape), tuple(out.tokens.shape)
        ((1, 2, 64, 64), (1, 32, 4, 4))
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, heads: HoverHeads) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads

    @property
    def patch_size(self) -> int:
        """Token size in pixels."""
        return self.encoder.spec.patch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) or float [0, 1] (B, C, H, W) → normalised float (B, C, H, W)."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        spec = self.encoder.spec
        mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(spec.std, dtype=images.dtype, device=images.device)[:, None, None]
        return (images - mean) / std

    def forward(self, x: torch.Tensor) -> HoverOutput:
        """Run on a normalised batch (B, C, H, W)."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"input {h}x{w} is smaller than one {p}-px token")
        x_enc = x
        if h % p or w % p:
            x_enc = F.interpolate(x, size=(h // p * p, w // p * p), mode="area")
        feats = self.encoder(x_enc)
        branch = self.decoder(x_enc, feats.skips, (h, w))
        nuclei, hv, types, tissue = self.heads(branch, self.encoder.tissue_features(feats), feats.tokens)
        if nuclei.shape[-2:] != (h, w):
            # few channels: bilinear upsampling is several times faster on NCHW than on channels-last tensors
            up = lambda t: F.interpolate(t.contiguous(), size=(h, w), mode="bilinear", align_corners=False)  # noqa: E731
            nuclei, hv = up(nuclei), up(hv)
            types = None if types is None else up(types)
        if not self.training:
            hv = hv.clamp(-1.0, 1.0)
        return HoverOutput(nuclei, hv, types, tissue, feats.tokens)
