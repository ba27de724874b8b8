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
