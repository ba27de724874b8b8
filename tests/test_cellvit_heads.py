"""Official CellViT++ LinearClassifier checkpoints (exact released layout, random weights) → cytoken bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cytoken.classify import load_bundle
from cytoken.classify.cellvit_heads import convert_cellvit_classifier, read_cellvit_classifier
from cytoken.types import CytokenError
from cytoken.weights import file_sha256

torch.set_num_threads(1)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cellvit-checkpoints"
pytestmark = pytest.mark.skipif(
    not (REFERENCE / "LinearClassifier.json").exists(), reason="../shared/reference/cellvit-checkpoints not present"
)
SHA = "ab" * 32


def _released() -> dict:
    return json.loads((REFERENCE / "LinearClassifier.json").read_text())["released_classifier_checkpoints"]


def _write(tmp: Path, name: str, seed: int = 0, **changes: object) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint with the released file's keys, shapes, arch, epoch and config, and random weights."""
    info = _released()[name]
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(*shape, generator=g) * 0.05 for k, shape in info["model_state_dict"].items()}
    ck = {"arch": info["arch"], "epoch": info["epoch"], "model_state_dict": state, "config": dict(info["config"])}
    ck.update(changes)
    assert sorted(ck) == sorted(info["top_level_keys"])
    path = tmp / name
    torch.save(ck, path)
    return path, state


def _reference_proba(state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    hidden = torch.relu(x @ state["fc1.weight"].T + state["fc1.bias"])
    return torch.softmax(hidden @ state["fc2.weight"].T + state["fc2.bias"], dim=1).numpy()


@pytest.mark.parametrize("name", ["consep.pth", "lizard.pth", "ocelot.pth"])
def test_released_layouts_convert_and_predict_like_the_official_model(tmp_path: Path, name: str) -> None:
    path, state = _write(tmp_path, name)
    info = _released()[name]
    labels = [info["config"][f"data.label_map.{i}"] for i in range(info["config"]["data.num_classes"])]
    ck = read_cellvit_classifier(path)
    assert (ck.embed_dim, ck.hidden_dim) == (1280, info["config"]["model.hidden_dim"])
    assert list(ck.label_map.values()) == labels
    out = convert_cellvit_classifier(path, tmp_path / "bundle", embedding_model_sha256=SHA)
    bundle = load_bundle(out, model_sha256=SHA, embedding_dim=1280)
    assert bundle.class_names == tuple(labels) and bundle.hidden == ck.hidden_dim
    x = torch.randn(64, 1280, generator=torch.Generator().manual_seed(1))
    want = _reference_proba(state, x)
    np.testing.assert_allclose(bundle.predict_proba(x.numpy()), want, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(bundle.module()(x).softmax(1).numpy(), want, atol=1e-5)
        np.testing.assert_allclose(ck.logits(x).softmax(1).numpy(), want, atol=1e-5)
    prov = bundle.config["train_config"]
    assert prov["file_sha256"] == file_sha256(path) and prov["epoch"] == info["epoch"]
    assert prov["class_names_from"] == "checkpoint data.label_map"


def test_missing_label_map_refused_unless_named(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "nucls_main.pth")
    assert read_cellvit_classifier(path).label_map is None
    with pytest.raises(CytokenError, match=r"no label map.*class_names"):
        convert_cellvit_classifier(path, tmp_path / "a", embedding_model_sha256=SHA)
    assert not (tmp_path / "a").exists()
    names = [f"nucls_{i}" for i in range(7)]
    b = load_bundle(convert_cellvit_classifier(path, tmp_path / "b", embedding_model_sha256=SHA, class_names=names))
    assert b.class_names == tuple(names)
    with pytest.warns(UserWarning, match="no label map"):
        out = convert_cellvit_classifier(path, tmp_path / "c", embedding_model_sha256=SHA, missing_labels="generic")
    assert load_bundle(out).class_names == tuple(f"class_{i}" for i in range(1, 8))
    with pytest.raises(ValueError, match="3 class_names for a classifier with 7 outputs"):
        convert_cellvit_classifier(path, tmp_path / "d", embedding_model_sha256=SHA, class_names=["a", "b", "c"])


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, "consep.pth", arch="CellViTSAM")
    with pytest.raises(CytokenError, match="arch 'CellViTSAM'"):
        read_cellvit_classifier(path)
    cfg = dict(_released()["consep.pth"]["config"], **{"model.hidden_dim": 256})
    path, _ = _write(tmp_path, "consep.pth", config=cfg)
    with pytest.raises(CytokenError, match="hidden_dim=256 but fc1 has 128"):
        read_cellvit_classifier(path)
    cfg = dict(_released()["consep.pth"]["config"], **{"data.num_classes": 5})
    path, _ = _write(tmp_path, "consep.pth", config=cfg)
    with pytest.raises(CytokenError, match="num_classes=5 but fc2 has 4"):
        read_cellvit_classifier(path)
    cfg = {k: v for k, v in _released()["consep.pth"]["config"].items() if k != "data.label_map.3"}
    path, _ = _write(tmp_path, "consep.pth", config=cfg)
    with pytest.raises(CytokenError, match=r"label_map names classes \[0, 1, 2\]"):
        read_cellvit_classifier(path)
    torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "bare.pth")
    with pytest.raises(CytokenError, match="not a CellViT"):
        read_cellvit_classifier(tmp_path / "bare.pth")
    with pytest.raises(CytokenError, match="not found"):
        read_cellvit_classifier(tmp_path / "absent.pth")
