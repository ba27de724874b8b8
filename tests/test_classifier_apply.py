"""`cytoken classifier apply` changes only the class-dependent content of a segment output (image and slide), from any
working directory; outputs without cells hold a (0, D) embeddings.npy that apply and dataset handle."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cytoken.classify import save_bundle
from cytoken.cli.main import main
from cytoken.models.store import read_config
from cytoken.weights import get_entry

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
CLASS_KEYS = ("type", "type_prob")  # CellViT++ cell fields set by the classifier
DIM = int(read_config(get_entry("cytoken-default").path).encoder_kwargs["embed_dim"])  # its cell embeddings' width


def _bundle(path: Path, sha: str | None = None, dim: int = DIM) -> Path:
    """A random 2-class bundle for the default model's embeddings (classes unlike the default's)."""
    rng = np.random.default_rng(0)
    state = {"fc1.weight": rng.normal(size=(16, dim)), "fc1.bias": np.zeros(16),
             "fc2.weight": rng.normal(size=(2, 16)), "fc2.bias": np.zeros(2)}  # fmt: skip
    sha = sha or get_entry("cytoken-default").sha256
    return save_bundle(path, state, class_names=["tumour", "stroma"], config={}, metrics={},
                       embedding_model_sha256=sha, embedding_dim=dim)  # fmt: skip


def _json(path: Path) -> dict:
    return json.loads(gzip.open(path).read() if path.suffix == ".gz" else path.read_text())


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("cytoken: error:") == 1 and "Traceback" not in err, err
    return err[err.index("cytoken: error:") :]


def _assert_only_classes_changed(before: Path, after: Path, names: list[str]) -> None:
    """Every file of ``before`` is in ``after`` with the same non-class content; the classes are ``names``."""
    assert sorted(p.name for p in after.iterdir()) == sorted(p.name for p in before.iterdir())
    assert (after / "embeddings.npy").read_bytes() == (before / "embeddings.npy").read_bytes()
    geo = "cells.geojson.gz" if (before / "cells.geojson.gz").is_file() else "cells.geojson"
    a, b = _json(before / geo), _json(after / geo)
    own = ("class_names", "class_colors", "classifier")
    assert {k: v for k, v in b["cytoken"].items() if k not in own} == {
        k: v for k, v in a["cytoken"].items() if k not in own
    }  # image/slide, model, model_sha256, mpp, coordinates
    assert list(b["cytoken"]) == [*a["cytoken"], "classifier"]
    assert b["cytoken"].get("class_names", names) == names  # (an empty collection has no class list)
    assert [f["id"] for f in b["features"]] == [f["id"] for f in a["features"]]
    assert [f["geometry"] for f in b["features"]] == [f["geometry"] for f in a["features"]]
    for fa, fb in zip(a["features"], b["features"]):
        ma, mb = fa["properties"]["measurements"], fb["properties"]["measurements"]
        assert {k: v for k, v in ma.items() if k != "class_prob"} == {k: v for k, v in mb.items() if k != "class_prob"}
        assert fb["properties"]["class_name"] in names
    for name in ("cells.json", "cell_detection.json"):
        a, b = _json(before / name), _json(after / name)
        assert b["wsi_metadata"] == a["wsi_metadata"]
        assert b["type_map"] == {"0": "unclassified", **{str(i + 1): n for i, n in enumerate(names)}}
        strip = lambda cells: [{k: v for k, v in c.items() if k not in CLASS_KEYS} for c in cells]  # noqa: E731
        assert strip(b["cells"]) == strip(a["cells"])
    ta, tb = pq.read_table(before / "cells.parquet"), pq.read_table(after / "cells.parquet")
    assert ta.column_names == tb.column_names
    for col in ta.column_names:
        if col not in ("class_id", "class_name", "class_prob"):
            assert ta.column(col).equals(tb.column(col)), col
    assert set(tb.column("class_name").to_pylist()) <= set(names)
    ra, rb = _json(before / "run.json"), _json(after / "run.json")
    assert list(rb) == list(ra)
    assert {k for k in ra if ra[k] != rb[k]} <= {"class_names", "cells_per_class", "classifier"}
    assert rb["class_names"] == names and set(rb["cells_per_class"]) <= set(names)
    if (before / "cells.h5ad").is_file():
        anndata = pytest.importorskip("anndata")
        ha, hb = anndata.read_h5ad(before / "cells.h5ad"), anndata.read_h5ad(after / "cells.h5ad")
        np.testing.assert_array_equal(ha.X, hb.X)
        np.testing.assert_array_equal(ha.obsm["spatial"], hb.obsm["spatial"])
        keep = [c for c in ha.obs.columns if c not in ("class", "class_prob")]
        assert ha.obs[keep].equals(hb.obs[keep]) and list(ha.obs_names) == list(hb.obs_names)
        assert dict(ha.uns["model"]) == dict(hb.uns["model"]) and ha.uns["input"] == hb.uns["input"]


@needs_data
@pytest.mark.parametrize("slide", [False, True], ids=["image", "slide"])
def test_apply_from_another_folder_changes_only_the_classes(
    slide: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 200-px crop of CRCHisto img77, segmented with the default model (relative paths), re-labelled from another
    folder: classes change; ids, geometry, embeddings, metadata and every other field stay as they were."""
    src = np.array(Image.open(SHARED / "crchisto" / "images" / "img77.png").convert("RGB"))[150:350, 150:350]
    work = tmp_path / "work"
    work.mkdir()
    Image.fromarray(src).save(work / "crop.png")
    monkeypatch.chdir(work)
    argv = ["segment", "crop.png", "--mpp", "0.55", "--out", "seg", "--quiet", *(["--slide"] if slide else [])]
    assert main(argv) == 0
    out = work / "seg" / "crop"
    before = tmp_path / "before"
    shutil.copytree(out, before)
    bundle = _bundle(tmp_path / "bundle")
    monkeypatch.chdir(tmp_path)  # crop.png is not here
    capsys.readouterr()
    assert main(["classifier", "apply", str(out), "--bundle", "bundle"]) == 0
    assert "warning" not in capsys.readouterr().err
    _assert_only_classes_changed(before, out, ["tumour", "stroma"])
    run = _json(out / "run.json")
    assert run["classifier"]["bundle"] == str(bundle)  # absolute, though given relative
    assert _json(out / ("cells.geojson.gz" if slide else "cells.geojson"))["cytoken"]["classifier"] == str(bundle)
    assert set(run["cells_per_class"]) != set(_json(before / "run.json")["cells_per_class"])
    if not slide:  # the overlay is redrawn with the new classes
        assert (out / "overlay.png").read_bytes() != (before / "overlay.png").read_bytes()
        # input gone: the overlay is kept (with the old classes) and a warning says so; nothing else is lost
        shutil.copytree(before, out, dirs_exist_ok=True)
        (work / "crop.png").rename(tmp_path / "moved.png")
        assert main(["classifier", "apply", str(out), "--bundle", "bundle"]) == 0
        assert "overlay.png kept with the old classes" in capsys.readouterr().err
        assert (out / "overlay.png").read_bytes() == (before / "overlay.png").read_bytes()
        _assert_only_classes_changed(before, out, ["tumour", "stroma"])
    # a bundle trained on another model's embeddings is refused; the output is left as it was
    shutil.copytree(before, out, dirs_exist_ok=True)
    _bundle(tmp_path / "other", sha="0" * 64)
    msg = _error(capsys, ["classifier", "apply", str(out), "--bundle", "other"])
    assert "retrain the classifier" in msg and "0" * 64 in msg and str(out) in msg
    for f in before.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("slide", [False, True], ids=["image", "slide"])
