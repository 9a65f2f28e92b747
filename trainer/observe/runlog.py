"""The run's log: JSON records in ``run_dir/metrics.jsonl`` and scalars in TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from concord.trainer.rundir import RunDirError


class RunLog:
    """Appends JSON records, each carrying the run id, to ``run_dir/metrics.jsonl`` and scalars to
    TensorBoard under ``run_dir/tb/<run id>`` (a resumed run appends to its own)."""

    def __init__(self, run_dir: str | Path, run_id: str = "", enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self._tb = None
        if enabled:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            except OSError as e:
                raise RunDirError(f"{self.run_dir / 'metrics.jsonl'}: cannot write ({e.strerror})") from None
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb" / run_id))

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({**record, "run_id": self.run_id}, sort_keys=True) + "\n")
        except OSError as e:  # a full or read-only disk: one line naming the file, not a traceback
            raise RunDirError(f"{self.run_dir / 'metrics.jsonl'}: cannot write ({e.strerror})") from None
        if self._tb is not None and step is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
        elif key not in ("kind", "step", "run_id"):
            out[name] = value
    return out


def read_records(run_dir: str | Path) -> list:
    """The records of the run the directory holds (``run.json``'s id); logs from before run ids count
    as one run."""
    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no metrics log (is {run_dir} a Concord run directory?)")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    run = run_dir / "run.json"
    if run.is_file():
        run_id = json.loads(run.read_text())["run_id"]
        records = [r for r in records if r.get("run_id") == run_id]
    return records
