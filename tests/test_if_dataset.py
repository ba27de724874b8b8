"""The join of IF label tables to segment outputs (``cytoken.pipeline.if_dataset``) on a hand-made output whose cell
ids are not in row order (as in slide outputs, written tile by tile)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cytoken.pipeline.if_dataset import build_if_label_set
from cytoken.types import CytokenError


def _output(folder: Path, ids: list[int], sha: str = "a" * 64) -> np.ndarray:
    folder.mkdir(parents=True)
    emb = np.arange(len(ids) * 3, dtype=np.float16).reshape(len(ids), 3)
    pq.write_table(pa.table({"id": np.array(ids, np.int64)}), folder / "cells.parquet")
    np.save(folder / "embeddings.npy", emb)
    (folder / "run.json").write_text(json.dumps({"model": {"name": "m", "sha256": sha}}))
    return emb


def _labels(path: Path, ids: list[int], labels: list[int], kept: list[bool], marker: str = "CD3",
            cells_sha256: str | None = None) -> Path:  # fmt: skip
    table = pa.table({"cell_id": np.array(ids, np.int64), "label": np.array(labels, np.int8), "kept": kept,
                      "marker": [marker] * len(ids)})  # fmt: skip
    if cells_sha256 is not None:
        table = table.replace_schema_metadata({b"cytoken.cells_sha256": cells_sha256.encode()})
    pq.write_table(table, path)
    return path


def test_rows_are_joined_by_cell_id_and_unkept_rows_dropped(tmp_path: Path) -> None:
    emb = _output(tmp_path / "a", [7, 3, 12, 5])
    emb_b = _output(tmp_path / "b", [1, 2])
    la = _labels(tmp_path / "a.parquet", [12, 3, 5, 7], [1, 0, 1, 0], [True, True, False, True])
    lb = _labels(tmp_path / "b.parquet", [2, 1], [1, 1], [True, True])
    cells, report = build_if_label_set([la, lb], [tmp_path / "a", tmp_path / "b"])
    assert cells.class_names == ("CD3-", "CD3+")
    np.testing.assert_array_equal(cells.labels, [1, 0, 0, 1, 1])
    np.testing.assert_array_equal(cells.embeddings, np.concatenate([emb[[2, 1, 0]], emb_b[[1, 0]]]).astype(np.float32))
    assert list(cells.groups) == ["a", "a", "a", "b", "b"]
    assert report["n_labels"] == 5 and report["model_sha256"] == "a" * 64 and report["marker"] == "CD3"


def test_mismatches_are_refused(tmp_path: Path) -> None:
    _output(tmp_path / "a", [1, 2])
    _output(tmp_path / "c", [1, 2], sha="c" * 64)
    la = _labels(tmp_path / "a.parquet", [1, 2], [0, 1], [True, True])
    other_marker = _labels(tmp_path / "m.parquet", [1, 2], [0, 1], [True, True], marker="CD20")
    with pytest.raises(CytokenError, match="different models"):
        build_if_label_set([la, la], [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(CytokenError, match="different markers"):
        build_if_label_set([la, other_marker], [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(CytokenError, match="one segment output per IF label table"):
        build_if_label_set([la], [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(CytokenError, match="not a cytoken segment output"):
        build_if_label_set([la], [tmp_path])
    with pytest.raises(CytokenError, match="not found"):
        build_if_label_set([tmp_path / "none.parquet"], [tmp_path / "a"])


def test_the_recorded_segment_output_must_match(tmp_path: Path) -> None:
    from cytoken.weights import file_sha256

    _output(tmp_path / "a", [1, 2])
    _output(tmp_path / "b", [2, 1])  # same ids, other cells
    linked = _labels(tmp_path / "l.parquet", [1, 2], [0, 1], [True, True],
                     cells_sha256=file_sha256(tmp_path / "a" / "cells.parquet"))  # fmt: skip
    cells, _ = build_if_label_set([linked], [tmp_path / "a"])
    assert len(cells.labels) == 2
    with pytest.raises(CytokenError, match="another segment output than"):
        build_if_label_set([linked], [tmp_path / "b"])
