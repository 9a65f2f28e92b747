"""Summing the step's statistics over ranks: one small collective per step, started asynchronously,
on the device where the group's backend reduces. The balancers never import this file; the boundary
and the trainer do.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

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
    """A vector handed to :class:`DDPRide`, summed over ranks by DDP's gradient all-reduce; :meth:`wait`
    returns the sum once that all-reduce has run (by the end of the backward that carried it)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        self._sum: Optional[torch.Tensor] = None

    def deliver(self, summed: torch.Tensor) -> None:
        self._sum = summed

    def wait(self) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError(
                "the boundary's statistics were handed to DDP's gradient all-reduce, which never carried them: "
                "the backward stopped before DDP's last gradient bucket, or the model's DDP lacks DDPRide.hook"
            )
        return self._sum


class DDPRide:
    """Carries the boundary's statistics in DDP's own gradient all-reduce instead of a collective of
    their own: registered as DDP's communication hook (``ddp.register_comm_hook(None, ride.hook)``),
    it reduces every bucket as DDP's default hook does and appends the waiting statistics to the last
    bucket of the backward (the one DDP reduces last; it holds the first parameters of the model, below
    ``z``, so it fires after the boundary's backward). On gloo a collective of its own costs a rank's
    core about as much as the boundary's whole arithmetic; the numbers appended to a bucket cost a
    copy of the bucket (figures in docs/performance.md). Lagged statistics only: the sum arrives after
    the boundary's backward. The sum is formed in the bucket's dtype (float32 for a float32 model):
    every rank still reads the same bits, and the statistics differ from a float64 sum by float32
    rounding, as the dot products behind them already do; a half-precision last bucket leaves them to
    a float64 collective of their own. CPU (gloo) buckets."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group
        self._waiting: Optional[RidingSum] = None
        self._last_bucket_gone = False

    def expect_backward(self) -> None:
        """A forward pass began: its backward's last bucket is still to come. Statistics that waited
        for a backward that never reached it (one that raised) are dropped."""
        self._last_bucket_gone, self._waiting = False, None

    def open(self) -> bool:
        """Whether statistics handed over now go with this backward's last bucket (every rank answers
        alike: the order of a backward's steps is the same on each)."""
        return not self._last_bucket_gone

    def carry(self, values: torch.Tensor) -> RidingSum:
        if self._waiting is not None:
            raise RuntimeError("two statistics vectors for one backward")
        self._waiting = RidingSum(values)
        return self._waiting

    def hook(self, state, bucket):  # no annotations: DDP checks them against the classes themselves
        """DDP's communication hook (``state`` unused): ``bucket`` a ``dist.GradBucket``; returns the
        future of the averaged bucket. Buckets that carry nothing go through DDP's default hook."""
        riding = None
        if bucket.is_last():
            self._last_bucket_gone, riding, self._waiting = True, self._waiting, None
        if riding is None:
            return default_hooks.allreduce_hook(self.process_group, bucket)
        if bucket.buffer().dtype not in (torch.float32, torch.float64):  # too coarse a sum: their own, in float64
            own = PendingSum(riding.values, self.process_group)

            def reduced(fut: torch.futures.Future) -> torch.Tensor:
                riding.deliver(own.wait())
                return fut.value()

            return default_hooks.allreduce_hook(self.process_group, bucket).then(reduced)
        group = self.process_group
        buffer = bucket.buffer().div_(dist.get_world_size(group))  # DDP's average, as its default hook
        size = buffer.numel()
        combined = torch.cat([buffer, riding.values.to(buffer.dtype)])

        def done(fut: torch.futures.Future) -> torch.Tensor:
            summed = fut.value()[0]
            riding.deliver(summed[size:].to(torch.float64))
            return buffer.copy_(summed[:size])

        return dist.all_reduce(combined, group=group, async_op=True).get_future().then(done)


