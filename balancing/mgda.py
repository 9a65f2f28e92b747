"""MGDA-UB on the representation (Sener & Koltun 2018): the min-norm point of the task gradients.

ALGORITHMS.md, Baselines: ``c = argmin over the simplex of c^T M' c`` where ``M'`` is ``M`` after the
normalisation ``none | l2 | loss | loss+`` (``G_k`` divided by 1, ``n_k``, ``Lbar_k``, ``Lbar_k n_k``);
as in LibMTL the aggregate is taken over the normalised gradients, ``A = sum_k c_k G_k / div_k``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from balancing.base import Balancer, register
from balancing.simplex import min_norm_weights
from balancing.stats import StepStats

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_EPS = 1e-12


def normalization_inverse(stats: StepStats, how: str) -> np.ndarray:
    """(T,) ``1 / div_k`` for the normalisation ``how``; 0 for inactive tasks."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {how!r}")
    if how == "none":
        return stats.active.astype(np.float64)
    n, loss = stats.norms, np.abs(stats.losses)
    div = {"l2": n, "loss": loss, "loss+": loss * n}[how]
    return np.where(div > 0, 1.0 / np.maximum(div, _EPS), 0.0) * stats.active


def normalized_gram(stats: StepStats, how: str) -> np.ndarray:
    """``M'``: the Gram matrix of ``G_k / div_k``."""
    inv = normalization_inverse(stats, how)
    return stats.gram * np.outer(inv, inv)


def active_min_norm(gram: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Min-norm weights over the active tasks; 0 for the others."""
    out = np.zeros(active.size)
    idx = np.flatnonzero(active)
    if idx.size:
        out[idx] = min_norm_weights(gram[np.ix_(idx, idx)])
    return out


@register("mgda")
class MGDA(Balancer):
    def __init__(self, task_names: Sequence[str], normalization: str = "none") -> None:
        super().__init__(task_names)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgda.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def coefficients(self, stats: StepStats) -> np.ndarray:
        weights = active_min_norm(normalized_gram(stats, self.normalization), stats.active)
        self.last_telemetry = {"weights": weights.tolist()}
        return weights * normalization_inverse(stats, self.normalization)
