"""Sharding kept out of model code: plan with torchrec's planner, wrap with DistributedModelParallel,
and set the fused (in-backward) embedding optimizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from concord.embeddings.options import CPU_EMBEDDING_OPTIMIZERS, CPU_SHARDING_TYPES, SHARDING_TYPES

_FUSED_OPTIMIZERS = {
    "rowwise_adagrad": (RowWiseAdagrad, ("lr", "eps", "weight_decay")),
    "adagrad": (torch.optim.Adagrad, ("lr", "eps", "weight_decay")),
    "sgd": (torch.optim.SGD, ("lr", "weight_decay")),
    "adam": (torch.optim.Adam, ("lr", "eps", "weight_decay")),
}


class ShardingPlanError(ValueError):
    """The tables do not fit the ranks' memory (or the allowed sharding types)."""


class EmbeddingOptimizerError(ValueError):
    """The configured fused embedding optimizer has no kernel on this device."""


def apply_fused_optimizer(ebc: EmbeddingBagCollection, opt_cfg, device: torch.device) -> None:
    """Registers the embedding optimizer to run inside backward (FBGEMM's fused TBE update)."""
    if device.type == "cpu" and opt_cfg.name not in CPU_EMBEDDING_OPTIMIZERS:
        raise EmbeddingOptimizerError(
            f"model.embedding_optimizer.name: {opt_cfg.name!r} has no CPU kernel in FBGEMM; on CPU use one "
            f"of {CPU_EMBEDDING_OPTIMIZERS}"
        )
    cls, keys = _FUSED_OPTIMIZERS[opt_cfg.name]
    apply_optimizer_in_backward(cls, ebc.parameters(), {k: getattr(opt_cfg, k) for k in keys})


def sharding_constraints(tables: Sequence, device: torch.device) -> Dict[str, ParameterConstraints]:
    """Per-table allowed sharding types: the config's, else every type legal on this device but
    ``data_parallel``. A data-parallel table is replicated and TorchRec trains it with the dense
    parameters (its gradient all-reduced, the dense optimizer's update), not with the fused
    ``model.embedding_optimizer``: left to itself the planner picks it for small tables, which would
    change their optimizer behind the config's back, so only a table that lists it gets it."""
    legal = CPU_SHARDING_TYPES if device.type == "cpu" else SHARDING_TYPES
    return {t.name: ParameterConstraints(sharding_types=list(t.sharding_types or [k for k in legal if k != "data_parallel"]))
            for t in tables}


# Share of each device's memory the planner leaves to dense parameters, activations and input batches.
PLANNER_RESERVED_FRACTION = 0.15


def planner_topology(world_size: int, device: torch.device) -> Topology:
    """The planner's view of the job, from this machine: ranks per node, each rank's share of the
    host's memory, and on CUDA the device's memory (the planner would otherwise assume 128 GiB of host
    memory a rank and a default HBM size, and plan tables that cannot be allocated)."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    trainer = TrainerConfig(  # frozen: every override given here
        world_size=world_size,
        local_world_size=local_world_size,
        ddr_cap_bytes=host_memory_per_rank(local_world_size),
        hbm_cap_bytes=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
    )
    return TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=device.type))


def host_memory_bytes() -> Optional[int]:
    """This host's memory as this process may use it: the physical memory, or a container's (cgroup)
    limit where that is lower; None where neither can be read."""
    try:
        sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (ValueError, OSError, AttributeError):
        sizes = []
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes) if sizes else None


def host_memory_per_rank(local_world_size: int) -> Optional[int]:
    """A rank's share of :func:`host_memory_bytes` among the ``local_world_size`` ranks on its host."""
    host = host_memory_bytes()
    return host // max(local_world_size, 1) if host is not None else None


def shard_model(
    model: nn.Module,
    tables: Sequence,
    device: torch.device,
    process_group: Optional[dist.ProcessGroup] = None,
    batch_size: Optional[int] = None,
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Plans (the same plan on every rank: ``collective_plan``) and wraps ``model`` in DMP.

    The dense part goes to DDP, the ``EmbeddingBagCollection`` is sharded; the fused optimizer set by
    :func:`apply_fused_optimizer` becomes ``dmp.fused_optimizer``. ``batch_size`` (per rank) sizes the
    planner's estimates of input and output buffers. Returns the DMP and its plan.
    """
    pg = process_group or dist.GroupMember.WORLD
    world_size = dist.get_world_size(pg)
    topology = planner_topology(world_size, device)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(PLANNER_RESERVED_FRACTION),
        constraints=sharding_constraints(tables, device),
    )
    sharders = [EmbeddingBagCollectionSharder()]
    try:
        plan = planner.collective_plan(model, sharders, pg)
    except PlannerError as e:
        sizes = ", ".join(f"{t.name}: {t.num_embeddings} x {t.embedding_dim}" for t in tables)
        storage = topology.devices[0].storage
        memory = f"{storage.ddr / 2**30:.1f} GiB of host memory" + (f", {storage.hbm / 2**30:.1f} GiB of GPU memory" if storage.hbm else "")
        raise ShardingPlanError(
            f"the sharding planner found no plan for {world_size} rank(s) on {device.type} for tables "
            f"[{sizes}] ({memory} a rank, {PLANNER_RESERVED_FRACTION:.0%} of it kept for the rest): {str(e).splitlines()[0]}"
        ) from None
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders), plan


def table_shardings(plan: ShardingPlan) -> Dict[str, str]:
    """Table name -> sharding type chosen by the planner."""
    return {
        table: ps.sharding_type
        for module_plan in plan.plan.values()
        for table, ps in module_plan.items()  # type: ignore[union-attr]
    }
