"""The boundary in a TorchRec DistributedModelParallel model (CPU, gloo). Run on 2 ranks:

    torchrun --nproc_per_node 2 docs/examples/torchrec_dmp.py
"""

import gc

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from concord.balancing import RepresentationBoundary, build_balancer


class Ranker(nn.Module):
    def __init__(self, tasks, group, d: int = 32) -> None:
        super().__init__()
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=1000, feature_names=[f])
                  for f in ("user", "item")]
        self.ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))  # DMP allocates the shards
        self.bottom = nn.Sequential(nn.Linear(32, d), nn.ReLU())
        # Statistics are summed over ranks on their own group, apart from DDP's buckets: every rank gets
        # the weights one rank would compute on the global batch.
        self.boundary = RepresentationBoundary(build_balancer("emtl", tasks), process_group=group)
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in tasks)

    def forward(self, features: KeyedJaggedTensor, labels: torch.Tensor):
        pooled = self.ebc(features)
        z = self.bottom(torch.cat([pooled["user"], pooled["item"]], dim=1))
        views = self.boundary(z)
        losses = torch.stack([nn.functional.binary_cross_entropy_with_logits(head(v).squeeze(1), labels[:, k])
                              for k, (head, v) in enumerate(zip(self.heads, views))])
        return self.boundary.objective(losses)


def train(rank: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = Ranker(["click", "purchase"], dist.new_group(backend="gloo"))
    apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": 0.05})  # fused table update
    dmp = DistributedModelParallel(model, device=torch.device("cpu"))
    dense_opt = torch.optim.Adam([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=1e-3)
    generator = torch.Generator().manual_seed(rank)  # each rank reads its own rows
    for _ in range(10):
        rows = 64
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item"], values=torch.randint(0, 1000, (2 * rows,), generator=generator),
            lengths=torch.ones(2 * rows, dtype=torch.int32))
        labels = torch.randint(0, 2, (rows, 2), generator=generator).float()
        dense_opt.zero_grad()
        dmp(features, labels).backward()  # tables get the balanced gradient inside this backward
        dense_opt.step()
    return torch.tensor(model.boundary.telemetry()["weights"])


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    weights = train(rank)
    gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    assert all(torch.equal(w, weights) for w in gathered), "ranks disagree on the task weights"
    if rank == 0:
        print("task weights, identical on every rank:", weights.tolist())
    # DMP and DDP hold reference cycles: free them while the process group still exists. Left to
    # interpreter teardown, they can be destroyed after it, and a rank aborts at exit ("terminate
    # called without an active exception") after a run that finished.
    gc.collect()
    dist.destroy_process_group()
