"""The sparse side: embedding tables from the config and their sharding (planner, DMP, fused optimizer)."""

from embeddings.tables import build_embedding_bags, pooled_dim, table_configs

__all__ = ["build_embedding_bags", "pooled_dim", "table_configs"]
