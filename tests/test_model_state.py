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
    def __init__(self, method: str, tasks=("a", "b", "c")) -> None:
        super().__init__()
        self.toy = ToyMTL(3)
        self.boundary = RepresentationBoundary(build_balancer(method, list(tasks)))

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


@pytest.mark.parametrize("tasks", [("a", "c", "b"), ("x", "y", "z")])
def test_a_state_saved_for_other_tasks_or_another_order_is_refused(tasks):
    # Loaded, each task would take another's EMA norm and weight without a word.
    model = ToyWithBoundary("multibalance")
    _train(model, torch.optim.SGD(model.parameters(), lr=1e-3), 3, seed=0)
    other = ToyWithBoundary("multibalance", tasks)
    weights = other.boundary.balancer.weights.copy()
    with pytest.raises(ValueError, match=r"saved for tasks \['a', 'b', 'c'\], this boundary balances \['%s', '%s', '%s'\]" % tasks):
        other.load_state_dict(model.state_dict())
    assert (other.boundary.balancer.weights == weights).all() and other.boundary.balancer.step == 0


def test_a_state_saved_by_another_balancer_is_refused_naming_both():
    model = ToyWithBoundary("equal")
    with pytest.raises(ValueError, match="saved by balancer 'equal', this boundary runs 'fixed'.*_extra_state"):
        ToyWithBoundary("fixed").load_state_dict(model.state_dict())


def test_a_state_without_the_record_of_its_tasks_still_loads():
    # As written before the boundary kept the record, and as Concord's checkpoints hold it.
    model = ToyWithBoundary("multibalance")
    _train(model, torch.optim.SGD(model.parameters(), lr=1e-3), 3, seed=0)
    state = model.state_dict()
    for key in RepresentationBoundary.record_keys:
        del state["boundary._extra_state"][key]
    restored = ToyWithBoundary("multibalance")
    restored.load_state_dict(state)
    assert (restored.boundary.balancer.weights == model.boundary.balancer.weights).all() and restored.boundary.balancer.step == 3


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


def test_the_balancing_package_can_be_lifted_alone(tmp_path):
    """Copied into another code base under another name, ``balancing/`` imports and balances: it
    imports nothing from the rest of Concord."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "balancing", tmp_path / "their_balancing", ignore=shutil.ignore_patterns("__pycache__"))
    for path in (tmp_path / "their_balancing").glob("*.py"):
        code = [line for line in path.read_text().splitlines() if line.lstrip().startswith(("from ", "import "))]
        assert not [line for line in code if "concord" in line], path.name
    script = (
        "import sys, torch; import their_balancing as b\n"
        "assert not any(m == 'concord' or m.startswith('concord.') for m in sys.modules), 'concord was imported'\n"
        "boundary = b.RepresentationBoundary(b.build_balancer('multibalance', ['a', 'b']))\n"
        "z = torch.randn(4, 3, requires_grad=True); u, v = boundary(z)\n"
        "boundary.objective(torch.stack([u.sum(), (v * 2).pow(2).sum()])).backward(); print(z.grad.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([4, 3])" in out.stdout
