"""Any timm ViT as a cytoken encoder (``timm:<model name>``), when timm can be imported.

timm imports torchvision at import time; on CPU-only installs where torchvision's wheel does not match torch it
fails to import, and this builder then raises a clear error (cytoken's own encoders do not need timm).
"""

from __future__ import annotations

from typing import Any

import torch

from cytoken.models.encoders.base import HALF, Encoder, EncoderFeatures, EncoderSpec
from cytoken.types import CytokenError

__all__ = ["TimmEncoder", "build_timm_encoder", "timm_available"]


def timm_available() -> tuple[bool, str]:
    """Whether timm imports here, and why not."""
    try:
        import timm  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision's RuntimeError on mismatched wheels
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


class TimmEncoder(Encoder):
    """Wraps a timm VisionTransformer: skips from ``forward_intermediates``, class token for a tissue head."""

    def __init__(self, model: Any, spec: EncoderSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        """Encode (B, C, H, W)."""
        idx = [d - 1 for d in self.spec.skip_depths]
        final, inter = self.model.forward_intermediates(x, indices=sorted(set(idx)), output_fmt="NCHW")
        by = dict(zip(sorted(set(idx)), inter))
        skips = [by[i] for i in idx]
        cls = final[:, 0] if final.ndim == 3 and getattr(self.model, "num_prefix_tokens", 0) else None
        return EncoderFeatures(skips=skips, tokens=skips[-1], cls=cls)


def build_timm_encoder(
    name: str, *, depth: int | None = None, in_chans: int = 3, pretrained: str | None = None, **kw: Any
) -> Encoder:
    """Build ``timm.create_model(name)`` as an encoder (optionally with fewer blocks, for tests)."""
    ok, why = timm_available()
    if not ok:
        raise CytokenError(f"timm encoders need an importable timm (pip install 'cytoken[timm]'): {why}")
    import timm

    from cytoken.models.encoders.zoo import spread_skips

    extra = {"depth": depth} if depth else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, dynamic_img_size=True,
                              **extra, **kw)  # fmt: skip
    if not hasattr(model, "forward_intermediates"):
        raise CytokenError(f"timm model {name!r} has no forward_intermediates; use a ViT")
    d = len(model.blocks)
    patch = model.patch_embed.patch_size[0]
    spec = EncoderSpec(name=f"timm:{name}", patch_size=patch, embed_dim=model.embed_dim, depth=d,
                       skip_depths=spread_skips(d), mean=HALF, std=HALF, native_mpp=0.5, in_chans=in_chans,
                       num_prefix_tokens=getattr(model, "num_prefix_tokens", 1))  # fmt: skip
    enc = TimmEncoder(model, spec)
    if pretrained:
        from cytoken.models.weights_io import load_state_dict_strict, read_state_dict, resolve_weights

        state = read_state_dict(resolve_weights(pretrained))
        load_state_dict_strict(model, {k: v for k, v in state.items() if not k.startswith("head.")},
                               what=f"timm {name}")  # fmt: skip
    return enc
