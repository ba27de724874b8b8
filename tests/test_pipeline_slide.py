"""The streaming slide pipeline: cells kept once across tiles, level-0 coordinates, resume after a kill, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.slide import SlideConfig, segment_slide
from cytoken.types import CytokenError
from cytoken.weights import ModelInfo

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_image import Oracle, disks, encode, hashed_encode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
INFO = ModelInfo(name="oracle", sha256="0" * 64, source="test")


def _read_cells(folder: Path) -> list[dict]:
    with gzip.open(folder / "cells.geojson.gz", "rt") as f:
        return json.load(f)["features"]


def test_slide_cells_kept_exactly_once(tmp_path: Path) -> None:
    gt = disks((600, 760), 200, seed=3, r=(5, 9))
    path = tmp_path / "slide.png"
    Image.fromarray(encode(gt)).save(path)
    oracle = Oracle(tile=128, overlap=48)
    cfg = SlideConfig(segment=SegmentConfig(batch_size=4), mpp=0.25, detect_tissue=False, read_workers=0,
                      decode_workers=0)  # fmt: skip
    summary = segment_slide(path, tmp_path / "out", oracle, INFO, cfg, progress=False)
    assert summary["tiles"] > 20 and summary["cells"] == gt.max()
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "slide" / "cells.parquet").to_pandas()
    assert sorted(table["id"]) == list(range(1, gt.max() + 1))
    ids_at = gt[np.rint(table["y"]).astype(int), np.rint(table["x"]).astype(int)]
    assert (ids_at > 0).all() and len(np.unique(ids_at)) == gt.max()  # every disk once
    feats = _read_cells(tmp_path / "out" / "slide")
    assert len(feats) == gt.max() and feats[0]["geometry"]["type"] == "Polygon"
    run = json.loads((tmp_path / "out" / "slide" / "run.json").read_text())
    assert run["peak_rss_tree_mb"] >= run["peak_rss_main_mb"] > 0 and run["tiles"] == summary["tiles"]
    assert not (tmp_path / "out" / ".slide.partial").exists()


def test_20x_slide_upsampled_and_mapped_to_level0(tmp_path: Path) -> None:
    gt = disks((300, 380), 60, seed=5, r=(5, 8))  # a "slide" at 0.5 µm/px, run at the model's 0.25
    path = tmp_path / "s20.png"
    Image.fromarray(hashed_encode(gt)).save(path)
    oracle = Oracle(tile=128, overlap=48, valid=int(gt.max()))
    cfg = SlideConfig(segment=SegmentConfig(batch_size=4), mpp=0.5, detect_tissue=False, read_workers=0,
                      decode_workers=0)  # fmt: skip
    summary = segment_slide(path, tmp_path / "out", oracle, INFO, cfg, progress=False)
    assert summary["scale_to_model"] == pytest.approx(2.0)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "s20" / "cells.parquet").to_pandas()
    assert abs(len(table) - gt.max()) <= 2
    ids_at = gt[np.clip(np.rint(table["y"]).astype(int), 0, 299), np.clip(np.rint(table["x"]).astype(int), 0, 379)]
    assert (ids_at > 0).mean() > 0.95  # level-0 coordinates of the 0.5 µm/px slide, not model pixels


def test_slide_with_worker_processes_matches_inline(tmp_path: Path) -> None:
    gt = disks((400, 400), 80, seed=4, r=(5, 9))
    path = tmp_path / "s.png"
    Image.fromarray(encode(gt)).save(path)
    oracle = Oracle(tile=128, overlap=48)
    out = {}
    for workers in (0, 1):
        cfg = SlideConfig(segment=SegmentConfig(batch_size=4), mpp=0.25, detect_tissue=False,
                          read_workers=workers, decode_workers=workers)  # fmt: skip
        segment_slide(path, tmp_path / f"o{workers}", oracle, INFO, cfg, progress=False)
        out[workers] = (tmp_path / f"o{workers}" / "s" / "cells.parquet").read_bytes()
    assert out[0] == out[1]


def test_no_tissue_gives_empty_valid_output(tmp_path: Path) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(path)
    cfg = SlideConfig(mpp=0.25, read_workers=0, decode_workers=0)
    with pytest.warns(UserWarning, match="no tissue"):
        summary = segment_slide(path, tmp_path / "o", Oracle(), INFO, cfg, progress=False)
    assert summary["cells"] == 0 and summary["tiles"] == 0
    assert _read_cells(tmp_path / "o" / "blank") == []


def test_bad_slides(tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(CytokenError, match="openslide"):
        segment_slide(bad, tmp_path / "o", Oracle(), INFO, SlideConfig(mpp=0.25), progress=False)
    img = tmp_path / "nompp.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    with pytest.raises(CytokenError, match="--mpp"):
        segment_slide(img, tmp_path / "o", Oracle(), INFO, SlideConfig(), progress=False)
    with pytest.raises(CytokenError, match=r"0\.75"):
        segment_slide(img, tmp_path / "o", Oracle(), INFO, SlideConfig(mpp=1.0), progress=False)
    assert not (tmp_path / "o" / "broken").exists() and not (tmp_path / "o" / "nompp").exists()


@needs_data
@pytest.mark.slow
def test_kill_and_resume_gives_identical_outputs(tmp_path: Path) -> None:
    """A real slide, a small random model, the real CLI in a subprocess killed mid-run, then --resume."""
    import torch

    from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(encoder="vit_tiny_test", num_classes=2, tile_size=128, overlap=32))
    weights = save_segmenter(model, tmp_path / "tiny.safetensors")
    svs = SHARED / "wsi" / "CMU-1-Small-Region.svs"
    base = [sys.executable, "-m", "cytoken.cli.main", "segment", str(svs), "--model", str(weights), "--quiet",
            "--batch-size", "4", "--roi", "0,0,900,700", "--read-workers", "0", "--decode-workers", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*base, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    partial = tmp_path / "cut" / ".CMU-1-Small-Region.partial" / "done.jsonl"
    proc = subprocess.Popen([*base, "--out", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "CMU-1-Small-Region").exists(), "a killed run must leave no output"
    done_before = len(partial.read_text().splitlines())
    subprocess.run([*base, "--out", str(tmp_path / "cut"), "--resume"], check=True, env=env, capture_output=True)
    a, b = tmp_path / "full" / "CMU-1-Small-Region", tmp_path / "cut" / "CMU-1-Small-Region"
    assert done_before >= 2
    for name in ("cells.parquet", "cells.json", "cell_detection.json", "embeddings.npy", "cells.h5ad"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _read_cells(a) == _read_cells(b)
