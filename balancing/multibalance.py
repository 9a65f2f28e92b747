"""MultiBalance (Meta; paper 001, Algorithm 3, Eq. 12), as specified in ALGORITHMS.md.

EMA of per-task gradient norms, rescaling to a common magnitude, and a projected simplex step on the
task weights whose direction is a cosine between each rescaled task gradient and the weighted sum.
Everything is algebra on the global Gram matrix.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from balancing.base import Balancer, check_positive, check_task_vector, register
from balancing.simplex import project_to_simplex
from balancing.stats import StepStats

_EPS = 1e-12


@register("multibalance")
class MultiBalance(Balancer):
    state_names = ("ema_norms", "weights")

    def __init__(
        self,
        task_names: Sequence[str],
        beta: float = 0.9,
        lr: float = 0.1,
        prior: Optional[Sequence[float]] = None,
        lam: float = 0.3,
    ) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"multibalance.beta is an EMA coefficient in [0, 1), got {beta}")
        self.beta = float(beta)
        self.lr = check_positive("multibalance.lr", lr)
        self.lam = check_positive("multibalance.lam", lam, allow_zero=True)
        w0 = check_task_vector("multibalance.prior", prior, self.num_tasks)
        if w0 is None:
            w0 = np.full(self.num_tasks, 1.0 / self.num_tasks)
        if abs(float(w0.sum()) - 1.0) > 1e-6:
            raise ValueError(f"multibalance.prior must lie on the simplex (sum to 1), got sum {float(w0.sum())}")
        self.prior = w0
        self.weights = w0.copy()  # w, starts at w0
        self.ema_norms = np.zeros(self.num_tasks)  # m; 0 = not yet seen

    def coefficients(self, stats: StepStats) -> np.ndarray:
        active, n = stats.active, stats.norms
        if not active.any():
            return np.zeros(self.num_tasks)
        # Step 1: m_k <- n_k at a task's first step, else beta m_k + (1 - beta) n_k.
        ema = np.where(self.ema_norms > 0, self.beta * self.ema_norms + (1 - self.beta) * n, n)
        self.ema_norms = np.where(active, ema, self.ema_norms)
        # Step 2: Gtilde_k = (mbar / m_k) G_k, so every active task enters with the same magnitude.
        mbar = self.ema_norms[active].mean()
        scale = np.where(active, mbar / np.maximum(self.ema_norms, _EPS), 0.0)
        gram_t = stats.gram * np.outer(scale, scale)
        # Step 3: d_k = <Gtilde_k, v> / (||Gtilde_k|| ||v|| + eps), v = sum_j (w_j + lam w0_j) Gtilde_j.
        u = (self.weights + self.lam * self.prior) * active
        gu = gram_t @ u
        v_norm = np.sqrt(max(float(u @ gu), 0.0))
        tilde_norms = np.sqrt(np.maximum(np.diagonal(gram_t), 0.0))
        direction = gu / (tilde_norms * v_norm + _EPS)
        # Step 4 (Eq. 12): projected step on the simplex.
        self.weights = project_to_simplex(self.weights - self.lr * direction)
        # Step 5: A = sum_k w_k Gtilde_k, i.e. c_k = w_k * mbar / m_k on the raw gradients.
        coeffs = self.weights * scale
        self.last_telemetry = {
            "weights": self.weights.tolist(),
            "ema_norm": self.ema_norms.tolist(),
            "direction": direction.tolist(),
            "rescaled_grad_norm": tilde_norms.tolist(),
            "weighted_grad_norm": (self.weights * tilde_norms).tolist(),
        }
        return coeffs
