"""Multi-channel inputs (kernel widening rules, config end to end, real IF qptiff, H&E + IF) and token pooling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cytoken.io.ifimage import IFImage
from cytoken.models import SegmenterConfig, build_encoder, build_segmenter, load_segmenter, save_segmenter
from cytoken.models.multichannel import (
    InputChannel,
    channel_stats,
    expand_conv,
    expand_kernel,
    expand_segmenter_channels,
    model_channels,
    stack_channels,
    with_channels,
)
from cytoken.types import CytokenError

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
TINY = {"decoder_kwargs": {"width_factor": 0.125}}


def test_grey_rule_preserves_the_response_to_equal_channels() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    grey3 = torch.rand(2, 1, 9, 9).expand(-1, 3, -1, -1)
    for c in (1, 2, 4, 6):
        wide = expand_conv(conv, c, "grey")
        assert wide.in_channels == c and wide.bias is conv.bias
        grey = grey3[:, :1].expand(-1, c, -1, -1)
        assert torch.allclose(wide(grey), conv(grey3), atol=1e-5), c
    six = expand_kernel(conv.weight, 6)
    assert torch.allclose(six[:, :3], conv.weight * 0.5) and torch.allclose(six[:, 3], conv.weight.mean(1) * 0.5)


def test_zero_rule_keeps_the_rgb_response() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 2, stride=2)
    wide = expand_conv(conv, 5, "zero")
    x = torch.randn(1, 5, 8, 8)
    assert torch.equal(wide(x), conv(x[:, :3]))
    with pytest.raises(ValueError, match="cannot reduce"):
        expand_kernel(conv.weight, 2, "zero")
    with pytest.raises(ValueError, match="'grey' or 'zero'"):
        expand_kernel(conv.weight, 4, "mean")  # type: ignore[arg-type]


def test_normalisation_of_extra_channels() -> None:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = channel_stats(*imagenet, 5, [InputChannel(name=n) for n in "RGB"] + [
        InputChannel(name="DAPI", mean=0.1, std=0.2), InputChannel(name="CD3")])  # fmt: skip
    assert mean == (0.485, 0.456, 0.406, 0.1, 0.5) and std == (0.229, 0.224, 0.225, 0.2, 0.5)
    assert channel_stats(*imagenet, 1) == ((0.5,), (0.5,))  # fewer channels than RGB: nothing is RGB any more


# load_segmenter rebuilds from the stored config, whose encoder_kwargs still name the pretrained file: the encoder
# builder then copies it into meta tensors (a no-op torch warns about) before the saved weights are assigned.
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_pretrained_rgb_weights_kept_and_config_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = build_encoder("vit_tiny_test").eval()
    from safetensors.torch import save_file

    save_file(rgb.state_dict(), str(tmp_path / "enc.safetensors"))
    cfg = SegmenterConfig(encoder="vit_tiny_test", encoder_kwargs={"pretrained": str(tmp_path / "enc.safetensors")},
                          in_chans=6, channels=["R", "G", "B", "DAPI", {"name": "FITC", "mean": 0.2}, "Cy3"],
                          num_classes=2, **TINY)  # fmt: skip
    m = build_segmenter(cfg).eval()
    w = m.encoder.patch_embed.proj.weight
    assert torch.allclose(w[:, :3], rgb.patch_embed.proj.weight * 0.5)
    assert m.encoder.spec.mean == (0.5, 0.5, 0.5, 0.5, 0.2, 0.5) and m.encoder.spec.in_chans == 6
    assert m.decoder.decoder0[0].block[0].in_channels == 6
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.encoder(grey.expand(-1, 6, -1, -1)).tokens, rgb(grey.expand(-1, 3, -1, -1)).tokens,
                              atol=1e-5)  # fmt: skip
        x = m.preprocess(torch.rand(1, 6, 64, 64))
        back = load_segmenter(save_segmenter(m, tmp_path / "m6.safetensors"))
        assert torch.equal(back(x).hv, m(x).hv)
    assert [c.name for c in back.config.channels] == ["R", "G", "B", "DAPI", "FITC", "Cy3"]
    with pytest.raises(ValidationError, match="2 channels for in_chans=3"):
        SegmenterConfig(channels=["DAPI", "CD3"])
    with pytest.raises(ValidationError, match="unique"):
        SegmenterConfig(in_chans=2, channels=["DAPI", "dapi"])


@pytest.mark.parametrize("decoder", ["unetr", "dpt"])
def test_expand_existing_segmenter_with_adapter(tmp_path: Path, decoder: str) -> None:
    torch.manual_seed(0)
    kw = {"decoder_kwargs": {"features": 16, "out_channels": 8}} if decoder == "dpt" else TINY
    m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", decoder=decoder, num_classes=2,
                                        encoder_kwargs={"adapter": {"kind": "cellvta", "width": 4, "dim": 8,
                                                                    "num_heads": 2}}, **kw)).eval()  # fmt: skip
    with torch.no_grad():
        for inj in m.encoder.adapter.injectors:
            inj.gate.fill_(0.3)
        grey = torch.rand(1, 1, 48, 48)
        want = m(grey.expand(-1, 3, -1, -1))
        expand_segmenter_channels(m, ["R", "G", "B", "DAPI"], init="grey")
        assert m.encoder.adapter.prior.stem[0].in_channels == 4
        got = m(grey.expand(-1, 4, -1, -1))
        assert (got.nuclei_logits - want.nuclei_logits).abs().max() < 1e-4
        assert m.config.in_chans == 4 and m.encoder.spec.mean == (0.5,) * 4
        x = torch.randn(1, 4, 48, 48)
        back = load_segmenter(save_segmenter(m, tmp_path / "m4.safetensors"))
        assert torch.equal(back(x).hv, m(x).hv)


def test_expand_with_zero_rule_keeps_rgb_outputs() -> None:
    torch.manual_seed(0)
    m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2, **TINY)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = m(x).type_logits
        expand_segmenter_channels(m, 5, init="zero")
        got = m(torch.cat([x, torch.randn(1, 2, 32, 32)], dim=1)).type_logits
    assert torch.allclose(got, want, atol=1e-6)
    assert [c.name for c in m.config.channels] == ["R", "G", "B", "ch3", "ch4"]


@needs_data
def test_real_qptiff_through_a_tiny_model() -> None:
    from cytoken.io.ifimage import read_if

    img = read_if(SHARED / "if_sample" / "small_vectra.qptiff")
    assert img.channel_names == ("DAPI", "FITC", "Cy3")
    crop = IFImage(img.data[:, 600:664, 800:864], img.channel_names, mpp=img.mpp)
    # the model wants DAPI first and Cy3 second: channels are picked by name, not by file order
    cfg = with_channels(SegmenterConfig(encoder="vit_tiny_test", num_classes=2, **TINY), ["dapi", "Cy3"])
    a = model_channels(crop, cfg, scale="percentile")
    assert a.shape == (2, 64, 64) and a.dtype == np.float32 and a.min() >= 0 and a.max() == pytest.approx(1.0)
    raw = model_channels(crop, cfg)
    assert np.allclose(raw[1], crop.data[2] / 255.0)
    m = build_segmenter(cfg).eval()
    with torch.no_grad():
        out = m(m.preprocess(torch.from_numpy(a)[None]))
    assert tuple(out.nuclei_logits.shape) == (1, 2, 64, 64) and torch.isfinite(out.hv).all()
    with pytest.raises(CytokenError, match=r"model reads channels \['DAPI', 'CD8'\].*'DAPI', 'FITC', 'Cy3'"):
        model_channels(crop, with_channels(cfg, ["DAPI", "CD8"]))


@needs_data
def test_he_plus_synthetic_if_six_channels() -> None:
    from PIL import Image
    from scipy import ndimage as ndi

    name = "TCGA-2Z-A9J9-01A-01-TS1.png"
    he = np.array(Image.open(SHARED / "monuseg" / "test" / "images" / name))[:128, :128]
    labels = np.array(Image.open(SHARED / "monuseg" / "test" / "labels" / name))[:128, :128]
    ids = np.unique(labels[labels > 0])
    dapi = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0)
    cd3 = ndi.gaussian_filter(np.isin(labels, ids[::3]).astype(np.float32), 1.5)
    ck = ndi.gaussian_filter(np.isin(labels, ids[1::3]).astype(np.float32), 1.5)
    if_img = IFImage((np.stack([dapi, cd3, ck]) * 40000).astype(np.uint16), ("DAPI", "CD3", "PanCK"), mpp=0.25)
    stacked = stack_channels(he, if_img)
    assert stacked.channel_names == ("R", "G", "B", "DAPI", "CD3", "PanCK")
    assert np.allclose(stacked.data[0], he[..., 0] / 255.0) and np.allclose(stacked.data[3], if_img.data[0] / 65535)
    cfg = with_channels(SegmenterConfig(encoder="hipt256", encoder_kwargs={"depth": 2}, num_classes=3, **TINY),
                        stacked.channel_names)  # fmt: skip
    m = build_segmenter(cfg).eval()
    x = m.preprocess(torch.from_numpy(model_channels(stacked, cfg))[None])
    assert x.shape == (1, 6, 128, 128)
    with torch.no_grad():
        out = m(x)
    assert tuple(out.type_logits.shape) == (1, 4, 128, 128) and tuple(out.tokens.shape) == (1, 384, 8, 8)
    with pytest.raises(ValueError, match="register first"):
        stack_channels(he[:64], if_img)


def test_token_pool_must_match_the_encoder_patch_size() -> None:
    with pytest.raises(ValueError, match="token_pool=16 px does not fit encoder 'vit_tiny_test', whose tokens are 14"):
        build_segmenter(SegmenterConfig(encoder="vit_tiny_test", encoder_kwargs={"patch_size": 14}, token_pool=16))
    with torch.device("meta"):  # full-size Virchow layout without allocating it
        with pytest.raises(ValueError, match="whose tokens are 14 px"):
            build_segmenter(SegmenterConfig(encoder="virchow", encoder_kwargs={"depth": 1}, token_pool=16))
        assert build_segmenter(SegmenterConfig(encoder="virchow", encoder_kwargs={"depth": 1}, token_pool=14))
    m = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", token_pool=16))
    assert m.patch_size == m.config.token_pool == 16
