"""CoGrad, from "Gradient Coordination for Quantifying and Maximizing Knowledge Transference in
Multi-Task Learning" (Yang et al., Alibaba), Algorithm 1 line 9 and Eqs. 10-11 with lambda = 1, as
specified in docs/ALGORITHMS.md.

Each task gradient gains the transference term ``-sum_{j != i} gamma_j g_i ⊙ g_i ⊙ g_j``. The ``g`` are
per-sample gradients measured in units of their global root-mean-square (docs/ALGORITHMS.md,
Clarification 4): ``V_k = U_k / r`` with ``U_k = B G_k`` and ``r^2`` the mean of the squared entries of
the present tasks' per-sample gradients over the global batch, read from the Gram's diagonal. The rule
then depends neither on the batch size nor on the gradients' overall scale, so ``gamma`` is a relative
strength: the correction is a few percent of the gradient at the default.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from .base import Balancer, check_task_vector, register, weighted_sum
from .statistics import StepStats


DEFAULT_GAMMA = 0.1  # relative: a correction of a few percent of the gradient on the demo and on real data


@register("cograd")
class CoGrad(Balancer):
    needs_cross_terms = False  # fixed weights; the rule is element-wise

    def __init__(
        self,
        task_names: Sequence[str],
        gamma: Sequence[float] | float = DEFAULT_GAMMA,
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
        self.fused = bool(fused)

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        active = stats.active
        live = [k for k, g in enumerate(grads) if g is not None and active[k]]
        b2 = self.cubic_scale(stats, live, grads[live[0]].shape[1]) if live else 0.0
        if b2 == 0.0 or float(np.abs(self.gamma[live]).sum()) == 0.0:
            self.last_telemetry = {"weights": self.weights.tolist(), "correction_ratio": 0.0}
            return weighted_sum(grads, self.weights * active, active)
        g_live = [grads[k] for k in live]
        aggregated = self.run_rule(transference, g_live, [float(self.weights[k]) for k in live], [float(self.gamma[k]) for k in live], b2)
        self.last_telemetry = {"weights": self.weights.tolist()}
        if self.telemetry_due:
            self._record_correction(grads, active, live, aggregated, b2)
        return aggregated

    @staticmethod
    def cubic_scale(stats: StepStats, live: List[int], width: int) -> float:
        """``B^2 / r^2``: the factor on ``G_i⊙G_i⊙G_j`` that applies the rule to ``V = B G / r``.

        Per-sample gradients are ``B_g`` times the global gradient's rows, so the sum of their squared
        entries is ``B_g^2 M_kk`` and their mean square over ``B_g`` rows and ``d`` columns, averaged over
        the present tasks, is ``r^2 = B_g mean_k M_kk / d``."""
        r2 = stats.global_batch_size * float(np.mean(np.diagonal(stats.gram)[live])) / width
        return float(stats.local_batch_size) ** 2 / r2 if r2 > 0 else 0.0

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
    """``A = sum_i c_i (G_i - b2 G_i⊙G_i⊙(S' - gamma_i G_i))`` with ``S' = sum_j gamma_j G_j``: Algorithm 1,
    line 9 on ``V = B G / r`` (``b2 = B^2 / r^2``; ``(r/B) V_i⊙V_i⊙(S_V - gamma_i V_i)`` is the ``b2``
    term in units of ``G``), over the live tasks' gradients (B, d). In-place on its own buffers: run eagerly that
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
