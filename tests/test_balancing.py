"""The properties of ALGORITHMS.md ("Properties every implementation must pass"), single process.

Property 6 (2 ranks = 1 rank on the concatenated batch) is in test_balancing_distributed.py.
"""

from __future__ import annotations

import io
import logging
import math
import time

import numpy as np
import pytest
import torch

from concord.balancing import (
    Balancer,
    NonFiniteLossError,
    RepresentationBoundary,
    available_balancers,
    balancer_class,
    build_balancer,
)
from concord.balancing.base import weighted_sum
from concord.balancing import views as views_module
from concord.balancing.compiled_steps import NativeClock
from concord.balancing.collectives import PendingStatistics
from concord.balancing.statistics import StepStats, device_statistics, finite_flags, local_statistics
from concord.balancing.simplex import kl_to_uniform, min_norm_weights, project_to_simplex
from mtl_helpers import ToyMTL, stats_for, toy_batch

TASKS = ["a", "b", "c"]
METHODS = ["equal", "fixed", "multibalance", "emtl", "cograd"]
COGRAD_STRENGTH = 0.02  # CoGrad's default strength, which the tests building it without one rely on


def run_boundary(model, balancer, x, y, scales=(1.0, 1.0, 1.0), reduction="mean"):
    boundary = RepresentationBoundary(balancer, reduction)
    model.zero_grad()
    views = boundary(model.bottom(x))
    boundary.objective(model.losses(views, y, scales)).backward()
    return boundary


def balance(balancer, grads, losses=(1.0, 1.0, 1.0)):
    """What the boundary does in backward with these per-task gradients."""
    boundary = RepresentationBoundary(balancer)
    boundary.objective(torch.tensor(losses, dtype=torch.float64))
    return boundary.balance(tuple(grads))


def simplex_grid(step: float = 1e-3) -> np.ndarray:
    """Every point of the 3-simplex on a grid of the given step, (N, 3)."""
    n = int(round(1 / step))
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    w1, w2 = i[keep] * step, j[keep] * step
    return np.stack([w1, w2, 1.0 - w1 - w2], axis=1)


def test_registry_has_the_three_methods_and_baselines():
    assert set(METHODS) <= set(available_balancers())
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        build_balancer("nope", TASKS)
    with pytest.raises(ValueError, match="has no knob 'betta'"):
        build_balancer("multibalance", TASKS, betta=0.5)


# --- Property 1: equal = gradient of the mean task loss; fixed = of the weighted sum -------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equal_gives_the_gradient_of_the_mean_task_loss(reduction):
    x, y = toy_batch(32, 3)
    model = ToyMTL(3)
    run_boundary(model, build_balancer("equal", TASKS), x, y, scales=(1.0, 5.0, 0.2), reduction=reduction)
    got_bottom = [p.grad.clone() for p in model.bottom.parameters()]
    got_heads = [[p.grad.clone() for p in h.parameters()] for h in model.heads]

    ref = ToyMTL(3)
    ref.zero_grad()
    z = ref.bottom(x)
    losses = ref.losses([z] * 3, y, (1.0, 5.0, 0.2))
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    for g, p in zip(got_bottom, ref.bottom.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
    # Each head receives its own raw task gradient, dL_k/dtheta_k (ALGORITHMS.md, notation).
    for k, head in enumerate(ref.heads):
        ref.zero_grad()
        ref.losses([ref.bottom(x)] * 3, y, (1.0, 5.0, 0.2))[k].backward()
        for g, p in zip(got_heads[k], head.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


def test_fixed_gives_the_gradient_of_the_weighted_sum():
    x, y = toy_batch(32, 3)
    model = ToyMTL(3)
    run_boundary(model, build_balancer("fixed", TASKS, weights=[2.0, 1.0, 1.0]), x, y)
    ref = ToyMTL(3)
    ref.zero_grad()
    losses = ref.losses([ref.bottom(x)] * 3, y, (1.0, 1.0, 1.0))
    (0.5 * losses[0] + 0.25 * losses[1] + 0.25 * losses[2]).backward()
    for p, q in zip(model.bottom.parameters(), ref.bottom.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_views_share_storage_with_z():
    z = torch.randn(4, 3, requires_grad=True)
    views = RepresentationBoundary(build_balancer("equal", TASKS))(z)
    assert len(views) == 3 and all(v.data_ptr() == z.data_ptr() for v in views)


def test_a_representation_of_several_items_a_row_is_refused_with_the_reshape_that_fits():
    boundary = RepresentationBoundary(build_balancer("equal", TASKS))
    z = torch.randn(4, 5, 3, requires_grad=True)  # 4 requests of 5 candidates each
    with pytest.raises(ValueError, match=r"got shape \(4, 5, 3\); rows of several items each: z.flatten\(0, -2\)"):
        boundary(z)
    views = boundary(z.flatten(0, -2))
    boundary.objective(torch.stack([v.sum() for v in views])).backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # the mean of three sums: each element once


# --- Property 2: simplex, and no NaN on zero or non-finite gradients ------------------------------
@pytest.mark.parametrize("name", ["equal", "multibalance", "emtl"])
def test_weights_stay_on_the_simplex(name):
    balancer = build_balancer(name, TASKS)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        grads = [torch.randn(16, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 10.0, 0.1)]
        coeffs = balancer.coefficients(stats_for(grads, [0.5, 3.0, 0.01]))
        w = np.array(balancer.last_telemetry["weights"])
        assert (w >= -1e-12).all() and abs(w.sum() - 1.0) < 1e-9, (step, w)
        assert np.isfinite(coeffs).all()


@pytest.mark.parametrize("name", METHODS)
def test_a_task_with_zero_gradient_gives_no_nan(name, caplog):
    balancer = build_balancer(name, TASKS)
    grads = [torch.randn(8, 4, dtype=torch.float64), torch.zeros(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)]
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        for _ in range(3):
            out = balance(balancer, grads)
    assert torch.isfinite(out).all()
    assert "task 'b'" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("name", METHODS)
def test_a_non_finite_task_gradient_is_skipped_with_a_warning(name, caplog):
    g = torch.Generator().manual_seed(3)
    good = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    bad = [good[0], good[1].clone(), good[2]]
    bad[1][2, 1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        out = balance(build_balancer(name, TASKS), bad)
    assert torch.isfinite(out).all()
    assert "task 'b'" in caplog.text
    # Skipping means: exactly what the method gives when task b has no gradient at all.
    zero = [good[0], torch.zeros_like(good[1]), good[2]]
    torch.testing.assert_close(out, balance(build_balancer(name, TASKS), zero))


class _Spy(Balancer):
    """Records what the boundary hands to prepare() and aggregate()."""

    def __init__(self, task_names):
        super().__init__(task_names)
        self.live, self.early = [], []

    def prepare(self, grads, z, live):
        self.live.append(live.tolist())
        return "prepared"

    def aggregate(self, grads, stats, z=None, early=None):
        self.early.append(early)
        return torch.zeros_like(next(g for g in grads if g is not None))


def test_early_work_is_used_only_when_the_guess_of_active_tasks_holds():
    g = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    cases = {  # gradients -> (this rank's guess, the prepared work reaches aggregate)
        "all fine": (g, [True, True, True], "prepared"),
        "no loss for b": ([g[0], None, g[2]], [True, False, True], "prepared"),
        "NaN in b": ([g[0], g[1] * float("nan"), g[2]], [True, False, True], "prepared"),
        # A zero gradient is usable as far as one rank can tell; globally it is inactive.
        "zero for b": ([g[0], torch.zeros_like(g[1]), g[2]], [True, True, True], None),
    }
    for case, (grads, live, early) in cases.items():
        spy = _Spy(TASKS)
        balance(spy, grads)
        assert (spy.live, spy.early) == ([live], [early]), case


@pytest.mark.parametrize("name", available_balancers())
def test_the_boundary_with_early_work_equals_the_rule_applied_after_the_reduction(name):
    through_boundary, direct = build_balancer(name, TASKS), build_balancer(name, TASKS)
    for step in range(3):
        grads = [torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + k), dtype=torch.float64) * s
                 for k, s in enumerate((1.0, -3.0, 0.2))]
        z = torch.randn(6, 4, generator=torch.Generator().manual_seed(99 + step), dtype=torch.float64)
        boundary = RepresentationBoundary(through_boundary)
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        got = boundary.balance(tuple(grads), z)
        packed = local_statistics(grads, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 6, direct.local_extra(grads, z))
        expected = direct.aggregate(grads, PendingStatistics(packed, 3, 6).wait(), z)
        direct.step += 1
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cross_terms", [True, False])
def test_a_diagonal_computed_on_the_way_packs_as_the_dot_products_do(cross_terms):
    """A balancer that found ``||G_k||^2`` in its own pass (CoGrad) hands them over; the packed
    statistics are those of the boundary's own dot products, an absent task included."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) * s for s in (1.0, -3.0)] + [None]
    grads[1][2, 1] = float("nan")  # its squared norm says so, as the dot product would
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    seen = torch.stack([(grads[0] ** 2).sum(), (grads[1] ** 2).sum()])
    expected = local_statistics(grads, losses, 6, None, cross_terms)
    torch.testing.assert_close(local_statistics(grads, losses, 6, None, cross_terms, seen), expected, equal_nan=True)
    on_device, _ = device_statistics(grads, losses, 6, None, cross_terms, seen)
    torch.testing.assert_close(on_device, expected, equal_nan=True)
    with pytest.raises(ValueError, match="squared_norms has 3 entries for 2 present gradients"):
        local_statistics(grads, losses, 6, None, cross_terms, torch.ones(3, dtype=torch.float64))


def test_cograd_finds_the_gram_diagonal_in_its_own_pass():
    """CoGrad's pass over the gradients gives the statistics their norms (no dot products of the
    boundary's own), and they are the norms: a non-finite gradient still leaves its task out."""
    g = torch.Generator().manual_seed(6)
    grads = tuple(torch.randn(8, 5, generator=g, dtype=torch.float64) * s for s in (1.0, -3.0, 0.2))
    balancer = build_balancer("cograd", TASKS)
    boundary = RepresentationBoundary(balancer)
    boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    boundary.balance(grads, None)
    norms = [float(x.norm()) for x in grads]
    np.testing.assert_allclose(boundary.last_stats.norms, norms, rtol=1e-12)
    assert balancer.squared_norms_seen is None  # taken by the statistics
    bad = (grads[0], grads[1].clone(), grads[2])
    bad[1][0, 0] = float("inf")
    boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    got = boundary.balance(bad, None)
    assert list(boundary.last_stats.active) == [True, False, True]
    torch.testing.assert_close(got, (grads[0] + grads[2]) / 3)  # uncorrected: a task left out on this step


def test_norm_only_methods_skip_the_cross_products_except_when_telemetry_is_logged():
    """Methods whose rule reads only the Gram's diagonal give the same aggregate without its
    off-diagonal products; those come back (for the logged cosines) on telemetry steps."""
    norm_only = [n for n in available_balancers() if not balancer_class(n).needs_cross_terms]
    assert {"equal", "fixed", "cograd", "graddrop", "dbmtl", "uncertainty"} <= set(norm_only)
    for name in available_balancers():
        lean, full = RepresentationBoundary(build_balancer(name, TASKS), telemetry_every=3), RepresentationBoundary(build_balancer(name, TASKS))
        for step in range(1, 5):
            grads = [torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + k), dtype=torch.float64) * s
                     for k, s in enumerate((1.0, -3.0, 0.2))]
            z = torch.randn(6, 4, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            results = []
            for boundary in (lean, full):
                boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
                results.append(boundary.balance(tuple(grads), z))
            torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-15)
            logged = step % 3 == 0
            assert lean.last_stats.cross_terms == (logged or name not in norm_only), (name, step)
            assert ("cosine" in lean.telemetry()) == lean.last_stats.cross_terms
            assert full.last_stats.cross_terms and "cosine" in full.telemetry()
            if not lean.last_stats.cross_terms:
                np.testing.assert_array_equal(lean.last_stats.gram, np.diag(np.diagonal(full.last_stats.gram)))


def _step_with_nan_loss(policy: str):
    """One step whose task-b loss is NaN; returns the boundary and the bottom's gradients."""
    torch.manual_seed(0)
    model = ToyMTL(3)
    x, y = toy_batch(16, 3)
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS), on_nonfinite_loss=policy)
    losses = model.losses(boundary(model.bottom(x)), y, (1.0, 1.0, 1.0))
    losses = losses * torch.tensor([1.0, float("nan"), 1.0], dtype=losses.dtype)
    error = None
    try:
        boundary.objective(losses).backward()
    except NonFiniteLossError as caught:
        error = caught
    return boundary, [p.grad for p in model.bottom.parameters()], error


