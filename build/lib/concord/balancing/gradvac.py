"""Gradient Vaccine (Wang et al. 2021) as coefficient algebra on the Gram matrix.

For each task i, over the other tasks j in a random order (the same on every rank), with
``phi = cos(g'_i, g_j)``: when ``phi < phihat_ij`` add
``g_j * ||g'_i|| (phihat sqrt(1 - phi^2) - phi sqrt(1 - phihat^2)) / (||g_j|| sqrt(1 - phihat^2))``;
then ``phihat_ij <- (1 - b) phihat_ij + b phi`` (LibMTL's order). ``A = (1/T) sum_i g'_i``.

Guards (docs/ALGORITHMS.md, Clarification 3): ``phi`` is clamped to [-1, 1] (rounding can put an exactly
opposite pair at -1 - 1 ulp), and a pair whose target has reached ``|phihat| = 1`` (``1 - phihat^2 <
1e-8``: the tasks were identical long enough) gets no adjustment, whose formula divides by zero there.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .base import Balancer, register, seeded_generator
from .pcgrad import other_tasks_in_random_order
from .statistics import StepStats


_DEGENERATE = 1e-8  # 1 - phihat^2 below this: the adjustment is undefined (division by ~0)


@register("gradvac")
class GradVac(Balancer):
    state_names = ("target", "generator")

    def __init__(self, task_names: Sequence[str], beta: float = 0.5, seed: int = 0) -> None:
        super().__init__(task_names)
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"gradvac.beta is an EMA rate in (0, 1], got {beta}")
        self.beta = float(beta)
        self.target = np.zeros((self.num_tasks, self.num_tasks))  # phihat_ij
        self.generator = seeded_generator(seed)

    def coefficients(self, stats: StepStats) -> np.ndarray:
        m, active, t = stats.gram, stats.active, self.num_tasks
        norms = stats.norms
        c = np.eye(t)
        for i in np.flatnonzero(active):
            for j in other_tasks_in_random_order(i, active, self.generator):
                gi_norm = math.sqrt(max(c[i] @ m @ c[i], 0.0))
                if gi_norm == 0.0:
                    continue
                phi = min(max(float(c[i] @ m[:, j]) / (gi_norm * norms[j]), -1.0), 1.0)
                target = self.target[i, j]
                if phi < target and 1.0 - target**2 >= _DEGENERATE:
                    c[i, j] += gi_norm * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)) / (
                        norms[j] * math.sqrt(1 - target**2)
                    )
                self.target[i, j] = (1 - self.beta) * target + self.beta * phi
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist(), "target_similarity": self.target.tolist()}
        return c[active].sum(axis=0) / t * active
