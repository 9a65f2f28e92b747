"""Task heads: each reads its own view of the shared representation ``z`` (B, d)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.mlp import MLP

from concord.heads.options import TASK_TYPES


class TaskHead(nn.Module):
    """``z`` (B, d) -> MLP(hidden) -> Linear -> logit (B,)."""

    def __init__(self, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, list(hidden)) if hidden else nn.Identity()
        self.out = nn.Linear(hidden[-1] if hidden else in_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(z)).squeeze(-1)


def task_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_rows w * loss / B``: BCE with logits for ``binary``, squared error for ``regression``, each
    row's loss times its weight (0 for a row without this task's label), averaged over the B rows.

    Over the rows, not over the weights (as ``BCEWithLogitsLoss(weight=w)`` averages): every rank's
    batch has B rows, so the mean of the ranks' losses is the loss of the global batch, and W ranks
    train as one rank on their rows concatenated whatever the weights. A task labelled on a share p
    of the rows has p times its mean loss over the labelled rows: each labelled row counts alike."""
    if task_type == "binary":
        per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    elif task_type == "regression":
        per_row = (logits - labels) ** 2
    else:
        raise ValueError(f"unknown task type {task_type!r}; one of {TASK_TYPES}")
    return (per_row * weights).sum() / labels.shape[0]


def prediction(task_type: str, logits: torch.Tensor) -> torch.Tensor:
    """What metrics read: a probability for ``binary``, the value for ``regression``."""
    return torch.sigmoid(logits) if task_type == "binary" else logits


class TaskHeads(nn.Module):
    """T heads; ``forward(views, labels (B, T), weights (B,), labelled (B, T) bool or None)`` ->
    (losses (T,), logits (B, T)); a row counts in task k's loss where ``labelled[:, k]`` (None: every row).

    ``task_inputs``: optional per-task modules between a view and its tower (MMoE/PLE gates); the
    towers then read their outputs, (B, ``in_dim``).
    """

    def __init__(self, in_dim: int, tasks: Sequence, task_inputs: Optional[nn.ModuleList] = None) -> None:
        super().__init__()
        self.task_inputs = task_inputs
        self.names: List[str] = [t.name for t in tasks]
        self.types: List[str] = [t.type for t in tasks]
        self.loss_weights: List[float] = [float(t.loss_weight) for t in tasks]
        self.heads = nn.ModuleList([TaskHead(in_dim, t.head) for t in tasks])
        self.label_means: Optional[Dict[str, float]] = None  # where start_at started the heads

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, weights: torch.Tensor,
                labelled: Optional[torch.Tensor] = None):
        if self.task_inputs is not None:
            views = [module(v) for module, v in zip(self.task_inputs, views)]
        logits = [head(v) for head, v in zip(self.heads, views)]
        losses = [
            w * task_loss(kind, lg, labels[:, k], weights if labelled is None else weights * labelled[:, k])
            for k, (kind, lg, w) in enumerate(zip(self.types, logits, self.loss_weights))
        ]
        return torch.stack(losses), torch.stack(logits, dim=1)

    @torch.no_grad()
    def start_at(self, label_means: Dict[str, float]) -> None:
        """Each head's output bias set at its task's mean label (binary: its log-odds), so that its
        predictions start around it rather than around 0: a regression head on labels far from 0
        (seconds watched) need not spend its first thousands of steps moving one bias there, with
        gradients that swamp the other tasks'."""
        for name, kind, head in zip(self.names, self.types, self.heads):
            mean = label_means[name]
            if kind == "binary":
                rate = min(max(mean, 1e-6), 1 - 1e-6)
                head.out.bias.fill_(math.log(rate / (1 - rate)))
            else:
                head.out.bias.fill_(mean)
        self.label_means = dict(label_means)

    @property
    def started_at_labels(self) -> bool:
        return self.label_means is not None

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T) logits -> (B, T) predictions."""
        return torch.stack([prediction(kind, logits[:, k]) for k, kind in enumerate(self.types)], dim=1)
