"""Slide runs that go wrong or end: a tile that cannot be read mid-run, the end-of-run summary, killed runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoken.cli.main import main
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.procs import descendants
from cytoken.pipeline.slide import SlideConfig, segment_slide
from cytoken.types import CytokenError
from cytoken.weights import ModelInfo

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_image import Oracle, disks, encode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PYRAMID = SHARED / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"
SVS = SHARED / "wsi" / "CMU-1-Small-Region.svs"
needs_pyramid = pytest.mark.skipif(not PYRAMID.is_file(), reason=f"{PYRAMID} not present")
needs_both = pytest.mark.skipif(not (PYRAMID.is_file() and SVS.is_file()), reason=f"{PYRAMID} or {SVS} not present")
INFO = ModelInfo(name="oracle", sha256="0" * 64, source="test")


def _tiled_tiff(path: Path, rgb: np.ndarray) -> Path:
    """A zlib-compressed TIFF in 64 x 64 tiles."""
    tifffile.imwrite(path, rgb, tile=(64, 64), compression="zlib", photometric="rgb")
    return path


def _corrupt_tile(path: Path, index: int) -> None:
    """Overwrite the compressed bytes of one TIFF tile with junk (the header and every other tile stay valid)."""
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[index], tf.pages[0].databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xa5" * count
    path.write_bytes(bytes(data))


def _config(read_workers: int, resume: bool = False) -> SlideConfig:
    return SlideConfig(segment=SegmentConfig(batch_size=2), mpp=0.25, detect_tissue=False, read_workers=read_workers,
                       decode_workers=0, resume=resume)  # fmt: skip


@pytest.mark.parametrize("read_workers", [0, 1])
def test_tile_that_fails_to_read_mid_run_is_one_clear_error_and_resumable(tmp_path: Path, read_workers: int) -> None:
    good = encode(disks((512, 512), 60, seed=7, r=(5, 9)))
    path = _tiled_tiff(tmp_path / "slide.tif", good)
    fresh = segment_slide(path, tmp_path / "fresh", Oracle(tile=128, overlap=48), INFO, _config(0), progress=False)
    _corrupt_tile(path, 4 * 8 + 4)  # TIFF tile at x, y = 256..320: grid tiles 14, 15, 20, 21 (stride 80) read it
    out = tmp_path / "out"
    with pytest.raises(CytokenError) as info:
        segment_slide(path, out, Oracle(tile=128, overlap=48), INFO, _config(read_workers), progress=False)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "DataLoader" not in message, message
    where = "cannot read tile 14 (row 2, column 2; level-0 x=160 y=160 128x128 px): "
    assert message.startswith(f"{path}: {where}"), message
    assert "--resume" in message
    assert not (out / "slide").exists(), "no output folder for a failed run"
    work = out / ".slide.partial"
    lines = (work / "done.jsonl").read_text().splitlines()
    assert [json.loads(line)["chunk"] for line in lines] == list(range(7)), "the 7 chunks before the bad tile"
    with open(work / "done.jsonl", "a") as fh:
        fh.write('{"chunk": 7')  # a line cut short by a kill: ignored
    if read_workers == 0:  # a partial folder of cytoken 0.1 (progress.json with the plan and the done list)
        legacy = tmp_path / "legacy" / ".slide.partial"
        shutil.copytree(work, legacy)
        plan = json.loads((legacy / "plan.json").read_text())
        (legacy / "progress.json").write_text(json.dumps({"plan": plan, "done": list(range(7))}))
        (legacy / "plan.json").unlink()
        (legacy / "done.jsonl").unlink()
    _tiled_tiff(path, good)  # the file is repaired (e.g. copied again): --resume finishes from the kept chunks
    for folder in (out, tmp_path / "legacy") if read_workers == 0 else (out,):
        resumed = segment_slide(path, folder, Oracle(tile=128, overlap=48), INFO, _config(read_workers, resume=True),
                                progress=False)  # fmt: skip
        assert resumed["tiles_resumed"] == 14 and resumed["tiles_segmented"] == fresh["tiles"] - 14
        for name in ("cells.parquet", "cells.json", "embeddings.npy"):
            assert (folder / "slide" / name).read_bytes() == (tmp_path / "fresh" / "slide" / name).read_bytes(), name


@needs_pyramid
def test_cli_real_corrupt_pyramid_tile_read_in_a_worker(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    """The real 20x pyramid TIFF with bytes zeroed mid-file: it opens, then a tile read in the worker fails."""
    path = tmp_path / "corrupt.tiff"
    data = bytearray(PYRAMID.read_bytes())
    data[300_000:1_200_000] = bytes(900_000)
    path.write_bytes(bytes(data))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((297, 222), 255, np.uint8)).save(mask)  # the thumbnail is unreadable too: give a mask
    out = tmp_path / "out"
    argv = ["segment", str(path), "--slide", "--out", str(out), "--model", str(tiny_model), "--quiet", "--tissue-mask",
            str(mask), "--roi", "0,1500,600,400", "--read-workers", "1", "--decode-workers", "0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cytoken: error: {path}: cannot read tile 0 (row 0, column 0; level-0 x=0 y=1500 "), err
    assert "corrupt or truncated file?" in err[0]
    assert not (out / "corrupt").exists()
    shutil.rmtree(out)


def test_cli_slide_summary_counts_tiles_time_and_worker_memory(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb = np.full((400, 400, 3), 255, np.uint8)
    rgb[:, :200] = encode(disks((400, 200), 30, seed=3, r=(5, 9)))  # tissue on the left half only
    path = _tiled_tiff(tmp_path / "half.tif", rgb)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.repeat(np.array([[255, 0]], np.uint8), 2, axis=0)).save(mask)  # left half is tissue
    out = tmp_path / "out"
    argv = ["segment", str(path), "--slide", "--mpp", "0.25", "--out", str(out), "--model", str(tiny_model),
            "--quiet", "--tissue-mask", str(mask), "--read-workers", "1", "--decode-workers", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    run = json.loads((out / "half" / "run.json").read_text())
    assert run["tiles_in_grid"] == 16 and run["tiles"] == 12  # 4 x 4 tiles of 128 px at stride 96; x < 200: 3 columns
    assert run["tiles_segmented"] == 12 and run["tiles_resumed"] == 0 and run["tiles_without_tissue"] == 4
    stages = run["stage_seconds"]
    assert set(stages) == {"plan", "tiles", "assemble"}
    assert run["wall_seconds"] >= sum(stages.values()) - 0.05 and run["wall_seconds"] > run["write_seconds"]
    # two spawned workers each import torch (> 100 MB): the tree's peak is well above the main process's
    assert run["peak_rss_tree_mb"] > run["peak_rss_main_mb"] + 150, run
    counts = ", ".join(f"{k} {v}" for k, v in run["cells_per_class"].items()) or "none"
    assert lines[0] == f"half.tif: {run['cells']} cells ({counts}) -> {out / 'half'}"
    assert lines[1] == "  tiles: 12 segmented, 0 resumed, 4 skipped without tissue (grid of 16)"
    assert lines[2].startswith(f"  wall time {run['wall_seconds']:.1f} s (plan ")
    assert lines[2].endswith(f"peak memory {run['peak_rss_tree_mb']:.0f} MB with the worker processes "
                             f"({run['peak_rss_main_mb']:.0f} MB main process)")  # fmt: skip


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may never reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_CHILD = """
import multiprocessing as mp, os, sys, time
from cytoken.pipeline.procs import die_with_parent

