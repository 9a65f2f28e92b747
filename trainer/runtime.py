"""Process group and device, decided in one place (a GPU path plugs in here)."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("concord.runtime")


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


def keep_freed_memory() -> bool:
    """Keeps freed CPU tensors in the process heap instead of handing them back to the kernel.

    glibc serves blocks above its mmap threshold with fresh pages and gives the heap's top back
    once it exceeds the trim threshold, so each step's (B, d) temporaries page-fault anew: 0.5 ms
    per 1 MiB tensor here, several times what the arithmetic on it costs. Both thresholds must be
    set (setting either one alone turns off glibc's own adaptive raising of the other). Allocations
    up to 32 MiB then come from the heap, and up to 1 GiB of freed heap is kept for reuse. Skipped
    when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``, and off glibc.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    done = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    logger.debug("malloc thresholds %s", "set" if done else "left as they were")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def intra_op_threads(requested: int = 0) -> int:
    """``requested``, else ``OMP_NUM_THREADS`` when set, else the cores this process may use shared
    among the node's ranks (a rank that takes every core slows its neighbours down)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_runtime(
    device: str = "auto", backend: str = "auto", timeout_s: int = 600, keep_memory: bool = True, threads: int = 0
) -> Runtime:
    """Joins the job started by torchrun/torchx (env://), or makes a 1-rank group when run alone;
    ``keep_memory`` applies :func:`keep_freed_memory`; ``threads``: see :func:`intra_op_threads`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(intra_op_threads(threads))
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
        # NCCL binds the group to this rank's GPU up front (device_id), instead of guessing at first use.
        device_id = dev if dev.type == "cuda" else None
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id)
    world = dist.get_world_size()
    group = dist.new_group(backend=backend) if world > 1 else None
    return Runtime(dist.get_rank(), world, local_rank, dev, backend, group)


def shutdown() -> None:
    """Leaves the job. The run's objects (model, DDP, TorchRec's pipeline, pending collectives) are
    freed first, while the process group still exists: TorchRec's pipeline holds its own bound
    methods, so left to the cyclic collector they were destroyed during interpreter teardown, after
    the group, and a rank aborted at exit once its run was already complete."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