def test_a_nan_loss_drops_the_task_or_skips_the_step_or_raises():
    dropped, grads, _ = _step_with_nan_loss("drop_task")
    assert dropped.skipped_tasks == [] and dropped.balancer.step == 1
    assert list(dropped.last_stats.active) == [True, False, True]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    skipped, grads, _ = _step_with_nan_loss("skip_step")
    assert skipped.skipped_tasks == ["b"] and skipped.balancer.step == 0
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # nothing below z moves

    raised, grads, error = _step_with_nan_loss("raise")
    assert isinstance(error, NonFiniteLossError) and error.tasks == ["b"]
    assert all(g is None for g in grads) and raised.balancer.step == 0

    with pytest.raises(ValueError, match="on_nonfinite_loss must be one of"):
        RepresentationBoundary(build_balancer("equal", TASKS), on_nonfinite_loss="ignore")


def test_warnings_are_rate_limited(caplog):
    balancer = build_balancer("equal", TASKS)
    grads = [torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2, 2)]
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        for _ in range(100):
            balance(balancer, grads)
    assert 0 < caplog.text.count("task 'b'") <= 8  # occurrences 1, 2, 4, ..., 64


def test_a_head_without_loss_gives_zero_gradient_not_a_crash():
    model = ToyMTL(3)
    x, y = toy_batch(16, 3)
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS))
    views = boundary(model.bottom(x))
    losses = model.losses(views[:2], y, (1.0, 1.0))  # head c has no loss this step
    objective = boundary.objective(torch.cat([losses, torch.zeros(1, dtype=losses.dtype)]))
    objective.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.bottom.parameters())
    assert not bool(boundary.last_stats.active[2])


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("statistics", ["current", "previous"])
@pytest.mark.parametrize("name", available_balancers())
def test_a_step_without_rows_changes_nothing(name, statistics, on_host, monkeypatch):
    """A batch of no rows (a user's uneven last batch) gives NaN mean losses, yet nothing fails, z
    gets an empty gradient, and the rule goes on as if the step had not been: five steps with an
    empty one in the middle leave the state that four steps leave (with lagged statistics the empty
    step's rule reads the step before's sum, and the next step's reads the empty sum, which moves
    nothing), and the last gradient is the same; on a CPU and on a GPU's path (no host reads)."""

    if statistics == "previous" and name == "graddrop":
        pytest.skip("GradDrop needs each step's own statistics")
    monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: on_host)

    def train(rows: list):
        model = ToyMTL(3)
        boundary = RepresentationBoundary(build_balancer(name, TASKS), statistics=statistics)
        for n in rows:  # the same batch every step, and no optimizer: every step's gradients alike
            x, y = toy_batch(n, 3, seed=1)
            z = model.bottom(x)
            z.retain_grad()
            boundary.objective(model.losses(boundary(z), y, (1.0, 30.0, 0.3))).backward()
            assert z.grad.shape == (n, 5)
        return {k: v for k, v in boundary.balancer.state_dict().items() if k != "step"}, z.grad

    with_empty, last = train([16, 16, 16, 0, 16])
    without, expected = train([16, 16, 16, 16])
    assert with_empty.keys() == without.keys()
    for key in without:
        torch.testing.assert_close(with_empty[key], without[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(last, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method, statistics, every, autograd_sums", [
    ("multibalance", "current", 1, False), ("multibalance", "previous", 1, False), ("multibalance", "previous", 3, False),
    ("emtl", "previous", 3, False), ("cograd", "previous", 3, False), ("equal", "previous", 1, True)])
def test_activation_checkpointing_around_the_boundary_trains_alike(method, statistics, every, autograd_sums, reentrant):
    """The bottom, the boundary and the heads in one ``torch.utils.checkpoint`` region: its forward
    runs again inside backward (non-reentrant: to recompute saved tensors, the first forward's node
    balancing; reentrant: the first forward without grad, backward through the rerun). Training is
    bit for bit what it is without checkpointing: the rerun neither balances twice nor moves the
    boundary's state."""
    from torch.utils.checkpoint import checkpoint

    def train(checkpointed: bool) -> torch.Tensor:
        model = ToyMTL(3)
        boundary = RepresentationBoundary(build_balancer(method, TASKS), statistics=statistics, statistics_every=every,
                                          autograd_sums=autograd_sums)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def losses(x, y):
            return model.losses(boundary(model.bottom(x)), y, (1.0, 30.0, 0.3))

        for t in range(8):
            x, y = toy_batch(16, 3, seed=t)
            optimizer.zero_grad()
            step = checkpoint(losses, x.requires_grad_(reentrant), y, use_reentrant=reentrant) if checkpointed else losses(x, y)
            boundary.objective(step).backward()
            optimizer.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    plain = train(False)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(train(True), plain, rtol=0, atol=0)


@pytest.mark.parametrize("method, statistics, every", [("multibalance", "previous", 3), ("cograd", "current", 1)])
def test_a_model_under_torch_compile_trains_as_in_eager_with_the_boundary_run_eagerly(method, statistics, every):
    """A user's ranking model under ``torch.compile``: the bottom and heads compile, the boundary
    between them runs eagerly. Traced, the numbers of a lagged rule run in forward (MultiBalance's
    weights) would be constants of a new graph at every sum, recompiling until Dynamo's limit; here the
    graphs are built by the first step and training matches the eager model's (CoGrad's rule, run in
    backward, too)."""
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.toy = ToyMTL(3)
            self.boundary = RepresentationBoundary(build_balancer(method, TASKS), statistics=statistics, statistics_every=every)

        def forward(self, x, y):
            return self.boundary.objective(self.toy.losses(self.boundary(self.toy.bottom(x)), y, (1.0, 30.0, 0.3)))

    counters = torch._dynamo.utils.counters
    trained = []
    for compiled in (False, True):
        model = Model()
        step = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for t in range(8):
            optimizer.zero_grad()
            step(*toy_batch(16, 3, seed=t)).backward()
            optimizer.step()
            if t == 0:
                graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the first step"
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-12, atol=1e-12)


def test_an_element_wise_rule_is_compiled_in_the_forward_of_a_mixed_precision_model_never_in_its_backward():
    """Under autocast (bf16: CoGrad's and GradDrop's compiled rules, not the CPU's float passes) the
    forward warms the rules up as backward will run them, outside autocast (always so on a GPU, whose
    backward runs on a thread of its own): no compile stalls a backward, whose gradients the forward's
    autocast state would not have matched. GradDrop's one rule compiles in a second; CoGrad's seven
    (lagged) took 19 s with Inductor's cache cold, and the warm-up is the boundary's, the same for both."""
    torch.manual_seed(0)
    bottom, heads = torch.nn.Linear(64, 128), torch.nn.ModuleList(torch.nn.Linear(128, 1) for _ in TASKS)
    boundary = RepresentationBoundary(build_balancer("graddrop", TASKS), statistics="current", telemetry_every=1)
    for t in range(3):
        x, y = torch.randn(512, 64), torch.randn(512, len(TASKS))  # (512, 128): a rule large enough to compile
        with torch.autocast("cpu", dtype=torch.bfloat16):
            views = boundary(bottom(x))
            assert views[0].dtype == torch.bfloat16
            losses = torch.stack([((head(v).squeeze(1).float() - y[:, k]) ** 2).mean() for k, (head, v) in enumerate(zip(heads, views))])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        boundary.objective(losses).backward()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, f"compiled in step {t}'s backward"
        assert torch.isfinite(bottom.weight.grad).all()


@pytest.mark.parametrize("statistics", ["current", "previous"])
def test_two_boundaries_read_by_every_head_each_balance_their_own_representation(statistics):
    """Two shared representations (a user tower and an item tower), each through a boundary of its own
    and both read by every head: ``objective(losses)`` is called on each and one of them backwarded.
    Each boundary then hands its tower ``sum_k c_k dL_k/dz`` with its own balancer's weights, and the
    heads get their raw task gradients once (backwarding both objectives would double them)."""
    torch.manual_seed(0)
    users, items = torch.nn.Linear(6, 5).double(), torch.nn.Linear(6, 4).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(9, 1).double() for _ in TASKS])
    x, y = toy_batch(16, 3, seed=2)
    weights = {"users": np.array([0.2, 0.5, 0.3]), "items": np.array([0.6, 0.1, 0.3])}

    def losses(user_views, item_views):
        return torch.stack([((h(torch.cat([u, i], 1)).squeeze(-1) - y[:, k]) ** 2).mean()
                            for k, (h, u, i) in enumerate(zip(heads, user_views, item_views))])

    user_boundary = RepresentationBoundary(build_balancer("fixed", TASKS, weights=weights["users"].tolist()), statistics=statistics)
    item_boundary = RepresentationBoundary(build_balancer("fixed", TASKS, weights=weights["items"].tolist()), statistics=statistics)
    for _ in range(3):
        z_user, z_item = users(x), items(x)
        z_user.retain_grad(), z_item.retain_grad()
        step_losses = losses(user_boundary(z_user), item_boundary(z_item))
        objective = user_boundary.objective(step_losses)
        item_boundary.objective(step_losses)  # records its losses; its scalar is the same sum
        objective.backward()
        got = [z_user.grad, z_item.grad, *(p.grad.clone() for p in heads.parameters())]
        for p in heads.parameters():
            p.grad = None

        z_user, z_item = users(x), items(x)
        plain = losses([z_user] * 3, [z_item] * 3)
        per_task = [torch.autograd.grad(plain[k], (z_user, z_item), retain_graph=True) for k in range(3)]
        expected = [sum(c * g[0] for c, g in zip(weights["users"], per_task)), sum(c * g[1] for c, g in zip(weights["items"], per_task)),
                    *torch.autograd.grad(plain.sum(), list(heads.parameters()))]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_objective_must_be_called_before_backward():
    model = ToyMTL(3)
    x, y = toy_batch(4, 3)
    views = RepresentationBoundary(build_balancer("equal", TASKS))(model.bottom(x))
    with pytest.raises(RuntimeError, match="objective"):
        model.losses(views, y, (1.0, 1.0, 1.0)).sum().backward()


