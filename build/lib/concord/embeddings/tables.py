"""The sparse arch: one ``EmbeddingBagCollection`` built from the config's tables."""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(tables: Sequence) -> list[EmbeddingBagConfig]:
    """``TableConfig`` (concord.trainer.config) -> torchrec ``EmbeddingBagConfig``; names and sizes kept."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=list(t.features),
            pooling=_POOLING[t.pooling],
        )
        for t in tables
    ]


def build_embedding_bags(tables: Sequence, device: torch.device | str = "meta") -> EmbeddingBagCollection:
    """The unsharded collection. On ``meta`` (default) no memory is taken: sharding materialises each
    rank's shards only. Output: ``KeyedTensor`` of pooled embeddings, (B, sum of table dims)."""
    return EmbeddingBagCollection(tables=table_configs(tables), device=torch.device(device))


def pooled_dim(tables: Sequence) -> int:
    """Width of the pooled embeddings: sum over features of their table's dim."""
    return sum(t.embedding_dim * len(t.features) for t in tables)
