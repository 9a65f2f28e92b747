"""The boundary's lagged steps on a GPU, with no host read in backward: whether a task is usable
(a finite loss, a finite gradient) stays a flag on the device that the sum masks; the statistics are
packed and summed there; the last sum, copied to pinned memory as it arrived, is read at the next
step. A non-finite loss joins the next sum's report through a device flag; a non-finite gradient is
left out without a warning (one would need a host read).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .clock import Clock
from .statistics import filled, finite_flags, norms_of, stacked_gradients


class DeviceSteps:
    """Part of :class:`~.boundary.RepresentationBoundary` (mixed into it): its steps where the
    gradients live on a device whose numbers the host should not wait for (a GPU). Uses the
    boundary's step record, its statistics in flight and its held coefficients as its CPU steps do."""

    def _sum_at_view_on_device(self, total: torch.Tensor, donated: bool) -> torch.Tensor:
        """:meth:`_balance_sum_at_view` on a GPU, with no host read: where a loss or the sum is not
        finite the rank's contribution is zeroed on the device, without a warning (one would need a
        host read); a non-finite loss joins the next sum's report through a device flag."""
        losses = self._record.losses
        self._record.losses_used()
        finite_loss = finite_flags(losses)
        self._note_unreported_on_device(~finite_loss)
        aggregated = self._scaled_at_view(total, donated)
        keep = finite_loss.all() & finite_flags(aggregated.sum())
        if aggregated is total and not donated:  # autograd's buffer, not ours to write
            return torch.where(keep, aggregated, 0.0)
        return aggregated.masked_fill_(~keep, 0.0)

    def _balance_lagged_on_device(self, grads, z, template: torch.Tensor, start: Clock) -> torch.Tensor:
        """:meth:`_balance_lagged` for a coefficient rule on a GPU, with no host read in backward:
        whether a task is usable (finite loss, finite gradient, from the Gram's diagonal or, between
        sums, the gradient's own sum) stays a flag on the device that the sum masks; the statistics
        are packed and summed there, and the last sum, copied to pinned memory as it arrived, is
        read now. A non-finite loss joins the next sum's report through a device flag; a non-finite
        gradient is left out without a warning (one would need a host read)."""
        pending = None
        stacked = stacked_gradients(grads)
        if self._statistics_due():
            self._report_unreported()
            usable, pending = self._start_statistics(grads, z, template, on_host=False, stacked=stacked)
        else:
            usable = self._usable_on_device(grads)
        if self._hold_last_sum(pending):
            start.stop()
            return torch.zeros_like(template)
        return self._finish(self._masked_sum(stacked, template, self._coefficients_between_sums(), usable), start)

    def _balance_elementwise_on_device(self, grads, z, template: torch.Tensor, start: Clock) -> torch.Tensor:
        """:meth:`_balance_elementwise` on a GPU, with no host read in backward: the last sum (read
        from pinned memory) gives the rule its constants until the next; this step's statistics are
        packed and summed on the device; a task whose gradient or loss proves non-finite on this
        rank stays a device flag, which the rule masks."""
        usable, _, skip = self._elementwise_statistics(grads, z, template, on_host=False)
        if skip:
            start.stop()
            return torch.zeros_like(template)
        if self._last_sum is None:  # nothing summed yet: the prior, equal weights, over the finite tasks
            return self._finish(self._masked_sum(stacked_gradients(grads), template, self._coefficients_between_sums(), usable), start)
        return self._finish(self.balancer.aggregate_on_device(grads, self._last_sum, usable), start)

    def _usable_on_device(self, grads) -> torch.Tensor:
        """A step without statistics on a GPU: device flags for this rank's tasks with a finite loss
        and a finite gradient (its L1 norm says: NaN and inf propagate into it, and it overflows no
        sooner than the gradient's own sum), with no host read and no op per task; a non-finite loss
        joins the next sum's report through a device flag."""
        losses = self._record.losses
        finite_loss = finite_flags(losses)
        nonfinite = ~finite_loss
        present = [g for g in grads if g is not None]
        for k, g in enumerate(grads):
            if g is None:  # an absent head's loss is not reported
                nonfinite[k] = False
        self._note_unreported_on_device(nonfinite)
        return finite_loss & finite_flags(torch.stack(norms_of(filled(grads, present[0]), 1)))

    def _note_unreported_on_device(self, nonfinite: torch.Tensor) -> None:
        """Adds a step's non-finite losses to the device's flags, read at the next sum: in place once
        they exist (nn.Module's setattr costs microseconds, on the host time of every step)."""
        if self._unreported_on_device is None:
            self._unreported_on_device = nonfinite
        else:
            self._unreported_on_device.bitwise_or_(nonfinite)

    def _device_coefficients(self, coefficients: Sequence[float], device: torch.device) -> torch.Tensor:
        """``coefficients`` as a float64 tensor on ``device``, copied there (from pinned memory, so the
        host does not wait) only when they change: at a sum's read, not on the steps between."""
        key = (tuple(coefficients), device)
        if self._coefficients_on_device is None or self._coefficients_on_device[0] != key:
            host = torch.tensor(coefficients, dtype=torch.float64, pin_memory=device.type == "cuda")
            self._coefficients_on_device = (key, host.to(device, non_blocking=True))
        return self._coefficients_on_device[1]

    def _masked_sum(self, stacked: torch.Tensor, template: torch.Tensor, coefficients: Sequence[float], usable: torch.Tensor) -> torch.Tensor:
        """``sum_k c_k G_k`` over the tasks whose device flag ``usable[k]`` is set, shaped like
        ``template``, with no host read: the others' rows of ``stacked`` (:func:`stacked_gradients`,
        consumed) are zeroed first, so that a left-out gradient's NaN does not reach the sum, then
        one product with the masked coefficients, so that the ops do not grow with T."""
        stacked.masked_fill_(~usable[:, None], 0.0)
        c = torch.where(usable, self._device_coefficients(coefficients, template.device), 0.0).to(stacked.dtype)
        return (c @ stacked).view_as(template)
