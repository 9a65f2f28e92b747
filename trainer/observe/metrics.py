"""Per-task quality with ``torchrec.metrics``: NE, AUC and calibration (sum of predictions over sum of
labels, 1.0 when the mean prediction matches the base rate) for binary tasks; MSE and R² (1 - MSE over
the held-out labels' variance, 0 when predicting their mean) for regression; and every task's weighted
mean label (``label_mean``), which says whether the held-out rows resemble the training rows. Where
every counted row holds the same label, the figures that need two values (NE and AUC; calibration
against a mean label of 0; R²) are left out, not reported as torchrec computes them then (an NE of
10^11, an AUC of 0.5, an R² of 1)."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.mse import MSEMetric
from torchrec.metrics.ne import NEMetric

from concord.balancing.collectives import group_device, sum_over_ranks

# (torchrec's metric, its options, the figures read from it)
_BINARY = ((NEMetric, {}, ("ne",)), (AUCMetric, {}, ("auc",)), (CalibrationMetric, {}, ("calibration",)))
_REGRESSION = ((MSEMetric, {"include_r_squared": True}, ("mse", "r_squared")),)
# torchrec's exact AUC holds every scored row's prediction, label and weight on each rank, and sorts
# them at compute: its peak a row and binary task (docs/performance.md, "Evaluation's memory"), rounded up.
AUC_BYTES_PER_ROW = 100


def auc_memory_note(rows: int, binary_tasks: int, device: torch.device, what: str) -> Optional[str]:
    """A warning where the exact AUC of ``rows`` rows would take more than half of the memory a rank
    holds it in (a GPU's, or its share of the host's): the evaluation would fail after the work before
    it. None where it fits or the memory cannot be read."""
    from concord.embeddings.sharding import host_memory_per_rank

    need = rows * binary_tasks * AUC_BYTES_PER_ROW
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "its GPU's memory"
    else:
        have, where = host_memory_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", 1))), "its share of the host's memory"
        if have is None:
            return None
    if need <= have / 2:
        return None
    return (f"{what}: the exact AUC of its {rows:,} rows and {binary_tasks} binary task(s) holds ~{need / 2**30:.1f} GiB on "
            f"each rank (~{AUC_BYTES_PER_ROW} bytes a row and task), more than half of {where} ({have / 2**30:.1f} GiB): "
            "score a sample of these rows (README, 'Metrics')")


def _undefined_for_one_value(kind: str, mean: float) -> tuple:
    if kind == "regression":
        return ("r_squared",)
    return ("ne", "auc", "calibration") if mean == 0 else ("ne", "auc")


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
        self._label_sums = torch.zeros(len(self.tasks), dtype=torch.float64, device=device)  # weighted, counted rows
        # the least and the greatest label of the counted rows: where they are equal, figures that need two are left out
        self._label_low = torch.full((len(self.tasks),), math.inf, dtype=torch.float64, device=device)
        self._label_high = torch.full((len(self.tasks),), -math.inf, dtype=torch.float64, device=device)
        self._metrics: List[tuple] = []
        for t in self.tasks:
            info = [RecTaskInfo(name=t.name, label_name="label", prediction_name="prediction", weight_name="weight")]
            for cls, options, figures in _BINARY if t.type == "binary" else _REGRESSION:
                metric = cls(world_size=world_size, my_rank=rank, batch_size=batch_size, tasks=info, window_size=10**9,
                             **options)
                metric.to(device)  # its state must live where the predictions do (a CUDA run: the GPU)
                self._metrics.append((t.name, figures, metric))

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
               labelled: Optional[torch.Tensor] = None) -> None:
        """predictions, labels: (B, T); weights: (B,) (rows of weight 0 are padding and do not count);
        labelled: (B, T) bool or None, a row counts for task k only where ``labelled[:, k]``."""
        index = {t.name: k for k, t in enumerate(self.tasks)}
        counted = (weights[:, None].expand(-1, len(self.tasks)) if labelled is None else weights[:, None] * labelled).float()
        self._counted += counted.double().sum(dim=0)
        # A row that does not count may hold a placeholder label (a masked task's NaN read as 0): weight 0 drops it.
        self._label_sums += torch.where(counted > 0, counted.double() * labels.double(), 0.0).sum(dim=0)
        torch.minimum(self._label_low, torch.where(counted > 0, labels.double(), math.inf).amin(dim=0), out=self._label_low)
        torch.maximum(self._label_high, torch.where(counted > 0, labels.double(), -math.inf).amax(dim=0), out=self._label_high)
        for task, _, metric in self._metrics:
            k = index[task]
            metric.update(
                predictions={task: predictions[:, k].detach().float()},
                labels={task: labels[:, k].float()},
                weights={task: counted[:, k]},
            )

    def compute(self) -> Dict[str, Dict[str, float]]:
        sums = sum_over_ranks(torch.cat([self._counted, self._label_sums]).cpu(), self.group).tolist()
        highest = _max_over_ranks(torch.cat([-self._label_low, self._label_high]), self.group).tolist()
        names = [t.name for t in self.tasks]
        counted, label_sums = dict(zip(names, sums[:len(names)])), dict(zip(names, sums[len(names):]))
        one_value = {name: -low == high for name, low, high in zip(names, highest[:len(names)], highest[len(names):])}
        out: Dict[str, Dict[str, float]] = {}
        for task, figures, metric in self._metrics:
            values = {key.split("|")[-1]: value for key, value in metric.compute().items()}
            for figure in figures:
                # AUC reports only a window; its window (10^9 rows) spans the whole evaluation.
                value = values.get(f"lifetime_{figure}", values.get(f"window_{figure}"))
                if value is not None and counted[task] > 0:
                    out.setdefault(task, {})[figure] = float(value)
        for t in self.tasks:
            if t.name in out:
                out[t.name]["label_mean"] = label_sums[t.name] / counted[t.name]
                for figure in _undefined_for_one_value(t.type, out[t.name]["label_mean"]) if one_value[t.name] else ():
                    out[t.name].pop(figure, None)
        return out

    def reset(self) -> None:
        self._counted.zero_()
        self._label_sums.zero_()
        self._label_low.fill_(math.inf)
        self._label_high.fill_(-math.inf)
        for _, _, metric in self._metrics:
            metric.reset()


def _max_over_ranks(values: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """A small vector's element-wise maximum over the ranks of ``group``, on the CPU, the same on every
    rank (itself where no group of several ranks is up); reduced where the group's backend reduces."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return values.cpu()
    values = values.to(group_device(group))
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values.cpu()


