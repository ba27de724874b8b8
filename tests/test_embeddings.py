import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cytoken.embeddings import (
    EmbeddingCache,
    array_sha256,
    bbox_mean_embeddings,
    bbox_token_boxes,
    mask_weighted_embeddings,
    resample_scale,
    slide_bboxes_to_model,
    slide_points_to_model,
    token_positions,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def brute_force_weighted(tokens, inst, cell_id, p):
    ys, xs = np.nonzero(inst == cell_id)
    h, w = tokens.shape[1:]
    return tokens[:, np.minimum(ys // p, h - 1), np.minimum(xs // p, w - 1)].mean(axis=1)


def random_inst_map(shape, n, rng, radius=5):
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = i * 3  # non-consecutive ids
    return inst


# ------------------------------------------------------------ mask-weighted


def test_cell_over_two_tokens_three_to_one():
    a, b = np.array([1.0, 10.0]), np.array([5.0, -2.0])
    tokens = np.stack([a, b], axis=1).reshape(2, 1, 2).astype(np.float32)  # (D=2, h=1, w=2)
    inst = np.zeros((4, 8), np.int32)
    inst[0:3, 1:4] = 4  # 9 px in token 0 (cols 0-3)
    inst[0:3, 4] = 4  # 3 px in token 1 (cols 4-7)
    emb = mask_weighted_embeddings(tokens, inst, [4], patch_size=4)
    np.testing.assert_allclose(emb[0], 0.75 * a + 0.25 * b, rtol=1e-6)


def test_mask_weighted_matches_brute_force_and_id_order():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(6, 5, 7)).astype(np.float32)
    inst = random_inst_map((80, 112), 25, rng)
    ids = np.unique(inst)[1:]
    order = rng.permutation(ids)
    emb = mask_weighted_embeddings(tokens, inst, order, 16)
    for i, cid in enumerate(order):
        np.testing.assert_allclose(emb[i], brute_force_weighted(tokens, inst, cid, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(75, 100), (88, 120)])  # padded up (ceil) and cropped down (floor) to tokens
def test_mask_weighted_non_multiple_sizes(shape):
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(3, 5, 7)).astype(np.float32)  # 80 x 112 px at p=16
    inst = random_inst_map(shape, 20, rng)
    ids = np.unique(inst)[1:]
    emb = mask_weighted_embeddings(tokens, inst, ids, 16)
    ref = np.stack([brute_force_weighted(tokens, inst, c, 16) for c in ids])
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6)


def test_mask_weighted_errors_and_missing():
    tokens = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        mask_weighted_embeddings(tokens, np.zeros((100, 64), np.int32), [1], 16)
    inst = np.zeros((64, 64), np.int32)
    inst[3:6, 3:6] = 2
    with pytest.raises(ValueError, match="no pixel"):
        mask_weighted_embeddings(tokens, inst, [2, 9], 16)
    emb = mask_weighted_embeddings(tokens, inst, [9, 2, 2], 16, missing="nan")
    assert np.isnan(emb[0]).all() and np.isfinite(emb[1:]).all()
    with pytest.raises(ValueError, match="patch_size"):
        mask_weighted_embeddings(tokens, inst, [2], 0)


