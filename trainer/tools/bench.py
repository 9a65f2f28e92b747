"""``concord bench``: training QPS per balancer, measured side by side in one process tree.

One sharded model and one data stream; the method is swapped between timed blocks (the boundary's
balancer, or a parameter-level method) and the methods alternate (A B C, B C A, C A B, ...), so drift
in the machine's speed and the cost of following another method hit every method alike. The methods
of a round train on the same batches; ``--steps 1`` alternates them every step. A method named
without a statistics mode runs in the config's (``balancer.statistics``), as ``concord train`` would
run it; ``METHOD@current`` or ``METHOD@previous[/K]`` names another.
Each method's drop against ``equal`` is ``1 - QPS / QPS_equal`` over all timed steps, from step
times paired by round, with its standard error. The boundary's own time (inside backward, the time blocked on
the statistics all-reduce included) is shown as a share of the step. QPS counts the training step;
reading the data, the same for every method, is left out.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List

import torch.distributed as dist

from concord.trainer.config import Config
from concord.trainer.runtime import init_runtime, shutdown
from concord.trainer.observe.timing import StepTimer, paired_drop
from concord.balancing.collectives import HostExchange
from concord.balancing.param_level import PARAMETER_LEVEL
from concord.trainer.tools.methods import parse_method, resolve_method
from concord.trainer.train import Trainer


def _switch(trainer: Trainer, spec: str, knobs: dict, built: Dict[str, list]) -> None:
    """Makes ``spec`` (a method, run as the config runs it; ``@current`` for each step's own
    statistics, ``@previous`` for lagged statistics, ``@previous/K`` gathered every K steps) the
    model's method: built on first use, then swapped back in with the state it had (a balancer's EMA
    and step count, its statistics in flight and held coefficients, go on across blocks, as in one
    long training run). Where lagged statistics are summed through shared memory, each method has an
    exchange of its own, as in training: a shared one's few slots would be written over by the other
    methods' statistics while a swapped-out method's sum waits in them."""
    boundary = trainer.model.boundary
    current = built.get("__current__")
    if current is not None:
        built[current][5] = boundary.lagged_state
    method, statistics, every = resolve_method(spec, trainer.cfg.balancer.statistics, trainer.cfg.balancer.statistics_every)
    if method in PARAMETER_LEVEL:  # the boundary passes their gradient through: each step's, as in training
        statistics, every = "current", 1
    if spec not in built:
        boundary.use_statistics(statistics, every)
        trainer.use_method(method, knobs)
        ride = boundary.ride
        if isinstance(ride, HostExchange) and current is not None:  # the first method keeps the trainer's
            ride = HostExchange(trainer.rt.balancer_group)
        built[spec] = [boundary.enabled, boundary.balancer, boundary.reduction, trainer.param_balancer, (statistics, every),
                       boundary.lagged_state, boundary.on_nonfinite_loss, ride]
    enabled, balancer, reduction, param_balancer, mode, lagged, on_nonfinite, ride = built[spec]
    boundary.use_statistics(*mode)  # before the balancer, which checks it
    boundary.enabled, boundary.balancer, boundary.reduction, trainer.param_balancer = enabled, balancer, reduction, param_balancer
    boundary.lagged_state, boundary.on_nonfinite_loss = lagged, on_nonfinite  # the policy goes with the mode
    boundary.ride = ride
    built["__current__"] = spec


def run_bench(cfg: Config, methods: List[str], rounds: int, steps: int) -> Dict[str, dict]:
    """``none`` in ``methods`` adds the model without the boundary (autograd sums the task gradients
    at ``z``): the difference to ``equal`` is what the boundary itself costs."""
    if "equal" not in methods:
        methods = ["equal"] + methods
    rt = init_runtime(cfg.dist.device, cfg.dist.backend, keep_memory=cfg.dist.keep_freed_memory)
    try:
        cfg.train.progress = False
        trainer = Trainer.build(cfg, rt)
        boundary = trainer.model.boundary
        boundary.telemetry_every = 10**9  # no logging-step extras inside timed blocks
        knobs = {m: (cfg.balancer.knobs if parse_method(m)[0] == cfg.balancer.name else {}) for m in methods}
        batches = trainer.train_batches()
        timer = StepTimer(rt.device)
        global_batch = cfg.data.batch_size * rt.world_size
        built: Dict[str, list] = {}
        modes = {}
        for m in methods:  # warm-up: every method's first steps (allocations, caches) are not timed
            _switch(trainer, m, knobs[m], built)
            modes[m] = "-" if m == "none" else boundary.statistics + (f"/{boundary.statistics_every}" if boundary.statistics_every > 1 else "")
            for _ in range(max(cfg.train.qps_skip_steps, 3)):
                trainer.train_step(batches, timer)
        samples: Dict[str, List[dict]] = {m: [] for m in methods}
        for r in range(rounds):
            # Every method of a round trains on the same batches: step times vary with the batch
            # (list lengths, ids per shard), and pairing removes that from the drops. Reading the
            # data is then outside the timed steps (it is the same for every method).
            round_batches = [next(batches) for _ in range(steps)]
            # The order rotates every round, so no method always follows the same one (a switch
            # leaves caches and allocator state behind that the next block pays for).
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                _switch(trainer, m, knobs[m], built)
                if steps > 1:
                    trainer.train_step(iter(round_batches[:1]), timer)  # one untimed step after the switch
                boundary.balancer.telemetry_due = False
                if rt.world_size > 1:
                    dist.barrier()
                step_s = boundary_s = comm_s = 0.0
                replay = iter(round_batches)
                for _ in range(steps):
                    _, timings = trainer.train_step(replay, timer)
                    step_s += timings["step"]
                    boundary_s += timings["boundary"]
                    comm_s += timings["boundary_comm"]
                compute_s = boundary_s - comm_s
                samples[m].append({"qps": steps * global_batch / step_s, "step_ms": 1000 * step_s / steps,
                                   "boundary_ms": 1000 * boundary_s / steps, "comm_ms": 1000 * comm_s / steps,
                                   "boundary_share": boundary_s / step_s, "compute_share": compute_s / step_s})
            if rt.is_main and ((r + 1) % max(1, rounds // 20) == 0 or r + 1 == rounds):
                print(f"bench: round {r + 1}/{rounds} done", flush=True)
        report = summarize(samples, global_batch)
        for m in methods:  # how many steps each method's balancer took in all (none: 0); raw rounds
            report[m]["statistics"] = modes[m]
            report[m]["balancer_steps"] = built[m][1].step
            report[m]["rounds"] = samples[m]
        if rt.is_main:
            lagged_sum = lagged_statistics_path(boundary, rt.world_size)
            print(format_report(report, cfg, rt.world_size, rounds, steps, lagged_sum))
            out = Path(cfg.train.run_dir) / "bench.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"rounds": rounds, "steps": steps, "world_size": rt.world_size,
                                       "global_batch": global_batch, "methods": report}, indent=2))
            out.with_suffix(".md").write_text(format_markdown(report, cfg, rt.world_size, rounds, steps, lagged_sum))
            print(f"written: {out} and {out.with_suffix('.md')}")
        return report
    finally:
        shutdown()


def summarize(samples: Dict[str, List[dict]], global_batch: int) -> Dict[str, dict]:
    """Per method: QPS over all its timed steps, and its drop against ``equal`` with its standard
    error (:func:`concord.trainer.observe.timing.paired_drop`)."""
    base = [s["step_ms"] for s in samples["equal"]]
    report = {}
    for m, rows in samples.items():
        step_ms = statistics.mean(s["step_ms"] for s in rows)
        drop, drop_sem = paired_drop([s["step_ms"] for s in rows], base)
        # Against the model without the boundary, where it ran: the boundary's whole cost.
        vs_none = paired_drop([s["step_ms"] for s in rows], [s["step_ms"] for s in samples["none"]]) if "none" in samples else (math.nan, math.nan)
        report[m] = {
            "qps_mean": 1000.0 * global_batch / step_ms,
            "qps_std": statistics.pstdev(s["qps"] for s in rows),  # over rounds
            "drop_pct_mean": drop,
            "drop_pct_sem": drop_sem,
            "drop_vs_none_pct_mean": vs_none[0],
            "drop_vs_none_pct_sem": vs_none[1],
            "step_ms": step_ms,
            "boundary_ms": statistics.mean(s["boundary_ms"] for s in rows),
            "comm_ms": statistics.mean(s["comm_ms"] for s in rows),
            "boundary_share_pct": 100.0 * statistics.mean(s["boundary_share"] for s in rows),
            "compute_share_pct": 100.0 * statistics.mean(s["compute_share"] for s in rows),
        }
    return report


def lagged_statistics_path(boundary, world_size: int) -> str:
    """How lagged statistics (``METHOD@previous``) are summed over ranks in this run, for the header."""
    if world_size == 1:
        return ""
    if isinstance(boundary.ride, HostExchange):
        return "lagged statistics summed through shared memory on this host (dist.statistics_on_host)"
    if boundary.ride is not None:
        return "lagged statistics summed in DDP's gradient all-reduce (dist.statistics_in_ddp)"
    return "lagged statistics summed by a collective of their own"


def format_report(report: Dict[str, dict], cfg: Config, world_size: int, rounds: int, steps: int, lagged_sum: str = "") -> str:
    w = max(len("method"), *map(len, report)) + 2
    lines = [
        f"\nbench: {cfg.source}, {world_size} rank(s), batch {cfg.data.batch_size}/rank, "
        f"d={cfg.representation_dim}, T={len(cfg.tasks)}; {rounds} rounds x {steps} steps per method"
        + (f"; {lagged_sum}" if lagged_sum else ""),
        f"{'method':<{w}}{'statistics':<13}{'QPS':>9}{'± std':>8}{'drop vs equal':>15}{'± s.e.':>8}{'vs none':>9}{'± s.e.':>8}{'step ms':>9}"
        f"{'boundary ms':>13}{'(all-reduce)':>14}{'share':>8}{'compute share':>15}",
    ]
    for m, r in report.items():
        lines.append(
            f"{m:<{w}}{r['statistics']:<13}{r['qps_mean']:>9,.0f}{r['qps_std']:>8,.0f}{r['drop_pct_mean']:>14.2f}%{r['drop_pct_sem']:>7.2f}%"
            f"{r['drop_vs_none_pct_mean']:>8.2f}%{r['drop_vs_none_pct_sem']:>7.2f}%"
            f"{r['step_ms']:>9.2f}{r['boundary_ms']:>13.3f}{r['comm_ms']:>14.3f}{r['boundary_share_pct']:>7.2f}%"
            f"{r['compute_share_pct']:>14.2f}%"
        )
    lines.append(
        "QPS: over all timed steps (± std over rounds); drop: 1 - QPS / QPS of equal (vs none: of the model "
        "without the boundary, where 'none' ran), from step times paired "
        "by round, ± its standard error. share: boundary time / step time; compute share leaves out the time blocked on the statistics "
        "all-reduce (latency plus waiting for the slower rank, less the balancer's work done while it is in "
        "flight). Compare 'none' with 'equal' for the boundary's whole cost. statistics: the mode each method "
        "ran in (a name without @ runs as the config's balancer.statistics makes concord train run it)."
    )
    return "\n".join(lines)


def format_markdown(report: Dict[str, dict], cfg: Config, world_size: int, rounds: int, steps: int, lagged_sum: str = "") -> str:
    lines = [
        f"`concord bench --config {cfg.source}`: {world_size} rank(s), batch {cfg.data.batch_size}/rank, "
        f"d={cfg.representation_dim}, T={len(cfg.tasks)}; {rounds} rounds x {steps} steps per method, alternating"
        + (f"; {lagged_sum}." if lagged_sum else "."),
        "",
        "| method | statistics | level | QPS (± std over rounds) | drop vs equal (%) | ± s.e. | drop vs none (%) | ± s.e. | step (ms) | boundary (ms) | of it blocked on the all-reduce (ms) | boundary share | compute share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in report.items():
        level = "parameter" if m in PARAMETER_LEVEL else ("no boundary" if m == "none" else "representation")
        lines.append(
            f"| {m} | {r['statistics']} | {level} | {r['qps_mean']:,.0f} ± {r['qps_std']:,.0f} | {r['drop_pct_mean']:.2f} "
            f"| {r['drop_pct_sem']:.2f} | {r['drop_vs_none_pct_mean']:.2f} | {r['drop_vs_none_pct_sem']:.2f} | {r['step_ms']:.2f} | {r['boundary_ms']:.3f} | {r['comm_ms']:.3f} | {r['boundary_share_pct']:.2f}% "
            f"| {r['compute_share_pct']:.2f}% |"
        )
    return "\n".join(lines) + "\n"
