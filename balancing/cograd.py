"""CoGrad, from "Gradient Coordination for Quantifying and Maximizing Knowledge Transference in
Multi-Task Learning" (Yang et al., Alibaba), Algorithm 1 line 9 and Eqs. 10-11 with lambda = 1, as
specified in docs/ALGORITHMS.md.

Each task gradient gains the transference term ``-sum_{j != i} gamma_j g_i ⊙ g_i ⊙ g_j``, applied at
per-sample scale (``U_k = B G_k``) so that the rule does not depend on the batch size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from concord.balancing.base import Balancer, check_task_vector, register, weighted_sum
from concord.balancing.fused import FusedRule
from concord.balancing.stats import StepStats


@register("cograd")
class CoGrad(Balancer):
    needs_cross_terms = False  # fixed weights; the rule is element-wise

    def __init__(
        self,
        task_names: Sequence[str],
        gamma: Sequence[float] | float = 0.01,
        weights: Optional[Sequence[float]] = None,
        fused: bool = True,
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
        self._rule = FusedRule(transference, fused)  # one pass over the gradients instead of 4 per task

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
        live = [k for k, g in enumerate(grads) if g is not None and active[k]]
        if not live or float(np.abs(self.gamma[live]).sum()) == 0.0:
            self.last_telemetry = {"weights": self.weights.tolist(), "correction_ratio": 0.0}
            return weighted_sum(grads, self.weights * active, active)
        g_live = [grads[k] for k in live]
        b2 = float(g_live[0].shape[0]) ** 2  # the local batch size B, squared
        aggregated = self._rule(g_live, [float(self.weights[k]) for k in live], [float(self.gamma[k]) for k in live], b2)
        self.last_telemetry = {"weights": self.weights.tolist()}
        if self.telemetry_due:
            self._record_correction(grads, active, live, aggregated, b2)
        return aggregated

    def _record_correction(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        active: np.ndarray,
        live: List[int],
        aggregated: torch.Tensor,
        b2: float,
    ) -> None:
        """Logging steps only: the correction's size against the plain gradient, overall and per task."""
        plain = weighted_sum(grads, self.weights, active)  # skips absent gradients, as ``live`` does
        s_prime = sum(float(self.gamma[j]) * grads[j] for j in live)
        task_ratio = [0.0] * self.num_tasks
        for i in live:
            g, g_norm = grads[i], float(grads[i].norm())
            task_ratio[i] = b2 * float((g * g * (s_prime - float(self.gamma[i]) * g)).norm()) / g_norm if g_norm > 0 else 0.0
        plain_norm = float(plain.norm())
        self.last_telemetry["correction_ratio"] = float((plain - aggregated).norm()) / plain_norm if plain_norm > 0 else 0.0
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


def transference(grads: List[torch.Tensor], c: List[float], gamma: List[float], b2: float) -> torch.Tensor:
    """``A = sum_i c_i (G_i - B^2 G_i⊙G_i⊙(S' - gamma_i G_i))`` with ``S' = sum_j gamma_j G_j``: Algorithm 1,
    line 9 at per-sample scale (``U = B G``, ``S = B S'``; ``(1/B) U_i⊙U_i⊙(S - gamma_i U_i)`` is the
    ``B^2`` term), over the live tasks' gradients (B, d). In-place on its own buffers: run eagerly that
    is 4 passes per task instead of 7, and compiled it is the same single loop."""
    plain, s_prime = grads[0] * c[0], grads[0] * gamma[0]
    for c_i, gamma_i, g in zip(c[1:], gamma[1:], grads[1:]):
        plain.add_(g, alpha=c_i)
        s_prime.add_(g, alpha=gamma_i)
    correction, scratch = torch.zeros_like(plain), torch.empty_like(plain)
    for c_i, gamma_i, g in zip(c, gamma, grads):
        torch.add(s_prime, g, alpha=-gamma_i, out=scratch).mul_(g)  # G_i ⊙ (S' - gamma_i G_i)
        correction.addcmul_(scratch, g, value=c_i)
    return plain.sub_(correction.mul_(b2))
