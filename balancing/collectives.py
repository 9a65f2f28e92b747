"""Summing the step's statistics over ranks: one small collective per step, started asynchronously,
on the device where the group's backend reduces. The balancers never import this file; the boundary
and the trainer do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .statistics import StepStats, unpack_statistics


# How the statistics are summed over ranks. "all_to_all": every rank sends its vector to every rank
# and adds the W vectors up itself, in rank order (so every rank gets the same bits). For vectors this
# small gloo's all_reduce runs a multi-round algorithm that costs several times its all-to-all
# (docs/performance.md), and the call sits in the middle of backward.
# "all_reduce": one all_reduce, what NCCL does best on a GPU. "auto": all_to_all for a CPU buffer
# (gloo), all_reduce for a GPU buffer (NCCL).
STATS_COLLECTIVES = ("auto", "all_reduce", "all_to_all")


def group_device(process_group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a collective on ``process_group`` must find its tensors: the current GPU for an NCCL group,
    the CPU for gloo (or without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PendingSum:
    """A float64 CPU vector summed over the ranks of ``process_group``, started asynchronously when a
    group of more than one rank is initialised (else the vector itself); :meth:`wait` returns the
    sum, the same on every rank, on the CPU. ``device``: reduce there; by default where the group's
    backend reduces (:func:`group_device`). ``collective``: see ``STATS_COLLECTIVES``."""

    def __init__(
        self,
        values: torch.Tensor,
        process_group: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
        collective: str = "auto",
    ) -> None:
        if collective not in STATS_COLLECTIVES:
            raise ValueError(f"collective must be one of {STATS_COLLECTIVES}, got {collective!r}")
        self._buf = values
        self._work = None
        self._ready: Optional[torch.cuda.Event] = None  # a GPU buffer's copy to pinned host memory
        self._world = 1  # > 1: the buffer holds the all-to-all's W vectors, summed in wait()
        world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            device = device if device is not None else group_device(process_group)
            if values.device != device:  # e.g. a GPU's statistics for a gloo group: to the CPU
                self._buf = values.to(device)
            if collective == "auto":
                collective = "all_reduce" if self._buf.is_cuda else "all_to_all"
            if collective == "all_reduce":
                self._work = dist.all_reduce(self._buf, group=process_group, async_op=True)
            else:
                self._world = world
                self._sent = self._buf.repeat(self._world)  # held until wait(): the collective reads it
                self._buf = torch.empty_like(self._sent)
                self._work = dist.all_to_all_single(self._buf, self._sent, group=process_group, async_op=True)
        if self._buf.is_cuda:
            self._copy_to_host()

    def _copy_to_host(self) -> None:
        """Queues the sum's copy into pinned host memory on a side stream, behind the collective, so
        that neither the host nor the compute stream waits for it; :meth:`wait` then waits for that
        copy alone (by the next step, long done)."""
        side = _side_stream(self._buf.device)
        side.wait_stream(torch.cuda.current_stream(self._buf.device))  # the kernels that filled the buffer
        with torch.cuda.stream(side):
            if self._work is not None:
                self._work.wait()  # the side stream waits for the collective, not the host
                self._work = None
            host = torch.empty(self._buf.shape, dtype=self._buf.dtype, pin_memory=True)
            host.copy_(self._buf, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(side)
        self._buf.record_stream(side)
        self._buf = host

    def wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        if self._work is not None:
            self._work.wait()
        summed = self._buf.cpu()
        if self._world > 1:  # the all-to-all's W vectors, added in rank order
            rows = summed.view(self._world, -1).numpy()
            total = rows[0].copy()
            for row in rows[1:]:
                total += row
            summed = torch.from_numpy(total)
        return summed


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def sum_over_ranks(values: torch.Tensor, process_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """A small float64 CPU vector summed over ranks (itself without a process group), the same on
    every rank: one collective, the cheaper one for the backend (``STATS_COLLECTIVES``)."""
    return PendingSum(values, process_group).wait()


class RidingSum:
    """A vector handed to a :class:`StatisticsCarrier`, summed over ranks by DDP's gradient all-reduce;
    :meth:`wait` returns the sum, read from the carrier's gradient once that backward has ended."""

    def __init__(self, values: torch.Tensor, carrier: "StatisticsCarrier") -> None:
        self.size = values.numel()
        self._carrier = carrier
        self._sum: Optional[torch.Tensor] = None

    def deliver(self, summed: torch.Tensor) -> None:
        self._sum = summed

    def wait(self) -> torch.Tensor:
        if self._sum is None:
            self._carrier.deliver()
        if self._sum is None:
            raise RuntimeError(
                "the boundary's statistics were handed to DDP's gradient all-reduce, which never carried them: "
                "the backward stopped before the boundary's carrier, or the carrier is not in the model that DDP wraps"
            )
        return self._sum


