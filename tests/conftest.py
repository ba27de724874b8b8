"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random ``vit_tiny_test`` segmenter (2 classes, 128-px tiles): fast, for plumbing tests."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(encoder="vit_tiny_test", num_classes=2, class_names=["a", "b"], tile_size=128, overlap=32)
    return save_segmenter(build_segmenter(cfg), tmp_path_factory.mktemp("m") / "tiny.safetensors")


@pytest.fixture(scope="session")
def consep_mosaic() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``f(names, root)``: real CoNSeP fields side by side as one image (H&E, instance map with ids offset by
    100,000 per field, ids and which are inflammatory); skips the test when the data is absent."""
    from PIL import Image

    from cytoken.classify.dataset import instance_types

    def make(names: tuple[str, ...], root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not root.exists():
            pytest.skip(f"{root} not present")
        hes, insts, types = [], [], []
        for k, name in enumerate(names):
            hes.append(np.asarray(Image.open(root / "images" / f"{name}.jpg").convert("RGB")))
            inst = np.asarray(Image.open(root / "inst_maps" / f"{name}.png")).astype(np.int64)
            insts.append(np.where(inst > 0, inst + 100_000 * k, 0))
            types.append(np.asarray(Image.open(root / "type_maps" / f"{name}.png")))
        he, inst = np.concatenate(hes, 1), np.concatenate(insts, 1)
        ids, typ = instance_types(inst, np.concatenate(types, 1))
        return he, inst, ids, typ == 2

    return make
