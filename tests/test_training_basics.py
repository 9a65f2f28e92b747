"""The training basics: the learning-rate schedule (dense and embedding optimizers), gradient clipping
and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from concord.trainer.config import ScheduleConfig
from concord.trainer.optimizers import LRSchedule


def _factors(total, **kw):
    schedule = LRSchedule(ScheduleConfig(**kw), total, [])
    return [schedule.factor(t) for t in range(total)]


def test_warmup_rises_linearly_then_the_rate_holds():
    f = _factors(10, warmup_steps=4)
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4:] == [1.0] * 6


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_ends_at_the_minimum_on_the_last_step(decay):
    f = _factors(20, warmup_steps=5, decay=decay, min_ratio=0.1)
    assert f[4] == 1.0 and f[5] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # never rises after the warm-up
    if decay == "cosine":
        mid = 5 + (20 - 5 - 1) / 2
        assert _factors(20, warmup_steps=5, decay="cosine")[int(mid)] == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 14)))


def test_the_schedule_sets_every_groups_rate():
    groups = [{"lr": 0.1}, {"lr": 0.05}]
    schedule = LRSchedule(ScheduleConfig(warmup_steps=2), 10, groups)
    schedule.apply(0)
    assert [g["lr"] for g in groups] == [0.05, 0.025]
    schedule.apply(5)
    assert [g["lr"] for g in groups] == [0.1, 0.05]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_a_run_resumed_on_steps_of_another_size_goes_on_with_the_rate_it_had(decay):
    """Resumed at step 40 of 100 on half the ranks (160 steps left), the rate goes on from the
    checkpoint's, falls without rising to the minimum on the new last step, and a later resume on the
    same ranks keeps that course; where only the config's last step changed, the config decides, as in
    a fresh run; a checkpoint without a record, or one still warming up, starts the decay afresh."""
    cfg = ScheduleConfig(warmup_steps=5, decay=decay, min_ratio=0.1)
    before = LRSchedule(cfg, 100, [])
    after = LRSchedule.resumed(cfg, 200, [], 40, before.record(), relaid=True)
    assert after.factor(40) == pytest.approx(before.factor(40))
    f = [after.factor(t) for t in range(40, 200)]
    assert all(a >= b for a, b in zip(f, f[1:])) and f[-1] == pytest.approx(0.1)
    again = LRSchedule.resumed(cfg, 200, [], 120, after.record(), relaid=False)
    assert [again.factor(t) for t in range(120, 200)] == f[80:]

    longer = LRSchedule.resumed(cfg, 150, [], 40, before.record(), relaid=False)
    assert [longer.factor(t) for t in range(150)] == _factors(150, warmup_steps=5, decay=decay, min_ratio=0.1)
    for fresh in (LRSchedule.resumed(cfg, 200, [], 40, None, relaid=True), LRSchedule.resumed(cfg, 200, [], 3, before.record(), relaid=True)):
        assert [fresh.factor(t) for t in range(200)] == _factors(200, warmup_steps=5, decay=decay, min_ratio=0.1)


def _one_rank_run(rank, world_size, overrides):
    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    cfg = load_config("configs/tiny.yaml", overrides)
    trainer = Trainer.build(cfg, init_runtime("cpu"))
    summary = trainer.fit()
    return {
        "dense_lr": [g["lr"] for g in trainer.dense_optimizer.param_groups],
        "table_lr": [g["lr"] for g in trainer.dmp.fused_optimizer.param_groups],
        "eval": summary["eval"],
    }


@pytest.mark.multiprocess
def test_the_tables_follow_the_schedule_and_bf16_with_clipping_trains(tmp_path):
    from distributed import run_ranks
    from tiny_data import tiny_data

    overrides = [*tiny_data(tmp_path), f"train.run_dir={tmp_path}/run", "train.max_steps=12", "dist.nproc_per_node=1",
                 "train.lr_schedule.decay=linear", "train.lr_schedule.min_ratio=0.25", "train.clip_grad_norm=0.5",
                 "train.precision=bf16", "train.progress=false"]
    (result,) = run_ranks(_one_rank_run, 1, overrides)
    # After the last of 12 steps the rates are the configured ones times min_ratio.
    assert result["dense_lr"] == [pytest.approx(0.001 * 0.25)] * len(result["dense_lr"])  # the default Adam rate
    assert all(lr == pytest.approx(0.05 * 0.25) for lr in result["table_lr"])
    assert all(math.isfinite(v) for task in result["eval"].values() for v in task.values())


def test_no_table_is_left_to_the_dense_optimizer_unless_its_config_asks_for_data_parallel():
    """The planner would replicate small tables (data_parallel), which TorchRec trains with the dense
    optimizer: only a table whose sharding_types list it may be planned so."""
    from types import SimpleNamespace

    from concord.embeddings.sharding import sharding_constraints

    tables = [SimpleNamespace(name="small", sharding_types=None), SimpleNamespace(name="mine", sharding_types=["data_parallel"])]
    for device in ("cpu", "cuda"):
        allowed = sharding_constraints(tables, torch.device(device))
        assert "data_parallel" not in allowed["small"].sharding_types and allowed["small"].sharding_types
        assert allowed["mine"].sharding_types == ["data_parallel"]


def _data_warnings(rank, world_size, overrides):
    import logging

    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("concord.train").addHandler(handler)
    Trainer.build(load_config("configs/tiny.yaml", overrides), init_runtime("cpu"))  # checks the data
    return [line for line in seen if "data.eval" in line]


@pytest.mark.multiprocess
def test_held_out_data_that_reads_training_files_is_named_before_the_first_step(tmp_path):
    from distributed import run_ranks
    from tiny_data import tiny_data

    base = [*tiny_data(tmp_path), f"train.run_dir={tmp_path}/run", "dist.nproc_per_node=1"]
    train = sorted(str(f) for f in (tmp_path / "data/train").glob("*.parquet"))
    # (Separate splits give no such line: tests/test_e2e.py, the training run evaluated each epoch.)
    shared = run_ranks(_data_warnings, 1, [*base, f"data.eval={train[0]}", "data.synthetic=null"])
    assert shared == [[f"data.eval reads 1 of data.train's files ({train[0]}): its figures are not held out"]]


def _optimizer_of_each_table(rank, world_size, overrides):
    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    trainer = Trainer.build(load_config("configs/tiny.yaml", overrides), init_runtime("cpu"))
    dense = [k for k in trainer.dense_optimizer.params if "embedding_bags" in k]
    return dense, len(trainer.dmp.fused_optimizer.param_groups)


@pytest.mark.multiprocess
def test_tiny_tables_are_trained_by_the_configured_embedding_optimizer(tmp_path):
    from distributed import run_ranks
    from tiny_data import tiny_data

    tables = [f"model.tables.{k}.num_embeddings=8" for k in range(3)]  # ids are hashed into them
    overrides = [*tiny_data(tmp_path), f"train.run_dir={tmp_path}/run", "dist.nproc_per_node=1", "data.on_bad_id=hash", *tables]
    ((dense, fused_groups),) = run_ranks(_optimizer_of_each_table, 1, overrides)
    assert dense == [] and fused_groups >= 1
