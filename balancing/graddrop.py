"""GradDrop (Chen et al. 2020), an element-wise method.

Per column of ``z``: ``Gs_k = sum over rows of G_k ⊙ sign(z)`` (summed over ranks in the step's
statistics all-reduce, no collective of its own), purity
``P = (1 + sum_k Gs_k / sum_k |Gs_k|) / 2``, and ``U`` uniform per column (the same draw on every
rank). Every ``G_k`` keeps its positive parts where ``P > U`` and its negative parts elsewhere (plus
``leak`` times the dropped part). ``A = (1/T) sum_k`` of the masked gradients.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Balancer, register, seeded_generator, weighted_sum
from .statistics import StepStats


@register("graddrop")
class GradDrop(Balancer):
    state_names = ("generator",)
    needs_cross_terms = False  # its statistics are the column sums of local_extra

    def __init__(self, task_names: Sequence[str], leak: float = 0.0, seed: int = 0, fused: bool = True) -> None:
        super().__init__(task_names)
        if not 0.0 <= float(leak) <= 1.0:
            raise ValueError(f"graddrop.leak must be in [0, 1], got {leak}")
        self.leak = float(leak)
        self.generator = seeded_generator(seed)
        self.fused = bool(fused)

    def local_extra(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor]) -> torch.Tensor:
        """(T, d) ``B * sum over rows of G_k ⊙ sign(z)``: summed over ranks with the step's statistics."""
        if z is None:
            raise ValueError("graddrop reads the sign of z: call it through RepresentationBoundary")
        present = [k for k, g in enumerate(grads) if g is not None]
        sums = self.run_rule(signed_column_sums, [grads[k] for k in present], z)
        if len(present) == self.num_tasks:
            return sums
        rows = torch.zeros(self.num_tasks, z.shape[1], dtype=z.dtype, device=z.device)
        rows[present] = sums
        return rows

    def warm_up(self, template: torch.Tensor, lagged: bool = False, on_host: bool = True) -> None:
        zeros = [torch.zeros_like(template) for _ in range(self.num_tasks)]  # distinct, as the gradients are
        self.run_rule(signed_column_sums, zeros, torch.zeros_like(template))
        self.run_rule(sign_split, zeros, self.leak, self.num_tasks)

    def prepare(
        self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor], live: np.ndarray
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The mask is one choice per column shared by every task, so the masked sum splits into
        ``pos = sum_k relu(G_k)`` and ``neg = sum_k G_k - pos``; with the leak, what a column keeps is
        ``keep_neg = (neg + leak pos) / T`` or ``keep_neg + diff`` with ``diff = (1 - leak)(pos - neg) / T``.
        Both are formed while the statistics are in flight; :meth:`aggregate` then needs one pass."""
        tasks = [k for k, g in enumerate(grads) if g is not None and live[k]]
        if not tasks:
            return None
        return self.run_rule(sign_split, [grads[k] for k in tasks], self.leak, self.num_tasks)

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        t = self.num_tasks
        self.last_telemetry = {"weights": np.full(t, 1.0 / t).tolist()}
        live = [k for k, g in enumerate(grads) if g is not None and stats.active[k]]
        if not live:
            return weighted_sum(grads, np.zeros(t), stats.active)
        if stats.extra is None:
            raise ValueError("graddrop needs the column sums of local_extra: call it through RepresentationBoundary")
        keep_neg, diff = early if early is not None else self.prepare(grads, z, stats.active)
        # Column sums at the global-gradient scale: B * local sums, summed over ranks, over B_g. The
        # (d,) vectors stay in NumPy float64: a handful of torch ops on them would cost more than the pass.
        signed = stats.extra.reshape(t, -1)[live] / float(stats.global_batch_size)
        purity = 0.5 * (1.0 + signed.sum(0) / np.maximum(np.abs(signed).sum(0), 1e-30))
        uniform = torch.rand(purity.shape, generator=self.generator).numpy()
        keep_positive = purity > uniform  # (d,), the same choice for every task and row
        self.last_telemetry["kept_positive_share"] = float(keep_positive.mean())
        return keep_neg.addcmul_(diff, torch.from_numpy(keep_positive).to(diff.device, diff.dtype))


def signed_column_sums(grads: List[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """(n, d): ``B * sum over rows of G_k ⊙ sign(z)`` for the n gradients (B, d) given."""
    sign, scratch = torch.sign(z), torch.empty_like(z)
    return torch.stack([torch.mul(g, sign, out=scratch).sum(dim=0) for g in grads]) * float(z.shape[0])


def sign_split(grads: List[torch.Tensor], leak: float, num_tasks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keep_neg, diff)`` of :meth:`GradDrop.prepare` for the live gradients (B, d), in place on its
    own buffers (fewer passes when run eagerly)."""
    pos, neg, scratch = torch.clamp(grads[0], min=0), grads[0].clone(), torch.empty_like(grads[0])
    for g in grads[1:]:
        pos.add_(torch.clamp(g, min=0, out=scratch))  # sum_k relu(G_k)
        neg.add_(g)
    neg.sub_(pos)
    diff = torch.sub(pos, neg, out=scratch).mul_((1.0 - leak) / num_tasks)
    return neg.add_(pos, alpha=leak).mul_(1.0 / num_tasks), diff
