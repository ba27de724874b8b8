"""The Segment-Anything (SAM) ViT image encoder, with SAM's parameter names.

Windowed attention with decomposed relative position bias in most blocks, global attention in a few, and a
convolutional "neck" (used only for the tissue head, as in CellViT-SAM). Parameter names follow the released
``sam_vit_*`` checkpoints' ``image_encoder.*`` keys, so they load after stripping that prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.encoders.base import Encoder, EncoderFeatures, EncoderSpec

__all__ = ["SamEncoder"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise channels."""
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis, resized when needed."""
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = F.interpolate(rel_pos.T[None], size=max_dist, mode="linear")[0].T
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    idx = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[idx.long()]


class SamAttention(nn.Module):
    """Attention with decomposed relative position bias (``rel_pos_h``, ``rel_pos_w``)."""

    def __init__(self, dim: int, num_heads: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        b, h, w, c = x.shape
        nh, hd = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, N, hd)
        rh = _rel_pos(h, h, self.rel_pos_h)  # (h, h, hd)
        rw = _rel_pos(w, w, self.rel_pos_w)
        rq = q.reshape(b, nh, h, w, hd)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, nh, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class SamMlp(nn.Module):
    """``lin1`` → GELU → ``lin2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.lin2(self.act(self.lin1(x)))


class SamBlock(nn.Module):
    """SAM transformer block; ``window`` = 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, window: int, global_grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, num_heads, window if window else global_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SamMlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window:
            b, h, w, c = x.shape
            ws = self.window
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            x = self.attn(x)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamEncoder(Encoder):
    """SAM ViT image encoder (ViT-B/L/H) returning CellViT-style skips and tokens.

    Args:
        spec: encoder spec (patch 16; embed 768/1024/1280).
        num_heads: attention heads.
        global_blocks: 0-based indices of the global-attention blocks.
        window: window size of the other blocks (14).
        img_grid: token grid of the position embedding (1024/16 = 64); smaller inputs crop it (as CellViT-SAM).
        out_chans: neck width (256).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        num_heads: int,
        global_blocks: tuple[int, ...],
        window: int = 14,
        img_grid: int = 64,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.img_grid = img_grid
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(spec.in_chans, d, spec.patch_size, spec.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, img_grid, img_grid, d))
        self.blocks = nn.ModuleList(
            SamBlock(d, num_heads, 0 if i in global_blocks else window, img_grid) for i in range(spec.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(d, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.neck_dim = out_chans

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        """Encode (B, C, H, W); H, W multiples of 16 and at most 1024 (the position grid is cropped)."""
        p = self.spec.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        t = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        h, w = t.shape[1:3]
        if h > self.img_grid or w > self.img_grid:
            raise ValueError(
                f"SAM encoder accepts at most {self.img_grid * p} px per side, got {tuple(x.shape[-2:])}"
            )
        t = t + self.pos_embed[:, :h, :w]
        by_depth: dict[int, torch.Tensor] = {}
        wanted = set(self.spec.skip_depths)
        for i, blk in enumerate(self.blocks, start=1):
            t = blk(t)
            if i in wanted:
                by_depth[i] = t.permute(0, 3, 1, 2)
        skips = [by_depth[i] for i in self.spec.skip_depths]
        neck = self.neck(t.permute(0, 3, 1, 2))
        return EncoderFeatures(skips=skips, tokens=skips[-1], cls=neck.mean(dim=(2, 3)))
