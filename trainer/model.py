"""The multi-task ranking model: sparse arch -> dense bottom -> boundary -> task heads.

Sharding stays out of this file (see ``embeddings.sharding``); the model is plain ``nn.Module`` code
that runs unsharded too.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedTensor

from concord.balancing import RepresentationBoundary, build_balancer
from concord.balancing.param_level import PARAMETER_LEVEL
from concord.embeddings.tables import build_embedding_bags, pooled_dim
from concord.heads.heads import TaskHeads
from concord.heads.experts import build_experts
from concord.trainer.config import output_bias_means, require_table_sizes
from concord.trainer.data.reader import Batch


class DenseBottom(nn.Module):
    """Numerical MLP, interaction and shared MLP up to the shared representation.

    dense (B, n_dense) -> MLP -> (B, m); concat with pooled embeddings (B, e) -> (B, m + e);
    interaction: DCN-v2 low-rank cross layers (same width) or MLP; shared MLP -> ``z`` (B, d).
    With :attr:`experts` set (MMoE/PLE), the shared MLP's output x (B, :attr:`width`) feeds the shared
    experts and ``z`` is what the per-task gates after the boundary read (heads/experts.py).
    """

    def __init__(self, num_dense: int, embedding_width: int, model_cfg) -> None:
        super().__init__()
        self.dense_mlp = MLP(num_dense, list(model_cfg.dense_mlp)) if model_cfg.dense_mlp else None
        width = (model_cfg.dense_mlp[-1] if model_cfg.dense_mlp else num_dense) + embedding_width
        inter = model_cfg.interaction
        if inter.type == "dcn":
            self.interaction = LowRankCrossNet(width, inter.num_layers, min(inter.low_rank, width))
        else:
            self.interaction = MLP(width, list(inter.mlp)) if inter.mlp else nn.Identity()
            width = inter.mlp[-1] if inter.mlp else width
        self.shared = MLP(width, list(model_cfg.shared)) if model_cfg.shared else nn.Identity()
        self.width = model_cfg.shared[-1] if model_cfg.shared else width  # of x, the shared MLP's output
        self.experts: Optional[nn.Module] = None  # MMoE/PLE: the shared experts (and PLE's lower levels)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        numeric = self.dense_mlp(dense) if self.dense_mlp is not None else dense
        x = self.shared(self.interaction(torch.cat([numeric, pooled], dim=1)))
        return self.experts(x) if self.experts is not None else x


class ModelOutput(NamedTuple):
    """A NamedTuple, so that DDP (static graph) finds its tensors: it enqueues its first-iteration
    all-reduce through them; an opaque output would leave that iteration's gradients unsynced."""

    objective: torch.Tensor  # scalar to backward
    losses: torch.Tensor  # (T,) task losses (with their graph, for parameter-level methods)
    logits: torch.Tensor  # (B, T)


class MultiTaskModel(nn.Module):
    """``forward(batch)`` -> :class:`ModelOutput`.

    The pooled embeddings are regrouped into ``feature_order``: a sharded collection returns its
    features in shard order, not in the order of the unsharded one. Sharded tables need no gradient
    rescaling: TorchRec's all-to-all divides their gradient by the world size, which matches DDP's
    average for dense parameters (tests/test_sharding.py checks it).
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        bottom: DenseBottom,
        boundary: RepresentationBoundary,
        heads: TaskHeads,
        feature_order: list[str],
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.bottom = bottom
        self.boundary = boundary
        self.heads = heads
        self.feature_order = list(feature_order)

    def forward(self, batch: Batch) -> ModelOutput:
        pooled = KeyedTensor.regroup([self.ebc(batch.sparse)], [self.feature_order])[0]
        z = self.bottom(batch.dense, pooled)
        views = self.boundary(z)
        losses, logits = self.heads(views, batch.labels, batch.weights, batch.labelled)
        return ModelOutput(training_objective(self.boundary, losses), losses, logits)


@torch.fx.wrap
def training_objective(boundary: RepresentationBoundary, losses: torch.Tensor) -> torch.Tensor:
    """The scalar to backward: the boundary's objective when training, the summed losses otherwise.
    Opaque to FX (``torch.fx.wrap``): TorchRec's train pipeline traces the model's forward to find the
    tables' inputs, and the boundary's checks of the losses' shape cannot be traced symbolically."""
    return boundary.objective(losses) if torch.is_grad_enabled() else losses.sum()


def boundary_method(cfg, name: str | None = None, knobs: dict | None = None):
    """The boundary's balancer and reduction for a method. A parameter-level method weights the losses
    itself, so the boundary then passes the plain gradient of its objective through (equal, sum)."""
    name = name or cfg.balancer.name
    knobs = cfg.balancer.knobs if knobs is None else knobs
    if name in PARAMETER_LEVEL:
        return build_balancer("equal", cfg.task_names), "sum"
    return build_balancer(name, cfg.task_names, **knobs), cfg.balancer.reduction


def build_model(cfg, device: torch.device | str = "meta", process_group=None) -> MultiTaskModel:
    """The unsharded model for a config; the embedding tables on ``device`` (meta: sharding allocates)."""
    require_table_sizes(cfg)
    balancer, reduction = boundary_method(cfg)
    statistics = cfg.balancer.statistics if cfg.balancer.name not in PARAMETER_LEVEL else "current"
    every = cfg.balancer.statistics_every if statistics != "current" else 1
    # autograd_sums: this model hooks no view of z, so autograd may form an equal-weight sum itself.
    boundary = RepresentationBoundary(balancer, reduction, process_group, cfg.train.log_every, statistics=statistics,
                                      statistics_every=every, autograd_sums=True)
    ebc = build_embedding_bags(cfg.model.tables, device)
    bottom = DenseBottom(len(cfg.data.dense_columns), pooled_dim(cfg.model.tables), cfg.model)
    task_inputs = None  # MMoE/PLE: the gates (and PLE's task experts) go after the boundary, with the heads
    if cfg.model.experts.type != "none":
        bottom.experts, task_inputs = build_experts(cfg.model.experts, bottom.width, len(cfg.tasks))
    heads = TaskHeads(cfg.representation_dim, cfg.tasks, task_inputs)
    label_means = output_bias_means(cfg)
    if label_means is not None:
        heads.start_at(label_means)
    features = [f for t in cfg.model.tables for f in t.features]
    return MultiTaskModel(ebc, bottom, boundary, heads, features)