# --- simplex helpers, against brute force -----------------------------------------------------------
def test_projection_onto_the_simplex_is_the_nearest_point():
    grid = simplex_grid(2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(3, generator=g, dtype=torch.float64).numpy()
        p = project_to_simplex(v)
        best = grid[np.argmin(((grid - v) ** 2).sum(1))]
        assert np.abs(p - best).max() < 2e-3
        assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all()


def test_min_norm_for_three_tasks_matches_a_grid_search():
    grid = simplex_grid(1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        vecs = torch.randn(3, 7, generator=g, dtype=torch.float64).numpy()
        m = vecs @ vecs.T
        c = min_norm_weights(m)
        brute = np.einsum("ni,ij,nj->n", grid, m, grid).min()
        assert float(c @ m @ c) <= brute + 1e-6


# --- Property 3: MultiBalance -------------------------------------------------------------------------
def conflicting_gradients(scale_c: float = 1.0):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64)
    b = -0.6 * a + 0.8 * torch.randn(64, 8, generator=g, dtype=torch.float64)  # conflicts with a
    c = torch.randn(64, 8, generator=g, dtype=torch.float64) * scale_c
    return [a, b, c]


def test_multibalance_converges_to_the_min_norm_point_with_prior_on_fixed_gradients():
    grads = conflicting_gradients()
    stats = stats_for(grads)
    mb = build_balancer("multibalance", TASKS)
    history = []
    for _ in range(600):
        mb.coefficients(stats)
        history.append(mb.weights.copy())
    w_end, w_prev, w_prev2 = history[-1], history[-2], history[-3]
    assert np.abs(w_end - w_prev).max() < 1e-6  # converged ...
    assert np.abs(w_end - w_prev2).max() < 1e-6  # ... with no period-2 bounce
    # On fixed gradients m_k = n_k, so every rescaled gradient has norm mbar: Mt = M / (n n^T) mbar^2.
    n = stats.norms
    mt = stats.gram / np.outer(n, n)
    grid = simplex_grid(1e-3)
    u = grid + mb.lam * mb.prior
    best = grid[np.argmin(np.einsum("ni,ij,nj->n", u, mt, u))]
    assert np.abs(w_end - best).max() < 5e-3, (w_end, best)


def test_multibalance_does_not_let_a_100x_task_take_the_weight():
    grads = conflicting_gradients(scale_c=100.0)
    unit = [g / g.norm() for g in grads]
    mb = build_balancer("multibalance", TASKS)
    for _ in range(200):
        out = mb.aggregate(grads, stats_for(grads))
    projections = torch.tensor([float((out * u).sum()) for u in unit]).abs()
    plain = build_balancer("equal", TASKS).aggregate(grads, stats_for(grads))
    plain_proj = torch.tensor([float((plain * u).sum()) for u in unit]).abs()
    assert float(plain_proj[2] / plain_proj[:2].max()) > 50  # summing: task c dominates
    assert float(projections[2] / projections[:2].max()) < 3  # MultiBalance: it does not


def test_multibalance_without_ema_differs_on_noisy_gradients():
    base = conflicting_gradients()
    g = torch.Generator().manual_seed(9)
    default, ablation = build_balancer("multibalance", TASKS), build_balancer("multibalance", TASKS, beta=0.0)
    diff = 0.0
    for _ in range(30):
        noisy = [x * float(torch.rand(1, generator=g) * 3 + 0.1) for x in base]
        default.coefficients(stats_for(noisy))
        ablation.coefficients(stats_for(noisy))
        diff = max(diff, float(np.abs(default.weights - ablation.weights).max()))
    assert diff > 1e-3


def test_multibalance_validates_its_knobs():
    with pytest.raises(ValueError, match="multibalance.beta"):
        build_balancer("multibalance", TASKS, beta=1.0)
    with pytest.raises(ValueError, match="multibalance.prior"):
        build_balancer("multibalance", TASKS, prior=[0.5, 0.5, 0.5])


# --- Property 4: EMTL -----------------------------------------------------------------------------------
def test_emtl_with_beta_one_is_mgda():
    grads = conflicting_gradients()
    stats = stats_for(grads, [0.7, 0.2, 1.5])
    emtl = build_balancer("emtl", TASKS, beta=1.0)
    np.testing.assert_allclose(emtl.coefficients(stats), min_norm_weights(stats.gram), rtol=0, atol=1e-15)


def test_mgda_for_two_tasks_is_the_closed_form():
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        ab = torch.randn(2, 5, generator=g, dtype=torch.float64).numpy()
        m = ab @ ab.T
        c1 = min(max((m[1, 1] - m[0, 1]) / (m[0, 0] + m[1, 1] - 2 * m[0, 1]), 0.0), 1.0)
        np.testing.assert_allclose(min_norm_weights(m), [c1, 1 - c1], rtol=1e-12)


def test_emtl_bandit_stays_in_the_kl_ball_and_favours_slow_tasks():
    emtl = build_balancer("emtl", TASKS, beta=0.0, eta=1.0)
    grads = [torch.ones(4, 2, dtype=torch.float64) * s for s in (1.0, 1.0, 1.0)]
    for _ in range(20):
        emtl.coefficients(stats_for(grads, [1.0, 1.0, 4.0]))  # task c: 4x the loss per gradient norm
        assert kl_to_uniform(emtl.bandit) <= emtl.rho + 1e-9
    p = emtl.bandit
    assert p[2] > p[0] and abs(p[0] - p[1]) < 1e-12
    assert abs(kl_to_uniform(p) - emtl.rho) < 1e-8  # the constraint binds


def test_emtl_rejects_a_radius_of_log_t_or_more_and_says_why():
    with pytest.raises(ValueError, match=r"log T"):
        build_balancer("emtl", TASKS, rho=math.log(3))


# --- Property 5: CoGrad ---------------------------------------------------------------------------------
def _through_boundary(name, grads, **knobs):
    """One step of a balancer inside a boundary (which adds its extras to the statistics)."""
    boundary = RepresentationBoundary(build_balancer(name, TASKS, **knobs))
    boundary.objective(torch.ones(len(grads), dtype=torch.float64))
    out = boundary.balance(tuple(g.clone() for g in grads), torch.zeros_like(grads[0]))
    return out, boundary.telemetry()


def test_cograd_with_zero_gamma_is_equal():
    grads = conflicting_gradients()
    got, _ = _through_boundary("cograd", grads, gamma=0.0)
    torch.testing.assert_close(got, build_balancer("equal", TASKS).aggregate(grads, stats_for(grads)))


def _cograd_written_out(grads, gamma, c, kappa=None, strength=None, guard=False):
    """Algorithm 1 line 9 with Concord's global strength, per-task guard and element bound
    (docs/ALGORITHMS.md item 4), from the gradients alone: ``kappa`` given, or ``strength * ||P|| /
    ||C||`` of these gradients, with the guard at most ``strength * c_k ||G_k||^2 / <G_k, C>`` for
    every task whose ``<G_k, C>`` is positive."""
    n = len(grads)
    plain = sum(c[i] * grads[i] for i in range(n))
    transfer = [sum(gamma[j] * grads[j] for j in range(n) if j != i) for i in range(n)]
    correction = sum(c[i] * grads[i] * grads[i] * transfer[i] for i in range(n))
    if kappa is None:
        kappa = strength * float(plain.norm()) / float(correction.norm())
        if guard:
            costs = [float((g * correction).sum()) for g in grads]
            kappa = min([kappa] + [strength * c[i] * float(grads[i].square().sum()) / costs[i] for i in range(n) if costs[i] > 0])
    factors = [kappa * grads[i] * transfer[i] for i in range(n)]
    bounded = sum(c[i] * grads[i] * (1 - factors[i].clamp(-1, 1)) for i in range(n))
    return bounded, plain, correction, kappa, factors


def test_cograd_matches_the_rule_written_out():
    grads = conflicting_gradients()
    gamma, strength = [0.5, 1.0, 2.0], 0.07
    got, telemetry = _through_boundary("cograd", grads, gamma=gamma, strength=strength)
    expected, plain, correction, kappa, factors = _cograd_written_out(grads, gamma, [1 / 3] * 3, strength=strength)
    assert max(float(f.abs().max()) for f in factors) < 1  # the bound does not bind: the paper's P - kappa C
    torch.testing.assert_close(got, plain - kappa * correction)
    torch.testing.assert_close(got, expected)
    assert telemetry["correction_ratio"] == pytest.approx(strength)  # the correction's share, by construction
    assert telemetry["bounded_share"] == 0.0


def test_cograd_never_reverses_a_gradient_element():
    """Where ``kappa G_i ⊙ (S' - gamma_i G_i)`` exceeds 1 in size (here a lagged ``kappa``, from a step
    whose gradients were 30 times smaller), the correction is bounded element by element: each task's
    term keeps its sign and at most doubles, instead of overturning the step."""
    g = torch.Generator().manual_seed(8)
    small = [torch.randn(64, 16, generator=g, dtype=torch.float64) * s for s in (1.0, -2.0, 0.5)]
    large = [30.0 * torch.randn(64, 16, generator=g, dtype=torch.float64) * s for s in (1.0, -2.0, 0.5)]
    boundary = RepresentationBoundary(build_balancer("cograd", TASKS), statistics="previous")
    for grads in (small, small, large):
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        got = boundary.balance(tuple(x.clone() for x in grads), None)
    kappa = _cograd_written_out(small, [1.0] * 3, [1 / 3] * 3, strength=COGRAD_STRENGTH)[3]
    expected, plain, correction, _, factors = _cograd_written_out(large, [1.0] * 3, [1 / 3] * 3, kappa=kappa)
    assert float((kappa * correction).norm()) > 10 * float(plain.norm())  # unbounded, the step would be overturned
    torch.testing.assert_close(got, expected)
    share = sum(int((f.abs() > 1).sum()) for f in factors) / (3 * large[0].numel())
    assert 0 < share < 1 and boundary.telemetry()["bounded_share"] == pytest.approx(share)
    assert all(bool(((1 - f.clamp(-1, 1) >= 0) & (1 - f.clamp(-1, 1) <= 2)).all()) for f in factors)
    assert float((got - plain).abs().max()) <= float(sum(x.abs() for x in large).max()) / 3


def test_lagged_cograd_forms_its_sum_in_the_pass_that_gathers_its_statistics():
    """With lagged statistics ``kappa`` is known before this step's pass over the gradients: one
    rule forms the aggregate and the norms together (the first step, with no sum yet, only the norms),
    and the result is the rule's. A gradient that proves non-finite in that pass is left out and the
    step goes uncorrected, as in current mode."""
    g = torch.Generator().manual_seed(9)
    steps = [[torch.randn(8, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 20.0, 0.3)] for _ in range(3)]
    # The rule in torch's ops (fused: false; the compiled pass that replaces it: the test below).
    boundary = RepresentationBoundary(build_balancer("cograd", TASKS, fused=False), statistics="previous", telemetry_every=100)
    rules = []  # the passes over the gradients (none for telemetry: not logged on these steps)
    run_rule = boundary.balancer.run_rule
    boundary.balancer.run_rule = lambda rule, *args: rules.append(rule.__name__) or run_rule(rule, *args)
    for t, grads in enumerate(steps):
        rules.clear()
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        got = boundary.balance(tuple(x.clone() for x in grads), None)
        assert rules == (["transference_norms"] if t == 0 else ["coordinated_with_norms"]), t
    kappa = _cograd_written_out(steps[1], [1.0] * 3, [1 / 3] * 3, strength=COGRAD_STRENGTH)[3]
    torch.testing.assert_close(got, _cograd_written_out(steps[2], [1.0] * 3, [1 / 3] * 3, kappa=kappa)[0])
    bad = [x.clone() for x in steps[2]]
    bad[1][0, 0] = float("nan")
    boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    got = boundary.balance(tuple(bad), None)
    torch.testing.assert_close(got, (bad[0] + bad[2]) / 3)


def test_cograd_is_scale_free():
    grads = conflicting_gradients()
    small, _ = _through_boundary("cograd", grads)
    big, _ = _through_boundary("cograd", [1000.0 * g for g in grads])
    torch.testing.assert_close(big, 1000.0 * small)


def test_cograd_default_makes_a_visible_correction_whatever_the_gradients_tails():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 64, generator=g, dtype=torch.float64)
    gaussian = [s * (base + torch.randn(256, 64, generator=g, dtype=torch.float64)) for s in (1.0, 0.1, 10.0)]
    sparse = [x * (torch.rand(256, 64, generator=g, dtype=torch.float64) < 0.02) for x in gaussian]  # heavy tails
    for grads in (gaussian, sparse):
        _, telemetry = _through_boundary("cograd", grads)
        assert telemetry["correction_ratio"] == pytest.approx(COGRAD_STRENGTH)


def _first_order_costs(grads, aggregated, c):
    """Each task's ``<G_k, P - A> / (c_k ||G_k||^2)``: the share of its own term's first-order gain
    that the correction ``P - A`` costs it."""
    plain = sum(ck * g for ck, g in zip(c, grads))
    return [float((g * (plain - aggregated)).sum()) / (ck * float(g.square().sum())) for ck, g in zip(c, grads)]


