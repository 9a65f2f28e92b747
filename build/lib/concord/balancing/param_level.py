"""Parameter-level balancing, the expensive comparison point (MultiBalance paper, Table 2).

Per-task gradients of the shared **dense** parameters come from T extra ``torch.autograd.grad`` calls
(``retain_graph=True``); weights come from their Gram matrix; then one backward of ``sum_k c_k L_k``
trains everything. Embedding tables stay out: their fused optimizers update them inside backward, so
per-task table gradients never exist as tensors (and would cost far more). Under DDP the T gradients
are all-reduced (T x P numbers a step) so that every rank computes the same weights.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Type

import numpy as np
import torch
import torch.distributed as dist

from .simplex import min_norm_weights


class ParameterLevelBalancer:
    """``objective(losses)`` -> the scalar to backward, ``sum_k c_k L_k``, with ``c`` on the simplex."""

    name = ""
    state_names: tuple = ()

    def __init__(self, task_names: Sequence[str], params: Sequence[torch.nn.Parameter], process_group=None) -> None:
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError(f"{self.name}: no shared dense parameters to balance")
        self.process_group = process_group
        self.step = 0
        self.last_telemetry: Dict[str, object] = {}

    def task_gradients(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, P) each task's gradient of the shared parameters and (T,) the task losses, both averaged
        over ranks in one all-reduce (ranks hold equal batches, as DDP's averaging assumes)."""
        rows = []
        for k in range(self.num_tasks):
            grads = torch.autograd.grad(losses[k], self.params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)]))
        packed = torch.cat([torch.stack(rows), losses.detach().to(rows[0].dtype).reshape(-1, 1)], dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(packed, group=self.process_group)
            packed /= dist.get_world_size(self.process_group)
        return packed[:, :-1], packed[:, -1]

    def weights(self, grads: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        c = self.weights(*self.task_gradients(losses))
        self.step += 1
        self.last_telemetry.setdefault("weights", c.tolist())
        return (torch.as_tensor(c, dtype=losses.dtype, device=losses.device) * losses).sum()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        state: Dict[str, object] = {"step": torch.tensor(self.step)}
        for key in self.state_names:
            value = getattr(self, key)
            if isinstance(value, np.ndarray):
                state[key] = torch.from_numpy(value.copy())
            elif value is not None:
                state[key] = value.detach().clone()
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])
        for key in self.state_names:
            if key in state:
                numpy_state = isinstance(getattr(self, key), np.ndarray)
                setattr(self, key, state[key].numpy().copy() if numpy_state else state[key].clone())


class ParamMGDA(ParameterLevelBalancer):
    """MGDA-UB on the parameter gradients: ``c = argmin over the simplex of c^T (G G^T) c``."""

    name = "param_mgda"

    def weights(self, grads: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
        gram = (grads.double() @ grads.double().T).cpu().numpy()
        active = np.isfinite(np.diagonal(gram)) & (np.diagonal(gram) > 0)
        c = np.zeros(self.num_tasks)
        idx = np.flatnonzero(active)
        if idx.size:
            c[idx] = min_norm_weights(gram[np.ix_(idx, idx)])
        self.last_telemetry = {"weights": c.tolist(), "grad_norm": np.sqrt(np.maximum(np.diagonal(gram), 0)).tolist()}
        return c


class ParamMoCo(ParameterLevelBalancer):
    """MoCo (Fernando et al. 2022), as in LibMTL: tracked gradients ``y_k <- y_k - beta_t (y_k - L_k g_k
    / ||g_k||)``, weights ``c <- softmax(c - gamma_t (Y Y^T + rho I) c)``; beta, gamma decay as t^-0.5."""

    name = "param_moco"
    state_names = ("tracked", "lam")

    def __init__(self, task_names, params, process_group=None, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0) -> None:
        super().__init__(task_names, params, process_group)
        for knob, value in (("beta", beta), ("gamma", gamma), ("rho", rho)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"param_moco.{knob} must be finite and >= 0, got {value}")
        self.beta, self.gamma, self.rho = float(beta), float(gamma), float(rho)
        size = sum(p.numel() for p in self.params)
        self.tracked = torch.zeros(self.num_tasks, size, dtype=self.params[0].dtype, device=self.params[0].device)  # Y
        self.lam = np.full(self.num_tasks, 1.0 / self.num_tasks)

    def weights(self, grads: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
        t = self.step + 1
        beta_t, gamma_t = self.beta / math.sqrt(t), self.gamma / math.sqrt(t)
        norms = grads.norm(dim=1, keepdim=True).clamp_min(1e-12)
        target = losses.to(grads.dtype).reshape(-1, 1) * grads / norms
        self.tracked -= beta_t * (self.tracked - target)
        yy = (self.tracked.double() @ self.tracked.double().T).cpu().numpy()
        step = self.lam - gamma_t * (yy + self.rho * np.eye(self.num_tasks)) @ self.lam
        e = np.exp(step - step.max())
        self.lam = e / e.sum()
        self.last_telemetry = {"weights": self.lam.tolist()}
        return self.lam


PARAMETER_LEVEL: Dict[str, Type[ParameterLevelBalancer]] = {"param_mgda": ParamMGDA, "param_moco": ParamMoCo}


def build_parameter_level(name: str, task_names: Sequence[str], params: Sequence[torch.nn.Parameter], process_group=None, **knobs) -> ParameterLevelBalancer:
    if name not in PARAMETER_LEVEL:
        raise ValueError(f"unknown parameter-level method {name!r}; available: {', '.join(PARAMETER_LEVEL)}")
    cls = PARAMETER_LEVEL[name]
    if cls is ParamMGDA and knobs:
        raise ValueError(f"param_mgda has no knob {', '.join(map(repr, knobs))}")
    return cls(task_names, params, process_group, **knobs)


def check_parameter_level_knobs(name: str, num_tasks: int, **knobs) -> None:
    """Validates knobs without a model (config loading)."""
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    try:
        build_parameter_level(name, [f"t{k}" for k in range(num_tasks)], dummy, **knobs)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None
