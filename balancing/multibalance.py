"""MultiBalance, from "MultiBalance: Multi-Objective Gradient Balancing in Industrial-Scale Multi-Task
Recommendation System" (He et al., Meta), Algorithm 3 and Eq. 12, as specified in docs/ALGORITHMS.md.

EMA of per-task gradient norms, rescaling to a common magnitude, and a projected simplex step on the
task weights whose direction is a cosine between each rescaled task gradient and the weighted sum.
Everything is algebra on the global Gram matrix.
"""

from __future__ import annotations

import math
from operator import mul
from typing import Optional, Sequence

import numpy as np

from concord.balancing.base import Balancer, check_positive, check_task_vector, register
from concord.balancing.simplex import project_to_simplex
from concord.balancing.stats import StepStats

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
        # T is a handful: Python floats, as in balancing/simplex.py.
        active = stats.active.tolist()
        if not any(active):
            return np.zeros(self.num_tasks)
        t, beta, gram = self.num_tasks, self.beta, stats.gram.tolist()
        # Step 1: m_k <- n_k at a task's first step, else beta m_k + (1 - beta) n_k.
        ema = [
            (beta * m + (1 - beta) * n if m > 0 else n) if on else m
            for m, n, on in zip(self.ema_norms.tolist(), stats.norms.tolist(), active)
        ]
        self.ema_norms = np.array(ema)
        # Step 2: Gtilde_k = (mbar / m_k) G_k, so every active task enters with the same magnitude.
        seen = [m for m, on in zip(ema, active) if on]
        mbar = sum(seen) / len(seen)
        scale = [mbar / max(m, _EPS) if on else 0.0 for m, on in zip(ema, active)]
        gram_t = [[gram[i][j] * (scale[i] * scale[j]) for j in range(t)] for i in range(t)]
        # Step 3: d_k = <Gtilde_k, v> / (||Gtilde_k|| ||v|| + eps), v = sum_j (w_j + lam w0_j) Gtilde_j.
        u = [(w + self.lam * w0) if on else 0.0 for w, w0, on in zip(self.weights.tolist(), self.prior.tolist(), active)]
        gu = [sum(map(mul, row, u)) for row in gram_t]
        v_norm = math.sqrt(max(sum(map(mul, u, gu)), 0.0))
        tilde_norms = [math.sqrt(max(gram_t[k][k], 0.0)) for k in range(t)]
        direction = [g / (n * v_norm + _EPS) for g, n in zip(gu, tilde_norms)]
        # Step 4 (Eq. 12): projected step on the simplex.
        self.weights = project_to_simplex([w - self.lr * d for w, d in zip(self.weights.tolist(), direction)])
        # Step 5: A = sum_k w_k Gtilde_k, i.e. c_k = w_k * mbar / m_k on the raw gradients.
        weights = self.weights.tolist()
        self.last_telemetry = {
            "weights": weights,
            "ema_norm": ema,
            "direction": direction,
            "rescaled_grad_norm": tilde_norms,
            "weighted_grad_norm": [w * n for w, n in zip(weights, tilde_norms)],
        }
        return np.array([w * s for w, s in zip(weights, scale)])