@pytest.mark.parametrize("correlated", [False, True])
def test_cograd_guard_bounds_the_corrections_cost_to_every_task_by_the_strength(correlated):
    """Loss scales 100x apart: at the global strength alone the correction costs the smallest task
    most of what its own gradient gains it to first order (the dominant task's term
    ``-kappa c_j G_j ⊙ G_j ⊙ G_i`` points along ``-G_i``); with the guard no task pays more than
    ``strength`` of it, and the task that binds pays exactly that. The logged ``correction_cost``
    is that share, per task."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 64, generator=g, dtype=torch.float64) * float(correlated)
    grads = [s * (base + torch.randn(256, 64, generator=g, dtype=torch.float64)) for s in (1.0, 0.1, 10.0)]
    c = [1 / 3] * 3
    unguarded, _ = _through_boundary("cograd", grads)
    guarded, telemetry = _through_boundary("cograd", grads, guard=True)
    assert max(_first_order_costs(grads, unguarded, c)) > 4 * COGRAD_STRENGTH
    costs = _first_order_costs(grads, guarded, c)
    assert max(costs) == pytest.approx(COGRAD_STRENGTH, rel=1e-6)
    assert telemetry["correction_cost"] == pytest.approx(costs, rel=1e-6)
    torch.testing.assert_close(guarded, _cograd_written_out(grads, [1.0] * 3, c, strength=COGRAD_STRENGTH, guard=True)[0])


def test_cograd_guard_changes_nothing_where_no_task_pays_more_than_the_strength():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(256, 64, generator=g, dtype=torch.float64) for _ in range(3)]  # alike, independent
    unguarded, _ = _through_boundary("cograd", grads)
    guarded, telemetry = _through_boundary("cograd", grads, guard=True)
    assert max(telemetry["correction_cost"]) < COGRAD_STRENGTH
    assert torch.equal(guarded, unguarded)


def test_cograd_guard_names_its_values():
    with pytest.raises(ValueError, match=r"cograd.guard is true or false, got 'yes'"):
        build_balancer("cograd", TASKS, guard="yes")


def test_cograd_is_independent_of_batch_duplication():
    model = ToyMTL(3)
    x, y = toy_batch(16, 3)

    def run(xx, yy):
        boundary = RepresentationBoundary(build_balancer("cograd", TASKS, gamma=0.05))
        z = model.bottom(xx).detach().requires_grad_()
        views = boundary(z)
        boundary.objective(model.losses(views, yy, (1.0, 1.0, 1.0))).backward()
        return z.grad

    single = run(x, y)
    double = run(torch.cat([x, x]), torch.cat([y, y]))
    # Per-sample scale B * A is what the rule fixes: each duplicated row gets the same per-sample value.
    torch.testing.assert_close(32 * double[:16], 16 * single)
    torch.testing.assert_close(32 * double[16:], 16 * single)


# --- Property 7: state survives save and restore exactly ------------------------------------------------
@pytest.mark.parametrize("name", ["multibalance", "emtl", "cograd", "fixed"])
def test_state_survives_checkpoint_and_restore(name):
    g = torch.Generator().manual_seed(4)
    steps = [[torch.randn(8, 3, generator=g, dtype=torch.float64) * s for s in (1.0, 5.0, 0.5)] for _ in range(10)]
    first = build_balancer(name, TASKS)
    for grads in steps[:5]:
        first.aggregate(grads, stats_for(grads, [1.0, 2.0, 0.3]))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = build_balancer(name, TASKS)
    second.load_state_dict(torch.load(buf, weights_only=True))
    for grads in steps[5:]:
        a = first.aggregate(grads, stats_for(grads, [1.0, 2.0, 0.3]))
        b = second.aggregate(grads, stats_for(grads, [1.0, 2.0, 0.3]))
        assert torch.equal(a, b)
    for key, value in first.state_dict().items():
        other = second.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_a_disabled_boundary_is_plain_autograd_on_the_mean_loss():
    x, y = toy_batch(16, 3)
    model = ToyMTL(3)
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS))
    boundary.enabled = False
    views = boundary(model.bottom(x))
    assert all(v is views[0] for v in views)
    boundary.objective(model.losses(views, y, (1.0, 5.0, 0.2))).backward()
    ref = ToyMTL(3)
    ref.losses([ref.bottom(x)] * 3, y, (1.0, 5.0, 0.2)).mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert boundary.last_stats is None  # no statistics, no balancer step


# --- Lagged statistics (statistics="previous") --------------------------------------------------------------
def _lagged_steps(method, steps, boundary=None):
    boundary = boundary or RepresentationBoundary(build_balancer(method, TASKS), statistics="previous")
    out = []
    for grads in steps:
        z = torch.zeros_like(grads[0], requires_grad=True)
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        out.append(boundary.balance(tuple(g.clone() for g in grads), z))
    return boundary, out


@pytest.mark.parametrize("method", ["multibalance", "emtl", "mgda", "equal", "cograd"])
def test_lagged_statistics_balance_step_t_with_step_t_minus_1s(method):
    g = torch.Generator().manual_seed(11)
    steps = [[torch.randn(8, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 20.0, 0.3)] for _ in range(5)]
    _, got = _lagged_steps(method, steps)
    torch.testing.assert_close(got[0], sum(steps[0]) / 3)  # the first step: the prior, equal weights
    reference = build_balancer(method, TASKS)
    for t in range(1, 5):
        previous = stats_for(steps[t - 1], [1.0, 2.0, 0.5])
        if method == "cograd":  # element-wise: the previous step's kappa, this step's gradients
            kappa = _cograd_written_out(steps[t - 1], [1.0] * 3, [1 / 3] * 3, strength=COGRAD_STRENGTH)[3]
            expected = _cograd_written_out(steps[t], [1.0] * 3, [1 / 3] * 3, kappa=kappa)[0]
        else:
            expected = weighted_sum(steps[t], reference.coefficients(previous), np.ones(3, dtype=bool))
        torch.testing.assert_close(got[t], expected)


def test_lagged_statistics_in_flight_survive_a_checkpoint():
    g = torch.Generator().manual_seed(12)
    steps = [[torch.randn(8, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 20.0, 0.3)] for _ in range(6)]
    _assert_a_restored_boundary_goes_on_alike(
        steps, 3, lambda: RepresentationBoundary(build_balancer("multibalance", TASKS), statistics="previous"))


def _assert_a_restored_boundary_goes_on_alike(steps, stop, make):
    """``make()``'s boundary saved after ``stop`` steps and restored into a new one takes the steps
    after ``stop`` exactly as the boundary that never stopped."""
    _, expected = _lagged_steps("multibalance", steps, make())
    first, _ = _lagged_steps("multibalance", steps[:stop], make())
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    _, got = _lagged_steps("multibalance", steps[stop:], restored)
    for a, b in zip(got, expected[stop:]):
        assert torch.equal(a, b)


def test_graddrop_cannot_lag():
    with pytest.raises(ValueError, match="graddrop needs each step's own statistics"):
        RepresentationBoundary(build_balancer("graddrop", TASKS), statistics="previous")


# --- Statistics every k steps (statistics="previous", statistics_every=k) -----------------------------------
def _every_k(method, k, telemetry_every=1):
    return RepresentationBoundary(build_balancer(method, TASKS), statistics="previous", statistics_every=k,
                                  telemetry_every=telemetry_every)


def _random_steps(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(8, 5, generator=g, dtype=torch.float64) * s for s in (1.0, 20.0, 0.3)] for _ in range(n)]


@pytest.mark.parametrize("method, every", [("multibalance", 1), ("multibalance", 3), ("emtl", 3), ("mgda", 1), ("cograd", 1), ("cograd", 3)])
def test_a_task_absent_from_a_sum_still_trains_on_the_steps_balanced_with_it(method, every, caplog):
    """Task c has no gradient on step 4, which gathers statistics; the steps balanced with that sum
    (5, and with every 3 also 6 and 7) have it. A coefficient rule holds c at the coefficient it had
    (its state did not move), not at 0; CoGrad sums c in, uncorrected (its kappa was formed without
    c), and corrects again once a sum has every task. The warning names the step c was left out of."""
    steps = _random_steps(31, 9)
    boundary = _every_k(method, every) if every > 1 else RepresentationBoundary(build_balancer(method, TASKS), statistics="previous")
    got, held = [], []
    for t, grads in enumerate(steps):
        if t == 4:
            grads = [grads[0], grads[1], None]
        z = torch.zeros_like(steps[t][0], requires_grad=True)
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        with caplog.at_level(logging.WARNING, logger="concord.balancing"):
            got.append(boundary.balance(tuple(None if g is None else g.clone() for g in grads), z))
        held.append(None if method == "cograd" else np.array(boundary.lagged_state[1]))
    assert "task 'c': zero, missing or non-finite gradient/loss at the boundary; its contribution is skipped in the step before" in caplog.text
    balanced_without_c = [5] if every == 1 else [5, 6, 7]
    if method != "cograd":
        assert held[5][2] == held[4][2] and held[5][2] > 0
        assert not np.allclose(held[5][:2], held[4][:2])  # a and b moved with the sum
    for t in balanced_without_c:
        if method == "cograd":
            torch.testing.assert_close(got[t], sum(steps[t]) / 3, rtol=1e-12, atol=0)
        else:
            torch.testing.assert_close(got[t], weighted_sum(steps[t], held[t], np.ones(3, dtype=bool)))
    if method == "cograd":  # the next sum has every task: corrected again
        after = balanced_without_c[-1] + 1
        assert (got[after] - sum(steps[after]) / 3).abs().max() > 1e-6


def test_statistics_every_k_steps_run_the_rule_every_k_steps_and_hold_its_coefficients_between():
    steps = _random_steps(21, 9)
    _, got = _lagged_steps("multibalance", steps, _every_k("multibalance", 3))
    reference = build_balancer("multibalance", TASKS)
    # Gathered on the first step and on steps 1, 4, 7 (0-based), read one step later: the rule runs on
    # steps 1, 2, 5 and 8; only the first step has the prior.
    held = np.full(3, 1.0 / 3)
    for t in range(9):
        if t in (1, 2, 5, 8):
            held = reference.coefficients(stats_for(steps[t - 1], [1.0, 2.0, 0.5]))
        torch.testing.assert_close(got[t], weighted_sum(steps[t], held, np.ones(3, dtype=bool)))


def test_rules_without_statistics_gather_them_for_the_logged_steps_only():
    boundary = _every_k("equal", 1, telemetry_every=5)
    seen = []
    steps = _random_steps(22, 10)
    for grads in steps:
        boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        out = boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
        torch.testing.assert_close(out, sum(grads) / 3)
        seen.append(boundary.last_stats)
    # Started on the 4th and 9th steps, read on the 5th and 10th: the steps a trainer logs.
    assert [s is not None for s in seen] == [False] * 4 + [True] * 6
    assert seen[4] is seen[8] and seen[9] is not seen[8]
    np.testing.assert_allclose(seen[9].norms, stats_for(steps[8], [1.0, 2.0, 0.5]).norms)  # the 9th step's


def test_a_log_off_the_schedule_gets_statistics_and_a_rule_that_reads_them_keeps_its_schedule():
    """A run's last step is logged even when ``telemetry_every`` does not schedule it: the step before
    gathers for it (rules without statistics), while a rule's sums stay every k steps."""
    equal = _every_k("equal", 1, telemetry_every=10)
    steps = _random_steps(26, 3)
    seen = []
    for t, grads in enumerate(steps):
        if t == 1:
            equal.gather_for_log()  # the trainer, before the second-to-last step
        equal.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
        equal.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
        seen.append(equal.last_stats)
    assert [s is not None for s in seen] == [False, False, True]
    np.testing.assert_allclose(seen[2].norms, stats_for(steps[1], [1.0, 2.0, 0.5]).norms)

    _same_sums_with_a_log_asked_for("multibalance", 3, 1, seed=27, steps=6)
    # CoGrad's correction telemetry is formed on the announced step too (it was missing from a run's
    # last log), and forming it changes no aggregate.
    scheduled, asked = _same_sums_with_a_log_asked_for("cograd", 10, 10, seed=28, steps=4)
    assert "correction_ratio" in asked.telemetry() and "correction_ratio" not in scheduled.telemetry()


def _same_sums_with_a_log_asked_for(method: str, k: int, telemetry_every: int, seed: int, steps: int):
    """Two lagged boundaries on the same steps, one told that its last step is logged (gather_for_log
    before the second-to-last): every aggregate bitwise the same. Returns both."""
    scheduled, asked = (_every_k(method, k, telemetry_every=telemetry_every) for _ in range(2))
    for t, grads in enumerate(_random_steps(seed, steps)):
        if t == steps - 2:
            asked.gather_for_log()
        outs = []
        for boundary in (scheduled, asked):
            boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
            outs.append(boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5)))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    return scheduled, asked


def test_a_nonfinite_loss_between_sums_is_left_out_at_once_and_raised_with_the_next_sum():
    boundary = _every_k("multibalance", 3)
    boundary.on_nonfinite_loss = "raise"
    steps = _random_steps(23, 6)
    for t, grads in enumerate(steps):
        losses = torch.tensor([1.0, float("nan") if t == 2 else 2.0, 0.5], dtype=torch.float64)
        boundary.objective(losses)
        if t == 5:  # the sum started on step 4 carries step 2's report
            with pytest.raises(NonFiniteLossError, match="'b'"):
                boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
            return
        out = boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
        if t == 2:  # left out here, with the coefficients held from step 2's read (itself the prior on b)
            assert torch.isfinite(out).all()
            assert boundary.lagged_state[2].tolist() == [False, True, False]  # not yet reported


