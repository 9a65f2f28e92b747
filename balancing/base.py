"""One small base class and one registry for every balancing method (LibMTL style).

A *coefficient method* implements :meth:`Balancer.coefficients`: a (T,) float64 vector ``c`` computed
from the step's global statistics and its own state, so that ``A = sum_k c_k G_k``. An *element-wise
method* (CoGrad, GradDrop) overrides :meth:`Balancer.aggregate` instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type

import numpy as np
import torch

from .fused import FusedRule
from .statistics import StepStats

logger = logging.getLogger("concord.balancing")

_REGISTRY: Dict[str, Type["Balancer"]] = {}


def register(name: str) -> Callable[[Type["Balancer"]], Type["Balancer"]]:
    """Class decorator: makes a balancer available by ``name`` in configs and :func:`build_balancer`."""

    def wrap(cls: Type["Balancer"]) -> Type["Balancer"]:
        if name in _REGISTRY:
            raise ValueError(f"balancer {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_balancers() -> List[str]:
    return sorted(_REGISTRY)


def balancer_class(name: str) -> Type["Balancer"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown balancer {name!r}; available: {', '.join(available_balancers())}"
        ) from None


def build_balancer(name: str, task_names: Sequence[str], **knobs: Any) -> "Balancer":
    """Instantiates a registered balancer; unknown or out-of-range knobs raise ``ValueError``."""
    cls = balancer_class(name)
    allowed = cls.knob_names()
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(
            f"balancer {name!r} has no knob {', '.join(map(repr, unknown))}; its knobs: "
            f"{', '.join(allowed) or '(none)'}"
        )
    return cls(task_names, **knobs)


class RateLimitedWarning:
    """Logs a warning per (task, kind) at steps 1, 2, 4, 8, ... of its occurrences, with the count."""

    def __init__(self) -> None:
        self._counts: Dict[tuple, int] = {}

    def __call__(self, task: str, kind: str, message: str) -> None:
        n = self._counts.get((task, kind), 0) + 1
        self._counts[(task, kind)] = n
        if n & (n - 1) == 0:
            logger.warning("task %r: %s (occurrence %d; repeats are rate-limited)", task, message, n)

    def count(self, task: str, kind: str) -> int:
        return self._counts.get((task, kind), 0)


class Balancer:
    """Turns the per-task gradients ``G_k = dL_k/dz`` (B, d) into one aggregated gradient ``A`` (B, d).

    Subclasses declare their knobs as keyword arguments of ``__init__`` (validated there, raising
    ``ValueError`` that names the knob) and keep their state in float64 NumPy arrays listed in
    ``state_names``; :meth:`state_dict` hands them out as torch tensors (loadable with
    ``weights_only=True``) and round-trips exactly.
    """

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple] = ()
    # Whether the update rule reads the Gram's off-diagonal entries; methods that need only the norms
    # (its diagonal) set False and skip T(T-1)/2 dot products on steps whose telemetry is not logged.
    needs_cross_terms: ClassVar[bool] = True
    # How many numbers local_extra adds to the step's reduction (fixed per method; 0: none), and
    # whether the previous step's sum of them serves as well (lagged statistics).
    extra_size: ClassVar[int] = 0
    lag_safe_extras: ClassVar[bool] = False
    # How often ``statistics_every="auto"`` (the trainer's default) runs the rule when lagged: rules
    # whose state is a slow moving average (MultiBalance's norms, EMTL's rates) hold their
    # coefficients between sums; measured no worse on any task of our data sets, better on some
    # (docs/quality/README.md, "Statistics every 10 steps").
    lagged_statistics_every: ClassVar[int] = 1
    # Whether the rule reads the step's statistics at all. Rules that do not (constant weights) need
    # them only for telemetry: with lagged statistics the boundary then gathers them on logged steps only.
    reads_statistics: ClassVar[bool] = True
    # Element-wise rules (run_rule) run as one compiled kernel where that pays; False: always eagerly.
    fused: bool = True

    def __init__(self, task_names: Sequence[str]) -> None:
        if len(task_names) < 1:
            raise ValueError("a balancer needs at least one task")
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be unique, got {list(task_names)}")
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.step = 0
        self.process_group = None  # set by the boundary; for methods with statistics of their own
        self.warn = RateLimitedWarning()
        self.last_telemetry: Dict[str, Any] = {}
        # Set by the boundary: whether this step's telemetry will be read. Methods whose telemetry
        # costs extra passes over (B, d) tensors compute it only then.
        self.telemetry_due = True
        # Set by local_extra where its own pass over the gradients found ``||G_k||^2`` on the way
        # (the present gradients', in task order): the boundary's statistics take them for the Gram's
        # diagonal instead of dot products of their own, and clear them.
        self.squared_norms_seen: Optional[torch.Tensor] = None
        # Set by aggregate where its own pass summed the aggregate's elements on the way (0-dim): the
        # boundary's check for non-finite values between sums reads it instead of a pass of its own.
        self.aggregate_total: Optional[torch.Tensor] = None
        # Set by the boundary in lagged mode before local_extra: the global sum this step is
        # balanced with (None before the first sum, and in current mode). A rule whose aggregate
        # needs only that sum may form it in the same pass over the gradients as its statistics.
        self.lagged_stats: Optional[StepStats] = None

    @classmethod
    def knob_names(cls) -> List[str]:
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p not in ("self", "task_names")]

    # --- the update rule -------------------------------------------------------------------------
    def coefficients(self, stats: StepStats) -> np.ndarray:
        """(T,) float64 coefficients ``c`` with ``A = sum_k c_k G_k``; inactive tasks must get 0.
        Implementations record at least ``weights`` (on the simplex) in ``self.last_telemetry``."""
        raise NotImplementedError

    def prepare(
        self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor], live: np.ndarray
    ) -> Optional[Any]:
        """Work that needs no global statistics, done while their all-reduce is in flight.

        ``live`` (T,) bool is this rank's guess of ``stats.active`` for its present gradients. The
        boundary passes the result on to :meth:`aggregate` as ``early`` only when the guess proves
        right, so ``aggregate(grads, stats, z, early)`` must then equal ``aggregate(grads, stats, z)``.
        Default: nothing (coefficient methods need the statistics before touching a gradient)."""
        return None

    def weights_without_statistics(self) -> Optional[np.ndarray]:
        """(T,) coefficients that need no statistics (constant-weight rules), used on the steps that
        gather none; None (the default) for rules that read the statistics."""
        return None

    def held_rule(self, last: Optional[StepStats], z: torch.Tensor) -> Optional[tuple]:
        """An element-wise rule's step between sums (lagged statistics, on a CPU) as the constants of
        the boundary's compiled node (``csrc/nodes.cpp``, ``HeldSum``): ``(coefficients, gamma,
        kappa, active)``, the last sum ``last`` giving ``kappa`` and the tasks ``active`` in it. None:
        the step runs :meth:`aggregate` (the default; CoGrad's rule is the one the node implements)."""
        return None

    def aggregate(
        self,
        grads: Sequence[Optional[torch.Tensor]],
        stats: StepStats,
        z: Optional[torch.Tensor] = None,
        early: Optional[Any] = None,
    ) -> torch.Tensor:
        """``A = sum_k c_k G_k`` accumulated in place in the gradients' dtype (no stacked copy).
        ``z`` (B, d) is the representation itself, for element-wise methods that read it; ``early`` is
        what :meth:`prepare` returned, when it applies."""
        return weighted_sum(grads, self.coefficients(stats), stats.active)

    def aggregate_on_device(self, grads: Sequence[Optional[torch.Tensor]], stats: StepStats, usable: torch.Tensor) -> torch.Tensor:
        """:meth:`aggregate` with lagged statistics on a GPU: ``stats`` is the last sum, and this
        rank's usable tasks this step are device flags ``usable`` (T,) bool, never read on the host.
        Element-wise rules that lag implement it (coefficient rules never reach it)."""
        raise NotImplementedError(f"{self.name} has no lagged rule without host reads")

    def run_rule(self, rule: Callable, grads: Sequence[torch.Tensor], *args: Any) -> Any:
        """``rule(grads, *args)`` for an element-wise update rule written with torch operations: one
        fused kernel over the gradients where that pays, else eagerly (``balancing/fused.py``)."""
        rules = self.__dict__.setdefault("_fused_rules", {})
        if rule not in rules:
            rules[rule] = FusedRule(rule, self.fused)
        return rules[rule](list(grads), *args)

    def local_extra(self, grads: Sequence[Optional[torch.Tensor]], z: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Method-specific numbers to sum over ranks in the step's one statistics all-reduce (this
        rank's share, any shape); they come back flattened as ``stats.extra``. Default: none."""
        return None

    def warm_up(self, template: torch.Tensor, lagged: bool = False, on_host: bool = True) -> None:
        """Runs the method's element-wise rules (:meth:`run_rule`) once on zeros shaped like the
        step's gradients (``template``, (B, d)), so that a compiled rule is built here and not inside
        a backward; the boundary calls it from its forward, once per shape and statistics mode
        (``lagged``: ``previous``; ``on_host``: the boundary may read the host, a CPU). Default: no rules."""

    def parameters(self) -> List[torch.nn.Parameter]:
        """Learnable balancer parameters (loss-level methods); the boundary registers them so that the
        dense optimizer trains them and DDP averages their gradients."""
        return []

    def before_backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Hook for loss-level methods (Uncertainty): the scalar whose backward is taken. Default: sum,
        so each head receives its raw task gradient and the boundary sees each ``G_k`` unscaled."""
        return losses.sum()

    # --- bookkeeping -----------------------------------------------------------------------------
    def telemetry(self, stats: StepStats) -> Dict[str, Any]:
        """Per-step values worth logging: raw norms and pairwise cosines, plus the method's own."""
        norms = stats.norms
        out: Dict[str, Any] = {"grad_norm": norms.tolist(), "loss": stats.losses.tolist()}
        if stats.cross_terms:
            denom = np.outer(norms, norms)
            cos = np.divide(stats.gram, denom, out=np.zeros_like(denom), where=denom > 0)
            out["cosine"] = {
                f"{self.task_names[i]}~{self.task_names[j]}": float(cos[i, j])
                for i in range(self.num_tasks)
                for j in range(i + 1, self.num_tasks)
            }
        out.update(self.last_telemetry)
        return out

    def note_inactive(self, stats: StepStats, lagged: bool = False) -> None:
        """Warns of the tasks absent from a sum: left out of the step it summed, which with ``lagged``
        statistics is the step before (the steps balanced with that sum keep the task's coefficient)."""
        step = "the step before, whose sum this step reads" if lagged else "this step"
        for k in range(self.num_tasks):
            if not bool(stats.active[k]):
                self.warn(
                    self.task_names[k],
                    "inactive",
                    f"zero, missing or non-finite gradient/loss at the boundary; its contribution is "
                    f"skipped in {step}",
                )

    def state_dict(self) -> Dict[str, Any]:
        """Tensors only (float64 state, uint8 generator state), so ``torch.load(weights_only=True)``
        reads it back."""
        state: Dict[str, Any] = {"step": torch.tensor(self.step)}
        for key in self.state_names:
            value = getattr(self, key)
            if isinstance(value, torch.Generator):
                state[key] = value.get_state()
            elif isinstance(value, torch.Tensor):
                state[key] = value.detach().clone()
            else:
                state[key] = torch.from_numpy(np.array(value, dtype=np.float64))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = ({"step"} | set(self.state_names)) - set(state)
        if missing:
            raise KeyError(f"{self.name} balancer state lacks {sorted(missing)}")
        self.step = int(state["step"])
        for key in self.state_names:
            current, value = getattr(self, key), state[key]
            if isinstance(current, torch.Generator):
                current.set_state(value)
                continue
            expected = tuple(current.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{self.name} balancer state {key!r} has shape {tuple(value.shape)}, expected {expected}")
            if isinstance(current, torch.Tensor):
                with torch.no_grad():
                    current.copy_(value)
            else:
                setattr(self, key, torch.as_tensor(value, dtype=torch.float64).numpy().copy())


def weighted_sum(
    grads: Sequence[Optional[torch.Tensor]],
    coeffs: Sequence[float],
    active: Sequence[bool],
    donated: Sequence[bool] = (),
) -> torch.Tensor:
    """``sum_k c_k G_k`` over active tasks, accumulated in place; zeros if no task is active.

    ``donated[k]`` says the caller gives ``G_k`` up (autograd handed it to the boundary and nothing
    else holds it): if it is the first active gradient, the sum is formed in its storage, as
    autograd accumulates gradients, instead of in a fresh (B, d) buffer. The arithmetic, and so
    the result, is the same either way."""
    out: Optional[torch.Tensor] = None
    for k, g in enumerate(grads):
        if g is None or not active[k]:
            continue
        c = float(coeffs[k])
        if out is None:
            if k < len(donated) and donated[k]:
                out = g if c == 1.0 else g.mul_(c)
            else:
                out = g * c
        else:
            out.add_(g, alpha=c)
    if out is None:
        template = next(g for g in grads if g is not None)
        out = torch.zeros_like(template)
    return out


def seeded_generator(seed: int) -> torch.Generator:
    """The method's randomness: the same seed on every rank, so every rank draws the same numbers."""
    return torch.Generator().manual_seed(int(seed))


def check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_task_vector(name: str, values: Optional[Sequence[float]], num_tasks: int) -> Optional[np.ndarray]:
    """Validates a per-task knob (length T, finite, >= 0) and returns it as float64, or None."""
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = [float(values)] * num_tasks
    vec = np.array([float(v) for v in values], dtype=np.float64)
    if vec.size != num_tasks:
        raise ValueError(f"{name} needs one value per task ({num_tasks}), got {len(values)}")
    if not np.isfinite(vec).all() or (vec < 0).any():
        raise ValueError(f"{name} values must be finite and >= 0, got {list(values)}")
    return vec
