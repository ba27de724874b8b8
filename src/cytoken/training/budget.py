"""A CPU-time budget for a training run: stop when it is spent, and let the learning-rate schedule follow it.

With ``TrainConfig.cpu_budget_minutes`` set, the run's length is CPU time, not epochs: training stops after the
optimiser step at which the budget is used up (``epochs`` stays an upper bound), and the schedule runs on the fraction
of the budget used instead of on the epoch count. Warm-up stays a number of optimiser steps (``warmup_epochs`` ×
``steps_per_epoch``); the cosine decay then spans the rest of the budget, so it reaches its floor exactly when the
budget ends, however fast or slow each step turns out to be. This is what makes two recipes comparable "at equal
CPU time" (e.g. a model with and without an adapter) without guessing step costs beforehand.

What is counted: the CPU time (all threads) of the training process during the optimiser-step loop, data loading in
that process included; validation and checkpoint writing are not. DataLoader worker processes are not counted: use
``num_workers: 0`` for a complete count. Under DDP the ranks agree on the most-used rank's time after every
optimiser step, so they all stop at the same step. A budget run is not bit-reproducible (its stop step depends on
measured time), but ``--resume`` continues its budget: the time used so far is in the checkpoint.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

__all__ = ["CpuBudget"]


class CpuBudget:
    """CPU seconds a run may spend, the seconds spent, and the schedule factor they imply."""

    def __init__(self, minutes: float, warmup_steps: int, *, distributed: bool = False) -> None:
        if minutes <= 0:
            raise ValueError(f"a CPU budget must be positive, got {minutes} minutes")
        self.seconds = minutes * 60.0
        self.warmup_steps = warmup_steps
        self.used = 0.0
        self.used_at_warmup_end: float | None = None
        self._distributed = distributed
        self._base = 0.0
        self._t0 = time.process_time()

    @property
    def exhausted(self) -> bool:
        """Whether the budget is used up."""
        return self.used >= self.seconds

    def start(self) -> None:
        """Start counting (again): call before the step loop of each epoch."""
        self._base, self._t0 = self.used, time.process_time()

    def tick(self, steps_done: int) -> float:
        """Update the time used after an optimiser step (``steps_done`` steps in all); returns it."""
        used = self._base + time.process_time() - self._t0
        if self._distributed:
            t = torch.tensor([used], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            used = float(t.item())
        self.used = used
        if self.used_at_warmup_end is None and steps_done >= self.warmup_steps:
            self.used_at_warmup_end = used
        return used

    def lr_factor(self, step: int, schedule: str, gamma: float, steps_per_epoch: int) -> float:
        """Multiplier of the base learning rate for optimiser step ``step`` (0-based, of the whole run).

        Warm-up is linear over ``warmup_steps``; then ``cosine`` decays from 1 to 0.02 over the rest of the budget,
        ``exponential`` multiplies by ``gamma`` per ``steps_per_epoch`` steps, and ``constant`` stays at 1.
        """
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if schedule == "exponential":
            return gamma ** ((step - self.warmup_steps) / steps_per_epoch)
        if schedule == "cosine":
            start = self.used_at_warmup_end if self.used_at_warmup_end is not None else self.used
            span = max(1e-9, self.seconds - start)
            q = min(1.0, max(0.0, (self.used - start) / span))
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q))
        return 1.0

    def state_dict(self) -> dict:
        """What a checkpoint keeps (the time used, and when warm-up ended)."""
        return {"seconds": self.seconds, "used": self.used, "used_at_warmup_end": self.used_at_warmup_end}

    def load_state_dict(self, state: dict) -> None:
        """Continue a budget from a checkpoint."""
        self.used = float(state["used"])
        self.used_at_warmup_end = state.get("used_at_warmup_end")
