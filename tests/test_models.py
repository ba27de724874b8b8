"""Encoders, decoders, heads, the segmenter, and strict weight loading (tiny depths for speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cytoken.models import (
    ENCODERS,
    CellSegmenter,
    SegmenterConfig,
    build_encoder,
    build_segmenter,
    load_segmenter,
    save_segmenter,
)
from cytoken.models.encoders.timm_wrapper import timm_available
from cytoken.models.weights_io import WeightsError, load_encoder_weights, resolve_weights
from cytoken.types import CytokenError

torch.set_num_threads(1)

# name -> (embed dim, patch size, normalisation mean[0])
BUILDERS = {
    "hipt256": (384, 16, 0.5),
    "uni": (1024, 16, 0.485),
    "virchow": (1280, 14, 0.485),
    "virchow2": (1280, 14, 0.485),
    "sam_b": (768, 16, 0.5),
    "sam_l": (1024, 16, 0.5),
    "sam_h": (1280, 16, 0.5),
    "cytoken_s16": (192, 16, 0.5),
    "vit_tiny_test": (32, 16, 0.5),
    "vit_custom": (384, 16, 0.5),
}


def test_every_registered_builder_is_covered() -> None:
    from cytoken.models.encoders import zoo  # noqa: F401

    assert set(ENCODERS.names()) == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_encoder_builder_shapes(name: str) -> None:
    dim, patch, mean0 = BUILDERS[name]
    enc = build_encoder(name, depth=2)
    spec = enc.spec
    assert (spec.embed_dim, spec.patch_size) == (dim, patch)
    assert spec.mean[0] == pytest.approx(mean0)
    assert len(spec.skip_depths) == 4 and max(spec.skip_depths) <= 2
    assert spec.native_mpp > 0
    side = patch * 4
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, side, side))
    assert len(feats.skips) == 4
    for s in feats.skips:
        assert tuple(s.shape) == (1, dim, 4, 4)
    assert tuple(feats.tokens.shape) == (1, dim, 4, 4)


def test_full_depth_specs_match_published_layouts() -> None:
    # skip depths and patch sizes of the real architectures (no forward pass: construction only, on meta)
    with torch.device("meta"):
        assert build_encoder("hipt256").spec.skip_depths == (3, 6, 9, 12)
        assert build_encoder("uni").spec.skip_depths == (6, 12, 18, 24)
        assert build_encoder("virchow2").spec.skip_depths == (8, 16, 24, 32)
        assert build_encoder("sam_h").spec.skip_depths == (8, 16, 24, 32)
        v2 = build_encoder("virchow2")
        assert tuple(v2.reg_token.shape) == (1, 4, 1280)
        assert tuple(v2.pos_embed.shape) == (1, 261, 1280)
        assert tuple(v2.blocks[0].mlp.fc1.weight.shape) == (6832, 1280)


def test_input_not_multiple_of_patch_rejected_by_encoder() -> None:
    enc = build_encoder("vit_tiny_test")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.zeros(1, 3, 40, 40))


@pytest.mark.parametrize(
    "decoder,kwargs",
    [
        ("unetr", {}),
        ("unetr", {"width_factor": 0.25, "shared": True, "out_stride": 2}),
        ("dpt", {"features": 32, "out_channels": 16}),
    ],
)
def test_segmenter_outputs(decoder: str, kwargs: dict) -> None:
    cfg = SegmenterConfig(
        encoder="vit_tiny_test", decoder=decoder, decoder_kwargs=kwargs, num_classes=3, num_tissue=5
    )
    model = build_segmenter(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert tuple(out.nuclei_logits.shape) == (2, 2, 64, 96)
    assert tuple(out.hv.shape) == (2, 2, 64, 96)
    assert float(out.hv.abs().max()) <= 1.0
    assert tuple(out.type_logits.shape) == (2, 4, 64, 96)
    assert tuple(out.tissue_logits.shape) == (2, 5)
    assert tuple(out.tokens.shape) == (2, 32, 4, 6)
    assert torch.allclose(out.nuclei_prob.sum(1), torch.ones(2, 64, 96), atol=1e-5)


def test_14px_encoder_handles_inputs_not_multiple_of_14() -> None:
    cfg = SegmenterConfig(encoder="vit_tiny_test", encoder_kwargs={"patch_size": 14}, num_classes=2)
    model = build_segmenter(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))  # 64 -> encoder sees 56 (4x4 tokens), outputs back at 64
    assert tuple(out.nuclei_logits.shape[-2:]) == (64, 64)
    assert tuple(out.tokens.shape[-2:]) == (4, 4)


def test_no_type_head() -> None:
    model = build_segmenter(SegmenterConfig(encoder="vit_tiny_test")).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert out.type_logits is None and out.type_prob is None and out.tissue_logits is None


def test_preprocess_uint8_matches_spec_normalisation() -> None:
    model = build_segmenter(SegmenterConfig(encoder="vit_tiny_test"))
    x = torch.full((1, 8, 8, 3), 255, dtype=torch.uint8)
    assert torch.allclose(model.preprocess(x), torch.ones(1, 3, 8, 8))  # (1 - 0.5) / 0.5


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="class_names"):
        SegmenterConfig(num_classes=2, class_names=["a"])
    with pytest.raises(ValueError, match="overlap"):
        SegmenterConfig(tile_size=64, overlap=64)
    with pytest.raises(ValueError):
        SegmenterConfig(unknown_key=1)


def test_save_load_roundtrip_fp16(tmp_path) -> None:
    cfg = SegmenterConfig(encoder="vit_tiny_test", num_classes=2, class_names=["a", "b"])
    model = build_segmenter(cfg).eval()
    path = save_segmenter(model, tmp_path / "m.safetensors", half=True)
    loaded = load_segmenter(path)
    assert isinstance(loaded, CellSegmenter) and loaded.config == cfg
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.allclose(a.nuclei_logits, b.nuclei_logits, atol=5e-2)


def test_load_segmenter_wrong_architecture_lists_keys(tmp_path) -> None:
    small = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2))
    path = save_segmenter(small, tmp_path / "m.safetensors")
    # tamper: same file, but claim a different architecture in the metadata
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    other = SegmenterConfig(encoder="vit_tiny_test", num_classes=4)
    save_file(
        state,
        str(tmp_path / "bad.safetensors"),
        metadata={"cytoken.segmenter_config": other.model_dump_json()},
    )
    with pytest.raises(WeightsError, match=r"first shape mismatch: heads\.types\.weight"):
        load_segmenter(tmp_path / "bad.safetensors")


def test_encoder_weights_local_file_strict(tmp_path) -> None:
    from safetensors.torch import save_file

    src = build_encoder("hipt256", depth=2)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    # a DINO-style checkpoint: teacher weights with a backbone. prefix and a projection head
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()} | {"head.mlp.0.weight": torch.zeros(2)}},
               tmp_path / "dino.pth")  # fmt: skip
    dst = build_encoder("hipt256", depth=2, pretrained=str(tmp_path / "dino.pth"))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k])
    bad = dict(state)
    bad.pop("blocks.0.attn.qkv.weight")
    bad["blocks.9.extra"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_encoder_weights(build_encoder("hipt256", depth=2), tmp_path / "bad.safetensors", family="timm")
    msg = str(err.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in msg and "unexpected keys: blocks.9.extra" in msg


def test_missing_weight_file_and_offline_hub(tmp_path, monkeypatch) -> None:
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights(tmp_path / "nope.pth")
    hub = pytest.importorskip("huggingface_hub")

    def boom(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(hub, "hf_hub_download", boom)
    with pytest.raises(
        WeightsError, match=r"could not download 'pytorch_model\.bin' from hub repo 'MahmoodLab/UNI'"
    ):
        resolve_weights("hf-hub:MahmoodLab/UNI")


def test_timm_builder() -> None:
    ok, why = timm_available()
    if not ok:
        with pytest.raises(CytokenError, match="timm encoders need an importable timm"):
            build_encoder("timm:vit_small_patch16_224", depth=2)
        pytest.skip(f"timm is not importable here ({why}); checked the clear error instead")
    enc = build_encoder("timm:vit_small_patch16_224", depth=2)
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, 64, 64))
    assert tuple(feats.tokens.shape) == (1, 384, 4, 4)


def test_unknown_encoder_lists_known() -> None:
    with pytest.raises(KeyError, match="known: cytoken_s16"):
        build_encoder("resnet9000")


REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cellvit-checkpoints"


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference not present")
@pytest.mark.parametrize("name,manifest", [("hipt256", "CellViT256"), ("uni", "CellViTUNI"),
                                          ("virchow", "CellViTVirchow"), ("virchow2", "CellViTVirchow2")])  # fmt: skip
def test_encoder_loads_released_weight_layout(name: str, manifest: str, tmp_path) -> None:
    """A file in the released layout (timm keys and shapes from the official manifests, no head) loads strictly.

    Only the first two blocks are kept (the test builds the encoder with depth 2) so the file stays small; every
    other shape is the published one (e.g. Virchow's packed SwiGLU fc1 [6832, 1280], Virchow2's 4 register tokens).
    """
    shapes = json.loads((REFERENCE / f"{manifest}.json").read_text())["state_dict"]
    released = {}
    for key, shape in shapes.items():
        if not key.startswith("encoder.") or key.startswith("encoder.head."):
            continue  # CellViT's own parts, and its tissue head on the encoder, are not in the released file
        k = key[len("encoder.") :]
        if k.startswith("blocks.") and int(k.split(".")[1]) >= 2:
            continue
        released[k] = torch.randn(shape)
    torch.save(released, tmp_path / "pytorch_model.bin")
    enc = build_encoder(name, depth=2, pretrained=str(tmp_path / "pytorch_model.bin"))
    state = enc.state_dict()
    assert set(state) == set(released)
    for k, v in released.items():
        assert torch.equal(state[k], v), k
    out = enc(torch.rand(1, 3, 2 * enc.spec.patch_size, 2 * enc.spec.patch_size))
    assert out.tokens.shape == (1, enc.spec.embed_dim, 2, 2)


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference not present")
def test_sam_h_loads_the_released_sam_checkpoint_layout(tmp_path) -> None:
    """The released ``sam_vit_h`` file (``image_encoder.*`` + prompt encoder + mask decoder) loads into ``sam_h``.

    At full depth (32 blocks, global attention in blocks 7/15/23/31 with (127, 80) relative positions, windowed
    elsewhere with (27, 80)), on the ``meta`` device: the real keys and shapes, no memory. The image-encoder keys are
    the CellViT-SAM-H manifest's ``encoder.*`` keys (CellViT keeps SAM's names).
    """
    shapes = json.loads((REFERENCE / "CellViTSAM-vit_h.json").read_text())["state_dict"]
    released = {f"image_encoder.{k[len('encoder.') :]}": torch.empty(s, device="meta")
                for k, s in shapes.items() if k.startswith("encoder.")}  # fmt: skip
    released["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.empty(2, 128, device="meta")
    released["mask_decoder.iou_token.weight"] = torch.empty(1, 256, device="meta")
    torch.save(released, tmp_path / "sam_vit_h_4b8939.pth")
    with torch.device("meta"):
        enc = build_encoder("sam_h", pretrained=str(tmp_path / "sam_vit_h_4b8939.pth"))
    assert len(enc.state_dict()) == len(released) - 2 == 457
    assert enc.spec.skip_depths == (8, 16, 24, 32)
    out = enc(torch.empty(1, 3, 256, 256, device="meta"))
    assert out.tokens.shape == (1, 1280, 16, 16)
    # a file from another SAM size is refused with the first mismatching shape
    wrong = {k: torch.empty([*s[:-1], s[-1] // 2] if k.endswith("pos_embed") else s, device="meta")
             for k, s in ((k, list(v.shape)) for k, v in released.items())}  # fmt: skip
    torch.save(wrong, tmp_path / "wrong.pth")
    with torch.device("meta"), pytest.raises(WeightsError, match="first shape mismatch: pos_embed"):
        build_encoder("sam_h", pretrained=str(tmp_path / "wrong.pth"))
