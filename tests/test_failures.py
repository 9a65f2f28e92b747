"""Failures during training: non-finite losses (abort or skip on every rank), tables that fit no
plan, bad data; each ends with a clear message and never with a checkpoint holding NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from concord.trainer.config import load_config
from concord.trainer.data.synth import generate

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny data set, plus a copy whose training rows include one dense value of 1e30: finite
    input, but its squared error overflows, so every task's loss is non-finite in that batch."""
    root = tmp_path_factory.mktemp("data")
    cfg = load_config("configs/tiny.yaml", [f"data.train={root}/train", f"data.eval={root}/eval"])
    generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, show_progress=False)
    table = pq.read_table(next((root / "train").glob("*.parquet")))
    dense = table["dense_0"].to_numpy().copy()
    dense[70] = 1e30  # rank 0's second batch (row groups of 512 rows, batches of 64)
    table = table.set_column(table.schema.get_field_index("dense_0"), "dense_0", pa.array(dense))
    (root / "overflow").mkdir()
    pq.write_table(table, root / "overflow/part-00000.parquet", row_group_size=512)
    dense = table["dense_0"].to_numpy().copy()
    dense[70], dense[2048 + 70] = dense[0], 1e30  # rank 1's second batch: the main rank must learn it
    (root / "overflow-rank1").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("dense_0"), "dense_0", pa.array(dense)),
                   root / "overflow-rank1/part-00000.parquet", row_group_size=512)
    return root


def concord(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "concord.trainer.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# Both statistics modes stop at, or drop, the step with the non-finite loss on every rank: the current
# step's statistics say so inside backward; with lagged ones (the default) a sum of flags read after it.
@pytest.mark.parametrize("statistics", ["auto", "current"])
def test_nonfinite_loss_aborts_without_a_checkpoint_after_it(data, tmp_path, statistics):
    run = tmp_path / "run"
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={data}/overflow", f"data.eval={data}/eval",
                   f"train.run_dir={run}", "train.max_steps=6", "train.checkpoint_every=1", "data.shuffle=false",
                   f"balancer.statistics={statistics}")
    assert proc.returncode != 0
    assert "NonFiniteLoss: non-finite loss for task(s) ['ctr', 'cvr', 'watch'] at step 2" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]


# Without weight decay the boundary's statistics decide and the tables get a zero gradient (a no-op);
# with it a zero gradient would still move the tables, so the ranks agree in an all-reduce before backward.
@pytest.mark.parametrize("weight_decay,statistics,bad_rank", [(0.0, "auto", 0), (0.0, "auto", 1), (0.0, "current", 1), (0.01, "current", 0)])
def test_nonfinite_loss_skip_drops_the_step_on_every_rank(data, tmp_path, weight_decay, statistics, bad_rank):
    run = tmp_path / "run"
    train = f"{data}/overflow" if bad_rank == 0 else f"{data}/overflow-rank1"
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={train}", f"data.eval={data}/eval",
                   f"train.run_dir={run}", "train.max_steps=6", "train.on_nonfinite=skip", "data.shuffle=false",
                   f"model.embedding_optimizer.weight_decay={weight_decay}", f"balancer.statistics={statistics}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["step"] == 6
    skipped = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"skipped_step"' in l]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert skipped == [{"kind": "skipped_step", "step": 2, "tasks": ["ctr", "cvr", "watch"], "run_id": run_id}]
    assert all(np.isfinite(v) for task in summary["eval"].values() for v in task.values())


def test_tables_that_fit_no_plan_are_reported(data, tmp_path):
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={data}/train", f"data.eval={data}/eval",
                   f"train.run_dir={tmp_path}/run", "model.tables.0.num_embeddings=100000000000", "dist.nproc_per_node=1")
    assert proc.returncode == 3
    assert "ShardingPlanError: the sharding planner found no plan for 1 rank(s) on cpu for tables [t_user: 100000000000 x 8" in proc.stderr
    assert "insufficient storage" in proc.stderr


def test_an_embedding_optimizer_without_a_cpu_kernel_is_reported(data, tmp_path):
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={data}/train", f"data.eval={data}/eval",
                   f"train.run_dir={tmp_path}/run", "model.embedding_optimizer.name=adam", "dist.nproc_per_node=1")
    assert proc.returncode == 2  # known before anything starts: this machine has no GPU
    assert "config error: configs/tiny.yaml: model.embedding_optimizer.name: 'adam' has no CPU kernel in FBGEMM" in proc.stderr


