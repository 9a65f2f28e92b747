"""MultiBalance, EMTL and CoGrad against the update rules written out here from docs/ALGORITHMS.md, in
float64 on the gradients themselves (not on the Gram matrix), step by step over many steps through the
boundary (its default, each step's own statistics), tasks absent now and then. Only MGDA's min-norm
solver is shared with the code under test (the specification prescribes that Frank-Wolfe, and
tests/test_balancing.py checks it against a grid search)."""

from __future__ import annotations

import math

import numpy as np
import torch

from concord.balancing import RepresentationBoundary, build_balancer
from concord.balancing.simplex import min_norm_weights

TASKS = ["a", "b", "c"]
EPS = 1e-12  # the rules' guard against dividing by a zero norm


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(x * y))


def _simplex(v: np.ndarray, mass: float = 1.0) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = mass} (sort-based); all zeros when mass is 0."""
    if mass <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - mass
    last = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[last] / (last + 1), 0.0)


class MultiBalance:
    """Steps 1-5 with the clarifications: an absent task keeps m_k and w_k, gets coefficient 0; the
    present weights move on the part of the simplex they hold; mbar is the present tasks' mean."""

    def __init__(self, beta=0.9, lr=0.1, lam=0.3, relax=1.0):
        self.beta, self.lr, self.lam, self.relax = beta, lr, lam, relax
        self.w0 = np.full(3, 1 / 3)
        self.w, self.m = self.w0.copy(), None

    def step(self, grads, losses):
        n = np.array([math.sqrt(_dot(g, g)) for g in grads])
        present = n > 0
        self.m = np.where(present, n, 0.0) if self.m is None else np.where(present, self.beta * self.m + (1 - self.beta) * n, self.m)
        mbar = self.m[present].mean()
        tilde = [(mbar / self.m[k]) ** self.relax * g if present[k] else 0 * g for k, g in enumerate(grads)]
        v = sum((self.w[j] + self.lam * self.w0[j]) * tilde[j] for j in range(3))
        d = np.array([_dot(t, v) / (math.sqrt(_dot(t, t)) * math.sqrt(_dot(v, v)) + EPS) for t in tilde])
        mass = self.w[present].sum()
        self.w[present] = _simplex(self.w[present] - self.lr * d[present], mass)
        return sum(self.w[k] * tilde[k] for k in range(3) if present[k])


class EMTL:
    """Steps 1-5 with the smoothed relative rates (clarification 5); an absent task keeps its rate,
    gets the neutral reward 1 and coefficient 0."""

    def __init__(self, beta=0.5, eta=0.01, rate_beta=0.9):
        self.beta, self.eta, self.rate_beta = beta, eta, rate_beta
        self.p, self.rates, self.rho = np.full(3, 1 / 3), None, 0.5 * math.log(3)

    def _bandit(self, log_q):
        def at(lam):
            x = log_q / (1 + lam)
            e = np.exp(x - x.max())
            return e / e.sum()

        def kl(p):
            return float(np.sum(p * np.log(p * 3)))

        if kl(at(0.0)) <= self.rho:
            return at(0.0)
        low, high = 0.0, 1.0
        while kl(at(high)) > self.rho:
            high *= 2
        for _ in range(200):
            middle = (low + high) / 2
            low, high = (middle, high) if kl(at(middle)) > self.rho else (low, middle)
        return at(high)

    def step(self, grads, losses):
        gram = np.array([[_dot(a, b) for b in grads] for a in grads])
        n = np.sqrt(np.diag(gram))
        present = n > 0
        alpha = np.zeros(3)
        alpha[present] = min_norm_weights(gram[np.ix_(present, present)])
        r = losses / (n + EPS)
        if self.rates is None:
            self.rates = np.where(present, r, 0.0)
        else:
            self.rates = np.where(present, self.rate_beta * self.rates + (1 - self.rate_beta) * r, self.rates)
        reward = np.where(present, self.rates / self.rates[present].mean(), 1.0)
        self.p = self._bandit(np.log(self.p) + self.eta * reward)
        w = np.where(present, self.beta * alpha + (1 - self.beta) * self.p, 0.0)
        return sum(w[k] * g for k, g in enumerate(grads))


