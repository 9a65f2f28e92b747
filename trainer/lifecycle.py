"""A worker's life: it stops at a step boundary when asked, and never outlives its launcher.

- SIGTERM (preemption, or the launcher stopping the job) and SIGINT set a flag; the training loop asks
  :meth:`StopRequest.agreed` every few steps, one small sum over ranks, so that every rank stops after
  the same step. SIGTERM then writes a checkpoint before exiting; SIGINT exits without one.
- On Linux the kernel sends the worker SIGTERM when its parent (torchrun's agent) dies, even by
  SIGKILL, so no worker trains on as an orphan.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Optional

import torch

logger = logging.getLogger("concord.lifecycle")

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        done = ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if done and os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return done


STOP_CHECK_EVERY = 10  # steps (or evaluation batches) between the ranks' agreement on a pending SIGTERM / SIGINT (one tiny sum)


class StopRequest:
    """Records SIGTERM / SIGINT instead of dying mid-step; see the module docstring."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum, _frame) -> None:
        if self.signal is None:
            logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.signal = signum

    def agreed(self, group) -> Optional[int]:
        """Collective: the signal some rank received (SIGTERM wins over SIGINT), or None."""
        from concord.balancing.collectives import sum_over_ranks

        flags = torch.tensor([float(self.signal == signal.SIGTERM), float(self.signal == signal.SIGINT)], dtype=torch.float64)
        if group is not None:
            flags = sum_over_ranks(flags, group)
        term, interrupt = flags.tolist()
        return signal.SIGTERM if term > 0 else signal.SIGINT if interrupt > 0 else None


class Stopped(Exception):
    """Training stopped on a signal after a step boundary; ``exit_code`` is 128 + the signal."""

    def __init__(self, sig: int, step: int, checkpoint: bool) -> None:
        name = signal.Signals(sig).name
        super().__init__(f"stopped by {name} after step {step}" + (", checkpoint written" if checkpoint else ""))
        self.exit_code = 128 + sig
