"""The unsharded model: shapes through both interaction types, and the boundary in the middle."""

from __future__ import annotations

import pytest
import torch

from concord.trainer.config import load_config
from concord.trainer.data.reader import Batch
from concord.trainer.model import build_model
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def batch_for(cfg, rows: int) -> Batch:
    keys = [f for t in cfg.model.tables for f in t.features]
    lengths = torch.ones(len(keys) * rows, dtype=torch.int32)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys, torch.zeros(len(keys) * rows, dtype=torch.int64), lengths)
    labels = torch.stack([torch.randint(0, 2, (rows,)).float(), torch.randint(0, 2, (rows,)).float(), torch.randn(rows)], 1)
    return Batch(torch.randn(rows, len(cfg.data.dense_columns)), sparse, labels, torch.ones(rows))


@pytest.mark.parametrize("overrides", [[], ["model.interaction.type=concat", "model.interaction.mlp=[24, 12]"]])
def test_forward_shapes_and_one_backward(overrides):
    cfg = load_config("configs/tiny.yaml", [*overrides, "balancer.statistics=current"])  # the step's own statistics
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    out = model(batch_for(cfg, 10))
    assert out.logits.shape == (10, 3) and out.losses.shape == (3,)
    out.objective.backward()
    assert model.bottom.shared._mlp[0]._linear.weight.grad is not None
    assert all(h.out.weight.grad is not None for h in model.heads.heads)
    stats = model.boundary.last_stats
    assert stats is not None and stats.active.all()


def test_the_trainer_lags_the_statistics_by_default_where_the_method_allows():
    modes = {}
    for name in ("multibalance", "cograd", "graddrop", "param_mgda"):
        boundary = build_model(load_config("configs/tiny.yaml", [f"balancer.name={name}"]), "cpu").boundary
        modes[name] = boundary.statistics
    assert modes == {"multibalance": "previous", "cograd": "previous", "graddrop": "current", "param_mgda": "current"}
    every = {name: build_model(load_config("configs/tiny.yaml", [f"balancer.name={name}"]), "cpu").boundary.statistics_every
             for name in ("multibalance", "emtl", "cograd", "equal")}
    assert every == {"multibalance": 10, "emtl": 10, "cograd": 10, "equal": 1}  # statistics_every: auto
    explicit = build_model(load_config("configs/tiny.yaml", ["balancer.name=multibalance", "balancer.statistics=current"]), "cpu")
    assert explicit.boundary.statistics == "current"
