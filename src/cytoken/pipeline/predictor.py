"""Batched model inference on uint8 tiles → numpy maps (the only torch code of the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cytoken.models.device import resolve_device
from cytoken.models.segmenter import CellSegmenter

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
        model: the segmenter (put in eval mode here).
        device: torch device name.
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
    """

    def __init__(self, model: CellSegmenter, device: str = "cpu", *, amp: bool = False) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.amp = amp

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> list[TileOutput]:
        """Predict (B, H, W, 3) uint8 tiles."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
            out = self.model(self.model.preprocess(x))
        nuc = out.nuclei_prob[:, 1].float().cpu().numpy()
        hv = out.hv.float().cpu().numpy()
        tp = None if out.type_prob is None else out.type_prob.float().cpu().numpy()
        tok = out.tokens.float().cpu().numpy()
        return [TileOutput(nuc[i], hv[i], None if tp is None else tp[i], tok[i]) for i in range(len(tiles))]
