"""EMTL, from "Equitable Multi-Task Learning", Eqs. 1 and 11-13, as specified in docs/ALGORITHMS.md.

MGDA's min-norm weights merged with bandit weights that mirror-ascend on each task's relative rate
(loss / gradient norm), inside a KL ball around uniform. The rates are smoothed (an EMA, as
MultiBalance smooths its norms) and the mirror step is small, so the bandit moves gradually instead of
jumping to the ball's boundary in a few steps (docs/ALGORITHMS.md, Clarifications 2 and 5).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .base import Balancer, check_positive, register
from .mgda import NORMALIZATIONS, active_min_norm, normalized_gram
from .simplex import kl_constrained_softmax
from .statistics import StepStats

_EPS = 1e-12


@register("emtl")
class EMTL(Balancer):
    """Knobs: ``beta`` merges MGDA (1) and bandit (0) weights, ``rho`` the KL radius, ``eta`` the mirror
    step, ``rate_beta`` the EMA of the relative rates (0 = the raw per-step rates), ``mgda_norm`` the
    normalisation MGDA's solver sees."""

    state_names = ("bandit", "ema_rates")
    lagged_statistics_every = 10

    def __init__(
        self,
        task_names: Sequence[str],
        beta: float = 0.5,
        rho: float | None = None,
        eta: float = 0.01,
        rate_beta: float = 0.9,
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
        if not 0.0 <= float(rate_beta) < 1.0:
            raise ValueError(f"emtl.rate_beta is an EMA coefficient in [0, 1), got {rate_beta}")
        self.rate_beta = float(rate_beta)
        if mgda_norm not in NORMALIZATIONS:
            raise ValueError(f"emtl.mgda_norm must be one of {NORMALIZATIONS}, got {mgda_norm!r}")
        self.mgda_norm = mgda_norm
        self.bandit = np.full(self.num_tasks, 1.0 / self.num_tasks)  # p
        self.ema_rates = np.zeros(self.num_tasks)  # smoothed r_k; 0 = not yet seen

    def coefficients(self, stats: StepStats) -> np.ndarray:
        present = stats.active  # absent tasks: rate frozen, neutral reward 1, coefficient 0
        if not present.any():
            return np.zeros(self.num_tasks)
        # Step 1: alpha = MGDA min-norm weights over the present tasks.
        alpha = active_min_norm(normalized_gram(stats, self.mgda_norm), present)
        # Step 2 (Eq. 1): relative rates r_k = Lbar_k / n_k, smoothed, as rewards of mean 1.
        rate = stats.losses / (stats.norms + _EPS)
        r = self.ema_rates
        r = np.where(present, np.where(r > 0, self.rate_beta * r + (1 - self.rate_beta) * rate, rate), r)
        self.ema_rates = r
        mean_rate = r[present].mean()
        reward = np.where(present & (mean_rate != 0.0), r / (mean_rate if mean_rate != 0.0 else 1.0), 1.0)
        # Step 3 (Eqs. 11-13): mirror ascent in log space, projected into the KL ball of radius rho.
        log_q = np.log(np.maximum(self.bandit, 1e-300)) + self.eta * reward
        self.bandit, kl_multiplier = kl_constrained_softmax(log_q, self.rho)
        # Step 4: merge; step 5: A = sum_k w_k G_k over the present tasks.
        weights = np.where(present, self.beta * alpha + (1.0 - self.beta) * self.bandit, 0.0)
        live_rewards = reward[present]
        self.last_telemetry = {
            "weights": weights.tolist(),
            "alpha": alpha.tolist(),
            "p": self.bandit.tolist(),
            "relative_rate": rate.tolist(),
            "relative_rate_var": float(((live_rewards - live_rewards.mean()) ** 2).mean()),
            "kl_multiplier": kl_multiplier,
        }
        return weights
