"""Mixture-of-experts bottoms, MMoE (Ma et al. 2018) and PLE (Tang et al. 2020), cut at the boundary.

Tasks start to differ at the gates, so the boundary sits there: the shared part before it packs what
every task reads into one ``z`` (B, D); after it, each task's :class:`MMoETaskInput` or
:class:`PLETaskInput` reads its own view of ``z`` (its gate, and for PLE its own experts) and hands
its tower a (B, d_e) representation. Every task-specific gradient therefore reaches the shared
experts, the embeddings and the dense bottom only through the balancer.

``z`` holds the gate inputs as well as the expert outputs: a gate's input gradient is task-specific
too, and would otherwise bypass the balancer on its way to the embeddings.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class Experts(nn.Module):
    """``n`` expert MLPs on one input: x (B, in) -> (B, n, d_e), d_e = ``layers[-1]``."""

    def __init__(self, in_dim: int, num: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.experts = nn.ModuleList([MLP(in_dim, list(layers)) for _ in range(num)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)


class Gate(nn.Module):
    """``softmax(W x)`` over ``n`` experts: x (B, in), experts (B, n, d_e) -> (B, d_e)."""

    def __init__(self, in_dim: int, num: int) -> None:
        super().__init__()
        self.logits = nn.Linear(in_dim, num)

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.logits(x), dim=-1)
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)


class MMoEShared(nn.Module):
    """Before the boundary: x (B, w) -> ``z = [x | E_1(x) | ... | E_n(x)]`` (B, w + n d_e)."""

    def __init__(self, in_dim: int, num_experts: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.experts = Experts(in_dim, num_experts, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.experts(x).flatten(1)], dim=1)


class MMoETaskInput(nn.Module):
    """After the boundary, one task: its view of ``z`` -> its gate's mixture of the experts (B, d_e)."""

    def __init__(self, in_dim: int, num_experts: int, expert_dim: int) -> None:
        super().__init__()
        self.in_dim, self.num_experts, self.expert_dim = in_dim, num_experts, expert_dim
        self.gate = Gate(in_dim, num_experts)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x, experts = z.split([self.in_dim, self.num_experts * self.expert_dim], dim=1)
        return self.gate(x, experts.view(-1, self.num_experts, self.expert_dim))


class ExtractionLayer(nn.Module):
    """One PLE extraction level below the boundary (Tang et al. 2020, Sec. 4): task k's output is
    ``gate_k(h_k)`` over [its own experts(h_k), the shared experts(s)]; the shared output is
    ``gate_s(s)`` over all experts. T task inputs + 1 shared input (B, in) -> the same, (B, d_e)."""

    def __init__(self, in_dim: int, num_tasks: int, num_task_experts: int, num_shared: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList([Experts(in_dim, num_task_experts, layers) for _ in range(num_tasks)])
        self.shared_experts = Experts(in_dim, num_shared, layers)
        self.task_gates = nn.ModuleList([Gate(in_dim, num_task_experts + num_shared) for _ in range(num_tasks)])
        self.shared_gate = Gate(in_dim, num_tasks * num_task_experts + num_shared)

    def forward(self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        shared = self.shared_experts(shared_input)
        own = [experts(h) for experts, h in zip(self.task_experts, task_inputs)]
        outputs = [gate(h, torch.cat([e, shared], dim=1)) for gate, h, e in zip(self.task_gates, task_inputs, own)]
        return outputs, self.shared_gate(shared_input, torch.cat(own + [shared], dim=1))


class PLEShared(nn.Module):
    """Before the boundary: ``levels - 1`` extraction layers, then the last level's shared experts.

    ``z = [inputs | S_1(s) | ... | S_n(s)]`` where ``inputs`` is x (B, w) itself for one level and the
    T task outputs of the level below (B, T d_e) otherwise; ``s`` is the shared input of the last level.
    """

    def __init__(self, in_dim: int, num_tasks: int, num_task_experts: int, num_shared: int, layers: Sequence[int], levels: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        dims = [in_dim] + [layers[-1]] * (levels - 1)
        self.levels = nn.ModuleList(
            [ExtractionLayer(dims[i], num_tasks, num_task_experts, num_shared, layers) for i in range(levels - 1)]
        )
        self.shared_experts = Experts(dims[-1], num_shared, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_inputs, shared = [x] * self.num_tasks, x
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        inputs = task_inputs if len(self.levels) else [x]
        return torch.cat(inputs + [self.shared_experts(shared).flatten(1)], dim=1)


class PLETaskInput(nn.Module):
    """After the boundary, task k of the last PLE level: its own experts on its input, and its gate
    over [own experts, shared experts] -> (B, d_e)."""

    def __init__(self, task: int, in_dim: int, per_task_input: bool, num_task_experts: int, num_shared: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.in_dim, self.num_shared, self.expert_dim = in_dim, num_shared, layers[-1]
        self.offset = task * in_dim if per_task_input else 0
        self.experts = Experts(in_dim, num_task_experts, layers)
        self.gate = Gate(in_dim, num_task_experts + num_shared)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z[:, self.offset : self.offset + self.in_dim]
        shared = z[:, z.shape[1] - self.num_shared * self.expert_dim :].view(-1, self.num_shared, self.expert_dim)
        return self.gate(h, torch.cat([self.experts(h), shared], dim=1))


def build_experts(cfg, in_dim: int, num_tasks: int) -> Tuple[nn.Module, nn.ModuleList]:
    """The shared part (before the boundary) and the T task inputs (after it) for ``model.experts``."""
    layers, expert_dim = list(cfg.layers), cfg.layers[-1]
    if cfg.type == "mmoe":
        task_inputs = [MMoETaskInput(in_dim, cfg.num_shared, expert_dim) for _ in range(num_tasks)]
        return MMoEShared(in_dim, cfg.num_shared, layers), nn.ModuleList(task_inputs)
    if cfg.type == "ple":
        last_in = in_dim if cfg.levels == 1 else expert_dim
        task_inputs = [
            PLETaskInput(k, last_in, cfg.levels > 1, cfg.num_task, cfg.num_shared, layers) for k in range(num_tasks)
        ]
        shared = PLEShared(in_dim, num_tasks, cfg.num_task, cfg.num_shared, layers, cfg.levels)
        return shared, nn.ModuleList(task_inputs)
    raise ValueError(f"unknown experts type {cfg.type!r}; one of mmoe, ple")
