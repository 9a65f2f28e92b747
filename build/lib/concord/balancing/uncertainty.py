"""Uncertainty weighting (Kendall et al. 2018), a loss-level method.

The objective is ``sum_k exp(-s_k) L_k / 2 + s_k / 2`` with ``s`` learned by the dense optimizer; the
boundary passes the (already weighted) task gradients through unchanged: ``A = sum_k G_k``, a sum
with constant weights, formed while the step's statistics travel.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .base import register
from .equal import ConstantWeights
from .statistics import StepStats


@register("uncertainty")
class Uncertainty(ConstantWeights):
    state_names = ("log_vars",)

    def __init__(self, task_names: Sequence[str], init: float = 0.0) -> None:
        super().__init__(task_names)
        self.log_vars = torch.nn.Parameter(torch.full((self.num_tasks,), float(init)))  # s_k
        self.weights = np.ones(self.num_tasks)  # on the gradients; the loss weights are exp(-s_k) / 2

    def parameters(self) -> List[torch.nn.Parameter]:
        return [self.log_vars]

    def before_backward(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_vars.to(losses.dtype)
        return (torch.exp(-s) * losses / 2 + s / 2).sum()

    def coefficients(self, stats: StepStats) -> np.ndarray:
        loss_weights = np.exp(-self.log_vars.detach().double().cpu().numpy()) / 2
        self.last_telemetry = {"weights": (loss_weights / loss_weights.sum()).tolist(), "loss_weights": loss_weights.tolist()}
        return self.weights * stats.active
