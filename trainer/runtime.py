"""Process group and device, decided in one place (a GPU path plugs in here)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    balancer_group: Optional[dist.ProcessGroup]  # the boundary's statistics all-reduce runs here

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("dist.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_runtime(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> Runtime:
    """Joins the job started by torchrun/torchx (env://), or makes a 1-rank group when run alone."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # torch's env:// rendezvous, with the store namespaced by torchrun's restart count: after a
        # rank fails and torchrun restarts the job, no key left by the dead incarnation (such as a
        # gloo peer's old address) can be read by the new one.
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"concord/attempt{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    world = dist.get_world_size()
    group = dist.new_group(backend=backend) if world > 1 else None
    return Runtime(dist.get_rank(), world, local_rank, dev, backend, group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
