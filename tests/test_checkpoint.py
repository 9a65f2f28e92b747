"""Checkpoints: exact resume on 2 gloo ranks, atomic publication, last K kept, safe loading."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from distributed import run_ranks
from processes import workers as worker_pids
from tiny_data import tiny_data
from concord.trainer.checkpoint import CheckpointError, Checkpointer, SafeFileSystemReader

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, run_dir, balancer, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", *tiny_data(tmp_path),
           f"train.run_dir={run_dir}", f"balancer.name={balancer}", "train.log_every=1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _local_tensors(state, prefix="", whole=False):
    """Flattens a checkpoint state into {key: local tensor} (ShardedTensors: their local shards, or
    with ``whole`` the shards put together, as on one rank, where every shard is local)."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_local_tensors(value, name + "/", whole))
        elif hasattr(value, "local_shards") and whole:
            out[name] = torch.zeros(value.size(), dtype=value.dtype)
            for shard in value.local_shards():
                where = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                out[name][where] = shard.tensor.detach()
        elif hasattr(value, "local_shards"):
            for shard in value.local_shards():
                out[f"{name}@{tuple(shard.metadata.shard_offsets)}"] = shard.tensor.detach().clone()
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().clone()
    return out


def _compare_checkpoints(rank, world_size, cfg_overrides, path_a, path_b):
    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    cfg = load_config("configs/tiny.yaml", cfg_overrides)
    trainer = Trainer.build(cfg, init_runtime("cpu"))
    trainer.dense_optimizer.init_state()
    state = trainer.checkpoint_state(0)
    Checkpointer.load(Path(path_a), state)
    a = _local_tensors(state)
    Checkpointer.load(Path(path_b), state)
    b = _local_tensors(state)
    assert a.keys() == b.keys()
    return {"keys": sorted(a), "different": sorted(k for k in a if not torch.equal(a[k], b[k]))}


@pytest.mark.multiprocess
@pytest.mark.parametrize("balancer,extra", [("multibalance", []), ("gradvac", []),
                                             # stopped with CoGrad's kappa held from a sum 2 steps back
                                             ("cograd", ["balancer.statistics_every=3"])])
def test_resume_is_exact(tmp_path, balancer, extra):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(tmp_path, whole, balancer, "train.max_steps=10", *extra)
    _train(tmp_path, split, balancer, "train.max_steps=4", "train.checkpoint_every=4", *extra)
    out = _train(tmp_path, split, balancer, "train.max_steps=10", *extra)
    assert "resumed from" in out and "at step 4" in out
    overrides = [f"data.train={tmp_path}/data/train", f"data.eval={tmp_path}/data/eval",
                 f"train.run_dir={tmp_path}/probe", f"balancer.name={balancer}", *extra]
    results = run_ranks(_compare_checkpoints, 2, overrides,
                        str(whole / "checkpoints/step-00000010"), str(split / "checkpoints/step-00000010"))
    for result in results:
        keys = result["keys"]
        # The comparison covers tables, dense parameters, both optimizers' state and the balancer's.
        assert any("embedding_bags" in k for k in keys) and any(k.startswith("optimizer/") for k in keys)
        assert any("boundary._extra_state/step" in k for k in keys) and "progress/step" in keys
        assert result["different"] == []
    # Tensors only: DCP would read anything else back with torch.load(weights_only=False).
    metadata = SafeFileSystemReader(str(split / "checkpoints/step-00000010")).read_metadata()
    assert all(isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values())


def _resumed_state(rank, world_size, cfg_overrides):
    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    trainer = Trainer.build(load_config("configs/tiny.yaml", cfg_overrides), init_runtime("cpu"))
    step = trainer.resume()
    return _local_tensors(trainer.checkpoint_state(step), whole=True)


@pytest.mark.multiprocess
def test_a_checkpoint_of_two_ranks_resumes_whole_on_one(tmp_path):
    """On one rank (``train.allow_changes=[world_size]``) every tensor of a 2-rank checkpoint loads as
    it was saved: the tables and their optimizer state resharded, the dense state, the balancer's."""
    run = tmp_path / "run"
    _train(tmp_path, run, "multibalance", "train.max_steps=6", "model.tables[0].sharding_types=[column_wise]")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(run / "checkpoints/step-00000006", tmp_path / "saved.pt")
    saved = _local_tensors(torch.load(tmp_path / "saved.pt", weights_only=False))
    (loaded,) = run_ranks(_resumed_state, 1, [*tiny_data(tmp_path), f"train.run_dir={run}", "balancer.name=multibalance",
                                              "model.tables[0].sharding_types=[column_wise]", "dist.nproc_per_node=1",
                                              "train.allow_changes=[world_size]"])
    assert loaded.keys() == saved.keys()
    assert any("momentum" in k for k in loaded) and any("boundary._extra_state" in k for k in loaded)
    assert [k for k in loaded if not torch.equal(loaded[k], saved[k])] == []


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((3,), float(step))})
    assert [p.name for p in ck.complete()] == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000004.tmp").mkdir()  # a run killed mid-write leaves this
    assert ck.latest().name == "step-00000003"
    state = {"w": torch.zeros(3)}
    Checkpointer.load(ck.latest(), state)
    assert torch.equal(state["w"], torch.full((3,), 3.0))
    ck.save(5, {"w": torch.ones(3)})
    assert not (tmp_path / "step-00000004.tmp").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(1, {"w": torch.ones(2)})
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        SafeFileSystemReader(str(path)).read_metadata()
    assert not payload.marker.exists()


@pytest.mark.multiprocess
def test_a_killed_rank_restarts_the_job_which_resumes_to_the_same_model(tmp_path):
    import json
    import signal
    import time

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ["train.max_steps=24", "train.checkpoint_every=4"]
    _train(tmp_path, whole, "multibalance", *common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml",
           f"data.train={tmp_path}/data/train", f"data.eval={tmp_path}/data/eval", f"train.run_dir={killed}",
           "balancer.name=multibalance", "train.log_every=1", "dist.max_restarts=1", *common]
    # Output goes to files: an unread pipe fills up (64 KiB of warnings) and blocks the workers.
    out_file, err_file = open(tmp_path / "out.log", "w"), open(tmp_path / "err.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_file, stderr=err_file, text=True, start_new_session=True)
    try:
        log = killed / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until training is past the first checkpoint
            steps = [json.loads(l)["step"] for l in log.read_text().splitlines() if '"kind": "train"' in l] if log.exists() else []
            if steps and max(steps) >= 9:
                break
            time.sleep(0.2)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # never leave a job behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    results = run_ranks(_compare_checkpoints, 2,
                        [f"data.train={tmp_path}/data/train", f"data.eval={tmp_path}/data/eval",
                         f"train.run_dir={tmp_path}/probe", "balancer.name=multibalance"],
                        str(whole / "checkpoints/step-00000024"), str(killed / "checkpoints/step-00000024"))
    assert all(r["different"] == [] for r in results)
