"""``concord bench``'s statistics, on hand-made rounds."""

from __future__ import annotations

import math

import pytest

from concord.trainer.tools.bench import summarize


def _round(step_ms: float, batch: int) -> dict:
    return {"qps": 1000.0 * batch / step_ms, "step_ms": step_ms, "boundary_ms": 1.0, "comm_ms": 0.5,
            "boundary_share": 1.0 / step_ms, "compute_share": 0.5 / step_ms}


def test_the_drop_is_one_minus_the_qps_ratio_over_all_timed_steps():
    batch = 2048
    equal, slower = [40.0, 60.0], [42.0, 62.0]  # 2 ms more in each round
    report = summarize({"equal": [_round(t, batch) for t in equal], "m": [_round(t, batch) for t in slower]}, batch)
    assert report["m"]["qps_mean"] == pytest.approx(1000.0 * batch / 52.0)  # all samples over all time
    assert report["m"]["drop_pct_mean"] == pytest.approx(100.0 * (1.0 - report["m"]["qps_mean"] / report["equal"]["qps_mean"]))
    assert report["m"]["drop_pct_mean"] == pytest.approx(100.0 * 2.0 / 52.0)  # not the mean of 2/42 and 2/62
    assert report["m"]["drop_pct_sem"] == 0.0  # the paired difference does not vary
    assert report["equal"]["drop_pct_mean"] == 0.0


def test_the_standard_error_comes_from_the_paired_differences():
    batch = 1024
    equal, other = [50.0, 50.0, 50.0, 50.0], [51.0, 49.0, 53.0, 51.0]  # differences 1, -1, 3, 1
    report = summarize({"equal": [_round(t, batch) for t in equal], "m": [_round(t, batch) for t in other]}, batch)
    spread = math.sqrt(((1 - 1) ** 2 + (-1 - 1) ** 2 + (3 - 1) ** 2 + (1 - 1) ** 2) / 3)
    assert report["m"]["drop_pct_sem"] == pytest.approx(100.0 * spread / 2.0 / 51.0)
    assert report["m"]["drop_pct_mean"] == pytest.approx(100.0 * 1.0 / 51.0)


def test_the_drop_against_the_model_without_the_boundary_is_paired_too():
    batch = 1024
    rounds = {"none": [40.0, 50.0], "equal": [41.0, 51.0], "m": [42.0, 52.0]}
    report = summarize({m: [_round(t, batch) for t in ts] for m, ts in rounds.items()}, batch)
    assert report["m"]["drop_vs_none_pct_mean"] == pytest.approx(100.0 * 2.0 / 47.0)
    assert report["equal"]["drop_vs_none_pct_mean"] == pytest.approx(100.0 * 1.0 / 46.0)
    assert report["none"]["drop_vs_none_pct_mean"] == 0.0
    without = summarize({m: [_round(t, batch) for t in ts] for m, ts in rounds.items() if m != "none"}, batch)
    assert math.isnan(without["m"]["drop_vs_none_pct_mean"])  # no baseline ran


def test_step_timings_add_up_repeated_phases_and_read_deferred_figures_apart_from_the_step():
    from concord.trainer.observe.timing import StepTimings

    marks = [("start", 0.0), ("input_dist", 1.0), ("data", 1.5), ("input_dist", 2.0), ("forward", 5.0)]
    timings = StepTimings(marks, cuda=False)
    timings.defer("boundary", lambda: 0.25)
    assert timings["input_dist"] == 1.5 and timings["data"] == 0.5 and timings["forward"] == 3.0
    assert timings["step"] == 5.0 and timings["boundary"] == 0.25  # the boundary is inside a phase, not added


def test_the_boundary_times_each_backward_on_its_own_clock():
    import torch

    from concord.balancing import RepresentationBoundary, build_balancer

    boundary = RepresentationBoundary(build_balancer("mgda", ["a", "b"]))
    z = torch.randn(8, 4, requires_grad=True)
    views = boundary(z)
    boundary.objective(torch.stack([(v ** 2).sum() * (k + 1) for k, v in enumerate(views)])).backward()
    clock = boundary.backward_clock
    assert clock is not None and clock.end is not None and boundary.backward_seconds == clock.seconds() > 0
