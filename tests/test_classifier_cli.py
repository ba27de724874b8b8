"""`cytoken classifier` bad inputs (one `cytoken: error:` line naming the file, exit 2, nothing written) and the
mechanics of `classifier search` and `--val-groups`.

The embedding sets here are small synthetic ones (8-d, three well separated classes): they test the commands'
plumbing, not classifier quality (that is measured on real data in benchmarks/ and test_cli's real-label workflow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.classify.dataset import LabelledCells
from cytoken.cli.main import main
from cytoken.pipeline.classifier import load_embedding_set, save_embedding_set

SHA = "a" * 64


def _set(path: Path, labels: list[int], groups: list[str], dim: int = 8, seed: int = 0) -> Path:
    """A synthetic embedding set: class k's cells sit around k * 3 on every axis."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, np.int64)
    x = (rng.normal(size=(len(y), dim)) + 3.0 * y[:, None]).astype(np.float32)
    save_embedding_set(LabelledCells(x, y, np.asarray(groups), ("a", "b", "c")), path, model_sha256=SHA, report={})
    return path


def _groups(n_per: int, names: list[str]) -> list[str]:
    return [g for g in names for _ in range(n_per)]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cytoken: error:") and "Traceback" not in err, err
    return err


def _six_images(path: Path) -> Path:
    """Six images of 30 cells, every image holding all three classes."""
    return _set(path, [k % 3 for k in range(180)], _groups(30, [f"img{i}" for i in range(6)]))


def test_rare_class_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _set(tmp_path / "rare.npz", [0] * 20 + [1] * 20 + [2], [*_groups(10, ["g1", "g2", "g3", "g4"]), "g5"])
    for cmd in ("train", "search"):
        msg = _error(capsys, ["classifier", cmd, "--data", str(data), "--out", str(tmp_path / "b"), "--trials", "2"]
                     if cmd == "search" else ["classifier", cmd, "--data", str(data), "--out", str(tmp_path / "b")])
        assert f"{data}: class(es) with fewer than 2 labelled cells: 'c' (1)" in msg
    assert not (tmp_path / "b").exists()


def test_class_missing_from_the_training_split_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """All of class c is in image g5: held out by --val-groups, training has no example (was an internal error)."""
    data = _set(tmp_path / "d.npz", [0] * 20 + [1] * 20 + [2] * 5, _groups(10, ["g1", "g2", "g3", "g4"]) + ["g5"] * 5)
    (tmp_path / "val.txt").write_text("g5\n")
    base = ["classifier", "train", "--data", str(data), "--out", str(tmp_path / "b"), "--epochs", "2"]
    msg = _error(capsys, [*base, "--val-groups", str(tmp_path / "val.txt")])
    assert f"{data}: class(es) ['c'] have no training example in the split of --val-groups" in msg
    assert "label them in more images, or choose another split" in msg
    # a validation part with one class: AUROC is undefined, same kind of message
    (tmp_path / "val.txt").write_text("g1\n")
    msg = _error(capsys, [*base, "--val-groups", str(tmp_path / "val.txt")])
    assert "validation images" in msg and "1 class(es) ['a']" in msg and "AUROC needs at least 2" in msg
    assert not (tmp_path / "b").exists()


def test_dimension_mismatch_names_data_and_bundle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle = tmp_path / "b"
    assert main(["classifier", "train", "--data", str(_six_images(tmp_path / "d8.npz")), "--out", str(bundle),
                 "--epochs", "2"]) == 0  # fmt: skip
    d16 = _set(tmp_path / "d16.npz", [k % 3 for k in range(60)], _groups(10, list("uvwxyz")), dim=16)
    msg = _error(capsys, ["classifier", "evaluate", "--bundle", str(bundle), "--data", str(d16),
                          "--out", str(tmp_path / "r")])  # fmt: skip
    assert f"classifier bundle {bundle} expects 8-d embeddings, but {d16} holds 16-d ones" in msg
    assert not (tmp_path / "r").exists()


