"""GradDrop (Chen et al. 2020), an element-wise method.

Per column of ``z``: ``Gs_k = sum over rows of G_k ⊙ sign(z)`` (all-reduced over ranks), purity
``P = (1 + sum_k Gs_k / sum_k |Gs_k|) / 2``, and ``U`` uniform per column (the same draw on every
rank). Every ``G_k`` keeps its positive parts where ``P > U`` and its negative parts elsewhere (plus
``leak`` times the dropped part). ``A = (1/T) sum_k`` of the masked gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from balancing.base import Balancer, register, seeded_generator, weighted_sum
from balancing.stats import StepStats


@register("graddrop")
class GradDrop(Balancer):
    state_names = ("generator",)

    def __init__(self, task_names: Sequence[str], leak: float = 0.0, seed: int = 0) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(leak) <= 1.0:
            raise ValueError(f"graddrop.leak must be in [0, 1], got {leak}")
        self.leak = float(leak)
        self.generator = seeded_generator(seed)

    def aggregate(
        self, grads: Sequence[Optional[torch.Tensor]], stats: StepStats, z: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if z is None:
            raise ValueError("graddrop reads the sign of z: call it through RepresentationBoundary")
        live = [k for k, g in enumerate(grads) if g is not None and stats.active[k]]
        t = self.num_tasks
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist()}
        if not live:
            return weighted_sum(grads, np.zeros(t), stats.active)
        sign = torch.sign(z)
        # Row sums at the global-gradient scale: B * local sums, summed over ranks, over B_g.
        signed = torch.stack([(grads[k] * sign).sum(dim=0) for k in live]) * float(stats.local_batch_size)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(signed, group=self.process_group)
        signed /= float(stats.global_batch_size)
        purity = 0.5 * (1.0 + signed.sum(0) / signed.abs().sum(0).clamp_min(1e-30))  # (d,)
        uniform = torch.rand(purity.shape, generator=self.generator).to(purity.device, purity.dtype)
        keep_positive = purity > uniform  # (d,), broadcast over rows
        out = torch.zeros_like(grads[live[0]])
        for k in live:
            g = grads[k]
            keep = torch.where(keep_positive, g > 0, g < 0)
            out.add_(torch.where(keep, g, g * self.leak))
        self.last_telemetry["kept_positive_share"] = float(keep_positive.float().mean())
        return out.div_(t)
