"""Slide reading (all backends), tissue masks and ROI parsing."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoken.io.image import CytokenWarning
from cytoken.io.slide import (
    ArraySlide,
    PILSlide,
    TiffSlide,
    backend_order,
    detect_tissue,
    load_tissue_mask,
    open_slide,
    parse_roi,
    tissue_fraction,
)
from cytoken.types import Bounds, CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
SVS = SHARED / "wsi" / "CMU-1-Small-Region.svs"
PYRAMID = SHARED / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"
QPTIFF = SHARED / "if_sample" / "small_vectra.qptiff"
CMU_MPP = 0.499
CMU_DIMS = (2220, 2967)


def _image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (so resampling comparisons are meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


# ---------------------------------------------------------------------- in-memory slides and resampling
def test_array_slide_describes_itself():
    img = _image()
    s = ArraySlide(img, mpp=0.5)
    assert s.dimensions == (160, 120)
    assert s.mpp == 0.5 and s.mpp_source == "argument"
    assert s.levels == [(160, 120, 1.0)]
    assert s.channels == 3 and s.channel_names == ("R", "G", "B") and s.is_rgb
    assert s.backend == "array" and s.path is None


def test_read_at_native_mpp_returns_stored_pixels_and_pads_white():
    img = _image()
    s = ArraySlide(img, mpp=0.5)
    np.testing.assert_array_equal(s.read_region(Bounds(10, 20, 50, 30), 0.5), img[20:50, 10:60])
    out = s.read_region(Bounds(-5, 100, 20, 40), 0.5)
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out[20:, :], 255)  # below the slide
    np.testing.assert_array_equal(out[:, :5], 255)  # left of the slide
    np.testing.assert_array_equal(out[:20, 5:], img[100:120, 0:15])


def test_read_region_output_shape_is_rounded_physical_size():
    s = ArraySlide(_image(), mpp=0.499)
    out = s.read_region(Bounds(0, 0, 101, 37), 0.25)
    assert out.shape == (round(37 * 0.499 / 0.25), round(101 * 0.499 / 0.25), 3)
    assert s.read_region(Bounds(0, 0, 3, 3), 2.0).shape == (1, 1, 3)  # never empty


def test_resampling_matches_opencv_area_and_linear():
    img = _image(240, 320)
    s = ArraySlide(img, mpp=0.25)
    down = s.read_region(Bounds(0, 0, 320, 240), 0.5)
    ref = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    assert np.abs(down.astype(int) - ref).max() <= 1
    odd = s.read_region(Bounds(0, 0, 320, 240), 0.61)  # non-integer factor
    ref = cv2.resize(img, (odd.shape[1], odd.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(odd.astype(int) - ref).max() <= 1
    up = s.read_region(Bounds(0, 0, 320, 240), 0.125)
    ref = cv2.resize(img, (640, 480), interpolation=cv2.INTER_LINEAR)
    assert np.abs(up.astype(int) - ref).max() <= 1


def test_read_scaled_windows_line_up_with_one_big_read():
    img = _image(200, 200)
    s = ArraySlide(img, mpp=0.4)
    for mpp in (0.25, 0.55):  # enlarge and shrink, both with fractional window positions
        whole = s.read_scaled(Bounds(0, 0, 90, 70), mpp)
        left = s.read_scaled(Bounds(0, 0, 37, 70), mpp)
        right = s.read_scaled(Bounds(37, 0, 53, 70), mpp)
        assert whole.shape == (70, 90, 3)
        assert np.abs(np.concatenate([left, right], axis=1).astype(int) - whole).max() <= 1


def test_thumbnail_and_channels_read():
    s = ArraySlide(_image(120, 160), mpp=0.5)
    thumb, mpp = s.thumbnail(40)
    assert thumb.shape == (30, 40, 3) and mpp == pytest.approx(2.0)
    assert s.thumbnail(1000)[0].shape == (120, 160, 3)  # never enlarged
    multi = ArraySlide(np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4), mpp=0.5)
    assert not multi.is_rgb and multi.channel_names == ("C0", "C1", "C2", "C3")
    np.testing.assert_array_equal(multi.read_channels(Bounds(0, 0, 3, 2), 0.5), multi.array)
    with pytest.raises(CytokenError, match="read_channels"):
        multi.read_region(Bounds(0, 0, 3, 2), 0.5)


def test_mpp_rules():
    img = _image(16, 16)
    with pytest.raises(CytokenError, match="--mpp"):
        ArraySlide(img)
    with pytest.raises(CytokenError, match="20x"):
        ArraySlide(img, mpp=1.0)
    with pytest.raises(CytokenError, match="outside the plausible range"):
        ArraySlide(img, mpp=50)
    with pytest.raises(CytokenError):
        ArraySlide(img, mpp=0.5).read_region(Bounds(0, 0, 4, 4), mpp=-1)
    with pytest.raises(ValueError, match="positive"):
        ArraySlide(img, mpp=0.5).read_region(Bounds(0, 0, 0, 4), mpp=0.5)


def test_array_slide_pickles_and_context_manager_closes():
    s = ArraySlide(_image(), mpp=0.5)
    t = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(
        t.read_region(Bounds(0, 0, 30, 30), 0.5), s.read_region(Bounds(0, 0, 30, 30), 0.5)
    )
    with open_slide(_image(), mpp=0.5) as u:
        assert u.dimensions == (160, 120)
    with pytest.raises(CytokenError, match="closed"):
        u.read_region(Bounds(0, 0, 4, 4), 0.5)


# ---------------------------------------------------------------------- files written here
def test_pyramidal_ome_tiff_levels_and_metadata(tmp_path: Path):
    base = _image(512, 768)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            base,
            subifds=2,
            tile=(128, 128),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
        )
        for f in (2, 4):
            tw.write(
                cv2.resize(base, (768 // f, 512 // f), interpolation=cv2.INTER_AREA),
                subfiletype=1,
                tile=(128, 128),
                photometric="rgb",
            )
    assert backend_order(path)[0] == "tifffile"
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert [lv[:2] for lv in s.levels] == [(768, 512), (384, 256), (192, 128)]
        assert s.mpp == pytest.approx(0.25) and s.is_rgb
        assert s.best_level(0.25) == 0 and s.best_level(0.5) == 1 and s.best_level(0.9) == 1
        assert s.best_level(1.0) == 2
        box = Bounds(64, 96, 400, 240)
        np.testing.assert_array_equal(s.read_region(box, 0.25), base[96:336, 64:464])
        coarse = s.read_region(box, 1.0)  # from level 2
        ref = cv2.resize(base[96:336, 64:464], (100, 60), interpolation=cv2.INTER_AREA)
        assert coarse.shape == (60, 100, 3) and _mad(coarse, ref) < 2
        thumb, mpp = s.thumbnail(96)
        assert thumb.shape == (64, 96, 3) and mpp == pytest.approx(2.0)
    with open_slide(path, mpp=0.3) as s:  # explicit argument wins
        assert s.mpp == 0.3 and s.mpp_source == "argument"


def test_striped_tiff_resolution_tags_and_channel_names(tmp_path: Path):
    img = _image(300, 200)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", rowsperstrip=7, resolution=(20000, 20000), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as s:  # openslide refuses untiled TIFF, tifffile takes over
        assert s.backend == "tifffile"
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(Bounds(13, 50, 100, 33), 0.5), img[50:83, 13:113])
    planes = np.stack([img[:, :, 0], img[:, :, 1]]).astype(np.uint16) * 200
    path2 = tmp_path / "if.ome.tif"
    tifffile.imwrite(
        path2, planes, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD8"]}, "PhysicalSizeX": 0.5}
    )
    with open_slide(path2) as s:
        assert s.channel_names == ("DAPI", "CD8") and s.dtype == np.uint16 and not s.is_rgb
        np.testing.assert_array_equal(s.read_channels(Bounds(0, 0, 200, 300), 0.5), planes.transpose(1, 2, 0))


def test_png_slide_and_wrong_extension_fallback(tmp_path: Path):
    img = _image()
    png = tmp_path / "img.png"
    Image.fromarray(img).save(png)
    with open_slide(png, mpp=0.5) as s:
        assert isinstance(s, PILSlide)
        np.testing.assert_array_equal(s.read_region(Bounds(0, 0, 160, 120), 0.5), img)
    fake = tmp_path / "renamed.svs"
    shutil.copy(png, fake)
    with pytest.warns(CytokenWarning) as caught, open_slide(fake, mpp=0.5) as s:  # only Pillow opens it
        assert s.backend == "pil"
        np.testing.assert_array_equal(s.read_region(Bounds(0, 0, 160, 120), 0.5), img)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(caught[0].message).startswith(
        f"{fake}: extension .svs implies the openslide backend, but the file opened with the pil backend (wrong "
        "extension?); openslide: "  # then why OpenSlide refused it
    )
    with pytest.raises(CytokenError, match="--mpp") as err:  # the mpp error is final, not "cannot open"
        open_slide(fake)
    assert "cannot open" not in str(err.value)
    with pytest.warns(CytokenWarning, match="wrong extension"):
        reopened = pickle.loads(pickle.dumps(open_slide(fake, mpp=0.5)))
    assert reopened.mpp == 0.5 and reopened.dimensions == (160, 120)


def test_warns_once_when_the_extension_does_not_match_the_backend(tmp_path: Path):
    png = tmp_path / "img.png"
    Image.fromarray(_image()).save(png)
    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, _image())  # untiled TIFF: tifffile, one of the two backends .tif implies
    for path in (png, tif, tmp_path / "plain.ome.tif"):
        if not path.exists():
            tifffile.imwrite(path, _image(), tile=(64, 64))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            open_slide(path, mpp=0.5).close()
    cases = {"img.xyz": (png, "pil", "extension .xyz is not a known slide or image type"),
             "noext": (tif, "tifffile", "extension (none) is not a known slide or image type"),
             "tiff.png": (tif, "tifffile", "extension .png implies the pil backend"),
             "png.ome.tif": (png, "pil", "extension .ome.tif implies the tifffile backend")}  # fmt: skip
    for name, (source, backend, said) in cases.items():
        renamed = tmp_path / name
        shutil.copy(source, renamed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = open_slide(renamed, mpp=0.5)
        s.close()
        assert s.backend == backend
        assert len(caught) == 1 and caught[0].category is CytokenWarning, [str(w.message) for w in caught]
        message = str(caught[0].message)
        assert message.startswith(f"{renamed}: {said}") and f"the {backend} backend" in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a forced backend does not warn
        open_slide(tmp_path / "img.xyz", mpp=0.5, backend="pil").close()


@needs_shared
def test_real_svs_renamed_warns_and_still_opens(tmp_path: Path):
    renamed = tmp_path / "CMU.png"
    shutil.copy(SVS, renamed)
    with pytest.warns(CytokenWarning, match=r"extension \.png implies the pil backend, but the file opened with the "
                      r"(openslide|tifffile) backend") as caught, open_slide(renamed) as s:  # fmt: skip
        assert s.dimensions == CMU_DIMS
    assert len(caught) == 1


def test_unreadable_files_name_every_backend(tmp_path: Path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"definitely not a slide" * 100)
    with pytest.raises(CytokenError) as err:
        open_slide(junk, mpp=0.5)
    msg = str(err.value)
    assert all(f"{name}:" in msg for name in ("openslide", "tifffile", "pil"))
    with pytest.raises(CytokenError, match=r"tried tifffile: not a readable TIFF"):
        open_slide(junk, mpp=0.5, backend="tifffile")
    with pytest.raises(CytokenError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="unknown backend"):
        open_slide(junk, backend="bioformats")


# ---------------------------------------------------------------------- real slides
@needs_shared
def test_real_svs_and_pyramid_metadata():
    with open_slide(SVS) as svs:
        assert svs.backend == "openslide"
        assert svs.dimensions == CMU_DIMS and svs.mpp == pytest.approx(CMU_MPP)
        assert len(svs.levels) == 1 and svs.is_rgb
    for backend in ("openslide", "tifffile"):
        with open_slide(PYRAMID, backend=backend) as pyr:
            assert pyr.dimensions == CMU_DIMS and pyr.mpp == pytest.approx(CMU_MPP)
            assert [lv[:2] for lv in pyr.levels] == [(2220, 2967), (1110, 1483), (555, 741)]
            assert pyr.level_mpps[1] == pytest.approx(0.998, rel=1e-3)


@needs_shared
def test_real_svs_upsampled_read_matches_opencv():
    box = Bounds(800, 1200, 200, 150)
    with open_slide(SVS) as s:
        native = s.read_region(box, CMU_MPP)
        assert native.shape == (150, 200, 3)
        fine = s.read_region(box, 0.25)
    assert fine.shape == (round(150 * CMU_MPP / 0.25), round(200 * CMU_MPP / 0.25), 3) == (299, 399, 3)
    ref = cv2.resize(native, (399, 299), interpolation=cv2.INTER_LINEAR)
    assert np.abs(fine.astype(int) - ref)[1:-1, 1:-1].max() <= 2
    assert _mad(fine, ref) < 0.5


@needs_shared
def test_real_svs_and_pyramid_agree_on_the_same_region():
    box = Bounds(800, 1200, 400, 300)
    with (
        open_slide(SVS) as svs,
        open_slide(PYRAMID) as os_pyr,
        open_slide(PYRAMID, backend="tifffile") as tf_pyr,
    ):
        a = svs.read_region(box, CMU_MPP)
        b = os_pyr.read_region(box, CMU_MPP)
        c = tf_pyr.read_region(box, CMU_MPP)
        shifted = svs.read_region(Bounds(box.x + 1, box.y + 1, box.width, box.height), CMU_MPP)
        with open_slide(SVS, backend="tifffile") as svs_tf:
            np.testing.assert_array_equal(
                svs_tf.read_region(box, CMU_MPP), a
            )  # same JPEG tiles, same decoder
    np.testing.assert_array_equal(b, c)  # two backends, same file
    # the pyramid was re-encoded as JPEG: close, and closer than a one-pixel shift
    assert _mad(a, b) < 10 and _mad(a, b) < 0.8 * _mad(shifted, b)


@needs_shared
@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_real_pyramid_level_read_is_close_to_downsampled_level0(backend: str):
    box = Bounds(1000, 1000, 600, 500)
    with open_slide(SVS) as svs, open_slide(PYRAMID, backend=backend) as pyr:
        ref = cv2.resize(svs.read_region(box, CMU_MPP), (299, 250), interpolation=cv2.INTER_AREA)
        assert pyr.best_level(1.0) == 1
        coarse = pyr.read_region(box, 1.0)
        off = pyr.read_region(Bounds(box.x + 2, box.y + 2, box.width, box.height), 1.0)
    assert coarse.shape == (250, 299, 3)
    assert _mad(coarse, ref) < 10 and _mad(coarse, ref) < 0.8 * _mad(off, ref)


@needs_shared
def test_real_slide_pickles_and_reopens_by_path():
    box = Bounds(0, 0, 64, 64)
    with open_slide(PYRAMID) as s:
        first = s.read_region(box, 1.0)
        clone = pickle.loads(pickle.dumps(s))
        other = s.reopen()
    assert clone is not s and clone.backend == s.backend == other.backend == "openslide"
    np.testing.assert_array_equal(clone.read_region(box, 1.0), first)
    np.testing.assert_array_equal(other.read_region(box, 1.0), first)
    clone.close()
    other.close()


@needs_shared
def test_real_truncated_slide_gives_clear_error(tmp_path: Path):
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(PYRAMID.read_bytes()[:900_000])
    with pytest.raises(CytokenError, match="truncated"), open_slide(cut) as s:
        s.thumbnail(256)
    cut_svs = tmp_path / "cut.svs"
    cut_svs.write_bytes(SVS.read_bytes()[:1_000_000])
    with pytest.raises(CytokenError, match="cannot open"):
        open_slide(cut_svs)


@needs_shared
def test_real_qptiff_opens_with_named_channels():
    with open_slide(QPTIFF) as s:
        assert s.backend == "tifffile"
        assert s.channels == 3 and s.channel_names == ("DAPI", "FITC", "Cy3")
        assert s.dimensions == (1920, 1440) and s.mpp == pytest.approx(0.4965, abs=1e-3)
        assert not s.is_rgb
        with pytest.raises(CytokenError, match="DAPI, FITC, Cy3"):
            s.read_region(Bounds(0, 0, 64, 64), s.mpp)
        region = s.read_channels(Bounds(100, 200, 300, 150), s.mpp)
        # the model's grid (0.25 µm/px, about 2x the scan): tiles laid out on it join up to one read of the whole
        whole = s.read_scaled_channels(Bounds(0, 0, 96, 64), 0.25)
        parts = [s.read_scaled_channels(Bounds(x, 0, 32, 64), 0.25) for x in (0, 32, 64)]
        full_w = s.dimensions[0] * s.mpp / 0.25  # the slide's width on the model's grid (~3813 px)
        edge = s.read_scaled_channels(Bounds(int(full_w) - 8, 0, 16, 4), 0.25)
    expected = tifffile.imread(QPTIFF, series=0)[:, 200:350, 100:400].transpose(1, 2, 0)
    np.testing.assert_array_equal(region, expected)
    assert whole.shape == (64, 96, 3) and whole.dtype == np.uint8
    assert np.abs(np.concatenate(parts, axis=1).astype(int) - whole).max() <= 1
    raw = tifffile.imread(QPTIFF, series=0)[:, :32, :48].transpose(1, 2, 0).astype(float)
    assert np.abs(whole[::2, ::2].astype(float) - raw).mean() < 8  # ~2x upsampled stored pixels
    assert edge.shape == (4, 16, 3) and edge[:, :7].any() and not edge[:, 10:].any()  # zero beyond the edge
    assert isinstance(TiffSlide(QPTIFF), TiffSlide)


# ---------------------------------------------------------------------- tissue, masks, ROI
@needs_shared
def test_detect_tissue_on_real_thumbnail():
    with open_slide(SVS) as s:
        thumb, mpp = s.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and mpp == pytest.approx(CMU_MPP * 2220 / 383, rel=1e-6)
    mask = detect_tissue(thumb)
    assert mask.shape == thumb.shape[:2] and mask.dtype == bool
    frac = tissue_fraction(mask)
    assert 0.25 < frac < 0.6, frac
    # the detected tissue is the stained part: clearly more saturated than what is left out
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1]
    assert sat[mask].mean() > 40 > sat[~mask].mean()


def test_detect_tissue_on_blank_slides():
    rng = np.random.default_rng(1)
    white = np.clip(rng.normal(243, 4, (400, 300, 3)), 0, 255).astype(np.uint8)
    tinted = np.clip(rng.normal(0, 3, (400, 300, 3)) + np.array([246, 238, 222]), 0, 255).astype(np.uint8)
    thumb, _ = ArraySlide(white, mpp=0.5).thumbnail(128)
    assert not detect_tissue(thumb).any()
    assert not detect_tissue(tinted).any()
    spotted = white.copy()
    spotted[100:220, 50:200] = (170, 90, 160)
    spotted[10:12, 10:12] = (120, 40, 120)  # dust: removed as a small object
    mask = detect_tissue(spotted)
    assert mask[100:220, 50:200].mean() > 0.99 and not mask[10:12, 10:12].any()
    assert not mask[:97].any() and not mask[223:].any() and not mask[:, :47].any() and not mask[:, 203:].any()
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(np.zeros((10, 10), np.uint8))


def test_load_tissue_mask(tmp_path: Path):
    arr = np.zeros((30, 40), np.uint8)
    arr[5:10, 5:20] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(arr).save(path)
    mask = load_tissue_mask(path, (4000, 3000))
    assert mask.dtype == bool and mask.shape == (30, 40) and mask.sum() == 75
    assert load_tissue_mask(path, (4001, 3002)).shape == (30, 40)  # rounding of the mask size is fine
    with pytest.raises(CytokenError, match="aspect ratio"):
        load_tissue_mask(path, (3000, 3000))
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(CytokenError, match="no tissue"):
        load_tissue_mask(tmp_path / "empty.png", (4000, 3000))
    with pytest.raises(CytokenError, match="cannot read"):
        load_tissue_mask(tmp_path / "nope.png", (4000, 3000))


def test_parse_roi():
    assert parse_roi("10,20,300,400") == Bounds(10, 20, 300, 400)
    assert parse_roi(" 0 , 0 , 5 , 6 ") == Bounds(0, 0, 5, 6)
    assert parse_roi("2000,2900,1000,1000", slide_dims=CMU_DIMS) == Bounds(2000, 2900, 220, 67)
    for bad, why in [
        ("10,20,300", "four integers"),
        ("a,b,c,d", "four integers"),
        ("1.5,2,3,4", "four integers"),
        ("-1,0,5,5", ">= 0"),
        ("0,0,0,5", "> 0"),
    ]:
        with pytest.raises(CytokenError, match=why):
            parse_roi(bad)
    with pytest.raises(CytokenError, match="outside"):
        parse_roi("3000,0,10,10", slide_dims=CMU_DIMS)


@needs_shared
@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_real_slide_reads_from_threads_match_serial_reads(backend: str):
    from concurrent.futures import ThreadPoolExecutor

    boxes = [Bounds(x, y, 300, 300) for x in (0, 500, 1000, 1500) for y in (0, 900, 1800, 2600)]
    with open_slide(PYRAMID, backend=backend) as s:
        serial = [s.read_region(b, 0.6) for b in boxes]
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(lambda b: s.read_region(b, 0.6), boxes))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


@needs_shared
def test_real_slide_tiles_read_at_model_resolution():
    from cytoken.io.tiling import TileGrid, model_image_size, mpp_scale

    with open_slide(SVS) as s:
        size = model_image_size(s.dimensions, mpp_scale(s.mpp, 0.25))
        grid = TileGrid(size, 1024, 64)
        tile = grid.tile(len(grid) - 1)  # bottom-right: ends on the slide border
        img = s.read_scaled(tile.bounds, 0.25)
        assert img.shape == (1024, 1024, 3)
        assert tile.bounds.x1 == size[0] and tile.bounds.y1 == size[1]
        # where model pixels fall on whole slide pixels, read_scaled and read_region are the same read
        half = s.mpp / 2
        scaled = s.read_scaled(Bounds(2000, 1000, 300, 200), half)
        np.testing.assert_array_equal(scaled, s.read_region(Bounds(1000, 500, 150, 100), half))
