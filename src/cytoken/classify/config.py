"""Training configuration of the cell classifier: one frozen dataclass, validated when built (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["MAX_EPOCHS", "TrainConfig"]

MAX_EPOCHS = 50

_SCHEDULES = ("constant", "exponential")
_BALANCE = ("none", "loss_weights", "sampler")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one cell-classifier training run.

    Attributes:
        hidden: hidden units of the MLP (CellViT++ ships 128, 256 and 512).
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        schedule: ``"constant"`` or ``"exponential"`` (lr multiplied by ``gamma`` after every epoch).
        gamma: decay factor of the exponential schedule (ignored for ``"constant"``).
        epochs: maximum number of epochs (1..50).
        batch_size: mini-batch size.
        patience: stop after this many epochs without a better validation macro AUROC (None: never stop
            early). The weights of the best epoch are kept.
        class_balance: ``"none"``, ``"loss_weights"`` (cross-entropy weighted by inverse class frequency) or
            ``"sampler"`` (each epoch draws N examples with replacement, class-balanced).
        dropout: dropout probability after the hidden ReLU.
        seed: seeds the initial weights, the batch order and the dropout masks.

    Example:
        >>> TrainConfig(hidden=128, lr=3e-4).schedule
        'constant'
    """

    hidden: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-4
    schedule: Literal["constant", "exponential"] = "constant"
    gamma: float = 0.95
    epochs: int = MAX_EPOCHS
    batch_size: int = 256
    patience: int | None = 10
    class_balance: Literal["none", "loss_weights", "sampler"] = "none"
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.hidden) != self.hidden or self.hidden < 1:
            raise ValueError(f"TrainConfig.hidden must be a positive integer, got {self.hidden!r}")
        if not self.lr > 0 or self.lr > 1:
            raise ValueError(f"TrainConfig.lr must be in (0, 1], got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"TrainConfig.weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"TrainConfig.gamma must be in (0, 1], got {self.gamma!r}")
        if int(self.epochs) != self.epochs or not 1 <= self.epochs <= MAX_EPOCHS:
            raise ValueError(f"TrainConfig.epochs must be an integer in 1..{MAX_EPOCHS}, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.patience is not None and (int(self.patience) != self.patience or self.patience < 1):
            raise ValueError(f"TrainConfig.patience must be a positive integer or None, got {self.patience!r}")
        if self.class_balance not in _BALANCE:
            raise ValueError(f"TrainConfig.class_balance must be one of {_BALANCE}, got {self.class_balance!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if int(self.seed) != self.seed:
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error naming them and the allowed keys."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)
