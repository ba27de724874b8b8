"""cells.h5ad: AnnData written chunk by chunk that reads back (anndata.read_h5ad) equal to cells.parquet and
embeddings.npy, for the writer alone, an image run and a slide run; bounded memory; a clear skip without anndata."""

from __future__ import annotations

import sys
import tracemalloc
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.io.export import H5ADCellWriter, ParquetCellWriter, h5ad_missing_dependency, write_h5ad
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.outputs import CellOutputWriter
from cytoken.pipeline.run import segment_image_file
from cytoken.pipeline.slide import SlideConfig, segment_slide
from cytoken.types import CellSet, CytokenError
from cytoken.weights import ModelInfo

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_image import Oracle, disks, encode

anndata = pytest.importorskip("anndata", reason="cells.h5ad tests need anndata (pip install 'cytoken[anndata]')")
pq = pytest.importorskip("pyarrow.parquet")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
INFO = ModelInfo(name="oracle", sha256="ab" * 32, source="test")
NAMES = ("tumor", "immune")


class TokenOracle(Oracle):
    """The perfect-maps oracle with seeded random tokens, so that every cell gets its own embedding."""

    def __call__(self, tiles: np.ndarray) -> list:
        outs = super().__call__(tiles)
        rng = np.random.default_rng(self.calls)
        return [replace(o, tokens=rng.standard_normal(o.tokens.shape).astype(np.float32)) for o in outs]


