"""Time on the device where the work runs: the host clock on a CPU, CUDA events on the current stream
on a GPU, turned into seconds only when read (never a synchronisation where the work is)."""

from __future__ import annotations

import time
from typing import Union

import torch


def mark(cuda: bool) -> Union[float, torch.cuda.Event]:
    """Now: ``perf_counter()``, or a CUDA event recorded on the current stream."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start, end, cuda: bool) -> float:
    """Seconds from ``start`` to ``end`` (two :func:`mark` results); on CUDA this waits for ``end``."""
    if cuda:
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    return end - start


class Clock:
    """One span (the boundary's time in one backward): started when made, :meth:`stop` ends it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = mark(self.cuda)
        self.end = None

    def stop(self) -> None:
        self.end = mark(self.cuda)

    def seconds(self) -> float:
        return 0.0 if self.end is None else seconds_between(self.start, self.end, self.cuda)
