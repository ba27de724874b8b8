"""Type-head training aids: balanced class weights, token-level type head, partial init, per-model post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter
from cytoken.pipeline.image import model_hover_config
from cytoken.training.config import DataSource, TrainConfig
from cytoken.training.data import SourceData, balanced_type_weights
from cytoken.training.loop import _initial_model
from cytoken.training.losses import hover_loss
from cytoken.types import CytokenError, Sample

TINY = {"encoder": "vit_tiny_test", "num_classes": 2, "class_names": ["a", "b"]}


IDENTITY_LUT = np.array([0, 1, 2])


def _source(type_maps: list[np.ndarray], lut: np.ndarray | None = IDENTITY_LUT) -> SourceData:
    samples = [
        Sample(np.zeros((*t.shape, 3), np.uint8), 0.25, f"s{i}", inst_map=(t > 0).astype(np.int32), type_map=t)
        for i, t in enumerate(type_maps)
    ]
    return SourceData(DataSource(dataset="folder", root=Path(".")), samples, [], lut)


def test_balanced_type_weights_median_frequency() -> None:
    t = np.zeros((10, 10), np.int32)
    t[:2] = 1  # 20 px of class 1
    t[2, :5] = 2  # 5 px of class 2; 75 px background
    w = balanced_type_weights([_source([t])], 2)
    # frequencies .75/.20/.05, median .20 -> weights .267, 1, 4
    np.testing.assert_allclose(w, [0.2 / 0.75, 1.0, 4.0], rtol=1e-6)


def test_balanced_type_weights_clip_and_unseen_class() -> None:
    t = np.zeros((40, 40), np.int32)
    t[0, 0] = 1  # one pixel of class 1, class 2 absent
    w = balanced_type_weights([_source([t])], 2, clip=10.0)
    assert w[2] == 1.0  # never seen: neutral
    assert w[1] == 10.0 and w[0] == pytest.approx(0.5, rel=0.01)  # median of the (bg, c1) frequencies; c1 clipped


def test_balanced_type_weights_need_typed_source() -> None:
    with pytest.raises(CytokenError, match="type maps"):
        balanced_type_weights([_source([np.zeros((4, 4), np.int32)], lut=None)], 2)


def test_type_weights_change_the_loss() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(**TINY)).eval()
    x = torch.rand(1, 3, 32, 32)
    types = torch.zeros(1, 32, 32, dtype=torch.long)
    types[0, :8] = 2
    batch = {"nuclei": (types > 0).long(), "hv": torch.zeros(1, 2, 32, 32), "types": types}
    out = model(x)
    from cytoken.training.config import LossWeights

    only_ce = LossWeights(nuclei_ce=0, nuclei_dice=0, hv_mse=0, hv_msge=0, type_ce=1, type_dice=0)
    plain = hover_loss(out, batch, only_ce)[1]["type_ce"]
    up = hover_loss(out, batch, only_ce, type_weights=torch.tensor([1.0, 1.0, 5.0]))[1]["type_ce"]
    assert plain != pytest.approx(up)


def test_type_tokens_head_starts_at_zero_and_learns() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(**TINY, type_tokens=True))
    assert model.heads.token_types is not None
    x = torch.rand(2, 3, 32, 32)
    last = model.heads.token_types[-1]
    assert float(last.weight.detach().abs().sum()) == 0.0
    out = model(x)
    out.type_logits.sum().backward()
    assert last.weight.grad is not None and float(last.weight.grad.abs().sum()) > 0


def test_type_tokens_needs_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SegmenterConfig(encoder="vit_tiny_test", type_tokens=True)


def test_partial_init_adds_a_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_segmenter(SegmenterConfig(**TINY)).eval()
    path = save_segmenter(base, tmp_path / "base.safetensors")
    cfg = dict(model=SegmenterConfig(**TINY, type_tokens=True), init_weights=path, out_dir=tmp_path / "run",
               data=[{"dataset": "folder", "root": tmp_path}])  # fmt: skip
    with pytest.raises(CytokenError, match="init_strict"):
        _initial_model(TrainConfig(**cfg), verbose=False)
    model = _initial_model(TrainConfig(**cfg, init_strict=False), verbose=False).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # the new head is zero: same outputs as the weights it started from
        torch.testing.assert_close(model(x).type_logits, base(x).type_logits)
    other = TrainConfig(**{**cfg, "model": SegmenterConfig(encoder="vit_tiny_test", num_classes=3)}, init_strict=False)
    with pytest.raises(CytokenError, match="do not fit"):
        _initial_model(other, verbose=False)


def test_model_postprocess_parameters() -> None:
    assert model_hover_config(SegmenterConfig(**TINY)) is None
    hc = model_hover_config(SegmenterConfig(**TINY, postprocess={"fg_threshold": 0.6, "fine_ksize": None}))
    assert hc is not None and hc.fg_threshold == 0.6 and hc.fine_ksize is None
    with pytest.raises(CytokenError, match="post-processing"):
        model_hover_config(SegmenterConfig(**TINY, postprocess={"no_such_field": 1}))
    with pytest.raises(CytokenError, match="post-processing"):
        model_hover_config(SegmenterConfig(**TINY, postprocess={"fg_threshold": 2.0}))


def test_cellvit_checkpoints_carry_the_reference_post_processing() -> None:
    from cytoken.models.cellvit import CELLVIT_POSTPROCESS
    from cytoken.postprocess import HoverConfig

    assert HoverConfig(**CELLVIT_POSTPROCESS) == HoverConfig.cellvit()


def test_default_model_uses_its_tuned_post_processing() -> None:
    from cytoken.models.store import load_model
    from cytoken.pipeline.image import SegmentConfig, decode_spec
    from cytoken.postprocess import HoverConfig

    model, _ = load_model("cytoken-default")
    spec = decode_spec(model, SegmentConfig())
    assert spec.hover is not None and spec.hover == HoverConfig(**model.config.postprocess)
    mine = HoverConfig(fg_threshold=0.7)  # a user's config wins
    assert decode_spec(model, SegmentConfig(hover=mine)).hover == mine


def test_validation_decodes_with_the_models_stored_post_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    from cytoken.postprocess import HoverConfig
    from cytoken.postprocess import hover as hover_module
    from cytoken.training.data import ValCrop
    from cytoken.training.validate import validate

    seen = []
    real = hover_module.decode_hover

    def spy(*args, **kwargs):
        seen.append(kwargs.get("config"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hover_module, "decode_hover", spy)
    model = build_segmenter(SegmenterConfig(**TINY, postprocess={"fg_threshold": 0.6}))
    inst = np.zeros((32, 32), np.int32)
    inst[8:20, 8:20] = 1
    crop = ValCrop(np.zeros((32, 32, 3), np.uint8), inst, None, "crop")
    metrics = validate(model, [crop], torch.device("cpu"))
    assert seen == [HoverConfig(fg_threshold=0.6)] and set(metrics) >= {"bpq", "dice", "det_f1"}
