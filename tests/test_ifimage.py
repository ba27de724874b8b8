from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cytoken.io.ifimage import IFImage, read_if, write_ome_tiff
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QPTIFF = SHARED / "if_sample" / "small_vectra.qptiff"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


@needs_shared
def test_real_qptiff_names_shape_mpp():
    img = read_if(QPTIFF)
    assert img.channel_names == ("DAPI", "FITC", "Cy3")
    assert img.data.shape == (3, 1440, 1920)
    assert img.data.dtype == np.uint8
    assert img.mpp == pytest.approx(0.4965, abs=5e-4)
    assert img.meta["format"] == "qptiff"
    assert img.path == QPTIFF
    # the three planes are different images (not one page read three times)
    assert not np.array_equal(img.data[0], img.data[1])


@needs_shared
def test_real_qptiff_channel_selection_by_name_and_index():
    full = read_if(QPTIFF)
    sub = read_if(QPTIFF, channels=["cy3", "dapi"])
    assert sub.channel_names == ("Cy3", "DAPI")
    np.testing.assert_array_equal(sub.data[0], full.data[2])
    np.testing.assert_array_equal(sub.data[1], full.data[0])
    one = read_if(QPTIFF, channels=1)
    assert one.channel_names == ("FITC",)
    np.testing.assert_array_equal(one.channel("fitc"), full.data[1])


@needs_shared
def test_real_qptiff_unknown_marker_lists_channels():
    with pytest.raises(CytokenError) as err:
        read_if(QPTIFF, channels=["CD45"])
    msg = str(err.value)
    assert "CD45" in msg
    for name in ("DAPI", "FITC", "Cy3"):
        assert name in msg


@needs_shared
def test_mpp_override():
    assert read_if(QPTIFF, channels="DAPI", mpp=0.5).mpp == 0.5
    with pytest.raises(ValueError, match="outside"):
        read_if(QPTIFF, channels="DAPI", mpp=50.0)


def test_ome_tiff_roundtrip(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, (3, 20, 30), dtype=np.uint16)
    img = IFImage(data, ("DAPI", "CD45", "PanCK"), mpp=0.325)
    path = write_ome_tiff(img, tmp_path / "x.ome.tif")
    back = read_if(path)
    assert back.channel_names == ("DAPI", "CD45", "PanCK")
    assert back.mpp == pytest.approx(0.325)
    np.testing.assert_array_equal(back.data, data)
    assert back.meta["format"] == "ome-tiff"
    assert not list(tmp_path.glob(".*tmp"))


def test_ome_tiff_physical_size_unit_nm(tmp_path):
    data = np.zeros((2, 8, 8), np.uint8)
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": ["a", "b"]}, "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
    )
    img = read_if(path)
    assert img.mpp == pytest.approx(0.25)
    assert img.channel_names == ("a", "b")


