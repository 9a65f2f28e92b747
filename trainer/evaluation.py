"""Scoring a split with a trained model: every row exactly once, the same number of batches on every
rank (sharded forward passes are collectives), per-task metrics, and optionally each row's predictions."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from concord.trainer.data.reader import Batch, ParquetReader
from concord.trainer.lifecycle import STOP_CHECK_EVERY
from concord.trainer.observe.metrics import TaskMetrics
from concord.trainer.observe.progress import progress_bar

# Called with each batch's real rows: (first row's index in the split, batch, predictions (n, T)).
RowSink = Callable[[int, Batch, torch.Tensor], None]


class Evaluator:
    """Runs ``dmp`` in eval mode over a reader's range of a split and computes the task metrics
    (a collective: every rank calls :meth:`run`; rank 0 gets the results)."""

    def __init__(self, cfg, rt, dmp: torch.nn.Module, heads) -> None:
        self.cfg, self.rt, self.dmp, self.heads = cfg, rt, dmp, heads

    @torch.no_grad()
    def run(self, reader: ParquetReader, sink: Optional[RowSink] = None, what: str = "evaluate",
            stop: Optional[Callable[[], bool]] = None) -> Optional[Dict[str, Dict[str, float]]]:
        """The metrics of the split ``reader`` reads; rank 0 shows its batches' progress as ``what``.
        ``stop``, a collective every rank asks at the same batches (every ``STOP_CHECK_EVERY``), ends
        the run without results (None) where it says so."""
        batch_size = self.cfg.data.batch_size
        metrics = TaskMetrics(self.cfg.tasks, self.rt.world_size, self.rt.rank, batch_size, self.rt.device, self.rt.balancer_group)
        self.dmp.eval()
        it = iter(reader)
        template: Optional[Batch] = reader.empty_batch() if reader.num_rows == 0 else None
        row = reader.rank_range(reader.rank)[0]
        bar = progress_bar(reader.max_batches_per_rank(), what, "batch", enabled=self.rt.is_main and self.cfg.train.progress, leave=False)
        try:
            for index in range(reader.max_batches_per_rank()):
                if stop is not None and index % STOP_CHECK_EVERY == 0 and stop():
                    return None
                batch = next(it, None)
                template = template or batch
                real = batch.batch_size if batch is not None else 0
                padded = pad_batch(batch if batch is not None else template, batch_size, empty=batch is None).to(self.rt.device)
                out = self.dmp(padded)
                predictions = self.heads.predictions(out.logits)
                metrics.update(predictions, padded.labels, padded.weights, padded.labelled)
                if sink is not None and real:
                    sink(row, batch, predictions[:real].detach().cpu())
                row += real
                bar.update()
        finally:
            bar.close()
            self.dmp.train()
        return metrics.compute()


def pad_batch(batch: Batch, size: int, empty: bool = False) -> Batch:
    """Pads ``batch`` to ``size`` rows with weight-0 rows that have no ids or labels (``empty``: all padding).

    Sharded forward passes are collectives, so in evaluation every rank runs the same number of
    full batches; padding rows carry weight 0 and so count in no metric.
    """
    n = 0 if empty else batch.batch_size
    if n == size and not empty:
        return batch
    keys = batch.sparse.keys()
    lengths = batch.sparse.lengths().view(len(keys), -1)[:, :n]
    lengths = torch.cat([lengths, torch.zeros(len(keys), size - n, dtype=lengths.dtype)], dim=1)
    values = batch.sparse.values()[: int(lengths.sum())] if not empty else batch.sparse.values()[:0]
    pad = lambda t: torch.cat([t[:n], torch.zeros((size - n,) + t.shape[1:], dtype=t.dtype)])
    return Batch(
        pad(batch.dense),
        KeyedJaggedTensor.from_lengths_sync(keys, values, lengths.reshape(-1)),
        pad(batch.labels),
        pad(batch.weights),
        pad(batch.labelled) if batch.labelled is not None else None,
    )
