import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from cytoken.io.image import CytokenWarning, LoadedImage, read_image, read_image_size
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def _rgb(h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(arr).save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------------------ happy paths
@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_lossless_rgb_round_trip(tmp_path, suffix):
    arr = _rgb()
    p = _save(arr, tmp_path / f"a{suffix}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain RGB must not warn
        img = read_image(p, mpp=0.25)
    assert isinstance(img, LoadedImage)
    assert img.array.dtype == np.uint8 and img.array.shape == (64, 80, 3)
    np.testing.assert_array_equal(img.array, arr)
    assert (img.mpp, img.mpp_source, img.path) == (0.25, "argument", p)
    assert read_image_size(p) == (80, 64)


def test_jpeg_reads_close_to_original(tmp_path):
    arr = np.full((48, 48, 3), (200, 100, 50), np.uint8)
    p = _save(arr, tmp_path / "a.jpg", quality=95)
    img = read_image(p, mpp=0.5)
    assert img.array.shape == (48, 48, 3)
    assert np.abs(img.array.astype(int) - arr).max() <= 3


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200  # red
    rgba[:20, :, 3] = 255  # top half opaque
    rgba[20:, :, 3] = 0  # bottom half fully transparent
    p = _save(rgba, tmp_path / "a.png")
    with pytest.warns(CytokenWarning, match="composited on white"):
        img = read_image(p, mpp=0.25)
    assert img.array[0, 0].tolist() == [200, 0, 0]
    assert img.array[-1, -1].tolist() == [255, 255, 255]


def test_opaque_rgba_drops_alpha_with_warning(tmp_path):
    rgba = np.dstack([_rgb(40, 40), np.full((40, 40), 255, np.uint8)])
    p = _save(rgba, tmp_path / "a.png")
    with pytest.warns(CytokenWarning, match="alpha channel dropped"):
        img = read_image(p, mpp=0.25)
    np.testing.assert_array_equal(img.array, rgba[..., :3])


def test_grayscale_to_rgb_with_warning(tmp_path):
    g = np.arange(40 * 50, dtype=np.uint32).reshape(40, 50).astype(np.uint8)
    p = _save(g, tmp_path / "g.png")
    with pytest.warns(CytokenWarning, match="grayscale"):
        img = read_image(p, mpp=0.25)
    assert img.array.shape == (40, 50, 3)
    for c in range(3):
        np.testing.assert_array_equal(img.array[..., c], g)


def test_16bit_gray_png_scaled_with_warnings(tmp_path):
    g = np.zeros((40, 40), np.uint16)
    g[0, 0], g[0, 1], g[0, 2] = 65535, 257 * 100, 0
    p = _save(g, tmp_path / "g16.png")
    with pytest.warns(CytokenWarning) as rec:
        img = read_image(p, mpp=0.25)
    messages = " | ".join(str(w.message) for w in rec)
    assert "16-bit" in messages and "grayscale" in messages
    assert img.array[0, :3, 0].tolist() == [255, 100, 0]


def test_16bit_rgb_tiff_scaled(tmp_path):
    arr = np.zeros((40, 40, 3), np.uint16)
    arr[0, 0] = (65535, 32896, 257)
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, arr, photometric="rgb")
    with pytest.warns(CytokenWarning, match="16-bit"):
        img = read_image(p, mpp=0.25)
    assert img.array.dtype == np.uint8
    assert img.array[0, 0].tolist() == [255, 128, 1]


def test_planar_rgb_tiff(tmp_path):
    arr = _rgb(40, 50)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, np.moveaxis(arr, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(p, mpp=0.25).array, arr)


# ------------------------------------------------------------------------------------------------ µm/px
def test_tiff_resolution_tags_give_mpp(tmp_path):
    p = tmp_path / "res.tif"
    tifffile.imwrite(
        p, _rgb(), photometric="rgb", resolution=(10000 / 0.25, 10000 / 0.25), resolutionunit="CENTIMETER"
    )
    img = read_image(p)
    assert img.mpp == pytest.approx(0.25) and img.mpp_source == "tiff-resolution"
    p2 = tmp_path / "res_inch.tif"
    tifffile.imwrite(
        p2, _rgb(), photometric="rgb", resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH"
    )
    assert read_image(p2).mpp == pytest.approx(0.5)


def test_argument_wins_over_tags_with_warning(tmp_path):
    p = tmp_path / "res.tif"
    tifffile.imwrite(p, _rgb(), photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with pytest.warns(CytokenWarning, match="overrides"):
        img = read_image(p, mpp=0.5)
    assert (img.mpp, img.mpp_source) == (0.5, "argument")


def test_implausible_tags_ignored(tmp_path):
    p = tmp_path / "dpi72.tif"
    tifffile.imwrite(p, _rgb(), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(CytokenError, match="implausible") as exc:
        read_image(p)
    assert "--mpp 0.25" in str(exc.value) and "--mpp 0.5" in str(exc.value)
    assert read_image(p, mpp=0.25).mpp == 0.25


def test_missing_mpp_error_says_how(tmp_path):
    p = _save(_rgb(), tmp_path / "a.png")
    with pytest.raises(CytokenError) as exc:
        read_image(p)
    msg = str(exc.value)
    assert "--mpp 0.25" in msg and "40x" in msg and "--mpp 0.5" in msg and "20x" in msg
    img = read_image(p, require_mpp=False)
    assert img.mpp is None and img.mpp_source == "none"


@pytest.mark.parametrize("bad", [0.0, -1.0, 0.01, 10.0, float("nan")])
def test_bad_mpp_argument(tmp_path, bad):
    p = _save(_rgb(), tmp_path / "a.png")
    with pytest.raises(CytokenError, match="µm/px"):
        read_image(p, mpp=bad)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(CytokenError, match="not found"):
        read_image(tmp_path / "nope.png", mpp=0.25)
    with pytest.raises(CytokenError, match="not found"):
        read_image_size(tmp_path / "nope.png")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(CytokenError, match="directory"):
        read_image(tmp_path, mpp=0.25)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CytokenError, match="empty"):
        read_image(tmp_path / "empty.png", mpp=0.25)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 20)
    with pytest.raises(CytokenError, match="not a readable image"):
        read_image(p, mpp=0.25)
    with pytest.raises(CytokenError, match="not a readable image"):
        read_image_size(p)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
@pytest.mark.parametrize("keep", [0.5, 0.9, "minus_end"])
def test_truncated_images_detected(tmp_path, fmt, suffix, keep):
    buf = io.BytesIO()
    Image.fromarray(_rgb(128, 128)).save(buf, format=fmt)
    data = buf.getvalue()
    cut = len(data) - 12 if keep == "minus_end" else int(len(data) * keep)
    p = tmp_path / f"trunc{suffix}"
    p.write_bytes(data[:cut])
    with pytest.raises(CytokenError, match="truncated"):
        read_image(p, mpp=0.25)


def test_truncated_detected_even_if_pillow_flag_set(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buf = io.BytesIO()
    Image.fromarray(_rgb(128, 128)).save(buf, format="JPEG")
    p = tmp_path / "t.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CytokenError, match="truncated"):
        read_image(p, mpp=0.25)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff_detected(tmp_path, compression):
    p = tmp_path / "full.tif"
    tifffile.imwrite(p, _rgb(256, 256), photometric="rgb", compression=compression)
    data = p.read_bytes()
    q = tmp_path / "trunc.tif"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(CytokenError, match="could not be decoded"):
        read_image(q, mpp=0.25)


def test_tiff_falls_back_to_pillow_when_tifffile_cannot_decode(tmp_path, monkeypatch):
    arr = _rgb(40, 50)
    p = tmp_path / "lzw.tif"
    res = {"resolution": (40000, 40000), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(p, arr, photometric="rgb", compression="zlib", **res)

    def no_codec(self, *args, **kwargs):
        raise ValueError("codec not available")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_codec)
    img = read_image(p)
    np.testing.assert_array_equal(img.array, arr)
    assert img.mpp == pytest.approx(0.25)


def test_too_small(tmp_path):
    p = _save(_rgb(31, 100), tmp_path / "small.png")
    with pytest.raises(CytokenError, match="at least 32 px"):
        read_image(p, mpp=0.25)
    read_image(_save(_rgb(32, 32), tmp_path / "ok.png"), mpp=0.25)


def test_unsupported_channel_counts(tmp_path):
    p = tmp_path / "five.tif"
    tifffile.imwrite(p, np.zeros((40, 40, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(CytokenError, match="5 channels"):
        read_image(p, mpp=0.25)
    q = tmp_path / "stack.tif"
    tifffile.imwrite(q, np.zeros((3, 40, 40), np.uint8), photometric="minisblack")
    with pytest.raises(CytokenError, match="not supported"):
        read_image(q, mpp=0.25)


# ------------------------------------------------------------------------------------------------ real data
@needs_shared
def test_real_monuseg_png():
    paths = sorted((SHARED / "monuseg" / "test" / "images").glob("*.png"))
    assert paths, "no MoNuSeg test images found"
    img = read_image(paths[0], mpp=0.25)
    assert img.array.shape == (1000, 1000, 3) and img.array.dtype == np.uint8
    assert 50 < img.array.mean() < 250  # an H&E tile, not blank
    np.testing.assert_array_equal(img.array, np.asarray(Image.open(paths[0]).convert("RGB")))
    assert read_image_size(paths[0]) == (1000, 1000)


@needs_shared
def test_real_pyramid_tiff_mpp_from_tags():
    p = SHARED / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"
    img = read_image(p)
    assert img.mpp == pytest.approx(0.499, abs=1e-6) and img.mpp_source == "tiff-resolution"
    assert img.array.shape == (2967, 2220, 3)
    assert read_image_size(p) == (2220, 2967)


@needs_shared
def test_real_multiplex_if_refused():
    with pytest.raises(CytokenError, match="not supported"):
        read_image(SHARED / "if_sample" / "small_vectra.qptiff", mpp=0.5)
