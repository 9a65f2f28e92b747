"""The step's global statistics: one all-reduce of ``T*T + 2T + 1`` numbers.

With DDP the dense gradients are averaged over ranks, so training minimises the global-batch mean
loss and each rank's rows of ``G_k`` must be scaled by ``s = B / B_g`` (ALGORITHMS.md, "Global
statistics"). We reduce ``B^2 <G_i, G_j>``, ``B * L_k``, a non-finite flag per task and ``B`` itself,
then divide by ``B_g^2`` and ``B_g``: every rank ends with the statistics of one rank holding the
concatenated global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class StepStats:
    """Global statistics of one step; identical on every rank.

    gram: (T, T) float64, ``M_ij = sum_ranks s^2 <G_i, G_j>``.
    losses: (T,) float64, ``Lbar_k = sum_ranks s * L_k``.
    active: (T,) bool, tasks with a finite, non-zero gradient on every rank this step.
    local_batch_size: rows of ``z`` on this rank (B).
    global_batch_size: rows over all ranks (B_g).
    """

    gram: torch.Tensor
    losses: torch.Tensor
    active: torch.Tensor
    local_batch_size: int
    global_batch_size: int

    @property
    def norms(self) -> torch.Tensor:
        """(T,) ``n_k = sqrt(M_kk)``."""
        return torch.sqrt(torch.clamp(torch.diagonal(self.gram), min=0.0))

    @property
    def scale(self) -> float:
        """``s = B / B_g``: a local row of ``G_k`` times ``s`` is a row of the global gradient."""
        return self.local_batch_size / self.global_batch_size


def local_statistics(
    grads: Sequence[Optional[torch.Tensor]], losses: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs this rank's statistics into one float64 vector ``[B^2 Gram, B L, bad, B]``.

    ``grads``: T tensors (B, d) or None for a head without loss this step. ``losses``: (T,).
    The Gram uses T(T+1)/2 dot products on the flattened gradients: no stacked copy of the T
    gradients. A NaN or inf anywhere in ``G_k`` makes ``<G_k, G_k>`` non-finite, so the diagonal
    doubles as the finiteness check without another pass over the gradients. Returns the vector and
    the (T,) local mask of non-finite tasks.
    """
    t = len(grads)
    flat = [None if g is None else g.reshape(-1) for g in grads]
    pairs = [(i, j) for i in range(t) for j in range(i, t) if flat[i] is not None and flat[j] is not None]
    gram = torch.zeros(t, t, dtype=torch.float64)
    if pairs:
        values = torch.stack([torch.dot(flat[i], flat[j]) for i, j in pairs]).to(device="cpu", dtype=torch.float64)
        for (i, j), v in zip(pairs, values.tolist()):
            gram[i, j] = gram[j, i] = v
    losses64 = losses.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(torch.diagonal(gram)) | ~torch.isfinite(losses64)
    keep = ~bad
    gram = torch.where(keep[:, None] & keep[None, :], gram, 0.0)
    b = float(batch_size)
    packed = torch.cat(
        [
            gram.reshape(-1) * b * b,
            torch.where(bad, 0.0, losses64) * b,
            bad.to(torch.float64),
            torch.tensor([b], dtype=torch.float64),
        ]
    )
    return packed, bad


def reduce_statistics(
    packed: torch.Tensor,
    num_tasks: int,
    batch_size: int,
    process_group: Optional[dist.ProcessGroup] = None,
    device: Optional[torch.device] = None,
) -> StepStats:
    """All-reduces the packed vector once (when a process group is initialised) and unpacks it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        buf = packed.to(device if device is not None else "cpu")
        dist.all_reduce(buf, group=process_group)
        packed = buf.to("cpu")
    t = num_tasks
    b_global = float(packed[-1])
    gram = packed[: t * t].reshape(t, t) / (b_global * b_global)
    losses = packed[t * t : t * t + t] / b_global
    bad = packed[t * t + t : t * t + 2 * t] > 0
    active = (~bad) & (torch.diagonal(gram) > 0)
    gram = gram * active[:, None] * active[None, :]
    return StepStats(gram, losses, active, batch_size, int(round(b_global)))
