"""The default model's embedded cell classifier: found, compatible, used by default, and switched off on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.classify import check_compatible, load_bundle
from cytoken.cli._common import cell_classifier
from cytoken.cli.main import main
from cytoken.models.store import load_model
from cytoken.types import CytokenError
from cytoken.weights import get_entry

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def test_default_classifier_ships_and_fits_the_embedded_weights() -> None:
    entry = get_entry("cytoken-default")
    assert entry.classifier_path is not None and (entry.classifier_path / "weights.safetensors").is_file()
    model, info = load_model("cytoken-default")
    assert info.classifier == str(entry.classifier_path)
    bundle = load_bundle(Path(info.classifier))
    # trained on exactly these weights' embeddings: a new model file needs a new classifier
    check_compatible(bundle, info.sha256, model.encoder.spec.embed_dim)
    assert tuple(bundle.class_names) == tuple(entry.class_names)


def test_cell_classifier_choice() -> None:
    model, info = load_model("cytoken-default")
    assert cell_classifier(None, info, model) is not None  # the default
    assert cell_classifier("none", info, model) is None and cell_classifier("NONE", info, model) is None
    assert cell_classifier(None, info, model, embeddings="none") is None  # no embeddings: the type head, quietly
    with pytest.raises(CytokenError, match="needs embeddings"):
        cell_classifier(info.classifier, info, model, embeddings="none")
    plain = type(info)(name="x", sha256=info.sha256, source="x.safetensors")  # a model file: no default
    assert cell_classifier(None, plain, model) is None


@needs_data
def test_segment_uses_the_default_classifier_unless_told(tmp_path: Path) -> None:
    crop = np.array(Image.open(SHARED / "monuseg" / "test" / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png"))[:256, :256]
    img = tmp_path / "crop.png"
    Image.fromarray(crop).save(img)
    runs = {}
    for tag, extra in (("default", []), ("head", ["--classifier", "none"])):
        argv = ["segment", str(img), "--mpp", "0.25", "--out", str(tmp_path / tag), "--quiet", "--no-overlay", *extra]
        assert main(argv) == 0
        runs[tag] = json.loads((tmp_path / tag / "crop" / "run.json").read_text())
    assert runs["default"]["classifier"]["bundle"].endswith("cytoken-default-types")
    assert runs["head"]["classifier"] is None
    assert runs["default"]["cells"] == runs["head"]["cells"] > 0  # same cells, classes from another source


@needs_data
def test_evaluate_records_the_classifier(tmp_path: Path) -> None:
    root = SHARED / "consep_patched"
    out = {}
    for tag, extra in (("default", []), ("head", ["--classifier", "none"])):
        argv = ["evaluate", "--dataset", "consep_patched", "--data-root", str(root), "--split", "test", "--limit",
                "2", "--quiet", "--out", str(tmp_path / f"{tag}.json"), *extra]  # fmt: skip
        assert main(argv) == 0
        out[tag] = json.loads((tmp_path / f"{tag}.json").read_text())
    assert out["default"]["classifier"].endswith("cytoken-default-types") and out["head"]["classifier"] is None
    assert out["default"]["bpq"] == out["head"]["bpq"]  # segmentation is the same


@needs_data
def test_run_json_names_the_classes_of_the_bundle_that_set_them(tmp_path: Path) -> None:
    from cytoken.classify import save_bundle

    model, info = load_model("cytoken-default")
    dim = int(model.config.encoder_kwargs["embed_dim"])
    rng = np.random.default_rng(0)
    state = {"fc1.weight": rng.normal(size=(8, dim)).astype(np.float32), "fc1.bias": np.zeros(8, np.float32),
             "fc2.weight": rng.normal(size=(2, 8)).astype(np.float32), "fc2.bias": np.zeros(2, np.float32)}  # fmt: skip
    bundle = save_bundle(tmp_path / "b", state, class_names=["tumour", "stroma"], config={}, metrics={},
                         embedding_model_sha256=info.sha256, embedding_dim=dim)  # fmt: skip
    crop = np.array(Image.open(SHARED / "monuseg" / "test" / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png"))[:256, :256]
    img = tmp_path / "crop.png"
    Image.fromarray(crop).save(img)
    argv = ["segment", str(img), "--mpp", "0.25", "--out", str(tmp_path / "o"), "--quiet", "--no-overlay",
            "--classifier", str(bundle)]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((tmp_path / "o" / "crop" / "run.json").read_text())
    assert run["class_names"] == ["tumour", "stroma"] == run["classifier"]["class_names"]
    assert set(run["cells_per_class"]) <= {"tumour", "stroma"}


def test_evaluate_refuses_a_classifier_for_saved_predictions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["evaluate", "--dataset", "monuseg", "--data-root", str(tmp_path), "--predictions", str(tmp_path),
            "--classifier", "some_bundle", "--out", str(tmp_path / "m.json")]  # fmt: skip
    assert main(argv) == 2
    assert "saved --predictions have none" in capsys.readouterr().err
