"""Task heads: each reads its own view of the shared representation ``z`` (B, d)."""

from __future__ import annotations

from typing import List, Optional, Sequence

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
    """Sample-weighted mean loss: BCE with logits for ``binary``, squared error for ``regression``."""
    if task_type == "binary":
        per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    elif task_type == "regression":
        per_row = (logits - labels) ** 2
    else:
        raise ValueError(f"unknown task type {task_type!r}; one of {TASK_TYPES}")
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def prediction(task_type: str, logits: torch.Tensor) -> torch.Tensor:
    """What metrics read: a probability for ``binary``, the value for ``regression``."""
    return torch.sigmoid(logits) if task_type == "binary" else logits


class TaskHeads(nn.Module):
    """T heads; ``forward(views, labels (B, T), weights (B,))`` -> (losses (T,), logits (B, T)).

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

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor, weights: torch.Tensor):
        if self.task_inputs is not None:
            views = [module(v) for module, v in zip(self.task_inputs, views)]
        logits = [head(v) for head, v in zip(self.heads, views)]
        losses = [
            w * task_loss(kind, lg, labels[:, k], weights)
            for k, (kind, lg, w) in enumerate(zip(self.types, logits, self.loss_weights))
        ]
        return torch.stack(losses), torch.stack(logits, dim=1)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T) logits -> (B, T) predictions."""
        return torch.stack([prediction(kind, logits[:, k]) for k, kind in enumerate(self.types)], dim=1)
