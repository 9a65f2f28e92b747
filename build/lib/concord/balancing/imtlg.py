"""IMTL-G (Liu et al. 2021): the aggregate has equal projections on every task's unit gradient.

With ``D_k = g_1 - g_k`` and ``U_k = u_1 - u_k`` (u: unit gradients) for k >= 2,
``c_{2..T} = g_1 U^T (D U^T + 1e-8 I)^{-1}`` and ``c_1 = 1 - sum``; every inner product comes from M.
"""

from __future__ import annotations

import numpy as np

from .base import Balancer, register
from .statistics import StepStats


def imtlg_weights(gram: np.ndarray) -> np.ndarray:
    """IMTL-G coefficients for tasks with non-zero gradients and Gram ``gram`` (T', T')."""
    t = gram.shape[0]
    if t == 1:
        return np.ones(1)
    n = np.sqrt(np.diagonal(gram))
    gu = gram / n[None, :]  # <g_a, u_b>
    g1_u = gu[0, 0] - gu[0, 1:]  # <g_1, u_1 - u_k>
    # <g_1 - g_a, u_1 - u_b> for a, b >= 2
    d_u = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
    tail = np.linalg.solve((d_u + 1e-8 * np.eye(t - 1)).T, g1_u)  # g1_u @ inv(d_u)
    return np.concatenate([[1.0 - tail.sum()], tail])


@register("imtlg")
class IMTLG(Balancer):
    def coefficients(self, stats: StepStats) -> np.ndarray:
        idx = np.flatnonzero(stats.active)
        coeffs = np.zeros(self.num_tasks)
        if idx.size:
            coeffs[idx] = imtlg_weights(stats.gram[np.ix_(idx, idx)])
        self.last_telemetry = {"weights": coeffs.tolist()}
        return coeffs
