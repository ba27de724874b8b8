"""The cell classifier: a two-layer MLP on per-cell token embeddings (CellViT++'s LinearClassifier layout)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CellClassifier", "init_parameters"]


def init_parameters(
    embed_dim: int, hidden: int, num_classes: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Initial weights drawn from ``generator`` with ``nn.Linear``'s default distribution.

    Each layer's weight and bias are uniform in ``±1/sqrt(fan_in)`` (what ``nn.Linear.reset_parameters``
    gives), drawn in the order fc1.weight, fc1.bias, fc2.weight, fc2.bias. Every trainer draws through this
    one function, so the same seed gives the same start for the single-model and the vectorised trainer.

    Args:
        embed_dim: input width D.
        hidden: hidden units.
        num_classes: output classes C.
        generator: torch random generator.

    Returns:
        State dict with keys ``fc1.weight`` (hidden, D), ``fc1.bias``, ``fc2.weight`` (C, hidden),
        ``fc2.bias``.

    Example:
        >>> sd = init_parameters(8, 4, 3, torch.Generator().manual_seed(0))
        >>> {k: tuple(v.shape) for k, v in sd.items()}
        {'fc1.weight': (4, 8), 'fc1.bias': (4,), 'fc2.weight': (3, 4), 'fc2.bias': (3,)}
    """

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    return {
        "fc1.weight": uniform((hidden, embed_dim), embed_dim),
        "fc1.bias": uniform((hidden,), embed_dim),
        "fc2.weight": uniform((num_classes, hidden), hidden),
        "fc2.bias": uniform((num_classes,), hidden),
    }


class CellClassifier(nn.Module):
    """``Linear(D, hidden) → ReLU → Dropout → Linear(hidden, C)``; returns logits.

    The state-dict keys (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) and shapes are those of
    CellViT++'s ``LinearClassifier``, so its released classifier weights load with ``load_state_dict``.

    Args:
        embed_dim: input width D (384 for ViT-S tokens, 1280 for SAM-H).
        hidden: hidden units.
        num_classes: output classes C.
        dropout: dropout probability (0.1 in training; inactive in ``eval()`` mode).

    Example:
        >>> m = CellClassifier(384, 128, 4).eval()
        >>> m(torch.zeros(2, 384)).shape
        torch.Size([2, 4])
    """

    def __init__(self, embed_dim: int, hidden: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("hidden", hidden), ("num_classes", num_classes)):
            if int(v) != v or v < 1:
                raise ValueError(f"CellClassifier {name} must be a positive integer, got {v!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"CellClassifier dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim = int(embed_dim)
        self.hidden = int(hidden)
        self.num_classes = int(num_classes)
        self.fc1 = nn.Linear(self.embed_dim, self.hidden)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(self.hidden, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) of embeddings (N, D)."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], dropout: float = 0.1) -> CellClassifier:
        """Build a classifier whose sizes are read from the weights (as CellViT++'s loader does)."""
        missing = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} - set(state)
        if missing:
            raise ValueError(f"classifier state dict lacks {sorted(missing)}; keys present: {sorted(state)}")
        hidden, embed_dim = state["fc1.weight"].shape
        num_classes = state["fc2.weight"].shape[0]
        model = cls(int(embed_dim), int(hidden), int(num_classes), dropout=dropout)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        return model
