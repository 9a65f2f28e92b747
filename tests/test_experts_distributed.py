"""MMoE and PLE train on 2 gloo ranks with each of the three balancers; the ranks agree on the task
weights and on every dense parameter, and the model learns (multi-process)."""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_ranks
from concord.trainer.config import load_config
from concord.trainer.data.synth import generate

pytestmark = pytest.mark.multiprocess

BOTTOMS = {
    "mmoe": ["model.experts.type=mmoe", "model.experts.num_shared=3", "model.experts.layers=[16]"],
    "ple": ["model.experts.type=ple", "model.experts.levels=2", "model.experts.num_shared=2", "model.experts.layers=[16]"],
}
BALANCERS = ["multibalance", "emtl", "cograd"]


def _train_each(rank: int, world_size: int, data: str, runs: str):
    from concord.trainer.runtime import init_runtime
    from concord.trainer.train import Trainer

    results = {}
    for bottom, overrides in BOTTOMS.items():
        for balancer in BALANCERS:
            cfg = load_config("configs/tiny.yaml", [
                f"data.train={data}/train", f"data.eval={data}/eval", f"train.run_dir={runs}/{bottom}-{balancer}",
                f"balancer.name={balancer}", "train.checkpoint_final=false", "train.epochs=2",
                "train.dense_optimizer.lr=0.01", *overrides,
            ])
            trainer = Trainer.build(cfg, init_runtime("cpu"))
            before = trainer.evaluate(0)
            summary = trainer.fit()
            results[(bottom, balancer)] = {
                "before": before,
                "eval": summary["eval"],
                "weights": trainer.model.boundary.telemetry()["weights"],
                "dense": [p.detach().clone() for p in trainer.model.bottom.experts.parameters()]
                + [p.detach().clone() for p in trainer.model.heads.parameters()],
            }
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    cfg = load_config("configs/tiny.yaml", [f"data.train={data}/train", f"data.eval={data}/eval"])
    generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, show_progress=False)
    return run_ranks(_train_each, 2, str(data), str(tmp_path_factory.mktemp("runs")))


@pytest.mark.parametrize("bottom", list(BOTTOMS))
@pytest.mark.parametrize("balancer", BALANCERS)
def test_experts_train_with_the_balancer_identically_on_both_ranks(runs, bottom, balancer):
    first, second = (r[(bottom, balancer)] for r in runs)
    assert first["weights"] == second["weights"]
    for a, b in zip(first["dense"], second["dense"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # On the tiny data 64 steps teach the regression task clearly (the binary ones barely move).
    assert first["eval"]["watch"]["mse"] < 0.5 * first["before"]["watch"]["mse"], (first["before"], first["eval"])
    assert all(math.isfinite(v) for task in first["eval"].values() for v in task.values())