def child(parent, armed):
    die_with_parent(parent)
    armed.set()
    time.sleep(60)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    armed = ctx.Event()
    p = ctx.Process(target=child, args=(os.getpid(), armed))
    p.start()
    armed.wait(30)
    print(p.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_die_with_parent_kills_the_worker_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert _alive(child)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killed_run_leaves_no_worker_processes(tmp_path: Path, tiny_model: Path) -> None:
    """SIGKILL of `cytoken segment` mid-run: its reader and decoder worker processes die with it."""
    path = _tiled_tiff(tmp_path / "big.tif", encode(disks((1600, 1600), 400, seed=1, r=(5, 9))))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(mask)  # every tile is tissue
    cmd = [sys.executable, "-m", "cytoken.cli.main", "segment", str(path), "--slide", "--mpp", "0.25", "--out",
           str(tmp_path / "out"), "--model", str(tiny_model), "--quiet", "--read-workers", "1", "--decode-workers", "1",
           "--batch-size", "2", "--tissue-mask", str(mask)]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        workers: list[int] = []
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            kids = descendants(proc.pid)
            workers = [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]
            if len(workers) >= 2 and (tmp_path / "out" / ".big.partial" / "chunks" / "000000.npz").is_file():
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(workers) >= 2, "the run ended before both workers were seen"
        kids = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.1)
    left = [k for k in kids if _alive(k)]
    for k in left:  # do not leave them to the next test
        os.kill(k, signal.SIGKILL)
    assert not left, f"worker processes outlived the killed run: {left}"


