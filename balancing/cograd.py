"""CoGrad (Alibaba; paper 002, Algorithm 1 line 9, Eqs. 10-11 with lambda = 1), per ALGORITHMS.md.

Each task gradient gains the transference term ``-sum_{j != i} gamma_j g_i ⊙ g_i ⊙ g_j``, applied at
per-sample scale (``U_k = B G_k``) so that the rule does not depend on the batch size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from balancing.base import Balancer, check_task_vector, register, weighted_sum
from balancing.stats import StepStats


@register("cograd")
class CoGrad(Balancer):
    needs_cross_terms = False  # fixed weights; the rule is element-wise
    def __init__(
        self,
        task_names: Sequence[str],
        gamma: Sequence[float] | float = 0.01,
        weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(task_names)
        self.gamma = check_task_vector("cograd.gamma", gamma, self.num_tasks)
        c = check_task_vector("cograd.weights", weights, self.num_tasks)
        if c is None:
            c = np.full(self.num_tasks, 1.0 / self.num_tasks)
        elif float(c.sum()) <= 0:
            raise ValueError("cograd.weights must not all be zero")
        else:
            c = c / c.sum()
        self.weights = c
        self._warned_large = set()

    def prepare(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor], live: np.ndarray) -> torch.Tensor:
        # The rule needs no global statistics: all of it runs while they are in flight.
        return self._transfer(grads, live)

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return early if early is not None else self._transfer(grads, stats.active)

    def _transfer(self, grads: Sequence[Optional[torch.Tensor]], active: np.ndarray) -> torch.Tensor:
        c = self.weights * active
        plain = weighted_sum(grads, c, active)  # sum_i c_i G_i
        live = [k for k, g in enumerate(grads) if g is not None and active[k]]
        if not live or float(np.abs(self.gamma[live]).sum()) == 0.0:
            self.last_telemetry = {"weights": self.weights.tolist(), "correction_ratio": 0.0}
            return plain
        b2 = float(grads[live[0]].shape[0]) ** 2  # the local batch size B, squared
        # With U = B G and S = sum_j gamma_j U_j (Algorithm 1, line 9):
        #   (1/B) sum_i c_i U_i⊙U_i⊙(S - gamma_i U_i) = B^2 sum_i c_i G_i⊙G_i⊙(S' - gamma_i G_i),
        # where S' = sum_j gamma_j G_j. Buffers: S', one scratch, the correction; 4 passes per task.
        s_prime = weighted_sum(grads, self.gamma, active)
        correction = torch.zeros_like(plain)
        scratch = torch.empty_like(plain)
        task_ratio = [0.0] * self.num_tasks
        for i in live:
            g = grads[i]
            torch.add(s_prime, g, alpha=-float(self.gamma[i]), out=scratch).mul_(g)  # G_i ⊙ (S' - gamma_i G_i)
            if self.telemetry_due:
                g_norm = float(g.norm())
                task_ratio[i] = b2 * float((scratch * g).norm()) / g_norm if g_norm > 0 else 0.0
            correction.addcmul_(scratch, g, value=float(c[i]))
        correction.mul_(b2)
        self.last_telemetry = {"weights": self.weights.tolist()}
        if self.telemetry_due:
            plain_norm = float(plain.norm())
            self.last_telemetry["correction_ratio"] = float(correction.norm()) / plain_norm if plain_norm > 0 else 0.0
            self.last_telemetry["task_correction_ratio"] = task_ratio
            for i in live:
                if task_ratio[i] > 1.0 and i not in self._warned_large:
                    self._warned_large.add(i)
                    self.warn(
                        self.task_names[i],
                        "cograd-large",
                        f"CoGrad's transference term is {task_ratio[i]:.2f}x this task's own gradient "
                        f"(gamma={float(self.gamma[i])}); with unbalanced loss scales the cubic term can dominate",
                    )
        return plain.sub_(correction)
