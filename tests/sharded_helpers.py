"""A sharded Concord model on W gloo ranks next to the same model unsharded in one process."""

from __future__ import annotations

from typing import Dict, List

import torch
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from concord.embeddings.sharding import apply_fused_optimizer, shard_model
from concord.trainer.data.reader import Batch, ParquetReader, columns_from_config
from concord.trainer.model import build_model
from concord.trainer.runtime import init_runtime


def global_batches(cfg, count: int, rows: int) -> List[Batch]:
    it = iter(ParquetReader(cfg.data.train, columns_from_config(cfg), rows))
    return [next(it) for _ in range(count)]


def row_slice(batch: Batch, lo: int, hi: int) -> Batch:
    kjt = batch.sparse
    values, lengths = [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[lo] : offsets[hi]])
        lengths.append(jt.lengths()[lo:hi])
    sparse = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))
    labelled = batch.labelled[lo:hi] if batch.labelled is not None else None
    return Batch(batch.dense[lo:hi], sparse, batch.labels[lo:hi], batch.weights[lo:hi], labelled)


def initial_state(cfg, seed: int = 0) -> Dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_model(cfg, "cpu").state_dict()
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def table_name(key: str) -> str:
    return key.split(".")[-2]


def sharded_sgd_run(rank: int, world_size: int, cfg, state, batches, sharding: str, lr: float):
    """Trains with SGD (fused for the tables, plain for dense) on this rank's rows of each batch.

    Returns the first step's logits for these rows and every parameter after training: dense ones
    whole, table shards as {(table, row_offset, col_offset): tensor}.
    """
    rt = init_runtime("cpu")
    for t in cfg.model.tables:
        t.sharding_types = [sharding]
    cfg.model.embedding_optimizer.name, cfg.model.embedding_optimizer.lr = "sgd", lr
    model = build_model(cfg, "meta", process_group=rt.balancer_group)
    apply_fused_optimizer(model.ebc, cfg.model.embedding_optimizer, rt.device)
    dmp, _ = shard_model(model, cfg.model.tables, rt.device)
    load_full_tables(dmp, {table_name(k): v for k, v in state.items() if "embedding_bags" in k})
    dmp.load_state_dict({**dmp.state_dict(), **{k: v for k, v in state.items() if "embedding_bags" not in k}})
    dense = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=lr)
    first_logits = None
    for batch in batches:
        rows = batch.batch_size // world_size
        out = dmp(row_slice(batch, rank * rows, (rank + 1) * rows))
        first_logits = out.logits.detach().clone() if first_logits is None else first_logits
        dense.zero_grad()
        out.objective.backward()
        dense.step()
    params = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                r, c = shard.metadata.shard_offsets
                params[(table_name(key), r, c)] = shard.tensor.clone()
        elif isinstance(value, torch.Tensor):  # not the boundary's balancer state (a dict)
            params[key] = value.clone()
    return first_logits, params


def load_full_tables(dmp: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    """Copies whole tables (name -> (num_embeddings, dim)) into this rank's shards, whatever the
    sharding type; used to start a sharded model from the same weights as an unsharded one."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            if not key.endswith(".weight") or "embedding_bags" not in key:
                continue
            table = key.split(".")[-2]
            if table not in full:
                continue
            src = full[table]
            if hasattr(value, "local_shards"):  # ShardedTensor: row/column offsets per shard
                for shard in value.local_shards():
                    r, c = shard.metadata.shard_offsets
                    rows, cols = shard.metadata.shard_sizes
                    shard.tensor.copy_(src[r : r + rows, c : c + cols])
            elif hasattr(value, "to_local"):  # DTensor
                raise NotImplementedError("DTensor embedding shards are not handled here")
            else:  # replicated (data_parallel)
                value.copy_(src)