def test_rerun_removes_the_temporary_folders_a_killed_run_left(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    Image.fromarray(encode(disks((200, 200), 10, seed=1, r=(5, 9)))).save(path)
    out = tmp_path / "out"
    stale = [out / ".s.k2j_9x0a.tmp", out / ".s.00000000.tmp"]  # tempfile.mkdtemp names of an interrupted run
    keep = [out / ".s.other.k2j_9x0a.tmp", out / ".sx.k2j_9x0a.tmp", out / "s.k2j_9x0a.tmp"]  # not this slide's
    for d in stale + keep:
        (d / "cells.parquet").parent.mkdir(parents=True)
        (d / "cells.parquet").write_bytes(b"partial")
    segment_slide(path, out, Oracle(tile=128, overlap=48), INFO, _config(0, resume=True), progress=False)
    assert not any(d.exists() for d in stale) and all(d.exists() for d in keep)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".s.")) == [".s.other.k2j_9x0a.tmp"]


def test_geopandas_reads_slide_geojson(tmp_path: Path, tiny_model: Path) -> None:
    """cells.geojson.gz (default) through GDAL's /vsigzip/; --plain-geojson writes cells.geojson for read_file."""
    gpd = pytest.importorskip("geopandas")
    import pyarrow.parquet as pq

    gt = disks((300, 300), 30, seed=5, r=(5, 9))
    path = tmp_path / "s.png"
    Image.fromarray(encode(gt)).save(path)
    segment_slide(path, tmp_path / "gz", Oracle(tile=128, overlap=48), INFO, _config(0), progress=False)
    folder = tmp_path / "gz" / "s"
    assert not (folder / "cells.geojson").exists()
    with pytest.raises(Exception, match="not recognized"):  # why the docs say /vsigzip/
        gpd.read_file(folder / "cells.geojson.gz")
    df = gpd.read_file(f"/vsigzip/{folder / 'cells.geojson.gz'}")
    assert df.crs is not None  # GeoJSON implies WGS 84; the coordinates are slide pixels: drop it
    df = df.set_crs(None, allow_override=True)
    table = pq.read_table(folder / "cells.parquet").to_pandas()
    assert len(df) == len(table) == gt.max()
    assert list(df["cell_id"]) == list(table["id"]) and df.geometry.is_valid.all()
    np.testing.assert_allclose(df.geometry.centroid.x, table["x"], atol=1.0)
    gt_at = gt[np.rint(df.geometry.centroid.y).astype(int), np.rint(df.geometry.centroid.x).astype(int)]
    assert (gt_at > 0).all()  # polygons in level-0 pixels of the slide

    out, mask = tmp_path / "plain", tmp_path / "mask.png"
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(mask)
    argv = ["segment", str(path), "--slide", "--mpp", "0.25", "--out", str(out), "--model", str(tiny_model), "--quiet",
            "--read-workers", "0", "--decode-workers", "0", "--plain-geojson", "--tissue-mask", str(mask)]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "s" / "cells.geojson.gz").exists()
    plain = gpd.read_file(out / "s" / "cells.geojson")
    assert len(plain) == json.loads((out / "s" / "run.json").read_text())["cells"]


