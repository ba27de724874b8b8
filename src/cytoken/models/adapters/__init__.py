"""Encoder adapters attached by config (``encoder_kwargs={"adapter": {"kind": ..., ...}}``); see docs/adapters.md."""

from cytoken.models.adapters.base import ADAPTERS, attach_adapter
from cytoken.models.adapters.cellvta import CellVTAAdapter, SpatialPrior

__all__ = ["ADAPTERS", "CellVTAAdapter", "SpatialPrior", "attach_adapter"]