def test_bad_data_ends_with_the_readers_message(data, tmp_path):
    table = pq.read_table(next((data / "train").glob("*.parquet")))
    ids = table["user"].to_pylist()
    ids[5] = [999_999]
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("user"), "user", pa.array(ids, pa.list_(pa.int64()))),
                   bad / "part-00000.parquet", row_group_size=512)
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={bad}", f"data.eval={data}/eval",
                   f"train.run_dir={tmp_path}/run", "train.max_steps=3")
    assert proc.returncode != 0
    assert "row group 0: column 'user': id 999999 outside the table's range [0, 500)" in proc.stderr
    hashed = concord("train", "--config", "configs/tiny.yaml", f"data.train={bad}", f"data.eval={data}/eval",
                     f"train.run_dir={tmp_path}/run2", "train.max_steps=3", "data.on_bad_id=hash")
    assert hashed.returncode == 0, hashed.stderr[-2000:]
    assert json.loads((tmp_path / "run2/summary.json").read_text())["data_repairs"]["hashed_ids"] == 1


def _trained_steps(run: Path) -> int:
    log = run / "metrics.jsonl"
    return sum('"kind": "train"' in line for line in log.read_text().splitlines()) if log.exists() else 0


def test_a_mistyped_data_path_stops_with_one_line_and_generates_nothing(data, tmp_path):
    typo = tmp_path / "dtaa/train"
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={typo}", f"data.eval={data}/eval",
                   f"train.run_dir={tmp_path}/run")
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1] == (
        f"concord: DataError: data.train: {typo} holds no Parquet data; `concord synth --config configs/tiny.yaml` "
        "writes the config's synthetic data there"
    )
    assert not typo.exists() and not (tmp_path / "run").exists()


def test_a_negative_weight_anywhere_stops_before_training(data, tmp_path):
    table = pq.read_table(next((data / "train").glob("*.parquet")))
    weights = np.ones(table.num_rows)
    weights[1500] = -0.5  # in the third row group: not in the first sample the reader decodes
    weighted = tmp_path / "weighted"
    weighted.mkdir()
    pq.write_table(table.append_column("w", pa.array(weights)), weighted / "part-00000.parquet", row_group_size=512)
    run = tmp_path / "run"
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={weighted}", f"data.eval={data}/eval",
                   f"train.run_dir={run}", "data.weight_column=w")
    assert proc.returncode == 3
    assert "row group 2: weight column 'w': value -0.5 at row 476; a sample weight must be finite and >= 0" in proc.stderr
    assert _trained_steps(run) == 0


def test_an_unreadable_eval_split_stops_before_training(data, tmp_path):
    broken = tmp_path / "eval"
    broken.mkdir()
    (broken / "part-00000.parquet").write_bytes(b"PAR1 not really")
    run = tmp_path / "run"
    proc = concord("train", "--config", "configs/tiny.yaml", f"data.train={data}/train", f"data.eval={broken}",
                   f"train.run_dir={run}")
    assert proc.returncode == 3
    assert "part-00000.parquet: not a readable Parquet file" in proc.stderr.strip().splitlines()[-1]
    assert _trained_steps(run) == 0


def test_a_workers_objects_are_freed_before_its_process_group_is_destroyed(monkeypatch):
    """A run's objects in reference cycles (TorchRec's pipeline holds its own bound methods) are
    collected before the process group goes: left to interpreter teardown, a rank could abort at exit."""
    import gc
    import weakref

    from concord.trainer import cli, runtime

    class Cyclic:
        pass

    ref = {}

    def work(rt):
        obj = Cyclic()
        obj.self = obj
        ref["obj"] = weakref.ref(obj)

    freed_at_shutdown = []
    real_destroy = runtime.dist.destroy_process_group

    def destroy_process_group():
        freed_at_shutdown.append(ref["obj"]() is None)
        real_destroy()

    monkeypatch.setattr(runtime.dist, "destroy_process_group", destroy_process_group)
    environ = dict(os.environ)  # a one-process job sets RANK, MASTER_PORT, ...: later tests' jobs must not inherit them
    gc.disable()
    try:
        assert cli._run_worker(load_config("configs/tiny.yaml", ["dist.nproc_per_node=1"]), work) == 0
    finally:
        gc.enable()
        os.environ.clear()
        os.environ.update(environ)
    assert freed_at_shutdown == [True]


