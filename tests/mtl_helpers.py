"""Small hand-made multi-task problems for balancing tests (plain PyTorch, no TorchRec)."""

from __future__ import annotations

from typing import Sequence

import torch

from concord.balancing.collectives import PendingStatistics
from concord.balancing.statistics import StepStats, local_statistics


def stats_for(grads: Sequence[torch.Tensor], losses: Sequence[float] | None = None) -> StepStats:
    """The statistics one rank holding these gradients would compute (no communication)."""
    t = len(grads)
    losses_t = torch.tensor(losses if losses is not None else [1.0] * t, dtype=torch.float64)
    packed = local_statistics(list(grads), losses_t, grads[0].shape[0])
    return PendingStatistics(packed, t, grads[0].shape[0]).wait()


class ToyMTL(torch.nn.Module):
    """x (B, 6) -> bottom Linear -> z (B, 5) -> T linear heads; losses are mean squared errors."""

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.bottom = torch.nn.Linear(6, 5).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(5, 1).double() for _ in range(num_tasks)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def losses(self, views: Sequence[torch.Tensor], y: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
        return torch.stack(
            [s * ((h(v).squeeze(-1) - y[:, k]) ** 2).mean() for k, (h, v, s) in enumerate(zip(self.heads, views, scales))]
        )


def toy_batch(rows: int, num_tasks: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=g, dtype=torch.float64), torch.randn(rows, num_tasks, generator=g, dtype=torch.float64)

