"""Property 6: W ranks holding B rows each give the same task weights, and the same parameter
gradients, as 1 rank holding the W*B rows concatenated (2 gloo ranks), for every balancer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import concord.balancing.views as views_module
from concord.balancing import RepresentationBoundary, build_balancer
from concord.balancing.collectives import DDPRide, HostExchange, host_exchange_possible
from concord.balancing.param_level import PARAMETER_LEVEL, build_parameter_level
from distributed import run_ranks
from mtl_helpers import ToyMTL, stats_for, toy_batch

pytestmark = pytest.mark.multiprocess

TASKS = ["a", "b", "c"]
ROWS, STEPS = 24, 6
SCALES = (1.0, 30.0, 0.3)  # unequal loss scales, so weights move
CASES = {
    "equal": ("equal", {}),
    "multibalance": ("multibalance", {}),
    "multibalance-no-ema": ("multibalance", {"beta": 0.0, "lr": 0.5}),
    "emtl": ("emtl", {}),
    "emtl-bandit-only": ("emtl", {"beta": 0.0}),
    "cograd": ("cograd", {"gamma": 0.05}),
    "mgda-loss+": ("mgda", {"normalization": "loss+"}),
    "uncertainty": ("uncertainty", {"init": 0.2}),
    "pcgrad": ("pcgrad", {"seed": 3}),
    "gradvac": ("gradvac", {"seed": 3}),
    "graddrop": ("graddrop", {"seed": 3}),
    "dbmtl": ("dbmtl", {}),
    "imtlg": ("imtlg", {}),
    # statistics="previous": step t balanced with step t-1's global statistics, the same on every rank
    "multibalance-lagged": ("multibalance", {}, "previous"),
    "emtl-lagged": ("emtl", {}, "previous"),
    "cograd-lagged": ("cograd", {"gamma": 0.05}, "previous"),
    "equal-lagged": ("equal", {}, "previous"),
    # statistics_every=2: the rule runs on every other step's sum, the coefficients held between
    "multibalance-every-2": ("multibalance", {}, "previous", 2),
    "emtl-every-2": ("emtl", {}, "previous", 2),
    "cograd-every-3": ("cograd", {"gamma": 0.05}, "previous", 3),  # each step corrected, kappa held
    "cograd-guard-every-3": ("cograd", {"gamma": 0.05, "guard": True}, "previous", 3),  # kappa from every task's costs
    # the lagged statistics carried by DDP's gradient all-reduce (DDPRide) instead of their own collective
    "multibalance-lagged-in-ddp": ("multibalance", {}, "previous", 1, "ddp"),
    "emtl-every-2-in-ddp": ("emtl", {}, "previous", 2, "ddp"),
    "cograd-lagged-in-ddp": ("cograd", {"gamma": 0.05}, "previous", 1, "ddp"),
    "cograd-every-2-in-ddp": ("cograd", {"gamma": 0.05}, "previous", 2, "ddp"),
    "equal-lagged-in-ddp": ("equal", {}, "previous", 1, "ddp"),
    # the lagged statistics summed through shared memory on this host (HostExchange)
    "multibalance-lagged-on-host": ("multibalance", {}, "previous", 1, "host"),
    "emtl-every-2-on-host": ("emtl", {}, "previous", 2, "host"),
    "cograd-lagged-on-host": ("cograd", {"gamma": 0.05}, "previous", 1, "host"),
    "equal-lagged-on-host": ("equal", {}, "previous", 1, "host"),
    # a GPU's lagged path (no host read in backward), run on these CPU tensors
    "equal-lagged-no-host-reads": ("equal", {}, "previous", 1, "device"),
    "multibalance-every-2-no-host-reads": ("multibalance", {}, "previous", 2, "device"),
    "cograd-lagged-no-host-reads": ("cograd", {"gamma": 0.05}, "previous", 1, "device"),
    "cograd-every-3-no-host-reads": ("cograd", {"gamma": 0.05}, "previous", 3, "device"),
    "cograd-guard-no-host-reads": ("cograd", {"gamma": 0.05, "guard": True}, "previous", 1, "device"),
    "param_mgda": ("param_mgda", {}),
    "param_moco": ("param_moco", {}),
}


def _run(rank: int, world_size: int, empty_last_rank: bool = False):
    """Every case: STEPS steps on this rank's rows; per step the weights, A rows, averaged gradients.

    ``empty_last_rank``: the first rank holds every row and the last none (its losses, means over no
    rows, are NaN); the gradients are then this rank's own, not averaged, and the cases are those
    whose ranks' gradients meet only in the boundary's statistics (no DDP, no parameter-level rule)."""
    group = None
    if world_size > 1:
        dist.init_process_group("gloo")
        group = dist.new_group()
    results = {}
    reads_on_host = views_module.reads_on_host
    for case, (name, knobs, *mode) in CASES.items():
        if empty_last_rank and (name in PARAMETER_LEVEL or mode[2:] == ["ddp"]):
            continue
        views_module.reads_on_host = (lambda tensor: False) if mode[2:] == ["device"] else reads_on_host
        model = ToyMTL(3)
        param_level = None
        if name in PARAMETER_LEVEL:  # weights the losses; the boundary passes the gradient through
            boundary = RepresentationBoundary(build_balancer("equal", TASKS), "sum", process_group=group)
            param_level = build_parameter_level(name, TASKS, list(model.bottom.parameters()), group, **knobs)
        else:
            boundary = RepresentationBoundary(build_balancer(name, TASKS, **knobs), process_group=group,
                                              statistics=mode[0] if mode else "current",
                                              statistics_every=mode[1] if len(mode) > 1 else 1)
        per_rank = ROWS // world_size
        first, last = (rank * per_rank, (rank + 1) * per_rank) if not empty_last_rank else (0, ROWS if rank == 0 else 0)
        in_ddp = mode[2:] == ["ddp"] and world_size > 1
        on_host = mode[2:] == ["host"] and world_size > 1
        forward = _Forward(model, boundary)
        if in_ddp:  # DDP averages the gradients, and its last bucket carries the statistics
            forward = torch.nn.parallel.DistributedDataParallel(forward)
            boundary.ride = DDPRide()
            forward.register_comm_hook(None, boundary.ride.hook)
        if on_host:
            boundary.ride = HostExchange(group)
        if in_ddp or on_host:
            carried, carry = [], boundary.ride.carry
            boundary.ride.carry = lambda values: carried.append(1) or carry(values)
        out = []
        for step in range(STEPS):
            x, y = toy_batch(ROWS, 3, seed=100 + step)
            x, y = x[first:last], y[first:last]
            model.zero_grad()
            z, losses = forward(x, y)
            objective = boundary.objective(losses)
            if param_level is not None:
                with boundary.passthrough():
                    objective = param_level.objective(losses)
            objective.backward()
            grads = [p.grad.clone() for p in model.bottom.parameters()]
            if world_size > 1 and not in_ddp and not empty_last_rank:
                for g in grads:  # what DDP does: average over ranks
                    dist.all_reduce(g)
                    g /= world_size
            weights = (param_level or boundary.balancer).last_telemetry["weights"]
            own = [p.grad.clone() for p in boundary.balancer_parameters]  # a loss-level rule's (Uncertainty's)
            out.append({"weights": weights, "A": z.grad.clone(), "grads": grads, "own": own})
        results[case] = out
        if in_ddp or on_host:
            results[f"{case}:carried"] = len(carried)
    views_module.reads_on_host = reads_on_host
    if empty_last_rank:
        return results
    results["nonfinite"] = _nonfinite_on_the_last_rank(rank, world_size, group)
    results["nan_gradient"] = {name: _nan_gradient_on_the_last_rank(name, rank, world_size, group) for name in ("equal", "cograd")}
    return results


class _Forward(torch.nn.Module):
    """The toy model's step up to its losses, as one module (DDP hooks a backward through its forward)."""

    def __init__(self, model: ToyMTL, boundary: RepresentationBoundary) -> None:
        super().__init__()
        self.model, self.boundary = model, boundary

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        z = self.model.bottom(x)
        z.retain_grad()
        return z, self.model.losses(self.boundary(z), y, SCALES)


