"""What the sparse side can be asked for, by device: the one list each of the config's checks and the
sharding code read (no torch import, so that validating a config stays cheap)."""

# FBGEMM's CPU kernels cover these; the row-wise splits need CUDA.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
SHARDING_TYPES = CPU_SHARDING_TYPES + ("row_wise", "table_row_wise", "grid_shard")

# Fused (in-backward) embedding optimizers; FBGEMM's CPU kernels implement all but adam.
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
