"""Lagged statistics (``statistics="previous"``): which mode and cadence a boundary runs a balancer
with, and the statistics a lagged boundary carries from step to step in a checkpoint.

A lagged step is balanced with the coefficients of the last sum of statistics over ranks while its
own statistics travel; what is in flight at a checkpoint is written as tensors of fixed keys and
shapes (:func:`stats_to_tensors`), so that a checkpoint template always asks for them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .base import Balancer
from .statistics import StepStats

STATISTICS_MODES = ("current", "previous", "auto")


def check_statistics_request(statistics: str, statistics_every: int | str) -> None:
    if statistics not in STATISTICS_MODES:
        raise ValueError(f"statistics must be one of {STATISTICS_MODES}, got {statistics!r}")
    if statistics_every != "auto" and (
        isinstance(statistics_every, bool) or not isinstance(statistics_every, int) or statistics_every < 1
        or (statistics_every > 1 and statistics == "current")
    ):
        raise ValueError(f"statistics_every must be 'auto', 1, or > 1 with statistics='previous' or 'auto'; got {statistics_every!r} with {statistics!r}")


def statistics_for(balancer: Balancer, statistics: str, statistics_every: int | str = 1) -> Tuple[str, int]:
    """The statistics mode and cadence a boundary runs ``balancer`` with when asked for
    ``statistics`` and ``statistics_every`` (``auto`` settled by the balancer); ``ValueError`` where
    the balancer cannot run so. What a config check needs, without building a boundary."""
    check_statistics_request(statistics, statistics_every)
    mode = auto_mode(balancer) if statistics == "auto" else statistics
    every = auto_every(balancer, mode) if statistics_every == "auto" else statistics_every
    if mode == "current" and every > 1:
        raise ValueError(f"{balancer.name} needs each step's own statistics; use statistics_every=1")
    if mode == "previous" and needs_its_own_statistics(balancer):
        raise ValueError(f"{balancer.name} needs each step's own statistics; use statistics='current'")
    return mode, every


def needs_its_own_statistics(balancer: Balancer) -> bool:
    """Methods that add numbers of their own to the step's reduction need that step's sum, unless
    they declare that the previous step's serve (``lag_safe_extras``)."""
    return type(balancer).local_extra is not Balancer.local_extra and not balancer.lag_safe_extras


def auto_mode(balancer: Balancer) -> str:
    """``statistics="auto"``: lagged wherever the method allows it."""
    return "current" if needs_its_own_statistics(balancer) else "previous"


def auto_every(balancer: Balancer, statistics: str) -> int:
    """``statistics_every="auto"``: the method's own cadence when lagged, every step otherwise."""
    return balancer.lagged_statistics_every if statistics == "previous" else 1


def is_elementwise(balancer: Balancer) -> bool:
    """Rules that form the aggregate themselves from each step's gradients (CoGrad). Constant
    weights override :meth:`~Balancer.aggregate` only to reuse a sum formed early: not these."""
    return type(balancer).aggregate is not Balancer.aggregate and balancer.weights_without_statistics() is None


class Ready:
    """Statistics already summed (restored from a checkpoint), with :class:`PendingStatistics`' wait()."""

    def __init__(self, stats: StepStats) -> None:
        self.stats = stats

    def wait(self) -> StepStats:
        return self.stats


IN_FLIGHT = "in_flight_"
LAST_SUM = "last_sum_"
HELD = "held_coefficients"  # [valid, c_1..c_T, unreported non-finite loss flags 1..T]


def stats_to_tensors(stats: Optional[StepStats], num_tasks: int, extra_size: int, prefix: str = IN_FLIGHT) -> dict:
    """Tensors only, with the same keys and shapes whether or not statistics are in flight (so that a
    checkpoint template always asks for them)."""
    t = num_tasks
    if stats is None:
        stats = StepStats(np.zeros((t, t)), np.zeros(t), np.zeros(t, dtype=bool), 0, 0, extra=np.zeros(extra_size))
        valid = 0.0
    else:
        valid = 1.0
    extra = np.zeros(extra_size) if stats.extra is None else np.array(stats.extra, dtype=np.float64)
    return {
        f"{prefix}extra": torch.from_numpy(extra),
        f"{prefix}valid": torch.tensor(valid, dtype=torch.float64),
        f"{prefix}gram": torch.from_numpy(np.array(stats.gram, dtype=np.float64)),
        f"{prefix}losses": torch.from_numpy(np.array(stats.losses, dtype=np.float64)),
        f"{prefix}active": torch.from_numpy(np.array(stats.active, dtype=np.float64)),
        f"{prefix}nonfinite_loss": torch.from_numpy(np.array(stats.nonfinite_loss, dtype=np.float64)),
        f"{prefix}batch": torch.tensor([stats.local_batch_size, stats.global_batch_size, float(stats.cross_terms)], dtype=torch.float64),
    }


def stats_from_tensors(state: dict, prefix: str = IN_FLIGHT) -> Optional[StepStats]:
    if float(state[f"{prefix}valid"]) == 0.0:
        return None
    local, total, cross = state[f"{prefix}batch"].tolist()
    return StepStats(
        state[f"{prefix}gram"].numpy().copy(),
        state[f"{prefix}losses"].numpy().copy(),
        state[f"{prefix}active"].numpy() > 0,
        int(local),
        int(total),
        state[f"{prefix}nonfinite_loss"].numpy() > 0,
        state[f"{prefix}extra"].numpy().copy() if state[f"{prefix}extra"].numel() else None,
        bool(cross),
    )
