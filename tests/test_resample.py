from pathlib import Path

import numpy as np
import pytest

from cytoken.io.resample import (
    resample_image,
    resample_labels,
    resample_points,
    resample_sample,
    resampled_size,
)
from cytoken.types import Sample

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def _sample(mpp=0.5):
    inst = np.zeros((60, 80), np.int32)
    inst[10:20, 10:30] = 7
    inst[40:50, 50:70] = 3
    types = np.where(inst == 7, 2, np.where(inst == 3, 1, 0)).astype(np.int32)
    image = np.full((60, 80, 3), 220, np.uint8)
    image[inst > 0] = (80, 40, 150)
    pts = np.array([[19.5, 14.5], [59.5, 44.5]])  # centroids of the two rectangles
    return Sample(image, mpp, "t/0", inst, types, pts, np.array([2, 1]), ("a", "b"))


def test_upsample_by_two_is_exact_for_labels_and_points():
    s = _sample(0.5)
    r = resample_sample(s, 0.25)
    assert r.image.shape == (120, 160, 3) and r.mpp == 0.25
    np.testing.assert_array_equal(r.inst_map, np.kron(s.inst_map, np.ones((2, 2), np.int32)))
    np.testing.assert_array_equal(r.type_map, np.kron(s.type_map, np.ones((2, 2), np.int32)))
    # points land on the centroids of the resampled instances
    for (x, y), iid in zip(r.points, [7, 3]):
        ys, xs = np.nonzero(r.inst_map == iid)
        assert (x, y) == pytest.approx((xs.mean(), ys.mean()))
    assert s.image.shape == (60, 80, 3)  # input untouched


def test_downsample_keeps_ids_and_alignment():
    s = _sample(0.25)
    r = resample_sample(s, 0.5)
    assert r.image.shape == (30, 40, 3) and r.inst_map.shape == (30, 40)
    assert set(np.unique(r.inst_map)) == {0, 3, 7} and r.inst_map.dtype == np.int32
    for (x, y), iid in zip(r.points, [7, 3]):
        ys, xs = np.nonzero(r.inst_map == iid)
        assert (x, y) == pytest.approx((xs.mean(), ys.mean()))
    dark = r.image[..., 0] < 150
    assert (dark == (r.inst_map > 0)).mean() > 0.97


def test_non_integer_factor_and_same_mpp():
    s = _sample(0.5)
    r = resample_sample(s, 0.3)
    assert r.image.shape[:2] == resampled_size(s.image.shape, 0.5 / 0.3) == (100, 133)
    assert r.inst_map.shape == (100, 133)
    assert resample_sample(s, 0.5) is s
    with pytest.raises(ValueError, match="no µm/px"):
        resample_sample(Sample(s.image, None, "x"), 0.25)
    with pytest.raises(ValueError, match="outside the plausible range"):
        resample_sample(s, 50)


def test_array_helpers():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert resample_image(img, 0.5).shape == (2, 2)
    assert resample_image(img[..., None], 2.0).shape == (8, 8, 1)
    assert resample_image(img, size=(3, 5)).shape == (3, 5)
    lab = np.array([[1, 2], [3, 4]], np.uint16)
    assert resample_labels(lab, 2.0).dtype == np.uint16
    np.testing.assert_array_equal(resample_labels(resample_labels(lab, 3.0), size=(2, 2)), lab)
    np.testing.assert_allclose(resample_points(np.array([[-0.5, -0.5]]), (4, 4), (9, 9)), [[-0.5, -0.5]])
    with pytest.raises(ValueError, match="scale must be a positive"):
        resample_image(img, 0.0)


@needs_shared
def test_crchisto_to_40x():
    from cytoken.io.datasets import open_dataset

    s = open_dataset("crchisto", SHARED / "crchisto", split="validation")[0]
    r = resample_sample(s, 0.25)
    assert r.image.shape == (1100, 1100, 3) and r.mpp == 0.25
    np.testing.assert_allclose(r.points, (s.points + 0.5) * 2.2 - 0.5)
    assert r.point_labels is s.point_labels or np.array_equal(r.point_labels, s.point_labels)
