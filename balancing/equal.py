"""Constant weights: ``equal`` (c_k = 1/T, vanilla MTL) and ``fixed`` (user weights on the simplex)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from .base import Balancer, check_task_vector, register, weighted_sum
from .statistics import StepStats


class ConstantWeights(Balancer):
    """``A = sum_k w_k G_k`` with weights that need no statistics: the sum is formed while the
    step's statistics all-reduce is in flight (:meth:`prepare`)."""

    weights: np.ndarray
    needs_cross_terms = False
    reads_statistics = False

    def weights_without_statistics(self) -> np.ndarray:
        return self.weights

    def coefficients(self, stats: StepStats) -> np.ndarray:
        self.last_telemetry = {"weights": self.weights.tolist()}
        return self.weights * stats.active

    def prepare(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor], live: np.ndarray) -> torch.Tensor:
        return weighted_sum(grads, self.weights * live, live)

    def aggregate(self, grads, stats: StepStats, z=None, early: Optional[Any] = None) -> torch.Tensor:
        if early is None:
            return super().aggregate(grads, stats, z)
        self.coefficients(stats)  # the telemetry; the sum itself was formed in prepare()
        return early


@register("equal")
class Equal(ConstantWeights):
    """``A = (1/T) sum_k G_k``: the gradient of the mean task loss (docs/ALGORITHMS.md, reduction convention)."""

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names)
        self.weights = np.full(self.num_tasks, 1.0 / self.num_tasks)


@register("fixed")
class Fixed(ConstantWeights):
    """``A = sum_k c_k G_k`` with user weights ``c`` normalised to sum to 1."""

    def __init__(self, task_names: Sequence[str], weights: Optional[Sequence[float]] = None) -> None:
        super().__init__(task_names)
        vec = check_task_vector("fixed.weights", weights, self.num_tasks)
        if vec is None:
            vec = np.ones(self.num_tasks)
        if float(vec.sum()) <= 0:
            raise ValueError("fixed.weights must not all be zero")
        self.weights = vec / vec.sum()
