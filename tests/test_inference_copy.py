"""The predictor's inference copy: batch norms folded, channels-last, same outputs, the original left alone."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cytoken.models import SegmenterConfig, build_segmenter
from cytoken.models.inference import fold_batch_norms, inference_copy
from cytoken.pipeline.predictor import Predictor


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = SegmenterConfig(
        encoder="cytoken_s16", encoder_kwargs={"depth": 2}, num_classes=3, class_names=["a", "b", "c"],
        decoder_kwargs={"width_factor": 0.125, "shared": True, "out_stride": 2},
    )  # fmt: skip
    model = build_segmenter(cfg)
    for m in model.modules():  # trained-looking statistics, so that folding is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_inference_copy_matches_and_leaves_the_model_alone() -> None:
    model = _model()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert n_bn > 10 and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    # the original still has its batch norms and weights; non-kernel tensors are shared, not copied
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    qkv = "encoder.blocks.0.attn.qkv.weight"
    assert dict(fast.named_parameters())[qkv] is dict(model.named_parameters())[qkv]
    x = model.preprocess(torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8))
    with torch.inference_mode():
        a, b = model(x), fast(x)
    for name in ("nuclei_logits", "hv", "type_logits", "tokens"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.shape == tb.shape and torch.allclose(ta, tb, atol=1e-4, rtol=1e-4), name
        assert not torch.equal(ta, torch.zeros_like(ta))


def test_fold_skips_training_mode_and_lone_batch_norms() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    seq.train()
    assert fold_batch_norms(seq) == 0  # training statistics are not fixed: nothing to fold
    seq.eval()
    assert fold_batch_norms(seq) == 1 and isinstance(seq[1], nn.Identity) and isinstance(seq[3], nn.BatchNorm2d)


def test_predictor_fast_and_plain_agree() -> None:
    model = _model()
    tiles = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    fast, plain = Predictor(model)(tiles), Predictor(model, fast=False)(tiles)
    for f, p in zip(fast, plain, strict=True):
        np.testing.assert_allclose(f.nuclei_prob, p.nuclei_prob, atol=1e-4)
        np.testing.assert_allclose(f.hv, p.hv, atol=1e-4)
        np.testing.assert_allclose(f.type_prob, p.type_prob, atol=1e-4)
        np.testing.assert_allclose(f.tokens, p.tokens, atol=1e-4)
