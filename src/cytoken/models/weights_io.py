"""Reading weight files and loading them strictly.

A weight source is a local file (``.safetensors``, or a torch pickle ``.pth``/``.pt``/``.bin`` read with
``weights_only=True``) or ``hf-hub:<org>/<repo>[/<filename>]`` (downloaded with ``huggingface_hub`` when online; the
``hub`` extra). Loading is always strict: a missing, unexpected or mis-shaped key raises :class:`WeightsError` listing
them, never a silent partial load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from cytoken.types import CytokenError

__all__ = [
    "WeightsError",
    "load_encoder_weights",
    "load_state_dict_strict",
    "read_state_dict",
    "resolve_weights",
]

# Default file inside a hub repository for each encoder family.
HUB_DEFAULT_FILES = {
    "timm": "pytorch_model.bin",
    "hipt": "vit256_small_dino.pth",
    "sam": "sam_vit_h_4b8939.pth",
}


class WeightsError(CytokenError):
    """A weight file is missing, unreadable or does not fit the architecture."""


def resolve_weights(source: str | Path, *, default_filename: str = "pytorch_model.bin") -> Path:
    """Turn a weight source into a local file path (downloading ``hf-hub:`` ids when online).

    Args:
        source: a path, or ``hf-hub:org/repo`` / ``hf-hub:org/repo/file.safetensors``.
        default_filename: file to fetch when the hub id names no file.

    Returns:
        A local path to the file.
    """
    text = str(source)
    if text.startswith("hf-hub:"):
        parts = text[len("hf-hub:") :].split("/")
        if len(parts) < 2:
            raise WeightsError(f"bad hub id {text!r}: expected hf-hub:<org>/<repo>[/<file>]")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise WeightsError(
                "downloading from the Hugging Face hub needs: pip install 'cytoken[hub]'"
            ) from None
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # network, gated repo, missing file: all user-facing
            raise WeightsError(
                f"could not download {filename!r} from hub repo {repo!r} ({type(exc).__name__}: {exc}). "
                "Gated models need `huggingface-cli login` and accepted terms; offline machines need a local path."
            ) from None
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name → tensor`` dict from a safetensors or torch file.

    Torch files are read with ``weights_only=True``; a checkpoint dict holding the weights under ``state_dict``,
    ``model_state_dict``, ``model`` or ``teacher`` (DINO) is unwrapped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from None
    for key in ("model_state_dict", "state_dict", "model", "teacher"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (name → tensor)")
    return dict(obj)


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "model", assign: bool = False
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key raises :class:`WeightsError`.

    With ``assign=True`` the tensors replace the module's (use it for modules built on the ``meta`` device, which
    skips random initialisation of large models).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"weights do not fit the {what} architecture:"]
        if shapes:
            lines.append(f"  first shape mismatch: {shapes[0]} ({len(shapes)} in all)")
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_short(unexpected)}")
        raise WeightsError("\n".join(lines))
    module.load_state_dict(dict(state), strict=True, assign=assign)


def _short(keys: list[str], n: int = 8) -> str:
    head = ", ".join(keys[:n])
    return head + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def _strip(
    prefixes: tuple[str, ...], drop: tuple[str, ...] = ()
) -> Callable[[dict[str, torch.Tensor]], dict]:
    def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p) :]
            if any(k.startswith(d) for d in drop):
                continue
            out[k] = v
        return out

    return adapt


def _sam_adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("image_encoder.") for k in state):
        state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
    return state


# Family-specific renaming from released files to our parameter names.
ADAPTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    # timm / HF releases (UNI, Virchow, Virchow2): names already match; drop classifier heads.
    "timm": _strip(("module.",), drop=("head.", "fc_norm.", "head_drop.")),
    # DINO checkpoints (HIPT): teacher/student "backbone." prefix, DINO projection head dropped.
    "hipt": _strip(("module.", "backbone."), drop=("head.",)),
    "sam": _sam_adapt,
    "cytoken": _strip(("encoder.",)),
}


def load_encoder_weights(encoder: nn.Module, source: str | Path, *, family: str = "timm") -> None:
    """Load released foundation-model weights into an encoder, strictly.

    Args:
        encoder: a cytoken encoder.
        source: local path or ``hf-hub:`` id.
        family: which renaming applies (``timm``, ``hipt``, ``sam``, ``cytoken``).
    """
    path = resolve_weights(source, default_filename=HUB_DEFAULT_FILES.get(family, "pytorch_model.bin"))
    state = ADAPTERS[family](read_state_dict(path))
    # The final norm is unused by CellViT-UNI/Virchow-style tissue heads but present in releases; keep strictness
    # by loading it too (our encoders always own a `norm`).
    load_state_dict_strict(encoder, state, what=f"{type(encoder).__name__} ({family}) encoder from {path}")