def _nonfinite_on_the_last_rank(rank: int, world_size: int, group):
    """Task b's loss is NaN on the last rank only; what each rank's boundary (skip_step) decides."""
    model = ToyMTL(3)
    boundary = RepresentationBoundary(build_balancer("multibalance", TASKS), process_group=group, on_nonfinite_loss="skip_step")
    x, y = toy_batch(ROWS // world_size, 3, seed=7 + rank)
    z = model.bottom(x)
    z.retain_grad()
    losses = model.losses(boundary(z), y, SCALES)
    if rank == world_size - 1:
        losses = losses * torch.tensor([1.0, float("nan"), 1.0], dtype=losses.dtype)
    boundary.objective(losses).backward()
    return {"skipped": boundary.skipped_tasks, "A": z.grad.clone(), "balancer_step": boundary.balancer.step}


def _nan_gradient_on_the_last_rank(name: str, rank: int, world_size: int, group):
    """Task b's gradient is NaN on the last rank only. The other ranks guessed b usable while the
    statistics were in flight (the early aggregate of equal and CoGrad); they must drop that work.
    Returns this rank's A and the rule's A without task b, from its own task gradients."""
    model = ToyMTL(3)
    boundary = RepresentationBoundary(build_balancer(name, TASKS), process_group=group)
    x, y = toy_batch(ROWS // world_size, 3, seed=11 + rank)
    z = model.bottom(x)
    z.retain_grad()
    copies = boundary(z)
    seen = {}
    for k, copy in enumerate(copies):
        copy.register_hook(lambda g, k=k: seen.setdefault(k, g.clone()))
    if rank == world_size - 1:
        copies[1].register_hook(lambda g: g * float("nan"))
    boundary.objective(model.losses(copies, y, SCALES)).backward()
    grads = [seen[0], None, seen[2]]  # b dropped: what the rule gives with b inactive
    expected = build_balancer(name, TASKS).aggregate(grads, stats_for(grads))
    return {"A": z.grad.clone(), "expected": expected, "active": boundary.last_stats.active.tolist()}


@pytest.fixture(scope="module")
def runs():
    (single,) = run_ranks(_run, 1)
    return single, run_ranks(_run, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(runs, case):
    single, ranks = runs
    for step in range(STEPS):
        ref = single[case][step]
        for rank, result in enumerate(ranks):
            got = result[case][step]
            torch.testing.assert_close(torch.tensor(got["weights"]), torch.tensor(ref["weights"]), rtol=1e-9, atol=1e-12)
            # A local row is a global row times W (local mean over B rows vs global mean over W*B).
            rows = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
            torch.testing.assert_close(got["A"], 2 * ref["A"][rows], rtol=1e-9, atol=1e-12)
            for g, r in zip(got["grads"], ref["grads"]):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def runs_with_an_empty_rank():
    return run_ranks(_run, 2, True)


def test_a_rank_with_no_rows_leaves_the_step_to_the_others(runs, runs_with_an_empty_rank):
    """A rank whose batch is empty (a user's last, uneven batch) adds nothing: the weights and the
    first rank's A and gradients are those of one rank holding every row, though the empty rank's
    mean losses are NaN; no task is dropped or skipped for it."""
    single, _ = runs
    full, empty = runs_with_an_empty_rank
    cases = [case for case in full if case in CASES]
    assert len(cases) > 20
    for case in cases:
        for step in range(STEPS):
            ref = single[case][step]
            for result in (full, empty):
                got = torch.tensor(result[case][step]["weights"])
                torch.testing.assert_close(got, torch.tensor(ref["weights"]), rtol=1e-9, atol=1e-12, msg=case)
            torch.testing.assert_close(full[case][step]["A"], ref["A"], rtol=1e-9, atol=1e-12, msg=case)
            assert empty[case][step]["A"].shape == (0, ref["A"].shape[1])
            for part in ("grads", "own"):
                for g, r, nothing in zip(full[case][step][part], ref[part], empty[case][step][part]):
                    torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=case)
                    assert not nothing.any(), case
    assert any(full[case][0]["own"] for case in cases)  # Uncertainty's log-variances are among them


def test_ddp_and_shared_memory_carry_the_lagged_statistics(runs):
    """The in-DDP and on-host cases above did not fall back to a collective of their own: every
    statistics step's vector went with DDP's last bucket, or through shared memory (every step, or
    every other with statistics_every=2)."""
    for result in runs[1]:
        for case, (_, _, *mode) in CASES.items():
            if mode[2:] in (["ddp"], ["host"]):
                assert result[f"{case}:carried"] == STEPS // mode[1], case


class _Bucket:
    """What DDPRide.hook reads of a ``dist.GradBucket``."""

    def __init__(self, buffer: torch.Tensor, last: bool) -> None:
        self._buffer, self._last = buffer, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def is_last(self) -> bool:
        return self._last


def _ride_buckets(rank: int, world_size: int):
    dist.init_process_group("gloo")
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        ride = DDPRide()
        ride.expect_backward()
        gradients = torch.full((5,), float(rank + 1), dtype=dtype)
        first = ride.hook(None, _Bucket(gradients.clone(), last=False)).wait()  # not the last: nothing rides
        riding = ride.carry(_packed(rank))
        last = ride.hook(None, _Bucket(gradients.clone(), last=True)).wait()
        out[dtype] = {"first": first.double(), "last": last.double(), "stats": riding.wait(), "open": ride.open()}
    return out


def test_ddp_ride_averages_the_buckets_and_sums_the_statistics_with_the_last():
    """Every bucket is averaged as DDP's default hook averages it; the statistics go with the last one,
    summed in its dtype (float32: float32 rounding of the float64 sum), or by a float64 collective of
    their own where that dtype is too coarse (bfloat16)."""
    world = 2
    ranks = run_ranks(_ride_buckets, world)
    total = sum((_packed(r) for r in range(world)), torch.zeros(20, dtype=torch.float64))
    for result in ranks:
        for dtype, got in result.items():
            assert torch.equal(got["first"], torch.full((5,), 1.5, dtype=torch.float64)) and torch.equal(got["last"], got["first"])
            assert not got["open"]  # the last bucket has gone: statistics handed over now cannot ride
            expected = total.float().double() if dtype == torch.float32 else total
            torch.testing.assert_close(got["stats"], expected, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)
        assert torch.equal(result[torch.bfloat16]["stats"], ranks[0][torch.bfloat16]["stats"])


@pytest.mark.parametrize("name", ["equal", "cograd"])
def test_a_nan_gradient_on_one_rank_drops_the_task_on_every_rank(runs, name):
    for result in runs[1]:
        got = result["nan_gradient"][name]
        assert got["active"] == [True, False, True]
        torch.testing.assert_close(got["A"], got["expected"], rtol=1e-12, atol=0)


def test_a_nan_loss_on_one_rank_makes_every_rank_skip_the_step(runs):
    """The losses travel in the statistics' one all-reduce, so no rank needs a collective of its own
    to agree: every rank skips, gives z a zero gradient and leaves the balancer untouched."""
    for result in runs[1]:
        got = result["nonfinite"]
        assert got["skipped"] == ["b"] and got["balancer_step"] == 0
        assert torch.count_nonzero(got["A"]) == 0


def _packed(rank: int) -> torch.Tensor:
    """A statistics vector (T = 3, one extra) with values of very different sizes, as each rank packs it."""
    g = torch.Generator().manual_seed(40 + rank)
    v = torch.randn(3 * 3 + 2 * 3 + 1 + 4, generator=g, dtype=torch.float64)
    return v * torch.logspace(-8, 8, v.numel(), dtype=torch.float64)


def _sum_both_ways(rank: int, world_size: int):
    from concord.balancing.collectives import PendingStatistics, sum_over_ranks

    dist.init_process_group("gloo")
    out = {"sum_over_ranks": sum_over_ranks(_packed(rank))}
    for collective in ("all_reduce", "all_to_all"):
        stats = PendingStatistics(_packed(rank), 3, 8, collective=collective).wait()
        out[collective] = (stats.gram, stats.losses, stats.extra, stats.global_batch_size)
    # Through shared memory: three vectors carried before any is read (a rank ahead of the others).
    exchange = HostExchange()
    pending = [exchange.carry(_packed(rank) * scale) for scale in (1.0, 2.0, -3.0)]
    dist.barrier()
    out["host"] = [p.wait() for p in pending]
    return out


def test_both_ways_of_summing_the_statistics_agree_on_every_rank():
    """The statistics' sum over 3 gloo ranks: all_to_all (every rank adds the W vectors itself, in rank
    order; the CPU default, also behind ``sum_over_ranks``) gives every rank the same bits, equal to
    all_reduce's and to the sum in rank order of what the ranks packed."""
    world = 3
    ranks = run_ranks(_sum_both_ways, world)
    total = sum((_packed(r) for r in range(world)), torch.zeros(20, dtype=torch.float64)).numpy()
    b_global = total[15]
    for result in ranks:
        assert torch.equal(result["sum_over_ranks"], torch.from_numpy(total))  # the sum in rank order, bit for bit
        in_rank_order = [sum((_packed(r) * scale for r in range(world)), torch.zeros(20, dtype=torch.float64)) for scale in (1.0, 2.0, -3.0)]
        assert [torch.equal(got, want) for got, want in zip(result["host"], in_rank_order)] == [True] * 3  # bit for bit
        gram, losses, extra, global_batch = result["all_to_all"]
        assert np.array_equal(gram, ranks[0]["all_to_all"][0]) and np.array_equal(extra, ranks[0]["all_to_all"][2])
        np.testing.assert_array_equal(extra, total[16:])
        np.testing.assert_array_equal(losses, np.where(np.isfinite(total[9:12]), total[9:12] / b_global, 0.0))
        assert global_batch == round(b_global)
        # all_reduce adds in its own order: the same sum up to a rounding per addition.
        magnitude = sum(np.abs(_packed(r).numpy()[16:]) for r in range(world))
        assert (np.abs(result["all_reduce"][2] - extra) <= 2 * np.finfo(np.float64).eps * magnitude).all()


def test_shared_memory_sums_only_cpu_ranks_of_one_host():
    cpu = torch.device("cpu")
    assert host_exchange_possible(2, 2, cpu) is None or "store order" in host_exchange_possible(2, 2, cpu)
    assert host_exchange_possible(1, 1, cpu) == "one rank: nothing to sum"
    assert host_exchange_possible(2, 2, torch.device("cuda", 0)) == "a GPU job: NCCL sums on the device"
    assert host_exchange_possible(4, 2, cpu) == "the ranks are not all on this host"


def _shared_memory_full(rank: int, world_size: int):
    import os

    dist.init_process_group("gloo")

    def full(*args):
        raise OSError(28, "No space left on device")

    os.posix_fallocate = full  # this spawned rank's own os module
    try:
        HostExchange()
    except OSError as error:
        return str(error)
    return "made"


def test_a_full_shared_memory_is_an_error_on_every_rank_and_leaves_no_file():
    """Rank 0 reserves the block's pages when it makes it: where /dev/shm has no room, every rank
    raises (the trainer then keeps the collective), not a SIGBUS at a later write."""
    import glob

    before = set(glob.glob("/dev/shm/concord-statistics-*"))
    assert run_ranks(_shared_memory_full, 2) == ["no room for 524,416 bytes of shared memory on this host (/dev/shm, else the temporary folder)"] * 2
    assert set(glob.glob("/dev/shm/concord-statistics-*")) == before
