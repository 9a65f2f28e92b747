"""How a failure reaches the user: one line naming the cause, from whichever rank met it first.

Each worker that fails writes its line into the launcher's error folder (``CONCORD_ERROR_DIR``) and
prints it; the launcher prints the earliest one last, so the job's final line is the root cause rather
than a peer's "connection closed". Unexpected exceptions also go through torchelastic's ``@record``,
so torchrun and torchx name the failing rank and keep the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

ERROR_DIR_ENV = "CONCORD_ERROR_DIR"
_STARTED = time.time()  # this process's start, as near as the import of this module


def report(error: BaseException, rank: int, world_size: int, exit_code: int = 3) -> str:
    """Prints ``error`` as one line and records it, with the exit code it ends the worker with, for the
    launcher; returns the line."""
    where = f"rank {rank}: " if world_size > 1 else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = f"{where}{type(error).__name__}: {message}"
    # One write: print() writes the text and its newline apart, and with PYTHONUNBUFFERED (as containers
    # set it) two ranks failing at once printed "...directoryconcord: rank 0: ..." on one line.
    sys.stderr.write(f"concord: {line}\n")
    sys.stderr.flush()
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        try:
            (Path(folder) / f"rank-{rank}.txt").write_text(f"{time.time():.6f} {exit_code} {line}\n")
        except OSError:
            pass  # the launcher is gone; the printed line is all there is
    return line


def first_error(folder: str | Path) -> Optional[Tuple[int, str]]:
    """(exit code, line) of the earliest failure any rank recorded in ``folder``, or None."""
    records = []
    for path in Path(folder).glob("rank-*.txt"):
        stamp, code, line = path.read_text().strip().split(" ", 2)
        records.append((float(stamp), int(code), line))
    return min(records)[1:] if records else None


def recorded(main: Callable[[], int]) -> Callable[[], int]:
    """A worker's entry point: an unexpected exception is reported as one line, then re-raised through
    torchelastic's ``@record`` (which writes the launcher's error file). Where another rank of the
    launcher's job had already failed, it is most likely that failure's echo (a peer's closed
    connection): its line is printed and the worker ends without the traceback, which would bury the
    cause the launcher prints last."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(main)
    def run() -> int:
        try:
            return main()
        except Exception as error:
            rank = int(os.environ.get("RANK", 0))
            after_another = _another_rank_failed(rank)
            report(error, rank, int(os.environ.get("WORLD_SIZE", 1)), exit_code=1)
            if after_another:
                return 1
            raise

    return record(run)


def _another_rank_failed(rank: int) -> bool:
    """Whether a rank other than ``rank`` has recorded a failure in the launcher's error folder since
    this worker started (not one of a job that torchrun has since restarted)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    return any(path.name != f"rank-{rank}.txt" and _recorded_since(path, _STARTED) for path in Path(folder).glob("rank-*.txt"))


def _recorded_since(path: Path, start: float) -> bool:
    try:
        return float(path.read_text().split(" ", 1)[0]) >= start
    except (OSError, ValueError):  # being written now: a failure of this job all the same
        return True


# Third-party messages that every Concord run on CPU would print and that ask nothing of the user:
# (logger name, or "warnings" for Python warnings; the start of the message). `--show-warnings` keeps them.
KNOWN_HARMLESS = (
    # DMP wraps the dense part in DDP with an argument torch has renamed; TorchRec's to update.
    ("warnings", "`broadcast_buffers` is deprecated"),
    # FBGEMM's CPU lookup for data-parallel tables registers no autograd kernel; TorchRec trains those
    # tables through DDP instead, and tests/test_sharding.py checks their gradients.
    ("warnings", "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"),
    ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be ignored"),
    ("", "Sharding spec not found for"),  # logged on the root logger for data-parallel tables
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
    # TorchRec 1.8 still hands DCP its tables as ShardedTensors.
    ("warnings", "Please use DTensor instead and we are deprecating ShardedTensor"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def filter_known_warnings() -> None:
    """Silences :data:`KNOWN_HARMLESS` in this process (each worker calls it too)."""
    by_logger: dict = {}
    for source, prefix in KNOWN_HARMLESS:
        if source == "warnings":
            warnings.filterwarnings("ignore", message=re.escape(prefix))
        else:
            by_logger.setdefault(source, []).append(prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name or None).addFilter(_DropMessages(prefixes))