def test_the_marks_reach_the_canaries_of_the_nonfinite_tasks_only():
    """``after_backward``'s marks, both ways they are made: through the node (a GPU's way, and a CPU
    rank's with a non-finite loss) the canary of a NaN task gets NaN and the others 0 added; a CPU
    rank with finite losses adds nothing to the graph."""
    import torch

    from concord.trainer.nonfinite import NonFinitePolicy, _Marks

    canaries = [torch.zeros(1, requires_grad=True) for _ in range(3)]
    for losses in (torch.tensor([0.5, float("nan"), 2.0]), torch.tensor([0.5, 1.0, 2.0])):
        head = sum(c.sum() * loss for c, loss in zip(canaries, losses.tolist()) if loss == loss)
        objective = _Marks.apply(head, losses, *canaries)
        for c in canaries:
            c.grad = None
        objective.backward()
        got = [c.grad.item() for c in canaries]
        expected = [loss if loss == loss else float("nan") for loss in losses.tolist()]
        np.testing.assert_array_equal(got, expected)
    objective = canaries[0].sum() * 2
    policy = NonFinitePolicy(SimpleNamespace(task_names=["a", "b", "c"]), None, None)  # one process: alone
    assert policy.mark(objective, torch.tensor([0.5, 1.0, 2.0]), canaries) is objective


def test_one_rank_reads_the_canaries_only_after_a_nonfinite_loss_of_its_own():
    """Alone, a rank's own losses are every rank's: read finite by ``mark``, the canaries (whose
    gradients then hold no mark) are not read; with a NaN loss they are, and name the task."""
    import torch

    from concord.trainer.nonfinite import NonFinitePolicy

    policy = NonFinitePolicy(SimpleNamespace(task_names=["a", "b"]), None, None)
    assert policy.alone
    canaries = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    policy.mark(canaries[0].sum() + canaries[1].sum(), torch.tensor([0.5, 1.0]), canaries)
    assert policy.tasks_after_backward(canaries) == []  # no canary has a gradient: none was read
    losses = torch.tensor([0.5, float("nan")])
    policy.mark(canaries[0].sum() + canaries[1].sum(), losses, canaries).backward()
    assert policy.tasks_after_backward(canaries) == ["b"]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchelastic's @record, under pytest's capture
def test_a_workers_failure_after_another_ranks_is_one_line_without_its_traceback(tmp_path, monkeypatch, capsys):
    """A failure once another rank of the launcher's job has recorded one (a peer's closed connection,
    most likely) is printed as one line and ends the worker with 1, rather than a traceback above the
    cause the launcher prints last; a first failure keeps its traceback (re-raised)."""
    from concord.trainer import failures

    monkeypatch.setenv(failures.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def fails() -> int:
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError):
        failures.recorded(fails)()  # the first failure of the job
    assert failures.first_error(tmp_path) == (1, "rank 0: RuntimeError: Connection closed by peer")
    (tmp_path / "rank-0.txt").unlink()
    (tmp_path / "rank-1.txt").write_text("1.0 3 rank 1: ValueError: before torchrun restarted the job\n")
    with pytest.raises(RuntimeError):  # a record older than this worker is not this job's failure
        failures.recorded(fails)()
    (tmp_path / "rank-0.txt").unlink()
    failures.report(ValueError("bad id"), rank=1, world_size=2)
    assert failures.recorded(fails)() == 1
    assert capsys.readouterr().err.splitlines()[-1] == "concord: rank 0: RuntimeError: Connection closed by peer"
    assert failures.first_error(tmp_path) == (3, "rank 1: ValueError: bad id")


def test_a_ranks_failure_line_is_written_whole(monkeypatch):
    """Two ranks that fail at once share the terminal; with PYTHONUNBUFFERED (as containers set it)
    print() sent the text and its newline in two writes, and the two ranks' lines ran together as
    "...no such file or directoryconcord: rank 0: ...". Each line goes out in one write."""
    from concord.trainer import failures

    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.delenv(failures.ERROR_DIR_ENV, raising=False)
    failures.report(FileNotFoundError("runs/x/eval: no such file or directory"), rank=1, world_size=2)
    assert writes == ["concord: rank 1: FileNotFoundError: runs/x/eval: no such file or directory\n"]
