"""The sharded model (2 gloo ranks) against the same model unsharded in one process, on the same
global batches: same forward output and the same parameter updates (SGD, so an update is exactly
``-lr * gradient``). With the ``equal`` balancer the shared parameters, embedding tables included,
must follow the gradient of the mean of the task losses; each head its own task loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed import run_ranks
from sharded_helpers import global_batches, initial_state, sharded_sgd_run
from concord.trainer.config import load_config
from concord.trainer.model import build_model
from concord.trainer.data.layout import dataset_ready
from concord.trainer.data.synth import generate

pytestmark = pytest.mark.multiprocess

LR = 0.05


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    cfg = load_config("configs/tiny.yaml", [f"data.train={data}/train", f"data.eval={data}/eval"])
    if not dataset_ready(cfg.data.train):
        generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, show_progress=False)
    return cfg


def unsharded_reference(cfg, state, batches):
    """Plain model, no DMP, no boundary semantics: grads of mean_k L_k for shared parameters and of
    L_k for head k, applied by hand as SGD steps. Returns the first logits and the final parameters."""
    model = build_model(cfg, "cpu")
    model.load_state_dict(state)
    num_tasks = len(cfg.tasks)
    first = None
    for batch in batches:
        pooled = model.ebc(batch.sparse).values()
        z = model.bottom(batch.dense, pooled)
        losses, logits = model.heads([z] * num_tasks, batch.labels, batch.weights, batch.labelled)
        first = logits.detach().clone() if first is None else first
        model.zero_grad()
        losses.mean().backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                # d(mean_k L_k)/d(head_k) = dL_k/d(head_k) / T: heads get their raw task gradient.
                factor = num_tasks if name.startswith("heads.") else 1.0
                p -= LR * factor * p.grad
    return first, {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}  # not the balancer state


def weighted_and_partly_labelled(batches):
    """The batches with sample weights in [0.2, 3) and about a third of the labels missing: the ranks'
    rows then differ in total weight and in labelled rows per task."""
    g = torch.Generator().manual_seed(7)
    return [dataclasses.replace(b, weights=0.2 + 2.8 * torch.rand(b.batch_size, generator=g),
                                labelled=torch.rand(b.labels.shape, generator=g) > 0.35) for b in batches]


@pytest.mark.parametrize("sharding, rows", [("table_wise", "plain"), ("column_wise", "plain"), ("data_parallel", "plain"),
                                            ("table_wise", "weighted_and_partly_labelled")])
def test_sharded_equals_unsharded(cfg, sharding, rows):
    batches = global_batches(cfg, count=3, rows=2 * cfg.data.batch_size)
    if rows == "weighted_and_partly_labelled":
        batches = weighted_and_partly_labelled(batches)
    state = initial_state(cfg)
    ref_logits, ref_params = unsharded_reference(cfg, state, batches)
    ranks = run_ranks(sharded_sgd_run, 2, cfg, state, batches, sharding, LR)
    torch.testing.assert_close(torch.cat([ranks[0][0], ranks[1][0]]), ref_logits, rtol=1e-5, atol=1e-6)
    checked_tables = set()
    for _, params in ranks:
        for key, value in params.items():
            if isinstance(key, tuple):  # a table shard
                table, r, c = key
                full = ref_params[f"ebc.embedding_bags.{table}.weight"]
                expected = full[r : r + value.shape[0], c : c + value.shape[1]]
                checked_tables.add(table)
            else:  # dense parameters, and data-parallel tables (replicated)
                expected = ref_params[key]
                if "embedding_bags" in key:
                    checked_tables.add(key.split(".")[-2])
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert checked_tables == {t.name for t in cfg.model.tables}
    # The run must have moved every table, or the comparison above proves nothing.
    for t in cfg.model.tables:
        key = f"ebc.embedding_bags.{t.name}.weight"
        assert (ref_params[key] - state[key]).abs().max() > 1e-4


def test_the_planner_sees_each_ranks_share_of_the_host_and_the_gpus_memory(monkeypatch):
    """Not TorchRec's defaults (128 GiB of host memory a rank, a stock HBM size), which plan tables that
    cannot be allocated; on a GPU the device's own memory (TorchRec's topology config is frozen: every
    figure goes in when it is made)."""
    from types import SimpleNamespace

    from concord.embeddings import sharding

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(sharding, "host_memory_bytes", lambda: 64 * 2**30)
    cpu = sharding.planner_topology(8, torch.device("cpu"))
    assert [d.storage.ddr for d in cpu.devices] == [16 * 2**30] * 8 and cpu.local_world_size == 4
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    gpu = sharding.planner_topology(8, torch.device("cuda", 0))
    assert [(d.storage.hbm, d.storage.ddr) for d in gpu.devices] == [(80 * 2**30, 16 * 2**30)] * 8
    monkeypatch.undo()
    import os

    assert 0 < sharding.host_memory_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
