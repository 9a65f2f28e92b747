"""What a NaN or inf task loss does (``train.on_nonfinite``), decided alike on every rank.

``abort`` stops training before anything is updated and writes no checkpoint after it; ``skip`` drops
the step on every rank together, at most ``train.max_skipped_steps`` times. Where the ranks learn of
it, at no extra synchronisation where possible, is the *guard*:

- ``boundary``: in the boundary's own statistics reduction (abort raises inside backward before the
  bottom and the tables get a gradient; skip hands them a zero gradient);
- ``collective``: one sum of T flags over ranks before backward (parameter-level methods, and skip with
  a table optimizer for which a zero gradient is not a no-op);
- ``after_backward``: lagged statistics (``balancer.statistics: previous``, or ``auto``), whose sums
  arrive a step late. A rank whose loss of task k is not finite writes NaN into the gradient of task
  k's head output bias (one autograd node on the objective, adding nothing elsewhere); DDP's own gradient
  average carries it to every rank, which reads the T biases' gradients before the optimizer step (a
  job of one rank, only after a non-finite loss of its own):
  every rank drops (or stops at) the same step, with no collective of its own. The boundary has
  already left each rank's own non-finite contributions out of ``z``'s gradient, so the tables
  received the other ranks' finite part of that step; the dense parameters are not updated;
- ``local``: no boundary, this rank's losses only, so a non-finite loss always stops the job.
"""

from __future__ import annotations

import logging
import math
from typing import List

import torch
import torch.distributed as dist

from concord.balancing.collectives import sum_over_ranks

logger = logging.getLogger("concord.train")

# Fused embedding optimizers update the tables inside backward, so a dropped step must give them a
# zero gradient, which leaves both weights and state untouched only for these optimizers.
ZERO_GRAD_IS_NOOP = ("sgd", "adagrad", "rowwise_adagrad")


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN/inf task loss (abort, or more skipped steps than allowed)."""


class NonFinitePolicy:
    def __init__(self, cfg, process_group, log) -> None:
        self.cfg, self.group, self.log = cfg, process_group, log
        self.skipped_steps = 0
        self.alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
        self._marked = True  # whether the last step's objective went through _Marks

    def guard(self, boundary_enabled: bool, parameter_level: bool, lagged: bool = False) -> str:
        if parameter_level:
            return "collective"
        if not boundary_enabled:
            return "local"
        if lagged:
            return "after_backward"
        emb = self.cfg.model.embedding_optimizer
        if self.cfg.train.on_nonfinite == "skip" and not (emb.name in ZERO_GRAD_IS_NOOP and emb.weight_decay == 0):
            return "collective"
        return "boundary"

    def tasks_before_backward(self, losses: torch.Tensor, guard: str, step: int) -> List[str]:
        """Tasks whose loss is NaN or inf, on this rank (``local``) or on any rank (``collective``);
        none for the ``boundary`` and ``after_backward`` guards, which learn it later."""
        if guard in ("boundary", "after_backward"):
            return []
        flags = (~torch.isfinite(losses.detach())).to(torch.float64).cpu()
        if guard == "collective":
            flags = sum_over_ranks(flags, self.group)
        bad = [name for name, flag in zip(self.cfg.task_names, flags.tolist()) if flag > 0]
        if bad and guard == "local":
            self.stop(bad, step, "; with the boundary off ranks cannot agree to skip")
        return bad

    def mark(self, objective: torch.Tensor, losses: torch.Tensor, canaries: List[torch.Tensor]) -> torch.Tensor:
        """``after_backward``: ``objective`` unchanged, through one autograd node whose backward adds NaN
        to canary k's gradient where this rank's loss of task k is not finite (0 elsewhere). A CPU rank
        reads its T losses first (a host read costs nothing there) and adds the node only when one
        is not finite; on a GPU the marks are formed on the device every step, so no step waits for
        the host."""
        self._marked = not (losses.device.type == "cpu" and all(map(math.isfinite, losses.detach().tolist())))
        return _Marks.apply(objective, losses.detach(), *canaries) if self._marked else objective

    def tasks_after_backward(self, canaries: List[torch.Tensor]) -> List[str]:
        """``after_backward``: the tasks whose canary gradient (averaged over ranks by DDP) is not
        finite, the same on every rank; one host read (per canary on a CPU, where a read is free).
        A single rank whose losses :meth:`mark` read as finite has nothing to look for."""
        if self.alone and not self._marked:
            return []
        if canaries[0].grad.device.type == "cpu":
            finite = [all(map(math.isfinite, c.grad.reshape(-1).tolist())) for c in canaries]
        else:  # a NaN or inf anywhere survives the canary's sum
            finite = [math.isfinite(v) for v in torch.stack([c.grad.sum() for c in canaries]).tolist()]
        return [name for name, ok in zip(self.cfg.task_names, finite) if not ok]

    def skip(self, tasks: List[str], step: int) -> None:
        """Step ``step`` had a non-finite loss for ``tasks`` on some rank: stop (abort) or count it."""
        if self.cfg.train.on_nonfinite == "abort":
            self.stop(tasks, step)
        self.skipped_steps += 1
        logger.warning("step %d: non-finite loss for task(s) %s; step skipped on every rank", step, tasks)
        self.log.write({"kind": "skipped_step", "step": step, "tasks": tasks})
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_steps > limit:
            raise NonFiniteLoss(
                f"{self.skipped_steps} steps skipped for non-finite losses (the last at step {step}, task(s) "
                f"{tasks}), more than train.max_skipped_steps={limit}: the data or the learning rate needs a look"
            )

    @staticmethod
    def stop(tasks: List[str], step: int, why: str = "") -> None:
        raise NonFiniteLoss(
            f"non-finite loss for task(s) {tasks} at step {step}; stopping without writing a checkpoint (the "
            f"newest checkpoint holds no NaN; train.on_nonfinite: skip drops such steps{why})"
        )


class _Marks(torch.autograd.Function):
    """Forward: the objective. Backward: its gradient passed on, and for canary k NaN where this rank's
    loss of task k is not finite, 0 where it is."""

    @staticmethod
    def forward(ctx, objective: torch.Tensor, losses: torch.Tensor, *canaries: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [c.shape for c in canaries]
        ctx.marks = torch.where(torch.isfinite(losses), 0.0, float("nan")).to(canaries[0].dtype)
        return objective.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, None) + tuple(ctx.marks[k].expand(shape) for k, shape in enumerate(ctx.shapes))
