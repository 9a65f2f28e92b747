"""The representation boundary: ``z`` goes to T heads as T views, one aggregated gradient comes back.

Usage in any PyTorch model (TorchRec or not)::

    boundary = RepresentationBoundary(build_balancer("multibalance", ["ctr", "cvr"]))
    z_ctr, z_cvr = boundary(z)                     # views of z (B, d), no copy
    losses = torch.stack([loss_ctr(head_ctr(z_ctr)), loss_cvr(head_cvr(z_cvr))])
    boundary.objective(losses).backward()          # one backward pass

In that backward pass the heads receive their raw task gradients; the bottom (and, through it, the
embedding tables) receives ``A`` from the balancer instead of ``sum_k G_k``.

This module holds the boundary's forward, ``objective()`` and its backward on a CPU in each statistics
mode; beside it, the autograd nodes that hand ``z`` to the heads (``views.py``), the statistics modes
and the lagged state a checkpoint carries (``lagged.py``), the steps on the compiled nodes
(``compiled_steps.py``) and the steps on a GPU (``device_steps.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import views
from .base import Balancer, weighted_sum
from .clock import Clock
from .collectives import DDPRide, HostExchange, PendingStatistics
from .compiled_steps import NONFINITE_SUM_AT_VIEW, OVERFLOW, CompiledSteps
from .device_steps import DeviceSteps
from .lagged import (HELD, IN_FLIGHT, LAST_SUM, Ready, auto_every, auto_mode, check_statistics_request, is_elementwise, statistics_for,
                     stats_from_tensors, stats_to_tensors)
from .native import native_ops, passable
from .statistics import StepStats, all_finite, device_statistics, local_statistics, usable_here


NONFINITE_LOSS_POLICIES = ("drop_task", "skip_step", "raise")


class NonFiniteLossError(RuntimeError):
    """A task loss was NaN or inf on some rank (``on_nonfinite_loss="raise"``); raised on every rank
    inside backward, before the bottom or the embedding tables receive a gradient."""

    def __init__(self, tasks: List[str]) -> None:
        super().__init__(f"non-finite loss for task(s) {tasks}")
        self.tasks = tasks


@dataclass
class _StepRecord:
    """The boundary's per-step values, in a plain object: ``nn.Module.__setattr__`` is slow enough to
    matter at a handful of assignments inside every backward."""

    losses: Optional[torch.Tensor] = None  # from objective(), consumed by backward
    stats: Optional[StepStats] = None
    skipped_tasks: List[str] = field(default_factory=list)
    backward_clock: Optional[Clock] = None
    comm_seconds: float = 0.0  # this step's wait for a sum (in forward or backward), from its forward
    forward_read: float = 0.0  # the read of the last sum in forward, the rule included (the boundary's time)
    native_node: Optional[str] = None  # the compiled node ("view", "held") forward chose, until objective()
    rows: int = -1  # this rank's rows in the step's z, from forward
    built: bool = False  # forward built this step's node (a rerun inside backward is a checkpoint's)
    held_unsettled: bool = False  # a "held" node's findings not yet acted on (_settle_native)

    def losses_used(self) -> None:
        """A step that reads no sum in backward: its losses consumed, no task skipped."""
        self.losses, self.skipped_tasks = None, []


def _without_rows(losses: torch.Tensor) -> torch.Tensor:
    """The losses of a rank whose batch has no rows: 0, whatever a mean over nothing gave (NaN).
    Each rank's losses enter the sum over ranks weighted by its rows, so this rank's share is 0 and
    the step is what the other ranks' rows make it; a NaN here would make every rank drop or skip
    the task as if a loss had diverged. The graph is kept: backward still reaches the heads (and
    :meth:`RepresentationBoundary.objective` scales its scalar by 0, so that a loss-level rule's own
    terms, Uncertainty's log-variances, get no gradient from this rank either)."""
    return torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses))


