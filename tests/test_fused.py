"""The element-wise rules compiled into one kernel give what the same rules give eagerly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from concord.balancing import RepresentationBoundary, build_balancer
from concord.balancing import cograd as cograd_module
from concord.balancing import fused as fused_module
from concord.balancing.fused import MIN_FUSED_NUMEL, FusedRule
from concord.balancing.native import wide_vector_passes

TASKS = ["a", "b", "c"]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


def _gradients(rows: int, cols: int, step: int):
    g = torch.Generator().manual_seed(step)
    # CoGrad's cubic term at the scale of real gradients (rows of G are per-sample gradients / B)
    grads = tuple(torch.randn(rows, cols, generator=g) * s / rows for s in (1.0, -3.0, 10.0))
    return grads, torch.randn(rows, cols, generator=g)


def _aggregates(name: str, fused: bool, rows: int, cols: int, knobs: dict, dtype=torch.float32, device="cpu"):
    boundary = RepresentationBoundary(build_balancer(name, TASKS, fused=fused, **knobs))
    out = []
    for step in range(3):
        grads, z = _gradients(rows, cols, step)
        grads, z = tuple(g.to(device, dtype) for g in grads), z.to(device, dtype)
        boundary.objective(torch.tensor([0.6, 0.05, 40.0], device=device))
        out.append(boundary.balance(grads, z).cpu())
    return out, boundary


def _without_native_passes(monkeypatch) -> None:
    """CoGrad's rule as ``torch.compile`` builds it, where Concord's compiled passes would run it on a CPU."""
    monkeypatch.setattr(cograd_module, "wide_vector_passes", lambda: None)


@pytest.mark.parametrize("native", [False, True])  # on a CPU: Inductor's C++ loop, or CoGrad's compiled pass
@pytest.mark.parametrize("device", ["cpu", CUDA])  # Triton on CUDA
def test_compiled_cograd_and_graddrop_equal_their_eager_rules(device, native, monkeypatch):
    """Compiled and eager run the same float32 arithmetic in different orders, so they agree to a
    few float32 roundings of the largest term: for CoGrad that is the cubic correction, which can
    exceed the aggregate (the two are checked against a float64 run for scale)."""
    if native and (device != "cpu" or wide_vector_passes() is None):
        pytest.skip("CoGrad's compiled pass runs on a CPU with wide vectors where the native module builds")
    if not native:
        _without_native_passes(monkeypatch)
    rows, cols = 256, MIN_FUSED_NUMEL // 256
    eps = torch.finfo(torch.float32).eps
    for name, knobs in (("cograd", {"gamma": [0.02, 0.01, 0.05]}), ("graddrop", {"leak": 0.2, "seed": 5})):
        eager, _ = _aggregates(name, False, rows, cols, knobs, device=device)
        compiled, boundary = _aggregates(name, True, rows, cols, knobs, device=device)
        in_float64, _ = _aggregates(name, False, rows, cols, knobs, torch.float64)
        rules = list(getattr(boundary.balancer, "_fused_rules", {}).values())
        if name == "cograd" and native:  # the rule and its telemetry in the compiled passes: nothing for torch.compile
            assert not rules
        else:
            assert rules and all(r._compiled is not None and r._failure is None for r in rules), name
        for step, (a, b, exact) in enumerate(zip(compiled, eager, in_float64)):
            plain = sum(g.double() for g in _gradients(rows, cols, step)[0]) / 3
            scale = float(plain.abs().max() + (exact - plain).abs().max())  # the largest term's size
            for got in (a, b):
                torch.testing.assert_close(got.double(), exact, rtol=0, atol=16 * eps * scale, msg=f"{name}, step {step}")
        if name == "cograd":  # the correction is a visible share of the step, not rounding
            assert boundary.telemetry()["correction_ratio"] > 1e-3


def test_small_gradients_run_eagerly_without_compiling(monkeypatch):
    _without_native_passes(monkeypatch)  # which take gradients of any size
    _, boundary = _aggregates("cograd", True, 8, 4, {})
    rules = boundary.balancer._fused_rules.values()
    assert rules and all(rule._compiled is None for rule in rules)


def test_a_rule_that_does_not_compile_runs_eagerly_after_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(fused_module.torch, "compile", broken_compile)
    calls = []

    def rule(grads, scale: float):
        calls.append(1)
        return sum(grads) * scale

    fused = FusedRule(rule)
    grads = [torch.ones(MIN_FUSED_NUMEL), torch.full((MIN_FUSED_NUMEL,), 2.0)]
    with caplog.at_level(logging.WARNING, logger="balancing.fused"):
        first, second = fused(grads, 0.5), fused(grads, 0.5)
    assert torch.equal(first, torch.full((MIN_FUSED_NUMEL,), 1.5)) and torch.equal(second, first)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "more detail" not in warnings[0]
    assert len(calls) == 2  # both calls ran the eager rule; the second did not try to compile again


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("name,statistics", [("cograd", "current"), ("cograd", "previous"), ("graddrop", "current")])
def test_rules_are_compiled_in_the_forward_pass_not_inside_backward(monkeypatch, name, statistics, native):
    """The first call of a compiled rule builds it (seconds): the boundary's forward makes that
    call, on zeros of the representation's shape, and again for a new shape; backward only runs it.
    Where CoGrad's compiled pass runs its rule and its logged telemetry (``native``), only the
    telemetry is compiled, for a lagged run's logged step whose aggregate a statistics step formed."""
    if native and (name != "cograd" or wide_vector_passes() is None):
        pytest.skip("CoGrad's compiled pass, on a CPU with wide vectors where the native module builds")
    if not native:
        _without_native_passes(monkeypatch)
    built, ran = [], []

    def recording_compile(fn, **kwargs):
        def run(*args):
            inside_backward = torch._C._current_graph_task_id() != -1
            (ran if (fn, args[0][0].shape) in [b[:2] for b in built] else built).append((fn, args[0][0].shape, inside_backward))
            return fn(*args)

        return run

    monkeypatch.setattr(fused_module.torch, "compile", recording_compile)
    boundary = RepresentationBoundary(build_balancer(name, TASKS), statistics=statistics)
    heads = [torch.nn.Linear(MIN_FUSED_NUMEL // 256, 1) for _ in TASKS]
    for rows in (256, 256, 300, 300):
        z = torch.randn(rows, MIN_FUSED_NUMEL // 256, requires_grad=True)
        views = boundary(z)
        assert not any(inside for *_, inside in built), "built inside backward"
        boundary.objective(torch.stack([h(v).square().mean() for h, v in zip(heads, views)])).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
    rules = {fn for fn, *_ in built}
    expected = {"graddrop": {"signed_column_sums", "sign_split"}, "cograd": {"transference_norms", "coordinated_with_total", "correction_telemetry"}}[name]
    if statistics == "previous":
        expected = expected | {"coordinated_with_norms"}
    if native and statistics == "current":  # the rule and its logged telemetry run in the compiled passes
        assert not built and not ran
        return
    assert {fn.__name__ for fn in rules} == ({"correction_telemetry"} if native else expected)
    assert sorted({shape[0] for _, shape, _ in built}) == [256, 300]  # each shape built once, in forward
    assert len(built) == 2 * len(rules) and any(inside for *_, inside in ran)  # run inside backward, built before


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("statistics", ["current", "previous"])
def test_a_new_kappa_each_step_compiles_nothing_inside_backward(statistics, native, monkeypatch):
    """CoGrad's ``kappa`` changes every step; with the real compiler, nothing is compiled after the
    forward pass that met the shape (Dynamo's graph count does not move inside backward)."""
    if not native:
        _without_native_passes(monkeypatch)
    counters = torch._dynamo.utils.counters
    boundary = RepresentationBoundary(build_balancer("cograd", TASKS), statistics=statistics)
    heads = [torch.nn.Linear(MIN_FUSED_NUMEL // 256, 1) for _ in TASKS]
    for step in range(4):
        z = (step + 1.0) * torch.randn(256, MIN_FUSED_NUMEL // 256, requires_grad=True)
        views = boundary(z)
        graphs = counters["stats"]["unique_graphs"]
        boundary.objective(torch.stack([(h(v) * (k + 1)).square().mean() for k, (h, v) in enumerate(zip(heads, views))])).backward()
        assert counters["stats"]["unique_graphs"] == graphs, f"compiled inside backward at step {step}"
    assert boundary.telemetry()["kappa"] > 0


def test_cograd_keeps_its_torch_compiled_rule_where_the_cpu_has_only_narrow_vectors(monkeypatch):
    """Where the compiled passes would have 16-byte vectors only (slower than the torch.compile'd
    rule), CoGrad's steps run that rule: no pass, no between-sums node."""
    from concord.balancing import native
    from concord.balancing.statistics import StepStats

    if native.native_ops() is None:
        pytest.skip("the native module cannot be built on this machine")
    balancer = build_balancer("cograd", TASKS)
    z = torch.zeros(256, MIN_FUSED_NUMEL // 256)
    last = StepStats(np.eye(3), np.ones(3), np.ones(3, dtype=bool), 256, 512, extra=np.array([1.0, 1.0]))
    assert native.wide_vector_passes() is not None or max(native.native_ops().vector_widths()) < 32
    monkeypatch.setitem(native._built, "wide", False)
    assert native.wide_vector_passes() is None
    assert balancer._compiled_pass([z, z, z]) is None and balancer.held_rule(last, z) is None
    monkeypatch.setitem(native._built, "wide", True)
    assert balancer._compiled_pass([z, z, z]) is not None and balancer.held_rule(last, z) is not None
    # A representation too small for torch.compile to pay runs in the passes too: they are built already.
    small = torch.zeros(64, 8)
    assert balancer._compiled_pass([small] * 3) is not None and balancer.held_rule(last, small) is not None
    eager = build_balancer("cograd", TASKS, fused=False)
    assert eager._compiled_pass([z, z, z]) is None and eager.held_rule(last, z) is None
