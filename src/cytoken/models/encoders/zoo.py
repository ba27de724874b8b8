"""Registered encoder builders: pathology foundation models, SAM, and cytoken's own small encoders.

Each builder states patch size, skip depths, width, input normalisation and the µm/px its released weights were
trained at (``native_mpp``). ``depth`` may be lowered for tests (skip depths are then spread evenly), and
``pretrained`` takes a local file or ``hf-hub:<repo id>`` (see :func:`cytoken.models.weights_io.load_encoder_weights`).

| name | arch | D | patch | skips | normalisation | weights (native µm/px) |
|---|---|---|---|---|---|---|
| hipt256 | ViT-S/16 (DINO) | 384 | 16 | 3,6,9,12 | 0.5/0.5 | HIPT ``vit256_small_dino.pth`` (0.5) |
| uni | ViT-L/16, LayerScale | 1024 | 16 | 6,12,18,24 | ImageNet | ``MahmoodLab/UNI`` (0.5) |
| virchow | ViT-H/14, SwiGLU | 1280 | 14 | 8,16,24,32 | ImageNet | ``paige-ai/Virchow`` (0.5) |
| virchow2 | ViT-H/14 + 4 registers | 1280 | 14 | 8,16,24,32 | ImageNet | ``paige-ai/Virchow2`` (0.5) |
| sam_h / sam_l / sam_b | SAM image encoder | 1280/1024/768 | 16 | quarters | 0.5/0.5 | ``sam_vit_h_4b8939.pth`` |
| cytoken_s16 | conv-stem ViT | 192 | 16 | 2,4,6,8 | 0.5/0.5 | cytoken's default model (0.25) |
| vit_tiny_test | ViT, 2-4 blocks | 32 | 16 | — | 0.5/0.5 | random (tests only) |
"""

from __future__ import annotations

from typing import Any

from cytoken.models.encoders.base import ENCODERS, HALF, IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderSpec
from cytoken.models.encoders.sam import SamEncoder
from cytoken.models.encoders.vit import VisionTransformer

__all__ = ["spread_skips"]


