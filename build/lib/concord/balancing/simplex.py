"""Small float64 solvers on the simplex, shared by the balancers.

Inputs are T-vectors or T x T matrices with T a handful, so the arithmetic runs on Python floats: a
NumPy call costs microseconds of dispatch whatever its size, and these solvers run inside backward
every step (host time that a GPU waits for). They take sequences or arrays and return NumPy arrays.
"""

from __future__ import annotations

import math
from operator import mul, sub
from typing import List, Sequence

import numpy as np


def project_to_simplex(v: Sequence[float]) -> np.ndarray:
    """Euclidean projection of ``v`` (T,) onto {w : w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    values = [float(x) for x in v]
    running, theta = 0.0, 0.0
    for i, u in enumerate(sorted(values, reverse=True)):
        running += u
        shift = (running - 1.0) / (i + 1)
        if u - shift > 0:
            theta = shift  # the largest i with u_i > (sum_{j<=i} u_j - 1) / i fixes the threshold
    return np.array([max(x - theta, 0.0) for x in values])


def _min_norm_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Weight ``g`` on x minimising ||g x + (1-g) y||^2 given <x,x>, <x,y>, <y,y>; returns (g, cost)."""
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    g = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return g, v22 + g * (v12 - v22)


def min_norm_weights(gram: Sequence[Sequence[float]], max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """MGDA min-norm point: argmin over the simplex of ``c^T gram c`` (Sener & Koltun 2018).

    T = 2 uses the closed form ``c_1 = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1)``; T > 2 runs
    Frank-Wolfe from the best pair, at most ``max_iter`` iterations, tolerance ``tol``.
    """
    m = np.asarray(gram, dtype=np.float64).tolist()
    t = len(m)
    if t == 1:
        return np.ones(1)
    best_cost, x = float("inf"), [0.0] * t
    for i in range(t):
        for j in range(i + 1, t):
            g, cost = _min_norm_pair(m[i][i], m[i][j], m[j][j])
            if cost < best_cost:
                best_cost, x = cost, [0.0] * t
                x[i], x[j] = g, 1.0 - g
    if t > 2:
        for _ in range(max_iter):
            grad = [sum(map(mul, row, x)) for row in m]
            k = min(range(t), key=grad.__getitem__)
            g, _ = _min_norm_pair(sum(map(mul, x, grad)), grad[k], m[k][k])
            new = [g * v for v in x]
            new[k] += 1.0 - g
            done = sum(map(abs, map(sub, new, x))) < tol
            x = new
            if done:
                break
    return np.array(x)


def kl_to_uniform(p: Sequence[float]) -> float:
    """``KL(p || uniform) = log T - H(p)``."""
    t = len(p)
    return sum(v * math.log(v * t) for v in map(float, p) if v > 0)


def _softmax(x: List[float]) -> List[float]:
    top = max(x)
    e = [math.exp(v - top) for v in x]
    total = sum(e)
    return [v / total for v in e]


def kl_constrained_softmax(log_q: Sequence[float], rho: float, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """``p ∝ q^(1/(1+lam))`` with ``lam = 0`` if ``KL(p || uniform) <= rho``, else the ``lam > 0``
    for which ``KL = rho``. Returns (p, lam).

    Solved for the temperature ``tau = 1/(1+lam)`` in (0, 1]: with ``p = softmax(tau x)``, KL rises
    monotonically from 0 and ``dKL/dtau = tau Var_p(x)``, so Newton steps kept inside a shrinking
    bisection bracket converge in a handful of iterations.
    """
    x = [float(v) for v in log_q]
    p = _softmax(x)
    if kl_to_uniform(p) <= rho:
        return np.array(p), 0.0
    lo, hi, tau = 0.0, 1.0, 1.0
    for _ in range(100):
        p = _softmax([tau * v for v in x])
        f = kl_to_uniform(p) - rho
        if abs(f) <= tol * max(rho, 1e-12):
            break
        if f > 0:
            hi = tau
        else:
            lo = tau
        mean = sum(map(mul, p, x))
        slope = tau * sum(a * (b - mean) ** 2 for a, b in zip(p, x))
        step = tau - f / slope if slope > 0 else -1.0
        tau = step if lo < step < hi else 0.5 * (lo + hi)
    return np.array(_softmax([tau * v for v in x])), 1.0 / tau - 1.0
