"""A CellVTA-style adapter: a small CNN whose high-resolution features are injected into the ViT blocks.

CellVTA (Yang et al. 2025, "CellVTA: Enhancing Vision Foundation Models for Accurate Cell Segmentation and
Classification") adds a CNN beside a pretrained ViT: the CNN extracts stride-4/8/16 features from the image, and
"injectors" before chosen transformer blocks add them to the tokens by cross-attention, each through a learnable gate
that starts at zero, so the pretrained ViT initially computes exactly what it computed before.

What differs from the paper: the paper's injector uses multi-scale *deformable* attention (ViT-Adapter's, which
samples learned offsets around each token and needs a custom CUDA/grid-sample kernel). Here the injector is a
standard multi-head cross-attention (tokens are the queries, CNN features the keys/values, a dense softmax over a
fixed key set) restricted to each token's own footprint: a 16-px token attends to the 4×4 stride-4, 2×2 stride-8 and
1×1 stride-16 CNN features under it (21 keys), or to a ``window`` × ``window`` neighbourhood of token footprints.
Global cross-attention would cost (H/16)² × ((H/4)² + (H/8)² + (H/16)²) scores per head — 350 million for a 1024-px
tile — which no CPU can afford; local attention keeps the cost linear in the image area. A learned embedding per key
position tells the attention where inside the footprint (and at which scale) each key lies.

The adapter is attached to a built encoder (``encoder.adapter``) and wired in with PyTorch module hooks: a forward
pre-hook on the encoder runs the CNN on the encoder's input, and forward pre-hooks on the chosen blocks inject. The
encoder's own code and parameter names are untouched, so pretrained and official CellViT weights load as before.
Works with cytoken's ViT encoders (class/register tokens are left untouched) and with the SAM encoder
(channels-last token grids).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cytoken.models.adapters.base import ADAPTERS
from cytoken.models.encoders.base import Encoder

__all__ = ["LEVEL_STRIDES", "CellVTAAdapter", "SpatialPrior"]

LEVEL_STRIDES = (4, 8, 16)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPrior(nn.Module):
    """A small CNN: stride-4, 8 and 16 feature maps of the image, each projected (1×1 conv) to ``dim`` channels.

    Args:
        in_chans: image channels.
        width: channels at stride 4 (2× at stride 8, 4× at stride 16).
        dim: output width of every level.
    """

    def __init__(self, in_chans: int, width: int, dim: int) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(*_conv_bn_relu(in_chans, c, 2), *_conv_bn_relu(c, c, 1), nn.MaxPool2d(3, 2, 1))
        self.down8 = nn.Sequential(*_conv_bn_relu(c, 2 * c, 2))
        self.down16 = nn.Sequential(*_conv_bn_relu(2 * c, 4 * c, 2))
        self.proj = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in (c, 2 * c, 4 * c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) → [(B, dim, H/4, W/4), (B, dim, H/8, W/8), (B, dim, H/16, W/16)] (sizes rounded up)."""
        f4 = self.stem(x)
        f8 = self.down8(f4)
        f16 = self.down16(f8)
        return [proj(f) for proj, f in zip(self.proj, (f4, f8, f16))]