class RepresentationBoundary(CompiledSteps, DeviceSteps, nn.Module):
    """Replicates the shared representation ``z`` (B, d) into one view per task head.

    The views share ``z``'s memory, so a head must not change its view in place (an ``inplace=True``
    activation as its first layer): that raises, in forward or in backward, rather than reach the
    other heads.

    Args:
        balancer: the method that combines the per-task gradients.
        reduction: ``mean`` keeps task weights on the simplex (``equal`` gives the gradient of the mean
            task loss); ``sum`` multiplies the aggregated gradient by T.
        process_group: where the step's statistics are summed over ranks; ``None`` means the default group
            when ``torch.distributed`` is initialised, and no communication otherwise. A dedicated
            group keeps this collective apart from DDP's gradient buckets.
        telemetry_every: compute the costlier telemetry (e.g. CoGrad's correction norms) every N
            steps, the ones a trainer logs; weights and norms are always available.
        on_nonfinite_loss: what a NaN or inf task loss (on any rank) does, decided on every rank
            alike from the step's reduced statistics, before anything below ``z`` gets a gradient:
            ``drop_task`` skips that task's contribution for the step (as for a non-finite
            gradient); ``skip_step`` returns a zero gradient for ``z`` without a balancer step and
            names the tasks in :attr:`skipped_tasks` (the caller then drops its optimizer step);
            ``raise`` raises :class:`NonFiniteLossError` out of ``backward()``.
        statistics: ``current`` (the specified rule): step t's aggregate uses step t's global
            statistics, so backward waits at ``z`` for their sum over ranks. ``previous``: it uses the
            coefficients from step t-1's global statistics, whose sum travelled during step t's
            forward, so backward never waits; the first step uses the prior (equal weights). Every
            rank still computes the same weights, those of one rank holding the global batch under
            the same lag. A rank drops its own non-finite gradient or loss at once; the other ranks
            learn of it with the next step's statistics, and then ``raise`` raises and
            ``skip_step`` skips that next step. Methods that need the step's own statistics in the
            sum (GradDrop's column signs) cannot lag. ``auto``: ``previous`` for every method that
            can lag, ``current`` for the others (GradDrop; decided again whenever a balancer is set).
        statistics_every: with ``previous``, gather and sum the statistics on every k-th step only,
            and on the first, so that the rule acts from the second step; the steps between reuse
            the coefficients of the last sum (the rule runs every k steps).
            Rules that read no statistics (constant weights) gather them only for the logged steps,
            whatever k. Between sums a rank drops its own non-finite loss or gradient at once and
            reports a non-finite loss with the next sum, where ``raise`` and ``skip_step`` act.
            Element-wise rules (CoGrad) still form every step's aggregate from that step's
            gradients, with the constants of the last sum (CoGrad's ``kappa``).
            ``auto``: the balancer's :attr:`~Balancer.lagged_statistics_every` when lagged, else 1
            (decided again whenever a balancer is set).
        autograd_sums: with ``previous`` statistics, let autograd form the sum on the steps
            where it is all the rule does: a rule with equal constant weights (``equal``) on a step
            that gathers no statistics. The T views are then one tensor, so a hook or ``retain_grad``
            on a view sees the sum of the task gradients, not its own; and a non-finite loss or
            gradient there leaves this rank's whole contribution to ``z``'s gradient out of the step
            (the task gradients are summed before anything can look at them), where otherwise only
            that task's would be (on a GPU without a warning, which would need a host read). Off by
            default; Concord's trainer, which hooks no view, turns it on.
    """

    # The entries of the state (get_extra_state) that say what it balanced, the only ones not tensors.
    record_keys = ("balanced_tasks", "balanced_by")

    def __init__(
        self,
        balancer: Balancer,
        reduction: str = "mean",
        process_group: Optional[dist.ProcessGroup] = None,
        telemetry_every: int = 1,
        on_nonfinite_loss: str = "drop_task",
        statistics: str = "current",
        statistics_every: int | str = 1,
        autograd_sums: bool = False,
    ) -> None:
        super().__init__()
        self.num_tasks = balancer.num_tasks
        # The compiled nodes' states (native.py; layouts in csrc/nodes.cpp), made on first use.
        self._native: dict = {}  # node -> (state tensor, the same memory as a NumPy array, its clock)
        self._native_sources: dict = {}  # node -> what the constants in its state were written from
        views.alone_references()
        _run_eagerly_under_compile()
        self.use_statistics(statistics, statistics_every)
        if telemetry_every < 1:
            raise ValueError(f"telemetry_every must be >= 1, got {telemetry_every}")
        self.telemetry_every = telemetry_every
        self._log_step = 0  # a step logged off the telemetry_every schedule (gather_for_log), counted from 1
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.on_nonfinite_loss = on_nonfinite_loss
        self.autograd_sums = bool(autograd_sums)
        self.process_group = process_group
        self.balancer = balancer
        self._passthrough = False
        # Off: z goes to the heads as is and autograd sums the task gradients (plain multi-task
        # training, the cost baseline for `concord bench`); objective() then returns the mean loss.
        self.enabled = True
        self._record = _StepRecord()
        self._warmed: set = set()  # (balancer, shape, dtype, device) whose rules are built
        # Set where something other than a collective of their own sums lagged statistics: DDP's
        # gradient all-reduce (DDPRide; over DDP's group, which must be the boundary's) or shared
        # memory on one host (HostExchange).
        self.ride: Optional[Union[DDPRide, HostExchange]] = None

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if z.dim() != 2:
            hint = "; rows of several items each: z.flatten(0, -2) makes each item a row" if z.dim() > 2 else ""
            raise ValueError(f"the shared representation must be (batch, d), got shape {tuple(z.shape)}{hint}")
        self._settle_native()  # a rerun inside backward finds nothing to settle: the node has not run
        record = self._record
        if not (self.enabled and torch.is_grad_enabled() and z.requires_grad):
            record.built = False
            return tuple(z for _ in range(self.num_tasks))
        # Activation checkpointing runs this forward again inside the step's backward. Non-reentrant
        # checkpointing only recomputes the heads' saved tensors: the node this step's forward built
        # balances, so the rerun returns bare views and changes nothing. Reentrant checkpointing ran
        # the step's forward without grad and backpropagates through this rerun: it builds the node,
        # a Python one that reads the last sum in backward, since objective() has already recorded
        # the losses (which a sum read here would mark used).
        recomputing = torch._C._current_graph_task_id() != -1
        if recomputing and record.built:
            return tuple(z.view_as(z) for _ in range(self.num_tasks))
        record.built, record.rows = True, z.shape[0]
        self._warm_up(z)
        on_host = views.reads_on_host(z)
        if recomputing:
            record.comm_seconds = record.forward_read = 0.0
        else:
            self._read_sum_in_forward(on_host)
        if self.ride is not None:
            self.ride.expect_backward()
        if self._sum_at_view():
            ops = native_ops() if on_host and not recomputing else None
            if ops is not None:
                return self._native_view(ops, z)
            view = views.SumAtView.apply(z, self)
            return tuple(view for _ in range(self.num_tasks))
        ops = native_ops() if self._between_sums_at(on_host) and not recomputing else None
        if ops is not None and self._held_constants_written(z):
            return self._native_held(ops, z)
        return views.Replicate.apply(z, self)

    def _read_sum_in_forward(self, on_host: bool) -> None:
        """Reads the last step's sum, if one is in flight, here in forward rather than in this step's
        backward, where a step that gathers no statistics of its own need run no Python: with the
        sum read and the rule applied now, that backward is the compiled node of the steps between
        sums (:meth:`_between_sums_at`), with the same coefficients and the same checks. Lagged
        statistics on a CPU, under ``drop_task`` (a sum that makes ``raise`` raise or
        ``skip_step`` skip is read in backward, where those act); a step that gathers statistics
        reads the sum in its own pass (:meth:`_statistics_step`). The step's wait starts at 0 here."""
        record = self._record
        record.comm_seconds = record.forward_read = 0.0
        if (self._in_flight is None or self.statistics != "previous" or self._passthrough
                or self._on_nonfinite_loss != "drop_task" or not on_host
                or self._statistics_due_at(self._gather_for_log)):
            return
        start = time.perf_counter()
        stats, _ = self._read_sum(self._take_in_flight())  # drop_task: never a step to skip
        if self._elementwise:
            self._take_as_last_sum(stats)
        else:
            with torch.no_grad():  # as inside backward, where the rule ran before
                self._hold(stats)
        record.forward_read = time.perf_counter() - start

    def _between_sums_at(self, on_host: bool) -> bool:
        """Whether this step's backward is :meth:`_between_sums` (a lagged coefficient rule's step
        that neither gathers statistics nor reads a sum) or an element-wise rule's step that does
        neither and logs no telemetry, decided in forward as backward would."""
        if self.statistics != "previous" or not on_host or self._passthrough:
            return False
        if self._in_flight is not None or self._statistics_due_at(self._gather_for_log):
            return False
        return not self._elementwise or not self._telemetry_due_at(self.balancer.step)

    def _telemetry_due_at(self, step: int) -> bool:
        """Whether the step after ``step`` steps logs the costlier telemetry: every ``telemetry_every``
        steps (counted from 1, so with a trainer logging every N steps the due steps coincide), and
        the step :meth:`gather_for_log` announced."""
        return (step + 1) % self.telemetry_every == 0 or step + 1 == self._log_step

    def _sum_at_view(self) -> bool:
        """Whether this step's backward needs only ``sum_k G_k`` times one coefficient (see
        ``autograd_sums``): decided in forward, from what backward would do."""
        if not (self.autograd_sums and self._equal_constant_weights and self.statistics == "previous"):
            return False
        return self._in_flight is None and not self._passthrough and not self._statistics_due_at(self._gather_for_log)

    def _balance_sum_at_view(self, total: torch.Tensor, donated: bool) -> torch.Tensor:
        """The backward of a :meth:`_sum_at_view` step: ``c * sum_k G_k`` (in ``total`` where autograd
        gave it up), or zeros with a warning if a loss or the sum is not finite (the non-finite losses
        are reported with the next sum, as between sums)."""
        start = self._start_backward(total.device)
        if not views.reads_on_host(total):
            return self._finish(self._sum_at_view_on_device(total, donated), start, reduced=True)
        bad = self._losses_at_view(self._record.losses)
        aggregated = self._scaled_at_view(total, donated)
        if bad or not math.isfinite(aggregated.sum().item()):
            if not bad:
                self.balancer.warn("(all)", "nonfinite_grad", NONFINITE_SUM_AT_VIEW)
            aggregated = torch.zeros_like(total) if aggregated is total and not donated else aggregated.zero_()
        return self._finish(aggregated, start, reduced=True)

    def _scaled_at_view(self, total: torch.Tensor, donated: bool) -> torch.Tensor:
        coefficient = self._coefficient_at_view()
        if coefficient == 1.0:
            return total
        return total.mul_(coefficient) if donated else total * coefficient

    def _coefficient_at_view(self) -> float:
        return float(self._balancer.weights_without_statistics()[0]) * (self.num_tasks if self.reduction == "sum" else 1)

    def _losses_at_view(self, losses: torch.Tensor) -> List[int]:
        """A one-view step's losses, the record cleared: the tasks whose loss is not finite, warned of
        and reported with the next sum (their sum with the others leaves the rank's contribution out)."""
        self._record.losses_used()
        bad = [k for k, loss in enumerate(losses.tolist()) if not math.isfinite(loss)]
        for k in bad:
            self._unreported[k] = True
            self.balancer.warn(self.balancer.task_names[k], "nonfinite_loss",
                               "non-finite loss on this rank, summed with the other tasks by autograd: this rank's whole contribution is left out of this step")
        return bad

    def _warm_up(self, z: torch.Tensor) -> None:
        """Builds the balancer's compiled rules for ``z``'s shape here, in the forward pass, the first
        time a balancer meets that shape: a compile inside backward would stall the step that met
        it for seconds (with a GPU's queue drained)."""
        if type(self._balancer).warm_up is Balancer.warm_up:
            return
        lagged = self.statistics == "previous"
        key = (id(self._balancer), tuple(z.shape), z.dtype, z.device, lagged)
        if key not in self._warmed:
            self._warmed.add(key)
            # As backward runs them, so that the compiled rules' guards match there: without grad,
            # and outside a mixed-precision forward's autocast (a GPU's backward runs on a thread of
            # its own, where autocast is off; a CPU's where the caller calls backward, after the
            # forward's autocast block).
            no_autocast = (torch.autocast(z.device.type, enabled=False) if torch.amp.is_autocast_available(z.device.type)
                           else contextlib.nullcontext())
            with torch.no_grad(), no_autocast:
                self._balancer.warm_up(z.detach(), lagged, views.reads_on_host(z))

    def use_statistics(self, statistics: str, statistics_every: int | str = 1) -> None:
        """Sets how the statistics are gathered (see the class's arguments), starting afresh: no
        statistics in flight, no held coefficients. A balancer set afterwards is checked against it
        (and, with ``auto``, decides the mode and the cadence)."""
        check_statistics_request(statistics, statistics_every)
        self.statistics_requested, self.statistics_every_requested = statistics, statistics_every
        self.statistics = statistics
        if statistics == "auto":  # settled by the balancer, and again by each one set later
            self.statistics = auto_mode(self._balancer) if hasattr(self, "_balancer") else "previous"
        self.statistics_every = 1 if statistics_every == "auto" else statistics_every
        if statistics_every == "auto" and hasattr(self, "_balancer"):
            self.statistics_every = auto_every(self._balancer, self.statistics)
        self.lagged_state = (None, None, np.zeros(self.num_tasks, dtype=bool), None)
        self._gather_for_log = False

    @property
    def lagged_state(self) -> tuple:
        """What ``previous`` mode carries from step to step: the statistics in flight (the last
        step's, still being summed), the held coefficients of the last sum (``statistics_every`` > 1),
        the non-finite losses not yet reported and the last sum itself (an element-wise rule's
        constants). For tools that interleave several boundaries' worth of state on one module
        (``concord bench``)."""
        return self._in_flight, self._held, self._unreported_losses(), self._last_sum

    @lagged_state.setter
    def lagged_state(self, state: tuple) -> None:
        self._in_flight, self._held, self._unreported, self._last_sum = state
        self._unreported_on_device: Optional[torch.Tensor] = None  # a GPU's flags, read at the next sum
        self._coefficients_on_device: Optional[tuple] = None  # ((coefficients, device), tensor there)

    def _unreported_losses(self) -> np.ndarray:
        """The non-finite losses not yet reported, the device's flags folded in (a host read)."""
        self._settle_native()
        if self._unreported_on_device is not None:
            self._unreported |= self._unreported_on_device.cpu().numpy()
            self._unreported_on_device = None
        return self._unreported

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        """Records the step's task losses (T,) for the balancer and returns the scalar to backward.

        The losses reach the balancer here, detached, so no second backward is needed.
        """
        if losses.shape != (self.num_tasks,):
            raise ValueError(f"expected {self.num_tasks} task losses, got shape {tuple(losses.shape)}")
        if not self.enabled:
            return losses.mean()
        record = self._record
        empty = record.rows == 0
        if empty:
            losses = _without_rows(losses)
        node, record.native_node = record.native_node, None
        if node is not None:  # a compiled node reads the losses' verdict from its state
            self._losses_to_native(node, losses.detach())
        else:
            record.losses = losses.detach()
            record.skipped_tasks = []
        objective = self.balancer.before_backward(losses)
        return objective * 0.0 if empty else objective  # no rows: no gradient, loss-level terms' included

    @property
    def last_stats(self) -> Optional[StepStats]:
        """The last step's global statistics (identical on every rank)."""
        return self._record.stats

    @property
    def skipped_tasks(self) -> List[str]:
        """Tasks with a non-finite loss in the last step, under ``on_nonfinite_loss="skip_step"``."""
        self._settle_native()
        return self._record.skipped_tasks

    @property
    def backward_seconds(self) -> float:
        """Time of the last backward through the boundary (on CUDA: between events on the gradients'
        stream, so reading it waits for that step's boundary work), with the step's read of the
        last sum where forward read it ..."""
        clock = self.backward_clock
        return clock.seconds() if clock is not None else 0.0

    @property
    def backward_clock(self) -> Optional[Clock]:
        """... and its clock, for readers that take the figure later (no wait for the GPU now)."""
        self._settle_native()
        record = self._record
        if record.backward_clock is not None and record.forward_read:
            return _AfterRead(record.backward_clock, record.forward_read)
        return record.backward_clock

    @property
    def comm_seconds(self) -> float:
        """... of which blocked on the statistics' reduction (waiting for peers included)."""
        return self._record.comm_seconds

    @property
    def on_nonfinite_loss(self) -> str:
        return self._on_nonfinite_loss

    @on_nonfinite_loss.setter
    def on_nonfinite_loss(self, policy: str) -> None:
        if policy not in NONFINITE_LOSS_POLICIES:
            raise ValueError(f"on_nonfinite_loss must be one of {NONFINITE_LOSS_POLICIES}, got {policy!r}")
        self._on_nonfinite_loss = policy

    @property
    def balancer(self) -> Balancer:
        return self._balancer

    @balancer.setter
    def balancer(self, balancer: Balancer) -> None:
        if hasattr(self, "_balancer"):
            self._settle_native()  # with the balancer whose step it was
        if hasattr(self, "_balancer") and balancer.num_tasks != self.num_tasks:
            raise ValueError(f"balancer has {balancer.num_tasks} tasks, the boundary {self.num_tasks}")
        mode, every = statistics_for(balancer, self.statistics_requested, self.statistics_every_requested)
        if (mode, every) != (self.statistics, self.statistics_every):
            self.statistics, self.statistics_every = mode, every
            self.lagged_state = (None, None, np.zeros(self.num_tasks, dtype=bool), None)
        balancer.process_group = self.process_group
        self._balancer = balancer
        fixed = balancer.weights_without_statistics()
        self._equal_constant_weights = fixed is not None and len({float(c) for c in fixed}) == 1  # autograd_sums' case
        self._elementwise = is_elementwise(balancer)
        # Loss-level methods learn parameters: registered here, the model's optimizer trains them,
        # DDP averages their gradients and ``.to(device)`` moves them (in place, so the balancer's
        # own references stay valid).
        self.balancer_parameters = nn.ParameterList(balancer.parameters())

    def get_extra_state(self) -> dict:
        """The balancer's state (EMA norms, weights, bandit, step, random generators) travels with
        ``model.state_dict()``, so saving a model saves how its tasks were being balanced; with
        ``statistics="previous"`` so do the statistics still in flight. Beside it, what it balanced
        (:attr:`record_keys`: the task names in order, the method), checked on load: the state of other
        tasks, or of the same in another order, would otherwise give each task another's weight."""
        state = self._balancer.state_dict()
        state[_TASKS], state[_METHOD] = list(self._balancer.task_names), self._balancer.name
        if self.statistics == "previous":
            stats = self._in_flight.wait() if self._in_flight is not None else None
            self._in_flight = Ready(stats) if stats is not None else None
            state.update(stats_to_tensors(stats, self.num_tasks, self._balancer.extra_size))
            if self._elementwise:  # the rule's constants until the next sum
                state.update(stats_to_tensors(self._last_sum, self.num_tasks, self._balancer.extra_size, LAST_SUM))
            state[HELD] = torch.from_numpy(np.concatenate([[float(self._held is not None)], self._held if self._held is not None else np.zeros(self.num_tasks), self._unreported_losses().astype(np.float64)]))
        return state

    def set_extra_state(self, state: dict) -> None:
        state = dict(state)
        self._check_record(state.pop(_TASKS, None), state.pop(_METHOD, None))
        in_flight = {k: state.pop(k) for k in list(state) if k.startswith(IN_FLIGHT)}
        last_sum = {k: state.pop(k) for k in list(state) if k.startswith(LAST_SUM)}
        held = state.pop(HELD, None)
        if held is not None:
            values, t = held.numpy().astype(np.float64), self.num_tasks
            self._held = values[1 : 1 + t].copy() if values[0] > 0 else None
            self._unreported = values[1 + t :] > 0
        self._balancer.load_state_dict(state)
        if self.statistics == "previous" and in_flight:
            stats = stats_from_tensors(in_flight)
            self._in_flight = Ready(stats) if stats is not None else None
        if self.statistics == "previous" and last_sum:
            self._last_sum = stats_from_tensors(last_sum, LAST_SUM)

    def _check_record(self, tasks: Optional[List[str]], method: Optional[str]) -> None:
        """A state without the record (written before the boundary kept one, or with it left out, as
        Concord's checkpoints do, whose fingerprint records the same) is taken as it is."""
        names, name = self._balancer.task_names, self._balancer.name
        if tasks is not None and list(tasks) != names:
            raise ValueError(
                f"the boundary's state was saved for tasks {list(tasks)}, this boundary balances {names}: "
                "load it into a boundary built with the same tasks in the same order"
            )
        if method is not None and method != name:
            raise ValueError(
                f"the boundary's state was saved by balancer {method!r}, this boundary runs {name!r}: to start "
                f"{name} afresh on the trained model, leave the boundary's '_extra_state' entry out of the state you load"
            )

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[None]:
        """Backward passes run inside return ``sum_k G_k`` untouched, with no statistics and no
        balancer step: for extra gradient computations such as parameter-level balancing's per-task
        ``torch.autograd.grad`` calls."""
        self._passthrough = True
        try:
            yield
        finally:
            self._passthrough = False

    def balance(
        self,
        grads: Tuple[Optional[torch.Tensor], ...],
        z: Optional[torch.Tensor] = None,
        donated: Sequence[bool] = (),
    ) -> torch.Tensor:
        """Runs inside autograd's backward: statistics, one all-reduce (overlapped with the balancer's
        :meth:`~Balancer.prepare`), the balancer, the aggregate. ``donated[k]``: nothing but this call
        holds ``grads[k]``, so the sum may be formed in it (lagged statistics only)."""
        if self._passthrough:
            present = [g for g in grads if g is not None]
            total = present[0].clone()
            for g in present[1:]:
                total.add_(g)
            return total
        template = next(g for g in grads if g is not None)
        start = self._start_backward(template.device)
        self.balancer.telemetry_due = self._telemetry_due_at(self.balancer.step)
        if self.statistics == "previous":
            return self._balance_lagged(grads, z, template, start, donated)
        usable, pending = self._start_statistics(grads, z, template)
        # While the statistics travel, the balancer does the work that does not need them (e.g. the
        # whole aggregate of a method with fixed weights), on this rank's guess of the active tasks.
        early = self.balancer.prepare(grads, z, usable)
        stats = self._wait(pending)
        present = np.array([g is not None for g in grads])
        if not np.array_equal(usable, stats.active & present):
            early = None  # another rank saw a non-finite value, or every rank a zero gradient
        if self._skip_for_nonfinite_loss(stats):
            start.stop()
            return torch.zeros_like(template)
        self.balancer.note_inactive(stats)
        return self._finish(self.balancer.aggregate(grads, stats, z, early), start)

    def _start_backward(self, device: torch.device) -> Clock:
        """The clock of this backward through the boundary, once the step's losses are known."""
        start = self._record.backward_clock = Clock(device)
        if self._record.losses is None:
            raise RuntimeError(
                "RepresentationBoundary.objective(losses) must be called before backward so the "
                "balancer sees the task losses"
            )
        return start

    def _cross_terms(self) -> bool:
        """Whether this step's Gram has its off-diagonal products: they feed the weights of most
        methods and the logged cosines."""
        return self.balancer.needs_cross_terms or self.balancer.telemetry_due

    def _start_statistics(self, grads, z, template: torch.Tensor, on_host: bool = True, products: Optional[torch.Tensor] = None,
                          stacked: Optional[torch.Tensor] = None):
        """This rank's statistics, their sum over ranks started; and this rank's usable tasks, as a
        NumPy array (``on_host``) or as flags on the gradients' device (packed there, no host read).
        ``products``: the Gram's entries, already formed (on a CPU); ``stacked``: the gradients
        stacked (on a GPU, for the step's sum)."""
        cross_terms = self._cross_terms()
        extra = self.balancer.local_extra(grads, z)
        seen, self.balancer.squared_norms_seen = self.balancer.squared_norms_seen, None
        if on_host:
            packed = local_statistics(grads, self._record.losses, template.shape[0], extra, cross_terms, seen, products)
            usable = usable_here(np.array([g is not None for g in grads]), packed)
        else:
            packed, usable = device_statistics(grads, self._record.losses, template.shape[0], extra, cross_terms, seen, stacked)
        ride = self.ride if on_host and self.statistics == "previous" and self.ride is not None and self.ride.open() else None
        return usable, PendingStatistics(packed, self.num_tasks, template.shape[0], self.process_group, None, cross_terms, ride=ride)

    def _wait(self, pending) -> StepStats:
        """The summed statistics (timed: the wait is what a step loses to the reduction)."""
        comm_start = time.perf_counter()
        stats = pending.wait()
        record = self._record
        record.comm_seconds = time.perf_counter() - comm_start
        record.losses, record.stats = None, stats
        return stats

    def _skip_for_nonfinite_loss(self, stats: StepStats) -> bool:
        """Applies ``on_nonfinite_loss`` to a non-finite loss on any rank: raises, or says to skip."""
        nonfinite = [name for name, bad in zip(self.balancer.task_names, stats.nonfinite_loss) if bad]
        self._record.skipped_tasks = nonfinite if self.on_nonfinite_loss == "skip_step" else []
        if nonfinite and self.on_nonfinite_loss == "raise":
            raise NonFiniteLossError(nonfinite)
        return bool(self._record.skipped_tasks)

    def _finish(self, aggregated: torch.Tensor, start: Clock, reduced: bool = False) -> torch.Tensor:
        self.balancer.step += 1
        if self.reduction == "sum" and not reduced:
            aggregated.mul_(self.num_tasks)
        start.stop()
        return aggregated

    def _statistics_due(self) -> bool:
        """Whether this step gathers statistics (``previous`` mode): every ``statistics_every``-th step
        (every logged step for rules that read none), timed so that the sum is read on steps counted
        by k: started at step n, it is read at n + 1. A rule that reads statistics also gathers on
        its first step, so that it acts from the second, not only after k steps of the prior: the
        first steps are where one task's raw loss scale does its damage (docs/quality/README.md,
        "UCI Adult with a regression task")."""
        for_log, self._gather_for_log = self._gather_for_log, False
        return self._statistics_due_at(for_log)

    def _statistics_due_at(self, for_log: bool) -> bool:
        step = self.balancer.step
        if not self.balancer.reads_statistics:
            return self.telemetry_every == 1 or (step + 2) % self.telemetry_every == 0 or for_log
        return self.statistics_every == 1 or (step + 2) % self.statistics_every == 0 or step == 0

    def gather_for_log(self) -> None:
        """The step after the next one is logged off the ``telemetry_every`` schedule (a run's last
        step). In ``previous`` mode a rule that reads no statistics gathers them on the next step
        for that log; rules that read statistics keep their schedule (a log between their sums
        shows the last sum's), so their coefficients never depend on when a run logs. The costlier
        telemetry (CoGrad's correction) is formed on the logged step too."""
        self._gather_for_log = True
        self._log_step = self.balancer.step + 2

    def _balance_lagged(self, grads, z, template: torch.Tensor, start: Clock, donated: Sequence[bool]) -> torch.Tensor:
        """``statistics="previous"``: this step's statistics start their sum over ranks and the step
        is balanced with the last sum, which has arrived by now (with ``statistics_every`` k > 1 the
        steps between hold the coefficients of the last sum)."""
        on_host = views.reads_on_host(template)
        if self._elementwise:
            if on_host:
                return self._balance_elementwise(grads, z, template, start, donated)
            return self._balance_elementwise_on_device(grads, z, template, start)
        if not on_host:
            return self._balance_lagged_on_device(grads, z, template, start)
        if self._statistics_due():
            return self._statistics_step(grads, z, template, start, donated)
        if self._in_flight is None:
            return self._between_sums(grads, start, donated)
        usable = self._usable_from_losses(grads)
        if self._hold_last_sum(None):
            start.stop()
            return torch.zeros_like(template)
        return self._finish(self._checked_sum(grads, self._coefficients_between_sums(), usable, donated), start)

    def _statistics_step(self, grads, z, template: torch.Tensor, start: Clock, donated: Sequence[bool]) -> torch.Tensor:
        """A lagged coefficient rule's step that gathers statistics, on a CPU. The last sum, if one is
        in flight (it has arrived), is read first, so that its coefficients form this step's sum in
        the same pass over the gradients as this step's Gram (:meth:`_statistics_and_sum`)."""
        stats, skip = self._read_sum_ahead()
        if stats is not None and not skip:
            self._hold(stats)
        self._report_unreported()
        coefficients = self._coefficients_between_sums()
        usable, pending, aggregated = self._statistics_and_sum(grads, z, template, None if skip else coefficients, donated)
        self._in_flight = pending
        self._record.losses = None
        if skip:
            start.stop()
            return torch.zeros_like(template)
        if aggregated is None:  # this step's statistics have read every gradient: ``usable`` is exact
            aggregated = weighted_sum(grads, coefficients, usable, donated)
        return self._finish(aggregated, start)

    def _statistics_and_sum(self, grads, z, template: torch.Tensor, coefficients: Optional[Sequence[float]],
                            donated: Sequence[bool] = ()):
        """:meth:`_start_statistics` on a CPU, with ``sum_k c_k G_k`` (``coefficients``) over this rank's
        usable tasks formed in the same pass over the gradients as the Gram's dot products, where the
        compiled pass (native.py) applies: float32 or float64 gradients, a rule with no statistics
        of its own (``local_extra``) and no diagonal already known. The sum is formed in the first
        gradient where autograd gave it up (``donated``), as :func:`weighted_sum` would. Returns the
        usable tasks, the statistics in flight and that sum, or None where it was not formed (the
        pass does not apply; or a task's gradient proved non-finite, and the sum is to be formed
        again over the usable tasks)."""
        ops = None
        if coefficients is not None and self.balancer.squared_norms_seen is None and type(self.balancer).local_extra is Balancer.local_extra:
            ops = native_ops()
        tasks = [k for k, g in enumerate(grads) if g is not None]
        present = [grads[k] for k in tasks]
        if ops is None or not passable(present):
            return (*self._start_statistics(grads, z, template), None)
        losses = self._record.losses.tolist()
        keep = [math.isfinite(losses[k]) for k in tasks]
        donate = tasks[0] < len(donated) and donated[tasks[0]]
        aggregated, products = ops.gram_and_sum(present, [float(coefficients[k]) for k in tasks], keep,
                                                self._cross_terms(), donate)
        usable, pending = self._start_statistics(grads, z, template, products=products)
        if [bool(usable[k]) for k in tasks] == keep:
            return usable, pending, aggregated
        if donate and keep[0] and usable[tasks[0]]:
            # The sum was formed in the first task's gradient, now gone: left out with the non-finite ones.
            self._warn_left_out([], tasks[0], True)
            usable_now = usable.copy()
            usable_now[tasks[0]] = False
            return usable, pending, weighted_sum(grads, coefficients, usable_now)
        return usable, pending, None

    def _balance_elementwise(self, grads, z, template: torch.Tensor, start: Clock, donated: Sequence[bool]) -> torch.Tensor:
        """:meth:`_balance_lagged` for an element-wise rule (CoGrad): every step's aggregate is formed
        from that step's gradients with the constants of the last sum, held until the next one. The
        last sum is read before this step's statistics start, so that the rule's pass over the
        gradients can form the aggregate and the statistics together."""
        usable, gathered, skip = self._elementwise_statistics(grads, z, template, on_host=True)
        if skip:
            start.stop()
            return torch.zeros_like(template)
        last = self._last_sum
        if last is None:  # nothing summed yet: the prior, equal weights
            coefficients = self._coefficients_between_sums()
            if gathered:
                return self._finish(weighted_sum(grads, coefficients, usable, donated), start)
            return self._finish(self._checked_sum(grads, coefficients, usable, donated), start)

        def rule(keep: Sequence[bool], donate: Sequence[bool] = ()) -> torch.Tensor:
            # A task absent from the last sum is summed with the others, uncorrected (no extra: kappa
            # 0), as the rule leaves a step uncorrected where its constants do not fit every task.
            fits = all(bool(last.active[k]) for k, kept in enumerate(keep) if kept)
            return self.balancer.aggregate(grads, dataclasses.replace(last, active=np.asarray(keep, dtype=bool), extra=last.extra if fits else None), z)

        if gathered:  # this step's statistics have read every gradient: ``usable`` is exact
            return self._finish(rule(usable), start)
        return self._finish(self._checked(rule, grads, usable), start)

    def _elementwise_statistics(self, grads, z, template: torch.Tensor, on_host: bool) -> Tuple[object, bool, bool]:
        """An element-wise rule's step: the last sum read and held (the rule's constants), this
        step's statistics put in flight where due. Returns this rank's usable tasks (NumPy, or device
        flags), whether this step's statistics read every gradient, and whether to skip the step.
        On a CPU the rule's pass that gathers the statistics also forms the aggregate, with the
        held constants (``lagged_stats``); on a GPU the rule forms it apart, masked on the device."""
        stats, skip = self._read_sum_ahead()
        if stats is not None:
            self._take_as_last_sum(stats)
        pending = None
        if self._statistics_due():
            self._report_unreported()
            self.balancer.lagged_stats = self._last_sum if on_host else None
            usable, pending = self._start_statistics(grads, z, template, on_host=on_host)
            self.balancer.lagged_stats = None
        else:
            usable = self._usable_from_losses(grads) if on_host else self._usable_on_device(grads)
        self._in_flight = pending
        self._record.losses = None  # consumed: a next step without objective() is refused
        return usable, pending is not None, skip

    def _usable_from_losses(self, grads) -> List[bool]:
        """A step without statistics: this rank's tasks with a gradient and a finite loss (its
        gradients are checked with the sum); a non-finite loss is reported with the next sum. It
        runs on most steps, so it keeps to Python floats: here a NumPy or torch call on T numbers
        costs more than the arithmetic."""
        losses = self._record.losses.tolist()
        usable = [g is not None and math.isfinite(loss) for g, loss in zip(grads, losses)]
        for k, g in enumerate(grads):
            if g is not None and not usable[k]:
                self._unreported[k] = True
        return usable

    def _report_unreported(self) -> None:
        """Non-finite losses of the steps since the last sum, reported as this step's (NaN in its
        statistics): every rank acts on them with this sum."""
        record = self._record
        flags = self._unreported_on_device
        if any(self._unreported.tolist()):  # NumPy's any() costs tens of µs with the caches cold
            host = torch.from_numpy(self._unreported.copy()).to(record.losses.device)  # cleared below
            flags = host if flags is None else flags | host
            self._unreported[:] = False
        if flags is not None:
            record.losses = torch.where(flags, torch.full_like(record.losses, float("nan")), record.losses)
            self._unreported_on_device = None

    def _hold_last_sum(self, pending) -> bool:
        """Puts this step's statistics (or None) in flight, reads the last step's sum, if one is in
        flight, and holds its coefficients; True where the step is to be skipped (``skip_step``)."""
        previous = self._take_in_flight()
        if pending is not None:  # in flight now: None, taken above
            self._in_flight = pending
        stats, skip = self._read_sum(previous)
        if stats is not None and not skip:
            self._hold(stats)
        return skip

    def _read_sum_ahead(self) -> Tuple[Optional[StepStats], bool]:
        """The last sum, read before this step's statistics start (it has arrived): an element-wise
        rule's pass over this step's gradients can then form the aggregate and the statistics
        together. This step's losses, which reading a sum marks as used, are kept for its statistics."""
        losses = self._record.losses
        read = self._read_sum(self._take_in_flight())
        self._record.losses = losses
        return read

    def _take_in_flight(self):
        previous = self._in_flight
        if previous is not None:  # nn.Module's setattr is slow: only if set
            self._in_flight = None
        return previous

    def _read_sum(self, previous) -> Tuple[Optional[StepStats], bool]:
        """The sum of ``previous`` (None: nothing in flight); the bool says the step is to be skipped."""
        if previous is None:
            self._record.losses_used()
            return None, False
        stats = self._wait(previous)
        if self._skip_for_nonfinite_loss(stats):
            return stats, True
        self.balancer.note_inactive(stats, lagged=True)
        return stats, False

    def _take_as_last_sum(self, stats: StepStats) -> None:
        """An element-wise rule's constants until the next sum: this one's, unless no task was active
        in it (no rows on any rank): the last constants then stay, as the rule's state would."""
        if any(stats.active.tolist()) or self._last_sum is None:
            self._last_sum = stats

    def _hold(self, stats: StepStats) -> None:
        """A coefficient rule's step on the last sum; its coefficients are held until the next
        (constant weights: their telemetry only). A task absent from that sum (no rows, no loss or
        a dropped gradient on every rank then) keeps the coefficient it was held at, the prior's
        before any: its rule state did not move, and the steps that use the sum may well have its
        gradient, which a coefficient of 0 would throw away until the next sum."""
        coefficients = self.balancer.coefficients(stats)
        if not self.balancer.reads_statistics:
            self._held = None
            return
        if not all(stats.active.tolist()):
            coefficients = np.where(stats.active, coefficients, self._coefficients_between_sums())
        self._held = coefficients

    def _coefficients_between_sums(self) -> Sequence[float]:
        """The same coefficients on every rank: a constant-weight rule's, else those of the last sum
        (the prior, equal weights, before the first)."""
        fixed = self.balancer.weights_without_statistics()
        held = fixed if fixed is not None else self._held
        if held is None:
            held = [1.0 / self.num_tasks] * self.num_tasks
        if self._record.stats is None:  # nothing summed yet: the weights in use, for the log
            self.balancer.last_telemetry = {"weights": list(held)}
        return held

    def _between_sums(self, grads, start: Clock, donated: Sequence[bool]) -> torch.Tensor:
        """A step that neither gathers statistics nor reads a sum: the held coefficients over this
        rank's tasks with a gradient and a finite loss."""
        usable = self._usable_from_losses(grads)
        self._record.losses_used()
        return self._finish(self._checked_sum(grads, self._coefficients_between_sums(), usable, donated), start)

    def _checked_sum(self, grads, coefficients: Sequence[float], usable: Sequence[bool], donated: Sequence[bool]) -> torch.Tensor:
        """``sum_k c_k G_k`` over ``usable`` when no statistics have looked at the gradients (see
        :meth:`_checked`); the sum may be formed in the first usable gradient (``donated``). Where
        the compiled pass takes the gradients (native.py), the sum and its check are one pass."""
        ops = native_ops()
        present = [g for g in grads if g is not None]
        if ops is None or not passable(present):
            return self._checked(lambda keep, donate: weighted_sum(grads, coefficients, keep, donate), grads, usable, donated)

        def checked_pass(keep, donate):
            kept = [k for k, g in enumerate(grads) if g is not None and keep[k]]
            if not kept:
                return weighted_sum(grads, coefficients, keep, donate), True  # zeros
            return ops.checked_weighted_sum([grads[k] for k in kept], [float(coefficients[k]) for k in kept],
                                            bool(kept[0] < len(donate) and donate[kept[0]]))

        return self._checked(checked_pass, grads, usable, donated)

    def _checked(self, rule, grads, usable: Sequence[bool], donated: Sequence[bool] = ()) -> torch.Tensor:
        """``rule(usable, donated)``, the step's aggregate over the tasks ``usable``, when no
        statistics have looked at the gradients: its sum is NaN or inf if any of them holds a NaN or
        inf, and only then are they read one by one and the aggregate formed again without the
        non-finite ones. If it was formed in the first usable gradient (``donated``), that task is
        left out with them, its own gradient being gone. An aggregate that overflows with every
        gradient finite leaves this rank's whole contribution out."""
        self.balancer.aggregate_total = None
        aggregated, checked = _with_check(rule(usable, donated))
        total, self.balancer.aggregate_total = self.balancer.aggregate_total, None
        if checked if checked is not None else math.isfinite((aggregated.sum() if total is None else total).item()):
            return aggregated
        first = next((k for k, ok in enumerate(usable) if ok), None)
        spent = first if first is not None and first < len(donated) and donated[first] else None
        finite = [g is not None and k != spent and all_finite(g) for k, g in enumerate(grads)]
        bad = [k for k in range(self.num_tasks) if usable[k] and not finite[k] and k != spent]
        self._warn_left_out(bad, spent, bool(bad))
        keep = [bool(usable[k] and finite[k]) for k in range(self.num_tasks)]
        aggregated, checked = _with_check(rule(keep, ()))
        if not (checked if checked is not None else math.isfinite(aggregated.sum().item())):
            self.balancer.warn("(all)", "overflow", OVERFLOW)
            aggregated.zero_()
        return aggregated

    def _warn_left_out(self, bad: Sequence[int], spent: Optional[int], others_bad: bool) -> None:
        """Warnings for the tasks whose non-finite gradient was left out, and for the task whose
        gradient the sum had been formed in (``spent``), left out with them."""
        names, warn = self.balancer.task_names, self.balancer.warn
        for k in bad:
            warn(names[k], "nonfinite_grad", "non-finite gradient at z on this rank: left out of this step")
        if spent is not None:
            why = "summed with a non-finite gradient of another task before the check" if others_bad else "non-finite gradient at z on this rank"
            warn(names[spent], "nonfinite_grad", f"{why}: left out of this step")

    def telemetry(self) -> dict:
        """The last step's values (weights, norms, cosines, method-specific), for logging."""
        self._settle_native()
        if self._record.stats is None:
            return {}
        return self.balancer.telemetry(self._record.stats)

