"""EMTL, from "Equitable Multi-Task Learning", Eqs. 1 and 11-13, as specified in docs/ALGORITHMS.md.

MGDA's min-norm weights merged with bandit weights that mirror-ascend on each task's relative rate
(loss / gradient norm), inside a KL ball around uniform.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from concord.balancing.base import Balancer, check_positive, register
from concord.balancing.mgda import NORMALIZATIONS, active_min_norm, normalized_gram
from concord.balancing.simplex import kl_constrained_softmax
from concord.balancing.stats import StepStats

_EPS = 1e-12


@register("emtl")
class EMTL(Balancer):
    state_names = ("bandit",)

    def __init__(
        self,
        task_names: Sequence[str],
        beta: float = 0.5,
        rho: float | None = None,
        eta: float = 1.0,
        mgda_norm: str = "none",
    ) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"emtl.beta merges MGDA and bandit weights and must be in [0, 1], got {beta}")
        self.beta = float(beta)
        log_t = math.log(self.num_tasks)
        self.rho = 0.5 * log_t if rho is None else check_positive("emtl.rho", rho, allow_zero=True)
        if self.num_tasks > 1 and self.rho >= log_t:
            raise ValueError(
                f"emtl.rho = {self.rho} must be < log T = {log_t:.4f} for T = {self.num_tasks}: "
                "KL(p || uniform) <= log T always, so such a radius never constrains the bandit"
            )
        self.eta = check_positive("emtl.eta", eta, allow_zero=True)
        if mgda_norm not in NORMALIZATIONS:
            raise ValueError(f"emtl.mgda_norm must be one of {NORMALIZATIONS}, got {mgda_norm!r}")
        self.mgda_norm = mgda_norm
        self.bandit = np.full(self.num_tasks, 1.0 / self.num_tasks)  # p

    def coefficients(self, stats: StepStats) -> np.ndarray:
        # T is a handful: Python floats, as in balancing/simplex.py.
        active = stats.active.tolist()
        if not any(active):
            return np.zeros(self.num_tasks)
        # Step 1: alpha = MGDA min-norm weights over the active tasks.
        alpha = active_min_norm(normalized_gram(stats, self.mgda_norm), stats.active).tolist()
        # Step 2 (Eq. 1): relative rates r_k = Lbar_k / n_k, rewards normalised to mean 1.
        rate = [loss / (n + _EPS) for loss, n in zip(stats.losses.tolist(), stats.norms.tolist())]
        live = [r for r, on in zip(rate, active) if on]
        mean_rate = sum(live) / len(live)
        reward = [r / mean_rate if on and mean_rate != 0.0 else 0.0 for r, on in zip(rate, active)]
        # Step 3 (Eqs. 11-13): mirror ascent in log space, projected into the KL ball of radius rho.
        log_q = [math.log(max(p, 1e-300)) + self.eta * r for p, r in zip(self.bandit.tolist(), reward)]
        self.bandit, kl_multiplier = kl_constrained_softmax(log_q, self.rho)
        # Step 4: merge, then step 5: A = sum_k w_k G_k (inactive tasks contribute nothing).
        weights = [self.beta * a + (1.0 - self.beta) * p for a, p in zip(alpha, self.bandit.tolist())]
        live_rewards = [r for r, on in zip(reward, active) if on]
        mean_reward = sum(live_rewards) / len(live_rewards)
        self.last_telemetry = {
            "weights": weights,
            "alpha": alpha,
            "p": self.bandit.tolist(),
            "relative_rate": rate,
            "relative_rate_var": sum((r - mean_reward) ** 2 for r in live_rewards) / len(live_rewards),
            "kl_multiplier": kl_multiplier,
        }
        return np.array([w if on else 0.0 for w, on in zip(weights, active)])