def _chunk(start: int, n: int, dim: int | None, seed: int, mpp: float = 0.5) -> CellSet:
    """``n`` synthetic cells with ids ``start..`` (square contours are not needed by the h5ad writer)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 5000, (n, 2))
    return CellSet(
        ids=np.arange(start, start + n),
        centroids=xy,
        bboxes=np.concatenate([xy - 3, xy + 3], axis=1).astype(np.int64),
        contours=[np.zeros((0, 2))] * n,
        area_px=rng.integers(20, 200, n),
        class_ids=rng.integers(0, 3, n),
        class_probs=np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
        mpp=mpp,
        class_names=NAMES,
        class_colors=((255, 0, 0), (0, 128, 255)),
        tiles=rng.integers(-1, 40, n),
        embeddings=None if dim is None else rng.standard_normal((n, dim)).astype(np.float32),
    )


def _check_against_parquet(adata, table, emb_npy: np.ndarray | None = None) -> None:
    """obs / obsm / X of ``adata`` equal the parquet rows (same order) and the float16 embeddings file."""
    assert list(adata.obs_names) == [str(i) for i in table["id"]]
    np.testing.assert_array_equal(adata.obs["centroid_x"].to_numpy(), table["x"].to_numpy())
    np.testing.assert_array_equal(adata.obs["centroid_y"].to_numpy(), table["y"].to_numpy())
    np.testing.assert_array_equal(adata.obsm["spatial"], table[["x", "y"]].to_numpy())
    np.testing.assert_allclose(adata.obs["area_um2"].to_numpy(), table["area_um2"].to_numpy(), rtol=1e-12)
    assert list(adata.obs["class"].astype(str)) == list(table["class_name"])
    np.testing.assert_array_equal(adata.obs["class"].cat.codes.to_numpy(), table["class_id"].to_numpy())
    np.testing.assert_array_equal(adata.obs["class_prob"].to_numpy(), table["class_prob"].to_numpy())
    np.testing.assert_array_equal(adata.obs["tile"].to_numpy(), table["tile"].to_numpy())
    if emb_npy is not None:
        assert adata.X.dtype == np.float32 and adata.X.shape == emb_npy.shape
        np.testing.assert_array_equal(adata.X.astype(np.float16), emb_npy)  # X is the float32 the .npy rounds


# ------------------------------------------------------------------------------------------------ writer
def test_h5ad_round_trip_in_chunks(tmp_path: Path) -> None:
    parts = [_chunk(1, 50, 16, seed=1), _chunk(51, 0, 16, seed=2), _chunk(51, 123, 16, seed=3)]
    with H5ADCellWriter(tmp_path / "c.h5ad", uns={"model": {"name": "m", "sha256": "f" * 64, "none": None}},
                        chunk_rows=32) as w:  # fmt: skip
        for p in parts:
            w.add(p)
        w.uns["input"] = "slide.svs"
    with ParquetCellWriter(tmp_path / "c.parquet") as pw:
        for p in parts:
            pw.add(p)
    a = anndata.read_h5ad(tmp_path / "c.h5ad")
    assert a.shape == (173, 16) and w.count == 173 and w.dim == 16
    _check_against_parquet(a, pq.read_table(tmp_path / "c.parquet").to_pandas())
    np.testing.assert_array_equal(a.X, np.concatenate([p.embeddings for p in parts]))
    assert list(a.var_names) == [str(i) for i in range(16)]
    assert list(a.obs.columns) == ["centroid_x", "centroid_y", "area_um2", "class", "class_prob", "tile"]
    assert list(a.obs["class"].cat.categories) == ["unclassified", "tumor", "immune"]
    assert a.uns["mpp"] == 0.5 and list(a.uns["class_names"]) == list(NAMES)
    assert list(a.uns["class_colors"]) == ["#a0a0a0", "#ff0000", "#0080ff"]  # one per category, scanpy's key
    assert dict(a.uns["model"]) == {"name": "m", "sha256": "f" * 64} and a.uns["input"] == "slide.svs"
    import h5py

    with h5py.File(tmp_path / "c.h5ad") as f:  # chunked on disk, AnnData encodings on every element
        assert f["X"].chunks is not None and f["obs/centroid_x"].chunks == (32,)  # chunk_rows=32 caps 256
        assert f.attrs["encoding-type"] == "anndata" and f["obs/class"].attrs["encoding-type"] == "categorical"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_h5ad_without_embeddings_and_empty(tmp_path: Path) -> None:
    a = anndata.read_h5ad(write_h5ad([_chunk(1, 7, None, 1), _chunk(8, 5, None, 2)], tmp_path / "n.h5ad"))
    assert a.shape == (12, 0) and a.X.dtype == np.float32 and list(a.obs_names) == [str(i) for i in range(1, 13)]
    e = anndata.read_h5ad(write_h5ad([], tmp_path / "e.h5ad"))
    assert e.shape == (0, 0) and np.isnan(e.uns["mpp"]) and list(e.obs["class"].cat.categories) == ["unclassified"]


def test_h5ad_rejects_cells_that_cannot_join(tmp_path: Path) -> None:
    target = tmp_path / "c.h5ad"
    cases = [
        ([_chunk(1, 5, 8, 1), _chunk(6, 5, 8, 2, mpp=0.25)], "µm/px"),
        ([_chunk(1, 5, 8, 1), _chunk(6, 5, None, 2)], "no embeddings cannot follow cells with 8-d"),
        ([_chunk(1, 5, None, 1), _chunk(6, 5, 8, 2)], "8-d embeddings cannot follow cells with no embeddings"),
        ([_chunk(1, 5, 8, 1), _chunk(6, 5, 4, 2)], "4-d embeddings cannot follow cells with 8-d"),
        ([replace(_chunk(1, 5, 8, 1), class_names=("unclassified", "b"))], "must be unique"),
    ]
    for parts, message in cases:
        with pytest.raises(ValueError, match=message):
            write_h5ad(parts, target)
        assert not target.exists() and not list(tmp_path.iterdir())  # nothing left, not even a temporary file
    w = H5ADCellWriter(target)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add(_chunk(1, 1, None, 1))


def test_h5ad_streams_with_bounded_memory(tmp_path: Path) -> None:
    """24 000 cells x 256 dims (X = 24.6 MB) in 1 000-cell chunks: peak traced memory stays flat, a few MB."""
    n_chunks, per, dim = 24, 1000, 256
    tracemalloc.start()
    try:
        with H5ADCellWriter(tmp_path / "big.h5ad") as w:
            for k in range(n_chunks):
                w.add(_chunk(1 + k * per, per, dim, seed=k))
                if k == 2:
                    _, early = tracemalloc.get_traced_memory()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = n_chunks * per * dim * 4
    assert peak < full / 4 and peak < 1.25 * early, f"peak {peak / 1e6:.1f} MB (after 3 chunks {early / 1e6:.1f})"
    a = anndata.read_h5ad(tmp_path / "big.h5ad", backed="r")
    assert a.shape == (n_chunks * per, dim)
    last = _chunk(1 + (n_chunks - 1) * per, per, dim, seed=n_chunks - 1)
    np.testing.assert_array_equal(a.X[-per:], last.embeddings)
    assert a.obs_names[-1] == str(n_chunks * per)
    a.file.close()


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="no RLIMIT_FSIZE on this OS")
@pytest.mark.parametrize("limit_kib", [64, 1024])  # the limit is hit early or late in the stream
def test_h5ad_real_write_failure_is_an_oserror_and_leaves_nothing(tmp_path: Path, limit_kib: int) -> None:
    """The OS refuses to grow the file (RLIMIT_FSIZE): one OSError, no temporary file, no crash afterwards."""
    import gc
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kib * 1024, hard))
    try:
        with pytest.raises(OSError) as info, H5ADCellWriter(tmp_path / "c.h5ad") as w:
            for k in range(4):
                w.add(_chunk(1 + k * 1000, 1000, 64, seed=k))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large" in str(info.value)
    del w, info
    gc.collect()  # HDF5 objects of the failed file are released without crashing the interpreter
    assert list(tmp_path.iterdir()) == []


def test_missing_anndata_skips_h5ad_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anndata", None)  # as if not installed
    assert 'pip install "cytoken[anndata]"' in h5ad_missing_dependency()
    cells = _chunk(1, 10, 4, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = CellOutputWriter(tmp_path)
        writer.add(cells)
        writer.close({"model": {"name": "m"}})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "cells.h5ad not written" in messages[0], messages
    assert 'pip install "cytoken[anndata]"' in messages[0]
    assert not (tmp_path / "cells.h5ad").exists() and (tmp_path / "cells.parquet").is_file()
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CytokenError, match=r"needs h5py: pip install \"cytoken\[anndata\]\""):
        H5ADCellWriter(tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


# ------------------------------------------------------------------------------------------------ pipeline runs
def test_image_run_writes_h5ad_equal_to_parquet_and_embeddings(tmp_path: Path) -> None:
    gt = disks((300, 340), 40, seed=2, r=(5, 9))
    path = tmp_path / "img.png"
    Image.fromarray(encode(gt)).save(path)
    summary = segment_image_file(path, tmp_path / "out", TokenOracle(tile=128, overlap=48), INFO,
                                 SegmentConfig(batch_size=4), mpp=0.25, overlay=False)  # fmt: skip
    out = tmp_path / "out" / "img"
    a = anndata.read_h5ad(out / "cells.h5ad")
    assert a.n_obs == summary["cells"] == gt.max() and a.n_vars == 4
    emb = np.load(out / "embeddings.npy")
    assert np.abs(emb).sum(axis=1).min() > 0  # real, distinct embeddings (not the oracle's zeros)
    _check_against_parquet(a, pq.read_table(out / "cells.parquet").to_pandas(), emb)
    assert dict(a.uns["model"]) == {"name": "oracle", "sha256": "ab" * 32} and a.uns["mpp"] == 0.25
    assert a.uns["input"] == str(path)


@pytest.mark.parametrize("embeddings", ["mask", "none"])
def test_slide_run_writes_h5ad_in_level0_pixels(tmp_path: Path, embeddings: str) -> None:
    from test_pipeline_image import hashed_encode

    gt = disks((300, 380), 60, seed=5, r=(5, 8))  # a "slide" at 0.5 µm/px, run at the model's 0.25
    path = tmp_path / "s20.png"
    Image.fromarray(hashed_encode(gt)).save(path)
    cfg = SlideConfig(segment=SegmentConfig(batch_size=2, embeddings=embeddings), mpp=0.5, detect_tissue=False,
                      read_workers=0, decode_workers=0)  # fmt: skip
    oracle = TokenOracle(tile=128, overlap=48, valid=int(gt.max()))
    summary = segment_slide(path, tmp_path / "out", oracle, INFO, cfg, progress=False)
    out = tmp_path / "out" / "s20"
    assert summary["tiles"] >= 8  # several spilled chunks streamed into the file
    a = anndata.read_h5ad(out / "cells.h5ad")
    table = pq.read_table(out / "cells.parquet").to_pandas()
    assert a.n_obs == len(table) == summary["cells"] > 40
    if embeddings == "none":
        assert a.shape[1] == 0 and not (out / "embeddings.npy").exists()
        _check_against_parquet(a, table)
    else:
        _check_against_parquet(a, table, np.load(out / "embeddings.npy"))
    assert a.uns["mpp"] == 0.5  # level-0 pixels of the slide
    ys = np.clip(np.rint(a.obsm["spatial"][:, 1]).astype(int), 0, 299)
    xs = np.clip(np.rint(a.obsm["spatial"][:, 0]).astype(int), 0, 379)
    assert (gt[ys, xs] > 0).mean() > 0.95
