"""Batched model inference on uint8 tiles → numpy maps (the only torch code of the pipeline)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cytoken.models.device import resolve_device
from cytoken.models.inference import inference_copy
from cytoken.models.segmenter import CellSegmenter
from cytoken.types import CytokenError

__all__ = ["Predictor", "TileOutput", "resolve_device"]


@dataclass
class TileOutput:
    """Model maps of one tile (numpy, float32), at the tile's resolution except ``tokens``.

    Attributes:
        nuclei_prob: (H, W) probability of "nucleus".
        hv: (2, H, W) horizontal and vertical maps in [-1, 1].
        type_prob: (C + 1, H, W) class probabilities (background first), or None.
        tokens: (D, H/p, W/p) last-layer token grid.
    """

    nuclei_prob: np.ndarray
    hv: np.ndarray
    type_prob: np.ndarray | None
    tokens: np.ndarray


class Predictor:
    """Runs a segmenter on batches of uint8 RGB tiles.

    Args:
        model: the segmenter. With ``fast`` the predictor runs an inference copy of it (eval mode, batch norms folded
            into their convolutions, channels-last layout, see :mod:`cytoken.models.inference`) that shares every
            tensor it does not change, and ``model`` itself is left as it was; without, ``model`` is put in eval
            mode and run as it is.
        device: torch device name.
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
        tta: test-time augmentation: the model also sees each batch flipped left-right, top-bottom and both; the
            four predictions are flipped back (the horizontal/vertical distance maps change sign along a flipped
            axis) and averaged. Four forward passes per batch; the token grid (cell embeddings) comes from the
            unflipped pass only, so embeddings are the same with or without it.
        fast: fold batch norms and use channels-last (1.05-1.09x the forward speed of the default model on 2 CPU
            threads; outputs agree to float rounding). The copy is made here: build a new ``Predictor`` after changing
            the model's weights.
        streams: on CPU, split each batch into this many parts run at once, each in its own thread with an equal
            share of torch's intra-op threads (``torch.get_num_threads()`` when the first batch arrives). Small
            models use the cores better this way than with every operation split across all threads (see
            ``benchmarks/bench_segment_speed.py``). ``None``: 2 when torch has at least 2 threads, else 1. Ignored
            on other devices. Results do not depend on it beyond float rounding.
    """

    def __init__(
        self,
        model: CellSegmenter,
        device: str = "cpu",
        *,
        amp: bool = False,
        tta: bool = False,
        fast: bool = True,
        streams: int | None = None,
    ) -> None:
        if streams is not None and streams < 1:
            raise CytokenError(f"Predictor: streams must be >= 1, got {streams}")
        self.device = resolve_device(device)
        model = model.to(self.device)
        self.model: CellSegmenter = inference_copy(model) if fast else model.eval()  # type: ignore[assignment]
        self.amp = amp
        self.tta = tta
        self.streams = streams
        self._pool: _StreamPool | None = None

    def require(self, *, tta: bool = False, amp: bool = False) -> None:
        """Raise ``CytokenError`` if a run asks for ``tta`` or ``amp`` that this predictor was not built with."""
        for name, wanted in (("tta", tta), ("amp", amp)):
            if wanted and not getattr(self, name):
                raise CytokenError(
                    f"{name} is asked for but the given Predictor was built without it: use "
                    f"Predictor(model, {name}=True), or pass the model and let cytoken build the predictor"
                )

    def __call__(self, tiles: np.ndarray) -> list[TileOutput]:
        """Predict (B, H, W, 3) uint8 tiles."""
        n = self._n_streams()
        if n < 2 or len(tiles) < 2:
            return self._predict(tiles)
        if self._pool is None or self._pool.size != n or self._pool.pid != os.getpid():
            if self._pool is not None and self._pool.pid == os.getpid():
                self._pool.close()
            self._pool = _StreamPool(n)  # also after a fork: the parent's worker threads do not exist in a child
        parts = np.array_split(np.arange(len(tiles)), min(n, len(tiles)))
        return [out for part in self._pool.map(self._predict, [tiles[p] for p in parts]) for out in part]

    def _n_streams(self) -> int:
        if self.device.type != "cpu":
            return 1
        if self.streams is not None:
            return self.streams
        return 2 if torch.get_num_threads() >= 2 else 1

    def __getstate__(self) -> dict[str, Any]:  # the thread pool stays behind (made again on first use)
        return {**self.__dict__, "_pool": None}

    @torch.inference_mode()  # inference mode and autocast are per thread: both are entered in the calling thread
    def _predict(self, tiles: np.ndarray) -> list[TileOutput]:
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            x = self.model.preprocess(x)
            out = self.model(x)
            nuc, hv = out.nuclei_prob[:, 1].float(), out.hv.float()
            tp = None if out.type_prob is None else out.type_prob.float()
            if self.tta:
                nuc, hv, tp = self._flip_average(x, nuc, hv, tp)
        nuc_np, hv_np = nuc.cpu().numpy(), hv.cpu().numpy()
        tp_np = None if tp is None else tp.cpu().numpy()
        tok = out.tokens.float().cpu().numpy()
        return [TileOutput(nuc_np[i], hv_np[i], None if tp_np is None else tp_np[i], tok[i]) for i in range(len(tiles))]

    def _flip_average(
        self, x: torch.Tensor, nuc: torch.Tensor, hv: torch.Tensor, tp: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add the predictions on the three flipped copies of ``x``, flipped back, and average the four."""
        nuc, hv = nuc.clone(), hv.clone()
        tp = None if tp is None else tp.clone()
        for dims in ((3,), (2,), (2, 3)):
            o = self.model(torch.flip(x, dims))
            nuc += torch.flip(o.nuclei_prob[:, 1].float(), [d - 1 for d in dims])
            back = torch.flip(o.hv.float(), dims)
            if 3 in dims:  # left-right: the horizontal distance to the centroid changes sign
                back[:, 0] = -back[:, 0]
            if 2 in dims:  # top-bottom: the vertical one does
                back[:, 1] = -back[:, 1]
            hv += back
            if tp is not None and o.type_prob is not None:
                tp += torch.flip(o.type_prob.float(), dims)
        return nuc / 4, hv / 4, None if tp is None else tp / 4


class _StreamPool:
    """``size`` persistent threads, each running torch on ``torch.get_num_threads() // size`` intra-op threads.

    torch keeps the intra-op thread count per OS thread (OpenMP's and MKL's per-thread settings, initialised from a
    process-wide value the first time a thread runs an operation). Each worker sets its own count and initialises
    while the process-wide value equals it; the process-wide value is then put back, so the calling thread and any
    thread started later keep the caller's count.
    """

    def __init__(self, size: int) -> None:
        total = torch.get_num_threads()
        each = max(1, total // size)
        ready = threading.Barrier(size)

        def init() -> None:
            torch.set_num_threads(each)
            torch.get_num_threads()  # this thread's one-time initialisation happens now, at ``each``
            ready.wait()  # all ``size`` workers exist before the process-wide count is restored

        self.size = size
        self.pid = os.getpid()
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="cytoken-stream")
        try:
            for f in [self._executor.submit(init) for _ in range(size)]:
                f.result()
        finally:
            torch.set_num_threads(total)

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        return list(self._executor.map(fn, items))

    def threads(self) -> list[int]:
        """The intra-op thread count each worker sees (for tests)."""
        ready = threading.Barrier(self.size)

        def count() -> int:
            ready.wait()  # one call per worker
            return torch.get_num_threads()

        return self.map(lambda _: count(), list(range(self.size)))

    def close(self) -> None:
        self._executor.shutdown(wait=False)
