"""Official CellViT / CellViT++ checkpoints load strictly into cytoken models (reference manifests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cytoken.models.cellvit import (
    SUPPORTED_ARCHS,
    cellvit_model_from_state,
    convert_cellvit_checkpoint,
    load_cellvit_checkpoint,
)
from cytoken.models.store import load_model
from cytoken.models.weights_io import WeightsError

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cellvit-checkpoints"
needs_ref = pytest.mark.skipif(not REF.exists(), reason="../shared/reference not present")
MANIFESTS = ["CellViT256", "CellViT-generic", "CellViTSAM-vit_b", "CellViTSAM-vit_l", "CellViTSAM-vit_h",
             "CellViTUNI", "CellViTVirchow", "CellViTVirchow2"]  # fmt: skip
PANNUKE = {"Background": 0, "Neoplastic": 1, "Inflammatory": 2, "Connective": 3, "Dead": 4, "Epithelial": 5}


def _manifest(name: str) -> dict:
    return json.loads((REF / f"{name}.json").read_text())


def _config(m: dict) -> dict:
    """The flattened config an official checkpoint stores (only the keys inference reads)."""
    cfg = {"data.num_nuclei_classes": 6, "data.num_tissue_classes": 19,
           "model.backbone": m["config_model_backbone"].split(" ")[0],
           **{f"dataset_config.nuclei_types.{k}": v for k, v in PANNUKE.items()}}  # fmt: skip
    for k, v in m["constructor_kwargs"].items():
        if k in ("embed_dim", "depth", "num_heads", "extract_layers"):
            cfg[f"model.{k}"] = v
    if m["constructor_kwargs"].get("vit_structure"):
        cfg["model.backbone"] = m["constructor_kwargs"]["vit_structure"]
    return cfg


def _state(m: dict, device: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, shape in m["state_dict"].items():
        dtype = torch.int64 if k.endswith("num_batches_tracked") else torch.float32
        out[k] = torch.empty(shape, dtype=dtype, device=device)
        if device != "meta":
            if dtype == torch.int64:
                out[k] = torch.zeros(shape, dtype=dtype)
            elif k.endswith("running_var"):
                out[k] = torch.rand(shape) + 0.5  # a variance must be positive
            else:
                out[k] = torch.randn(shape) * 0.02
    return out


@needs_ref
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_key_consumed_and_output_shapes(name: str) -> None:
    m = _manifest(name)
    state = _state(m, "meta")  # exact keys and shapes, no memory
    model = cellvit_model_from_state(m["checkpoint_arch_string"], state, _config(m))
    assert len(model.state_dict()) == len(state) == m["num_state_dict_entries"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == m["num_params"]
    expected = m["forward_output_shapes_batch1"]["256"]
    with torch.no_grad():
        out = model(torch.empty(1, 3, 256, 256, device="meta"))
    assert list(out.nuclei_logits.shape) == expected["nuclei_binary_map"]
    assert list(out.hv.shape) == expected["hv_map"]
    assert list(out.type_logits.shape) == expected["nuclei_type_map"]
    assert list(out.tissue_logits.shape) == expected["tissue_types"]
    assert list(out.tokens.shape) == expected["tokens"]
    assert model.config.class_names == ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]


@needs_ref
def test_official_file_structure_roundtrip_and_convert(tmp_path: Path) -> None:
    m = _manifest("CellViT256")
    torch.manual_seed(0)
    state = _state(m, "cpu")
    ck = {"arch": "CellViT256", "epoch": 129, "model_state_dict": state, "optimizer_state_dict": {},
          "config": _config(m) | {"transformations.normalize.mean": [0.5, 0.5, 0.5], "training.mixed_precision": True},
          "best_metric": 0.7, "best_epoch": 120, "wandb_id": "x", "logdir": "/tmp", "run_name": "r",
          "scaler_state_dict": None}  # fmt: skip
    path = tmp_path / "CellViT-256-x40.pth"
    torch.save(ck, path)
    model = load_cellvit_checkpoint(path)
    assert model.cellvit_meta["mixed_precision"] is True
    got = model.state_dict()
    assert torch.equal(got["decoder.branches.hv.decoder3_upsampler.0.block.0.weight"],
                       state["hv_map_decoder.decoder3_upsampler.0.block.0.weight"])  # fmt: skip
    assert torch.equal(got["heads.types.weight"], state["nuclei_type_maps_decoder.decoder0_header.2.weight"])
    assert torch.equal(got["heads.tissue.weight"], state["encoder.head.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
    weights = convert_cellvit_checkpoint(path, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["preprocessing"]["normalize_mean"] == [0.5, 0.5, 0.5] and manifest["tile_size"] == 1024
    converted, info = load_model(weights)
    with torch.no_grad():
        b = converted(x)
    assert torch.allclose(a.nuclei_logits, b.nuclei_logits) and torch.allclose(a.hv, b.hv)
    assert len(info.sha256) == 64


@needs_ref
def test_bad_checkpoints(tmp_path: Path) -> None:
    m = _manifest("CellViT256")
    state = _state(m, "meta")
    with pytest.raises(WeightsError, match="supported: " + ", ".join(SUPPORTED_ARCHS)):
        cellvit_model_from_state("CellViTMagic", state, _config(m))
    bad = dict(state)
    bad["encoder.blocks.0.attn.qkv.weight"] = torch.empty(10, 384, device="meta")
    with pytest.raises(
        WeightsError, match=r"first shape mismatch: encoder\.blocks\.0\.attn\.qkv\.weight: file \(10, 384\)"
    ):
        cellvit_model_from_state("CellViT256", bad, _config(m))
    missing = dict(state)
    missing.pop("hv_map_decoder.decoder0_header.2.bias")
    missing["hv_map_decoder.extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(WeightsError, match=r"missing keys: heads\.hv\.bias"):
        cellvit_model_from_state("CellViT256", missing, _config(m))
    torch.save({"weights": 1}, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="not a CellViT checkpoint"):
        load_cellvit_checkpoint(tmp_path / "x.pth")
