"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random ``vit_tiny_test`` segmenter (2 classes, 128-px tiles): fast, for plumbing tests."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(encoder="vit_tiny_test", num_classes=2, class_names=["a", "b"], tile_size=128, overlap=32)
    return save_segmenter(build_segmenter(cfg), tmp_path_factory.mktemp("m") / "tiny.safetensors")
