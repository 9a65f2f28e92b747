"""The dense optimizers a config can name (the embedding tables' fused ones are in
``concord.embeddings.options``)."""

import torch

DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