def test_outputs_without_cells_have_empty_embeddings(
    slide: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A white image (no cell) gives a (0, D) float16 embeddings.npy; apply re-labels it; an old output without
    the file gets a message saying why instead of "--embeddings none?"."""
    img = tmp_path / "white.png"
    Image.fromarray(np.full((200, 200, 3), 255, np.uint8)).save(img)
    argv = ["segment", str(img), "--mpp", "0.55", "--out", str(tmp_path / "seg"), "--quiet"]
    assert main([*argv, *(["--slide"] if slide else [])]) == 0
    out = tmp_path / "seg" / "white"
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (0, DIM) and emb.dtype == np.float16
    assert _json(out / "run.json")["cells"] == 0
    before = tmp_path / "before"
    shutil.copytree(out, before)
    _bundle(tmp_path / "b")
    assert main(["classifier", "apply", str(out), "--bundle", str(tmp_path / "b")]) == 0
    assert "0 cells re-labelled" in capsys.readouterr().out
    _assert_only_classes_changed(before, out, ["tumour", "stroma"])
    (out / "embeddings.npy").unlink()  # an output written before empty outputs had the file
    msg = _error(capsys, ["classifier", "apply", str(out), "--bundle", str(tmp_path / "b")])
    assert "found no cells" in msg and "segment it again" in msg and "--embeddings none" not in msg
