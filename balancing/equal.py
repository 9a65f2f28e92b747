"""Constant weights: ``equal`` (c_k = 1/T, vanilla MTL) and ``fixed`` (user weights on the simplex)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from balancing.base import Balancer, check_task_vector, register
from balancing.stats import StepStats


@register("equal")
class Equal(Balancer):
    """``A = (1/T) sum_k G_k``: the gradient of the mean task loss (ALGORITHMS.md, reduction convention)."""

    def coefficients(self, stats: StepStats) -> np.ndarray:
        weights = np.full(self.num_tasks, 1.0 / self.num_tasks)
        self.last_telemetry = {"weights": weights.tolist()}
        return weights * stats.active


@register("fixed")
class Fixed(Balancer):
    """``A = sum_k c_k G_k`` with user weights ``c`` normalised to sum to 1."""

    def __init__(self, task_names: Sequence[str], weights: Optional[Sequence[float]] = None) -> None:
        super().__init__(task_names)
        vec = check_task_vector("fixed.weights", weights, self.num_tasks)
        if vec is None:
            vec = np.ones(self.num_tasks)
        if float(vec.sum()) <= 0:
            raise ValueError("fixed.weights must not all be zero")
        self.weights = vec / vec.sum()

    def coefficients(self, stats: StepStats) -> np.ndarray:
        self.last_telemetry = {"weights": self.weights.tolist()}
        return self.weights * stats.active