def spread_skips(depth: int) -> tuple[int, int, int, int]:
    """Four evenly spaced 1-based block indices ending at ``depth`` (repeats allowed for depth < 4).

    Example:
        >>> spread_skips(12), spread_skips(2)
        ((3, 6, 9, 12), (1, 1, 2, 2))
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return tuple(max(1, round(depth * k / 4)) for k in (1, 2, 3, 4))  # type: ignore[return-value]


def _finish(enc: Encoder, pretrained: str | None, family: str) -> Encoder:
    if pretrained:
        from cytoken.models.weights_io import load_encoder_weights

        load_encoder_weights(enc, pretrained, family=family)
    return enc


def _vit(
    name: str,
    *,
    embed_dim: int,
    depth: int,
    full_depth: int,
    skips: tuple[int, int, int, int],
    patch: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    native_mpp: float,
    in_chans: int,
    reg: int = 0,
    pretrained: str | None = None,
    family: str = "timm",
    **vit_kwargs: Any,
) -> Encoder:
    spec = EncoderSpec(
        name=name,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        skip_depths=skips if depth == full_depth else spread_skips(depth),
        mean=tuple(mean),
        std=tuple(std),
        native_mpp=native_mpp,
        in_chans=in_chans,
        num_prefix_tokens=1 + reg,
    )
    return _finish(VisionTransformer(spec, reg_tokens=reg, **vit_kwargs), pretrained, family)


@ENCODERS.register("hipt256")
def hipt256(*, depth: int = 12, in_chans: int = 3, pretrained: str | None = None, **kw: Any) -> Encoder:
    """HIPT ViT-S/16 (DINO-pretrained on TCGA 256² patches), the CellViT-256 encoder."""
    return _vit(
        "hipt256", embed_dim=384, depth=depth, full_depth=12, skips=(3, 6, 9, 12), patch=16, mean=kw.pop("mean", HALF),
        std=kw.pop("std", HALF), native_mpp=0.5, in_chans=in_chans, pretrained=pretrained, family="hipt",
        num_heads=6, pos_grid=14, pos_interp="dino", tissue_from_norm=True, **kw,
    )  # fmt: skip


@ENCODERS.register("uni")
def uni(*, depth: int = 24, in_chans: int = 3, pretrained: str | None = None, **kw: Any) -> Encoder:
    """UNI ViT-L/16 (Chen et al. 2024), LayerScale 1e-5, ImageNet normalisation."""
    return _vit(
        "uni", embed_dim=1024, depth=depth, full_depth=24, skips=(6, 12, 18, 24), patch=16,
        mean=kw.pop("mean", IMAGENET_MEAN), std=kw.pop("std", IMAGENET_STD), native_mpp=0.5, in_chans=in_chans,
        pretrained=pretrained,
        num_heads=16, pos_grid=14, init_values=1e-5, tissue_from_norm=False, **kw,
    )  # fmt: skip


def _virchow(
    name: str, reg: int, depth: int, in_chans: int, pretrained: str | None, kw: dict[str, Any]
) -> Encoder:
    kw.setdefault("glu_act", "silu")
    return _vit(
        name, embed_dim=1280, depth=depth, full_depth=32, skips=(8, 16, 24, 32), patch=14,
        mean=kw.pop("mean", IMAGENET_MEAN), std=kw.pop("std", IMAGENET_STD), native_mpp=0.5, in_chans=in_chans,
        reg=reg, pretrained=pretrained,
        num_heads=16, pos_grid=16, init_values=1e-5, mlp_type="glu", mlp_hidden=3416, tissue_from_norm=False, **kw,
    )  # fmt: skip


@ENCODERS.register("virchow")
def virchow(*, depth: int = 32, in_chans: int = 3, pretrained: str | None = None, **kw: Any) -> Encoder:
    """Virchow ViT-H/14 (Vorontsov et al. 2024) with the packed SwiGLU MLP."""
    return _virchow("virchow", 0, depth, in_chans, pretrained, kw)


@ENCODERS.register("virchow2")
def virchow2(*, depth: int = 32, in_chans: int = 3, pretrained: str | None = None, **kw: Any) -> Encoder:
    """Virchow2 ViT-H/14 with 4 register tokens."""
    return _virchow("virchow2", 4, depth, in_chans, pretrained, kw)


def _sam(name: str, dim: int, full_depth: int, heads: int, depth: int, in_chans: int, pretrained: str | None,
         mean: tuple[float, ...] = HALF, std: tuple[float, ...] = HALF) -> Encoder:  # fmt: skip
    q = full_depth // 4
    full_globals = tuple(q * k - 1 for k in (1, 2, 3, 4))
    skips = (q, 2 * q, 3 * q, full_depth) if depth == full_depth else spread_skips(depth)
    globals_ = full_globals if depth == full_depth else tuple(sorted({s - 1 for s in skips}))
    spec = EncoderSpec(name=name, patch_size=16, embed_dim=dim, depth=depth, skip_depths=skips, mean=tuple(mean),
                       std=tuple(std), native_mpp=0.25, in_chans=in_chans, num_prefix_tokens=0)  # fmt: skip
    return _finish(SamEncoder(spec, num_heads=heads, global_blocks=globals_), pretrained, "sam")


@ENCODERS.register("sam_h")
def sam_h(
    *,
    depth: int = 32,
    in_chans: int = 3,
    pretrained: str | None = None,
    mean: tuple = HALF,
    std: tuple = HALF,
) -> Encoder:
    """SAM ViT-H image encoder (global attention in blocks 7, 15, 23, 31), the CellViT-SAM-H encoder."""
    return _sam("sam_h", 1280, 32, 16, depth, in_chans, pretrained, mean, std)


@ENCODERS.register("sam_l")
def sam_l(
    *,
    depth: int = 24,
    in_chans: int = 3,
    pretrained: str | None = None,
    mean: tuple = HALF,
    std: tuple = HALF,
) -> Encoder:
    """SAM ViT-L image encoder."""
    return _sam("sam_l", 1024, 24, 16, depth, in_chans, pretrained, mean, std)


@ENCODERS.register("sam_b")
def sam_b(
    *,
    depth: int = 12,
    in_chans: int = 3,
    pretrained: str | None = None,
    mean: tuple = HALF,
    std: tuple = HALF,
) -> Encoder:
    """SAM ViT-B image encoder."""
    return _sam("sam_b", 768, 12, 12, depth, in_chans, pretrained, mean, std)


@ENCODERS.register("cytoken_s16")
def cytoken_s16(
    *, depth: int = 8, embed_dim: int = 192, num_heads: int = 3, in_chans: int = 3, pretrained: str | None = None,
    drop_path_rate: float = 0.05,
) -> Encoder:  # fmt: skip
    """Cytoken's default CPU encoder: a conv-stem ViT with 16-px tokens at 0.25 µm/px."""
    return _vit(
        "cytoken_s16", embed_dim=embed_dim, depth=depth, full_depth=-1, skips=(0, 0, 0, 0), patch=16, mean=HALF,
        std=HALF, native_mpp=0.25, in_chans=in_chans, pretrained=pretrained, family="cytoken",
        num_heads=num_heads, pos_grid=16, stem="conv", tissue_from_norm=True, drop_path_rate=drop_path_rate,
    )  # fmt: skip


@ENCODERS.register("vit_tiny_test")
def vit_tiny_test(
    *, depth: int = 2, in_chans: int = 3, patch_size: int = 16, pretrained: str | None = None
) -> Encoder:
    """A 2-block, 32-wide random ViT for fast tests (never a real model)."""
    return _vit(
        "vit_tiny_test", embed_dim=32, depth=depth, full_depth=-1, skips=(0, 0, 0, 0), patch=patch_size, mean=HALF,
        std=HALF, native_mpp=0.25, in_chans=in_chans, pretrained=pretrained, family="cytoken",
        num_heads=2, pos_grid=4,
    )  # fmt: skip


@ENCODERS.register("vit_custom")
def vit_custom(
    *,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    skip_depths: tuple[int, int, int, int] | None = None,
    patch_size: int = 16,
    in_chans: int = 3,
    pretrained: str | None = None,
    **kw: Any,
) -> Encoder:
    """A ViT of any size with CellViT's generic layout (DINO position interpolation, 14×14 position grid)."""
    skips = tuple(skip_depths) if skip_depths else spread_skips(depth)
    return _vit(
        "vit_custom", embed_dim=embed_dim, depth=depth, full_depth=depth, skips=skips, patch=patch_size,  # type: ignore[arg-type]
        mean=kw.pop("mean", HALF), std=kw.pop("std", HALF), native_mpp=0.25, in_chans=in_chans, pretrained=pretrained,
        family="timm", num_heads=num_heads, pos_grid=14, pos_interp="dino", tissue_from_norm=True, **kw,
    )  # fmt: skip
