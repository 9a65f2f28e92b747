"""Helpers for multi-process tests: run a function on W gloo ranks and collect what each returns."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch.multiprocessing as mp

from concord.trainer.runtime import free_port


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    # Leave the job as a Concord rank does: the run's objects freed while the group exists (TorchRec's
    # pipeline holds cycles that, left to interpreter teardown, outlive the group and abort the rank).
    from concord.trainer.runtime import shutdown

    shutdown()


def run_ranks(fn, world_size: int, *args):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; returns their results
    in rank order, raising with every failed rank's traceback (the first rank to fail is often not
    rank 0, whose error is then only its peer's closed connection)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, start_method="spawn"
        )
        loaded = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                loaded.append(pickle.load(f))
        failed = [f"rank {rank} failed:\n{value}" for rank, (status, value) in enumerate(loaded) if status != "ok"]
        if failed:
            raise AssertionError("\n".join(failed))
        return [value for _, value in loaded]
