"""MMoE and PLE bottoms: the boundary sits at the per-task gates, so every task-specific gradient
reaches the shared experts, the embeddings and the dense bottom only through the balancer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from concord.balancing import build_balancer
from test_model import batch_for
from concord.trainer.config import load_config
from concord.trainer.model import build_model

BOTTOMS = {
    "shared": [],
    "mmoe": ["model.experts.type=mmoe", "model.experts.num_shared=3", "model.experts.layers=[12, 8]"],
    "ple": ["model.experts.type=ple", "model.experts.num_shared=2", "model.experts.num_task=2", "model.experts.layers=[8]"],
    "ple-3-levels": ["model.experts.type=ple", "model.experts.levels=3", "model.experts.layers=[8]", "model.shared=[]"],
}


def model_and_batch(overrides, seed=0):
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(seed)
    model = build_model(cfg, "cpu").double()
    batch = batch_for(cfg, 12)
    batch = dataclasses.replace(batch, dense=batch.dense.double(), labels=batch.labels.double(), weights=batch.weights.double())
    return cfg, model, batch


def shared_gradients(model, backward):
    """Gradients of everything before the boundary (tables, dense bottom, shared experts) after ``backward``."""
    model.zero_grad()
    backward()
    params = list(model.ebc.parameters()) + list(model.bottom.parameters())
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("bottom", list(BOTTOMS))
def test_only_the_balanced_gradient_reaches_the_shared_part(bottom):
    """With weights (1, 0, 0) the shared part gets exactly the gradient of task 1's loss alone: no
    gate or task expert of the other tasks leaks a gradient past the boundary."""
    cfg, model, batch = model_and_batch(BOTTOMS[bottom])
    model.boundary.balancer = build_balancer("fixed", cfg.task_names, weights=[1.0, 0.0, 0.0])
    balanced = shared_gradients(model, lambda: model(batch).objective.backward())
    model.boundary.enabled = False
    alone = shared_gradients(model, lambda: model(batch).losses[0].backward())
    assert any(g.abs().sum() > 0 for g in alone)
    for got, want in zip(balanced, alone):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bottom", list(BOTTOMS))
def test_equal_weights_give_the_gradient_of_the_mean_loss(bottom):
    cfg, model, batch = model_and_batch(BOTTOMS[bottom])
    balanced = shared_gradients(model, lambda: model(batch).objective.backward())
    model.boundary.enabled = False
    plain = shared_gradients(model, lambda: model(batch).losses.mean().backward())
    for got, want in zip(balanced, plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_ple_task_towers_read_only_their_own_slice_above_the_first_level():
    """Above one level each task's gate input is its own output of the level below: changing task
    2's slice of z moves task 2's tower input and leaves task 1's untouched."""
    _, model, batch = model_and_batch(BOTTOMS["ple-3-levels"])
    inputs = model.heads.task_inputs
    z = torch.randn(4, 3 * 8 + 4 * 8, dtype=torch.float64)
    moved = z.clone()
    moved[:, 8:16] += 1.0  # task 2's slice
    assert torch.equal(inputs[0](z), inputs[0](moved))
    assert not torch.allclose(inputs[1](z), inputs[1](moved))
