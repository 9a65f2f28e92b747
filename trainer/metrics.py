"""Per-task quality with ``torchrec.metrics`` (NE and AUC for binary tasks, MSE for regression), and
the run's logs: a JSONL file and TensorBoard scalars under the run directory (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

_BINARY = (("ne", NEMetric), ("auc", AUCMetric))
_REGRESSION = (("mse", MSEMetric),)


class TaskMetrics:
    """One torchrec metric object per (task, metric). ``update`` on every rank's rows; ``compute`` is a
    collective (every rank calls it) and returns ``{task: {metric: value}}`` on rank 0, ``{}`` elsewhere."""

    def __init__(self, tasks: Sequence, world_size: int, rank: int, batch_size: int) -> None:
        self.tasks = list(tasks)
        self.rank = rank
        self._metrics: List[tuple] = []
        for t in self.tasks:
            info = [RecTaskInfo(name=t.name, label_name="label", prediction_name="prediction", weight_name="weight")]
            for metric_name, cls in _BINARY if t.type == "binary" else _REGRESSION:
                metric = cls(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=info, window_size=10**9)
                self._metrics.append((t.name, metric_name, metric))

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """predictions, labels: (B, T); weights: (B,) (rows of weight 0 are padding and do not count)."""
        index = {t.name: k for k, t in enumerate(self.tasks)}
        for task, _, metric in self._metrics:
            k = index[task]
            metric.update(
                predictions={task: predictions[:, k].detach().float()},
                labels={task: labels[:, k].float()},
                weights={task: weights.float()},
            )

    def compute(self) -> Dict[str, Dict[str, float]]:
        out: Dict[str, Dict[str, float]] = {}
        for task, metric_name, metric in self._metrics:
            values = {key.split("|")[-1]: value for key, value in metric.compute().items()}
            # AUC reports only a window; its window (10^9 rows) spans the whole evaluation.
            value = values.get(f"lifetime_{metric_name}", values.get(f"window_{metric_name}"))
            if value is not None:
                out.setdefault(task, {})[metric_name] = float(value)
        return out

    def reset(self) -> None:
        for _, _, metric in self._metrics:
            metric.reset()


def format_table(results: Dict[str, Dict[str, float]], tasks: Sequence) -> str:
    """A fixed-width table: task, type, NE, AUC, MSE."""
    lines = [f"{'task':<14}{'type':<12}{'NE':>10}{'AUC':>10}{'MSE':>12}"]
    def cell(r: Dict[str, float], key: str, width: int, fmt: str) -> str:
        return f"{r[key]:{width}{fmt}}" if key in r else f"{'-':>{width}}"

    for t in tasks:
        r = results.get(t.name, {})
        lines.append(f"{t.name:<14}{t.type:<12}{cell(r, 'ne', 10, '.4f')}{cell(r, 'auc', 10, '.4f')}{cell(r, 'mse', 12, '.4f')}")
    return "\n".join(lines)


class RunLog:
    """Appends JSON records to ``run_dir/metrics.jsonl`` and scalars to TensorBoard (``run_dir/tb``)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
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
        elif key not in ("kind", "step"):
            out[name] = value
    return out
