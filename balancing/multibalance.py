"""MultiBalance, from "MultiBalance: Multi-Objective Gradient Balancing in Industrial-Scale Multi-Task
Recommendation System" (He et al., Meta), Algorithm 3 and Eq. 12, as specified in docs/ALGORITHMS.md.

EMA of per-task gradient norms, rescaling to a common magnitude, and a projected simplex step on the
task weights whose direction is a cosine between each rescaled task gradient and the weighted sum.
Everything is algebra on the global Gram matrix.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Balancer, check_positive, check_task_vector, register
from .simplex import project_to_simplex
from .statistics import StepStats

_EPS = 1e-12


@register("multibalance")
class MultiBalance(Balancer):
    """Knobs: ``beta`` EMA of the norms (0 = the paper's no-EMA ablation), ``lr`` the simplex step,
    ``prior`` w0 and ``lam`` its strength, ``relax`` how far magnitudes are equalised (MetaBalance's
    relax factor: 1 = the specified full rescaling, 0 = none)."""

    state_names = ("ema_norms", "weights")
    lagged_statistics_every = 10

    def __init__(
        self,
        task_names: Sequence[str],
        beta: float = 0.9,
        lr: float = 0.1,
        prior: Optional[Sequence[float]] = None,
        lam: float = 0.3,
        relax: float = 1.0,
    ) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"multibalance.beta is an EMA coefficient in [0, 1), got {beta}")
        self.beta = float(beta)
        self.lr = check_positive("multibalance.lr", lr)
        self.lam = check_positive("multibalance.lam", lam, allow_zero=True)
        if not 0.0 <= float(relax) <= 1.0:
            raise ValueError(f"multibalance.relax is in [0, 1] (0: no rescaling, 1: full), got {relax}")
        self.relax = float(relax)
        w0 = check_task_vector("multibalance.prior", prior, self.num_tasks)
        if w0 is None:
            w0 = np.full(self.num_tasks, 1.0 / self.num_tasks)
        if abs(float(w0.sum()) - 1.0) > 1e-6:
            raise ValueError(f"multibalance.prior must lie on the simplex (sum to 1), got sum {float(w0.sum())}")
        self.prior = w0
        self.weights = w0.copy()  # w, starts at w0
        self.ema_norms = np.zeros(self.num_tasks)  # m; 0 = not yet seen

    def coefficients(self, stats: StepStats) -> np.ndarray:
        present = stats.active  # absent tasks keep their m and w this step, and get coefficient 0
        if not present.any():
            return np.zeros(self.num_tasks)
        # Step 1: m_k <- n_k at a task's first step, else beta m_k + (1 - beta) n_k.
        m, n = self.ema_norms, stats.norms
        m = np.where(present, np.where(m > 0, self.beta * m + (1 - self.beta) * n, n), m)
        self.ema_norms = m
        # Step 2: Gtilde_k = (mbar / m_k)^relax G_k: with relax = 1 every present task enters with the
        # same smoothed magnitude.
        mbar = m[present].mean()
        scale = np.where(present, (mbar / np.maximum(m, _EPS)) ** self.relax, 0.0)
        gram = stats.gram * np.outer(scale, scale)  # <Gtilde_i, Gtilde_j>
        # Step 3: d_k = <Gtilde_k, v> / (||Gtilde_k|| ||v|| + eps), v = sum_j (w_j + lam w0_j) Gtilde_j.
        u = np.where(present, self.weights + self.lam * self.prior, 0.0)
        gram_u = gram @ u
        v_norm = np.sqrt(max(float(u @ gram_u), 0.0))
        tilde_norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        direction = gram_u / (tilde_norms * v_norm + _EPS)
        # Step 4 (Eq. 12): projected step, on the part of the simplex the present tasks hold.
        mass = 1.0 - float(self.weights[~present].sum())
        stepped = (self.weights - self.lr * direction)[present]
        weights = self.weights.copy()
        weights[present] = mass * project_to_simplex(stepped / mass) if mass > 0 else 0.0
        self.weights = weights
        # Step 5: A = sum_k w_k Gtilde_k, i.e. c_k = w_k * scale_k on the raw gradients.
        applied = np.where(present, weights, 0.0)
        self.last_telemetry = {
            "weights": applied.tolist(),
            "ema_norm": m.tolist(),
            "direction": direction.tolist(),
            "rescaled_grad_norm": tilde_norms.tolist(),
            "weighted_grad_norm": (applied * tilde_norms).tolist(),
        }
        return applied * scale