class HostExchange:
    """Sums lagged statistics over ranks that share one host through a shared memory block instead
    of a collective: each rank writes its packed vector into a slot of its own and, when the sum is
    read (the next step), adds every rank's slot in rank order, the bits :class:`PendingSum`'s
    all-to-all gives. On gloo the collective costs the rank's core a share of each statistics step,
    and its background thread another rank's core (docs/performance.md); this costs a copy.

    Nothing waits in practice: a rank reads step t's slots in step t+1, after DDP's gradient
    all-reduce of step t, which no rank passes before every rank's backward has gone through the
    boundary and written its slot. A rank still checks each slot's sequence number, waiting for one
    not yet written and raising for one already overwritten. Slots come in ``DEPTH`` generations,
    so a rank one statistics step ahead never writes over what another still reads. Stores reach
    other cores in program order on x86-64 only: elsewhere, and across hosts, the collective sums
    them (:func:`host_exchange_possible`). Use it as :class:`DDPRide`: the boundary's ``ride``, lagged
    statistics only."""

    DEPTH = 4
    CAPACITY = 8192  # float64 numbers a vector may hold; a longer one goes to the collective
    PATIENCE_S = 600.0  # a slot unwritten this long: the other rank is gone

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.calls = 0
        width = 2 + self.CAPACITY  # [sequence number, length, values...]
        size = self.world * self.DEPTH * width
        name = [""]
        if self.rank == 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            handle, path = tempfile.mkstemp(prefix="concord-statistics-", dir=folder)
            try:  # the pages reserved now: a full /dev/shm is an error here, not a SIGBUS on a later write
                os.posix_fallocate(handle, 0, size * 8)
                name[0] = path
            except OSError:
                os.unlink(path)
            finally:
                os.close(handle)
        dist.broadcast_object_list(name, src=dist.get_global_rank(process_group, 0) if process_group else 0, group=process_group)
        if not name[0]:  # every rank learns it from rank 0
            raise OSError(f"no room for {size * 8:,} bytes of shared memory on this host (/dev/shm, else the temporary folder)")
        block = torch.from_file(name[0], shared=True, size=size, dtype=torch.float64)
        dist.barrier(group=process_group)  # every rank has mapped it: the name is no longer needed
        if self.rank == 0:
            os.unlink(name[0])
        self._block = block  # keeps the mapping
        self.slots = block.numpy().reshape(self.world, self.DEPTH, width)

    def expect_backward(self) -> None:
        """As :meth:`DDPRide.expect_backward`: nothing to drop here (a vector is written when carried)."""

    def open(self) -> bool:
        return True

    def carry(self, values: torch.Tensor):
        """Writes this rank's ``values`` (float64, on the CPU) into its slot; returns what sums them."""
        if values.numel() > self.CAPACITY:
            return PendingSum(values, self.process_group)
        self.calls += 1
        slot = self.slots[self.rank, self.calls % self.DEPTH]
        n = values.numel()
        slot[2:2 + n] = values.numpy()
        slot[1] = n
        slot[0] = self.calls  # last: another core sees the values before it sees the number (x86-64)
        return _ExchangedSum(self, self.calls, n)

    def read(self, call: int, n: int) -> torch.Tensor:
        rows = self.slots[:, call % self.DEPTH]
        waited = time.monotonic()
        for rank in range(self.world):
            while rows[rank, 0] != call:
                if rows[rank, 0] > call:
                    raise RuntimeError(f"rank {rank} wrote its statistics over those of the sum rank {self.rank} still had to read")
                if time.monotonic() - waited > self.PATIENCE_S:
                    raise RuntimeError(f"rank {rank} never wrote its statistics for the sum rank {self.rank} waits for")
                time.sleep(0)
        total = rows[0, 2:2 + n].copy()
        for rank in range(1, self.world):
            total += rows[rank, 2:2 + n]
        if not (rows[:, 0] == call).all():  # written over while read: the check above can no longer hold
            raise RuntimeError(f"the statistics rank {self.rank} read were written over while it read them")
        return torch.from_numpy(total)


class _ExchangedSum:
    def __init__(self, exchange: HostExchange, call: int, n: int) -> None:
        self.exchange, self.call, self.n = exchange, call, n
        self._sum: Optional[torch.Tensor] = None

    def wait(self) -> torch.Tensor:
        if self._sum is None:
            self._sum = self.exchange.read(self.call, self.n)
        return self._sum


def host_exchange_possible(world_size: int, local_world_size: int, device: torch.device) -> Optional[str]:
    """Why a :class:`HostExchange` cannot sum this job's statistics (None: it can): more than one
    rank, all on this host (``local_world_size`` of them, torchrun's ``LOCAL_WORLD_SIZE``), a CPU
    job, x86-64 stores."""
    if world_size < 2:
        return "one rank: nothing to sum"
    if device.type != "cpu":
        return "a GPU job: NCCL sums on the device"
    if local_world_size != world_size:
        return "the ranks are not all on this host"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()}: the exchange relies on x86-64's store order"
    return None


class PendingStatistics:
    """The step's one statistics reduction (a :class:`PendingSum` of the packed vector, or a
    :class:`RidingSum` where ``ride`` carries it): work that does not need the global statistics
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
        ride: Optional[DDPRide] = None,
    ) -> None:
        self.num_tasks = num_tasks
        self.batch_size = batch_size
        self.cross_terms = cross_terms
        self._sum = ride.carry(packed) if ride is not None else PendingSum(packed, process_group, device, collective)

    def wait(self) -> StepStats:
        return unpack_statistics(self._sum.wait(), self.num_tasks, self.batch_size, self.cross_terms)