class _Injector(nn.Module):
    """Gated cross-attention from tokens (queries) to their local CNN features (keys/values)."""

    def __init__(self, embed_dim: int, dim: int, num_heads: int, gate_init: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.q = nn.Linear(embed_dim, dim)
        self.memory_norm = nn.LayerNorm(dim, eps=1e-6)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, embed_dim)
        self.gate = nn.Parameter(torch.full((embed_dim,), float(gate_init)))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens (N, D), memory (N, K, dim), mask (N, 1, 1, K) or None → tokens + gate · attention (N, D)."""
        n, k, dim = memory.shape
        nh = self.num_heads
        q = self.q(self.query_norm(tokens)).reshape(n, nh, 1, dim // nh)
        kv = self.kv(self.memory_norm(memory)).reshape(n, k, 2, nh, dim // nh).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return tokens + self.gate * self.out(att.reshape(n, dim))


class CellVTAAdapter(nn.Module):
    """CNN feature pyramid + gated local cross-attention injectors for a ViT encoder (see the module docstring).

    Build it with :func:`cytoken.models.adapters.attach_adapter` (or ``encoder_kwargs={"adapter": {"kind":
    "cellvta", ...}}``), which fills ``embed_dim``, ``patch_size``, ``depth`` and ``in_chans`` from the encoder.

    Args:
        embed_dim: encoder token width D.
        patch_size: encoder token size in px (16, or 14 for Virchow).
        depth: number of encoder blocks.
        in_chans: image channels.
        inject_every: inject before blocks 1, 1 + n, 1 + 2n, … (ViT-Adapter's interaction pattern: 4 injections
            for 24 blocks with n = 6).
        inject_at: explicit 1-based block indices to inject before (overrides ``inject_every``).
        width: CNN channels at stride 4.
        dim: attention width (queries, keys and values are projected to it).
        num_heads: attention heads (must divide ``dim``).
        window: odd number of token footprints per side each token attends to (1 = its own footprint).
        gate_init: initial value of every gate; 0 leaves the pretrained encoder's outputs unchanged.

    Example:
        >>> from cytoken.models import build_encoder
        >>> plain = build_encoder("vit_tiny_test").eval()
        >>> adapted = build_encoder("vit_tiny_test", adapter={"kind": "cellvta", "inject_every": 1}).eval()
        >>> _ = adapted.load_state_dict(plain.state_dict(), strict=False)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.equal(plain(x).tokens, adapted(x).tokens))  # gates start at zero
        True
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        depth: int,
        *,
        in_chans: int = 3,
        inject_every: int = 4,
        inject_at: Sequence[int] | None = None,
        width: int = 32,
        dim: int = 128,
        num_heads: int = 4,
        window: int = 1,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        for name, v in (("inject_every", inject_every), ("width", width), ("dim", dim), ("num_heads", num_heads),
                        ("depth", depth), ("patch_size", patch_size), ("in_chans", in_chans)):  # fmt: skip
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CellVTA {name} must be a positive integer, got {v!r}")
        if dim % num_heads:
            raise ValueError(f"CellVTA dim {dim} is not divisible by num_heads {num_heads}")
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"CellVTA window must be an odd positive integer (1, 3, …), got {window!r}")
        at = tuple(range(1, depth + 1, inject_every)) if inject_at is None else tuple(sorted(set(inject_at)))
        if not at or not all(isinstance(i, int) and 1 <= i <= depth for i in at):
            raise ValueError(f"CellVTA inject_at must be block indices in 1..{depth}, got {inject_at!r}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.depth = depth
        self.inject_at = at
        self.window = window
        # CNN cells per token side at each level (16-px tokens: 4, 2, 1; 14-px tokens: 4, 2, 1 after resampling).
        self.cells = tuple(max(1, round(patch_size / s)) for s in LEVEL_STRIDES)
        n_keys = sum((c * window) ** 2 for c in self.cells)
        self.prior = SpatialPrior(in_chans, width, dim)
        self.key_pos = nn.Parameter(torch.zeros(n_keys, dim))
        nn.init.trunc_normal_(self.key_pos, std=0.02)
        self.injectors = nn.ModuleList(_Injector(embed_dim, dim, num_heads, gate_init) for _ in at)
        self._state: dict[str, Any] = {}

    def extra_repr(self) -> str:
        """Injection points, window and CNN cells per token (shown in ``print(model)``)."""
        return f"inject_at={self.inject_at}, window={self.window}, cells_per_token={self.cells}"

    # -------------------------------------------------------------------------------------------------- wiring
    def attach(self, encoder: Encoder) -> None:
        """Register as ``encoder.adapter`` and install the hooks (called once by the registry factory)."""
        blocks = getattr(encoder, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) != self.depth:
            raise ValueError(
                f"the CellVTA adapter needs an encoder with {self.depth} blocks in `.blocks` (cytoken ViT or SAM "
                f"encoders); {type(encoder).__name__} has none or a different number"
            )
        encoder.adapter = self
        encoder.register_forward_pre_hook(self._begin, with_kwargs=True)
        encoder.register_forward_hook(self._end, with_kwargs=True, always_call=True)
        for k, i in enumerate(self.inject_at):
            blocks[i - 1].register_forward_pre_hook(functools.partial(self._inject, k))

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        memory, mask = self.memory(x, h, w)
        self._state = {"memory": memory, "mask": mask, "grid": (x.shape[0], h, w)}

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._state = {}

    def _inject(self, k: int, block: nn.Module, args: tuple) -> tuple | None:
        if not self._state:  # block called outside the encoder's forward: nothing to inject
            return None
        t = args[0]
        b, h, w = self._state["grid"]
        inj = self.injectors[k]
        memory, mask = self._state["memory"], self._state["mask"]
        if t.ndim == 4:  # SAM: (B, h, w, D)
            if tuple(t.shape[:3]) != (b, h, w):
                raise ValueError(f"CellVTA: block input {tuple(t.shape)} does not match the {h}x{w} token grid")
            new = inj(t.reshape(b * h * w, -1), memory, mask).reshape(t.shape)
        else:  # ViT: (B, prefix + h·w, D)
            n_prefix = t.shape[1] - h * w
            if n_prefix < 0 or t.shape[0] != b:
                raise ValueError(f"CellVTA: block input {tuple(t.shape)} does not match the {h}x{w} token grid")
            grid = inj(t[:, n_prefix:].reshape(b * h * w, -1), memory, mask).reshape(b, h * w, -1)
            new = torch.cat([t[:, :n_prefix], grid], dim=1)
        return (new, *args[1:])

    # -------------------------------------------------------------------------------------------------- memory
    def memory(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys/values of every token: CNN features under its footprint window, all levels.

        Args:
            x: the encoder input (B, C, H, W).
            h: token rows.
            w: token columns.

        Returns:
            ``(memory, mask)``: memory (B·h·w, K, dim) in token raster order, and a boolean (B·h·w, 1, 1, K) mask
            of the keys inside the image (None when ``window`` is 1, where every key is inside).
        """
        feats = self.prior(x)
        b = x.shape[0]
        parts, masks = [], []
        for f, c in zip(feats, self.cells):
            if tuple(f.shape[-2:]) != (h * c, w * c):
                f = F.interpolate(f, size=(h * c, w * c), mode="bilinear", align_corners=False)
            s, pad = c * self.window, c * (self.window // 2)
            cols = F.unfold(f, kernel_size=s, stride=c, padding=pad)  # (B, dim·s², h·w)
            parts.append(cols.reshape(b, f.shape[1], s * s, h * w).permute(0, 3, 2, 1))
            if self.window > 1:
                masks.append(F.unfold(f.new_ones(1, 1, h * c, w * c), kernel_size=s, stride=c, padding=pad))
        memory = torch.cat(parts, dim=2).reshape(b * h * w, -1, feats[0].shape[1]) + self.key_pos
        if not masks:
            return memory, None
        inside = torch.cat(masks, dim=1)[0].transpose(0, 1) > 0.5  # (h·w, K)
        return memory, inside.expand(b, -1, -1).reshape(b * h * w, 1, 1, -1)


@ADAPTERS.register("cellvta")
def cellvta(encoder: Encoder, **kwargs: Any) -> CellVTAAdapter:
    """Build a :class:`CellVTAAdapter` sized for ``encoder`` and attach it."""
    spec = encoder.spec
    adapter = CellVTAAdapter(spec.embed_dim, spec.patch_size, spec.depth, in_chans=spec.in_chans, **kwargs)
    ref = next(encoder.parameters(), None)
    if ref is not None:
        adapter.to(device=ref.device, dtype=ref.dtype)
    adapter.attach(encoder)
    return adapter