def compact_results(results: Dict[str, Dict[str, float]], tasks: Sequence) -> str:
    """One line: each task's NE and AUC, or MSE and R² (a dash where a figure is undefined)."""
    def one(t) -> str:
        r = results[t.name]
        shown = lambda key: f"{r[key]:.4f}" if key in r else "-"
        return f"{t.name} NE {shown('ne')} AUC {shown('auc')}" if t.type == "binary" else f"{t.name} MSE {shown('mse')} R2 {shown('r_squared')}"

    return ", ".join(one(t) for t in tasks if t.name in results)


def format_table(results: Dict[str, Dict[str, float]], tasks: Sequence, weight_column: Optional[str] = None) -> str:
    """A fixed-width table: task, type, NE, AUC, calibration, MSE, R²; the task column as wide as the longest
    name; with ``weight_column``, a last line saying every figure weighs rows by it."""
    width = max([14] + [len(t.name) + 2 for t in tasks])
    lines = [f"{'task':<{width}}{'type':<12}{'NE':>10}{'AUC':>10}{'calib':>10}{'MSE':>12}{'R2':>9}"]
    def cell(r: Dict[str, float], key: str, width: int, fmt: str) -> str:
        return f"{r[key]:{width}{fmt}}" if key in r else f"{'-':>{width}}"

    for t in tasks:
        r = results.get(t.name, {})
        lines.append(f"{t.name:<{width}}{t.type:<12}{cell(r, 'ne', 10, '.4f')}{cell(r, 'auc', 10, '.4f')}{cell(r, 'calibration', 10, '.4f')}{cell(r, 'mse', 12, '.4f')}"
                     f"{cell(r, 'r_squared', 9, '.4f')}")
    if weight_column is not None:
        lines.append(f"(every figure weighs each row by its {weight_column!r}, data.weight_column)")
    return "\n".join(lines)


# Predicting the training labels' mean scores this much worse on held-out rows than their own mean
# (NE 1.01, R² -0.01): their labels have moved (a later period, another population).
SHIFT_MARGIN = 0.01


def _shift_note(kind: str, figures: Dict[str, float], training_mean: Optional[float]) -> str:
    """The held-out labels' mean against the training labels', where the difference alone costs more
    than ``SHIFT_MARGIN``: predicting training's mean scores ``NE = CE(p, q) / H(p)`` on held-out
    positive rate ``p`` with training's ``q``, and ``R² = -(mean - q)² / variance`` (the variance
    from the model's own MSE and R²)."""
    held_out = figures.get("label_mean")
    if training_mean is None or held_out is None:
        return ""
    if kind == "binary":
        p, q = held_out, training_mean
        if not (0 < p < 1 and 0 < q < 1):
            return ""
        entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        score = -(p * math.log(q) + (1 - p) * math.log(1 - q)) / entropy
        if score < 1 + SHIFT_MARGIN:
            return ""
        what, figure = "positive rate", f"NE {score:.4f}"
    else:
        r_squared, mse = figures.get("r_squared"), figures.get("mse")
        if r_squared is None or mse is None or r_squared >= 1:
            return ""
        variance = mse / (1 - r_squared)
        score = -((held_out - training_mean) ** 2) / variance if variance > 0 else 0.0
        if score > -SHIFT_MARGIN:
            return ""
        what, figure = "mean label", f"R2 {score:.4f}"
    return (f"; its held-out {what} {held_out:.4g} differs from training's {training_mean:.4g} (training's, predicted "
            f"for every row, scores {figure} there): the held-out rows are unlike the training rows")


