"""PCGrad (Yu et al. 2020) as coefficient algebra on the Gram matrix.

For each task i, over the other tasks j in a random order (the same on every rank), if
``<g'_i, g_j> < 0`` then ``g'_i -= <g'_i, g_j> / ||g_j||^2 g_j``. Writing ``g'_i = sum_j C_ij g_j``
gives ``<g'_i, g_j> = (C M)_ij``, so no (B, d) tensor is touched until the final aggregate
``A = (1/T) sum_i g'_i``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import Balancer, register, seeded_generator
from .statistics import StepStats


def other_tasks_in_random_order(i: int, active: np.ndarray, generator: torch.Generator) -> list:
    order = torch.randperm(active.size, generator=generator).tolist()
    return [j for j in order if j != i and active[j]]


@register("pcgrad")
class PCGrad(Balancer):
    state_names = ("generator",)

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names)
        self.generator = seeded_generator(seed)

    def coefficients(self, stats: StepStats) -> np.ndarray:
        m, active, t = stats.gram, stats.active, self.num_tasks
        c = np.eye(t)
        conflicts = 0
        for i in np.flatnonzero(active):
            for j in other_tasks_in_random_order(i, active, self.generator):
                dot = c[i] @ m[:, j]  # <g'_i, g_j>
                if dot < 0:
                    c[i, j] -= dot / m[j, j]
                    conflicts += 1
        coeffs = c[active].sum(axis=0) / t * active
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist(), "projections": conflicts}
        return coeffs
