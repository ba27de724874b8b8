"""An inference copy of a segmenter: batch norms folded into their convolutions, channels-last layout.

Both are standard, exact-in-real-arithmetic rewrites for a model in eval mode: a ``BatchNorm2d`` after a ``Conv2d``
is an affine map per channel, so it folds into the convolution's weight and bias
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); and channels-last (NHWC) is the memory layout oneDNN's CPU
convolutions prefer. On the default model (2 CPU threads, 8 × 256² tiles) the copy's forward pass is 1.05–1.09× as fast
(median of 15 interleaved repeats, ``benchmarks/bench_segment_speed.py``), and outputs agree to within 2e-6.

The copy shares every tensor it does not change with the original (the large linear weights of a ViT are not
duplicated), and the original model is left as it was. Because of the sharing, a copy is a snapshot only of the
convolutions: after the original's weights change (more training, loading other weights), make a new copy (a new
``Predictor``) rather than reusing the old one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batch_norms", "inference_copy"]


def inference_copy(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` for inference (eval mode, batch norms folded, optionally channels-last).

    Tensors that are not convolution kernels are shared with ``model``, not copied.
    """
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() != 4:  # conv kernels are copied (they change layout or are folded); the rest is shared
            memo[id(t)] = t
    fast = copy.deepcopy(model, memo).eval()
    fold_batch_norms(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``, in place.

    The batch norm is replaced by ``nn.Identity`` (indices, and so state-dict names of the other layers, stay).
    Returns the number of folded batch norms.
    """
    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            foldable = isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            if type(conv) is nn.Conv2d and foldable:
                seq[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
                n += 1
    return n
