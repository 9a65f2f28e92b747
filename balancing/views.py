"""The autograd nodes through which ``z`` reaches the heads, and what they ask of autograd: whether a
task gradient was handed over with nothing else holding it (so that the sum may be formed in it, as
autograd's own accumulation would), and whether the boundary may read numbers on the host.

:class:`Replicate` gives each head its own view (the boundary receives the T task gradients together);
:class:`SumAtView` gives every head one view (autograd sums the task gradients as they arrive, the
boundary scales the sum). Both hand the gradients to the :class:`~.boundary.RepresentationBoundary`
that made them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .boundary import RepresentationBoundary


def _references(grads: Tuple[Optional[torch.Tensor], ...]) -> List[int]:
    """Python references to each gradient, as counted from a custom Function's ``backward(ctx, *grads)``."""
    return [sys.getrefcount(g) for g in grads]


class _Probe(torch.autograd.Function):
    """Counts the references a gradient that nothing else holds has inside ``backward``: the baseline
    of :func:`donated_gradients`, measured rather than assumed, as it depends on the Python version."""

    references: Optional[int] = None

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        _Probe.references = _references(grads)[0]
        return grads[0]


def alone_references() -> Optional[int]:
    """The baseline, measured once (when the first boundary is made, outside any backward); None
    where it cannot be (made under ``inference_mode``): then the sum is never formed in a gradient."""
    if _Probe.references is None:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.zeros(2, 2, requires_grad=True)
                (_Probe.apply(x) * 2.0).sum().backward()  # MulBackward's output: a fresh gradient
        except RuntimeError:
            return None
    return _Probe.references


def donated_gradients(grads: Tuple[Optional[torch.Tensor], ...]) -> List[bool]:
    """Whether autograd handed the boundary the first of the gradients with nothing else holding it,
    so the sum may be formed in it as autograd's own accumulation would: no other Python reference
    (a hook that kept it, ``retain_grad``), no other C++ owner, no other tensor on its storage (a
    head whose backward sent the same gradient elsewhere), contiguous, and not a ``create_graph``
    backward. Only the first is looked at: the sum starts there."""
    first = next((k for k, g in enumerate(grads) if g is not None), None)
    baseline = _Probe.references
    if first is None or baseline is None or torch.is_grad_enabled() or not hasattr(torch._C, "_storage_Use_Count"):
        return []
    alone = _references(grads)[first] <= baseline  # counted before this frame holds it too
    g = grads[first]
    alone = (
        alone
        and g._use_count() == 1
        and torch._C._storage_Use_Count(g.untyped_storage()._cdata) == 2  # its tensor's and this call's
        and g.is_contiguous()
    )
    return [False] * first + [alone]


class Replicate(torch.autograd.Function):
    """Forward: T views of ``z``. Backward: ``A = boundary.balance(G_1..G_T)`` for ``z``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, boundary: "RepresentationBoundary") -> Tuple[torch.Tensor, ...]:
        ctx.boundary = boundary
        ctx.z = z.detach()  # a reference, no copy; read by element-wise methods such as GradDrop
        # Heads whose loss is absent give None rather than a materialised zero tensor.
        ctx.set_materialize_grads(False)
        return tuple(z.view_as(z) for _ in range(boundary.num_tasks))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        # Counted here, before any frame below holds a gradient; only the lagged sum takes them.
        donated = donated_gradients(grads) if ctx.boundary.statistics == "previous" and reads_on_host(ctx.z) else []
        return ctx.boundary.balance(grads, ctx.z, donated), None


class SumAtView(torch.autograd.Function):
    """Forward: one view of ``z`` that every head reads, so autograd sums the task gradients as it does
    for any tensor read T times, adding each one as it arrives (still in cache). Backward: the
    boundary scales that sum (``RepresentationBoundary.autograd_sums``)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, boundary: "RepresentationBoundary") -> torch.Tensor:
        ctx.boundary = boundary
        return z.view_as(z)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # The signature is _Probe's, so the reference count of a gradient nothing else holds matches
        # its baseline: a named argument is one reference more and the sum was never given up.
        donated = donated_gradients(grads)
        return ctx.boundary._balance_sum_at_view(grads[0], bool(donated and donated[0])), None


def reads_on_host(tensor: torch.Tensor) -> bool:
    """Whether the boundary may read a few numbers on the host each step where ``tensor`` lives: free
    on a CPU, a synchronisation with the device's queue on a GPU. (``is_cpu``: reading a device's
    type costs several microseconds each step with the caches cold.)"""
    return tensor.is_cpu