def test_plain_multipage_tiff_uses_resolution_tags(tmp_path):
    data = np.arange(2 * 6 * 5, dtype=np.uint16).reshape(2, 6, 5)
    path = tmp_path / "plain.tif"
    # 20000 px per cm = 0.5 µm/px
    tifffile.imwrite(path, data, photometric="minisblack", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    img = read_if(path)
    assert img.channel_names == ("ch0", "ch1")
    assert img.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(img.data, data)


def test_single_channel_files_paths_and_mapping(tmp_path):
    a = np.zeros((10, 12), np.uint8)
    a[2:4, 3:5] = 200
    b = np.full((10, 12), 7, np.uint8)
    Image.fromarray(a).save(tmp_path / "DAPI.png")
    Image.fromarray(b).save(tmp_path / "CD3.png")
    img = read_if([tmp_path / "DAPI.png", tmp_path / "CD3.png"], mpp=0.5)
    assert img.channel_names == ("DAPI", "CD3")
    assert img.mpp == 0.5
    np.testing.assert_array_equal(img.channel("dapi"), a)
    mapped = read_if({"nuclei": tmp_path / "DAPI.png", "t_cells": tmp_path / "CD3.png"}, channels=["T_CELLS"])
    assert mapped.channel_names == ("t_cells",)
    np.testing.assert_array_equal(mapped.data[0], b)
    assert mapped.mpp is None  # PNG carries no µm/px and none was given


def test_single_channel_rgb_export_is_reduced_by_max(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1, 1] = (0, 180, 0)
    Image.fromarray(rgb).save(tmp_path / "CD8.png")
    img = read_if([tmp_path / "CD8.png"])
    assert img.data.shape == (1, 6, 6)
    assert img.data[0, 1, 1] == 180


def test_single_channel_files_must_match_in_size(tmp_path):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((11, 12), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(CytokenError, match="same size"):
        read_if([tmp_path / "a.png", tmp_path / "b.png"])


def test_missing_file_and_bad_index(tmp_path):
    with pytest.raises(CytokenError, match="not found"):
        read_if(tmp_path / "nope.qptiff")
    img = IFImage(np.zeros((2, 3, 3)), ("DAPI", "CD45"))
    with pytest.raises(CytokenError, match="out of range"):
        img.channel(2)
    assert img.index(-1) == 1
    with pytest.raises(CytokenError, match="no channels"):
        img.select([])


def test_ifimage_validates_shape_and_names():
    with pytest.raises(ValueError, match="channel names"):
        IFImage(np.zeros((2, 3, 3)), ("only_one",))
    assert IFImage(np.zeros((3, 3)), ("x",)).data.shape == (1, 3, 3)


def test_digit_strings_are_indices_unless_a_channel_has_that_name():
    """What a command line passes (``--marker 1``): a name first, else a 0-based index, else an error listing both."""
    img = IFImage(np.zeros((3, 2, 2)), ("DAPI", "CD3", "CD8"))
    assert img.index("1") == 1 and img.index(" 2") == 2 and img.index("cd8") == 2
    named = IFImage(np.zeros((2, 2, 2)), ("2", "1"))  # channels named by numbers: the name wins
    assert named.index("1") == 1 and named.index(1) == 1 and named.index("2") == 0
    with pytest.raises(CytokenError, match=r"channel index 3 out of range: 3 channels \['DAPI', 'CD3', 'CD8'\]"):
        img.index("3")
    with pytest.raises(CytokenError, match=r"channel '-1x' not found; available channels"):
        img.index("-1x")
# ---------------------------------------------------------------------------------------------- window-by-window reads
@needs_shared
def test_open_if_reads_the_real_qptiff_window_by_window():
    from cytoken.io.ifreader import open_if

    whole = read_if(QPTIFF)
    with open_if(QPTIFF) as r:
        assert r.meta["lazy"] and r.channel_names == whole.channel_names and r.mpp == whole.mpp
        assert r.shape == whole.shape and r.dtype == whole.data.dtype
        np.testing.assert_array_equal(r.read("cy3", 100, 200, 900, 1000), whole.data[2, 200:1000, 100:900])
        crop = r.crop(["DAPI", 1], 5, 6, 70, 80)
        assert crop.channel_names == ("DAPI", "FITC") and crop.mpp == whole.mpp
        np.testing.assert_array_equal(crop.data, whole.data[:2, 6:80, 5:70])
        ref = whole.data[0, :1435, :1918].astype(np.float32).reshape(205, 7, 274, 7).mean(axis=(1, 3))
        np.testing.assert_allclose(r.binned("dapi", 7), ref, rtol=1e-6)
        assert r.value_range("FITC") == (float(whole.data[1].min()), float(whole.data[1].max()))
        with pytest.raises(CytokenError, match="available channels"):
            r.read("CD3", 0, 0, 4, 4)
        with pytest.raises(ValueError, match="leaves"):
            r.read(0, 0, 0, 1921, 4)


def test_open_if_takes_a_coarse_ome_tiff_and_wraps_other_formats(tmp_path, monkeypatch):
    """A 10x-like IF (1.2 µm/px, coarser than the 0.75 µm/px H&E slides are held to) opens lazily with its names;
    block-wise reads stitch exactly; a PNG is read whole and wrapped behind the same interface."""
    import cytoken.io.ifreader as ifreader
    from cytoken.io.ifreader import IFReader, open_if

    monkeypatch.setattr(ifreader, "_BLOCK", 64)  # many blocks on a small image

    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, (3, 300, 500)).astype(np.uint16)
    data[2, 7, 9] = 65535
    write_ome_tiff(IFImage(data, ("DAPI", "CD3", "CD20"), mpp=1.2), tmp_path / "if.ome.tif")
    with open_if(tmp_path / "if.ome.tif") as r:
        assert r.meta["lazy"] and r.mpp == 1.2 and r.channel_names == ("DAPI", "CD3", "CD20")
        np.testing.assert_array_equal(r.read(1, 10, 20, 300, 290), data[1, 20:290, 10:300])
        assert r.value_range("cd20") == (float(data[2].min()), 65535.0)
        ref = data[0, :300, :498].astype(np.float32).reshape(100, 3, 166, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(r.binned("DAPI", 3), ref, rtol=1e-6)
    Image.fromarray(data[0].astype(np.uint8)).save(tmp_path / "m.png")
    r = open_if(tmp_path / "m.png", mpp=0.5)
    assert isinstance(r, IFReader) and not r.meta.get("lazy") and r.channel_names == ("m",)
    np.testing.assert_array_equal(r.read(0, 0, 0, 500, 300), data[0].astype(np.uint8))
    fl = IFReader.from_image(IFImage(np.array([[[np.nan, 1.0], [2.0, np.inf]]], np.float32), ("x",)))
    assert fl.value_range(0) == (1.0, 2.0)
