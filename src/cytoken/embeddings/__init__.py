"""Per-cell token embeddings: pool a frozen model's token grid into one vector per nucleus, and cache them.

Layer 2, numpy only (no torch): segment once with a frozen model, keep its (D, h, w) token grid, pool it per
cell (:func:`mask_weighted_embeddings` by default, :func:`bbox_mean_embeddings` for CellViT++ parity), and
store the result in an :class:`EmbeddingCache` so a cell classifier can be trained in seconds without running
the model again.
"""

from cytoken.embeddings.cache import EmbeddingCache, array_sha256
from cytoken.embeddings.pooling import bbox_mean_embeddings, bbox_token_boxes, mask_weighted_embeddings
from cytoken.embeddings.resample import (
    resample_scale,
    slide_bboxes_to_model,
    slide_points_to_model,
    token_positions,
)

__all__ = [
    "EmbeddingCache",
    "array_sha256",
    "bbox_mean_embeddings",
    "bbox_token_boxes",
    "mask_weighted_embeddings",
    "resample_scale",
    "slide_bboxes_to_model",
    "slide_points_to_model",
    "token_positions",
]