def test_a_nonfinite_gradient_between_sums_is_left_out_of_that_step():
    boundary = _every_k("multibalance", 4)
    grads = _random_steps(24, 1)[0]
    grads[2][3, 1] = float("inf")
    boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    out = boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))  # step 0: no statistics
    torch.testing.assert_close(out, (grads[0] + grads[1]) / 3)


def test_held_coefficients_survive_a_checkpoint():
    _assert_a_restored_boundary_goes_on_alike(_random_steps(25, 9), 4, lambda: _every_k("multibalance", 3))


def test_statistics_every_k_needs_lagged_statistics():
    with pytest.raises(ValueError, match="statistics_every"):
        RepresentationBoundary(build_balancer("multibalance", TASKS), statistics_every=2)


def test_cograd_every_k_steps_corrects_every_step_with_the_kappa_of_the_last_sum():
    """An element-wise rule with statistics every k steps: each step's aggregate is still formed from
    that step's gradients, with ``kappa`` from the last sum, held until the next one."""
    steps = _random_steps(28, 9)
    _, got = _lagged_steps("cograd", steps, _every_k("cograd", 3))
    # Gathered on the first step and on steps 1, 4, 7 (0-based), read one step later: kappa changes on
    # steps 1, 2, 5 and 8.
    torch.testing.assert_close(got[0], sum(steps[0]) / 3)  # nothing summed yet: the prior
    for t in range(1, 9):
        source = steps[0 if t < 2 else 1 if t < 5 else 4 if t < 8 else 7]
        kappa = _cograd_written_out(source, [1.0] * 3, [1 / 3] * 3, strength=COGRAD_STRENGTH)[3]
        expected, _, _, _, factors = _cograd_written_out(steps[t], [1.0] * 3, [1 / 3] * 3, kappa=kappa)
        torch.testing.assert_close(got[t], expected)
        assert not torch.allclose(got[t], sum(steps[t]) / 3)  # it corrects


@pytest.mark.parametrize("guard", [False, True])
def test_cograd_every_k_steps_keeps_its_kappa_through_a_checkpoint(guard):
    # Stopped after step 3: the last sum (step 1's, read on step 2) is held, nothing is in flight.
    make = lambda: RepresentationBoundary(build_balancer("cograd", TASKS, guard=guard), statistics="previous",  # noqa: E731
                                          statistics_every=3)
    _assert_a_restored_boundary_goes_on_alike(_random_steps(29, 9), 4, make)


def test_cograd_between_sums_leaves_a_nonfinite_gradient_out_of_its_step_uncorrected(caplog):
    steps = _random_steps(30, 4)
    steps[3][2][5, 0] = float("inf")  # step 3: between sums, with a kappa held from step 1's sum
    with caplog.at_level(logging.WARNING):
        _, got = _lagged_steps("cograd", steps, _every_k("cograd", 3))
    torch.testing.assert_close(got[3], (steps[3][0] + steps[3][1]) / 3)
    assert "non-finite gradient at z" in caplog.text


def test_auto_statistics_lag_every_method_that_can_and_decide_again_on_a_swap():
    """``statistics="auto"`` (the trainer's default): lagged for every method but GradDrop, whose sum
    needs its own step's column signs; swapping the balancer decides the mode again, afresh."""
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS), statistics="auto")
    assert boundary.statistics == "previous"
    for name in available_balancers():
        boundary.balancer = build_balancer(name, TASKS)
        assert boundary.statistics == ("current" if name == "graddrop" else "previous"), name
    boundary.balancer = build_balancer("graddrop", TASKS)
    boundary.use_statistics("auto")
    assert boundary.statistics == "current"
    with pytest.raises(ValueError, match="graddrop needs each step's own statistics; use statistics_every=1"):
        RepresentationBoundary(build_balancer("graddrop", TASKS), statistics="auto", statistics_every=10)


def test_auto_cadence_runs_slow_moving_rules_every_ten_steps_when_lagged_and_decides_again_on_a_swap():
    """``statistics_every="auto"`` (the trainer's default): MultiBalance and EMTL, whose state is a slow
    moving average, run their rule on every 10th step's sum when lagged, and CoGrad sizes its
    correction from every 10th; every other method (and every method in current mode) every step."""
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS), statistics="auto", statistics_every="auto")
    assert (boundary.statistics, boundary.statistics_every) == ("previous", 10)
    for name in available_balancers():
        boundary.balancer = build_balancer(name, TASKS)
        expected = ("current", 1) if name == "graddrop" else ("previous", 10 if name in ("multibalance", "emtl", "cograd") else 1)
        assert (boundary.statistics, boundary.statistics_every) == expected, name
    current = RepresentationBoundary(build_balancer("emtl", TASKS), statistics="current", statistics_every="auto")
    assert (current.statistics, current.statistics_every) == ("current", 1)
    with pytest.raises(ValueError, match="statistics_every must be 'auto', 1, or > 1"):
        RepresentationBoundary(build_balancer("emtl", TASKS), statistics_every=0)


# --- The lagged sum formed in a gradient autograd gave up ----------------------------------------
def _backward_through(boundary, grads, touch=None, nonfinite=()):
    """One backward in which head k's gradient at its view is ``grads[k]`` and its loss is finite
    (for k in ``nonfinite`` a NaN is added to the gradient: sqrt's derivative at 0, times 0);
    ``touch(views)`` may hook the views first. Returns z's gradient."""
    z = torch.zeros_like(grads[0], requires_grad=True)
    views = boundary(z)
    if touch is not None:
        touch(views)
    losses = [(v * g).sum() + (torch.sqrt(v[3, 1] * 0) if k in nonfinite else 0) for k, (v, g) in enumerate(zip(views, grads))]
    boundary.objective(torch.stack(losses)).backward()
    assert boundary.backward_seconds >= 0  # read after backward, as a trainer does (native nodes' warnings then)
    return z.grad


def _last_given_up(boundary, donations) -> bool:
    """Whether the last backward formed its sum in the gradient autograd gave up (which a native
    node records in its state, and the Python nodes ask ``donated_gradients``)."""
    clock = boundary._record.backward_clock
    if isinstance(clock, NativeClock):
        return clock.flags[3] == 1.0
    return bool(donations) and donations[-1][-1]


@pytest.fixture
def donations(monkeypatch):
    """What the boundary's backward was told it may write into, call by call."""

    seen, real = [], views_module.donated_gradients
    monkeypatch.setattr(views_module, "donated_gradients", lambda grads: seen.append(real(grads)) or seen[-1])
    return seen


@pytest.mark.parametrize("method", ["equal", "multibalance"])
def test_the_sum_formed_in_a_given_up_gradient_is_bitwise_the_same(method, donations, view_node):
    through, direct = _every_k(method, 3), _every_k(method, 3)
    for grads in _random_steps(31, 7):
        got = _backward_through(through, grads)
        assert _last_given_up(through, donations)
        direct.objective(torch.stack([(g * g).sum() for g in grads]))  # losses do not enter the rule's sum
        torch.testing.assert_close(got, direct.balance(tuple(g.clone() for g in grads)), rtol=0, atol=0)


def test_a_gradient_someone_else_holds_is_never_written_into(donations, view_node):
    """A hook that keeps head a's gradient, ``retain_grad`` on a view, and a head whose backward sends
    the same gradient to a leaf and to a node still to run all see the raw G_a after the sum."""
    grads = _random_steps(32, 1)[0]
    kept = []
    boundary = _every_k("equal", 3)
    _backward_through(boundary, grads, lambda views: views[0].register_hook(kept.append))
    torch.testing.assert_close(kept[0], grads[0], rtol=0, atol=0)
    assert not _last_given_up(boundary, donations)

    retained = []
    _backward_through(_every_k("equal", 3), grads, lambda views: views[0].retain_grad() or retained.append(views[0]))
    torch.testing.assert_close(retained[0].grad, grads[0], rtol=0, atol=0)

    leaf = torch.zeros_like(grads[0], requires_grad=True)
    pending = torch.zeros_like(grads[0], requires_grad=True)
    not_yet_run = pending * 2  # made before the boundary's node, so its backward runs after it
    for other in (leaf, not_yet_run):
        z = torch.zeros_like(grads[0], requires_grad=True)
        boundary = _every_k("equal", 3)
        views = boundary(z)
        # AddBackward hands the same gradient tensor to views[0] and to `other`
        first = ((views[0] + other) * grads[0]).sum()
        boundary.objective(torch.stack([first] + [(v * g).sum() for v, g in zip(views[1:], grads[1:])])).backward()
        torch.testing.assert_close(z.grad, sum(grads) / 3)
    torch.testing.assert_close(leaf.grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(pending.grad, 2 * grads[0], rtol=0, atol=0)
    assert not _last_given_up(boundary, donations)


def test_a_nonfinite_gradient_between_sums_through_autograd(donations, caplog, view_node):
    """The sum starts in task a's gradient: a non-finite G_c then leaves out c and, its gradient being
    spent, a; a non-finite G_a leaves out a alone."""
    grads = _random_steps(33, 1)[0]
    boundary = _every_k("equal", 4, telemetry_every=10)
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        got = _backward_through(boundary, grads, nonfinite=(2,))
    torch.testing.assert_close(got, grads[1] * (1 / 3), rtol=0, atol=0)
    assert "task 'c': non-finite gradient" in caplog.text and "task 'a': summed with a non-finite gradient" in caplog.text
    assert _last_given_up(boundary, donations)
    boundary = _every_k("equal", 4, telemetry_every=10)
    torch.testing.assert_close(_backward_through(boundary, grads, nonfinite=(0,)), grads[1] / 3 + grads[2] / 3)
    assert _last_given_up(boundary, donations)


def _autograd_sums(method="equal", reduction="mean"):
    return RepresentationBoundary(build_balancer(method, TASKS), reduction, statistics="previous", telemetry_every=5,
                                  autograd_sums=True)


@pytest.fixture(params=["native", "python"])
def view_node(request, monkeypatch):
    """The one-view step's backward node: the compiled one (concord.balancing.native) or the Python
    node the boundary keeps where that cannot be built."""
    return _use_node(request.param, monkeypatch)


@pytest.fixture(params=["native", "python", "device"])
def one_view_node(request, monkeypatch):
    """:func:`view_node`, or the Python node as on a GPU (no host read; run here on CPU tensors)."""
    return _use_node(request.param, monkeypatch)


def _use_node(node: str, monkeypatch) -> str:
    import concord.balancing.boundary as module
    from concord.balancing.native import native_ops

    if node == "python":
        monkeypatch.setattr(module, "native_ops", lambda: None)
    elif node == "device":
        monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: False)
    elif native_ops() is None:
        pytest.skip("the native node cannot be built on this machine (a C++ compiler and ninja are needed)")
    return node


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_autograd_sums_an_equal_weight_rule_between_sums_at_one_view(reduction, donations, one_view_node):
    """``autograd_sums``: on the steps that gather no statistics an equal-weight rule gets one view
    that every head reads (autograd sums the task gradients), and the same gradient for ``z``; the
    steps that gather statistics (here for the log, every 5th) keep one view per task; the next step
    reads their sum in forward and has one view again (on a CPU). Autograd's sum, held by nothing else, is
    scaled in place."""
    boundary, plain = _autograd_sums(reduction=reduction), _every_k("equal", 1, telemetry_every=5)
    plain.reduction = reduction
    for t, grads in enumerate(_random_steps(37, 10)):
        z = torch.zeros_like(grads[0], requires_grad=True)
        views = boundary(z)
        one_view = views[0] is views[1]
        # Gathered on step 3, read in step 4's forward (on a GPU in step 4's backward).
        assert one_view == (t % 5 != 3 and (t % 5 != 4 or one_view_node != "device")), t
        boundary.objective(torch.stack([(v * g).sum() for v, g in zip(views, grads)])).backward()
        assert _last_given_up(boundary, donations), t
        torch.testing.assert_close(z.grad, _backward_through(plain, grads))
        torch.testing.assert_close(z.grad, sum(grads) * (1.0 if reduction == "sum" else 1 / 3))
        assert boundary.balancer.step == t + 1 and boundary.backward_seconds > 0


