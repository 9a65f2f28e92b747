"""CoGrad, from "Gradient Coordination for Quantifying and Maximizing Knowledge Transference in
Multi-Task Learning" (Yang et al., Alibaba), Algorithm 1 line 9 and Eqs. 10-11 with lambda = 1, as
specified in docs/ALGORITHMS.md.

Each task gradient gains the transference term ``-sum_{j != i} gamma_j g_i ⊙ g_i ⊙ g_j``:

    A = P - kappa C,   P = sum_i c_i G_i,   C = sum_i c_i G_i ⊙ G_i ⊙ (S' - gamma_i G_i),   S' = sum_j gamma_j G_j

The cubic term's size relative to the gradient depends on the data (on how heavy the gradients' tails
are: 100 times apart between a synthetic and a real data set at one fixed coefficient), so Concord
fixes its global size instead (docs/ALGORITHMS.md, Clarification 4): ``kappa`` makes ``||kappa C|| =
strength * ||P||`` over the global batch. ``gamma`` weighs the tasks' transference against each other;
``strength`` is the correction's share of the gradient. Both norms travel in the step's statistics
(this rank's share, at per-sample scale), so every rank uses the same ``kappa``; with lagged statistics
it is the previous step's.

The correction adjusts each gradient element, it never reverses one: the factor ``kappa G_i ⊙ (S' -
gamma_i G_i)`` that multiplies ``G_i`` is bounded to [-1, 1] element by element (docs/ALGORITHMS.md,
item 4). ``||C||`` is dominated by the gradients' largest elements and swings by orders of magnitude
from step to step on real data, so a ``kappa`` that is right for the global norm can still be many
times too large for a few elements, and with the previous step's norms for a whole step.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Balancer, check_positive, check_task_vector, register, weighted_sum
from .native import passable, wide_vector_passes
from .statistics import StepStats


# The most tasks whose norms cograd_pass forms in its pass (kMaxNormTasks in csrc/passes.cpp).
_PASS_MAX_TASKS = 16


@register("cograd")
class CoGrad(Balancer):
    needs_cross_terms = False  # fixed weights; the rule is element-wise
    lag_safe_extras = True  # kappa from the previous step's norms is the same on every rank
    # kappa held for 10 steps: no detectable difference from every step's on any task of Adult, the
    # Ali-CCP-shaped log or the conflict preset (docs/quality/README.md, "CoGrad every 10 steps").
    lagged_statistics_every = 10

    def __init__(
        self,
        task_names: Sequence[str],
        gamma: Sequence[float] | float = 1.0,
        weights: Optional[Sequence[float]] = None,
        strength: float = 0.02,  # docs/ALGORITHMS.md, item 4: 0.05 cost more tasks than it helped
        fused: bool = True,
        bounded: bool = True,
        guard: bool = False,
    ) -> None:
        super().__init__(task_names)
        self.gamma = check_task_vector("cograd.gamma", gamma, self.num_tasks)
        c = check_task_vector("cograd.weights", weights, self.num_tasks)
        if c is None:
            c = np.full(self.num_tasks, 1.0 / self.num_tasks)
        elif float(c.sum()) <= 0:
            raise ValueError("cograd.weights must not all be zero")
        else:
            c = c / c.sum()
        self.weights = c
        self.strength = check_positive("cograd.strength", strength, allow_zero=True)
        self.fused = bool(fused)
        if not isinstance(bounded, bool):
            raise ValueError(f"cograd.bounded is true or false, got {bounded!r}")
        # The element bound (docs/ALGORITHMS.md, item 4): each factor clamped to [-limit, limit]; off,
        # the rule is Algorithm 1's ``P - kappa C`` as written (an infinite limit clamps nothing).
        self.bounded = bounded
        self.limit = 1.0 if bounded else math.inf
        if not isinstance(guard, bool):
            raise ValueError(f"cograd.guard is true or false, got {guard!r}")
        # The per-task guard (docs/ALGORITHMS.md, item 4): ``kappa`` small enough that the correction's
        # first-order cost to any task is at most ``strength`` of what its own term gains it.
        self.guard = guard
        # The statistics: ||P||^2, ||C||^2, then with the guard for each task ||G_k||^2 and <G_k, C>.
        self.extra_size = 2 + 2 * self.num_tasks if guard else 2
        self._formed: Optional[Tuple[List[int], float, torch.Tensor]] = None  # lagged: live, kappa, A

    def local_extra(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's ``B^2 ||P||^2`` and ``B^2 ||C||^2``, then with the guard ``B^2 ||G_k||^2`` and ``B^2
        <G_k, C>`` for each task (0 for an absent one): summed over ranks (and divided by ``B_g^2``, which
        cancels in ``kappa``) they are the global batch's at per-sample scale.

        One pass over the present gradients gives them all and each ``||G_k||^2`` (handed to the
        boundary's statistics as :attr:`squared_norms_seen`, so the Gram's diagonal costs no second
        pass). With lagged statistics ``kappa`` is known before that pass (the last sum's), so the
        same pass also forms the aggregate, which :meth:`aggregate` then returns. A non-finite
        gradient is not looked for here: it makes the norms non-finite, the statistics then mark its
        task inactive on every rank, and :meth:`aggregate` leaves that step uncorrected."""
        present = [k for k, g in enumerate(grads) if g is not None]
        self._formed = None
        if not present:
            return torch.zeros(self.extra_size, dtype=torch.float64)
        knobs = self._knobs(present)
        present_grads = [grads[k] for k in present]
        kappa = self._lagged_kappa(grads)
        ops = self._compiled_pass(present_grads)
        if ops is not None:
            aggregated, _, squares = ops.cograd_pass(present_grads, *knobs, kappa, bool(kappa), False, True, self.guard)
        elif kappa:
            aggregated, squares = self.run_rule(coordinated_with_norms, present_grads, *knobs, kappa, self.limit, self.guard)
        else:
            squares = self.run_rule(transference_norms, present_grads, *knobs, self.guard)
        if kappa:
            self._formed = (present, kappa, aggregated)
        n = len(present)
        self.squared_norms_seen = squares[:n]
        b2 = float(present_grads[0].shape[0]) ** 2
        if not self.guard:
            return squares[n : n + 2].double() * b2
        squares = squares.double() * b2
        if n == self.num_tasks:  # every task: no op per task (each would be a kernel on a GPU)
            return torch.cat([squares[n : n + 2], squares[:n], squares[n + 2 :]])
        extra = squares.new_zeros(self.extra_size)
        extra[:2] = squares[n : n + 2]
        for i, k in enumerate(present):
            extra[2 + k] = squares[i]
            extra[2 + self.num_tasks + k] = squares[n + 2 + i]
        return extra

    def warm_up(self, template: torch.Tensor, lagged: bool = False, on_host: bool = True) -> None:
        zeros = [torch.zeros_like(template) for _ in range(self.num_tasks)]  # distinct, as the gradients are
        knobs = self._knobs(range(self.num_tasks))
        if on_host and self._compiled_pass(zeros) is not None:
            # The rule and its logged telemetry run in the compiled passes; only a logged step whose
            # aggregate a lagged statistics step formed runs the telemetry apart.
            for kappa in (1.0, 0.5) if lagged else ():
                self.run_rule(correction_telemetry, zeros, *knobs, kappa, zeros[0], self.limit)
            return
        self.run_rule(transference_norms, zeros, *knobs, self.guard)  # current mode; a lagged run's first step
        if lagged and not on_host:
            flags = torch.ones(self.num_tasks, dtype=torch.bool, device=template.device)
            kappa = torch.ones((), dtype=torch.promote_types(template.dtype, torch.float32), device=template.device)
            aggregated = self.run_rule(coordinated_masked, zeros, *knobs, kappa, flags, self.limit)
            self.run_rule(correction_telemetry, zeros, *knobs, kappa, aggregated, self.limit)
            return
        # Two values of kappa: the compiler then takes it as an input instead of a constant, so a
        # step's new kappa does not recompile the rule inside backward.
        for kappa in (1.0, 0.5):
            if lagged:  # a statistics step forms the aggregate with the norms; the steps between, alone
                self.run_rule(coordinated_with_norms, zeros, *knobs, kappa, self.limit, self.guard)
            aggregated, _ = self.run_rule(coordinated_with_total, zeros, *knobs, kappa, self.limit)
            self.run_rule(correction_telemetry, zeros, *knobs, kappa, aggregated, self.limit)

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        active = stats.active
        live = [k for k, g in enumerate(grads) if g is not None and active[k]]
        # A task with a gradient here that is inactive globally (non-finite or zero on some rank) was
        # in some ranks' norms and not in others': no kappa fits every rank, so this step goes
        # uncorrected, on every rank alike.
        dropped = any(g is not None and not active[k] for k, g in enumerate(grads))
        kappa = 0.0 if dropped else self.kappa(stats)
        formed, self._formed = self._formed, None
        self.last_telemetry = {"weights": self.weights.tolist(), "kappa": kappa, **self._cost_telemetry(stats, kappa)}
        if not live or kappa == 0.0:
            self.last_telemetry.update(correction_ratio=0.0, bounded_share=0.0)
            return weighted_sum(grads, self.weights * active, active)
        live_grads, knobs = [grads[k] for k in live], self._knobs(live)
        measured = None  # the telemetry's terms, where the pass that forms the aggregate forms them too
        if formed is not None and formed[0] == live and formed[1] == kappa:
            aggregated = formed[2]  # formed with this step's statistics (lagged)
        else:  # its total on the way: the boundary's check for non-finite values, where it needs one
            ops = self._compiled_pass(live_grads)
            if ops is not None and self.telemetry_due:
                aggregated, self.aggregate_total, measured = ops.cograd_telemetry_pass(live_grads, *knobs, kappa)
            elif ops is not None:
                aggregated, self.aggregate_total, _ = ops.cograd_pass(live_grads, *knobs, kappa, True, False, False, False)
            else:
                aggregated, self.aggregate_total = self.run_rule(coordinated_with_total, live_grads, *knobs, kappa, self.limit)
        if self.telemetry_due:
            if measured is None:
                measured = self.run_rule(correction_telemetry, live_grads, *knobs, kappa, aggregated, self.limit)
            plain2, change2, bounded = measured.tolist()
            self.last_telemetry["correction_ratio"] = math.sqrt(change2 / plain2) if plain2 > 0 else 0.0
            self.last_telemetry["bounded_share"] = bounded / max(1, len(live) * aggregated.numel())
        return aggregated

    def _compiled_pass(self, grads: List[torch.Tensor]) -> Optional[object]:
        """The compiled passes (``csrc/passes.cpp``, ``cograd_pass``) where the rule is ``fused``, they
        take the gradients and the CPU has wide vectors (:func:`~.native.wide_vector_passes`): the
        rule (and on a statistics step its norms) in one vectorised pass, the same up to rounding as
        the compiled rule, whose Python call and guards cost as much as its loop. Gradients of any
        size: the pass is built once per machine, so unlike ``torch.compile`` it has nothing to
        amortise, and on a small ``z`` the eager rule's dozen torch calls a step cost far more than
        its arithmetic. Else None."""
        if len(grads) > _PASS_MAX_TASKS or not passable(grads):
            return None
        return self._wide_passes()

    def _wide_passes(self) -> Optional[object]:
        """The compiled module where the rule is ``fused`` and ``bounded`` (the compiled passes clamp each
        factor to [-1, 1]) and the CPU has wide vectors; else None."""
        return wide_vector_passes() if self.fused and self.bounded else None

    def held_rule(self, last: Optional[StepStats], z: torch.Tensor) -> Optional[tuple]:
        """Where the rule is ``fused`` and ``bounded`` and the CPU has wide vectors, the boundary's
        compiled node forms it between sums, with no Python in backward, in the pass of
        :meth:`_compiled_pass` (half-precision gradients: torch's ops, the eager rule's), with
        the same verdicts (a step with a task left out goes uncorrected, as in :meth:`aggregate`)."""
        if last is None or self._wide_passes() is None:
            return None
        return self.weights.tolist(), self.gamma.tolist(), self.kappa(last), last.active.tolist()

    def aggregate_on_device(self, grads: Sequence[Optional[torch.Tensor]], stats: StepStats, usable: torch.Tensor) -> torch.Tensor:
        """:meth:`aggregate` without a host read: the tasks usable here (a device flag) enter;
        ``kappa`` is 0 where a present task was inactive in the last sum, and becomes 0 on the device
        where any present task is not usable (as :meth:`aggregate` leaves such a step uncorrected).
        Telemetry stays on the device until read."""
        present = [k for k, g in enumerate(grads) if g is not None]  # at least one: the boundary's template
        kappa = self._lagged_kappa_for(grads, stats)
        ok = usable if len(present) == len(grads) else torch.stack([usable[k] for k in present])  # all present: no op
        kappa_now = ok.all().to(torch.promote_types(grads[present[0]].dtype, torch.float32)) * kappa
        present_grads, knobs = [grads[k] for k in present], self._knobs(present)
        aggregated = self.run_rule(coordinated_masked, present_grads, *knobs, kappa_now, ok, self.limit)
        self.last_telemetry = {"weights": self.weights.tolist(), "kappa": kappa_now, **self._cost_telemetry(stats, kappa)}
        if self.telemetry_due:  # device scalars: read when the telemetry is (after backward)
            masked = [torch.where(ok[i], g, 0.0) for i, g in enumerate(present_grads)]
            plain2, change2, bounded = self.run_rule(correction_telemetry, masked, *knobs, kappa_now, aggregated, self.limit).unbind()
            self.last_telemetry["correction_ratio"] = torch.where(plain2 > 0, (change2 / plain2).sqrt(), 0.0)
            self.last_telemetry["bounded_share"] = bounded / max(1, len(present) * aggregated.numel())
        return aggregated

    def telemetry(self, stats: StepStats) -> dict:
        out = super().telemetry(stats)
        return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def _lagged_kappa(self, grads: Sequence[Optional[torch.Tensor]]) -> float:
        """The ``kappa`` that :meth:`aggregate` will use this step with lagged statistics, if every
        task with a gradient here was active in the last sum (0: none known, or none applies)."""
        return 0.0 if self.lagged_stats is None else self._lagged_kappa_for(grads, self.lagged_stats)

    def _lagged_kappa_for(self, grads: Sequence[Optional[torch.Tensor]], last: StepStats) -> float:
        """The last sum's ``kappa``, or 0 where a task with a gradient here was inactive in it."""
        if any(g is not None and not last.active[k] for k, g in enumerate(grads)):
            return 0.0
        return self.kappa(last)

    def kappa(self, stats: StepStats) -> float:
        """``strength * ||P|| / ||C||`` over the global batch (0 where there is nothing to correct); with
        the guard, at most ``strength * c_k ||G_k||^2 / <G_k, C>`` for every active task whose
        ``<G_k, C>`` is positive (the correction's first-order cost to task k)."""
        if stats.extra is None or self.strength == 0.0:
            return 0.0
        plain2, correction2 = float(stats.extra[0]), float(stats.extra[1])
        usable = math.isfinite(plain2) and math.isfinite(correction2) and correction2 > 0 and plain2 > 0
        if not usable:
            return 0.0
        kappa = self.strength * math.sqrt(plain2 / correction2)
        if self.guard:
            gains, costs = self._gains_and_costs(stats)
            binding = stats.active & (costs > 0) & (gains > 0)
            if binding.any():
                kappa = min(kappa, self.strength * float((gains[binding] / costs[binding]).min()))
        return kappa

    def _gains_and_costs(self, stats: StepStats) -> Tuple[np.ndarray, np.ndarray]:
        """Each task's ``c_k ||G_k||^2`` and ``<G_k, C>`` in the sum ``stats`` (the guard's statistics)."""
        t = self.num_tasks
        return self.weights * stats.extra[2 : 2 + t], stats.extra[2 + t : 2 + 2 * t]

    def _cost_telemetry(self, stats: StepStats, kappa: float) -> dict:
        """With the guard, ``correction_cost``: each task's ``kappa <G_k, C> / (c_k ||G_k||^2)`` in the
        sum ``stats``, the share of its own term's first-order gain that the correction costs it (at
        most ``strength``; negative where the correction helps it)."""
        if not self.guard or stats.extra is None:
            return {}
        gains, costs = self._gains_and_costs(stats)
        return {"correction_cost": np.divide(kappa * costs, gains, out=np.zeros(self.num_tasks), where=gains > 0).tolist()}

    def _knobs(self, tasks: Sequence[int]) -> Tuple[List[float], List[float]]:
        return [float(self.weights[k]) for k in tasks], [float(self.gamma[k]) for k in tasks]


