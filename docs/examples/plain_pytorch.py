"""The boundary in a plain PyTorch ranking model: no Concord trainer, no TorchRec."""

import torch
from torch import nn

from concord.balancing import RepresentationBoundary, build_balancer


class Ranker(nn.Module):
    def __init__(self, num_ids: int = 1000, d: int = 32) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_ids, 16, mode="sum")
        self.bottom = nn.Sequential(nn.Linear(16 + 4, d), nn.ReLU())
        # z (B, d) -> one view per head; backward hands the bottom one balanced gradient
        self.boundary = RepresentationBoundary(build_balancer("multibalance", ["click", "watch"]))
        self.click, self.watch = nn.Linear(d, 1), nn.Linear(d, 1)

    def forward(self, ids, offsets, dense, click, watch):
        z = self.bottom(torch.cat([self.embedding(ids, offsets), dense], dim=1))
        z_click, z_watch = self.boundary(z)
        losses = torch.stack([
            nn.functional.binary_cross_entropy_with_logits(self.click(z_click).squeeze(1), click),
            nn.functional.mse_loss(self.watch(z_watch).squeeze(1), watch),  # ~100x the click loss
        ])
        return self.boundary.objective(losses)  # records the losses; the scalar to backward


torch.manual_seed(0)
model = Ranker()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(20):
    ids, offsets = torch.randint(0, 1000, (256,)), torch.arange(0, 256, 2)  # 128 rows, 2 ids each
    dense = torch.randn(128, 4)
    click, watch = (dense[:, 0] > 0).float(), 10 * dense[:, 1]
    optimizer.zero_grad()
    model(ids, offsets, dense, click, watch).backward()  # one backward pass
    optimizer.step()
print("task weights:", model.boundary.telemetry()["weights"])
