"""Flip test-time augmentation: flipped predictions are mapped back exactly (HV signs included)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cytoken.cli.main import main
from cytoken.models import SegmenterConfig, build_segmenter
from cytoken.pipeline.predictor import Predictor


class Equivariant(nn.Module):
    """Maps that commute with flips by construction: point-wise probabilities, and HV maps that are central
    differences of the input (a horizontal difference changes sign under a left-right flip, as a real horizontal
    distance map does; a vertical one does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SegmenterConfig(encoder="vit_tiny_test", num_classes=2, class_names=["a", "b"])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        g = x[:, :1]
        gx = F.pad(g, (1, 1, 0, 0), mode="replicate")
        gy = F.pad(g, (0, 0, 1, 1), mode="replicate")
        hv = torch.cat([gx[..., 2:] - gx[..., :-2], gy[..., 2:, :] - gy[..., :-2, :]], 1) / 2
        p = torch.sigmoid(3 * x[:, 1])
        types = torch.softmax(torch.cat([x, x[:, :1] ** 2], 1), 1)
        return SimpleNamespace(nuclei_prob=torch.stack([1 - p, p], 1), hv=hv, type_prob=types,
                               tokens=F.avg_pool2d(x, 16))  # fmt: skip


def test_flipped_passes_map_back_exactly() -> None:
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    plain = Predictor(Equivariant())(tiles)
    tta = Predictor(Equivariant(), tta=True)(tiles)
    for a, b in zip(plain, tta):
        np.testing.assert_allclose(b.nuclei_prob, a.nuclei_prob, atol=1e-6)
        np.testing.assert_allclose(b.hv, a.hv, atol=1e-6)
        np.testing.assert_allclose(b.type_prob, a.type_prob, atol=1e-6)
        np.testing.assert_array_equal(b.tokens, a.tokens)
    assert np.abs(plain[0].hv).max() > 0.1  # not trivially zero


def test_tta_on_a_real_network_averages_and_keeps_tokens() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2, class_names=["a", "b"]))
    tiles = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    plain, tta = Predictor(model)(tiles)[0], Predictor(model, tta=True)(tiles)[0]
    np.testing.assert_array_equal(tta.tokens, plain.tokens)
    assert np.abs(tta.hv).max() <= 1 and tta.nuclei_prob.min() >= 0 and tta.nuclei_prob.max() <= 1
    np.testing.assert_allclose(tta.type_prob.sum(0), 1, atol=1e-5)
    assert not np.allclose(tta.nuclei_prob, plain.nuclei_prob)  # a random network is not flip-equivariant


@pytest.mark.parametrize("flag", [[], ["--tta"]])
def test_run_json_says_whether_tta_was_used(tiny_model: Path, tmp_path: Path, flag: list[str]) -> None:
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "b.png")
    assert main(["segment", str(tmp_path / "b.png"), "--model", str(tiny_model), "--mpp", "0.25", *flag,
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "o" / "b" / "run.json").read_text())["tta"] is bool(flag)


def test_segment_config_tta_with_a_predictor_built_without_it_is_refused() -> None:
    from cytoken.pipeline.image import SegmentConfig, segment_image
    from cytoken.types import CytokenError

    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    with pytest.raises(CytokenError, match=r"tta is asked for but the given Predictor was built without it"):
        segment_image(image, Predictor(Equivariant()), 0.25, config=SegmentConfig(tta=True))


def test_segment_slide_tta_with_a_predictor_built_without_it_is_refused(tmp_path: Path) -> None:
    from cytoken.pipeline.image import SegmentConfig
    from cytoken.pipeline.slide import SlideConfig, segment_slide
    from cytoken.types import CytokenError
    from cytoken.weights import ModelInfo

    info = ModelInfo(name="eq", sha256="0", source="test", licence="test")
    config = SlideConfig(segment=SegmentConfig(tta=True))
    with pytest.raises(CytokenError, match=r"tta is asked for but the given Predictor was built without it"):
        segment_slide(tmp_path / "any.svs", tmp_path / "out", Predictor(Equivariant()), info, config, progress=False)
    assert not (tmp_path / "out").exists()
