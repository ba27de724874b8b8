"""A plain Vision Transformer with timm-compatible parameter names.

Why not timm itself: timm imports torchvision at import time, and torchvision's PyPI wheels are CUDA builds that fail
to import beside the CPU torch wheel (``operator torchvision::nms does not exist``), which would make cytoken
uninstallable on exactly the CPU machines it targets. The ViT forward pass is small; we keep timm's parameter names
(``patch_embed.proj``, ``blocks.N.attn.qkv``, ``ls1.gamma``, ``mlp.fc1`` ...) so that timm / Hugging Face state dicts
(UNI, Virchow, Virchow2, HIPT) load without renaming. ``timm:<name>`` still wraps timm when it is importable
(see :mod:`cytoken.models.encoders.timm_wrapper`). See docs/design.md.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.encoders.base import Encoder, EncoderFeatures, EncoderSpec

__all__ = ["ConvStem", "VisionTransformer"]


class DropPath(nn.Module):
    """Stochastic depth (per-sample residual dropping) for training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop whole residual branches with probability ``p`` during training."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the token axis of (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP (``fc1`` → GELU → ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GluMlp(nn.Module):
    """Packed gated MLP: ``fc1`` gives 2H features, ``act(first half) * second half`` → ``fc2``.

    Virchow/Virchow2 use this layout (``mlp.fc1`` [2H, D], ``mlp.fc2`` [D, H]). Their release uses SiLU; CellViT++'s
    re-implementation hard-codes GELU, so CellViT-Virchow checkpoints need ``act="gelu"`` to reproduce outputs.
    """

    def __init__(
        self, dim: int, hidden: int, act: Literal["silu", "gelu"] = "silu", drop: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.SiLU() if act == "silu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.drop(self.fc2(self.drop(self.act(a) * b)))


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); parameter name ``gamma`` as in timm."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale channels."""
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        qkv_bias: bool = True,
        init_values: float | None = None,
        mlp_type: Literal["mlp", "glu"] = "mlp",
        glu_act: Literal["silu", "gelu"] = "silu",
        norm_eps: float = 1e-6,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = GluMlp(dim, mlp_hidden, glu_act, drop) if mlp_type == "glu" else Mlp(dim, mlp_hidden, drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual attention and MLP."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (``proj`` conv with kernel = stride = patch size)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D, H/p, W/p)."""
        return self.proj(x)


class ConvStem(nn.Module):
    """Convolutional patch embedding: stride-2 3×3 conv stages down to the patch size, then a 1×1 projection.

    Gives the ViT a convolutional inductive bias (Xiao et al. 2021, "Early convolutions help transformers see
    better"), which matters when training from scratch on small data; tokens stay exactly ``patch_size`` px.
    """

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, widths: tuple[int, ...] = (32, 64, 96, 128)
    ) -> None:
        super().__init__()
        n_stages = round(math.log2(patch_size))
        if 2**n_stages != patch_size:
            raise ValueError(f"ConvStem needs a power-of-two patch size, got {patch_size}")
        widths = tuple(widths[:n_stages]) + (widths[-1],) * max(0, n_stages - len(widths))
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D, H/p, W/p)."""
        return self.proj(self.stem(x))


class VisionTransformer(Encoder):
    """ViT encoder returning skip grids, the last-layer token grid and the class token.

    Args:
        spec: the encoder's :class:`EncoderSpec` (patch size, width, skip depths, normalisation, µm/px).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim`` (ignored when ``mlp_hidden`` is given).
        mlp_hidden: explicit MLP hidden width (Virchow's packed GLU: 3416).
        pos_grid: side of the token grid the learned position embedding was trained for (224/16 = 14).
        pos_interp: ``"bicubic"`` (timm ``resample_abs_pos_embed``, antialiased) or ``"dino"`` (DINO's
            scale-factor bicubic used by HIPT/CellViT-256).
        reg_tokens: number of register tokens (Virchow2: 4).
        init_values: LayerScale init (None = no LayerScale).
        mlp_type: ``"mlp"`` or ``"glu"`` (packed gated MLP).
        glu_act: activation of the GLU gate.
        stem: ``"patch"`` (linear patch embedding) or ``"conv"`` (:class:`ConvStem`).
        tissue_from_norm: apply the final LayerNorm to the class token given to a tissue head (CellViT-256 does;
            CellViT-UNI/Virchow do not).
        norm_eps: LayerNorm epsilon.
        drop_path_rate: stochastic depth at the last block (linearly increasing).
        attn_drop: attention dropout.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp_hidden: int | None = None,
        pos_grid: int = 14,
        pos_interp: Literal["bicubic", "dino"] = "bicubic",
        reg_tokens: int = 0,
        init_values: float | None = None,
        mlp_type: Literal["mlp", "glu"] = "mlp",
        glu_act: Literal["silu", "gelu"] = "silu",
        stem: Literal["patch", "conv"] = "patch",
        tissue_from_norm: bool = True,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if len(spec.skip_depths) != 4 or not all(1 <= d <= spec.depth for d in spec.skip_depths):
            raise ValueError(
                f"skip_depths must be 4 block indices in 1..{spec.depth}, got {spec.skip_depths}"
            )
        self.spec = spec
        d = spec.embed_dim
        self.pos_grid = pos_grid
        self.pos_interp = pos_interp
        self.tissue_from_norm = tissue_from_norm
        self.num_reg = reg_tokens
        if stem == "conv":
            self.patch_embed: nn.Module = ConvStem(spec.patch_size, spec.in_chans, d)
        else:
            self.patch_embed = PatchEmbed(spec.patch_size, spec.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, d)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1 + reg_tokens, d))
        hidden = mlp_hidden or int(d * mlp_ratio)
        dpr = [drop_path_rate * i / max(1, spec.depth - 1) for i in range(spec.depth)]
        self.blocks = nn.ModuleList(
            Block(
                d,
                num_heads,
                hidden,
                qkv_bias=qkv_bias,
                init_values=init_values,
                mlp_type=mlp_type,
                glu_act=glu_act,
                norm_eps=norm_eps,
                attn_drop=attn_drop,
                drop_path=dpr[i],
            )
            for i in range(spec.depth)
        )
        self.norm = nn.LayerNorm(d, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        n_prefix = 1 + self.num_reg
        prefix, grid = self.pos_embed[:, :n_prefix], self.pos_embed[:, n_prefix:]
        g = self.pos_grid
        if (h, w) == (g, g):
            return self.pos_embed
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        dtype = grid.dtype
        if self.pos_interp == "dino":
            grid = F.interpolate(
                grid.float(), scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False
            )
            grid = grid[..., :h, :w]
        else:
            grid = F.interpolate(
                grid.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False
            )
        grid = grid.to(dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([prefix, grid], dim=1)

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        """Encode (B, C, H, W) normalised images; H and W must be multiples of the patch size."""
        p = self.spec.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        t = self.patch_embed(x)
        b, d, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        t = torch.cat([*prefix, t], dim=1) + self._pos_embed(h, w)
        n_prefix = 1 + self.num_reg
        by_depth: dict[int, torch.Tensor] = {}
        wanted = set(self.spec.skip_depths)
        for i, blk in enumerate(self.blocks, start=1):
            t = blk(t)
            if i in wanted:
                by_depth[i] = t[:, n_prefix:].transpose(1, 2).reshape(b, d, h, w)
        skips = [by_depth[i] for i in self.spec.skip_depths]
        cls = self.norm(t)[:, 0] if self.tissue_from_norm else t[:, 0]
        return EncoderFeatures(skips=skips, tokens=skips[-1], cls=cls)