@needs_both
def test_real_20x_pyramid_tiff_cells_in_level0_pixels(tmp_path: Path) -> None:
    """The real 20x (0.499 µm/px) generic pyramid TIFF through the whole pipeline with the default model.

    The slide is upsampled 2x to the model's 0.25 µm/px; the cells must come back in level-0 pixels: nuclei are
    dark, so the grey level at the centroids is far below the grey level a few pixels away, or at 2x or 0.5x the
    coordinates (model pixels, or a wrong level); and they agree with the same region of the SVS it was made from.
    """
    import pyarrow.parquet as pq

    from cytoken.io.slide import open_slide
    from cytoken.models.store import load_model
    from cytoken.pipeline.predictor import Predictor
    from cytoken.types import Bounds

    model, info = load_model("cytoken-default")
    predictor = Predictor(model, "cpu")
    roi = Bounds(600, 900, 500, 400)  # level-0 px of a cell-dense region
    tables = {}
    for path, workers in ((PYRAMID, 1), (SVS, 0)):
        cfg = SlideConfig(roi=roi, read_workers=workers, decode_workers=workers)
        summary = segment_slide(path, tmp_path, predictor, info, cfg, progress=False)
        assert summary["scale_to_model"] == pytest.approx(0.499 / 0.25, rel=1e-3)
        tables[path] = pq.read_table(tmp_path / path.stem / "cells.parquet").to_pandas()
    cells, svs_cells = tables[PYRAMID], tables[SVS]
    assert len(cells) > 60 and abs(len(cells) - len(svs_cells)) <= 0.1 * len(svs_cells)
    assert cells["x"].between(roi.x - 1, roi.x1 + 1).all() and cells["y"].between(roi.y - 1, roi.y1 + 1).all()
    with open_slide(PYRAMID) as slide:
        grey = slide.read_region(Bounds(0, 0, *slide.dimensions), slide.mpp).mean(axis=2)

    def mean_grey(x: np.ndarray, y: np.ndarray) -> float:
        xi = np.clip(np.rint(x).astype(int), 0, grey.shape[1] - 1)
        yi = np.clip(np.rint(y).astype(int), 0, grey.shape[0] - 1)
        return float(grey[yi, xi].mean())

    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    at = mean_grey(x, y)
    around = np.mean([mean_grey(x + dx, y + dy) for dx, dy in ((8, 0), (-8, 0), (0, 8), (0, -8))])
    assert at < 80 and around - at > 60, (at, around)  # measured: 40 at the centroids, 149 eight pixels away
    assert mean_grey(2 * x, 2 * y) - at > 100 and mean_grey(x / 2, y / 2) - at > 100
    a, b = cells[["x", "y"]].to_numpy(), svs_cells[["x", "y"]].to_numpy()
    nearest = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(axis=1)
    assert (nearest < 3).mean() > 0.85  # measured: 95% within 3 px of an SVS cell, median 0.14 px


def test_done_record_is_append_only_and_survives_a_cut_line(tmp_path: Path) -> None:
    from cytoken.pipeline.slide import _done_chunks, _prepare_workdir, _record_done

    work, plan = tmp_path / ".s.partial", {"slide": "s.svs", "tiles": [3, 4, 5]}

    def finish(chunk: int) -> None:
        (work / "chunks" / f"{chunk:06d}.npz").write_bytes(b"cells")
        _record_done(work, chunk)

    assert _prepare_workdir(work, plan, resume=False) == set()
    finish(0)
    finish(1)
    assert (work / "done.jsonl").read_text() == '{"chunk": 0}\n{"chunk": 1}\n'  # one line per chunk, appended
    with open(work / "done.jsonl", "a") as fh:
        fh.write('{"chunk": 2')  # killed while writing the line
    assert _prepare_workdir(work, plan, resume=True) == {0, 1}
    finish(2)
    assert _done_chunks(work) == {0, 1, 2}  # the cut line did not swallow the next one
    (work / "progress.json").write_text(json.dumps({"plan": plan, "done": [0, 1]}))  # a cytoken 0.1 folder
    (work / "plan.json").unlink()
    (work / "done.jsonl").unlink()
    assert _prepare_workdir(work, plan, resume=True) == {0, 1}
    assert not (work / "progress.json").exists() and _done_chunks(work) == {0, 1}
    with pytest.raises(CytokenError, match="other settings"):
        _prepare_workdir(work, {**plan, "tiles": [3]}, resume=True)
