"""Loading official CellViT / CellViT++ segmentation checkpoints into cytoken models, strictly.

An official checkpoint is a ``torch.save`` dict with ``arch`` (the model class name), ``model_state_dict`` and a
``config`` flattened with ``.`` separators (see ``shared/reference/cellvit-checkpoints/FACTS.md``). We rebuild the
same network from cytoken parts — the encoder builder of the backbone plus the CellViT UNETR decoder at CellViT's
widths — and map every key:

| CellViT key prefix | cytoken key prefix |
|---|---|
| ``encoder.head.`` / ``classifier_head.`` | ``heads.tissue.`` |
| ``encoder.`` | ``encoder.`` |
| ``decoder0.`` … ``decoder3.`` | ``decoder.decoder0.`` … |
| ``<branch>_decoder.decoder0_header.2.`` | ``heads.<nuclei/hv/types>.`` |
| ``<branch>_decoder.`` | ``decoder.branches.<nuclei/hv/types>.`` |

Pre- and post-processing reproduced from the official code (each recorded in the converted manifest):
normalisation from ``transformations.normalize`` (default mean = std = 0.5), HV maps without activation,
Virchow/Virchow2 inputs area-resized to the 14-px grid (256 → 252, 1024 → 1022) with decoder features resized back,
the CellViT++ Virchow MLP gate using GELU, DINO-style position-embedding interpolation for CellViT-256, the SAM
position grid cropped, 1024-px tiles with 64-px overlap at 0.25 µm/px.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cytoken.models.config import SegmenterConfig, build_segmenter
from cytoken.models.decoders.unetr import CELLVIT_BRANCH_NAMES
from cytoken.models.segmenter import CellSegmenter
from cytoken.models.weights_io import WeightsError, load_state_dict_strict

__all__ = ["SUPPORTED_ARCHS", "cellvit_config", "cellvit_model_from_state", "convert_cellvit_checkpoint",
           "load_cellvit_checkpoint", "map_cellvit_keys", "read_cellvit_checkpoint"]  # fmt: skip

SAM_BACKBONES = {"sam-b": "sam_b", "sam-l": "sam_l", "sam-h": "sam_h"}
SUPPORTED_ARCHS = ("CellViT", "CellViT256", "CellViTSAM", "CellViTUNI", "CellViTVirchow", "CellViTVirchow2")
PANNUKE_TYPES = {
    "Background": 0,
    "Neoplastic": 1,
    "Inflammatory": 2,
    "Connective": 3,
    "Dead": 4,
    "Epithelial": 5,
}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def read_cellvit_checkpoint(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(arch, state_dict, nested config)`` from an official checkpoint (``weights_only`` unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read {path} as a CellViT checkpoint: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(ck, dict) or "model_state_dict" not in ck or "arch" not in ck:
        keys = sorted(ck)[:10] if isinstance(ck, dict) else type(ck).__name__
        raise WeightsError(f"{path} is not a CellViT checkpoint (expected keys arch, model_state_dict, config; "
                           f"found {keys})")  # fmt: skip
    return str(ck["arch"]), dict(ck["model_state_dict"]), _nested(ck.get("config") or {})


def _nested(config: dict[str, Any]) -> dict[str, Any]:
    """Unflatten a ``.``-separated config (official checkpoints store it flattened); nested input is kept."""
    return _unflatten(config) if any("." in str(k) for k in config) else dict(config)


def cellvit_config(arch: str, config: dict[str, Any]) -> SegmenterConfig:
    """The cytoken :class:`SegmenterConfig` equivalent to an official checkpoint's arch and config.

    The config may be flat (``.``-separated keys, as stored) or nested.
    """
    config = _nested(config)
    if arch not in SUPPORTED_ARCHS:
        raise WeightsError(f"unknown CellViT architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if _get(config, "model.regression_loss", False):
        raise WeightsError("CellViT checkpoints trained with regression_loss=True are not supported")
    mean = tuple(_get(config, "transformations.normalize.mean", (0.5, 0.5, 0.5)))
    std = tuple(_get(config, "transformations.normalize.std", (0.5, 0.5, 0.5)))
    enc_kw: dict[str, Any] = {"mean": mean, "std": std}
    if arch == "CellViT256":
        encoder = "hipt256"
    elif arch == "CellViTSAM":
        backbone = str(_get(config, "model.backbone", "SAM-H")).lower()
        if backbone not in SAM_BACKBONES:
            raise WeightsError(f"CellViTSAM backbone {backbone!r} unknown; expected SAM-B, SAM-L or SAM-H")
        encoder = SAM_BACKBONES[backbone]
    elif arch == "CellViTUNI":
        encoder = "uni"
    elif arch in ("CellViTVirchow", "CellViTVirchow2"):
        encoder = "virchow" if arch == "CellViTVirchow" else "virchow2"
        enc_kw["glu_act"] = "gelu"  # CellViT++ hard-codes GELU in the SwiGLU gate
    else:  # generic CellViT
        encoder = "vit_custom"
        enc_kw.update(
            embed_dim=int(_get(config, "model.embed_dim", 384)),
            depth=int(_get(config, "model.depth", 12)),
            num_heads=int(_get(config, "model.num_heads", 6)),
            skip_depths=tuple(int(v) for v in _get(config, "model.extract_layers", (3, 6, 9, 12))),
        )
    n_types = int(_get(config, "data.num_nuclei_classes", 6))
    n_tissue = int(_get(config, "data.num_tissue_classes", 19))
    types = _get(config, "dataset_config.nuclei_types", None) or (PANNUKE_TYPES if n_types == 6 else None)
    names: list[str] = []
    if isinstance(types, dict):
        names = [n for n, i in sorted(types.items(), key=lambda kv: int(kv[1])) if int(i) != 0]
    if len(names) != n_types - 1:
        names = [f"type_{i}" for i in range(1, n_types)]
    tissues = _get(config, "dataset_config.tissue_types", None)
    tissue_names = (
        [n for n, _ in sorted(tissues.items(), key=lambda kv: int(kv[1]))]
        if isinstance(tissues, dict)
        else []
    )
    if len(tissue_names) != n_tissue:
        tissue_names = []
    return SegmenterConfig(
        encoder=encoder,
        encoder_kwargs=enc_kw,
        decoder="unetr",
        decoder_kwargs={"width_factor": 1.0, "shared": False, "out_stride": 1},
        num_classes=n_types - 1,
        class_names=names,
        num_tissue=n_tissue,
        tissue_names=tissue_names,
        hv_activation="identity",
        mpp=0.25,
        tile_size=1024,
        overlap=64,
        postprocess=dict(CELLVIT_POSTPROCESS),
    )


#: CellViT++'s post-processing (FACTS.md section 5) as ``HoverConfig`` fields: every cytoken refinement off and the
#: blurred flooding energy; official checkpoints carry it in ``SegmenterConfig.postprocess`` so the pipeline
#: reproduces the reference unless the user passes another config (equal to ``HoverConfig.cellvit()``, tested).
CELLVIT_POSTPROCESS: dict[str, float | int | bool | None] = {
    "fine_ksize": None,
    "rescue_markers": False,
    "centre_seeds": False,
    "keep_unmarked": False,
    "merge_unsupported": False,
    "energy_blur": True,
}

_HEAD_NAME = {v: k for k, v in CELLVIT_BRANCH_NAMES.items()}


def map_cellvit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official CellViT keys to cytoken's (see the module table).

    Unknown prefixes are kept as they are, so strict loading reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        if key.startswith("encoder.head."):
            new = "heads.tissue." + key[len("encoder.head.") :]
        elif key.startswith("classifier_head."):
            new = "heads.tissue." + key[len("classifier_head.") :]
        elif key.startswith(("decoder0.", "decoder1.", "decoder2.", "decoder3.")):
            new = "decoder." + key
        else:
            prefix = key.split(".", 1)[0]
            if prefix in _HEAD_NAME:
                rest = key[len(prefix) + 1 :]
                branch = _HEAD_NAME[prefix]
                if rest.startswith("decoder0_header.2."):
                    new = f"heads.{branch}." + rest[len("decoder0_header.2.") :]
                else:
                    new = f"decoder.branches.{branch}.{rest}"
        out[new] = value
    return out


def load_cellvit_checkpoint(path: str | Path) -> CellSegmenter:
    """Build the matching cytoken model for an official CellViT/CellViT++ checkpoint and load it strictly.

    Raises:
        WeightsError: unknown architecture (lists the supported ones), unmapped/unexpected keys (listed), or the
            first mis-shaped tensor.
    """
    arch, state, config = read_cellvit_checkpoint(path)
    return cellvit_model_from_state(arch, state, config, source=str(path))


def cellvit_model_from_state(
    arch: str, state: dict[str, torch.Tensor], config: dict[str, Any], *, source: str = "checkpoint"
) -> CellSegmenter:
    """Build the cytoken model for ``arch``/``config`` and load an official state dict into it strictly.

    Tensors are assigned, not copied, so a state dict of ``meta`` tensors checks the full key/shape layout of
    even the largest models without allocating their weights.
    """
    seg_config = cellvit_config(arch, config)
    with torch.device("meta"):  # no random init of hundreds of millions of weights: they are replaced below
        model = build_segmenter(seg_config)
    load_state_dict_strict(model, map_cellvit_keys(state), what=f"{arch} checkpoint {source}", assign=True)
    model.cellvit_meta = {  # type: ignore[assignment]
        "arch": arch,
        "mixed_precision": bool(_get(config, "training.mixed_precision", False)),
        "backbone": _get(config, "model.backbone"),
    }
    return model.eval()


def convert_cellvit_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/manifest.json`` from an official checkpoint."""
    from cytoken.models.store import save_segmenter
    from cytoken.weights import file_sha256

    path = Path(path)
    model = load_cellvit_checkpoint(path)
    out = Path(out_dir)
    weights = save_segmenter(model, out / "model.safetensors", meta={"converted_from": path.name})
    cfg: SegmenterConfig = model.config  # type: ignore[assignment]
    manifest = {
        "name": path.stem,
        "file": "model.safetensors",
        "sha256": file_sha256(weights),
        "source": f"converted from {path.name} (sha256 {file_sha256(path)})",
        "licence": "as the source checkpoint and its backbone (check before use)",
        "mpp": cfg.mpp,
        "tile_size": cfg.tile_size,
        "overlap": cfg.overlap,
        "class_names": cfg.class_names,
        "preprocessing": {
            "normalize_mean": cfg.encoder_kwargs.get("mean"),
            "normalize_std": cfg.encoder_kwargs.get("std"),
            "patch_size": model.patch_size,
            "inputs_not_multiple_of_patch": "area-resized down to the patch grid, decoder features resized back",
            "hv_activation": "identity (clamped to [-1, 1] at inference)",
        },
        "postprocessing": {
            "method": "HoVer watershed with CellViT++'s parameters (HoverConfig.cellvit(), scaled to the µm/px)",
            "hover_config": cfg.postprocess,
        },
        "cellvit": model.cellvit_meta,  # type: ignore[attr-defined]
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return weights
