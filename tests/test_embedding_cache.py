"""The embedding cache keyed by model sha256 + input hash + cell id: file fingerprints, per-cell columns, and slides
labelled in QuPath whose `cytoken segment` output or cache entry is reused without running the model again."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.cli.main import main
from cytoken.embeddings.cache import EmbeddingCache, file_fingerprint
from cytoken.models.store import load_model
from cytoken.pipeline.classifier import build_slide_embedding_set, slide_input_hash
from cytoken.pipeline.predictor import Predictor
from cytoken.types import CytokenError
from cytoken.weights import ModelInfo

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
SHA = "ab" * 32


# ------------------------------------------------------------------------------------------ fingerprint
def test_file_fingerprint_sees_size_mtime_and_both_ends(tmp_path: Path) -> None:
    p = tmp_path / "slide.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes())  # 3 MiB
    p.write_bytes(data)
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    key = file_fingerprint(p)
    assert key == file_fingerprint(p) and len(key) == 64

    def changed(offset: int | None = None, size: int | None = None, mtime: int = 1_000_000_000) -> str:
        new = bytearray(data)
        if offset is not None:
            new[offset] ^= 0xFF
        p.write_bytes(bytes(new[:size]))
        os.utime(p, ns=(mtime, mtime))
        return file_fingerprint(p)

    assert changed(offset=10) != key  # first MiB
    assert changed(offset=len(data) - 10) != key  # last MiB
    assert changed(mtime=2_000_000_000) != key  # touched
    assert changed(size=len(data) - 1) != key
    assert changed() == key  # same bytes and mtime: same key
    # documented blind spot: the middle MiB is not read (slides are written once)
    assert changed(offset=len(data) // 2) == key
    with pytest.raises(FileNotFoundError, match="not a file"):
        file_fingerprint(tmp_path)
    with pytest.raises(ValueError, match="block_bytes"):
        file_fingerprint(p, block_bytes=0)


def test_cache_columns_meta_merge_and_replace(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    xy = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cache.put(SHA, "s", [30, 10, 20], np.arange(9, dtype=np.float16).reshape(3, 3), columns={"centroids": xy},
              meta={"source": "a", "roi": [0, 0, 5, 5]})  # fmt: skip
    e = cache.load_entry(SHA, "s")
    assert e.ids.tolist() == [10, 20, 30] and e.embeddings.dtype == np.float16 and len(e) == 3
    np.testing.assert_array_equal(e.columns["centroids"], xy[[1, 2, 0]])  # rows follow their ids
    assert e.meta == {"source": "a", "roi": [0, 0, 5, 5]} and e.rows([20, 99]).tolist() == [1, -1]
    np.testing.assert_array_equal(cache.get(SHA, "s", [30, 10]), [[0, 1, 2], [3, 4, 5]])
    cache.put(SHA, "s", [40, 10], np.ones((2, 3), np.float16), columns={"centroids": np.zeros((2, 2))},
              meta={"source": "b"})  # fmt: skip
    e = cache.load_entry(SHA, "s")
    assert e.ids.tolist() == [10, 20, 30, 40] and e.meta == {"source": "b", "roi": [0, 0, 5, 5]}
    np.testing.assert_array_equal(e.columns["centroids"][0], [0, 0])  # id 10 replaced
    with pytest.raises(ValueError, match="columns"):
        cache.put(SHA, "s", [50], np.ones((1, 3), np.float16))
    cache.put(SHA, "s", [7], np.ones((1, 3), np.float32), replace=True)
    e = cache.load_entry(SHA, "s")
    assert e.ids.tolist() == [7] and e.columns == {} and e.meta == {}
    with pytest.raises(ValueError, match="column name"):
        cache.put(SHA, "t", [1], np.ones((1, 2)), columns={"Bad-Name": np.zeros(1)})
    with pytest.raises(ValueError, match="one row per id"):
        cache.put(SHA, "t", [1, 2], np.ones((2, 2)), columns={"xy": np.zeros(3)})
    cache.path(SHA, "broken").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors is unreadable"):
        cache.load_entry(SHA, "broken")


# ------------------------------------------------------------------------------------------ slides (real)
@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real CRCHisto crop used as a 'slide' (0.55 µm/px), segmented once by `cytoken segment --slide`."""
    if not SHARED.exists():
        pytest.skip("../shared/data not present")
    base = tmp_path_factory.mktemp("slide")
    image = np.array(Image.open(SHARED / "crchisto" / "images" / "img77.png"))[300:500, 300:500]
    path = base / "crop77.png"
    Image.fromarray(image).save(path)
    assert main(["segment", str(path), "--slide", "--mpp", "0.55", "--out", str(base / "seg"), "--quiet"]) == 0
    return {"slide": path, "seg": base / "seg", "out": base / "seg" / "crop77"}


