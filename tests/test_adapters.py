"""CellVTA-style adapter: attached by config, zero gates leave the encoder unchanged, gradients reach it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cytoken.models import SegmenterConfig, build_encoder, build_segmenter, load_segmenter, save_segmenter
from cytoken.models.adapters import ADAPTERS, CellVTAAdapter, attach_adapter

torch.set_num_threads(1)

CELLVTA = {"kind": "cellvta", "inject_every": 1, "width": 8, "dim": 16, "num_heads": 2}


def _pair(name: str, adapter: dict, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A plain encoder and the same encoder (same weights) with an adapter, both in eval mode."""
    torch.manual_seed(0)
    plain = build_encoder(name, **kw).eval()
    adapted = build_encoder(name, adapter=adapter, **kw).eval()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("adapter.") for k in missing)
    return plain, adapted


def _randomise_gates(enc: torch.nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for inj in enc.adapter.injectors:
            inj.gate.normal_(0.0, std)


@pytest.mark.parametrize(("name", "kw"), [("vit_tiny_test", {}), ("hipt256", {"depth": 2})])
def test_zero_gates_give_identical_outputs_and_same_shapes(name: str, kw: dict) -> None:
    plain, adapted = _pair(name, CELLVTA, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), adapted(x)
        assert all(torch.equal(s, t) for s, t in zip(a.skips, b.skips))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cls, b.cls)
        _randomise_gates(adapted)
        c = adapted(x)
    assert [tuple(s.shape) for s in c.skips] == [tuple(s.shape) for s in a.skips]
    assert c.cls.shape == a.cls.shape
    assert not torch.allclose(c.tokens, a.tokens)  # the injection now changes the tokens


def test_gradients_flow_into_adapter() -> None:
    _, enc = _pair("hipt256", CELLVTA, depth=2)
    enc.train()
    x = torch.randn(2, 3, 64, 64)
    enc(x).tokens.square().mean().backward()
    grads = {n: p.grad for n, p in enc.adapter.named_parameters()}
    # zero gates: only the gates get a gradient (the attention's output is multiplied by them)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".gate"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if not n.endswith(".gate"))
    enc.zero_grad()
    _randomise_gates(enc, 0.1)
    enc(x).tokens.square().mean().backward()
    for n, p in enc.adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_config_builds_adapted_segmenter_and_roundtrips(tmp_path: Path) -> None:
    cfg = SegmenterConfig(
        encoder="hipt256",
        encoder_kwargs={"depth": 2, "adapter": {**CELLVTA, "inject_at": [2], "window": 3}},
        decoder_kwargs={"width_factor": 0.125},
        num_classes=2,
    )
    m = build_segmenter(cfg).eval()
    assert isinstance(m.encoder.adapter, CellVTAAdapter) and m.encoder.adapter.inject_at == (2,)
    assert any(k.startswith("encoder.adapter.") for k in m.state_dict())
    _randomise_gates(m.encoder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
        assert tuple(out.hv.shape) == (1, 2, 64, 64) and tuple(out.tokens.shape) == (1, 384, 4, 4)
        back = load_segmenter(save_segmenter(m, tmp_path / "m.safetensors"))
        assert torch.equal(back(x).hv, out.hv)


def test_plain_config_has_no_adapter() -> None:
    m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test"))
    assert getattr(m.encoder, "adapter", None) is None
    assert not any("adapter" in k for k in m.state_dict())


def test_14px_tokens_window_and_sam_encoder() -> None:
    # 14-px tokens: CNN maps are resampled to 4/2/1 cells per token; window 3 masks keys outside the image
    plain, enc = _pair("vit_tiny_test", {**CELLVTA, "window": 3}, patch_size=14)
    _randomise_gates(enc)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        out = enc(x)
    assert tuple(out.tokens.shape) == (1, 32, 4, 4) and torch.isfinite(out.tokens).all()
    assert enc.adapter.cells == (4, 2, 1)
    # SAM: channels-last token grids, no class token
    plain, sam = _pair("sam_b", CELLVTA, depth=2)
    with torch.no_grad():
        assert torch.equal(plain(torch.ones(1, 3, 32, 32)).tokens, sam(torch.ones(1, 3, 32, 32)).tokens)


def test_deepcopy_keeps_hooks_on_the_copy() -> None:
    _, enc = _pair("vit_tiny_test", CELLVTA)
    dup = copy.deepcopy(enc)
    _randomise_gates(dup)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain_out = build_encoder("vit_tiny_test").eval()
        plain_out.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("adapter.")})
        assert torch.equal(enc(x).tokens, plain_out(x).tokens)  # the original's gates are still zero
        assert not torch.allclose(dup(x).tokens, enc(x).tokens)


def test_bad_adapter_specs() -> None:
    assert "cellvta" in ADAPTERS
    enc = build_encoder("vit_tiny_test")
    with pytest.raises(ValueError, match=r"registered: .*cellvta"):
        attach_adapter(enc, {"kind": "deformable"})
    with pytest.raises(ValueError, match="needs a 'kind'"):
        attach_adapter(enc, {"inject_every": 2})
    with pytest.raises(ValueError, match=r"bad arguments.*colour"):
        attach_adapter(enc, {"kind": "cellvta", "colour": 1})
    with pytest.raises(ValueError, match="inject_at"):
        attach_adapter(enc, {"kind": "cellvta", "inject_at": [3]})
    with pytest.raises(ValueError, match="odd"):
        attach_adapter(enc, {"kind": "cellvta", "window": 2})
    attach_adapter(enc, {"kind": "cellvta"})
    with pytest.raises(ValueError, match="already has an adapter"):
        attach_adapter(enc, {"kind": "cellvta"})
