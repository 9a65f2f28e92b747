"""The boundary in float32 and on each device: every method gives, in float32 on the CPU and on a GPU,
what it gives in float64 on the CPU, and the statistics travel over gloo and NCCL. The CUDA cases are
skipped where no GPU is visible (CI has none); on a GPU machine, ``pytest tests/test_devices.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from concord.balancing import RepresentationBoundary, available_balancers, build_balancer

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))

TASKS = ["a", "b", "c"]


def _steps(name: str, device: str, dtype: torch.dtype, steps: int = 4):
    """Aggregates of ``steps`` boundary steps on fixed random gradients, as float64 on the CPU."""
    boundary = RepresentationBoundary(build_balancer(name, TASKS), telemetry_every=2).to(device)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(64, 16, generator=g, dtype=torch.float64) * s for s in (1.0, -3.0, 0.2)]
        z = torch.randn(64, 16, generator=g, dtype=torch.float64)
        losses = torch.tensor([0.7, 2.0, 40.0], dtype=torch.float64) / (step + 1)
        boundary.objective(losses.to(device, dtype))
        a = boundary.balance(tuple(x.to(device, dtype) for x in grads), z.to(device, dtype))
        assert a.device.type == torch.device(device).type and a.dtype == dtype
        out.append(a.double().cpu())
    return out, boundary


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", available_balancers())
def test_every_method_in_float32_gives_what_it_gives_in_float64(name, device):
    on_cpu, _ = _steps(name, "cpu", torch.float64)
    in_float32, boundary = _steps(name, device, torch.float32)
    for step, (expected, got) in enumerate(zip(on_cpu, in_float32)):
        # float32 rounding of the gradients and the dot products, nothing else
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5, msg=f"{name}, step {step}")
    assert all(w == w for w in boundary.telemetry()["weights"])  # no NaN weights


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_equal_in_float32_is_the_gradient_of_the_mean_task_loss(device):
    torch.manual_seed(0)
    bottom = torch.nn.Sequential(torch.nn.EmbeddingBag(100, 8, mode="sum"), torch.nn.Linear(8, 16)).to(device)
    heads = torch.nn.ModuleList([torch.nn.Linear(16, 1) for _ in TASKS]).to(device)
    ids, offsets = torch.randint(0, 100, (64,), device=device), torch.arange(0, 64, 2, device=device)
    y = torch.randn(32, 3, device=device)

    def losses(views):
        return torch.stack([((h(v).squeeze(1) - y[:, k]) ** 2).mean() for k, (h, v) in enumerate(zip(heads, views))])

    z = bottom[1](bottom[0](ids, offsets))
    losses(tuple(z for _ in TASKS)).mean().backward()
    expected = [p.grad.clone() for p in bottom.parameters()]
    bottom.zero_grad()
    boundary = RepresentationBoundary(build_balancer("equal", TASKS))
    z = bottom[1](bottom[0](ids, offsets))
    boundary.objective(losses(boundary(z))).backward()
    for got, want in zip((p.grad for p in bottom.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", [("gloo", "cpu"), pytest.param("nccl", "cuda", marks=CUDA.marks)])
def test_the_statistics_travel_through_the_backend(backend, device, monkeypatch):
    """One rank taking the collective path (one GPU cannot hold two NCCL ranks): the statistics go
    through the process group (NCCL: one all_reduce on the GPU; gloo: one all-to-all, which here
    hands this rank its vector twice, the statistics of two ranks holding the same batch) and give
    what the boundary gives without one."""
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    expected, _ = _steps("multibalance", device, torch.float32)
    dist.init_process_group(backend, device_id=torch.device("cuda", 0) if backend == "nccl" else None)
    collective = "all_reduce" if backend == "nccl" else "all_to_all_single"
    try:
        calls = []

        def counting(real):
            def call(output, *args, **kwargs):
                calls.append((real.__name__, output.device.type))
                return real(output, *args, **kwargs)

            return call

        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # take the collective path
        for name in ("all_reduce", "all_to_all_single"):
            monkeypatch.setattr(dist, name, counting(getattr(dist, name)))
        got, _ = _steps("multibalance", device, torch.float32)
    finally:
        dist.destroy_process_group()
    assert calls == [(collective, device)] * len(expected)  # one collective a step, on the GPU for NCCL
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_torch_only_boundary_bench_times_every_method(capsys):
    """``python -m concord.trainer.tools.boundary_bench`` (the bench for a GPU machine without fbgemm-gpu), run small
    on the CPU: a step time per method and round, and the table."""
    from concord.trainer.tools.boundary_bench import run

    methods = ["none", "equal", "cograd", "multibalance@previous/2"]
    step_ms = run(methods, "cpu", batch=32, d=16, num_tasks=3, rounds=2, steps=2, profile_steps=2)
    assert set(step_ms) == set(methods) and all(len(v) == 2 and min(v) > 0 for v in step_ms.values())
    table = capsys.readouterr().out
    assert "| cograd |" in table and "drop vs equal (± s.e.)" in table
    assert "| none | – |" not in table and "| equal | " in table.split("profile, 2 steps a method")[1]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["equal", "multibalance", "emtl", "cograd"])
def test_lagged_statistics_read_nothing_on_the_host_inside_backward(name, device):
    """Lagged statistics on a GPU: no synchronisation with the host in any backward (statistics
    steps, the steps between sums and the steps that read a sum alike), and the same aggregates as
    on the CPU; on the CPU (where a host read is free) the host path, for the same figures."""
    def run(device: str):
        every = 2
        boundary = RepresentationBoundary(build_balancer(name, TASKS), statistics="previous", statistics_every=every,
                                          telemetry_every=4).to(device)
        out = []
        for step in range(8):
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(64, 16, generator=g) * s for s in (1.0, -3.0, 0.2)]
            z = torch.zeros(64, 16, device=device, requires_grad=True)
            views = boundary(z)
            losses = torch.stack([(v * x.to(device)).sum() for v, x in zip(views, grads)])
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                boundary.objective(losses).backward()
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            out.append(z.grad.cpu())
        return out

    for got, expected in zip(run(device), run("cpu")):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_the_step_timer_waits_for_the_device_only_when_a_figure_is_read(device):
    """The trainer's step timing on a GPU: CUDA events recorded each step, no synchronisation with the
    host until the QPS meter is read (the logging interval), and then each phase's figure."""
    from concord.trainer.observe.timing import QPSMeter, StepTimer

    timer, meter = StepTimer(torch.device(device)), QPSMeter(global_batch_size=256, qps_skip_steps=1, window=4)
    x = torch.randn(256, 256, device=device)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            timer.start()
            y = x @ x
            timer.mark("forward")
            (y * 2).sum()
            timer.mark("backward")
            meter.update(timer.read())
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    phases = meter.breakdown()
    assert set(phases) == {"forward_ms", "backward_ms", "step_ms"}
    assert phases["forward_ms"] > 0 and phases["step_ms"] == pytest.approx(phases["forward_ms"] + phases["backward_ms"])
    assert meter.lifetime_steps == 5 and meter.windowed_qps() > 0
