"""Models with more (or fewer) input channels than RGB: H&E + immunofluorescence stacks, IF-only images.

Encoders are built (and their released RGB weights loaded) with 3 channels, then every convolution that reads the
image — the patch embedding (``patch_embed``) and an attached adapter's CNN stem — is widened to C channels; the
decoder's image skip (UNETR ``decoder0``, DPT ``stem``) is widened the same way when an existing segmenter is
expanded (:func:`expand_segmenter_channels`).

Initialisation rules for a kernel W with c₀ input channels widened to C channels:

* ``"grey"`` (default): the c₀ original kernels are kept and scaled by c₀/C, and each new channel gets the mean of
  the original kernels, also scaled by c₀/C. For an input whose C channels are all equal (a "grey" input in
  normalised space), the response is exactly the original response to c₀ equal channels:
  (c₀/C)·(ΣW + (C − c₀)·ΣW/c₀) = ΣW. For C < c₀ every channel gets ΣW/C (same property).
* ``"zero"``: the original kernels are kept unscaled and the new channels start at zero, so an H&E model's response
  to the RGB part of an H&E + IF stack is unchanged until training teaches it to use the new channels (C ≥ c₀).

Normalisation: channel i < 3 of a C ≥ 3 model keeps the encoder's mean/std (e.g. ImageNet's for UNI); other
channels use 0.5/0.5 (inputs scaled to [0, 1] become [-1, 1]) unless a :class:`InputChannel` gives its own.
Channel names travel in :attr:`SegmenterConfig.channels <cytoken.models.SegmenterConfig>`, so a model knows which
channels of a file to read (:func:`model_channels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cytoken.models.decoders.dpt import DptDecoder
from cytoken.models.decoders.unetr import UnetrDecoder
from cytoken.models.encoders.base import Encoder
from cytoken.types import CytokenError

if TYPE_CHECKING:  # pragma: no cover
    from cytoken.io.ifimage import IFImage
    from cytoken.models.config import SegmenterConfig
    from cytoken.models.segmenter import CellSegmenter

__all__ = [
    "EXTRA_MEAN",
    "EXTRA_STD",
    "ChannelInit",
    "InputChannel",
    "channel_stats",
    "expand_conv",
    "expand_decoder_channels",
    "expand_encoder_channels",
    "expand_kernel",
    "expand_segmenter_channels",
    "fit_encoder_channels",
    "model_channels",
    "stack_channels",
    "with_channels",
]

ChannelInit = Literal["grey", "zero"]
EXTRA_MEAN = 0.5
EXTRA_STD = 0.5
RGB_NAMES = ("R", "G", "B")
# Sub-modules of an encoder whose first convolution reads the image.
_ENCODER_IMAGE_ROOTS = ("patch_embed", "adapter")
# Decoder class -> its convolution that reads the image (the image skip).
_DECODER_IMAGE_CONV: dict[type, str] = {UnetrDecoder: "decoder0.0.block.0", DptDecoder: "stem.block.0"}


class InputChannel(BaseModel):
    """One input channel of a model.

    Attributes:
        name: channel name as in the image files (matched case-insensitively), e.g. ``DAPI``.
        mean: normalisation mean of the [0, 1]-scaled channel (None: the encoder's own for RGB positions, else 0.5).
        std: normalisation std (None: as ``mean``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    mean: float | None = None
    std: float | None = Field(None, gt=0)


def expand_kernel(weight: torch.Tensor, in_chans: int, init: ChannelInit = "grey") -> torch.Tensor:
    """Widen a conv kernel (O, c₀, kh, kw) to (O, C, kh, kw) by an initialisation rule (see the module docstring).

    Example:
        >>> w = torch.ones(1, 3, 1, 1)
        >>> expand_kernel(w, 6).flatten().tolist()  # grey: sum preserved
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
        >>> expand_kernel(w, 4, "zero").flatten().tolist()
        [1.0, 1.0, 1.0, 0.0]
    """
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    o, c0 = weight.shape[:2]
    with torch.no_grad():
        if init == "grey":
            if in_chans >= c0:
                extra = weight.mean(1, keepdim=True).expand(-1, in_chans - c0, *weight.shape[2:])
                return torch.cat([weight, extra], dim=1) * (c0 / in_chans)
            return (weight.sum(1, keepdim=True) / in_chans).expand(-1, in_chans, *weight.shape[2:]).clone()
        if init == "zero":
            if in_chans < c0:
                raise ValueError(f"init 'zero' keeps the {c0} original channels; cannot reduce to {in_chans}")
            extra = weight.new_zeros(o, in_chans - c0, *weight.shape[2:])
            return torch.cat([weight, extra], dim=1)
    raise ValueError(f"channel init must be 'grey' or 'zero', got {init!r}")


def expand_conv(conv: nn.Conv2d, in_chans: int, init: ChannelInit = "grey") -> nn.Conv2d:
    """A copy of ``conv`` reading ``in_chans`` channels (kernel by :func:`expand_kernel`, same bias tensor)."""
    if conv.groups != 1:
        raise ValueError(f"cannot widen a grouped convolution ({conv})")
    with torch.device(conv.weight.device):
        new = nn.Conv2d(
            in_chans,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            dtype=conv.weight.dtype,
        )
    new.weight = nn.Parameter(expand_kernel(conv.weight, in_chans, init), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _encoder_image_convs(encoder: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    found = []
    for name, m in encoder.named_modules():
        if name.rpartition(".")[2] in _ENCODER_IMAGE_ROOTS:
            conv = next(((n, c) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)), None)
            if conv is not None:
                found.append((f"{name}.{conv[0]}", conv[1]))
    if not found:
        raise ValueError(f"{type(encoder).__name__} has no `patch_embed` convolution to widen")
    return found


def channel_stats(
    native_mean: Sequence[float],
    native_std: Sequence[float],
    in_chans: int,
    channels: Sequence[InputChannel] = (),
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation of a C-channel model (see the module docstring for the defaults).

    Example:
        >>> channel_stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 4)[0]
        (0.485, 0.456, 0.406, 0.5)
    """
    if channels and len(channels) != in_chans:
        raise ValueError(f"{len(channels)} channels given for in_chans={in_chans}")
    native = len(native_mean)
    mean, std = [], []
    for i in range(in_chans):
        own = i < native and in_chans >= native
        ch = channels[i] if channels else None
        mean.append(float(ch.mean) if ch and ch.mean is not None else (native_mean[i] if own else EXTRA_MEAN))
        std.append(float(ch.std) if ch and ch.std is not None else (native_std[i] if own else EXTRA_STD))
    return tuple(mean), tuple(std)


def expand_encoder_channels(
    encoder: Encoder, in_chans: int, *, channels: Sequence[InputChannel] = (), init: ChannelInit = "grey"
) -> Encoder:
    """Widen an encoder's image convolutions to ``in_chans`` channels and set its normalisation (in place).

    Args:
        encoder: a built encoder (pretrained weights already loaded).
        in_chans: the new channel count C.
        channels: optional per-channel names/normalisation (C of them).
        init: ``"grey"`` or ``"zero"`` (see the module docstring).

    Returns:
        The encoder, with ``spec.in_chans == C`` and C-long ``spec.mean`` / ``spec.std``.

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = expand_encoder_channels(build_encoder("vit_tiny_test"), 5)
        >>> enc.patch_embed.proj.in_channels, enc.spec.mean
        (5, (0.5, 0.5, 0.5, 0.5, 0.5))
    """
    spec = encoder.spec
    mean, std = channel_stats(spec.mean, spec.std, in_chans, channels)
    if in_chans != spec.in_chans:
        for name, conv in _encoder_image_convs(encoder):
            if conv.in_channels != spec.in_chans:
                raise ValueError(f"{name} reads {conv.in_channels} channels, the encoder spec says {spec.in_chans}")
            _replace(encoder, name, expand_conv(conv, in_chans, init))
    encoder.spec = replace(spec, in_chans=in_chans, mean=mean, std=std)
    return encoder


def expand_decoder_channels(decoder: nn.Module, in_chans: int, *, init: ChannelInit = "grey") -> nn.Module:
    """Widen the decoder's image-skip convolution (UNETR ``decoder0``, DPT ``stem``) to ``in_chans`` (in place)."""
    name = _DECODER_IMAGE_CONV.get(type(decoder))
    if name is None:
        known = ", ".join(t.__name__ for t in _DECODER_IMAGE_CONV)
        raise ValueError(f"don't know the image convolution of {type(decoder).__name__}; supported: {known}")
    conv = decoder.get_submodule(name)
    if conv.in_channels != in_chans:
        _replace(decoder, name, expand_conv(conv, in_chans, init))  # type: ignore[arg-type]
    return decoder


def fit_encoder_channels(encoder: Encoder, config: SegmenterConfig) -> Encoder:
    """Make a freshly built (RGB) encoder match ``config.in_chans`` / ``config.channels`` (no-op for plain RGB)."""
    custom = any(c.mean is not None or c.std is not None for c in config.channels)
    if config.in_chans == encoder.spec.in_chans and not custom:
        return encoder
    return expand_encoder_channels(encoder, config.in_chans, channels=config.channels, init=config.channel_init)


def _as_channels(channels: Sequence[str | InputChannel | dict]) -> list[InputChannel]:
    out = []
    for c in channels:
        out.append(c if isinstance(c, InputChannel) else InputChannel(name=c) if isinstance(c, str)
                   else InputChannel.model_validate(c))  # fmt: skip
    names = [c.name.lower() for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"channel names must be unique (case-insensitive), got {[c.name for c in out]}")
    return out


def with_channels(
    config: SegmenterConfig, channels: Sequence[str | InputChannel | dict], *, init: ChannelInit | None = None
) -> SegmenterConfig:
    """A copy of ``config`` for the given input channels (``in_chans`` = their number).

    Example:
        >>> from cytoken.models import SegmenterConfig
        >>> cfg = with_channels(SegmenterConfig(encoder="uni"), ["R", "G", "B", "DAPI"])
        >>> cfg.in_chans, [c.name for c in cfg.channels]
        (4, ['R', 'G', 'B', 'DAPI'])
    """
    chans = _as_channels(channels)
    data = config.model_dump()
    data.update(in_chans=len(chans), channels=[c.model_dump() for c in chans])
    if init is not None:
        data["channel_init"] = init
    return type(config).model_validate(data)


def expand_segmenter_channels(
    model: CellSegmenter, channels: int | Sequence[str | InputChannel | dict], *, init: ChannelInit = "grey"
) -> CellSegmenter:
    """Widen a built (e.g. trained or converted CellViT) segmenter to more input channels, in place.

    The encoder's and the decoder's image convolutions are widened by ``init``; ``model.config`` gets the new
    channel list with every channel's normalisation written out, so :func:`~cytoken.models.save_segmenter` /
    :func:`~cytoken.models.load_segmenter` rebuild the same model.

    Args:
        model: a segmenter built by :func:`~cytoken.models.build_segmenter` (it carries ``.config``).
        channels: the new channel count (names: existing names, then ``ch<i>``) or the channels themselves.
        init: ``"grey"`` or ``"zero"``.

    Returns:
        ``model``.
    """
    config = model.config  # type: ignore[attr-defined]
    spec = model.encoder.spec
    default_names = RGB_NAMES if spec.in_chans == 3 else tuple(f"ch{i}" for i in range(spec.in_chans))
    old = list(config.channels) or [InputChannel(name=n) for n in default_names]
    if isinstance(channels, int):
        chans = old[:channels] + [InputChannel(name=f"ch{i}") for i in range(len(old), channels)]
    else:
        chans = _as_channels(channels)
    c = len(chans)
    # Existing positions keep the encoder's current normalisation unless overridden.
    resolved = []
    for i, ch in enumerate(chans):
        keep = i < spec.in_chans and c >= spec.in_chans
        mean = ch.mean if ch.mean is not None else (spec.mean[i] if keep else EXTRA_MEAN)
        std = ch.std if ch.std is not None else (spec.std[i] if keep else EXTRA_STD)
        resolved.append(InputChannel(name=ch.name, mean=mean, std=std))
    expand_encoder_channels(model.encoder, c, channels=resolved, init=init)
    expand_decoder_channels(model.decoder, c, init=init)
    model.config = with_channels(config, resolved, init=init)  # type: ignore[assignment]
    return model


def _to_unit(data: np.ndarray, scale: Literal["dtype", "percentile"]) -> np.ndarray:
    a = np.asarray(data)
    if scale == "percentile":
        out = np.empty(a.shape, np.float32)
        for i, ch in enumerate(a.astype(np.float32)):
            lo, hi = np.percentile(ch, (0.5, 99.5))
            out[i] = np.clip((ch - lo) / (hi - lo), 0, 1) if hi > lo else 0.0
        return out
    if scale != "dtype":
        raise ValueError(f"scale must be 'dtype' or 'percentile', got {scale!r}")
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float32) / float(np.iinfo(a.dtype).max)).astype(np.float32)
    return a.astype(np.float32)


def model_channels(
    image: IFImage, config: SegmenterConfig, *, scale: Literal["dtype", "percentile"] = "dtype"
) -> np.ndarray:
    """The (C, H, W) float32 [0, 1] input of a model, channels picked from ``image`` by the config's names.

    Args:
        image: a multi-channel image (e.g. from :func:`cytoken.io.ifimage.read_if` or :func:`stack_channels`).
        config: the model's config; with ``channels`` set, channels are selected by name (case-insensitive) in
            the model's order, otherwise the image must have exactly ``in_chans`` channels.
        scale: ``"dtype"`` (integers divided by their dtype's maximum, floats kept) or ``"percentile"``
            (per channel, 0.5–99.5 percentile range stretched to [0, 1]).

    Returns:
        A (C, H, W) float32 array; feed ``torch.from_numpy(a)[None]`` to ``model.preprocess``.

    Raises:
        CytokenError: a channel the model needs is not in the image (the message lists the image's channels), or
            the channel count differs for an unnamed model.
    """
    if config.channels:
        names = [c.name for c in config.channels]
        try:
            image = image.select(names)
        except CytokenError as exc:
            raise CytokenError(f"the model reads channels {names}: {exc}") from None
    elif image.data.shape[0] != config.in_chans:
        raise CytokenError(
            f"the model takes {config.in_chans} channels and names none; the image has "
            f"{image.data.shape[0]} ({', '.join(image.channel_names)})"
        )
    return _to_unit(image.data, scale)


def stack_channels(rgb: np.ndarray, image: IFImage, *, rgb_names: Sequence[str] = RGB_NAMES) -> IFImage:
    """Stack an RGB image (H, W, 3) and a registered multi-channel image (K, H, W) into one (3 + K)-channel image.

    Both parts are scaled to [0, 1] by their dtype (:func:`model_channels`' ``"dtype"`` rule), so uint8 H&E and
    uint16 IF can be stacked; names are ``rgb_names`` followed by the image's channel names.

    Raises:
        ValueError: different (H, W), or an RGB array that is not (H, W, 3).

    Example:
        >>> from cytoken.io.ifimage import IFImage
        >>> he = np.zeros((4, 4, 3), np.uint8)
        >>> st = stack_channels(he, IFImage(np.zeros((2, 4, 4), np.uint16), ("DAPI", "CD3")))
        >>> st.data.shape, st.channel_names
        ((5, 4, 4), ('R', 'G', 'B', 'DAPI', 'CD3'))
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got shape {rgb.shape}")
    if rgb.shape[:2] != image.shape:
        raise ValueError(f"RGB {rgb.shape[:2]} and {image.channel_names} {image.shape} differ in size: register first")
    from cytoken.io.ifimage import IFImage

    data = np.concatenate([_to_unit(rgb.transpose(2, 0, 1), "dtype"), _to_unit(image.data, "dtype")])
    return IFImage(data, (*rgb_names, *image.channel_names), mpp=image.mpp, meta={"stacked": True})