# Tasks' mean gradient norms at z this far apart: one task steers the shared layers (README, "Which
# balancer to try first", step 2).
STEERING_RATIO = 10.0


def one_value_note(task, figures: Dict[str, float], rows: str = "held-out") -> Optional[str]:
    """Why ``task``'s row of the table lacks figures that need two label values (:class:`TaskMetrics`
    leaves them out where every counted row holds one); None where it has them. ``rows``: which rows
    the figures are of."""
    if "label_mean" not in figures:
        return None
    if task.type == "binary" and "ne" not in figures:
        why = ("positive (label 1): NE and AUC need both classes; the table shows neither" if figures["label_mean"] else
               "negative (label 0): NE and AUC need both classes, calibration a positive; the table shows none of them")
        return f"note: task {task.name!r}: every {rows} row it counts is {why}"
    if task.type == "regression" and "r_squared" not in figures:
        return (f"note: task {task.name!r}: every {rows} row it counts has the label {figures['label_mean']:g}: R2 needs "
                "labels that vary; the table shows the MSE alone")
    return None


def quality_notes(results: Dict[str, Dict[str, float]], tasks: Sequence, grad_norms: Optional[Dict[str, float]] = None,
                  balancer: str = "equal", heads_at_labels: bool = False,
                  training_means: Optional[Dict[str, float]] = None) -> List[str]:
    """Lines for what a table of figures leaves for the reader to notice: a task without figures (no
    held-out row holds its label with a weight above 0); a binary task whose held-out NE is 1 or more
    predicts no better than its base rate, a regression task whose R² is 0 or less no better than the
    labels' mean (a starved head, a head started far from its labels, held-out rows unlike the
    training rows, or nothing to learn), with what predicting the training labels' mean
    (``training_means``: where the heads started, or convert's record) would score there where that
    alone is worse than the held-out mean; and, from the mean gradient norms at ``z`` over the logged
    steps (``grad_norms``), tasks whose gradients differ by ``STEERING_RATIO`` or more under ``equal``."""
    notes, gap_named = [], False
    norms = {name: value for name, value in (grad_norms or {}).items() if value > 0}
    largest = max(norms, key=norms.get) if norms else None
    for t in tasks:
        figures = results.get(t.name, {})
        if not figures:  # its row of the table is dashes: say why
            notes.append(f"note: task {t.name!r} has no held-out figures: no held-out row holds its label with a weight above 0")
            continue
        one_value = one_value_note(t, figures)
        if one_value:
            notes.append(one_value)
            continue
        if figures.get("ne", 0.0) >= 1.0:
            line = f"note: task {t.name!r} predicts the held-out rows no better than its base rate (NE {figures['ne']:.4f} >= 1)"
        elif figures.get("r_squared", 1.0) <= 0.0:
            line = (f"note: task {t.name!r} predicts the held-out rows no better than their mean label "
                    f"(R2 {figures['r_squared']:.4f} <= 0)")
            if not heads_at_labels:  # a head starting near 0 on labels far from it spends its steps getting there
                line += "; if its labels lie far from 0, model.output_bias: labels starts its head at their mean"
        else:
            continue
        line += _shift_note(t.type, figures, (training_means or {}).get(t.name))
        if t.name in norms and largest != t.name and norms[largest] >= STEERING_RATIO * norms[t.name]:
            line += f"; its gradient at z averaged {norms[largest] / norms[t.name]:.0f}x smaller than that of {largest!r}"
            gap_named = True
        if len(tasks) > 1:
            line += (f"; `--single-task {t.name}` tells whether the other tasks starve it (README, 'Which balancer to "
                     "try first')")
        notes.append(line)
    if balancer == "equal" and len(norms) > 1 and not gap_named:
        smallest = min(norms, key=norms.get)
        if norms[largest] >= STEERING_RATIO * norms[smallest]:
            notes.append(f"note: the tasks' gradients at z averaged up to {norms[largest] / norms[smallest]:.0f}x apart "
                         f"({largest!r} over {smallest!r}): one task steers the shared layers; README, "
                         "'Which balancer to try first'")
    return notes
