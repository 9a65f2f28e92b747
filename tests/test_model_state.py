"""The balancer's state travels with ``model.state_dict()``: a plain-PyTorch model saved and restored
with ``torch.save`` takes exactly the same next step as the model that was never saved."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from concord.balancing import RepresentationBoundary, build_balancer
from mtl_helpers import ToyMTL, toy_batch

SCALES = [1.0, 30.0, 0.1]  # task losses of very different sizes, so the balancers' state matters


class ToyWithBoundary(torch.nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.toy = ToyMTL(3)
        self.boundary = RepresentationBoundary(build_balancer(method, ["a", "b", "c"]))

    def loss(self, x, y) -> torch.Tensor:
        views = self.boundary(self.toy.bottom(x))
        return self.boundary.objective(self.toy.losses(views, y, SCALES))


def _train(model: ToyWithBoundary, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for s in range(steps):
        x, y = toy_batch(32, 3, seed=seed + s)
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()


@pytest.mark.parametrize("method", ["multibalance", "emtl", "dbmtl", "gradvac", "pcgrad", "uncertainty"])
def test_saved_model_takes_the_same_next_step(method):
    model = ToyWithBoundary(method)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _train(model, opt, 5, seed=10)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = ToyWithBoundary(method)
    restored.load_state_dict(saved["model"])
    restored_opt = torch.optim.SGD(restored.parameters(), lr=1e-3)
    restored_opt.load_state_dict(saved["opt"])
    assert restored.boundary.balancer.step == model.boundary.balancer.step == 5

    _train(model, opt, 3, seed=100)
    _train(restored, restored_opt, 3, seed=100)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert model.boundary.telemetry()["weights"] == restored.boundary.telemetry()["weights"]


def test_state_dict_without_balancer_state_is_refused():
    model = ToyWithBoundary("multibalance")
    state = model.state_dict()
    del state["boundary._extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        ToyWithBoundary("multibalance").load_state_dict(state)


def test_learned_balancer_parameters_are_the_models_and_move_with_it():
    model = ToyWithBoundary("uncertainty")
    log_vars = model.boundary.balancer.log_vars
    assert any(p is log_vars for p in model.parameters())  # the model's optimizer trains them
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, 2, seed=3)
    assert not torch.equal(log_vars.detach(), torch.zeros(3))
    model.to(torch.float64)  # any .to() goes through the same in-place conversion as .to("cuda")
    assert model.boundary.balancer.log_vars is model.boundary.balancer_parameters[0]
    assert model.boundary.balancer.log_vars.dtype == torch.float64


def test_swapped_balancer_registers_its_parameters():
    model = ToyWithBoundary("equal")
    assert len(list(model.boundary.parameters())) == 0
    model.boundary.balancer = build_balancer("uncertainty", ["a", "b", "c"])
    assert [p is model.boundary.balancer.log_vars for p in model.boundary.parameters()] == [True]
    restored = copy.deepcopy(model)
    assert "boundary.balancer_parameters.0" in restored.state_dict()
