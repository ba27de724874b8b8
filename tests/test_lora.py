"""LoRA on encoder attention/MLP layers: identity at start, frozen base, separate save/load, exact merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cytoken.models import SegmenterConfig, build_encoder, build_segmenter, load_segmenter, save_segmenter
from cytoken.models.lora import LoRALinear, add_lora, load_lora, lora_layers, lora_state_dict, merge_lora, save_lora
from cytoken.models.weights_io import WeightsError, load_state_dict_strict

torch.set_num_threads(1)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return build_encoder("vit_tiny_test", depth=2).eval()


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0.0, 0.2)


def test_identity_at_start_and_only_lora_trains() -> None:
    enc = _encoder()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = enc(x).tokens
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    names = add_lora(enc, rank=4, alpha=8, targets=("qkv", "proj"))
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert type(enc.patch_embed.proj) is nn.Conv2d  # `proj` targets attention only
    assert torch.equal(enc(x).tokens, ref)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    # the frozen weights keep their names (state dict = base layout + LoRA tensors)
    assert set(enc.state_dict()) == set(base) | trainable
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
    enc.train()
    enc(x).tokens.square().mean().backward()
    opt.step()
    assert all(torch.equal(v, base[k]) for k, v in enc.state_dict().items() if k in base)
    assert any(m.lora_B.abs().sum() > 0 for m in lora_layers(enc).values())


def test_mlp_targets_and_sam_encoder() -> None:
    enc = _encoder()
    assert add_lora(enc, rank=2, targets=["fc1", "fc2"]) == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"
    ]  # fmt: skip
    sam = build_encoder("sam_b", depth=1)
    assert add_lora(sam, rank=2, targets=["qkv", "lin1", "lin2"]) == [
        "blocks.0.attn.qkv", "blocks.0.mlp.lin1", "blocks.0.mlp.lin2"
    ]  # fmt: skip


def test_save_load_lora_separately(tmp_path: Path) -> None:
    enc = _encoder()
    add_lora(enc, rank=4, alpha=8, targets=["qkv", "proj", "fc1"])
    _perturb(enc)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        want = enc(x).tokens
    path = save_lora(enc, tmp_path / "lora.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(lora_state_dict(enc)) and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    fresh = _encoder()  # same frozen weights, no LoRA yet: load_lora adds the layers named in the file
    assert load_lora(fresh, path) == list(lora_layers(enc))
    with torch.no_grad():
        assert torch.equal(fresh(x).tokens, want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == keys
    wrong_rank = _encoder()
    add_lora(wrong_rank, rank=2, targets=["qkv", "proj", "fc1"])
    with pytest.raises(WeightsError, match="rank"):
        load_lora(wrong_rank, path)
    fewer = _encoder()
    add_lora(fewer, rank=4, targets=["qkv", "proj", "fc1", "fc2"])
    with pytest.raises(WeightsError, match="missing"):
        load_lora(fewer, path)
    with pytest.raises(WeightsError, match="not a cytoken LoRA file"):
        load_lora(_encoder(), save_segmenter(build_segmenter(SegmenterConfig(encoder="vit_tiny_test")),
                                             tmp_path / "seg.safetensors"))  # fmt: skip


def test_merge_matches_and_restores_base_layout(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2)).eval()
    add_lora(model.encoder, rank=4, alpha=4, targets=["qkv", "proj", "fc1", "fc2"])
    _perturb(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        merge_lora(model)
        got = model(x)
    assert not lora_layers(model)
    assert (got.tokens - want.tokens).abs().max() < 1e-5
    assert (got.nuclei_logits - want.nuclei_logits).abs().max() < 1e-5
    plain = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2))
    load_state_dict_strict(plain, model.state_dict())  # merged = base layout
    back = load_segmenter(save_segmenter(model, tmp_path / "merged.safetensors"))
    with torch.no_grad():
        assert (back(x).hv - got.hv).abs().max() < 1e-6


def test_lora_linear_without_bias_and_errors() -> None:
    lin = nn.Linear(6, 5, bias=False)
    lora = LoRALinear(lin, rank=2, alpha=2.0)
    assert lora.bias is None and lora.weight is lin.weight
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 6)
    assert torch.allclose(lora.merged()(x), lora(x), atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(lin, rank=0, alpha=1.0)
    enc = _encoder()
    with pytest.raises(ValueError, match="allowed"):
        add_lora(enc, targets=["query"])
    add_lora(enc, targets="qkv")
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(enc, targets="qkv")
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(nn.Linear(2, 2), "unused.safetensors")
