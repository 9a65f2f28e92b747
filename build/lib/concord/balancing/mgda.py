"""MGDA-UB on the representation (Sener & Koltun 2018): the min-norm point of the task gradients.

docs/ALGORITHMS.md, Baselines: ``c = argmin over the simplex of c^T M' c`` where ``M'`` is ``M`` after the
normalisation ``none | l2 | loss | loss+`` (``G_k`` divided by 1, ``n_k``, ``Lbar_k``, ``Lbar_k n_k``).
The normalisation is for the solver only: the aggregate is on the raw gradients, ``A = sum_k c_k G_k``
(Sener & Koltun's released code; docs/ALGORITHMS.md, Clarification 1).
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .base import Balancer, register
from .simplex import min_norm_weights
from .statistics import StepStats

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_EPS = 1e-12


def normalization_inverse(stats: StepStats, how: str) -> List[float]:
    """(T,) ``1 / div_k`` for the normalisation ``how``; 0 for inactive tasks."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {how!r}")
    on = [1.0 if a else 0.0 for a in stats.active.tolist()]
    if how == "none":
        return on
    n, loss = stats.norms.tolist(), [abs(v) for v in stats.losses.tolist()]
    div = {"l2": n, "loss": loss, "loss+": [a * b for a, b in zip(loss, n)]}[how]
    return [(1.0 / max(v, _EPS) if v > 0 else 0.0) * a for v, a in zip(div, on)]


def normalized_gram(stats: StepStats, how: str) -> List[List[float]]:
    """``M'``: the Gram matrix of ``G_k / div_k``."""
    inv = normalization_inverse(stats, how)
    return [[m * (inv[i] * inv[j]) for j, m in enumerate(row)] for i, row in enumerate(stats.gram.tolist())]


def active_min_norm(gram: Sequence[Sequence[float]], active: np.ndarray) -> np.ndarray:
    """Min-norm weights over the active tasks; 0 for the others."""
    out = np.zeros(len(active))
    idx = np.flatnonzero(active).tolist()
    if idx:
        out[idx] = min_norm_weights([[gram[i][j] for j in idx] for i in idx])
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
        return weights
