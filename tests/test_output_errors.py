"""A failed write (disk full, file too large, read-only or unwritable folder) stops `cytoken segment` with ONE
clear error naming the file and the OS reason, and leaves no half-written output and no temporary files."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.cli.main import main
from cytoken.io.atomic import AtomicFile
from cytoken.io.export import H5ADCellWriter
from cytoken.pipeline.image import SegmentConfig
from cytoken.pipeline.outputs import CellOutputWriter, OutputWriteError
from cytoken.pipeline.run import segment_image_file
from cytoken.pipeline.slide import SlideConfig, segment_slide
from cytoken.types import CytokenError
from cytoken.weights import ModelInfo

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_image import Oracle, disks, encode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
INFO = ModelInfo(name="oracle", sha256="0" * 64, source="test")
ENOSPC = "no space left on device while writing"
OUTPUTS = ["cells.geojson", "cells.json", "cell_detection.json", "cells.parquet", "cells.h5ad", "embeddings.npy",
           "overlay.png", "run.json"]  # fmt: skip
not_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="running as root: permissions are not enforced"
)


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere below ``folder``."""
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name or ".cytoken" in p.name]


def _fail_commit_of(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The disk fills up while ``name`` is being committed (its fsync / rename fails with ENOSPC)."""
    commit = AtomicFile.commit

    def failing(self: AtomicFile) -> None:
        if self.path.name == name:
            self.abort()
            raise _disk_full()
        commit(self)

    monkeypatch.setattr(AtomicFile, "commit", failing)


class _Quota:
    """A file handle that raises ENOSPC once all handles together have written more than ``budget[0]`` bytes."""

    def __init__(self, fh, budget: list[int]) -> None:
        self._fh, self._budget = fh, budget

    def write(self, data) -> int:
        self._budget[0] -= len(data)
        if self._budget[0] < 0:
            raise _disk_full()
        return self._fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def _small_disk(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Every atomically written file shares ``budget`` bytes; JSON streams flush every 2 KB (mid-stream writes)."""
    left = [budget]
    init = AtomicFile.__init__

    def limited(self: AtomicFile, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if self.file is not None:
            self.file = _Quota(self.file, left)

    monkeypatch.setattr(AtomicFile, "__init__", limited)
    monkeypatch.setattr("cytoken.io.export._stream._FLUSH_BYTES", 2048)


@pytest.fixture()
def disk_image(tmp_path: Path) -> Path:
    """A 260 x 300 image whose pixels encode 40 disks for the oracle."""
    path = tmp_path / "img.png"
    Image.fromarray(encode(disks((260, 300), 40, seed=2, r=(5, 9)))).save(path)
    return path


def _segment_image(path: Path, out: Path) -> dict:
    return segment_image_file(path, out, Oracle(tile=128, overlap=48), INFO, SegmentConfig(batch_size=4), mpp=0.25)


def _segment_slide(path: Path, out: Path, resume: bool = False) -> dict:
    cfg = SlideConfig(segment=SegmentConfig(batch_size=2), mpp=0.25, detect_tissue=False, read_workers=0,
                      decode_workers=0, resume=resume)  # fmt: skip
    return segment_slide(path, out, Oracle(tile=128, overlap=48), INFO, cfg, progress=False)


# ------------------------------------------------------------------------------------------------ image runs
@pytest.mark.parametrize("name", OUTPUTS)
def test_image_run_names_the_file_that_could_not_be_written(
    name: str, tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _fail_commit_of(monkeypatch, name)
    with pytest.raises(OutputWriteError) as info:
        _segment_image(disk_image, out)
    assert str(info.value) == f"{ENOSPC} {out / 'img' / name}"
    assert isinstance(info.value, CytokenError)
    assert list(out.iterdir()) == []  # no output folder, no temporary folder or file


def test_image_run_disk_full_mid_stream_keeps_the_previous_output(
    tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _segment_image(disk_image, out)
    before = {p.name: p.read_bytes() for p in (out / "img").iterdir()}
    closes: list[int] = []
    close = CellOutputWriter.close
    monkeypatch.setattr(CellOutputWriter, "close", lambda self, info: closes.append(1) or close(self, info))
    _small_disk(monkeypatch, budget=12_000)
    with pytest.raises(OutputWriteError, match=re.escape(f"{ENOSPC} {out / 'img' / 'cells.geojson'}") + "$"):
        _segment_image(disk_image, out)
    assert not closes  # failed inside add(), while streaming the cells
    assert {p.name: p.read_bytes() for p in (out / "img").iterdir()} == before  # the old result is untouched
    assert [p.name for p in out.iterdir()] == ["img"] and not _leftovers(out)


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="no RLIMIT_FSIZE on this OS")
def test_image_run_real_file_size_limit(tmp_path: Path, disk_image: Path) -> None:
    """A real OS refusal: with RLIMIT_FSIZE at 16 KiB, writes past it fail with EFBIG in every library."""
    import resource

    out = tmp_path / "out"
    out.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(OutputWriteError) as info:
            _segment_image(disk_image, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert message.startswith("file too large while writing " + str(out / "img")), message
    assert Path(message.split(" while writing ")[1]).name in OUTPUTS, message
    assert list(out.iterdir()) == []


def test_cli_image_run_one_clear_error(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    _fail_commit_of(monkeypatch, "cells.geojson")
    argv = ["segment", str(path), "--mpp", "0.25", "--out", str(out), "--model", str(tiny_model), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cytoken: error: {ENOSPC} {out / 'img' / 'cells.geojson'}", err  # one line, no traceback
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------ slide runs
def test_slide_spill_disk_full_then_resume(tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cytoken.pipeline.slide as slide_module

    out = tmp_path / "out"
    work = out / ".img.partial"
    saved: list[Path] = []
    save = slide_module.save_cells

    def spill(cells, path):
        if saved:
            raise _disk_full()
        saved.append(Path(path))
        return save(cells, path)

    monkeypatch.setattr(slide_module, "save_cells", spill)
    with pytest.raises(OutputWriteError) as info:
        _segment_slide(disk_image, out)
    assert str(info.value) == (f"{ENOSPC} {work / 'chunks' / '000001.npz'}; the finished tiles are kept in {work}, "
                               "rerun with --resume to continue from them")  # fmt: skip
    assert not (out / "img").exists() and not _leftovers(out)
    assert sorted(p.name for p in (work / "chunks").iterdir()) == ["000000.npz"]  # complete chunks only
    monkeypatch.setattr(slide_module, "save_cells", save)  # space freed: --resume finishes the run
    resumed = _segment_slide(disk_image, out, resume=True)
    fresh = _segment_slide(disk_image, tmp_path / "fresh")
    assert resumed["cells"] == fresh["cells"] > 30
    for name in ("cells.parquet", "cells.geojson.gz", "cells.h5ad"):
        assert (out / "img" / name).is_file(), name
    assert (out / "img" / "cells.parquet").read_bytes() == (tmp_path / "fresh" / "img" / "cells.parquet").read_bytes()
    assert not work.exists() and not _leftovers(out)


def test_slide_assembly_disk_full_mid_stream(tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    calls: list[int] = []
    append = H5ADCellWriter._append

    def filling(self, ds, values):
        calls.append(1)
        if len(calls) > 12:  # the second chunk of cells
            raise OSError(f"Can't write data (file write failed: errno = {errno.ENOSPC}, error message = ...)")
        append(self, ds, values)

    monkeypatch.setattr(H5ADCellWriter, "_append", filling)
    with pytest.raises(OutputWriteError, match=re.escape(f"{ENOSPC} {out / 'img' / 'cells.h5ad'}; ") + ".*--resume"):
        _segment_slide(disk_image, out)
    assert not (out / "img").exists() and not _leftovers(out)
    assert [p.name for p in out.iterdir()] == [".img.partial"]  # only the resumable chunks


def test_cli_slide_run_one_clear_error(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cytoken.pipeline.slide as slide_module

    path = tmp_path / "tiny.tif"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((50, 50), 255, np.uint8)).save(mask)  # every tile is tissue
    out = tmp_path / "out"

    def no_space(cells, target):
        raise _disk_full()

    monkeypatch.setattr(slide_module, "save_cells", no_space)
    argv = ["segment", str(path), "--slide", "--mpp", "0.25", "--out", str(out), "--model", str(tiny_model),
            "--quiet", "--read-workers", "0", "--decode-workers", "0", "--batch-size", "2",
            "--tissue-mask", str(mask)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    work = out / ".tiny.partial"
    assert err.splitlines() == [f"cytoken: error: {ENOSPC} {work / 'chunks' / '000000.npz'}; the finished tiles are "
                                f"kept in {work}, rerun with --resume to continue from them"], err  # fmt: skip
    assert not (out / "tiny").exists() and not _leftovers(out)


# ------------------------------------------------------------------------------------------------ unwritable folders
def test_read_only_file_system(tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EROFS when the slide's work folder is created, simulated (works as root too)."""
    out = tmp_path / "out"
    mkdir = Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:
        if ".partial" in str(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(
        OutputWriteError, match=re.escape(f"read-only file system while writing {out / '.img.partial'}")
    ):
        _segment_slide(disk_image, out)
    assert not _leftovers(tmp_path)


@not_root
def test_unwritable_output_directory(
    tmp_path: Path, disk_image: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CytokenError, match="not writable: Permission denied"):
            _segment_image(disk_image, ro)
        with pytest.raises(OutputWriteError, match=r"^permission denied while writing"):
            _segment_slide(disk_image, ro)
        argv = ["segment", str(disk_image), "--mpp", "0.25", "--out", str(ro / "sub"), "--model", str(tiny_model)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cytoken: error: cannot create output directory") and "Permission denied" in err, err
        assert len(err.splitlines()) == 1
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_cli_output_directory_without_write_permission(
    tmp_path: Path, disk_image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """EACCES on the output folder, simulated (works as root too): one line before any model is loaded."""
    import tempfile

    out = tmp_path / "out"
    out.mkdir()
    mkstemp = tempfile.mkstemp

    def denied(*args, **kwargs):
        if str(out) in str(kwargs.get("dir", "")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    argv = ["segment", str(disk_image), "--mpp", "0.25", "--out", str(out), "--model", "no-such-model-needed"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cytoken: error: output directory {out} is not writable: Permission denied", err
    assert list(out.iterdir()) == []
