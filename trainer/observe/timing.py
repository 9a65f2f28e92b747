"""Step timing and QPS: wall clocks on CPU, CUDA events on GPU, chosen by device in one place."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from concord.balancing.clock import mark, seconds_between


class StepTimings(dict):
    """Seconds per phase of one step, and their sum under ``step``. On CUDA the phases are events on
    the device's stream, turned into seconds only when a phase is first read (waiting for the step's
    last event), so a step that nobody reads never makes the host wait for the GPU."""

    def __init__(self, marks: List[tuple], cuda: bool) -> None:
        super().__init__()
        self._marks, self._cuda = marks, cuda
        self._deferred: Dict[str, Callable[[], float]] = {}
        if not cuda:
            self._fill()

    def defer(self, key: str, read: Callable[[], float]) -> None:
        """A figure of its own (the boundary's CUDA-event time), read when the phases are."""
        if self._marks is None:
            super().__setitem__(key, read())
        else:
            self._deferred[key] = read

    def _fill(self) -> None:
        if self._marks is None:
            return
        marks, self._marks = self._marks, None
        phases = {}
        for (_, a), (phase, b) in zip(marks, marks[1:]):  # a phase marked twice: its two spans added
            phases[phase] = phases.get(phase, 0.0) + seconds_between(a, b, self._cuda)
        phases["step"] = sum(phases.values())
        for key, read in self._deferred.items():
            phases[key] = read()
        for key, value in phases.items():
            super().setdefault(key, value)

    def __getitem__(self, key):
        self._fill()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._fill()
        return super().get(key, default)

    def keys(self):
        self._fill()
        return super().keys()

    def items(self):
        self._fill()
        return super().items()


class StepTimer:
    """Times the phases of one step. ``mark(phase)`` closes the phase that ran since the last mark.

    On CUDA, events are recorded on the stream and read only when a figure is asked for (see
    :class:`StepTimings`), never with a per-step ``torch.cuda.synchronize()``; on CPU the work is
    synchronous and ``perf_counter`` is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: List[tuple] = []

    def start(self) -> None:
        self._marks = [("start", mark(self.cuda))]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, mark(self.cuda)))

    def read(self) -> StepTimings:
        """The last step's phases (lazily, on CUDA)."""
        return StepTimings(self._marks, self.cuda)


class QPSMeter:
    """Global training QPS: samples over all ranks per second of rank 0's step time.

    Warm-up steps are excluded from both the windowed figure (last ``window`` steps) and the lifetime
    figure. ``breakdown()`` averages each phase (and the boundary's share) over the window.
    """

    def __init__(self, global_batch_size: int, qps_skip_steps: int, window: int) -> None:
        self.global_batch_size = global_batch_size
        self.qps_skip_steps = qps_skip_steps
        self.window: Deque[Dict[str, float]] = deque(maxlen=window)
        self.steps_seen = 0
        self._seconds = 0.0
        self._unread: List[Dict[str, float]] = []  # counted steps whose times are not summed yet
        self.lifetime_steps = 0

    def update(self, timings: Dict[str, float]) -> None:
        """Counts a step; its times are read when a figure is asked for (on CUDA: at logging steps)."""
        self.steps_seen += 1
        if self.steps_seen <= self.qps_skip_steps:
            return
        self.window.append(timings)
        self._unread.append(timings)
        self.lifetime_steps += 1

    @property
    def lifetime_seconds(self) -> float:
        self._seconds += sum(t["step"] for t in self._unread)
        self._unread = []
        return self._seconds

    @property
    def ready(self) -> bool:
        return self.lifetime_steps > 0

    def windowed_qps(self) -> Optional[float]:
        seconds = sum(t["step"] for t in self.window)
        return len(self.window) * self.global_batch_size / seconds if seconds > 0 else None

    def lifetime_qps(self) -> Optional[float]:
        seconds = self.lifetime_seconds
        if seconds <= 0:
            return None
        return self.lifetime_steps * self.global_batch_size / seconds

    def breakdown(self) -> Dict[str, float]:
        """Mean milliseconds per phase over the window, plus ``boundary_share`` (% of the step)."""
        if not self.window:
            return {}
        keys = self.window[0].keys()
        out = {f"{k}_ms": 1000.0 * sum(t.get(k, 0.0) for t in self.window) / len(self.window) for k in keys}
        if "boundary" in keys and out["step_ms"] > 0:
            out["boundary_share_pct"] = 100.0 * out["boundary_ms"] / out["step_ms"]
        return out


def paired_drop(step_ms: Sequence[float], base_ms: Sequence[float]) -> Tuple[float, float]:
    """The QPS drop (%) of a method against a baseline timed in the same rounds, and its standard error.

    ``step_ms`` and ``base_ms`` are per-round step times, paired by round. The drop is
    ``1 - QPS / QPS_base = mean(t - t_base) / mean(t)`` over all timed steps; a mean of per-round QPS
    ratios would be biased upwards when single rounds vary by ~15%, as they do one step at a time.
    """
    diffs = [t - b for t, b in zip(step_ms, base_ms)]
    mean_ms = statistics.mean(step_ms)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return 100.0 * statistics.mean(diffs) / mean_ms, 100.0 * spread / math.sqrt(len(diffs)) / mean_ms
