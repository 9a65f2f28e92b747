"""The dense optimizers a config can name (the embedding tables' fused ones are in
``concord.embeddings.options``), and the learning-rate schedule both follow."""

import math
from typing import Sequence

import torch

from concord.trainer.config import DENSE_OPTIMIZER_CLASSES

DENSE_OPTIMIZERS = {name: getattr(torch.optim, cls) for name, cls in DENSE_OPTIMIZER_CLASSES.items()}


class LRSchedule:
    """Sets each optimizer parameter group's ``lr`` to its configured rate times :meth:`factor` of the
    step. A function of the step alone, so a resumed run needs no state for it. TorchRec's fused
    embedding optimizers read ``param_groups[0]["lr"]`` at every step, so the tables follow it too."""

    def __init__(self, cfg, total_steps: int, groups: Sequence[dict]) -> None:
        self.cfg, self.total = cfg, max(1, total_steps)
        self.groups = [(g, g["lr"]) for g in groups]

    def factor(self, step: int) -> float:
        """Step ``step`` (from 0): linear warm-up to 1, then the decay towards ``min_ratio``."""
        warmup = self.cfg.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.cfg.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup - 1))
        shape = 1.0 - progress if self.cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.cfg.min_ratio + (1.0 - self.cfg.min_ratio) * shape

    def apply(self, step: int) -> None:
        factor = self.factor(step)
        for group, base in self.groups:
            group["lr"] = base * factor
