"""Typed segmenter configuration and the builder that turns it into a :class:`CellSegmenter`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cytoken.models.decoders.dpt import DptDecoder
from cytoken.models.decoders.unetr import UnetrDecoder, UnetrWidths
from cytoken.models.encoders.base import build_encoder
from cytoken.models.heads import HoverHeads
from cytoken.models.multichannel import ChannelInit, InputChannel, fit_encoder_channels
from cytoken.models.segmenter import CellSegmenter

__all__ = ["SegmenterConfig", "build_segmenter"]


class SegmenterConfig(BaseModel):
    """Everything needed to rebuild a segmenter (stored inside every cytoken weight file).

    Attributes:
        encoder: registered encoder name (``cytoken_s16``, ``hipt256``, ``uni``, ``virchow``, ``virchow2``,
            ``sam_h``, …) or ``timm:<model>``.
        encoder_kwargs: keyword arguments of the encoder builder (e.g. ``depth``, ``pretrained``, and ``adapter``:
            ``{"kind": "cellvta", ...}``, see :mod:`cytoken.models.adapters`).
        decoder: ``unetr`` (CellViT) or ``dpt``.
        decoder_kwargs: for ``unetr``: ``width_factor`` (1.0 = CellViT widths), ``shared``, ``out_stride``,
            ``dropout``; for ``dpt``: ``features``, ``out_channels``.
        num_classes: cell classes, background excluded (0 = no type head).
        class_names: names of classes 1..C.
        class_colors: RGB colours of classes 1..C (default palette when empty).
        num_tissue: tissue classes (0 = no tissue head).
        tissue_names: names of the tissue classes.
        hv_activation: ``tanh`` (cytoken models) or ``identity`` (CellViT checkpoints).
        postprocess: post-processing parameters tuned for this model (field names of
            :class:`cytoken.postprocess.HoverConfig`, e.g. ``{"fg_threshold": 0.5}``); the pipeline uses them unless
            the user passes a post-processing config. Empty = the :class:`~cytoken.postprocess.HoverConfig` defaults.
        type_tokens: add a token-level type head on the last-layer tokens (see
            :class:`~cytoken.models.heads.HoverHeads`); needs ``num_classes``.
        mpp: µm/px the model works at.
        in_chans: input channels (3 for RGB). The encoder is built with 3 channels (so released weights load) and
            its image convolutions widened (see :mod:`cytoken.models.multichannel`).
        channels: names and normalisation of the ``in_chans`` input channels (strings are names); empty = RGB /
            unnamed.
        channel_init: how widened image convolutions start: ``grey`` or ``zero``.
        token_pool: token size in px that cell embeddings are pooled over; None = the encoder's patch size, the
            only value allowed (:func:`build_segmenter` refuses another: cells would be mapped to the wrong tokens).
        tile_size: default inference tile size in px.
        overlap: default tile overlap in px (must exceed the largest nucleus diameter).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "cytoken_s16"
    encoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    decoder: Literal["unetr", "dpt"] = "unetr"
    decoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int = Field(0, ge=0)
    class_names: list[str] = Field(default_factory=list)
    class_colors: list[tuple[int, int, int]] = Field(default_factory=list)
    num_tissue: int = Field(0, ge=0)
    tissue_names: list[str] = Field(default_factory=list)
    hv_activation: Literal["tanh", "identity"] = "tanh"
    type_tokens: bool = False
    postprocess: dict[str, float | int | bool | None] = Field(default_factory=dict)
    mpp: float = Field(0.25, gt=0)
    in_chans: int = Field(3, ge=1)
    channels: list[InputChannel] = Field(default_factory=list)
    channel_init: ChannelInit = "grey"
    token_pool: int | None = Field(None, ge=1)
    tile_size: int = Field(256, ge=32)
    overlap: int = Field(64, ge=0)

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_names(cls, v: Any) -> Any:
        return [{"name": c} if isinstance(c, str) else c for c in v] if isinstance(v, list | tuple) else v

    @model_validator(mode="after")
    def _check(self) -> SegmenterConfig:
        if self.channels and len(self.channels) != self.in_chans:
            raise ValueError(f"{len(self.channels)} channels for in_chans={self.in_chans}")
        if len({c.name.lower() for c in self.channels}) != len(self.channels):
            raise ValueError(f"channel names must be unique, got {[c.name for c in self.channels]}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes={self.num_classes}")
        if self.class_colors and len(self.class_colors) != self.num_classes:
            raise ValueError(f"{len(self.class_colors)} class_colors for num_classes={self.num_classes}")
        if self.type_tokens and not self.num_classes:
            raise ValueError("type_tokens needs a type head: set num_classes")
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap {self.overlap} must be smaller than tile_size {self.tile_size}")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, defaulting to ``class_1`` … ``class_C``."""
        return tuple(self.class_names) or tuple(f"class_{i}" for i in range(1, self.num_classes + 1))


def build_segmenter(config: SegmenterConfig) -> CellSegmenter:
    """Build a randomly initialised (or encoder-pretrained, via ``encoder_kwargs.pretrained``) segmenter.

    Example:
        >>> m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=3))
        >>> m.heads.types.out_channels
        4
    """
    enc = fit_encoder_channels(build_encoder(config.encoder, **config.encoder_kwargs), config)
    p = enc.spec.patch_size
    if config.token_pool is not None and config.token_pool != p:
        raise ValueError(
            f"token_pool={config.token_pool} px does not fit encoder {config.encoder!r}, whose tokens are {p} px: "
            f"cell embeddings average the encoder's token grid (one token per {p}x{p} px), so {config.token_pool}-px "
            f"pooling would assign cells to the wrong tokens; use token_pool={p} or leave it unset"
        )
    d = enc.spec.embed_dim
    kw = dict(config.decoder_kwargs)
    if config.decoder == "unetr":
        factor = float(kw.pop("width_factor", 1.0))
        widths = UnetrWidths.cellvit(d) if factor == 1.0 else UnetrWidths.scaled(d, factor)
        dec: Any = UnetrDecoder(d, in_chans=config.in_chans, widths=widths, **kw)
    else:
        dec = DptDecoder(d, in_chans=config.in_chans, **kw)
    tissue_in = getattr(enc, "neck_dim", d)
    heads = HoverHeads(
        dec.out_channels,
        num_types=config.num_classes + 1 if config.num_classes else 0,
        tissue_in=tissue_in,
        num_tissue=config.num_tissue,
        hv_activation=config.hv_activation,
        token_types_in=d if config.type_tokens else 0,
    )
    model = CellSegmenter(enc, dec, heads)
    model.config = config  # type: ignore[assignment]
    return model
