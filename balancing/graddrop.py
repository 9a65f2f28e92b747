"""GradDrop (Chen et al. 2020), an element-wise method.

Per column of ``z``: ``Gs_k = sum over rows of G_k ⊙ sign(z)`` (summed over ranks in the step's
statistics all-reduce, no collective of its own), purity
``P = (1 + sum_k Gs_k / sum_k |Gs_k|) / 2``, and ``U`` uniform per column (the same draw on every
rank). Every ``G_k`` keeps its positive parts where ``P > U`` and its negative parts elsewhere (plus
``leak`` times the dropped part). ``A = (1/T) sum_k`` of the masked gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

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

    def local_extra(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor]) -> torch.Tensor:
        """(T, d) ``B * sum over rows of G_k ⊙ sign(z)``: summed over ranks with the step's statistics."""
        if z is None:
            raise ValueError("graddrop reads the sign of z: call it through RepresentationBoundary")
        sign = torch.sign(z)
        rows = [torch.zeros(z.shape[1], dtype=z.dtype, device=z.device) if g is None else (g * sign).sum(dim=0) for g in grads]
        return torch.stack(rows) * float(z.shape[0])

    def aggregate(
        self, grads: Sequence[Optional[torch.Tensor]], stats: StepStats, z: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        live = [k for k, g in enumerate(grads) if g is not None and stats.active[k]]
        t = self.num_tasks
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist()}
        if not live:
            return weighted_sum(grads, np.zeros(t), stats.active)
        if stats.extra is None:
            raise ValueError("graddrop needs the column sums of local_extra: call it through RepresentationBoundary")
        template = grads[live[0]]
        # Column sums at the global-gradient scale: B * local sums, summed over ranks, over B_g.
        signed = torch.from_numpy(stats.extra.reshape(t, -1)[live] / float(stats.global_batch_size))
        signed = signed.to(template.device, template.dtype)
        purity = 0.5 * (1.0 + signed.sum(0) / signed.abs().sum(0).clamp_min(1e-30))  # (d,)
        uniform = torch.rand(purity.shape, generator=self.generator).to(purity.device, purity.dtype)
        keep_positive = purity > uniform  # (d,), broadcast over rows
        # The kept part of G_k is s ⊙ relu(s ⊙ G_k) with s = +1 where positives are kept, -1 elsewhere,
        # so A = (1/T) [(1 - leak) s ⊙ sum_k relu(s ⊙ G_k) + leak sum_k G_k]: three in-place passes a task.
        s = torch.where(keep_positive, 1.0, -1.0).to(template.dtype)
        out, scratch = torch.zeros_like(template), torch.empty_like(template)
        for k in live:
            out.add_(torch.mul(grads[k], s, out=scratch).clamp_(min=0))
        out.mul_(s * ((1.0 - self.leak) / t))
        if self.leak:
            for k in live:
                out.add_(grads[k], alpha=self.leak / t)
        self.last_telemetry["kept_positive_share"] = float(keep_positive.float().mean())
        return out
