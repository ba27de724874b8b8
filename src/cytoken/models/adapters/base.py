"""Adapter registry: modules attached to an already built (possibly pretrained) encoder, chosen by config.

An adapter spec is a mapping with a ``kind`` (a registered adapter name) and that adapter's keyword arguments, e.g.
``{"kind": "cellvta", "inject_every": 4}``. It is given to an encoder through ``encoder_kwargs["adapter"]`` of a
:class:`~cytoken.models.SegmenterConfig` (or ``build_encoder(name, adapter=...)``); the encoder is built and its
released weights loaded first, then :func:`attach_adapter` adds the adapter as the submodule ``encoder.adapter``.
The encoder's own parameter names are unchanged, so its weight files and official checkpoints still load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from cytoken.models.encoders.base import Encoder
from cytoken.registry import Registry

__all__ = ["ADAPTERS", "attach_adapter"]

# name -> factory(encoder, **kwargs) -> adapter module; the factory wires the adapter into the encoder.
ADAPTERS: Registry[Callable[..., nn.Module]] = Registry("adapter")


def attach_adapter(encoder: Encoder, spec: Mapping[str, Any]) -> Encoder:
    """Attach the adapter described by ``spec`` to ``encoder`` (in place) and return the encoder.

    Args:
        encoder: a built cytoken encoder.
        spec: ``{"kind": <registered adapter>, **adapter keyword arguments}``.

    Returns:
        The same encoder, now with an ``adapter`` submodule.

    Raises:
        ValueError: when ``kind`` is missing or unknown (the message lists the registered kinds), when the encoder
            already has an adapter, or when the adapter rejects its arguments.

    Example:
        >>> from cytoken.models import build_encoder
        >>> enc = attach_adapter(build_encoder("vit_tiny_test"), {"kind": "cellvta", "inject_every": 1})
        >>> type(enc.adapter).__name__
        'CellVTAAdapter'
    """
    from cytoken.models.adapters import cellvta  # noqa: F401  (registers the built-in adapters)

    if not isinstance(spec, Mapping):
        raise ValueError(f"adapter spec must be a mapping with a 'kind', got {type(spec).__name__}: {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("kind", None)
    if not isinstance(kind, str):
        raise ValueError(f"adapter spec needs a 'kind' (one of {', '.join(ADAPTERS.names())}), got {spec!r}")
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; registered: {', '.join(ADAPTERS.names())}")
    if isinstance(getattr(encoder, "adapter", None), nn.Module):
        raise ValueError(f"encoder {encoder.spec.name!r} already has an adapter ({type(encoder.adapter).__name__})")
    try:
        ADAPTERS.get(kind)(encoder, **kwargs)
    except TypeError as exc:  # unknown keyword: name it
        raise ValueError(f"bad arguments for adapter {kind!r}: {exc}") from None
    return encoder