class _Carry(torch.autograd.Function):
    """The compiled ``carry`` node's Python twin (csrc/nodes.cpp, ``Carry``)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, carrier: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.slot = slot
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        carried = ctx.slot.clone()
        ctx.slot.zero_()
        return grad, carried, None


class StatisticsCarrier(nn.Module):
    """Carries the boundary's lagged statistics in DDP's own gradient all-reduce, with no collective
    and no communication hook of their own: a parameter (``values``) that ``z`` passes through on
    every training step (:meth:`attach`; DDP expects a gradient for each of its parameters on every
    step), whose gradient is the statistics vector on a step that gathers them and zeros on the
    others. The boundary's backward runs before the carrier's, so the statistics it hands over
    (:meth:`carry`) always ride; DDP averages them with the model's gradients in the same bucket, and
    the sum is read from the gradient once that backward has ended (:meth:`deliver`). On gloo a
    collective of their own costs a rank's core more than the boundary's arithmetic; a Python
    communication hook costs every bucket of every step (docs/performance.md).

    ``capacity``: the longest statistics vector (:func:`carrier_capacity`); ``world_size``: the ranks
    of DDP's process group, which must be those of the boundary's statistics group. The sum is formed
    in ``dtype`` (the model's: the carrier then shares its bucket), so it differs from a float64 sum by
    that rounding, as the dot products behind it already do; every rank reads the same bits. The
    parameter is no weight of the model: kept out of its optimizer (:meth:`is_carrier`), and out of
    its ``state_dict``."""

    def __init__(self, capacity: int, world_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.zeros(capacity, dtype=dtype))
        self.world_size = world_size
        self._slot = torch.zeros(capacity, dtype=dtype)
        self._waiting: Optional[RidingSum] = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.values.zero_()

    def is_carrier(self, parameter: torch.Tensor) -> bool:
        return parameter is self.values

    def attach(self, z: torch.Tensor) -> torch.Tensor:
        """``z``, passed through the node that gives the carrier its gradient in this step's backward.
        A sum carried by the last backward is taken from the gradient first, which is then cleared
        (nothing else clears it: no optimizer holds it)."""
        self.deliver()
        if self.values.grad is not None:
            self.values.grad.zero_()
        self._slot.zero_()  # what a backward that raised before the carrier's node left there
        from .native import native_ops

        ops = native_ops()
        if ops is not None and z.device.type == "cpu":
            return ops.carry(z, self.values, self._slot)
        return _Carry.apply(z, self.values, self._slot)

    def open(self) -> bool:
        """Statistics handed over in backward ride with it: the carrier's node runs after the boundary's."""
        return True

    def carry(self, values: torch.Tensor) -> RidingSum:
        if self._waiting is not None:
            raise RuntimeError("two statistics vectors for one backward")
        if values.numel() > self._slot.numel():
            raise ValueError(f"{values.numel()} statistics for a carrier of {self._slot.numel()}")
        self._slot[: values.numel()] = values
        self._waiting = RidingSum(values, self)
        return self._waiting

    def deliver(self) -> None:
        """Hands the sum carried by the last backward (DDP's average times the world size) to its
        :class:`RidingSum`, if one waits."""
        riding, self._waiting = self._waiting, None
        if riding is None:
            return
        grad = self.values.grad
        if grad is not None:
            riding.deliver(grad[: riding.size].to(torch.float64) * self.world_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        return  # no weight: a checkpoint does not depend on how statistics travelled

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        return


def carrier_capacity(num_tasks: int, extra_size: int) -> int:
    """The length of the packed statistics (:func:`~concord.balancing.statistics.local_statistics`):
    the T x T Gram, T losses, T flags, the batch size and a balancer's extras."""
    return num_tasks * num_tasks + 2 * num_tasks + 1 + extra_size


class PendingStatistics:
    """The step's one statistics reduction (a :class:`PendingSum` of the packed vector, or a
    :class:`RidingSum` where ``ride``, a :class:`StatisticsCarrier`, carries it): work that does not need the global statistics
    can run before :meth:`wait` returns them."""

    def __init__(
        self,
        packed: torch.Tensor,
        num_tasks: int,
        batch_size: int,
        process_group: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
        cross_terms: bool = True,
        collective: str = "auto",
        ride: Optional["StatisticsCarrier"] = None,
    ) -> None:
        self.num_tasks = num_tasks
        self.batch_size = batch_size
        self.cross_terms = cross_terms
        self._sum = ride.carry(packed) if ride is not None else PendingSum(packed, process_group, device, collective)

    def wait(self) -> StepStats:
        return unpack_statistics(self._sum.wait(), self.num_tasks, self.batch_size, self.cross_terms)


def reduce_statistics(
    packed: torch.Tensor,
    num_tasks: int,
    batch_size: int,
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> StepStats:
    """Sums the packed vector over ranks once (when a process group is initialised) and unpacks it."""
    return PendingStatistics(packed, num_tasks, batch_size, process_group, device).wait()