@pytest.mark.parametrize("method, autograd_sums", [("multibalance", False), ("multibalance", True), ("equal", True)])
def test_a_head_that_changes_its_view_in_place_is_refused(method, autograd_sums, view_node):
    """Every head reads z's memory: an in-place change to one view (an ``inplace=True`` activation at
    the start of a head) would reach the others unseen, so it raises on every node, between sums
    and at one view alike, never a silently wrong gradient."""
    boundary = RepresentationBoundary(build_balancer(method, TASKS), statistics="previous", statistics_every=1 if method == "equal" else 3,
                                      telemetry_every=5, autograd_sums=autograd_sums)
    for _ in range(2):  # MultiBalance's first two steps gather statistics; a refused step counts none
        views = boundary(torch.randn(8, 5, dtype=torch.float64).requires_grad_())
        boundary.objective(torch.stack([v.sum() for v in views])).backward()
    for t in range(4):
        z = torch.randn(8, 5, dtype=torch.float64).requires_grad_()
        views = boundary(z)
        if t == 0:  # a step between sums: the compiled node where it is built
            assert (views[0] is views[1]) == (method == "equal")
            assert views[0].grad_fn.name().startswith("Concord") == (view_node == "native")
        with pytest.raises(RuntimeError, match="in ?place"):
            first = views[0].relu_().sum()
            boundary.objective(torch.stack([first] + [v.sum() for v in views[1:]])).backward()


def test_the_native_and_the_python_node_give_the_same_bits(monkeypatch):
    import concord.balancing.boundary as module
    from concord.balancing.native import native_ops

    if native_ops() is None:
        pytest.skip("the native node cannot be built on this machine (a C++ compiler and ninja are needed)")
    steps = _random_steps(43, 6)
    native = [_backward_through(_autograd_sums(), grads) for grads in steps]
    monkeypatch.setattr(module, "native_ops", lambda: None)
    python = [_backward_through(_autograd_sums(), grads) for grads in steps]
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autograd_sums_never_scales_a_sum_someone_else_holds(one_view_node):
    """A view whose gradient is retained holds autograd's sum: it keeps the raw sum, z gets 1/T of it."""
    boundary = _autograd_sums()
    grads = _random_steps(42, 1)[0]
    z = torch.zeros_like(grads[0], requires_grad=True)
    views = boundary(z)
    assert views[0] is views[1]
    views[0].retain_grad()
    boundary.objective(torch.stack([(v * g).sum() for v, g in zip(views, grads)])).backward()
    torch.testing.assert_close(views[0].grad, sum(grads))  # not scaled: summed in autograd's order
    torch.testing.assert_close(z.grad, sum(grads) / 3)


def test_autograd_sums_needs_the_objective(one_view_node):
    boundary = _autograd_sums()
    z = torch.zeros(8, 5, dtype=torch.float64, requires_grad=True)
    views = boundary(z)
    with pytest.raises(RuntimeError, match="objective"):
        torch.stack([v.sum() for v in views]).sum().backward()


def test_autograd_sums_a_nonfinite_gradient_or_loss_leaves_the_ranks_whole_contribution_out(caplog, one_view_node):
    grads = _random_steps(38, 1)[0]
    boundary = _autograd_sums()
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        got = _backward_through(boundary, grads, nonfinite=(2,))
        assert boundary.backward_seconds >= 0  # read after backward, as a trainer does
    assert torch.count_nonzero(got) == 0
    assert ("summed with the other tasks' by autograd" in caplog.text) == (one_view_node != "device")  # a GPU warns of none
    boundary = _autograd_sums()
    boundary.on_nonfinite_loss = "raise"
    for t, grads in enumerate(_random_steps(39, 5)):
        z = torch.zeros_like(grads[0], requires_grad=True)
        views = boundary(z)
        losses = [(v * g).sum() for v, g in zip(views, grads)]
        if t == 1:
            losses[1] = losses[1] * float("nan")
        if t == 4:  # the sum gathered on step 3 reports step 1's loss
            with pytest.raises(NonFiniteLossError, match="'b'"):
                boundary.objective(torch.stack(losses)).backward()
            break
        boundary.objective(torch.stack(losses)).backward()
        if t == 1:
            assert torch.count_nonzero(z.grad) == 0
            assert boundary.lagged_state[2].tolist() == [False, True, False]


def test_a_sum_that_overflows_leaves_the_ranks_contribution_out():
    big = [torch.full((8, 5), 1.5e308, dtype=torch.float64) for _ in range(3)]  # 3 x 1.5e308 / 3 overflows
    boundary = _every_k("fixed", 4)
    boundary.balancer = build_balancer("fixed", TASKS, weights=[1.0, 1.0, 1.0])
    boundary.objective(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.count_nonzero(boundary.balance(tuple(big))) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_finite_flags_are_isfinite(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([0.0, -0.0, 1.5, -big, big, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert finite_flags(x).tolist() == torch.isfinite(x).tolist() == [True] * 5 + [False] * 3


@pytest.mark.parametrize("method, telemetry_every", [("multibalance", 1), ("multibalance", 4), ("emtl", 4), ("equal", 4)])
def test_a_gpus_batched_steps_with_an_absent_head_step_like_the_cpu(monkeypatch, method, telemetry_every):
    """The GPU's lagged path (the gradients stacked, an absent head's as zeros; the Gram one product,
    or with the diagonal alone one multi-tensor norm), run here on CPU tensors: with head c absent on
    some steps, on statistics steps and between sums, with and without the Gram's cross terms, the
    same aggregates and weights as the CPU's step."""

    steps = _random_steps(44, 9)
    for t in (1, 2, 5):
        steps[t][2] = None
    outs, weights = {}, {}
    for on_host in (True, False):
        monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: on_host)
        boundary = _every_k(method, 3, telemetry_every=telemetry_every)
        outs[on_host], weights[on_host] = [], []
        for grads in steps:
            boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
            outs[on_host].append(boundary.balance(tuple(None if g is None else g.clone() for g in grads), torch.zeros(8, 5)))
            weights[on_host].append(boundary.telemetry().get("weights"))
    for host, device in zip(outs[True], outs[False]):
        torch.testing.assert_close(device, host)
    for host, device in zip(weights[True], weights[False]):
        assert (host is None) == (device is None) and (host is None or device == pytest.approx(host, rel=1e-9))
    assert not torch.equal(outs[False][4], sum(steps[4]) / 3) or method == "equal"  # the held weights act


def test_between_sums_without_host_reads_a_gpu_steps_like_the_cpu(monkeypatch):
    """The GPU's between-sums step (no host read: usability stays a device flag, the sum masks it),
    run here on CPU tensors: the same aggregate as the CPU's step, non-finite gradients left out,
    and a non-finite loss raised with the next sum."""

    steps = _random_steps(34, 6)
    steps[1][2][3, 1] = float("nan")  # a non-finite gradient between sums, with a finite loss
    losses = [torch.tensor([1.0, float("inf") if t == 2 else 2.0, 0.5], dtype=torch.float64) for t in range(6)]
    outs = {}
    for on_host in (True, False):
        monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: on_host)
        boundary = _every_k("multibalance", 3)
        boundary.on_nonfinite_loss = "raise"
        outs[on_host] = []
        for t, grads in enumerate(steps):
            boundary.objective(losses[t])
            if t == 5:  # the sum started on step 4 carries step 2's report
                with pytest.raises(NonFiniteLossError, match="'b'"):
                    boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
                break
            outs[on_host].append(boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5)))
    for host, device in zip(outs[True], outs[False]):
        torch.testing.assert_close(device, host)
    assert torch.isfinite(outs[False][1]).all()


@pytest.mark.parametrize("every", [1, 3])
def test_lagged_cograd_without_host_reads_steps_like_the_cpu(monkeypatch, every):
    """CoGrad's lagged step on a GPU (no host read: this rank's usable tasks stay device flags, which
    the rule masks, and kappa drops to 0 on the device where one is not usable), run here on CPU
    tensors: the same aggregates and telemetry as the CPU's step, a non-finite gradient left out of
    its step uncorrected, a non-finite loss raised with the next sum."""

    steps = _random_steps(36, 6)
    steps[2][1][4, 2] = float("nan")
    losses = [torch.tensor([1.0, float("inf") if t == 4 else 2.0, 0.5], dtype=torch.float64) for t in range(6)]
    outs, telemetry = {}, {}
    for on_host in (True, False):
        monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: on_host)
        boundary = _every_k("cograd", every)
        boundary.on_nonfinite_loss = "raise"
        outs[on_host], telemetry[on_host] = [], []
        for t, grads in enumerate(steps):
            boundary.objective(losses[t])
            if t == 5:
                with pytest.raises(NonFiniteLossError, match="'b'"):
                    boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5))
                break
            outs[on_host].append(boundary.balance(tuple(g.clone() for g in grads), torch.zeros(8, 5)))
            telemetry[on_host].append(boundary.telemetry())
    for host, device in zip(outs[True], outs[False]):
        torch.testing.assert_close(device, host)
    torch.testing.assert_close(outs[False][2], (steps[2][0] + steps[2][2]) / 3)  # uncorrected, the NaN left out
    if every == 3:  # step 2 (between sums) reads step 1's sum; step 3 corrects with it; step 4's sum raises
        assert not torch.allclose(outs[False][3], sum(steps[3]) / 3)
        return
    assert telemetry[False][1]["kappa"] > 0 and telemetry[False][1]["correction_ratio"] > 0
    assert telemetry[False][3]["kappa"] == 0  # step 2's sum left b out: step 3 goes uncorrected
    torch.testing.assert_close(outs[False][3], sum(steps[3]) / 3)  # with b, which has a gradient there
    for host, device in zip(telemetry[True][1:], telemetry[False][1:]):
        for key in ("kappa", "correction_ratio", "bounded_share"):
            assert isinstance(device[key], float) and device[key] == pytest.approx(host[key], rel=1e-9, abs=1e-12), key


def test_unreported_device_flags_survive_a_checkpoint(monkeypatch):

    monkeypatch.setattr(views_module, "reads_on_host", lambda tensor: False)
    boundary = _every_k("multibalance", 4)
    first, second = _random_steps(35, 2)
    boundary.objective(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    boundary.balance(tuple(first), torch.zeros(8, 5))  # step 0 gathers statistics
    boundary.objective(torch.tensor([1.0, float("nan"), 0.5], dtype=torch.float64))
    boundary.balance(tuple(second), torch.zeros(8, 5))  # step 1 gathers none: b's NaN waits for the next sum
    restored = _every_k("multibalance", 4)
    restored.load_state_dict(boundary.state_dict())
    assert restored.lagged_state[2].tolist() == [False, True, False]


def _python_between_sums(patch) -> None:
    patch.setattr(RepresentationBoundary, "_between_sums_at", lambda self, on_host: False)


def _steps_with_faults(boundary, steps, monkeypatch, caplog, absent_at, on_native_node, patch=None, record=None):
    """Runs ``steps`` (one list of task gradients each) through ``boundary`` with the summed reduction
    and three faults: head c absent at step ``absent_at``, task b's loss NaN at step 6 (left out,
    reported with the next sum), a NaN in G_a alone at step 9. ``patch(context)`` sets each step up;
    ``on_native_node(t)`` says whether step t's backward ran on the compiled node; ``record()`` adds
    a value per step. Returns, per step, (z's gradient, the unreported flags, the balancer's step[,
    record()]) and the count of "left out" warnings."""
    boundary.reduction = "sum"
    out, warnings = [], []
    for t, grads in enumerate(steps):
        with monkeypatch.context() as context:
            if patch is not None:
                patch(context)
            z = torch.zeros_like(grads[0], requires_grad=True)
            views = boundary(z)
            losses = [(v * g).sum() for v, g in zip(views, grads)]
            if t == absent_at:
                losses[2] = losses[2].detach()  # head c absent: no gradient for its view
            if t == 6:
                losses[1] = losses[1] * float("nan")  # between sums: left out now, reported with the next sum
            if t == 9:
                losses[0] = losses[0] + torch.sqrt(views[0][3, 1] * 0)  # a NaN in G_a alone
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="concord.balancing"):
                boundary.objective(torch.stack(losses)).backward()
                assert boundary.backward_seconds >= 0
            assert isinstance(boundary._record.backward_clock, NativeClock) == on_native_node(t), t
            out.append((z.grad.clone(), boundary.lagged_state[2].copy(), boundary.balancer.step) + ((record(),) if record else ()))
            warnings.append(caplog.text.count("left out of this step"))
    return out, warnings


