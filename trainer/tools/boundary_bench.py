"""The boundary's cost on one device, without TorchRec: ``python -m concord.trainer.tools.boundary_bench --device cuda``.

``concord bench`` measures the sharded demo job, which needs TorchRec and fbgemm; this bench needs
torch alone, so it runs wherever a GPU is (a machine without fbgemm-gpu included). The model has the
demo's shape: ``nn.EmbeddingBag`` tables of the demo's sizes (sparse gradients, SGD), a dense MLP,
an MLP to ``z`` (B, d), and one MLP head per task. Inputs are drawn once on the device, so the step
is model work only. Methods alternate, their order rotating each round as in ``concord bench``; a
block's time ends with a device synchronisation. Printed: QPS per method and its drop against
``equal`` and against ``none`` (no boundary: autograd sums the task gradients), from step times
paired by round, with standard errors; the boundary's own time a step (its clock: CUDA events on the
gradients' stream, read after each block) and its share of the step; and the host synchronisations
a step makes (CUDA only).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from concord.balancing import RepresentationBoundary, build_balancer
from concord.trainer.observe.timing import paired_drop
from concord.trainer.tools.methods import parse_method

TABLES = [(1_000_000, 32, 1), (200_000, 32, 2), (1_000, 16, 1), (100, 16, 1)]  # rows, dim, features


def _mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DemoShapedRanker(nn.Module):
    """ids (F, B*L) per feature, dense (B, 8) -> z (B, d) -> T heads -> losses (T,).

    ``width``: the hidden layers between the features and ``z`` (the demo's: one of 512). A GPU runs
    the demo's model faster than the host can launch it; wider, deeper layers (``--width 4096,4096``)
    give it the dense work of a production ranker's step, against which the boundary's cost is read."""

    def __init__(self, num_tasks: int, d: int, width: Sequence[int] = (512,)) -> None:
        super().__init__()
        self.tables = nn.ModuleList([nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for rows, dim, _ in TABLES])
        pooled = sum(dim * features for _, dim, features in TABLES)
        self.dense = _mlp([8, 128, 64])
        self.to_z = nn.Sequential(_mlp([pooled + 64, *width, d]), nn.ReLU())
        # autograd_sums as in the trainer, which hooks no view either
        self.boundary = RepresentationBoundary(build_balancer("equal", [f"task{k}" for k in range(num_tasks)]), autograd_sums=True)
        self.heads = nn.ModuleList([_mlp([d, 64, 1]) for _ in range(num_tasks)])

    def forward(self, ids: List[torch.Tensor], dense: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = dense.shape[0]
        pooled, f = [], 0
        for table, (_, _, features) in zip(self.tables, TABLES):
            for _ in range(features):
                pooled.append(table(ids[f].view(b, -1)))
                f += 1
        z = self.to_z(torch.cat(pooled + [self.dense(dense)], dim=1))
        views = self.boundary(z)
        losses = []
        for k, (head, view) in enumerate(zip(self.heads, views)):
            logit = head(view).squeeze(1)
            if k == len(self.heads) - 1:  # a regression task with ~100x the loss scale
                losses.append(nn.functional.mse_loss(logit, 10 * labels[:, k]))
            else:
                losses.append(nn.functional.binary_cross_entropy_with_logits(logit, (labels[:, k] > 0).float()))
        return self.boundary.objective(torch.stack(losses))


def _batches(count: int, batch: int, num_tasks: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(count):
        ids = [torch.randint(0, rows, (batch, 2 if feature else 1), generator=g).to(device)
               for rows, _, features in TABLES for feature in range(features)]
        out.append((ids, torch.randn(batch, 8, generator=g).to(device), torch.randn(batch, num_tasks, generator=g).to(device)))
    return out


def run(methods: List[str], device: str, batch: int, d: int, num_tasks: int, rounds: int, steps: int,
        profile_steps: int = 0, trace: Optional[str] = None, width: Sequence[int] = (512,)) -> Dict[str, List[float]]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = DemoShapedRanker(num_tasks, d, width).to(dev)
    sparse = [p for t in model.tables for p in t.parameters()]
    dense = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    sgd = torch.optim.SGD(sparse, lr=0.01)
    adam = torch.optim.Adam(dense, lr=1e-3, fused=dev.type == "cuda")
    data = _batches(16, batch, num_tasks, dev)
    names = [f"task{k}" for k in range(num_tasks)]

    def use(spec: str) -> None:
        """``METHOD``, ``METHOD@previous`` (lagged statistics) or ``METHOD@previous/K`` (every K steps)."""
        method, statistics, every = parse_method(spec)
        boundary = model.boundary
        boundary.enabled = method != "none"
        if method != "none":
            boundary.use_statistics(statistics, every)
            boundary.balancer = build_balancer(method, names)

    def step(i: int) -> None:
        ids, x, y = data[i % len(data)]
        sgd.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        model(ids, x, y).backward()
        sgd.step()
        adam.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    model.boundary.telemetry_every = 10**9
    syncs = {}
    for m in methods:  # warm-up, and the host synchronisations of one step
        use(m)
        for i in range(5):
            step(i)
        sync()
        if dev.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step(0)
                torch.cuda.set_sync_debug_mode("default")
            syncs[m] = sum("synchroniz" in str(w.message) for w in caught)
    step_ms: Dict[str, List[float]] = {m: [] for m in methods}
    boundary_ms: Dict[str, List[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            use(m)
            step(0)
            sync()
            clocks = []  # the boundary's own span in each backward (CUDA events: read after the block)
            start = time.perf_counter()
            for i in range(steps):
                step(i)
                clocks.append(model.boundary.backward_clock if dev.type == "cuda" else model.boundary.backward_seconds)
            sync()
            step_ms[m].append(1000.0 * (time.perf_counter() - start) / steps)
            if m != "none":
                boundary_ms[m].append(1000.0 * sum(c if isinstance(c, float) else c.seconds() for c in clocks if c is not None) / steps)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {1000 * batch / step_ms[m][-1]:,.0f}" for m in methods), flush=True)
    _report(step_ms, boundary_ms, syncs, device, batch, d, num_tasks, steps, width)
    if profile_steps:
        _profile(methods, use, step, sync, dev, profile_steps, step_ms, trace)
    return step_ms


def _profile(methods, use, step, sync, dev, steps: int, step_ms, trace: Optional[str]) -> None:
    """Where a step's time goes, per method, from ``torch.profiler`` over ``steps`` steps: the host's
    kernel launches a step and the device's busy time a step, against the step's wall time of the
    timed rounds. A step whose device is busy for much less than its wall time is bound by the host
    (its launches and Python), and the boundary's extra launches are then what it costs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    print(f"\nprofile, {steps} steps a method")
    print("| method | kernel launches a step | device busy ms a step | step ms (timed rounds) |")
    print("|---|---|---|---|")
    for m in methods:
        use(m)
        for i in range(3):
            step(i)
        sync()
        with profile(activities=activities) as prof:
            for i in range(steps):
                step(i)
            sync()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"))
        busy_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1000.0
        print(f"| {m} | {launches / steps:.0f} | {busy_ms / steps:.3f} | {statistics.mean(step_ms[m]):.3f} |")
        if trace and m == methods[-1]:
            prof.export_chrome_trace(trace)


def _drop(step_ms: Dict[str, List[float]], method: str, base: str) -> str:
    if base not in step_ms or method == base:
        return "–"
    drop, sem = paired_drop(step_ms[method], step_ms[base])
    return f"{drop:+.2f} ± {sem:.2f}%"


def _report(step_ms, boundary_ms, syncs, device, batch, d, num_tasks, steps, width) -> None:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"\n{name}, batch {batch}, d {d}, T {num_tasks}, hidden layers {list(width)} to z, {steps} steps a block, "
          f"{len(next(iter(step_ms.values())))} rounds")
    print("| method | QPS | drop vs equal (± s.e.) | drop vs none (± s.e.) | boundary ms a step (% of step) | host syncs a step |")
    print("|---|---|---|---|---|---|")
    for m, times in step_ms.items():
        qps = 1000.0 * batch / statistics.mean(times)
        spans = boundary_ms[m]
        own = f"{statistics.mean(spans):.3f} ({100 * sum(spans) / sum(times):.2f}%)" if spans else "–"
        print(f"| {m} | {qps:,.0f} | {_drop(step_ms, m, 'equal')} | {_drop(step_ms, m, 'none')} | {own} | {syncs.get(m, '–')} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="none,equal,multibalance,emtl,cograd,graddrop",
                        help="comma-separated; METHOD@previous for lagged statistics, METHOD@previous/K for every K steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--width", default="512", help="comma-separated widths of the hidden layers to z (the demo's: 512)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile STEPS steps of each method: kernel launches and device busy time a step")
    parser.add_argument("--trace", help="with --profile: the last method's profile as a Chrome trace to this file")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if "equal" not in methods:
        methods.insert(0, "equal")
    run(methods, args.device, args.batch, args.dim, args.tasks, args.rounds, args.steps, args.profile, args.trace,
        [int(w) for w in args.width.split(",")])


if __name__ == "__main__":
    main()
