"""Small float64 solvers on the simplex, shared by the balancers.

Inputs are tiny (T or T x T), so they run in NumPy on the CPU: a torch op on a 3-element tensor costs
microseconds of dispatch, and a Frank-Wolfe or bisection loop would pay it hundreds of times per step.
Functions take and return float64 torch tensors.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _project(v: np.ndarray) -> np.ndarray:
    u = np.sort(v)[::-1]
    cumsum = np.cumsum(u) - 1.0
    ks = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - cumsum / ks > 0)[0].max())
    return np.maximum(v - cumsum[rho] / (rho + 1), 0.0)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` (T,) onto {w : w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    return torch.from_numpy(_project(_np(v)))


def _min_norm_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Weight ``g`` on x minimising ||g x + (1-g) y||^2 given <x,x>, <x,y>, <y,y>; returns (g, cost)."""
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    g = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return g, v22 + g * (v12 - v22)


def min_norm_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-5) -> torch.Tensor:
    """MGDA min-norm point: argmin over the simplex of ``c^T gram c`` (Sener & Koltun 2018).

    T = 2 uses the closed form ``c_1 = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1)``; T > 2 runs
    Frank-Wolfe from the best pair. Returns (T,) float64.
    """
    m = _np(gram)
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    best_cost, sol = float("inf"), np.zeros(t)
    for i in range(t):
        for j in range(i + 1, t):
            g, cost = _min_norm_pair(m[i, i], m[i, j], m[j, j])
            if cost < best_cost:
                best_cost = cost
                sol = np.zeros(t)
                sol[i], sol[j] = g, 1.0 - g
    if t > 2:
        for _ in range(max_iter):
            grad = m @ sol
            k = int(np.argmin(grad))
            g, _ = _min_norm_pair(float(sol @ grad), float(grad[k]), float(m[k, k]))
            new = g * sol
            new[k] += 1.0 - g
            done = float(np.abs(new - sol).sum()) < tol
            sol = new
            if done:
                break
    return torch.from_numpy(sol)


def kl_to_uniform(p: torch.Tensor | np.ndarray) -> float:
    """``KL(p || uniform) = log T - H(p)``."""
    p = _np(p) if isinstance(p, torch.Tensor) else p
    nz = p[p > 0]
    return float((nz * np.log(nz * p.size)).sum())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl_constrained_softmax(log_q: torch.Tensor, rho: float, tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """``p ∝ q^(1/(1+lam))`` with ``lam = 0`` if ``KL(p || uniform) <= rho``, else the ``lam > 0``
    for which ``KL = rho``. Returns (p, lam).

    Solved for the temperature ``tau = 1/(1+lam)`` in (0, 1]: with ``p = softmax(tau x)``, KL rises
    monotonically from 0 and ``dKL/dtau = tau Var_p(x)``, so Newton steps kept inside a shrinking
    bisection bracket converge in a handful of iterations.
    """
    x = _np(log_q)
    p = _softmax(x)
    if kl_to_uniform(p) <= rho:
        return torch.from_numpy(p), 0.0
    lo, hi, tau = 0.0, 1.0, 1.0
    for _ in range(100):
        p = _softmax(tau * x)
        f = kl_to_uniform(p) - rho
        if abs(f) <= tol * max(rho, 1e-12):
            break
        if f > 0:
            hi = tau
        else:
            lo = tau
        mean = float(p @ x)
        slope = tau * float(p @ (x - mean) ** 2)
        step = tau - f / slope if slope > 0 else -1.0
        tau = step if lo < step < hi else 0.5 * (lo + hi)
    return torch.from_numpy(_softmax(tau * x)), 1.0 / tau - 1.0