def test_a_sum_read_in_forward_is_the_steps_wait_and_its_time_in_the_boundary(monkeypatch, one_view_node):
    """The step after a statistics step reads the sum (in its forward on a CPU, in backward on a GPU):
    that wait is the step's time blocked on the reduction, and the read, the rule included, counts
    in the step's boundary time; the other steps wait for no sum. MultiBalance every 3 steps, its
    rule slowed."""
    boundary = _every_k("multibalance", 3, telemetry_every=100)
    rule = boundary.balancer.coefficients

    def slow_rule(stats):
        time.sleep(0.05)
        return rule(stats)

    monkeypatch.setattr(boundary.balancer, "coefficients", slow_rule)
    for t, grads in enumerate(_random_steps(46, 8)):
        z = torch.zeros_like(grads[0], requires_grad=True)
        views = boundary(z)
        boundary.objective(torch.stack([(v * g).sum() for v, g in zip(views, grads)])).backward()
        reads = t % 3 == 2 or t == 1  # the sum of the first step, and those of steps 1, 4, 7
        assert (boundary.comm_seconds > 0) == reads, t
        if reads:
            assert boundary.backward_seconds >= 0.05, t


def test_the_native_between_sums_node_matches_the_python_one(monkeypatch, caplog):
    """MultiBalance every 3 steps, summed reduction: an absent head, a non-finite loss (reported with
    the next sum) and a non-finite gradient (left out) give the same bits, the same reports and the
    same warnings on the compiled node as on the Python one (the statistics steps alike in both)."""
    from concord.balancing.native import native_ops

    if native_ops() is None:
        pytest.skip("the native node cannot be built on this machine (a C++ compiler and ninja are needed)")

    def run(native):
        boundary = _every_k("multibalance", 3, telemetry_every=100)
        return _steps_with_faults(boundary, _random_steps(44, 12), monkeypatch, caplog, absent_at=3,
                                  # the first step and steps 1, 4, 7, 10 gather; each next step reads their sum in its forward
                                  on_native_node=lambda t: native and t % 3 != 1 and t != 0,
                                  patch=None if native else _python_between_sums)

    native, python = run(True), run(False)
    for (a, unreported_a, step_a), (b, unreported_b, step_b) in zip(native[0], python[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert unreported_a.tolist() == unreported_b.tolist() and step_a == step_b
    assert native[1] == python[1] and sum(native[1]) > 0


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_native_node_forms_cograds_rule_between_sums_as_the_python_one(dtype, guard, monkeypatch, caplog):
    """CoGrad every 3 steps, summed reduction, on the compiled node between sums (and the compiled
    pass on the steps with statistics) and on the Python node (the eager rule): the same kappa up
    to rounding; where the rule corrects, the node's vectorised pass gives the same
    aggregate up to rounding (float32, float64) and torch's ops in C++ the same bits (bfloat16,
    which the pass does not take); where a step goes uncorrected (before the first sum; a task left
    out for a non-finite loss or gradient), the same bits; the same reports and warnings. The
    gradients span several of the pass's blocks and a tail."""
    from concord.balancing.native import wide_vector_passes

    if wide_vector_passes() is None:
        pytest.skip("CoGrad's pass runs where the native node builds and the CPU has AVX2 or AVX-512")
    g = torch.Generator().manual_seed(45)
    steps = [[(torch.randn(64, 67, generator=g, dtype=torch.float64) * s).to(dtype) for s in (1.0, 20.0, 0.3)] for _ in range(13)]

    def run(native):
        # The Python side runs the eager rule (fused: false) on the Python node.
        boundary = RepresentationBoundary(build_balancer("cograd", TASKS, gamma=[1.0, 0.5, 2.0], fused=native, guard=guard),
                                          statistics="previous", statistics_every=3, telemetry_every=100)
        patch = None if native else _python_between_sums

        def kappa():
            return boundary.balancer.kappa(boundary._last_sum) if boundary._last_sum is not None else 0.0

        return _steps_with_faults(boundary, steps, monkeypatch, caplog, absent_at=4, patch=patch, record=kappa,
                                  on_native_node=lambda t: native and t % 3 != 1 and t > 1)  # steps 0 and 1 gather

    native, python = run(True), run(False)
    kappas = [[kappa for *_, kappa in run_steps] for run_steps in (native[0], python[0])]
    kappa_tolerance = 0 if dtype == torch.bfloat16 else 100 * torch.finfo(dtype).eps  # the norms: pass or torch
    np.testing.assert_allclose(kappas[0], kappas[1], rtol=kappa_tolerance)
    assert min(kappas[0][3:]) > 0  # the rule acts
    for t, ((a, unreported_a, step_a, _), (b, unreported_b, step_b, _)) in enumerate(zip(native[0], python[0])):
        exact = t in (0, 6, 9) or dtype == torch.bfloat16  # before the first sum; a task left out; torch's ops
        # Rounding: the rule's terms c_k G_k (1 - clamp(..)) cancel in places, so the error is relative
        # to the terms' size, not to the element's.
        eps = torch.finfo(dtype).eps
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=100 * eps, atol=10 * eps * float(b.abs().max()))
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"step {t}: {m}")
        assert unreported_a.tolist() == unreported_b.tolist() and step_a == step_b
    assert native[1] == python[1] and sum(native[1]) > 0


