"""The boundary's steps on its compiled nodes (``native.py``, ``csrc/nodes.cpp``): a one-view step
(autograd's sum scaled and checked) and a lagged rule's step between its sums (the held coefficients'
weighted sum, or an element-wise rule with the constants of its last sum, and its check), with no
Python in backward. Forward writes the step's constants into the node's state where they changed;
:meth:`~.boundary.RepresentationBoundary.objective` writes the losses' verdict there; what the node
found (non-finite gradients left out, non-finite losses to report) is acted on when the boundary is
next read (:meth:`CompiledSteps._settle_native`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

# The compiled nodes' states (csrc/nodes.cpp): their fixed part's size (the between-sums node adds
# 3 flags a task, then its constants) and where their clock's start is (its end follows).
NATIVE_LAYOUT = {"view": (7, 4), "held": (8, 1)}
_VIEW_COEFFICIENT = 6  # in the "view" node's state
_HELD_CONSTANTS = 4  # the "held" node's scalar constants, after its 8 + 3T flags; then T each: c, gamma, held
# Warnings of what a node found, which the Python nodes give in the same words.
OVERFLOW = "the aggregate at z overflowed on this rank: its whole contribution is left out of this step"
NONFINITE_SUM_AT_VIEW = ("non-finite gradient at z on this rank, summed with the other tasks' by autograd: this rank's "
                         "whole contribution is left out of this step")


class NativeClock:
    """A compiled node's span in its last backward, from its state (0 from the forward that starts a
    step on the node until that step's backward has run): one per node, read by the step's record."""

    def __init__(self, flags: np.ndarray, start: int) -> None:
        self.flags, self.start = flags, start  # start and end at flags[start], flags[start + 1]

    def seconds(self) -> float:
        return max(float(self.flags[self.start + 1] - self.flags[self.start]), 0.0)


class CompiledSteps:
    """Part of :class:`~.boundary.RepresentationBoundary` (mixed into it): its steps on the compiled
    nodes. It keeps the nodes' states in ``self._native`` (node -> state tensor, the same memory as
    a NumPy array, its clock) and what their constants were written from in ``self._native_sources``,
    both made by the boundary's constructor, and reads the boundary's step record and balancer."""

    def _held_constants(self, z: torch.Tensor) -> Optional[tuple]:
        """The compiled between-sums node's constants for this step (see :meth:`~Balancer.held_rule`):
        the held coefficients, or an element-wise rule's constants; None where the node does not
        implement the rule."""
        if not self._elementwise:
            return [float(c) for c in self._coefficients_between_sums()], [], 0.0, []
        return self.balancer.held_rule(self._last_sum, z)

    def _held_constants_written(self, z: torch.Tensor) -> bool:
        """Whether the between-sums node's state holds this step's constants (:meth:`_held_constants`),
        written there now if what they derive from (the balancer, the reduction, the held
        coefficients, the last sum, ``z``'s dtype and shape) changed since they were: they change
        once a sum, and forming them costs more than the node. False where the node does not
        implement the rule."""
        sources = (self._balancer, self._held, self._last_sum, self.reduction, z.dtype, z.shape)
        written = self._native_sources.get("held")
        if (written is not None and self._record.stats is not None  # before a first sum, the prior's telemetry is set each step
                and written[0] is sources[0] and written[1] is sources[1] and written[2] is sources[2]  # objects: by identity
                and written[3:] == sources[3:]):
            return True
        rule = self._held_constants(z)
        if rule is None:
            return False
        coefficients, gamma, kappa, active = rule
        tasks = self.num_tasks
        constants = self._native_state("held")[1][NATIVE_LAYOUT["held"][0] + 3 * tasks :]
        constants[:_HELD_CONSTANTS] = (float(tasks) if self.reduction == "sum" else 1.0, kappa, float(bool(gamma)), float(bool(active)))
        for i, values in enumerate((coefficients, gamma, active)):
            constants[_HELD_CONSTANTS + i * tasks : _HELD_CONSTANTS + (i + 1) * tasks] = [float(v) for v in values] if values else 0.0
        self._native_sources["held"] = sources
        return True

    def _native_held(self, ops, z: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """A :meth:`_between_sums` step on the compiled node (native.py), or an element-wise rule's
        between its sums, with the constants :meth:`_held_constants_written` left in its state: the
        same aggregate and the same checks, with no Python in backward. :meth:`objective` passes it
        the losses' verdict; what it found (non-finite gradients left out, non-finite losses to
        report) is acted on when the boundary is next read (:meth:`_settle_native`)."""
        if self._gather_for_log:  # consumed, as _statistics_due() would (nn.Module's setattr is slow: only if set)
            self._gather_for_log = False
        state = self._start_native_step("held")
        self._record.held_unsettled = True
        return tuple(ops.held_sum(z, state, self.num_tasks))

    def _native_view(self, ops, z: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """A :meth:`_sum_at_view` step on the compiled node (native.py): what
        :meth:`_balance_sum_at_view` does, with no Python in backward. :meth:`objective` checks the
        losses; a non-finite sum is warned of when the boundary is next read (:meth:`_settle_native`).
        The coefficient is written into the node's state when the balancer or the reduction changes."""
        sources = (self._balancer, self.reduction)
        written = self._native_sources.get("view")
        if written is None or written[0] is not sources[0] or written[1] != sources[1]:
            self._native_state("view")[1][_VIEW_COEFFICIENT] = self._coefficient_at_view()
            self._native_sources["view"] = sources
        view = ops.sum_at_view(z, self._start_native_step("view"))
        return tuple(view for _ in range(self.num_tasks))

    def _native_state(self, node: str) -> tuple:
        """The compiled node's state (its layout in csrc/nodes.cpp), the same memory as a NumPy array
        (read and written without torch) and the clock that reads the node's span from it, made on
        first use."""
        if node not in self._native:
            size = NATIVE_LAYOUT[node][0] + (6 * self.num_tasks + _HELD_CONSTANTS if node == "held" else 0)
            state = torch.zeros(size, dtype=torch.float64)
            flags = state.numpy()
            self._native[node] = (state, flags, NativeClock(flags, NATIVE_LAYOUT[node][1]))
        return self._native[node]

    def _start_native_step(self, node: str) -> torch.Tensor:
        """This step's ``node`` ("view" or "held"): its state (made on first use; its layout in
        csrc/nodes.cpp), its clock, and the balancer's step, counted now (its backward runs no
        Python)."""
        state, flags, clock = self._native_state(node)
        flags[clock.start] = flags[clock.start + 1] = 0.0
        self._record.native_node = node
        self._record.backward_clock = clock
        self.balancer.step += 1
        return state

    def _settle_native(self) -> None:
        """Acts on what the last native backward found: the warning for a one-view step's non-finite
        sum; a step between sums' non-finite losses (reported with the next sum) and the gradients
        it left out."""
        if "view" in self._native and self._native["view"][1][2]:
            self._native["view"][1][2] = 0.0
            self.balancer.warn("(all)", "nonfinite_grad", NONFINITE_SUM_AT_VIEW)
        record = self._record
        if not record.held_unsettled:
            return
        flags = self._native["held"][1]
        if flags[2] == 0.0:  # its backward has not run
            return
        record.held_unsettled = False
        if flags[7] == 0.0:  # nothing to report (read here on every step: the flags below only when set)
            return
        tasks, first = self.num_tasks, NATIVE_LAYOUT["held"][0]
        loss_finite, had_gradient, left_out = (flags[first + i * tasks : first + (i + 1) * tasks] for i in range(3))
        self._unreported |= (had_gradient != 0) & (loss_finite == 0)
        spent = int(flags[5])
        self._warn_left_out([k for k in range(tasks) if left_out[k]], spent if spent >= 0 else None, bool(flags[6]))
        if flags[4]:
            self.balancer.warn("(all)", "overflow", OVERFLOW)

    def _losses_to_native(self, node: str, losses: torch.Tensor) -> None:
        """Writes the losses' verdict into the state of the compiled node this step runs (``node``),
        which its backward reads: for a one-view step whether every loss is finite (the losses
        checked and warned of here), for a step between sums each task's."""
        flags = self._native[node][1]
        if node == "view":
            flags[1] = 0.0 if self._losses_at_view(losses) else 1.0
        else:
            self._record.losses_used()
            first = NATIVE_LAYOUT["held"][0]
            flags[first : first + self.num_tasks] = [float(math.isfinite(v)) for v in losses.tolist()]
        flags[0] = 1.0
