"""The dense optimizers a config can name (the embedding tables' fused ones are in
``concord.embeddings.options``), and the learning-rate schedule both follow."""

import math
from typing import Optional, Sequence, Tuple

import torch

from concord.trainer.config import DENSE_OPTIMIZER_CLASSES

DENSE_OPTIMIZERS = {name: getattr(torch.optim, cls) for name, cls in DENSE_OPTIMIZER_CLASSES.items()}


class LRSchedule:
    """Sets each optimizer parameter group's ``lr`` to its configured rate times :meth:`factor` of the
    step. A function of the step, the run's last step and where the decay starts, so a resumed run
    needs no state for it but :meth:`record`. TorchRec's fused embedding optimizers read
    ``param_groups[0]["lr"]`` at every step, so the tables follow it too.

    ``decay_from=(step, progress)``: the decay has reached ``progress`` (0 to 1) at ``step`` and goes on
    linearly in steps to 1 at the last step; ``None`` starts it at 0 where the warm-up ends. A run
    resumed on other ranks or another batch size takes its steps of another size from there (see
    :meth:`resumed`), so that its rate goes on from the checkpoint's instead of jumping."""

    def __init__(self, cfg, total_steps: int, groups: Sequence[dict], decay_from: Optional[Tuple[int, float]] = None) -> None:
        self.cfg, self.total = cfg, max(1, total_steps)
        self.decay_from = (cfg.warmup_steps, 0.0) if decay_from is None else (int(decay_from[0]), float(decay_from[1]))
        self.groups = [(g, g["lr"]) for g in groups]

    @classmethod
    def resumed(cls, cfg, total_steps: int, groups: Sequence[dict], step: int, record: Optional[dict], relaid: bool) -> "LRSchedule":
        """The schedule of a run resumed at ``step`` from a checkpoint whose :meth:`record` is ``record``
        (None: written before schedules were recorded, or a fresh run). Where the data was laid out
        anew (``relaid``: other ranks or another batch size, hence steps of another size), the decay
        goes on from the progress the checkpoint's schedule had reached at ``step``; otherwise from
        where the checkpoint's did, so that the config's last step decides as in a fresh run."""
        if record is None:
            return cls(cfg, total_steps, groups)
        saved = cls(cfg, int(record["last_step"]), [], tuple(record["decay_from"]))
        if relaid and step > cfg.warmup_steps:
            return cls(cfg, total_steps, groups, (step, saved.progress(step)))
        return cls(cfg, total_steps, groups, saved.decay_from)

    def record(self) -> dict:
        """What a checkpoint keeps to resume the schedule (JSON)."""
        return {"last_step": self.total, "decay_from": list(self.decay_from)}

    def progress(self, step: int) -> float:
        """How far the decay is at step ``step`` (after the warm-up): 0 at its start, 1 at the last step."""
        start, done = self.decay_from
        return min(1.0, done + (1.0 - done) * (step - start) / max(1, self.total - start - 1))

    def factor(self, step: int) -> float:
        """Step ``step`` (from 0): linear warm-up to 1, then the decay towards ``min_ratio``."""
        warmup = self.cfg.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.cfg.decay == "constant":
            return 1.0
        progress = self.progress(step)
        shape = 1.0 - progress if self.cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.cfg.min_ratio + (1.0 - self.cfg.min_ratio) * shape

    def apply(self, step: int) -> None:
        factor = self.factor(step)
        for group, base in self.groups:
            group["lr"] = base * factor