class _AfterRead:
    """A step's time in the boundary where its forward read the last sum: that read's, then its
    backward's span (``clock``)."""

    def __init__(self, clock, read_seconds: float) -> None:
        self.clock, self.read_seconds = clock, read_seconds

    def seconds(self) -> float:
        return self.read_seconds + self.clock.seconds()


def _with_check(result) -> Tuple[torch.Tensor, Optional[bool]]:
    """A rule's aggregate and, where its pass checked every element, whether all are finite (None:
    not checked; :meth:`RepresentationBoundary._checked` then checks the aggregate's sum)."""
    return result if isinstance(result, tuple) else (result, None)


def _run_eagerly_under_compile() -> None:
    """Makes the boundary's ``forward`` and ``objective`` run eagerly under ``torch.compile``, once,
    when the first boundary is made (a model is made before anything compiles it). They keep
    host-side state from step to step (the sum in flight, the rule's numbers): traced, every new
    coefficient would be a constant of a new graph, a recompilation each step until Dynamo's limit.
    Not at import: ``torch.compiler.disable`` imports Dynamo (about a second), which a process that
    only checks a config (``concord train``'s launcher, for every run and every cell of ``compare``)
    never needs."""
    cls = RepresentationBoundary
    if not getattr(cls.forward, "_concord_eager", False):
        for name in ("forward", "objective"):
            eager = torch.compiler.disable(getattr(cls, name))
            eager._concord_eager = True
            setattr(cls, name, eager)


_TASKS, _METHOD = RepresentationBoundary.record_keys
