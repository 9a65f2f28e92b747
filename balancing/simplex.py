"""Small float64 solvers on the simplex, shared by the balancers (NumPy: inputs are T or T x T)."""

from __future__ import annotations

import numpy as np


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` (T,) onto {w : w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    cumsum = np.cumsum(u) - 1.0
    rho = int(np.nonzero(u - cumsum / np.arange(1, v.size + 1) > 0)[0].max())
    return np.maximum(v - cumsum[rho] / (rho + 1), 0.0)


def _min_norm_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Weight ``g`` on x minimising ||g x + (1-g) y||^2 given <x,x>, <x,y>, <y,y>; returns (g, cost)."""
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    g = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return g, v22 + g * (v12 - v22)


def min_norm_weights(gram: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """MGDA min-norm point: argmin over the simplex of ``c^T gram c`` (Sener & Koltun 2018).

    T = 2 uses the closed form ``c_1 = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1)``; T > 2 runs
    Frank-Wolfe from the best pair, at most ``max_iter`` iterations, tolerance ``tol``.
    """
    m = np.asarray(gram, dtype=np.float64)
    t = m.shape[0]
    if t == 1:
        return np.ones(1)
    best_cost, sol = float("inf"), np.zeros(t)
    for i in range(t):
        for j in range(i + 1, t):
            g, cost = _min_norm_pair(m[i, i], m[i, j], m[j, j])
            if cost < best_cost:
                best_cost, sol = cost, np.zeros(t)
                sol[i], sol[j] = g, 1.0 - g
    if t > 2:
        # Plain Python floats: at T of a few, NumPy's per-call dispatch would dominate each iteration.
        mm, x = m.tolist(), sol.tolist()
        for _ in range(max_iter):
            grad = [sum(row[j] * x[j] for j in range(t)) for row in mm]
            k = min(range(t), key=grad.__getitem__)
            g, _ = _min_norm_pair(sum(a * b for a, b in zip(x, grad)), grad[k], mm[k][k])
            new = [g * v for v in x]
            new[k] += 1.0 - g
            done = sum(abs(a - b) for a, b in zip(new, x)) < tol
            x = new
            if done:
                break
        sol = np.array(x)
    return sol


def kl_to_uniform(p: np.ndarray) -> float:
    """``KL(p || uniform) = log T - H(p)``."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float((nz * np.log(nz * p.size)).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl_constrained_softmax(log_q: np.ndarray, rho: float, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """``p ∝ q^(1/(1+lam))`` with ``lam = 0`` if ``KL(p || uniform) <= rho``, else the ``lam > 0``
    for which ``KL = rho``. Returns (p, lam).

    Solved for the temperature ``tau = 1/(1+lam)`` in (0, 1]: with ``p = softmax(tau x)``, KL rises
    monotonically from 0 and ``dKL/dtau = tau Var_p(x)``, so Newton steps kept inside a shrinking
    bisection bracket converge in a handful of iterations.
    """
    x = np.asarray(log_q, dtype=np.float64)
    p = softmax(x)
    if kl_to_uniform(p) <= rho:
        return p, 0.0
    lo, hi, tau = 0.0, 1.0, 1.0
    for _ in range(100):
        p = softmax(tau * x)
        f = kl_to_uniform(p) - rho
        if abs(f) <= tol * max(rho, 1e-12):
            break
        if f > 0:
            hi = tau
        else:
            lo = tau
        slope = tau * float(p @ (x - p @ x) ** 2)
        step = tau - f / slope if slope > 0 else -1.0
        tau = step if lo < step < hi else 0.5 * (lo + hi)
    return softmax(tau * x), 1.0 / tau - 1.0
