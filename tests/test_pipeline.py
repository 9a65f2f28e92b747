"""TorchRec's TrainPipelineSparseDist as Concord's training loop: it overlaps the next batches' input
distribution with the current step, and must not change what a step computes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.multiprocess


def _train_and_read_weights(rank, world_size, overrides):
    from concord.trainer.config import load_config
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    cfg = load_config("configs/tiny.yaml", overrides)
    trainer = Trainer.build(cfg, init_runtime("cpu"))
    summary = trainer.fit()
    weights = {}
    for key, value in trainer.dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                weights[(key, *shard.metadata.shard_offsets)] = shard.tensor.clone()
        elif isinstance(value, torch.Tensor):
            weights[key] = value.clone()
    return {"weights": weights, "eval": summary["eval"], "skipped": summary["skipped_steps"]}


@pytest.mark.parametrize("method", ["multibalance", "param_mgda"])
def test_the_sparse_dist_pipeline_takes_the_same_steps_as_the_plain_loop(tmp_path, method):
    """Same seed and data: the same weights on every rank, with an evaluation between steps (the
    pipeline hands the model back and takes it again) and a parameter-level method's own backward."""
    from distributed import run_ranks
    from tiny_data import tiny_data

    data = tiny_data(tmp_path)
    results = {}
    for pipeline in ("plain", "sparse_dist"):
        overrides = [*data, f"train.run_dir={tmp_path}/{pipeline}", "train.max_steps=12", "train.eval_every=5",
                     f"balancer.name={method}", f"train.pipeline={pipeline}", "train.progress=false"]
        results[pipeline] = run_ranks(_train_and_read_weights, 2, overrides)
    for plain, piped in zip(results["plain"], results["sparse_dist"]):
        assert plain["weights"].keys() == piped["weights"].keys()
        for key, value in plain["weights"].items():
            torch.testing.assert_close(piped["weights"][key], value, rtol=0, atol=0, msg=f"{key} differs")
        assert plain["eval"] == piped["eval"]


def test_a_step_dropped_for_a_nonfinite_loss_is_dropped_inside_the_pipeline_too(tmp_path):
    """``train.on_nonfinite=skip`` decides after TorchRec's backward hook: no update for that step."""
    from distributed import run_ranks
    from tiny_data import tiny_data

    data = tiny_data(tmp_path)
    results = {}
    for pipeline in ("plain", "sparse_dist"):
        # A learning rate large enough to drive the regression loss to inf within a few steps.
        overrides = [*data, f"train.run_dir={tmp_path}/{pipeline}", "train.max_steps=12", "train.on_nonfinite=skip",
                     "train.max_skipped_steps=12", "train.dense_optimizer.name=sgd", "train.dense_optimizer.lr=1e6",
                     f"train.pipeline={pipeline}", "train.progress=false", "data.eval=null"]
        results[pipeline] = run_ranks(_train_and_read_weights, 2, overrides)
    assert results["plain"][0]["skipped"] > 0
    for plain, piped in zip(results["plain"], results["sparse_dist"]):
        assert piped["skipped"] == plain["skipped"]
        for key, value in plain["weights"].items():
            torch.testing.assert_close(piped["weights"][key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} differs")
