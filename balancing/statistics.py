"""The step's global statistics: one sum over ranks of ``T*T + 2T + 1`` numbers (plus a method's extras).

With DDP the dense gradients are averaged over ranks, so training minimises the global-batch mean
loss and each rank's rows of ``G_k`` must be scaled by ``s = B / B_g`` (docs/ALGORITHMS.md, "Global
statistics"). We reduce ``B^2 <G_i, G_j>``, ``B * L_k``, a non-finite-gradient flag per task and ``B``
itself, then divide by ``B_g^2`` and ``B_g``: every rank ends with the statistics of one rank holding
the concatenated global batch. Losses are packed as they are, so a NaN or inf loss on any rank
survives the sum: the same reduction tells every rank which losses were non-finite, and a trainer
needs no collective of its own to agree on stopping or skipping the step.

The statistics are tiny, so after the reduction they live in NumPy float64: the balancers' update
rules then cost microseconds, where torch ops on 3-element tensors would cost milliseconds a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class StepStats:
    """Global statistics of one step; identical on every rank. NumPy float64.

    gram: (T, T), ``M_ij = sum_ranks s^2 <G_i, G_j>`` (rows/columns of inactive tasks are 0); only
        its diagonal when ``cross_terms`` is False (a step of a method that needs only the norms).
    losses: (T,), ``Lbar_k = sum_ranks s * L_k`` (0 where non-finite).
    active: (T,) bool, tasks with a finite, non-zero gradient and finite loss on every rank.
    nonfinite_loss: (T,) bool, tasks whose loss was NaN or inf on some rank.
    local_batch_size: rows of ``z`` on this rank (B); global_batch_size: over all ranks (B_g).
    """

    gram: np.ndarray
    losses: np.ndarray
    active: np.ndarray
    local_batch_size: int
    global_batch_size: int
    nonfinite_loss: Optional[np.ndarray] = None
    extra: Optional[np.ndarray] = None  # the balancer's local_extra, summed over ranks (flattened)
    cross_terms: bool = True

    def __post_init__(self) -> None:
        if self.nonfinite_loss is None:
            self.nonfinite_loss = np.zeros(len(self.losses), dtype=bool)

    @property
    def norms(self) -> np.ndarray:
        """(T,) ``n_k = sqrt(M_kk)``."""
        return np.sqrt(np.maximum(np.diagonal(self.gram), 0.0))


_NARROW = (torch.bfloat16, torch.float16)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: its minimum and maximum from one pass (NaN propagates into both). On a
    CPU ``torch.isfinite(t).all()`` costs over ten times as much: it writes a mask first."""
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def local_statistics(
    grads: Sequence[Optional[torch.Tensor]],
    losses: torch.Tensor,
    batch_size: int,
    extra: Optional[torch.Tensor] = None,
    cross_terms: bool = True,
    squared_norms: Optional[torch.Tensor] = None,
    products: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Packs this rank's statistics into one float64 tensor ``[B^2 Gram, B L, bad gradient, B, extra]``.

    ``grads``: T tensors (B, d) or None for a head without loss this step. ``losses``: (T,).
    The Gram uses T(T+1)/2 dot products on the flattened gradients: no stacked copy of the T
    gradients. A NaN or inf anywhere in ``G_k`` makes ``<G_k, G_k>`` non-finite, so the diagonal
    doubles as the finiteness check without another pass over the gradients. With ``cross_terms``
    False only the T diagonal products are taken (the off-diagonal entries are sent as 0).
    ``squared_norms``: the diagonal already computed (``||G_k||^2`` of the present gradients, in
    task order, from a balancer's own pass over them), taken instead of those dot products;
    ``products``: all the Gram's entries already formed (float64, in :func:`_gram_pairs`' order, from
    a pass that also formed the step's sum), taken instead of any.

    The dot products, losses and extras reach the host in one copy (one synchronisation on a GPU);
    the T x T bookkeeping is then done on Python floats, which at this size cost a fraction of what
    a NumPy or torch call costs.
    """
    t = len(grads)
    flat, pairs, known = _gram_plan(grads, cross_terms, squared_norms)
    if products is not None:
        if products.numel() != len(pairs):
            raise ValueError(f"products has {products.numel()} entries for {len(pairs)} Gram entries")
        parts = [products]
    else:
        parts = [] if squared_norms is None else [squared_norms.detach().reshape(-1)]
        if len(pairs) > known:
            parts.append(torch.stack([torch.dot(flat[i], flat[j]) for i, j in pairs[known:]]))
    parts.append(losses.detach().reshape(-1))
    if extra is not None:
        parts.append(extra.detach().reshape(-1))
    if all(part.device.type == "cpu" for part in parts):  # read part by part: no concatenated copy
        values = [v for part in parts for v in part.tolist()]  # widening float conversions: exact
    else:  # one copy to the host (one synchronisation)
        values = torch.cat(parts).to("cpu", torch.float64).tolist()
    gram = [[0.0] * t for _ in range(t)]
    for (i, j), v in zip(pairs, values):
        gram[i][j] = gram[j][i] = v
    loss = values[len(pairs) : len(pairs) + t]
    bad = [not math.isfinite(gram[k][k]) for k in range(t)]
    b = float(batch_size)
    packed = [0.0 if bad[i] or bad[j] else gram[i][j] * b * b for i in range(t) for j in range(t)]
    packed += [v * b for v in loss] + [float(x) for x in bad] + [b] + values[len(pairs) + t :]
    return torch.tensor(packed, dtype=torch.float64)


def _gram_plan(grads: Sequence[Optional[torch.Tensor]], cross_terms: bool, squared_norms: Optional[torch.Tensor]):
    """The flattened gradients (half precision widened, so that the dot products sum in float64), the
    Gram entries to form and how many of them (the first) ``squared_norms`` gives."""
    flat = [None if g is None else (g.reshape(-1).double() if g.dtype in _NARROW else g.reshape(-1)) for g in grads]
    pairs = _gram_pairs(flat, cross_terms)
    return flat, pairs, _known_diagonal(squared_norms, pairs)


def _gram_pairs(flat: Sequence[Optional[torch.Tensor]], cross_terms: bool) -> list:
    """The Gram entries to form, ``(i, j)`` with ``i <= j`` over the present gradients: the diagonal
    first, then (``cross_terms``) the products of distinct tasks."""
    present = [k for k, f in enumerate(flat) if f is not None]
    cross = [(i, j) for i in present for j in present if j > i] if cross_terms else []
    return [(k, k) for k in present] + cross


def _known_diagonal(squared_norms: Optional[torch.Tensor], pairs: list) -> int:
    """How many of ``pairs`` (the diagonal, which comes first) ``squared_norms`` gives."""
    if squared_norms is None:
        return 0
    diagonal = sum(1 for i, j in pairs if i == j)
    if squared_norms.numel() != diagonal:
        raise ValueError(f"squared_norms has {squared_norms.numel()} entries for {diagonal} present gradients")
    return diagonal


def device_statistics(
    grads: Sequence[Optional[torch.Tensor]],
    losses: torch.Tensor,
    batch_size: int,
    extra: Optional[torch.Tensor] = None,
    cross_terms: bool = True,
    squared_norms: Optional[torch.Tensor] = None,
    stacked: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_statistics` with no host read (a GPU): the same packed vector, formed where the
    gradients are, in float64; and (T,) bool flags, also there, of this rank's tasks whose gradient
    and loss are finite (absent tasks: True; their gradient is None).

    On a GPU a step this small is bound by the host's kernel launches, not by the device's memory, so
    the ops here do not grow with T: the Gram is one float64 matrix product of the stacked
    gradients (float64: exact enough, and free of TF32, which a user may have turned on for float32
    products), or with only its diagonal wanted one multi-tensor norm (or ``squared_norms``, a
    balancer's own pass). An absent task's gradient is zeros here, as in its Gram row. ``stacked``:
    :func:`stacked_gradients`, where the caller has them already. The float64 copy lives for the
    product alone: on a statistics step the transient memory is three times the task gradients'."""
    t = len(grads)
    device = losses.device
    present = [g for g in grads if g is not None]
    if cross_terms:
        wide = (stacked if stacked is not None else stacked_gradients(grads)).double()
        gram = wide @ wide.T
    else:
        norms = squared_norms.double() if squared_norms is not None else torch.stack(norms_of(present, 2)).double().square()
        if len(present) < t:  # the norms of the present tasks, in task order; the absent ones 0
            it = iter(norms.unbind())
            zero = torch.zeros((), dtype=torch.float64, device=device)
            norms = torch.stack([next(it) if g is not None else zero for g in grads])
        gram = torch.diag(norms)
    finite = finite_flags(gram.diagonal())  # a NaN or inf anywhere in G_k makes <G_k, G_k> one
    b = float(batch_size)
    parts = [
        torch.where(finite[:, None] & finite[None, :], gram, 0.0).mul_(b).mul_(b).reshape(-1),
        losses.detach().double() * b,
        (~finite).double(),
        torch.full((1,), b, dtype=torch.float64, device=device),
    ]
    if extra is not None:
        parts.append(extra.detach().reshape(-1).double())
    return torch.cat(parts), finite & finite_flags(losses.detach())


def finite_flags(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x)`` in two kernels where torch takes four (abs, ne, eq and their product):
    ``x * 0`` is 0 exactly where ``x`` is finite, NaN where it is NaN or infinite. For the GPU's small
    steps, which are bound by their launches."""
    return (x * 0) == 0


def norms_of(tensors: Sequence[torch.Tensor], order: float) -> list:
    """Each tensor's ``order``-norm, in one multi-tensor launch on a GPU (half precision summed in
    float32, where its own sum would overflow)."""
    narrow = tensors[0].dtype in _NARROW
    return torch._foreach_norm(list(tensors), order, dtype=torch.float32 if narrow else None)


def stacked_gradients(grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """(T, numel) the task gradients in one tensor, an absent task's as zeros: the operand of one
    launch where a loop over tasks would launch T (a GPU's step is bound by its launches)."""
    template = next(g for g in grads if g is not None)
    return torch.stack([g.reshape(-1) for g in filled(grads, template)])


def filled(grads: Sequence[Optional[torch.Tensor]], template: torch.Tensor) -> list:
    """``grads`` with each absent task's gradient (None) as zeros shaped like ``template``: batched
    ops then need no per-task branch, and zeros add nothing to a sum or a Gram."""
    return [g if g is not None else torch.zeros_like(template) for g in grads]


def usable_here(present: np.ndarray, packed: torch.Tensor) -> np.ndarray:
    """(T,) bool: the tasks with a gradient on this rank (``present``), finite here, and a finite local loss.

    This rank's guess of ``StepStats.active`` (restricted to its present gradients), read before the
    reduction starts (the all_reduce path sums ``packed`` in place). It is wrong only when another rank saw a
    non-finite value or every rank a zero gradient; :meth:`RepresentationBoundary.balance` then
    discards the work done on it.
    """
    t = len(present)
    v = packed[t * t : t * t + 2 * t].tolist()
    return np.array([bool(present[k]) and math.isfinite(v[k]) and v[t + k] == 0 for k in range(t)])


def unpack_statistics(packed: torch.Tensor, num_tasks: int, batch_size: int, cross_terms: bool = True) -> StepStats:
    """The reduced vector of :func:`local_statistics` as global statistics."""
    v = packed.tolist()
    t, n = num_tasks, num_tasks * num_tasks
    b_global = v[n + 2 * t]
    b = b_global or 1.0  # no rows on any rank: every sum is 0, and no task is active
    b2 = b * b
    losses = [x / b for x in v[n : n + t]]
    nonfinite_loss = [not math.isfinite(x) for x in losses]
    bad = [x > 0 for x in v[n + t : n + 2 * t]]
    active = [not (bad[k] or nonfinite_loss[k]) and v[k * t + k] / b2 > 0 for k in range(t)]
    on = [1.0 if a else 0.0 for a in active]
    gram = [[v[i * t + j] / b2 * on[i] * on[j] for j in range(t)] for i in range(t)]
    extra = np.array(v[n + 2 * t + 1 :]) if len(v) > n + 2 * t + 1 else None
    return StepStats(
        np.array(gram).reshape(t, t),
        np.array([0.0 if bad_loss else x for x, bad_loss in zip(losses, nonfinite_loss)]),
        np.array(active),
        batch_size,
        int(round(b_global)),
        np.array(nonfinite_loss),
        extra,
        cross_terms,
    )
