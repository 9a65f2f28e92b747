"""DB-MTL, dual-balancing (Lin et al. 2023), as a coefficient method.

Loss scale: the gradients of ``log L_k``, ``ghat_k = G_k / Lbar_k``. Gradient scale: every ``ghat_k``
is scaled by ``max_j m_j / m_k``, with ``m`` an EMA (``beta``) of ``||ghat_k||``. **Concord reading**:
LibMTL keeps an EMA of the whole gradient vector; at the representation a row is a different sample
every step, so only the norms are averaged. ``A = (1/T) sum_k (max_j m_j / m_k) ghat_k``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Balancer, register
from .statistics import StepStats


@register("dbmtl")
class DBMTL(Balancer):
    state_names = ("ema_norms",)
    needs_cross_terms = False  # norms only

    def __init__(self, task_names: Sequence[str], beta: float = 0.9) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"dbmtl.beta is an EMA coefficient in [0, 1), got {beta}")
        self.beta = float(beta)
        self.ema_norms = np.zeros(self.num_tasks)

    def coefficients(self, stats: StepStats) -> np.ndarray:
        positive = stats.losses > 0
        active = stats.active & positive
        for k in np.flatnonzero(stats.active & ~positive):
            self.warn(self.task_names[k], "dbmtl-log", "DB-MTL needs a positive loss for log L; task skipped this step")
        inv_loss = np.where(active, 1.0 / np.where(positive, stats.losses, 1.0), 0.0)
        log_norms = stats.norms * inv_loss  # ||ghat_k||
        ema = np.where(self.ema_norms > 0, self.beta * self.ema_norms + (1 - self.beta) * log_norms, log_norms)
        self.ema_norms = np.where(active, ema, self.ema_norms)
        scale = np.zeros(self.num_tasks)
        if active.any():
            scale[active] = self.ema_norms[active].max() / self.ema_norms[active]
        t = self.num_tasks
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist(), "scale": scale.tolist()}
        return scale * inv_loss / t