def test_val_groups_holds_out_exactly_those_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _six_images(tmp_path / "d.npz")
    (tmp_path / "val.txt").write_text("img1\nimg4\n")
    out = tmp_path / "b"
    argv = ["classifier", "train", "--data", str(data), "--out", str(out), "--epochs", "10", "--lr", "0.01"]
    assert main([*argv, "--val-groups", str(tmp_path / "val.txt")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"]) == (120, 60)  # 4 training images, the 2 listed for validation
    assert metrics["validation"]["macro_auroc"] > 0.95
    (tmp_path / "bad.txt").write_text("nope\n")
    msg = _error(capsys, [*argv, "--overwrite", "--val-groups", str(tmp_path / "bad.txt")])
    assert f"{tmp_path / 'bad.txt'}: none of its ids is a group of {data}" in msg


def test_search_runs_resumes_and_writes_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _six_images(tmp_path / "d.npz")
    db = tmp_path / "study.db"
    base = ["classifier", "search", "--data", str(data), "--storage", str(db), "--sampler", "random"]
    assert main([*base, "--out", str(tmp_path / "b1"), "--trials", "3"]) == 0
    assert "3 new trials" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b2"), "--trials", "5"]) == 0  # resumes: 2 more, 5 in all
    assert "2 new trials" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "b2" / "metrics.json").read_text())
    assert metrics["search"]["n_trials"] == 5 and metrics["validation"]["macro_auroc"] > 0.95
    assert json.loads((tmp_path / "b2" / "config.json").read_text())["embedding_model_sha256"] == SHA
    # the bundle exists: a second search into it needs --overwrite
    msg = _error(capsys, [*base, "--out", str(tmp_path / "b2"), "--trials", "5"])
    assert f"{tmp_path / 'b2'} already exists; pass --overwrite" in msg


def _white(path: Path) -> Path:
    Image.fromarray(np.full((200, 200, 3), 255, np.uint8)).save(path)
    return path


def _qupath_points(path: Path, points: list[list[float]]) -> Path:
    feats = [{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": points[i::2]},
              "properties": {"objectType": "annotation", "classification": {"name": name}}}
             for i, name in enumerate(("tumour", "stroma"))]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_labels_matching_no_cell_name_the_label_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A white image (the default model finds no cell) with labels, as a QuPath folder and as a slide: the error
    names the label file; the empty region no longer reads "has no embeddings.npy (--embeddings none?)"."""
    root = tmp_path / "qp"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    img = _white(root / "images" / "w.png")
    pts = [[20.0 + 15 * i, 30.0 + 10 * i] for i in range(10)]
    labels = _qupath_points(root / "labels" / "w.geojson", pts)
    out = tmp_path / "set.npz"
    msg = _error(capsys, ["classifier", "dataset", "--dataset", "qupath", "--data-root", str(root), "--mpp", "0.5",
                          "--out", str(out), "--quiet"])  # fmt: skip
    assert f"no label of {labels} matched a detected cell: no cell was detected" in msg
    msg = _error(capsys, ["classifier", "dataset", "--slide", str(img), "--labels", str(labels), "--mpp", "0.5",
                          "--out", str(out), "--quiet"])  # fmt: skip
    assert msg.startswith(f"cytoken: error: {labels}: no label matched a cell of {img}")
    assert "embeddings.npy" not in msg and "--embeddings none" not in msg
    assert not out.exists()


def test_dataset_round_trip_of_a_synthetic_set(tmp_path: Path) -> None:
    """The synthetic helper writes what load_embedding_set reads (guards the other tests' inputs)."""
    cells, meta = load_embedding_set(_six_images(tmp_path / "d.npz"))
    assert cells.embeddings.shape == (180, 8) and meta["model_sha256"] == SHA
    assert sorted(set(cells.groups)) == [f"img{i}" for i in range(6)]