def qupath_labels(out: Path, path: Path, keep) -> tuple[np.ndarray, list[str]]:
    """Re-export of a segment output's cells.geojson.gz as if classified in QuPath: ``keep(i)`` cells get a class."""
    with gzip.open(out / "cells.geojson.gz", "rt") as f:
        doc = json.load(f)
    ids, names = [], []
    for i, feat in enumerate(doc["features"]):
        feat["properties"].pop("classification", None)
        if keep(i):
            name = "tumour" if i % 3 else "immune"
            feat["properties"]["classification"] = {"name": name, "color": [1, 2, 3]}
            ids.append(feat["properties"]["cell_id"])
            names.append(name)
    path.write_text(json.dumps(doc))
    return np.array(ids), names


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, tiles):
        raise RuntimeError("the model ran")

    monkeypatch.setattr(Predictor, "__call__", boom)


def read_set(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(path) as z:
        return z["embeddings"], z["labels"], json.loads(bytes(z["meta"]).decode())["report"]


@needs_shared
def test_slide_output_then_cache_reused_without_the_model(slide: dict[str, Path], tmp_path: Path, no_model: None,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    labels = tmp_path / "labels.geojson"
    ids, names = qupath_labels(slide["out"], labels, lambda i: i < 40)
    cache = tmp_path / "cache"
    argv = ["classifier", "dataset", "--slide", str(slide["slide"]), "--labels", str(labels), "--segment-output",
            str(slide["seg"]), "--mpp", "0.55", "--cache", str(cache), "--quiet", "--out"]  # fmt: skip
    assert main([*argv, str(tmp_path / "a.npz")]) == 0, capsys.readouterr().err
    assert "crop77 (segment-output)" in capsys.readouterr().out
    emb, lab, rep = read_set(tmp_path / "a.npz")
    assert (rep["n_labels"], rep["n_matched"], rep["n_unclassified"]) == (40, 40, rep["n_cells"] - 40)
    # the output's own embeddings of exactly the labelled cells (a cell's polygon centroid is its centroid)
    import pyarrow.parquet as pq

    out_ids = pq.read_table(slide["out"] / "cells.parquet", columns=["id"]).column("id").to_numpy()
    out_emb = np.load(slide["out"] / "embeddings.npy").astype(np.float32)
    want = out_emb[np.searchsorted(out_ids, ids)]
    np.testing.assert_array_equal(np.sort(emb, axis=0), np.sort(want, axis=0))
    assert sorted(lab.tolist()) == sorted(("immune", "tumour").index(n) for n in names)
    key = slide_input_hash(slide["slide"], "mask")
    default_sha = load_model("cytoken-default")[1].sha256
    entry = EmbeddingCache(cache / "embeddings").load_entry(default_sha, key)
    assert entry is not None and len(entry) == rep["n_cells"] and entry.meta["source"] == str(slide["out"])

    moved = tmp_path / "moved"
    shutil.move(slide["out"], moved)  # the output folder is gone: the cache alone serves the second call
    try:
        assert main([*argv, str(tmp_path / "b.npz")]) == 0
        assert "crop77 (cache)" in capsys.readouterr().out
        emb2, lab2, _ = read_set(tmp_path / "b.npz")
        np.testing.assert_array_equal(emb2, emb)
        np.testing.assert_array_equal(lab2, lab)
        # another model sha256 misses the cache: the model would have to run (it raises here)
        other = ModelInfo(name="other", sha256="f" * 64, source="test")
        with pytest.raises(RuntimeError, match="the model ran"):
            build_slide_embedding_set([slide["slide"]], [labels], other, cache_dir=cache, mpp=0.55, progress=False,
                                      predictor=Predictor(load_model("cytoken-default")[0]))  # fmt: skip
    finally:
        shutil.move(moved, slide["out"])
    with pytest.raises(CytokenError, match=r"segmented with model .*not 'other' .*sha256 ffffffffffff"):
        build_slide_embedding_set([slide["slide"]], [labels], other, cache_dir=cache, mpp=0.55,
                                  segment_output=slide["seg"])  # fmt: skip
    renamed = tmp_path / "other.png"
    shutil.copy(slide["slide"], renamed)
    assert (
        main(
            [
                "classifier",
                "dataset",
                "--slide",
                str(renamed),
                "--labels",
                str(labels),
                "--segment-output",
                str(slide["out"]),
                "--mpp",
                "0.55",
                "--cache",
                str(cache),
                "--out",
                str(tmp_path / "c.npz"),
            ]
        )
        == 2
    )
    assert "is the output of 'crop77.png', not of 'other.png'" in capsys.readouterr().err


@needs_shared
def test_slide_segmented_around_labels_once(slide: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip

    model, info = load_model("cytoken-default")
    labels = tmp_path / "corner.geojson"
    # labels only in the top-left corner: the slide is segmented around them (64 µm = 116 px margin)
    with gzip.open(slide["out"] / "cells.geojson.gz", "rt") as f:
        feats = json.load(f)["features"]
    corner = [i for i, f in enumerate(feats) if max(np.asarray(f["geometry"]["coordinates"][0]).max(0)) < 50]
    qupath_labels(slide["out"], labels, lambda i: i in corner[:6])
    kw = {"cache_dir": tmp_path / "cache", "mpp": 0.55, "progress": False}
    cells, rep = build_slide_embedding_set([slide["slide"]], [labels], info, predictor=Predictor(model), **kw)
    r = rep["images"][0]
    assert r["source"] == "segmented" and r["n_matched"] == r["n_labels"] == len(corner[:6])
    entry = EmbeddingCache(tmp_path / "cache" / "embeddings").load_entry(info.sha256, slide_input_hash(
        slide["slide"], "mask"))  # fmt: skip
    x, y, w, h = entry.meta["roi"]
    assert (x, y) == (0, 0) and 50 < w < 200 and 50 < h < 200  # not the whole 200x200 image
    assert (tmp_path / "cache" / "segment" / info.sha256[:16] / "crop77" / "run.json").is_file()

    def boom(self, tiles):
        raise RuntimeError("the model ran")

    monkeypatch.setattr(Predictor, "__call__", boom)
    again, rep2 = build_slide_embedding_set([slide["slide"]], [labels], info, predictor=Predictor(model), **kw)
    assert rep2["images"][0]["source"] == "cache"
    np.testing.assert_array_equal(again.embeddings, cells.embeddings)
    far = tmp_path / "far.geojson"
    outside = [i for i, f in enumerate(feats) if np.asarray(f["geometry"]["coordinates"][0]).min(0).min() > x + w]
    qupath_labels(slide["out"], far, lambda i: i == outside[0])  # a cell beyond the segmented region
    with pytest.raises(RuntimeError, match="the model ran"):  # so the region must grow: a new segmentation
        build_slide_embedding_set([slide["slide"]], [far], info, predictor=Predictor(model), **kw)


@needs_shared
def test_embedding_set_groups_overlapping_patches_by_source_tile() -> None:
    """CoNSeP patch copy: patches of one source tile overlap, so they must share a split group (no leakage)."""
    from cytoken.io.datasets import open_dataset
    from cytoken.pipeline.classifier import build_embedding_set

    ds = open_dataset("consep_patched", SHARED / "consep_patched", split="train")
    assert len(set(ds.groups)) < len(ds)  # several patches per source tile
    model, info = load_model("cytoken-default")
    cells, _ = build_embedding_set(ds, Predictor(model), info, limit=3, progress=False)
    assert len(cells.groups) and set(cells.groups.tolist()) <= set(ds.groups[:3])
    assert set(cells.groups.tolist()).isdisjoint(ds.ids[:3])
