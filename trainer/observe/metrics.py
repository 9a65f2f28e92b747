"""Per-task quality with ``torchrec.metrics``: NE, AUC and calibration (sum of predictions over sum of
labels, 1.0 when the mean prediction matches the base rate) for binary tasks, MSE for regression."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

from concord.balancing.collectives import sum_over_ranks

_BINARY = (("ne", NEMetric), ("auc", AUCMetric), ("calibration", CalibrationMetric))
_REGRESSION = (("mse", MSEMetric),)


class TaskMetrics:
    """One torchrec metric object per (task, metric). ``update`` on every rank's rows; ``compute`` is a
    collective (every rank calls it) and returns ``{task: {metric: value}}`` on rank 0, ``{}`` elsewhere.
    A task no row counted for (none labelled, ``missing_label: masked``) has no metrics: torchrec would
    report its empty sums as an MSE of 0 or an NE of its priors. ``group``: the ranks' process group for
    that count (None: this rank alone)."""

    def __init__(self, tasks: Sequence, world_size: int, rank: int, batch_size: int, device: torch.device | str = "cpu",
                 group: Optional[dist.ProcessGroup] = None) -> None:
        self.tasks = list(tasks)
        self.rank = rank
        self.group = group
        # the weight of the rows each task counted on this rank, on the device: read once, in compute
        self._counted = torch.zeros(len(self.tasks), dtype=torch.float64, device=device)
        self._metrics: List[tuple] = []
        for t in self.tasks:
            info = [RecTaskInfo(name=t.name, label_name="label", prediction_name="prediction", weight_name="weight")]
            for metric_name, cls in _BINARY if t.type == "binary" else _REGRESSION:
                metric = cls(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=info, window_size=10**9)
                metric.to(device)  # its state must live where the predictions do (a CUDA run: the GPU)
                self._metrics.append((t.name, metric_name, metric))

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
               labelled: Optional[torch.Tensor] = None) -> None:
        """predictions, labels: (B, T); weights: (B,) (rows of weight 0 are padding and do not count);
        labelled: (B, T) bool or None, a row counts for task k only where ``labelled[:, k]``."""
        index = {t.name: k for k, t in enumerate(self.tasks)}
        counted = (weights[:, None].expand(-1, len(self.tasks)) if labelled is None else weights[:, None] * labelled).float()
        self._counted += counted.sum(dim=0).double()
        for task, _, metric in self._metrics:
            k = index[task]
            metric.update(
                predictions={task: predictions[:, k].detach().float()},
                labels={task: labels[:, k].float()},
                weights={task: counted[:, k]},
            )

    def compute(self) -> Dict[str, Dict[str, float]]:
        counted = dict(zip((t.name for t in self.tasks), sum_over_ranks(self._counted.cpu(), self.group).tolist()))
        out: Dict[str, Dict[str, float]] = {}
        for task, metric_name, metric in self._metrics:
            values = {key.split("|")[-1]: value for key, value in metric.compute().items()}
            # AUC reports only a window; its window (10^9 rows) spans the whole evaluation.
            value = values.get(f"lifetime_{metric_name}", values.get(f"window_{metric_name}"))
            if value is not None and counted[task] > 0:
                out.setdefault(task, {})[metric_name] = float(value)
        return out

    def reset(self) -> None:
        self._counted.zero_()
        for _, _, metric in self._metrics:
            metric.reset()


def compact_results(results: Dict[str, Dict[str, float]], tasks: Sequence) -> str:
    """One line: each task's NE and AUC, or MSE."""
    def one(name: str, r: Dict[str, float]) -> str:
        return f"{name} NE {r['ne']:.4f} AUC {r['auc']:.4f}" if "ne" in r else f"{name} MSE {r['mse']:.4f}"

    return ", ".join(one(t.name, results[t.name]) for t in tasks if t.name in results)


def format_table(results: Dict[str, Dict[str, float]], tasks: Sequence) -> str:
    """A fixed-width table: task, type, NE, AUC, calibration, MSE; the task column as wide as the longest name."""
    width = max([14] + [len(t.name) + 2 for t in tasks])
    lines = [f"{'task':<{width}}{'type':<12}{'NE':>10}{'AUC':>10}{'calib':>10}{'MSE':>12}"]
    def cell(r: Dict[str, float], key: str, width: int, fmt: str) -> str:
        return f"{r[key]:{width}{fmt}}" if key in r else f"{'-':>{width}}"

    for t in tasks:
        r = results.get(t.name, {})
        lines.append(f"{t.name:<{width}}{t.type:<12}{cell(r, 'ne', 10, '.4f')}{cell(r, 'auc', 10, '.4f')}{cell(r, 'calibration', 10, '.4f')}{cell(r, 'mse', 12, '.4f')}")
    return "\n".join(lines)