def _transfer(grads: List[torch.Tensor], gamma: List[float]) -> torch.Tensor:
    """``S' = sum_j gamma_j G_j``."""
    s_prime = grads[0] * gamma[0]
    for gamma_j, g in zip(gamma[1:], grads[1:]):
        s_prime = s_prime + g * gamma_j
    return s_prime


def transference_norms(grads: List[torch.Tensor], c: List[float], gamma: List[float], costs: bool = True) -> torch.Tensor:
    """``[||G_1||^2 .. ||G_n||^2, ||P||^2, ||C||^2]`` and with ``costs`` ``<G_1, C> .. <G_n, C>`` (the
    guard's) over the given gradients (B, d), with ``P = sum_i c_i G_i`` and ``C = sum_i c_i
    G_i⊙G_i⊙(S' - gamma_i G_i)`` (Algorithm 1, line 9, before its overall scale). Compiled, one loop
    that reads each ``G_i`` once and writes nothing."""
    s_prime = _transfer(grads, gamma)
    plain = grads[0] * c[0]
    correction = grads[0] * grads[0] * (s_prime - grads[0] * gamma[0]) * c[0]
    for c_i, gamma_i, g in zip(c[1:], gamma[1:], grads[1:]):
        plain = plain + g * c_i
        correction = correction + g * g * (s_prime - g * gamma_i) * c_i
    dots = [(g * correction).sum(dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads] if costs else []
    return torch.stack([_squared_sum(t) for t in (*grads, plain, correction)] + dots)


def coordinated(grads: List[torch.Tensor], c: List[float], gamma: List[float], kappa: float, limit: float) -> torch.Tensor:
    """``A = sum_i c_i G_i ⊙ (1 - clamp(kappa G_i ⊙ (S' - gamma_i G_i), -limit, limit))``: ``P - kappa C``
    where no element's correction exceeds ``limit`` times the element itself (1: it never reverses
    one; infinite: no bound). Compiled, one loop; eagerly, a few passes per task."""
    s_prime = _transfer(grads, gamma)
    aggregated = None
    for c_i, gamma_i, g in zip(c, gamma, grads):
        factor = (s_prime - g * gamma_i) * g * kappa
        term = g * (1.0 - factor.clamp(-limit, limit)) * c_i
        aggregated = term if aggregated is None else aggregated + term
    return aggregated


def coordinated_with_total(grads: List[torch.Tensor], c: List[float], gamma: List[float], kappa: float,
                           limit: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`coordinated` and the sum of its elements (non-finite where any gradient holds a NaN or
    an inf), in the same loop: a check for non-finite values that costs no pass of its own."""
    aggregated = coordinated(grads, c, gamma, kappa, limit)
    return aggregated, aggregated.sum(dtype=torch.promote_types(aggregated.dtype, torch.float32))


def correction_telemetry(grads: List[torch.Tensor], c: List[float], gamma: List[float], kappa, aggregated: torch.Tensor,
                         limit: float) -> torch.Tensor:
    """``[||P||^2, ||A - P||^2, how many elements' corrections the bound met]`` (float64) for the
    aggregate ``A`` that :func:`coordinated` formed with ``kappa`` and ``limit``: one loop, for the
    logged steps."""
    s_prime = _transfer(grads, gamma)
    plain, bounded = None, None
    for c_i, gamma_i, g in zip(c, gamma, grads):
        plain = g * c_i if plain is None else plain + g * c_i
        hits = ((s_prime - g * gamma_i) * g * kappa).abs().gt(limit).sum()
        bounded = hits if bounded is None else bounded + hits
    return torch.stack([_squared_sum(plain).double(), _squared_sum(aggregated - plain).double(), bounded.double()])


def coordinated_with_norms(
    grads: List[torch.Tensor], c: List[float], gamma: List[float], kappa: float, limit: float, costs: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`coordinated` and :func:`transference_norms` in one loop (``kappa`` known beforehand)."""
    return coordinated(grads, c, gamma, kappa, limit), transference_norms(grads, c, gamma, costs)


def coordinated_masked(
    grads: List[torch.Tensor], c: List[float], gamma: List[float], kappa: torch.Tensor, usable: torch.Tensor, limit: float
) -> torch.Tensor:
    """:func:`coordinated` over the gradients whose device flag ``usable[i]`` is set (a left-out
    gradient's NaN reaches nothing); ``kappa`` a device scalar, so no host read decides anything."""
    return coordinated([torch.where(usable[i], g, 0.0) for i, g in enumerate(grads)], c, gamma, kappa, limit)


def _squared_sum(t: torch.Tensor) -> torch.Tensor:
    """``sum t^2``, accumulated in float32 at least (half-precision gradients widened)."""
    return t.square().sum(dtype=torch.promote_types(t.dtype, torch.float32))