def _cograd_pass_case(dtype, seed: int):
    """The compiled module (the test skipped where it cannot be built), three gradients of 131 x 67
    (several of the pass's blocks and a tail; magnitudes 20x apart) in ``dtype``, CoGrad's weights
    and ``gamma`` for them, and their ``[||P||^2, ||C||^2]``."""
    from concord.balancing import cograd
    from concord.balancing.native import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("the native node cannot be built on this machine (a C++ compiler and ninja are needed)")
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(131, 67, generator=g, dtype=torch.float64).to(dtype) * s for s in (1.0, 20.0, 0.3)]
    c, gamma = [0.2, 0.5, 0.3], [1.0, 0.5, 2.0]
    return ops, grads, c, gamma, cograd.transference_norms(grads, c, gamma)[3:5].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_cograd_pass_forms_the_rule_and_its_norms(dtype):
    """``cograd_pass`` against the eager rule: the aggregate (alone, as between sums, or with the norms,
    as on a statistics step; in place in the first gradient or not) and the norms agree up to
    rounding, whatever the number of threads (the norms bit for bit); a NaN or an inf anywhere
    fails its check."""
    from concord.balancing import cograd

    ops, grads, c, gamma, (plain2, correction2) = _cograd_pass_case(dtype, seed=46)
    kappa = 0.05 * math.sqrt(plain2 / correction2)  # a correction of 5% of the plain sum
    eps = torch.finfo(dtype).eps
    threads = torch.get_num_threads()
    norms_by_threads = []
    try:
        for n, kappa in ((1, kappa), (2, kappa), (2, 1000 * kappa)):  # the last: most elements meet the bound
            torch.set_num_threads(n)
            expected, expected_norms = cograd.coordinated_with_norms(grads, c, gamma, kappa, 1.0)
            # First-order rounding bound, element by element: the factor kappa G_k (S' - gamma_k G_k)
            # carries S''s rounding, relative to sum_j |gamma_j G_j| (which cancels in S' - gamma_k G_k).
            scale = sum(abs(y) * gy for y, gy in zip(grads, gamma))
            bound = 20 * eps * sum(ck * x.abs() * (1 + kappa * x.abs() * (scale + gk * x.abs())) for x, ck, gk in zip(grads, c, gamma))
            alone, check, _ = ops.cograd_pass(grads, c, gamma, kappa, True, False, False, False)
            with_norms, _, norms = ops.cograd_pass(grads, c, gamma, kappa, True, False, True, True)
            norms_by_threads.append(norms)
            for got in (alone, with_norms):
                assert bool(((got - expected).abs() <= bound).all()), float(((got - expected).abs() / bound).max())
            torch.testing.assert_close(norms, expected_norms.double(), rtol=100 * eps, atol=0)
            assert float(check) == 0.0
            donated = [t.clone() for t in grads]
            in_place, _, _ = ops.cograd_pass(donated, c, gamma, kappa, True, True, False, False)
            assert in_place.data_ptr() == donated[0].data_ptr()
            torch.testing.assert_close(in_place, alone, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    bounded = cograd.correction_telemetry(grads, c, gamma, kappa, expected, 1.0)[2] / (3 * expected.numel())
    assert bounded > 0.5, bounded
    torch.testing.assert_close(norms_by_threads[0], norms_by_threads[1], rtol=0, atol=0)
    for bad in (float("nan"), float("inf")):
        spoilt = [t.clone() for t in grads]
        spoilt[2][130, 66] = bad  # the last element: the tail of the last block
        assert not math.isfinite(float(ops.cograd_pass(spoilt, c, gamma, kappa, True, False, False, False)[1]))


def test_the_telemetry_pass_on_a_rank_with_no_rows_measures_zeros():
    """A rank whose batch is empty (a user's last, uneven batch) gives the pass no element: its
    telemetry was left unwritten, and CoGrad read the memory it was given, a garbage ||P||^2 > 0 and
    ||A - P||^2 < 0, which made a logged step raise "math domain error" now and then. The memory is
    filled with -1 first, so the test does not depend on what the allocator hands out."""
    from concord.balancing.native import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("the native passes are not built here")
    empty = [torch.zeros(0, 8) for _ in range(3)]
    for _ in range(20):
        torch.full((3,), -1.0, dtype=torch.float64)  # freed at once: its block is the next one of that size
        aggregated, check, measured = ops.cograd_telemetry_pass(empty, [1 / 3] * 3, [0.01] * 3, 0.5)
        assert aggregated.shape == (0, 8) and float(check) == 0.0
        assert measured.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_telemetry_pass_forms_the_same_aggregate_and_the_logged_telemetry(dtype):
    """``cograd_telemetry_pass`` (a logged step on a CPU): the aggregate ``cograd_pass`` forms, bit for
    bit, and in the same pass the terms of :func:`correction_telemetry` (||P||^2 and ||A - P||^2 up to
    the order of their sums; the count of factors the bound met exactly, away from the bound's edge),
    whatever the number of threads; a NaN anywhere fails its check. On a logged step CoGrad's
    ``aggregate`` then runs no second pass over the gradients."""
    from concord.balancing import cograd
    from concord.balancing.native import wide_vector_passes

    ops, grads, c, gamma, (plain2, correction2) = _cograd_pass_case(dtype, seed=47)
    threads = torch.get_num_threads()
    try:
        for n, strength in ((1, 0.05), (2, 0.05), (2, 50.0)):  # the last: many elements meet the bound
            torch.set_num_threads(n)
            kappa = strength * math.sqrt(plain2 / correction2)
            aggregated, check, measured = ops.cograd_telemetry_pass(grads, c, gamma, kappa)
            torch.testing.assert_close(aggregated, ops.cograd_pass(grads, c, gamma, kappa, True, False, False, False)[0], rtol=0, atol=0)
            expected = cograd.correction_telemetry(grads, c, gamma, kappa, aggregated, 1.0)
            torch.testing.assert_close(measured[:2], expected[:2], rtol=1000 * torch.finfo(dtype).eps, atol=0)
            assert measured[2] == expected[2] and float(check) == 0.0
    finally:
        torch.set_num_threads(threads)
    assert expected[2] > 0  # the bound met
    spoilt = [t.clone() for t in grads]
    spoilt[1][130, 66] = float("nan")
    assert not math.isfinite(float(ops.cograd_telemetry_pass(spoilt, c, gamma, kappa)[1]))

    if wide_vector_passes() is None:
        return
    balancer = build_balancer("cograd", TASKS, gamma=gamma, weights=c, strength=50.0)  # kappa as in the last case
    passes = []
    balancer.run_rule = lambda rule, *args: passes.append(rule.__name__)
    balancer.telemetry_due = True
    stats = StepStats(np.eye(3), np.ones(3), np.ones(3, dtype=bool), 131, 131, extra=np.array([plain2, correction2]))
    torch.testing.assert_close(balancer.aggregate(grads, stats), aggregated, rtol=0, atol=0)
    assert passes == [] and balancer.telemetry(stats)["bounded_share"] == float(expected[2]) / (3 * aggregated.numel())


def test_the_compiled_cograd_pass_gives_the_same_aggregate_at_every_vector_width():
    """Every vector width the CPU has (16 bytes everywhere, AVX2's 32, AVX-512's 64) forms the rule:
    the widths with fused multiply-adds (32, 64) the same aggregate bit for bit, the 16-byte one
    (none on x86) within the rounding bound, the norms up to the order of their sums; so the
    variants that this machine does not pick are checked here too."""
    from concord.balancing import cograd
    from concord.balancing.native import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("the native node cannot be built on this machine (a C++ compiler and ninja are needed)")
    g = torch.Generator().manual_seed(47)
    c, gamma = [0.2, 0.5, 0.3], [1.0, 0.5, 2.0]
    for dtype in (torch.float32, torch.float64):
        grads = [torch.randn(131, 67, generator=g, dtype=torch.float64).to(dtype) * s for s in (1.0, 20.0, 0.3)]
        plain2, correction2 = cograd.transference_norms(grads, c, gamma)[3:5].tolist()
        kappa = 0.5 * math.sqrt(plain2 / correction2)
        results = {}
        try:
            for width in ops.vector_widths():
                ops.use_vector_width(width)
                results[width] = [ops.cograd_pass(grads, c, gamma, kappa, True, False, norms, norms) for norms in (False, True)]
        finally:
            ops.use_vector_width(0)
        expected, expected_norms = cograd.coordinated_with_norms(grads, c, gamma, kappa, 1.0)
        eps = torch.finfo(dtype).eps
        scale = sum(abs(y) * gy for y, gy in zip(grads, gamma))  # as in the test above
        bound = 20 * eps * sum(ck * x.abs() * (1 + kappa * x.abs() * (scale + gk * x.abs())) for x, ck, gk in zip(grads, c, gamma))
        for width, (alone, with_norms) in results.items():
            for got in (alone[0], with_norms[0]):
                assert bool(((got - expected).abs() <= bound).all()), (dtype, width)
            torch.testing.assert_close(with_norms[2], expected_norms.double(), rtol=100 * eps, atol=0)
            if width in (32, 64) and 32 in results and 64 in results:
                assert torch.equal(alone[0], results[32][0][0]) and torch.equal(with_norms[0], results[32][1][0]), (dtype, width)


class _CountingOps:
    """The compiled module with its statistics pass counted."""

    def __init__(self, ops) -> None:
        self.ops, self.passes, self.donated = ops, 0, 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def gram_and_sum(self, *args):
        self.passes += 1
        self.donated += bool(args[-1])  # the sum formed in the first gradient
        return self.ops.gram_and_sum(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_statistics_pass_forms_the_python_statistics_steps_sum(monkeypatch, caplog, dtype):
    """A lagged rule's statistics steps on the compiled pass (the Gram and the sum in one read of the
    gradients) give the Python statistics step's sum bit for bit, its Gram up to the dot products'
    rounding (summed in float64 across blocks there, in the gradients' dtype by ``torch.dot``), and
    the same tasks left out: an absent head, a non-finite loss, a non-finite gradient. Fixed weights,
    statistics on every step (every step is logged)."""
    import concord.balancing.boundary as module
    from concord.balancing.native import native_ops

    if native_ops() is None:
        pytest.skip("the native pass cannot be built on this machine (a C++ compiler and ninja are needed)")
    generator = torch.Generator().manual_seed(45)
    steps = [[(torch.randn(67, 129, generator=generator, dtype=torch.float64) * s).to(dtype) for s in (1.0, 20.0, 0.3)]
             for _ in range(8)]

    def run(ops):
        monkeypatch.setattr(module, "native_ops", lambda: ops)
        boundary = RepresentationBoundary(build_balancer("fixed", TASKS, weights=[0.5, 0.3, 0.2]), statistics="previous")
        out = []
        for t, grads in enumerate(steps):
            z = torch.zeros_like(grads[0], requires_grad=True)
            views = boundary(z)
            losses = [(v * g).sum() for v, g in zip(views, grads)]
            if t == 2:
                losses[2] = losses[2].detach()  # head c absent
            if t == 4:
                losses[1] = losses[1] * float("nan")
            if t == 6:
                losses[0] = losses[0] + torch.sqrt(views[0][3, 1] * 0)  # a NaN in G_a alone
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="concord.balancing"):
                boundary.objective(torch.stack(losses)).backward()
            out.append((z.grad.clone(), boundary.last_stats, caplog.text.count("left out") + caplog.text.count("skipped")))
        return out

    counting = _CountingOps(native_ops())
    native, python = run(counting), run(None)
    assert counting.passes == len(steps) and counting.donated > 0
    for t, ((a, stats_a, warned_a), (b, stats_b, warned_b)) in enumerate(zip(native, python)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {t}")
        assert warned_a == warned_b, t
        if stats_b is not None:
            assert stats_a.active.tolist() == stats_b.active.tolist(), t
            scale = float(np.max(np.diagonal(stats_b.gram)))
            np.testing.assert_allclose(stats_a.gram, stats_b.gram, rtol=1e-5, atol=1e-6 * scale)
    # G_a left out at step 6, the others summed; the statistics that say so are read one step later.
    assert native[6][0].abs().sum() > 0 and not native[7][1].active[0] and native[7][1].active[1:].all()


def test_a_statistics_step_formed_in_a_given_up_gradient_leaves_it_out_with_a_non_finite_one(monkeypatch, caplog):
    """On the compiled pass a statistics step's sum is formed in the first task's gradient, which
    autograd gave up; if another task's gradient then proves non-finite, the first one is gone too:
    both are left out (the first with a warning naming it) and the third is summed alone."""
    import concord.balancing.boundary as module
    from concord.balancing.native import native_ops

    if native_ops() is None:
        pytest.skip("the native pass cannot be built on this machine (a C++ compiler and ninja are needed)")
    counting = _CountingOps(native_ops())
    monkeypatch.setattr(module, "native_ops", lambda: counting)
    boundary = RepresentationBoundary(build_balancer("fixed", TASKS, weights=[0.5, 0.3, 0.2]), statistics="previous")
    grads = _random_steps(46, 1)[0]
    with caplog.at_level(logging.WARNING, logger="concord.balancing"):
        got = _backward_through(boundary, grads, nonfinite=(1,))
    assert counting.passes == 1 and counting.donated == 1
    torch.testing.assert_close(got, 0.2 * grads[2], rtol=0, atol=0)
    assert "'a': summed with a non-finite gradient of another task before the check: left out" in caplog.text


def test_the_compiled_pass_gives_the_same_bits_on_any_number_of_threads():
    """The pass shares its blocks among torch's threads; each block's dot products are summed in block
    order, so one thread and two give the same Gram and the same sum (a size torch would split)."""
    from concord.balancing.native import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("the native pass cannot be built on this machine (a C++ compiler and ninja are needed)")
    generator = torch.Generator().manual_seed(47)
    grads = [torch.randn(300, 1001, generator=generator) * s for s in (1.0, 20.0, 0.3)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ops.gram_and_sum(grads, [0.2, 0.5, 0.3], [True, True, True], True, False))
    finally:
        torch.set_num_threads(threads)
    (sum_1, gram_1), (sum_2, gram_2) = results
    assert torch.equal(sum_1, sum_2) and torch.equal(gram_1, gram_2)
    assert torch.equal(sum_1, weighted_sum(grads, [0.2, 0.5, 0.3], [True, True, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_checked_sum_pass_gives_weighted_sums_bits_and_finds_a_nonfinite_element(dtype):
    """The pass a step with known coefficients forms its sum with (``_checked_sum``): ``weighted_sum``'s
    bits, in a new tensor or in the first gradient given up, and False where any element is not finite."""
    from concord.balancing.native import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("the native pass cannot be built on this machine (a C++ compiler and ninja are needed)")
    generator = torch.Generator().manual_seed(48)
    grads = [(torch.randn(300, 1001, generator=generator) * s).to(dtype) for s in (1.0, 20.0, 0.3)]
    expected = weighted_sum(grads, [0.2, 0.5, 0.3], [True, False, True])
    out, finite = ops.checked_weighted_sum([grads[0], grads[2]], [0.2, 0.3], False)
    assert finite and torch.equal(out, expected) and out.data_ptr() != grads[0].data_ptr()
    first = grads[0].clone()
    out, finite = ops.checked_weighted_sum([first, grads[2]], [0.2, 0.3], True)
    assert finite and torch.equal(out, expected) and out.data_ptr() == first.data_ptr()
    grads[2][299, 1000] = float("inf")
    assert not ops.checked_weighted_sum([grads[0], grads[2]], [0.2, 0.3], False)[1]


def test_a_compiler_without_openmp_builds_the_native_module_from_the_same_sources(monkeypatch, caplog):
    """The first build (with OpenMP) fails; the second (without) gets the sources as they are on
    disk: PyTorch's load_inline adds its header and module definition to the list it is given, so a
    shared list would define the module twice. Where both fail, the boundary keeps its Python nodes."""
    from torch.utils import cpp_extension

    from concord.balancing import native

    given = []

    def failing_build(name, cpp_sources, **kwargs):
        given.append((name, list(cpp_sources)))
        cpp_sources.insert(0, "#include <torch/extension.h>")  # as load_inline does
        cpp_sources.append("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}")
        raise RuntimeError(f"Error building extension '{name}'")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    with caplog.at_level(logging.INFO, logger="concord.balancing.native"):
        assert native._build() is None
    on_disk = [path.read_text() for path in native._SOURCES]
    assert [name for name, _ in given] == [native.extension_name("concord_boundary", on_disk, {"extra_cflags": ["-O3", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}),
                                           native.extension_name("concord_boundary_serial", on_disk, {"extra_cflags": ["-O3"]})]
    assert all(sources == on_disk for _, sources in given)
    assert "without OpenMP" in caplog.text and "keeps its Python node" in caplog.text


def test_each_version_of_the_native_sources_builds_under_a_name_of_its_own():
    """PyTorch keeps one build folder per extension name and rebuilds there when the sources change:
    two checkouts (or an upgrade beside a running job) under one name rebuild each other's module and
    may load the other's. The name follows the sources, the flags and the torch building them."""
    from concord.balancing.native import extension_name

    sources, flags = ["int a;", "int b;"], {"extra_cflags": ["-O3"]}
    name = extension_name("concord_boundary", sources, flags)
    assert name.startswith("concord_boundary_") and name.isidentifier()  # a module name: TORCH_EXTENSION_NAME
    assert extension_name("concord_boundary", list(sources), dict(flags)) == name
    assert extension_name("concord_boundary", ["int a;", "int c;"], flags) != name
    assert extension_name("concord_boundary", ["int a;int b;"], flags) != name  # where one file ends counts
    assert extension_name("concord_boundary", sources, {"extra_cflags": ["-O2"]}) != name


@pytest.mark.parametrize("statistics", ["current", "previous"])
def test_cograd_unbounded_is_algorithm_1s_rule_on_float32_gradients_in_either_statistics_mode(statistics):
    """``bounded: false`` turns off Concord's element bound: the aggregate is ``P - kappa C`` as the
    paper writes it, also where the compiled passes (which clamp) would otherwise run: float32
    gradients wide enough for them, current statistics (this step's kappa) and lagged (the last
    step's). The bound bites on these gradients, so the bounded rule differs from it."""
    from concord.balancing import cograd

    gen = torch.Generator().manual_seed(3)
    steps = [[torch.randn(131, 67, generator=gen, dtype=torch.float64) ** 3 * s for s in (1.0, 20.0, 0.3)] for _ in range(4)]
    gamma, strength, c = [1.0, 0.5, 2.0], 0.5, [1 / 3] * 3

    def kappa(grads):
        norms = cograd.transference_norms(grads, c, gamma)
        return strength * math.sqrt(float(norms[3]) / float(norms[4]))

    def spec(grads, k):
        s = sum(gj * g for gj, g in zip(gamma, grads))
        return sum(ci * g for ci, g in zip(c, grads)) - k * sum(ci * g * g * (s - gi * g) for ci, gi, g in zip(c, gamma, grads))

    outputs = {}
    for bounded in (False, True):
        balancer = build_balancer("cograd", TASKS, gamma=gamma, strength=strength, bounded=bounded)
        assert (balancer._wide_passes() is None) or bounded
        boundary = RepresentationBoundary(balancer, statistics=statistics, statistics_every=1)
        outputs[bounded] = []
        for grads in steps:
            z = torch.zeros(131, 67, requires_grad=True)
            views = boundary(z)
            boundary.objective(torch.stack([(v * g.float()).sum() for v, g in zip(views, grads)])).backward()
            outputs[bounded].append(z.grad.double())
    for t, grads in enumerate(steps):
        k = kappa(grads) if statistics == "current" else (kappa(steps[t - 1]) if t else 0.0)
        want = spec(grads, k)
        torch.testing.assert_close(outputs[False][t], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        if k:
            assert float((outputs[True][t] - want).abs().max()) > 1e-2 * float(want.abs().max()), t
    with pytest.raises(ValueError, match="cograd.bounded is true or false, got 'no'"):
        build_balancer("cograd", TASKS, bounded="no")
