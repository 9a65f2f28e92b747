"""Each task's mean training label read from the training data itself, for ``model.output_bias:
labels`` on data that ``concord convert`` did not write (and so left no record of them).

The mean is the one convert records: over the rows that hold a label for the task, weighted by the
sample weight where there is one (the constant that minimises the weighted loss; a binary task's
positive rate). Only the label and weight columns are read, each file by one rank of the job, and
the sums are added in the files' order, so every rank starts its heads at the same biases.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa

from concord.trainer.data.layout import DataError
from concord.trainer.data.reader import Columns, check_schema, each_file_once, files_together, open_parquet


def label_means(spec: str, columns: Columns) -> List[Optional[float]]:
    """Per label of ``columns`` (tasks' order): its mean over the training rows at ``spec`` that hold
    one, None where none does. A value that is not a finite number (or a row of negative or non-finite
    weight) is left out here: the reader names it when training meets it. Collective where several
    ranks are up."""
    files = files_together(spec)
    totals = each_file_once(files, lambda path: _file_totals(path, columns))
    sums = np.zeros(len(columns.labels))
    weights = np.zeros(len(columns.labels))
    for file_sums, file_weights in totals:  # the files' order: the same additions on every rank
        sums += file_sums
        weights += file_weights
    return [float(s / w) if w > 0 else None for s, w in zip(sums, weights)]


def _file_totals(path: str, columns: Columns) -> Tuple[np.ndarray, np.ndarray]:
    """One file's weighted label sums and the weights of its labelled rows, per label."""
    pf = open_parquet(path)
    check_schema(path, pf.schema_arrow, columns)
    labels = [name for name in columns.labels if name is not None]
    read = list(dict.fromkeys(labels + ([columns.weight] if columns.weight else [])))
    sums, weights = np.zeros(len(columns.labels)), np.zeros(len(columns.labels))
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=read)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: row group {group}: cannot be read ({e})") from None
        w = _numbers(table, columns.weight) if columns.weight else np.ones(table.num_rows)
        usable = np.isfinite(w) & (w >= 0)
        for k, name in enumerate(columns.labels):
            if name is None:
                continue
            y = _numbers(table, name)
            held = usable & np.isfinite(y)
            sums[k] += float(np.dot(w[held], y[held]))
            weights[k] += float(w[held].sum())
    return sums, weights


def _numbers(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64, a null as NaN."""
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()
