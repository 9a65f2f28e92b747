"""torchx components for Concord.

Local (two ranks on this machine, or two simulated nodes of one rank each)::

    torchx run -s local_cwd launch/components.py:train --j 1x2
    torchx run -s local_cwd launch/components.py:train --j 2x1 --config configs/demo.yaml train.max_steps=100

Cluster: the same component with ``-s slurm`` or ``-s kubernetes`` (see README, "Launch").
"""


import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torchx.specs as specs
import yaml
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "configs/demo.yaml",
    single_task: str = "",
    j: str = "1x2",
    image: str = "",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Trains a Concord multi-task model with torchrun on every node (built on ``dist.ddp``).

    Args:
        overrides: ``key=value`` config overrides, e.g. ``train.max_steps=100 balancer.name=emtl``
        config: YAML config, relative to the working directory (local_cwd) or the image
        single_task: train this task alone (the single-task baseline); empty: every task
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` or ``2x1``
        image: container image (ignored by local_cwd, which runs in the current directory)
        h: named resource (takes precedence over cpu/gpu/memMB)
        cpu: CPUs per node
        gpu: GPUs per node (the trainer then picks CUDA and NCCL)
        memMB: memory per node in MB
        max_retries: scheduler-level retries of the whole job (slurm, kubernetes)
        max_restarts: torchrun-level restarts of the workers after a rank fails (any scheduler,
            local_cwd included); a restarted job resumes from its newest complete checkpoint
        rdzv_port: c10d rendezvous port on the first node
        env: extra environment variables
    """
    nproc = int(j.split("x")[-1]) if "x" in j else int(j)
    device, where = _requested_device(config, overrides)
    if device == "cuda" and gpu < 1 and h is None:
        raise ValueError(f"{where}: dist.device=cuda needs GPUs: pass --gpu N (per node) or a named resource with -h")
    if gpu > 0 and nproc > gpu:
        raise ValueError(f"--j {j} starts {nproc} ranks per node but --gpu {gpu}: one rank per GPU")
    if not image:
        _check_torchrun_on_path()
    # torchrun reads every option from PET_<NAME>; dist.ddp does not expose --max-restarts itself.
    job_env = {"OMP_NUM_THREADS": str(max(1, cpu // max(1, nproc))), "PET_MAX_RESTARTS": str(max_restarts)}
    job_env.update(env or {})
    return dist.ddp(
        "train",
        "--config",
        config,
        *(["--single-task", single_task] if single_task else []),
        *overrides,
        m="concord.trainer.cli",
        image=image,
        name="concord",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )


def _check_torchrun_on_path() -> None:
    """Without an image, the job runs ``torchrun`` (``dist.ddp``'s command) in this environment's PATH,
    on this machine (local_cwd) or on nodes that inherit it (Slurm): where a non-activated environment
    ran ``torchx`` (``.venv/bin/torchx``), the job failed with bash's "torchrun: command not found"."""
    if shutil.which("torchrun") is None:
        here = Path(sys.executable).parent
        raise ValueError(f"torchrun is not on PATH, and the job runs it on every node: activate the environment "
                         f"Concord is installed in first (`source {here / 'activate'}`)")


def _requested_device(config: str, overrides) -> Tuple[Optional[str], str]:
    """``dist.device`` as the job will read it, and where it is set: the last override, else the
    config file where it can be read here (with an image it may exist only there: then unknown)."""
    devices = [o.split("=", 1)[1] for o in overrides if o.startswith("dist.device=")]
    if devices:
        return devices[-1], "the overrides"
    path = Path(config)
    if not path.is_file():
        return None, config
    raw = yaml.safe_load(path.read_text())
    section = raw.get("dist") if isinstance(raw, dict) else None
    return (section.get("device") if isinstance(section, dict) else None), f"{config}: dist.device"