def cograd(grads, strength=0.02, gamma=(1.0, 1.0, 1.0), bounded=True, guard=False):
    """Clarification 4: A = sum_i c_i G_i (1 - clamp(f_i, -1, 1)), f_i = kappa G_i (S' - gamma_i G_i),
    kappa = strength ||P|| / ||C|| (c uniform), with the guard at most strength c_k ||G_k||^2 / <G_k, C>
    for every task whose <G_k, C> is positive; unbounded, Algorithm 1's A = P - kappa C."""
    c = [1 / 3] * 3
    plain = sum(ci * g for ci, g in zip(c, grads))
    s = sum(gj * g for gj, g in zip(gamma, grads))
    cubic = sum(ci * g * g * (s - gi * g) for ci, gi, g in zip(c, gamma, grads))
    kappa = strength * math.sqrt(_dot(plain, plain)) / math.sqrt(_dot(cubic, cubic))
    if guard:
        costs = [_dot(g, cubic) for g in grads]
        kappa = min([kappa] + [strength * ci * _dot(g, g) / cost for ci, g, cost in zip(c, grads, costs) if cost > 0])
    if not bounded:
        return plain - kappa * cubic
    return sum(ci * g * (1 - np.clip(kappa * g * (s - gi * g), -1, 1)) for ci, gi, g in zip(c, gamma, grads))


def _steps(seed, count, absent_every=0):
    """Task gradients 30x apart in scale, two of them correlated, with losses of their own; task c
    absent (zero gradient) every ``absent_every``-th step."""
    rng = np.random.default_rng(seed)
    for t in range(count):
        grads = [rng.standard_normal((16, 6)) * s * (1 + 0.5 * math.sin(t + k)) for k, s in enumerate((1.0, 30.0, 0.2))]
        grads[1] = grads[1] + 15.0 * grads[0]
        if absent_every and t % absent_every == 2:
            grads[2] = np.zeros_like(grads[2])
        yield grads, np.array([0.7, 3.0, 0.2]) * (1 + 0.3 * rng.random(3))


def _through_boundary(boundary, grads, losses):
    z = torch.zeros(grads[0].shape, dtype=torch.float64, requires_grad=True)
    views = boundary(z)
    task_losses = [(v * torch.from_numpy(g)).sum() + float(loss) for v, g, loss in zip(views, grads, losses)]
    boundary.objective(torch.stack(task_losses)).backward()
    return z.grad.numpy()


def _compare(method, reference, absent_every=0, **knobs):
    boundary = RepresentationBoundary(build_balancer(method, TASKS, **knobs))
    for t, (grads, losses) in enumerate(_steps(11, 60, absent_every)):
        want = reference(grads, losses)
        np.testing.assert_allclose(_through_boundary(boundary, grads, losses), want, rtol=1e-10, atol=1e-12 * np.abs(want).max(), err_msg=f"step {t}")


def test_multibalance_is_the_specified_rule_step_by_step():
    _compare("multibalance", MultiBalance().step)
    _compare("multibalance", MultiBalance().step, absent_every=4)
    _compare("multibalance", MultiBalance(relax=0.5, lr=0.3).step, absent_every=4, relax=0.5, lr=0.3)


def test_emtl_is_the_specified_rule_step_by_step():
    _compare("emtl", EMTL().step)
    _compare("emtl", EMTL().step, absent_every=3)
    _compare("emtl", EMTL(beta=0.0, eta=0.5).step, absent_every=3, beta=0.0, eta=0.5)


def test_cograd_is_the_specified_rule_step_by_step():
    _compare("cograd", lambda grads, losses: cograd(grads))
    _compare("cograd", lambda grads, losses: cograd(grads, 0.3, (0.5, 1.0, 2.0)), strength=0.3, gamma=[0.5, 1.0, 2.0])
    # Without the element bound: Algorithm 1's rule as written, on steps where the bound would bite.
    _compare("cograd", lambda grads, losses: cograd(grads, 0.3, (0.5, 1.0, 2.0), bounded=False), strength=0.3,
             gamma=[0.5, 1.0, 2.0], bounded=False)
    bites = [np.abs(cograd(g, 0.3, (0.5, 1.0, 2.0)) - cograd(g, 0.3, (0.5, 1.0, 2.0), bounded=False)).max() for g, _ in _steps(11, 60)]
    assert min(bites) > 0  # the two rules differ on every step compared
    # With the per-task guard, on steps where it binds (these tasks' scales are 150x apart).
    _compare("cograd", lambda grads, losses: cograd(grads, guard=True), guard=True)
    binds = [np.abs(cograd(g, guard=True) - cograd(g)).max() for g, _ in _steps(11, 60)]
    assert min(binds) > 0  # the guard binds on every step compared