@needs_data
def test_mask_weighted_on_real_monuseg_instances():
    from PIL import Image

    path = sorted((SHARED / "monuseg" / "test" / "labels").glob("*.png"))[0]
    inst = np.array(Image.open(path)).astype(np.int32)  # 1000 x 1000: not a multiple of 16
    assert inst.shape == (1000, 1000)
    h = w = 63  # ceil(1000 / 16): the padded model input
    rows, cols = np.mgrid[:h, :w]
    tokens = np.stack([rows, cols, rows * cols]).astype(np.float32)
    ids = np.unique(inst)[1:]
    emb = mask_weighted_embeddings(tokens, inst, ids, 16)
    # real answer: the area-weighted mean token row/col is the mean over the nucleus pixels of (y // 16, x //
    # 16)
    sel = ids[:: max(1, len(ids) // 40)]
    for cid in sel:
        ys, xs = np.nonzero(inst == cid)
        i = np.searchsorted(ids, cid)
        np.testing.assert_allclose(emb[i, :2], [np.mean(ys // 16), np.mean(xs // 16)], rtol=1e-5)
        np.testing.assert_allclose(emb[i, 2], np.mean((ys // 16) * (xs // 16)), rtol=1e-5)


# ------------------------------------------------------------ bbox mean


def facts_rule_bbox_mean(tokens, bbox, p):
    """CellViT++ as described in FACTS.md: bbox [[rmin, cmin], [rmax, cmax]] / p, floor min, ceil max, uint8,
    mean."""
    x0, y0, x1, y1 = bbox
    r0, c0 = int(np.floor(y0 / p)), int(np.floor(x0 / p))
    r1, c1 = int(np.ceil(y1 / p)), int(np.ceil(x1 / p))
    r0, c0, r1, c1 = (np.uint8(v) for v in (r0, c0, r1, c1))
    return tokens[:, r0:r1, c0:c1].reshape(tokens.shape[0], -1).mean(axis=1)


def test_bbox_mean_parity_with_cellvit_rule():
    rng = np.random.default_rng(3)
    tokens = rng.normal(size=(5, 8, 8)).astype(np.float32)  # 128 px tile
    x0 = rng.integers(0, 120, 50)
    y0 = rng.integers(0, 120, 50)
    boxes = np.stack([x0, y0, x0 + rng.integers(1, 30, 50), y0 + rng.integers(1, 30, 50)], axis=1)  # may overrun
    emb = bbox_mean_embeddings(tokens, boxes, 16)
    ref = np.stack([facts_rule_bbox_mean(tokens, b, 16) for b in boxes])
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6)


def test_bbox_token_boxes_rule_and_errors():
    # x0=16 -> c0=1, y0=0 -> r0=0, y1=17 -> r1=ceil(17/16)=2, x1=32 -> c1=2
    np.testing.assert_array_equal(bbox_token_boxes(np.array([[16, 0, 32, 17]]), 16), [[0, 1, 2, 2]])
    with pytest.raises(ValueError, match="cover no token"):
        bbox_mean_embeddings(np.zeros((1, 2, 2), np.float32), [[40, 40, 50, 50]], 16)


# ------------------------------------------------------------ resampling


def test_resampled_slide_coordinates_map_to_model_grid():
    # a 0.5 um/px "slide" with one nucleus, upsampled x2 for a 0.25 um/px model; tile origin (6, 4) in slide
    # px
    slide = np.zeros((40, 50), np.int32)
    slide[10:15, 20:24] = 1
    slide[12, 24] = 1
    scale = resample_scale(0.5, 0.25)
    assert scale == 2.0
    origin = (6, 4)
    tile = slide[origin[1] :, origin[0] :]
    model = np.repeat(np.repeat(tile, 2, axis=0), 2, axis=1)
    ys, xs = np.nonzero(slide == 1)
    my, mx = np.nonzero(model == 1)
    slide_bbox = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    model_bbox = [mx.min(), my.min(), mx.max() + 1, my.max() + 1]
    np.testing.assert_array_equal(slide_bboxes_to_model(slide_bbox, scale=scale, origin=origin)[0], model_bbox)
    np.testing.assert_allclose(
        slide_points_to_model([[xs.mean(), ys.mean()]], scale=scale, origin=origin)[0], [mx.mean(), my.mean()]
    )
    # the bbox path then pools the same tokens as pooling directly on the model grid
    tokens = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(
        bbox_mean_embeddings(tokens, slide_bboxes_to_model(slide_bbox, scale=scale, origin=origin), 16),
        bbox_mean_embeddings(tokens, [model_bbox], 16),
    )
    # model-grid centroid (31.74, 16.5) lies in pixel (32, 17) -> token row 1, col 2
    np.testing.assert_array_equal(token_positions([[mx.mean(), my.mean()]], 16), [[1, 2]])


def test_resample_scale_validates():
    with pytest.raises(ValueError, match="µm/px"):
        resample_scale(0.0, 0.25)
    with pytest.raises(ValueError, match="scale"):
        slide_points_to_model([[0, 0]], scale=-1)


# ------------------------------------------------------------ cache


def test_cache_hit_miss_merge(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    sha = "ab" * 32
    key = array_sha256(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert cache.get(sha, key, [1]) is None and cache.misses == 1
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = cache.put(sha, key, [7, 3, 5], emb)
    assert path == tmp_path / "cache" / sha / f"{key}.safetensors"
    np.testing.assert_array_equal(cache.get(sha, key, [5, 7]), emb[[2, 0]])
    assert cache.hits == 2
    assert cache.get(sha, key, [5, 8]) is None  # one id missing -> miss
    cache.put(sha, key, [8, 3], np.full((2, 4), -1, np.float32))  # merge; id 3 replaced
    ids, stored = cache.load(sha, key)
    assert ids.tolist() == [3, 5, 7, 8]
    np.testing.assert_array_equal(stored[0], -1)
    assert cache.get(sha, "other-input", [3]) is None
    assert cache.get("cd" * 32, key, [3]) is None
    assert [p.name for p in (tmp_path / "cache" / sha).iterdir()] == [f"{key}.safetensors"]  # no temp files left


def test_cache_get_or_compute_computes_only_missing(tmp_path):
    cache = EmbeddingCache(tmp_path)
    sha = "0" * 64
    calls = []

    def compute(ids):
        calls.append(ids.tolist())
        return np.repeat(ids[:, None].astype(np.float32), 3, axis=1)

    out = cache.get_or_compute(sha, "img", [4, 2], compute)
    np.testing.assert_array_equal(out[:, 0], [4, 2])
    out = cache.get_or_compute(sha, "img", [2, 9, 4], compute)
    np.testing.assert_array_equal(out[:, 1], [2, 9, 4])
    assert calls == [[4, 2], [9]]
    assert (cache.hits, cache.misses) == (2, 3)


def test_cache_rejects_bad_keys_and_dims(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="model_sha256"):
        cache.put("not-a-sha", "img", [1], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="input_hash"):
        cache.put("0" * 64, "../escape", [1], np.zeros((1, 2)))
    cache.put("0" * 64, "img", [1], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="2-d embeddings"):
        cache.put("0" * 64, "img", [2], np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="unique"):
        cache.put("0" * 64, "img", [2, 2], np.zeros((2, 2), np.float32))


def test_embeddings_package_does_not_import_torch():
    code = "import sys, cytoken.embeddings; assert 'torch' not in sys.modules, 'torch imported'"
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
