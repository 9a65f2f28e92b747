"""CoGrad, from "Gradient Coordination for Quantifying and Maximizing Knowledge Transference in
Multi-Task Learning" (Yang et al., Alibaba), Algorithm 1 line 9 and Eqs. 10-11 with lambda = 1, as
specified in docs/ALGORITHMS.md.

Each task gradient gains the transference term ``-sum_{j != i} gamma_j g_i ⊙ g_i ⊙ g_j``:

    A = P - kappa C,   P = sum_i c_i G_i,   C = sum_i c_i G_i ⊙ G_i ⊙ (S' - gamma_i G_i),   S' = sum_j gamma_j G_j

The cubic term's size relative to the gradient depends on the data (on how heavy the gradients' tails
are: 100 times apart between a synthetic and a real data set at one fixed coefficient), so Concord
fixes its global size instead (docs/ALGORITHMS.md, Clarification 4): ``kappa`` makes ``||kappa C|| =
strength * ||P||`` over the global batch. ``gamma`` weighs the tasks' transference against each other;
``strength`` is the correction's share of the gradient. Both norms travel in the step's statistics
(this rank's share, at per-sample scale), so every rank uses the same ``kappa``; with lagged statistics
it is the previous step's.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Balancer, check_positive, check_task_vector, register, weighted_sum
from .statistics import StepStats


@register("cograd")
class CoGrad(Balancer):
    needs_cross_terms = False  # fixed weights; the rule is element-wise
    lag_safe_extras = True  # kappa from the previous step's norms is still the same on every rank
    # ... but not the right size: C is cubic in G, so a step whose gradients are twice the last one's
    # gets a correction four times `strength` (up to 0.38 of the gradient seen, one seed of five
    # diverging on the Ali-CCP-shaped log). `auto` keeps each step's own kappa.
    lags_by_default = False
    extra_size = 2  # ||P||^2 and ||C||^2

    def __init__(
        self,
        task_names: Sequence[str],
        gamma: Sequence[float] | float = 1.0,
        weights: Optional[Sequence[float]] = None,
        strength: float = 0.05,
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
        self.strength = check_positive("cograd.strength", strength, allow_zero=True)
        self.fused = bool(fused)
        self._terms: Optional[Tuple[List[int], torch.Tensor, torch.Tensor]] = None  # live, P, C of this step

    def local_extra(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's ``B^2 ||P||^2`` and ``B^2 ||C||^2``: summed over ranks (and divided by ``B_g^2``,
        which cancels in ``kappa``) they are the global batch's norms at per-sample scale.

        One pass over the present gradients forms ``P``, ``C``, their norms and each ``||G_k||^2``
        (handed to the boundary's statistics as :attr:`squared_norms_seen`, so the Gram's diagonal
        costs no second pass). A non-finite gradient is not looked for here: it makes the norms
        non-finite, the statistics then mark its task inactive on every rank, and :meth:`aggregate`
        leaves that step uncorrected, so the terms formed with it are never used."""
        present = [k for k, g in enumerate(grads) if g is not None]
        if not present:
            self._terms = None
            return torch.zeros(2, dtype=torch.float64)
        plain, correction, squares = self.run_rule(
            transference, [grads[k] for k in present], [float(self.weights[k]) for k in present], [float(self.gamma[k]) for k in present]
        )
        self._terms = (present, plain, correction)
        self.squared_norms_seen = squares[:-2]
        b2 = float(plain.shape[0]) ** 2
        return squares[-2:].double() * b2

    def warm_up(self, template: torch.Tensor) -> None:
        zeros = [torch.zeros_like(template) for _ in range(self.num_tasks)]  # distinct, as the gradients are
        self.run_rule(transference, zeros, [float(c) for c in self.weights], [float(g) for g in self.gamma])

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        active = stats.active
        live = [k for k, g in enumerate(grads) if g is not None and active[k]]
        # A task with a gradient here that is inactive globally (non-finite or zero on some rank) was
        # in some ranks' norms and not in others': no kappa fits every rank, so this step goes
        # uncorrected, on every rank alike.
        dropped = any(g is not None and not active[k] for k, g in enumerate(grads))
        kappa = 0.0 if dropped else self.kappa(stats)
        self.last_telemetry = {"weights": self.weights.tolist(), "kappa": kappa}
        if not live or kappa == 0.0 or self._terms is None or self._terms[0] != live:
            self._terms = None
            self.last_telemetry["correction_ratio"] = 0.0
            return weighted_sum(grads, self.weights * active, active)
        _, plain, correction = self._terms
        self._terms = None
        if self.telemetry_due:
            norm = float(plain.norm())
            self.last_telemetry["correction_ratio"] = kappa * float(correction.norm()) / norm if norm > 0 else 0.0
        return plain.sub_(correction, alpha=kappa)

    def kappa(self, stats: StepStats) -> float:
        """``strength * ||P|| / ||C||`` over the global batch (0 where there is nothing to correct)."""
        if stats.extra is None or self.strength == 0.0:
            return 0.0
        plain2, correction2 = float(stats.extra[0]), float(stats.extra[1])
        usable = math.isfinite(plain2) and math.isfinite(correction2) and correction2 > 0 and plain2 > 0
        return self.strength * math.sqrt(plain2 / correction2) if usable else 0.0


def transference(grads: List[torch.Tensor], c: List[float], gamma: List[float]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P = sum_i c_i G_i`` and ``C = sum_i c_i G_i⊙G_i⊙(S' - gamma_i G_i)`` with ``S' = sum_j gamma_j G_j``
    (Algorithm 1, line 9, before its overall scale), over the given gradients (B, d); and the squared
    norms ``[||G_1||^2 .. ||G_n||^2, ||P||^2, ||C||^2]``. In-place on its own buffers: run eagerly that
    is 4 passes per task instead of 7; compiled, the products, the sums and the norms are one loop
    that reads each ``G_i`` once."""
    plain, s_prime = grads[0] * c[0], grads[0] * gamma[0]
    for c_i, gamma_i, g in zip(c[1:], gamma[1:], grads[1:]):
        plain.add_(g, alpha=c_i)
        s_prime.add_(g, alpha=gamma_i)
    correction, scratch = torch.zeros_like(plain), torch.empty_like(plain)
    for c_i, gamma_i, g in zip(c, gamma, grads):
        torch.add(s_prime, g, alpha=-gamma_i, out=scratch).mul_(g)  # G_i ⊙ (S' - gamma_i G_i)
        correction.addcmul_(scratch, g, value=c_i)
    squares = torch.stack([_squared_sum(t) for t in (*grads, plain, correction)])
    return plain, correction, squares


def _squared_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum t^2``, accumulated in float32 at least (half-precision gradients widened)."""
    return t.square().sum(dtype=torch.promote_types(t.dtype, torch.float32))
