"""A run directory has one owner and holds one run.

- **Lock**: the job's rank 0 holds an exclusive ``flock`` on ``run_dir/.lock`` while it runs, so a
  second job on the same directory stops at once with the first one's pid, host and start time. The
  kernel drops the lock when its process dies, so a dead job's lock never blocks; its details are
  named in the log when a new job takes over.
- **Run id**: ``run.json`` names the run the directory holds; every record in ``metrics.jsonl`` carries
  it and TensorBoard writes under ``tb/<run id>``. A resumed run keeps its id.
- **Fresh start in a used directory**: the old run's files move to ``previous-<its id>/``, never mixed
  with the new run's nor resumed later.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger("concord.rundir")

# What a run writes into its directory; a fresh start moves these aside.
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "summary.json", "tb", "checkpoints", "plots", "bench.json", "bench.md")


class RunDirError(RuntimeError):
    """The run directory cannot be used: another job holds it, or it cannot be written."""


class RunDirLock:
    """Exclusive ownership of a run directory for this process's lifetime (or until :meth:`release`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{self.path.parent}: cannot create the run directory's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another job ({holder}); wait for it, stop it, or use another "
                "train.run_dir"
            ) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            logger.info("%s: taking over from a job that ended without releasing it (%s)", self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_run(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def start_run(run_dir: Path, resume: bool) -> str:
    """The run id this job writes under: the directory's own when resuming it, else a new one, with
    any earlier run's files moved to ``previous-<id>/`` first."""
    run_dir = Path(run_dir)
    current = read_run(run_dir)
    if resume and current is not None:
        return current["run_id"]
    leftovers = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume and leftovers:  # written before run ids existed: this run continues it (if compatible)
        leftovers = []
    if leftovers:
        old_id = current["run_id"] if current else f"unknown-{new_run_id()}"
        aside = run_dir / f"previous-{old_id}"
        aside.mkdir(parents=True, exist_ok=True)
        for name in leftovers:
            os.replace(run_dir / name, aside / name)
        kept = sorted(run_dir.glob("previous-*"))
        logger.warning("%s held an earlier run (%s): moved to %s; the %d earlier run(s) kept in %s take %s "
                       "(remove those you no longer need)", run_dir, old_id, aside, len(kept), run_dir, _size(kept))
    run_id = new_run_id()
    write_json_atomic(run_dir / "run.json", {"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return run_id


def _size(folders: List[Path]) -> str:
    total = sum(os.path.getsize(os.path.join(root, name)) for folder in folders
                for root, _, names in os.walk(folder) for name in names)
    return f"{total / 2**30:.1f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"


def write_json_atomic(path: Path, record: Dict[str, Any]) -> None:
    """Written under a temporary name and renamed: a reader sees the whole file or none."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a full or read-only disk: one line naming the file
        raise RunDirError(f"{path}: cannot write ({e.strerror})") from None
