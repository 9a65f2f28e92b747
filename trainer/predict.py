"""``concord predict``: a trained model's per-row predictions on a data set, with the same metrics as
training's evaluation.

Every rank scores a contiguous range of the rows (every row exactly once) and writes its part; rank 0
streams the parts in rank order into the output, so its rows follow the data's order and no process
holds them all. Columns: ``row`` (the row's index in the data set, files in sorted order),
``pred_<task>`` for every task, ``label_<task>`` for every task whose label column the data has (null
where a row has no label for it), ``weight``, and the data's ``data.passthrough`` columns as they are
(keys to join the scores back to the log: ``row`` counts the rows of the data scored, which are not
the raw input's lines where convert skipped bad rows).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from concord.trainer.checkpoint import Checkpointer
from concord.trainer.config import Config
from concord.trainer.data.layout import DataError, check_scored_encoding, list_files, run_config
from concord.trainer.data.reader import Columns, ParquetReader, columns_from_config, open_parquet, plan_together
from concord.trainer.observe.metrics import auc_memory_note
from concord.trainer.evaluation import Evaluator
from concord.trainer.fingerprint import ResumeError, describe_changes, differences, fingerprint, with_todays_defaults
from concord.trainer.runtime import Runtime
from concord.trainer.train import Trainer, pop_balancer_entries, restore_entries, without_boundary_records

logger = logging.getLogger("concord.predict")

# Fingerprint keys that must match for a checkpoint to be loaded into the config's model.
MODEL_KEYS = ("model", "tasks")


def predict(cfg: Config, rt: Runtime, run_dir: str, data: Optional[str], out: str) -> Dict[str, Dict[str, float]]:
    spec = data or cfg.data.eval
    if not spec:
        raise DataError("predict needs data: --data PATH, or data.eval in the config")
    files = list_files(spec)
    carried = _passthrough_schema(files, cfg.data.passthrough)
    cfg.model.output_bias = "torch"  # the checkpoint gives the heads' biases: no need of the training data's record
    cfg.dist.statistics_on_host = False  # scoring runs no backward: no balancer statistics to sum
    trainer = Trainer.build(cfg, rt, own_run_dir=False)
    path = _load_model(trainer, Path(run_dir), spec)
    columns = _columns_present(cfg, files[0])
    reader = ParquetReader(spec, columns, cfg.data.batch_size, rt.rank, rt.world_size, groups=plan_together(spec, columns))
    if reader.total_rows == 0:  # every rank knows: the same plan
        raise DataError(f"{spec}: no rows to score (its files hold none)")
    binary = sum(t.type == "binary" and label is not None for t, label in zip(cfg.tasks, columns.labels))
    if rt.is_main and (note := auc_memory_note(reader.total_rows, binary, rt.device, spec)):
        logger.warning(note)
    parts = Path(str(out) + ".parts")
    if rt.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    if rt.world_size > 1:
        dist.barrier()
    part: Optional[pq.ParquetWriter] = None  # this rank's, opened at its first row

    def sink(first: int, batch, predictions: torch.Tensor) -> None:
        nonlocal part
        table = {"row": np.arange(first, first + batch.batch_size, dtype=np.int64)}
        for k, task in enumerate(cfg.tasks):
            table[f"pred_{task.name}"] = predictions[:, k].float().numpy()
            if columns.labels[k] is not None:
                missing = None if batch.labelled is None else ~batch.labelled[:, k].numpy()
                table[f"label_{task.name}"] = pa.array(batch.labels[:, k].numpy(), mask=missing)
        table["weight"] = batch.weights.numpy()
        table = pa.table(table)
        part = part or pq.ParquetWriter(parts / f"rank-{rt.rank:05d}.parquet", table.schema)
        part.write_table(table)

    results = Evaluator(cfg, rt, trainer.dmp, trainer.model.heads).run(reader, sink, what="predict")
    # A task whose label the data lacks (data to score, unlabelled) has no metrics: its labels read as zeros.
    results = {t.name: results[t.name] for t, label in zip(cfg.tasks, columns.labels) if label is not None and t.name in results}
    if part is not None:
        part.close()
    if rt.world_size > 1:
        dist.barrier()
    if rt.is_main:
        scored = list(dict.fromkeys(group.file for group in reader.groups))  # the files the job read, in its order
        _join(sorted(parts.glob("rank-*.parquet")), scored, carried, out)
        shutil.rmtree(parts)
        logger.info("%d rows scored with %s -> %s", reader.total_rows, path, out)
    return results


def _load_model(trainer: Trainer, run_dir: Path, spec: str) -> Path:
    """The newest intact checkpoint of ``run_dir`` into the model (tables, dense part, balancer state
    when the balancer is the same); refuses one written for another model or other tasks, or trained
    on data encoded otherwise than ``spec`` (the data to score)."""
    ck = Checkpointer(run_dir / "checkpoints")
    path = ck.latest()
    if path is None:
        raise ResumeError(f"{run_dir}: no checkpoint to score with (run_dir/checkpoints holds none)")
    saved = with_todays_defaults(ck.info(path).get("fingerprint", {}))
    now = fingerprint(trainer.cfg, trainer.rt.world_size, 0)
    changed = differences(saved, now)
    wrong = [k for k in MODEL_KEYS if k in changed]
    if wrong:
        raise ResumeError(f"{path} holds another model than {trainer.cfg.source} describes ({describe_changes(wrong, saved, now)}); "
                          "pass the config the run was trained with (its run_dir/config.yaml)")
    check_scored_encoding(spec, saved, run_config(run_dir))
    state = {"model": without_boundary_records(trainer.dmp.state_dict()), "optimizer": {}}
    fresh = pop_balancer_entries(state) if "balancer" in changed else {}
    Checkpointer.load(path, {"model": state["model"]})
    restore_entries(state, fresh)
    trainer.dmp.load_state_dict(state["model"])
    return path


def _passthrough_schema(files: List[str], names: List[str]) -> Optional[pa.Schema]:
    """The columns to carry into the output (None: none), checked before the model is built: every
    file to score has each, of one type, the type of the first file that types it (a column of nulls
    alone, untyped, takes it; another type is named, as convert writes one type a column)."""
    if not names:
        return None
    schemas = []
    for path in files:
        schema = open_parquet(path).schema_arrow
        missing = [name for name in names if name not in schema.names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (data.passthrough); convert the data again with it in "
                            "data.passthrough, or leave it out")
        schemas.append((path, schema))
    fields = []
    for name in names:
        typed = [(path, schema.field(name)) for path, schema in schemas if not pa.types.is_null(schema.field(name).type)]
        first_path, first = typed[0] if typed else (files[0], schemas[0][1].field(name))
        for path, field in typed:
            if field.type != first.type:
                raise DataError(f"{path}: column {name!r} (data.passthrough) is {field.type} here but {first.type} in {first_path}")
        fields.append(first)
    return pa.schema(fields)


def _join(parts: List[Path], files: List[str], carried: Optional[pa.Schema], out: str) -> None:
    """Writes ``out``: the ranks' ``parts`` (their rows in the data's order, rank by rank) with the
    ``carried`` columns of the data's ``files`` beside them (:func:`_passthrough_schema`), streamed a
    batch at a time, so that scoring a data set never holds all of its rows in one process."""
    rows = _RowStream(_passthrough(files, carried)) if carried is not None else None
    written = 0
    with contextlib.ExitStack() as stack:
        writer = None
        for path in parts:
            for batch in pq.ParquetFile(path).iter_batches():
                scores = pa.Table.from_batches([batch])
                if scores.column("row")[0].as_py() != written:
                    raise RuntimeError(f"{path}: its rows start at {scores.column('row')[0]}, not at {written}")
                if rows is not None:
                    for name, column in zip(carried.names, rows.take(len(scores)).columns):
                        scores = scores.append_column(name, column)
                if writer is None:
                    writer = stack.enter_context(pq.ParquetWriter(out, scores.schema))
                writer.write_table(scores)
                written += len(scores)


def _passthrough(files: List[str], carried: pa.Schema) -> Iterator[pa.Table]:
    """The ``carried`` columns of ``files``' rows in order, a batch at a time, in its types."""
    for path in files:
        for batch in open_parquet(path).iter_batches(columns=carried.names):
            yield pa.Table.from_batches([batch]).select(carried.names).cast(carried)


class _RowStream:
    """Tables of any length, taken ``n`` rows at a time."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables, self.held = tables, None

    def take(self, n: int) -> pa.Table:
        pieces = []
        while n > 0:
            if self.held is None or len(self.held) == 0:
                self.held = next(self.tables)
            piece = self.held.slice(0, n)
            self.held, n = self.held.slice(len(piece)), n - len(piece)
            pieces.append(piece)
        return pa.concat_tables(pieces)


def _columns_present(cfg: Config, first_file: str) -> Columns:
    """The config's columns, with the labels the data (its first file) does not have marked absent."""
    columns = columns_from_config(cfg)
    names = set(open_parquet(first_file).schema_arrow.names)
    labels = tuple(label if label in names else None for label in columns.labels)
    weight = columns.weight if columns.weight in names else None
    return Columns(**{**columns.__dict__, "labels": labels, "weight": weight})
