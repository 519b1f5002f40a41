"""Schedules: pure functions of training progress that multiply a learning rate or a loss weight."""

from __future__ import annotations

from typing import Protocol


class Schedule(Protocol):
    """``schedule(epoch, total_epochs) -> multiplier``; ``epoch`` is fractional (3.5 = half-way
    through the fourth epoch). Pure: the same arguments always give the same value, so a resumed
    run follows exactly the schedule of an uninterrupted one."""

    def __call__(self, epoch: float, total_epochs: int) -> float: ...
