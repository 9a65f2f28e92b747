"""Small float64 solvers on the simplex, shared by the balancers.

All inputs are tiny (T or T x T); they run on the CPU in float64 whatever device the gradients live on.
"""

from __future__ import annotations

import torch


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v`` (T,) onto {w : w >= 0, sum w = 1} (sort-based, Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    cumsum = torch.cumsum(u, dim=0) - 1.0
    ks = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - cumsum / ks > 0).max())
    theta = cumsum[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0.0)


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
    m = gram.to(torch.float64)
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    best_cost, sol = float("inf"), None
    for i in range(t):
        for j in range(i + 1, t):
            g, cost = _min_norm_pair(float(m[i, i]), float(m[i, j]), float(m[j, j]))
            if cost < best_cost:
                best_cost = cost
                sol = torch.zeros(t, dtype=torch.float64)
                sol[i], sol[j] = g, 1.0 - g
    assert sol is not None
    if t == 2:
        return sol
    for _ in range(max_iter):
        grad = m @ sol
        k = int(torch.argmin(grad))
        g, _ = _min_norm_pair(float(sol @ grad), float(grad[k]), float(m[k, k]))
        new = g * sol
        new[k] += 1.0 - g
        if float(torch.sum(torch.abs(new - sol))) < tol:
            return new
        sol = new
    return sol
