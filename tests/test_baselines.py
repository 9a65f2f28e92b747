"""Baselines (ALGORITHMS.md, "Baselines"): each checked against a direct implementation of its rule
on small hand-made gradients, written here on the vectors themselves rather than on the Gram matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from concord.balancing import RepresentationBoundary, build_balancer
from mtl_helpers import ToyMTL, stats_for, toy_batch

TASKS = ["a", "b", "c"]


def rand_grads(seed: int, scales=(1.0, 2.0, 0.5), rows: int = 6, dim: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) * s for s in scales]


def conflicting_pair():
    g1 = torch.tensor([[1.0, 0.0, 1.0], [0.5, 1.0, 0.0]], dtype=torch.float64)
    g2 = torch.tensor([[-1.0, 0.5, 0.0], [-0.5, 0.0, 1.0]], dtype=torch.float64)
    assert float((g1 * g2).sum()) < 0
    return [g1, g2]


def dot(a, b):
    return float((a * b).sum())


# --- MGDA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_two_tasks_equals_the_closed_form(normalization):
    g1, g2 = conflicting_pair()
    losses = [0.7, 2.0]
    div = {
        "none": [1.0, 1.0],
        "l2": [g1.norm().item(), g2.norm().item()],
        "loss": losses,
        "loss+": [losses[0] * g1.norm().item(), losses[1] * g2.norm().item()],
    }[normalization]
    v1, v2 = g1 / div[0], g2 / div[1]  # what the solver sees
    c1 = min(max((dot(v2, v2) - dot(v1, v2)) / (dot(v1, v1) + dot(v2, v2) - 2 * dot(v1, v2)), 0.0), 1.0)
    expected = c1 * g1 + (1 - c1) * g2  # the weights apply to the raw gradients (Clarification 1)
    got = build_balancer("mgda", ["a", "b"], normalization=normalization).aggregate([g1, g2], stats_for([g1, g2], losses))
    torch.testing.assert_close(got, expected)


def test_mgda_aggregate_is_the_min_norm_point():
    grads = rand_grads(0)
    got = build_balancer("mgda", TASKS).aggregate(grads, stats_for(grads))
    g = torch.Generator().manual_seed(1)
    for _ in range(200):  # no convex combination is shorter
        w = torch.rand(3, generator=g, dtype=torch.float64)
        w /= w.sum()
        assert got.norm() <= sum(wk * gk for wk, gk in zip(w, grads)).norm() + 1e-9


# --- PCGrad -------------------------------------------------------------------------------------------------
def test_pcgrad_removes_exactly_the_conflicting_component():
    g1, g2 = conflicting_pair()
    p1 = g1 - dot(g1, g2) / dot(g2, g2) * g2
    p2 = g2 - dot(g2, g1) / dot(g1, g1) * g1
    assert abs(dot(p1, g2)) < 1e-12 and abs(dot(p2, g1)) < 1e-12
    got = build_balancer("pcgrad", ["a", "b"]).aggregate([g1, g2], stats_for([g1, g2]))
    torch.testing.assert_close(got, (p1 + p2) / 2)


def test_pcgrad_three_tasks_matches_the_rule_in_the_same_random_order():
    grads = rand_grads(2, scales=(1.0, -1.5, 0.7))
    generator = torch.Generator().manual_seed(0)
    projected = []
    for i in range(3):
        gi = grads[i].clone()
        for j in [j for j in torch.randperm(3, generator=generator).tolist() if j != i]:
            if dot(gi, grads[j]) < 0:
                gi = gi - dot(gi, grads[j]) / dot(grads[j], grads[j]) * grads[j]
        projected.append(gi)
    got = build_balancer("pcgrad", TASKS, seed=0).aggregate(grads, stats_for(grads))
    torch.testing.assert_close(got, sum(projected) / 3)


def test_pcgrad_without_conflict_is_equal():
    base = rand_grads(3)[0].abs()
    grads = [base, base * 2, base + 0.1]
    got = build_balancer("pcgrad", TASKS).aggregate(grads, stats_for(grads))
    torch.testing.assert_close(got, sum(grads) / 3)


# --- GradVac ------------------------------------------------------------------------------------------------
def test_gradvac_matches_the_rule_over_several_steps():
    balancer = build_balancer("gradvac", TASKS, beta=0.5, seed=1)
    generator = torch.Generator().manual_seed(1)
    target = np.zeros((3, 3))
    for step in range(4):
        grads = rand_grads(10 + step, scales=(1.0, -1.0, 0.5))
        modified = []
        for i in range(3):
            gi = grads[i].clone()
            for j in [j for j in torch.randperm(3, generator=generator).tolist() if j != i]:
                phi = dot(gi, grads[j]) / (gi.norm().item() * grads[j].norm().item())
                t = target[i, j]
                if phi < t:
                    gi = gi + grads[j] * gi.norm().item() * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)) / (
                        grads[j].norm().item() * math.sqrt(1 - t**2)
                    )
                target[i, j] = 0.5 * t + 0.5 * phi
            modified.append(gi)
        got = balancer.aggregate(grads, stats_for(grads))
        torch.testing.assert_close(got, sum(modified) / 3)
    np.testing.assert_allclose(balancer.target, target)


# --- GradDrop -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_the_rule(leak):
    grads = rand_grads(4, scales=(1.0, -0.8, 0.3))
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    uniform = torch.rand(4, generator=torch.Generator().manual_seed(7)).double()
    signed = [(g * torch.sign(z)).sum(0) for g in grads]
    purity = 0.5 * (1 + sum(signed) / sum(s.abs() for s in signed))
    expected = torch.zeros_like(grads[0])
    for g in grads:
        for r in range(6):
            for c in range(4):
                keep = g[r, c] > 0 if purity[c] > uniform[c] else g[r, c] < 0
                expected[r, c] += g[r, c] if keep else leak * g[r, c]
    boundary = RepresentationBoundary(build_balancer("graddrop", TASKS, seed=7, leak=leak))
    boundary.objective(torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(boundary.balance(tuple(grads), z), expected / 3)


def test_graddrop_needs_z_and_its_reduced_column_sums():
    grads = rand_grads(0)
    with pytest.raises(ValueError, match="sign of z"):
        build_balancer("graddrop", TASKS).local_extra(grads, None)
    with pytest.raises(ValueError, match="column sums"):
        build_balancer("graddrop", TASKS).aggregate(grads, stats_for(grads))


# --- DB-MTL -------------------------------------------------------------------------------------------------
def test_dbmtl_matches_the_rule():
    balancer = build_balancer("dbmtl", TASKS, beta=0.9)
    ema = None
    for step in range(3):
        grads = rand_grads(20 + step, scales=(1.0, 30.0, 0.1))
        losses = [0.5, 40.0, 0.02]
        log_grads = [g / l for g, l in zip(grads, losses)]
        norms = np.array([g.norm().item() for g in log_grads])
        ema = norms if ema is None else 0.9 * ema + 0.1 * norms
        expected = sum((ema.max() / ema[k]) * log_grads[k] for k in range(3)) / 3
        torch.testing.assert_close(balancer.aggregate(grads, stats_for(grads, losses)), expected)


# --- IMTL-G -------------------------------------------------------------------------------------------------
def test_imtlg_gives_equal_projections_on_every_unit_gradient():
    grads = rand_grads(6, scales=(1.0, 20.0, 0.05), rows=5, dim=7)
    aggregate = build_balancer("imtlg", TASKS).aggregate(grads, stats_for(grads))
    projections = [dot(aggregate, g / g.norm()) for g in grads]
    assert max(projections) - min(projections) < 1e-6 * max(abs(p) for p in projections)
    coeffs = build_balancer("imtlg", TASKS).coefficients(stats_for(grads))
    assert abs(coeffs.sum() - 1.0) < 1e-12


# --- Uncertainty --------------------------------------------------------------------------------------------
def test_uncertainty_weights_losses_and_learns_log_variances():
    model = ToyMTL(3)
    x, y = toy_batch(16, 3)
    balancer = build_balancer("uncertainty", TASKS, init=0.3)
    boundary = RepresentationBoundary(balancer)
    assert list(boundary.parameters()) == [balancer.log_vars]
    views = boundary(model.bottom(x))
    losses = model.losses(views, y, (1.0, 5.0, 0.2))
    boundary.objective(losses).backward()
    s = balancer.log_vars.detach().double()
    torch.testing.assert_close(balancer.log_vars.grad.double(), -torch.exp(-s) * losses.detach() / 2 + 0.5)
    got = [p.grad.clone() for p in model.bottom.parameters()]
    ref = ToyMTL(3)
    ref_losses = ref.losses([ref.bottom(x)] * 3, y, (1.0, 5.0, 0.2))
    (torch.exp(-s) * ref_losses / 2).sum().backward()
    for g, p in zip(got, ref.bottom.parameters()):
        torch.testing.assert_close(g, p.grad)


# --- common properties --------------------------------------------------------------------------------------
BASELINES = ["mgda", "uncertainty", "pcgrad", "gradvac", "graddrop", "dbmtl", "imtlg"]


@pytest.mark.parametrize("name", BASELINES)
def test_state_round_trips_exactly(name):
    import io

    first, second = build_balancer(name, TASKS), build_balancer(name, TASKS)
    z = torch.randn(6, 4, dtype=torch.float64)

    def step(balancer, grads):
        boundary = RepresentationBoundary(balancer)
        boundary.objective(torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64))
        return boundary.balance(tuple(grads), z)

    for k in range(3):
        step(first, rand_grads(30 + k))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second.load_state_dict(torch.load(buf, weights_only=True))
    for k in range(3):
        grads = rand_grads(40 + k)
        assert torch.equal(step(first, grads), step(second, grads))


@pytest.mark.parametrize("name", BASELINES)
def test_zero_and_non_finite_tasks_give_finite_results(name):
    grads = rand_grads(50)
    grads[1] = torch.zeros_like(grads[1])
    grads[2] = grads[2].clone()
    grads[2][0, 0] = float("inf")
    boundary = RepresentationBoundary(build_balancer(name, TASKS))
    boundary.objective(torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64))
    out = boundary.balance(tuple(grads), torch.randn(6, 4, dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert list(boundary.last_stats.active) == [True, False, False]


# --- parameter level ----------------------------------------------------------------------------------------
def test_param_mgda_weights_are_the_min_norm_of_parameter_gradients_and_drive_one_backward():
    from concord.balancing.param_level import build_parameter_level

    model = ToyMTL(3)
    x, y = toy_batch(16, 3)
    scales = (1.0, 10.0, 0.1)
    boundary = RepresentationBoundary(build_balancer("equal", TASKS), reduction="sum")
    pl = build_parameter_level("param_mgda", TASKS, list(model.bottom.parameters()))
    losses = model.losses(boundary(model.bottom(x)), y, scales)
    with boundary.passthrough():
        objective = pl.objective(losses)
    boundary.objective(losses)
    model.zero_grad()
    objective.backward()
    got = [p.grad.clone() for p in model.bottom.parameters()]
    c = np.array(pl.last_telemetry["weights"])
    # Direct: per-task parameter gradients of a fresh copy, their min-norm point, one weighted backward.
    ref = ToyMTL(3)
    ref_losses = ref.losses([ref.bottom(x)] * 3, y, scales)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_losses[k], list(ref.bottom.parameters()), retain_graph=True)]) for k in range(3)]
    flat = torch.stack(rows)
    best = min(
        (float(((w[:, None] * flat).sum(0)).norm()), tuple(w.tolist()))
        for w in [torch.tensor(p, dtype=torch.float64) for p in _simplex_points(0.01)]
    )
    assert float((torch.tensor(c)[:, None] * flat).sum(0).norm()) <= best[0] + 1e-9
    (torch.tensor(c) * ref_losses).sum().backward()
    for g, p in zip(got, ref.bottom.parameters()):
        torch.testing.assert_close(g, p.grad)


def _simplex_points(step):
    n = int(round(1 / step))
    return [(i * step, j * step, 1 - (i + j) * step) for i in range(n + 1) for j in range(n + 1 - i)]


def test_param_moco_matches_the_rule_over_several_steps():
    from concord.balancing.param_level import build_parameter_level

    model = ToyMTL(3)
    params = list(model.bottom.parameters())
    pl = build_parameter_level("param_moco", TASKS, params, beta=0.5, gamma=0.1, rho=0.0)
    y_track, lam = None, np.full(3, 1 / 3)
    for t in range(1, 4):
        x, y = toy_batch(16, 3, seed=t)
        losses = model.losses([model.bottom(x)] * 3, y, (1.0, 4.0, 0.5))
        flat = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[k], params, retain_graph=True)]) for k in range(3)])
        target = losses.detach()[:, None] * flat / flat.norm(dim=1, keepdim=True)
        y_track = torch.zeros_like(flat) if y_track is None else y_track
        y_track = y_track - 0.5 / math.sqrt(t) * (y_track - target)
        step = lam - 0.1 / math.sqrt(t) * (y_track @ y_track.T).numpy() @ lam
        lam = np.exp(step - step.max()) / np.exp(step - step.max()).sum()
        pl.objective(losses)
        np.testing.assert_allclose(pl.lam, lam, rtol=1e-10)


# --- Clarifications of docs/ALGORITHMS.md ---------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_emtl_with_beta_one_is_mgda_bit_for_bit(normalization):
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(16, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 30.0, 0.2)]
    stats = stats_for(grads, [0.7, 2.0, 0.1])
    emtl = build_balancer("emtl", ["a", "b", "c"], beta=1.0, mgda_norm=normalization)
    mgda = build_balancer("mgda", ["a", "b", "c"], normalization=normalization)
    assert emtl.coefficients(stats).tolist() == mgda.coefficients(stats).tolist()
    assert torch.equal(emtl.aggregate(grads, stats), mgda.aggregate(grads, stats))


def _with_absent(grads, absent):
    return [torch.zeros_like(x) if k == absent else x for k, x in enumerate(grads)]


def test_multibalance_freezes_an_absent_tasks_state_and_gives_it_no_coefficient():
    g = torch.Generator().manual_seed(6)
    steps = [[torch.randn(8, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 5.0, 0.5)] for _ in range(6)]
    mb = build_balancer("multibalance", ["a", "b", "c"])
    for grads in steps[:5]:
        mb.coefficients(stats_for(grads))
    before_m, before_w = mb.ema_norms.copy(), mb.weights.copy()
    c = mb.coefficients(stats_for(_with_absent(steps[5], 1)))
    assert c[1] == 0.0 and mb.last_telemetry["weights"][1] == 0.0
    assert mb.ema_norms[1] == before_m[1] and mb.weights[1] == before_w[1]
    assert mb.ema_norms[0] != before_m[0]  # the present tasks moved on
    assert abs(mb.weights.sum() - 1.0) < 1e-12


def test_emtl_gives_an_absent_task_the_neutral_reward():
    """Every task learns at the same relative rate, so the bandit stays uniform; a task absent one step
    in three must stay there too (absence neither rewards nor punishes it)."""
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    losses = [float(x.norm()) for x in base]  # relative rate L_k / n_k = 1 for every task
    emtl = build_balancer("emtl", ["a", "b", "c"], eta=0.5)
    for step in range(60):
        grads = _with_absent(base, 2) if step % 3 == 0 else base
        emtl.coefficients(stats_for(grads, losses))
    np.testing.assert_allclose(emtl.bandit, [1 / 3] * 3, rtol=1e-9)  # reward 0 for absence sank c to 0.11


def test_emtl_moves_gradually_at_its_defaults():
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    emtl = build_balancer("emtl", ["a", "b"])
    multipliers = []
    for _ in range(100):  # one task's relative rate 4x the other's, every step
        emtl.coefficients(stats_for(grads, [4.0 * float(grads[0].norm()), float(grads[1].norm())]))
        multipliers.append(emtl.last_telemetry["kl_multiplier"])
    assert max(multipliers) == 0.0  # the KL ball's boundary is not reached in 100 steps
    assert emtl.bandit[0] > 0.55  # but the bandit does move towards the slower-learning task


@pytest.mark.parametrize("case", ["opposite", "identical"])
def test_gradvac_survives_exactly_opposite_and_identical_gradients(case):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    grads = [x, -x] if case == "opposite" else [x, x.clone()]
    gv = build_balancer("gradvac", ["a", "b"], beta=1.0 if case == "identical" else 0.5)
    for _ in range(50):  # identical long enough for the target to reach 1
        out = gv.aggregate(grads, stats_for(grads))
        assert torch.isfinite(out).all()
    assert np.isfinite(gv.target).all()


def test_multibalance_relax_zero_keeps_the_raw_magnitudes():
    g = torch.Generator().manual_seed(10)
    grads = [torch.randn(8, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 100.0)]
    mb = build_balancer("multibalance", ["a", "b"], relax=0.0)
    c = mb.coefficients(stats_for(grads))
    np.testing.assert_array_equal(c, mb.weights)  # no rescaling: the coefficients are the weights
    full = build_balancer("multibalance", ["a", "b"]).coefficients(stats_for(grads))
    assert full[0] / full[1] > 10  # full rescaling lifts the small task's gradient
