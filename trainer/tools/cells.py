"""The cells of ``concord compare`` and ``concord tune``: ``concord train`` runs that stop with their caller.

Each cell runs in a session of its own, so a terminal's Ctrl-C reaches the caller alone, which hands
the signal on once to every running cell (each stops after its current step as ``concord train``
does, with a checkpoint on SIGTERM) and starts no other. A cell also asks the kernel for SIGTERM
should its caller die without a word (SIGKILL, a lost node): no cell trains on unwatched, writing
into a run directory that the next call would want. The caller then ends with one line and exit
code 128 + the signal; the same command again reuses every cell that finished.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

# Set in a cell's environment: ``concord train`` then stops (SIGTERM) when its caller's process ends.
STOP_WITH_CALLER_ENV = "CONCORD_STOP_WITH_CALLER"


class CellsStopped(RuntimeError):
    """The caller received SIGINT or SIGTERM: the running cells stopped, no other started."""

    def __init__(self, signum: int, done: int, total: int) -> None:
        self.signum, self.done, self.total = signum, done, total
        resumed = ", resuming the stopped ones from their checkpoints" if signum == signal.SIGTERM else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}: {done} of {total} cells done; the same command goes "
                         f"on from there, reusing them{resumed}")


class _CellStopped(RuntimeError):
    """One cell did not run to its end because the caller was stopped."""


class Cells:
    """Runs cells ``jobs`` at a time and hands a SIGINT or SIGTERM on to the running ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Dict[int, subprocess.Popen] = {}
        self.signum: Optional[int] = None

    def train(self, cmd: Sequence[str], log: Path, env: Mapping[str, str]) -> int:
        """``cmd`` (a ``concord train``) with its output in ``log``; its exit code."""
        with self._lock:
            if self.signum is not None:  # before the log is opened: a stopped cell's log stays as it was
                raise _CellStopped()
            with open(log, "w") as out:
                process = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**env, STOP_WITH_CALLER_ENV: "1"})
            self._running[process.pid] = process
        try:
            code = process.wait()
        finally:
            with self._lock:
                del self._running[process.pid]
        if self.signum is not None and code != 0:
            raise _CellStopped()
        return code

    def run(self, run: Callable[..., None], cells: Sequence[tuple], jobs: int) -> List[str]:
        """``run(i, *cell)`` for every cell (``i`` counting from 1), ``jobs`` at a time; the messages of
        those that failed (the others still ran). A SIGINT or SIGTERM meanwhile raises
        :class:`CellsStopped` once the running cells have stopped."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(self._unless_stopped, run, i, *cell) for i, cell in enumerate(cells, 1)]
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.signum is not None:
            done = sum(1 for f in futures if f.exception() is None)
            raise CellsStopped(self.signum, done, len(cells))
        return [str(f.exception()) for f in futures if f.exception() is not None]

    def _unless_stopped(self, run: Callable[..., None], *args) -> None:
        if self.signum is not None:
            raise _CellStopped()
        run(*args)

    def _stop(self, signum: int, _frame) -> None:
        with self._lock:
            if self.signum is None:
                self.signum = signum
                print(f"concord: {signal.Signals(signum).name}: stopping the running cells after their current step",
                      flush=True)
            for process in self._running.values():
                process.send_signal(signum)
