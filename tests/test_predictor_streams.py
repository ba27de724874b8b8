"""The predictor's CPU streams: a batch split over worker threads gives the same maps, per-thread state is right."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from cytoken.models import SegmenterConfig, build_segmenter
from cytoken.pipeline.predictor import Predictor, TileOutput, _StreamPool
from cytoken.types import CytokenError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SegmenterConfig(
        encoder="cytoken_s16", encoder_kwargs={"depth": 2}, num_classes=3, class_names=["a", "b", "c"],
        decoder_kwargs={"width_factor": 0.125, "shared": True, "out_stride": 2},
    )  # fmt: skip
    return build_segmenter(cfg).eval()


def _tiles(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def _assert_close(a: list[TileOutput], b: list[TileOutput], atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("nuclei_prob", "hv", "type_prob", "tokens"):
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), atol=atol, err_msg=name)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_streams_give_the_same_maps_in_the_same_order(two_threads, n: int) -> None:
    model = _model()
    tiles = _tiles(n)
    one, two, three = Predictor(model, streams=1), Predictor(model, streams=2), Predictor(model, streams=3)
    ref = one(tiles)
    _assert_close(two(tiles), ref, 1e-5)
    _assert_close(three(tiles), ref, 1e-5)
    _assert_close([one(tiles[i : i + 1])[0] for i in range(n)], ref, 1e-5)  # order kept: tile i is tile i
    assert torch.get_num_threads() == 2  # the caller's thread count is left as it was


def test_tta_and_amp_apply_inside_the_worker_threads(two_threads) -> None:
    model, tiles = _model(), _tiles(4)
    _assert_close(Predictor(model, tta=True, streams=2)(tiles), Predictor(model, tta=True, streams=1)(tiles), 1e-5)
    fp32 = Predictor(model, streams=1)(tiles)
    amp1, amp2 = Predictor(model, amp=True, streams=1)(tiles), Predictor(model, amp=True, streams=2)(tiles)
    _assert_close(amp2, amp1, 2e-2)
    # autocast is per thread: had the workers run without it, their maps would equal the float32 ones
    assert max(float(np.abs(a.tokens - f.tokens).max()) for a, f in zip(amp2, fp32, strict=True)) > 1e-4


def test_each_worker_gets_its_share_of_the_threads(two_threads) -> None:
    pool = _StreamPool(2)
    try:
        assert pool.threads() == [1, 1]
        assert torch.get_num_threads() == 2
        seen: list[int] = []  # a thread started afterwards gets the caller's count, not the workers'
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        pool.close()


def test_default_streams_follow_the_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert Predictor(_model())._n_streams() == 1
        torch.set_num_threads(2)
        assert Predictor(_model())._n_streams() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_streams_and_pickling(two_threads) -> None:
    with pytest.raises(CytokenError, match="streams must be >= 1"):
        Predictor(_model(), streams=0)
    p = Predictor(_model(), streams=2)
    tiles = _tiles(2)
    ref = p(tiles)  # the pool exists now; pickling leaves it behind and the copy makes its own
    _assert_close(pickle.loads(pickle.dumps(p))(tiles), ref, 1e-6)


def test_a_pool_from_another_process_is_replaced(two_threads) -> None:
    p = Predictor(_model(), streams=2)
    tiles = _tiles(2)
    ref = p(tiles)
    old = p._pool
    assert old is not None
    old.pid = -1  # as in a forked child: the threads belong to another process
    _assert_close(p(tiles), ref, 1e-6)
    assert p._pool is not old and p._pool is not None and p._pool.pid > 0
    old.close()
