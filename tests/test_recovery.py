"""Nothing lost, no one surprised: the run directory's owner and runs, checkpoint integrity, resume
compatibility, corrupt data pages, signals and orphans."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from concord.trainer.checkpoint import CheckpointError, Checkpointer, verify
from concord.trainer.config import ConfigError, load_config
from concord.trainer.data.reader import Columns, DataError, ParquetReader, columns_from_config
from concord.trainer.fingerprint import ResumeError, check_resumable, differences, fingerprint, mismatch_message
from concord.trainer.observe.runlog import RunLog, read_records
from concord.trainer.rundir import RunDirError, RunDirLock, read_run, start_run
from distributed import run_ranks
from processes import alive, workers
from tiny_data import tiny_data

ROOT = Path(__file__).resolve().parents[1]


# --- the run directory ------------------------------------------------------------------------------------
def _hold_lock(run_dir, ready, release):
    lock = RunDirLock(Path(run_dir))
    lock.acquire()
    ready.set()
    release.wait(30)


def test_a_run_directory_has_one_owner_and_a_dead_owner_does_not_block(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another job \(pid {holder.pid} on "):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # dies holding the lock, as a crashed job would
        holder.join()
    lock = RunDirLock(tmp_path)
    lock.acquire()  # the kernel released the dead job's lock
    lock.release()


def test_a_fresh_start_says_how_much_the_earlier_runs_kept_take(tmp_path, caplog):
    # Each fresh start keeps the run before it, checkpoints included: the disk they hold is named.
    for _ in range(2):
        start_run(tmp_path, resume=False)
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "shard").write_bytes(bytes(3 << 20))
    with caplog.at_level(logging.WARNING, logger="concord.rundir"):
        start_run(tmp_path, resume=False)
    assert len(list(tmp_path.glob("previous-*"))) == 2
    assert "the 2 earlier run(s) kept in" in caplog.text and "take 6.0 MiB (remove those" in caplog.text


def test_a_fresh_start_moves_the_old_run_aside_and_logs_carry_the_run_id(tmp_path):
    first = start_run(tmp_path, resume=True)
    log = RunLog(tmp_path, first)
    log.write({"kind": "train", "step": 1, "loss": 1.0}, 1)
    log.close()
    (tmp_path / "checkpoints").mkdir()
    assert start_run(tmp_path, resume=True) == first  # resuming keeps the run
    second = start_run(tmp_path, resume=False)
    assert second != first and read_run(tmp_path)["run_id"] == second
    aside = tmp_path / f"previous-{first}"
    assert (aside / "metrics.jsonl").is_file() and (aside / "checkpoints").is_dir()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    log = RunLog(tmp_path, second)
    log.write({"kind": "train", "step": 1, "loss": 2.0}, 1)
    log.close()
    records = read_records(tmp_path)
    assert [r["loss"] for r in records] == [2.0] and all(r["run_id"] == second for r in records)


def test_records_of_another_run_in_the_same_log_are_not_read(tmp_path):
    run_id = start_run(tmp_path, resume=True)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "step": 1, "run_id": "someone-else"}) + "\n")
        f.write(json.dumps({"kind": "train", "step": 1, "run_id": run_id}) + "\n")
    assert [r["run_id"] for r in read_records(tmp_path)] == [run_id]


# --- checkpoint integrity ---------------------------------------------------------------------------------
def _three_checkpoints(root):
    ck = Checkpointer(root, keep=3)
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((1000,), float(step))}, {"fingerprint": {"seed": 0}})
    return ck


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "deleted shard", "truncated metadata", "missing metadata"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage, caplog):
    ck = _three_checkpoints(tmp_path)
    newest = ck.complete()[-1]
    shard = next(newest.glob("*.distcp"))
    if damage == "flipped":
        _flip_a_byte(shard)
    elif damage == "deleted shard":
        shard.unlink()
    elif damage == "truncated metadata":
        (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:10])
    else:
        (newest / ".metadata").unlink()
    assert verify(newest) is not None
    with caplog.at_level("WARNING"):
        assert ck.latest().name == "step-00000002"
    assert "step-00000003" in caplog.text  # reported, not silently skipped
    state = {"w": torch.zeros(1000)}
    Checkpointer.load(ck.latest(), state)
    assert torch.equal(state["w"], torch.full((1000,), 2.0))
    assert ck.info(ck.latest()) == {"fingerprint": {"seed": 0}, "step": 2}


def test_a_checkpoints_files_are_dealt_to_the_ranks_by_size_each_once():
    from concord.trainer.checkpoint import _shares

    files = {".metadata": [5, 0], "__0_0.distcp": [100, 0], "__1_0.distcp": [90, 0], "__2_0.distcp": [10, 0]}
    assert _shares(files, 2) == [[".metadata", "__0_0.distcp"], ["__1_0.distcp", "__2_0.distcp"]]
    # Each rank its own data file (in its page cache after a save), whatever the sizes; the rest by size.
    files = {".metadata": [1, 0], "__0_0.distcp": [10, 0], "__1_0.distcp": [100, 0], "__2_0.distcp": [100, 0]}
    assert _shares(files, 3) == [[".metadata", "__0_0.distcp"], ["__1_0.distcp"], ["__2_0.distcp"]]
    sizes = {f"__{i}_0.distcp": [(i * 37) % 101 + 1, 0] for i in range(40)}
    for readers in (1, 3, 8, 64):  # more readers than files: some read none
        shares = _shares(sizes, readers)
        assert sorted(n for share in shares for n in share) == sorted(sizes)
        loads = [sum(sizes[n][0] for n in share) for share in shares]
        assert max(loads) <= sum(v[0] for v in sizes.values()) / readers + max(v[0] for v in sizes.values())


def _check_together(rank, world_size, root):
    import torch.distributed as dist

    from concord.trainer import checkpoint

    dist.init_process_group("gloo")
    ck = Checkpointer(root, keep=3)
    read, crc32 = [], checkpoint._crc32
    checkpoint._crc32 = lambda path: read.append(path.name) or crc32(path)
    for step in (1, 2):  # each rank writes its own file of the (sharded) tensor
        ck.save(step, {"w": torch.full((1000,), float(step)).chunk(world_size)[rank].clone()})
    save_reads = sorted(read)
    read.clear()
    assert ck.latest().name == "step-00000002"  # the checksums the ranks gathered are the files'
    intact_reads = sorted(read)
    dist.barrier()
    newest = ck.complete()[-1]
    damaged = checkpoint._shares(json.loads((newest / "concord.json").read_text())["files"], world_size)[1][0]
    if rank == 0:
        _flip_a_byte(newest / damaged)  # a file rank 1 reads
    dist.barrier()
    chosen = ck.latest().name
    problem = checkpoint.verify_together(newest)
    dist.destroy_process_group()
    return intact_reads, chosen, problem, damaged, save_reads


@pytest.mark.multiprocess
def test_ranks_checksum_and_check_a_checkpoint_together_each_reading_a_share_of_its_files(tmp_path):
    """On 2 ranks each file of a checkpoint is read by one rank only, to record its checksum and to
    check it; a file damaged in one rank's share makes every rank pass the checkpoint over, that rank
    naming the file."""
    results = run_ranks(_check_together, 2, str(tmp_path))
    files = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for reads in ([r[0] for r in results], [r[4] for r in results]):
        assert sorted(reads[0] + reads[1]) == sorted(files * (len(reads[0] + reads[1]) // 3))
        assert reads[0] and reads[1] and not set(reads[0]) & set(reads[1])
    assert [r[1] for r in results] == ["step-00000001", "step-00000001"]
    assert [r[2] for r in results] == ["a file failed its check on another rank (that rank's log names it)",
                                       f"{results[1][3]} does not match its checksum"]


def test_no_intact_checkpoint_is_an_error_that_says_what_to_do(tmp_path):
    ck = _three_checkpoints(tmp_path)
    for path in ck.complete():
        _flip_a_byte(next(path.glob("*.distcp")))
    with pytest.raises(CheckpointError, match="no intact checkpoint .* train.resume=false starts afresh"):
        ck.latest()


def test_a_resume_mismatch_names_the_keys_and_the_ways_out():
    saved = {"batch_size": 64, "world_size": 2, "seed": 0, "balancer": {"name": "equal"}}
    now = {"batch_size": 128, "world_size": 2, "seed": 1, "balancer": {"name": "emtl"}}
    keys = differences(saved, now)
    assert keys == ["balancer", "batch_size", "seed"]
    message = mismatch_message("ck", keys, saved, now, [])
    assert "batch_size: 64 -> 128" in message and "seed: 0 -> 1" in message and "train.resume=false" in message
    assert "only balancer, batch_size may differ with train.allow_changes=[balancer,batch_size]" in message
    assert "balancer.name: equal -> emtl" in message
    keys = differences({**saved, "seed": 1}, now)  # every change a safe one: the way out says what each does
    message = mismatch_message("ck", keys, {**saved, "seed": 1}, now, [])
    assert ("train.allow_changes=[balancer,batch_size] (the new balancer starts with fresh state on the trained model; "
            "the rows the checkpoint's epoch has not trained are read in batches of the new size)") in message

    # A change deep in a section is named down to the setting, not as two whole sections cut short.
    tables = [{"name": "t_user", "embedding_dim": 16, "num_embeddings": 100}, {"name": "t_item", "embedding_dim": 16, "num_embeddings": 50}]
    saved = {"model": {"tables": tables, "shared": [256]}}
    now = {"model": {"tables": [tables[0], {**tables[1], "embedding_dim": 8}], "shared": [256, 64]}}
    message = mismatch_message("ck", differences(saved, now), saved, now, [])
    assert "(model.shared: [256] -> [256, 64]; model.tables[1].embedding_dim: 16 -> 8)" in message
    saved, now = {"tasks": [["ctr", "binary", "click", [32]]]}, {"tasks": [["ctr", "binary", "click", [16]]]}
    assert "(tasks[0]: ['ctr', 'binary', 'click', [32]] -> ['ctr', 'binary', 'click', [16]])" in mismatch_message("ck", ["tasks"], saved, now, [])
    # A long list of values, whose two ends cut short would read the same, says what it gained and lost.
    columns = [f"credit_file_number_{i}" for i in range(6)]
    saved, now = {"data": {"dense_columns": columns}}, {"data": {"dense_columns": [*columns[:2], "never_delinquent", *columns[3:]]}}
    assert ("(data.dense_columns: adds 'never_delinquent'; drops 'credit_file_number_2')"
            in mismatch_message("ck", ["data"], saved, now, []))
    now = {"data": {"dense_columns": columns[::-1]}}
    assert "(data.dense_columns: the same 6 values in another order)" in mismatch_message("ck", ["data"], saved, now, [])


def test_a_resumed_run_names_the_settings_it_changed_that_the_fingerprint_allows():
    """Learning rates, the schedule, the precision are not in the fingerprint (a run may go on with a
    lower rate), so a resumed run took them on silently; it now names them, and only them: not how it
    was asked to resume, and nothing where the settings are the same."""
    from concord.trainer.config import to_dict
    from concord.trainer.fingerprint import settings_changed

    saved = json.loads(json.dumps(to_dict(load_config("configs/tiny.yaml"))))  # as concord.json holds it
    same = json.loads(json.dumps(to_dict(load_config("configs/tiny.yaml", ["train.resume=false", "train.allow_changes=[balancer]"]))))
    assert settings_changed(saved, same) == ""
    now = json.loads(json.dumps(to_dict(load_config("configs/tiny.yaml", ["train.dense_optimizer.lr=0.5", "train.precision=bf16",
                                                                             "train.lr_schedule.decay=cosine"]))))
    assert settings_changed(saved, now) == (f"train.dense_optimizer.lr: {saved['train']['dense_optimizer']['lr']} -> 0.5; "
                                            "train.lr_schedule.decay: constant -> cosine; train.precision: fp32 -> bf16")


def test_the_launcher_refuses_a_checkpoint_it_cannot_continue_from_its_record(tmp_path):
    data = tiny_data(tmp_path)
    setup = [*data, f"train.run_dir={tmp_path}/run"]
    cfg = load_config(ROOT / "configs/tiny.yaml", setup)
    rows = ParquetReader(cfg.data.train, columns_from_config(cfg), cfg.data.batch_size).total_rows  # as a rank counts them
    step = tmp_path / "run/checkpoints/step-00000008"
    step.mkdir(parents=True)
    (step / "concord.json").write_text(json.dumps({"fingerprint": fingerprint(cfg, cfg.world_size, rows)}))

    check_resumable(cfg)  # the same setup continues: the launcher counts the rows as the ranks do
    with pytest.raises(ResumeError, match=rf"{step} was written by a different setup \(batch_size: 64 -> 32\)"):
        check_resumable(load_config(ROOT / "configs/tiny.yaml", [*setup, "data.batch_size=32"]))
    with pytest.raises(ResumeError, match=r"balancer.name: equal -> emtl\).*train.allow_changes=\[balancer\]"):
        check_resumable(load_config(ROOT / "configs/tiny.yaml", [*setup, "balancer.name=emtl"]))
    check_resumable(load_config(ROOT / "configs/tiny.yaml", [*setup, "balancer.name=emtl", "train.allow_changes=[balancer]"]))
    check_resumable(load_config(ROOT / "configs/tiny.yaml", [*setup, "data.batch_size=32", "train.resume=false"]))

    # A record written before a model setting existed reads it at its default: an upgrade alone resumes,
    # and a value other than the default is still named.
    record = fingerprint(cfg, cfg.world_size, rows)
    del record["model"]["tables"][0]["pooling"], record["model"]["experts"], record["balancer"]["statistics_every"]
    (step / "concord.json").write_text(json.dumps({"fingerprint": record}))
    check_resumable(cfg)
    with pytest.raises(ResumeError, match=r"different setup \(model\.tables\[0\]\.pooling: sum -> mean\)"):
        check_resumable(load_config(ROOT / "configs/tiny.yaml", [*setup, "model.tables[0].pooling=mean"]))
    (step / "concord.json").write_text(json.dumps({"fingerprint": fingerprint(cfg, cfg.world_size, rows)}))

    # A new run directory starting from this run's checkpoint is checked against it too.
    elsewhere = [*data, f"train.run_dir={tmp_path}/other", f"train.resume_from={tmp_path}/run"]
    check_resumable(load_config(ROOT / "configs/tiny.yaml", elsewhere))
    with pytest.raises(ResumeError, match="batch_size: 64 -> 32"):
        check_resumable(load_config(ROOT / "configs/tiny.yaml", [*elsewhere, "data.batch_size=32"]))


# --- data integrity ---------------------------------------------------------------------------------------
def test_a_corrupt_data_page_is_named_by_file_row_group_and_column(tmp_path):
    from concord.trainer.config import load_config as _load
    from concord.trainer.data.synth import generate

    cfg = _load(ROOT / "configs/tiny.yaml", [f"data.train={tmp_path}/train", f"data.eval={tmp_path}/eval"])
    generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, show_progress=False)
    path = next((tmp_path / "train").glob("*.parquet"))
    meta = pq.ParquetFile(path).metadata.row_group(1)
    column = next(i for i in range(meta.num_columns) if meta.column(i).path_in_schema == "dense_2")
    chunk = meta.column(column)
    data = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + chunk.total_compressed_size - 8] ^= 0xFF  # in the chunk's last page, past its header
    path.write_bytes(bytes(data))
    cols = Columns(dense=tuple(f"dense_{j}" for j in range(4)), sparse=(), labels=("label_ctr",))
    with pytest.raises(DataError, match=rf"{path.name}: row group 1: column 'dense_2': cannot be read .*(CRC|checksum)"):
        list(ParquetReader(str(path), cols, 64))


# --- config ---------------------------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused_and_1e6_is_a_number(tmp_path):
    text = (ROOT / "configs/tiny.yaml").read_text()
    dup = tmp_path / "dup.yaml"
    dup.write_text(text + "\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: not valid YAML: key 'train' appears twice"):
        load_config(dup)
    assert load_config(ROOT / "configs/tiny.yaml", ["train.dense_optimizer.lr=1e-3"]).train.dense_optimizer.lr == 1e-3


# --- processes: signals, orphans, resume ------------------------------------------------------------------
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _start_long_job(tmp_path, run_dir):
    data = tiny_data(tmp_path)
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", *data,
           f"train.run_dir={run_dir}", "train.epochs=1000", "train.log_every=1", "train.progress=false"]
    out = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    log = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if log.exists() and sum('"kind": "train"' in l for l in log.read_text().splitlines()) >= 15:
            break
        assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.2)
    ranks = workers(proc.pid)
    assert len(ranks) == 2
    return proc, ranks


@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_stops_every_worker_after_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc, ranks = _start_long_job(tmp_path, run_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not any(alive(pid) for pid in ranks)
    stopped = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"stopped"' in l]
    assert stopped and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert Checkpointer(run_dir / "checkpoints").latest().name == f"step-{step:08d}"  # preemption: saved there
    # TensorBoard's scalars reach the last step logged (its writer holds up to two minutes of them).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = max(json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in l)
    (events,) = (run_dir / "tb").iterdir()
    board = EventAccumulator(str(events))
    board.Reload()
    assert max(e.step for e in board.Scalars("loss/ctr")) == logged


@pytest.mark.multiprocess
def test_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_evaluates_there_first(tmp_path):
    """A preemption's grace period is shorter than a long evaluation: SIGTERM stops the evaluation of
    step 20 (no record of it), the checkpoint of step 20 says that it is owed, and the run resumed
    there evaluates before its next step; SIGTERM in the final evaluation stops it after the last
    checkpoint, which the same command then evaluates."""
    data = tiny_data(tmp_path, "data.synthetic.eval_rows=200000")  # an evaluation of seconds
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={run_dir}",
           "train.log_every=1", "train.eval_every=20", "train.max_steps=21"]
    records = lambda: [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def stopped_once(ready):
        """The job started afresh and sent SIGTERM once ``ready()``; its records from its start."""
        before = len(records()) if (run_dir / "metrics.jsonl").exists() else 0
        out = open(tmp_path / "job.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while not ((run_dir / "metrics.jsonl").exists() and ready(records()[before:])):
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "job.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return [(r["kind"], r["step"]) for r in records()[before:] if "step" in r]

    logged = lambda step: lambda new: ("train", step) in [(r["kind"], r.get("step")) for r in new]
    # Step 20 is logged before its evaluation starts.
    assert stopped_once(logged(20))[-2:] == [("train", 20), ("stopped", 20)]
    assert json.loads((run_dir / "checkpoints/step-00000020/concord.json").read_text())["evaluation_owed"] is True
    # The last checkpoint is written before the final evaluation starts.
    final = lambda new: logged(21)(new) and (run_dir / "checkpoints/step-00000021").is_dir()
    assert stopped_once(final) == [("resume", 20), ("eval", 20), ("train", 21), ("stopped", 21)]
    assert "evaluation_owed" not in json.loads((run_dir / "checkpoints/step-00000021/concord.json").read_text())

    relaunched = _concord(*cmd[3:])
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert "already holds this run's last checkpoint (step 21 of 21): evaluating it without training" in relaunched.stdout
    assert [(r["kind"], r["step"]) for r in records()[-3:]] == [("resume", 21), ("eval", 21), ("summary", 21)]


@pytest.mark.multiprocess
def test_no_worker_outlives_a_killed_launcher(tmp_path):
    proc, ranks = _start_long_job(tmp_path, tmp_path / "run")  # the launcher runs torchrun's agent
    try:
        proc.kill()
        deadline = time.time() + 60
        while time.time() < deadline and any(alive(pid) for pid in ranks):
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ranks)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _concord(*args):
    return subprocess.run([sys.executable, "-m", "concord.trainer.cli", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.multiprocess
def test_resume_refuses_another_batch_size_and_allows_another_balancer_world_size_or_batch_size_when_asked(tmp_path):
    data = tiny_data(tmp_path)
    run = [f"train.run_dir={tmp_path}/run", "train.max_steps=8"]
    assert _concord("train", "--config", "configs/tiny.yaml", *data, *run).returncode == 0
    bigger = _concord("train", "--config", "configs/tiny.yaml", *data, *run, "train.max_steps=12", "data.batch_size=32")
    assert bigger.returncode == 3
    # One line from the launcher, before any rank started to build the model only to refuse it.
    assert bigger.stderr.strip().splitlines() == [bigger.stderr.strip()], bigger.stderr[-2000:]
    assert bigger.stderr.startswith("concord: ResumeError: ") and "batch_size: 64 -> 32" in bigger.stderr and "train.resume=false" in bigger.stderr
    other = _concord("train", "--config", "configs/tiny.yaml", *data, *run, "train.max_steps=12",
                     "balancer.name=multibalance", "train.allow_changes=[balancer]")
    assert other.returncode == 0, other.stderr[-2000:]
    assert "resumed from" in other.stdout and "at step 8" in other.stdout
    # What the fingerprint lets change is said, not taken on silently.
    assert "with settings other than that checkpoint's: balancer.name: equal -> multibalance; train.max_steps: 8 -> 12\n" in other.stdout
    # On one rank of 32 rows, when asked: the 2 x (32 - 12) batches of 64 rows epoch 0 has left are
    # shared out anew, and the run ends with the epoch.
    fewer = _concord("train", "--config", "configs/tiny.yaml", *data, *run, "train.max_steps=200", "dist.nproc_per_node=1",
                     "data.batch_size=32", "balancer.name=multibalance", "train.allow_changes=[world_size,batch_size]")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert ("resumed from" in fewer.stdout and "at step 12" in fewer.stdout and "epoch 0 goes on with its 2560 rows not "
            "yet trained, shared out in 80 steps x 32 rows x 1 rank (0 left out") in fewer.stdout, fewer.stdout
    assert json.loads((tmp_path / "run/summary.json").read_text())["step"] == 12 + 80
    # The learning-rate schedule's course: where only the last step changed, the config's (the decay from
    # the warm-up's end); on other ranks, on from the progress the checkpoint's had made (all, at its end).
    lr = lambda step: json.loads((tmp_path / f"run/checkpoints/step-{step:08d}/concord.json").read_text())["lr"]
    assert lr(12) == {"last_step": 12, "decay_from": [0, 0.0]} and lr(92) == {"last_step": 92, "decay_from": [12, 1.0]}


@pytest.mark.multiprocess
def test_bad_data_on_rank_one_is_the_launchers_last_line(tmp_path):
    data = tiny_data(tmp_path)
    table = pq.read_table(next((tmp_path / "data/train").glob("*.parquet")))
    ids = table["user"].to_pylist()
    ids[-1] = [10**9]  # the last row: in rank 1's range, read after training started
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("user"), "user", pa.array(ids, pa.list_(pa.int64()))),
                   bad / "part-00000.parquet", row_group_size=512)
    proc = _concord("train", "--config", "configs/tiny.yaml", f"data.train={bad}", data[1],
                    f"train.run_dir={tmp_path}/run", "data.shuffle=false")
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("concord: failed: rank 1: DataError: ") and "id 1000000000 outside the table's range" in last
    # torchrun's own report of the failed worker (its traceback, a table of ranks) is left out: the
    # worker named the cause in one line.
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr and "Root Cause" not in proc.stderr
    assert "failed (exitcode" not in proc.stderr and "closing signal" not in proc.stderr  # the agent's notes of it


@pytest.mark.multiprocess
def test_skipping_nonfinite_steps_has_a_limit(tmp_path):
    data = tiny_data(tmp_path)
    proc = _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={tmp_path}/run",
                    "train.on_nonfinite=skip", "train.max_skipped_steps=2", "train.dense_optimizer.lr=1e30")
    assert proc.returncode == 3
    assert "more than train.max_skipped_steps=2" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.multiprocess
def test_a_new_run_can_start_from_another_runs_checkpoint(tmp_path):
    data = tiny_data(tmp_path)
    assert _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={tmp_path}/a",
                    "train.max_steps=8").returncode == 0
    proc = _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={tmp_path}/b",
                    "train.max_steps=12", f"train.resume_from={tmp_path}/a")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {tmp_path}/a/checkpoints/step-00000008 at step 8" in proc.stdout
    assert (tmp_path / "b/checkpoints/step-00000012").is_dir() and not (tmp_path / "a/checkpoints/step-00000012").exists()
    # Refused by the launcher in one line, before any rank builds the model: a source that holds no
    # checkpoint, and one written by another setup, whose way out is not a fresh start of this directory.
    proc = _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={tmp_path}/c", f"train.resume_from={tmp_path}/x")
    assert proc.returncode == 3 and proc.stderr == (
        f"concord: ResumeError: train.resume_from: {tmp_path}/x holds no checkpoint (neither a run directory nor a step-… directory)\n")
    proc = _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={tmp_path}/c", f"train.resume_from={tmp_path}/a",
                    "balancer.name=emtl")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert ("(balancer.name: equal -> emtl); to go on: no train.resume_from (a fresh start) or train.allow_changes=[balancer]"
            in proc.stderr)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["full", "read-only"])
def test_a_full_or_read_only_disk_ends_with_one_line(tmp_path, case):
    data = tiny_data(tmp_path)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "128k"):  # room for the logs, not for a checkpoint (~250 KB)
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        if case == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = _concord("train", "--config", "configs/tiny.yaml", *data, f"train.run_dir={disk}/run")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    expected = "is full" if case == "full" else "Read-only file system"
    assert expected in last or "No space left on device" in last, last
