"""Parquet input streamed by row group; each rank reads an equal, disjoint range of the rows.

An epoch lays every row group of every file end to end (in an order shuffled per epoch when training)
and cuts the sequence into one contiguous range per rank: equal ranges for training (the remainder of
fewer than ``world_size`` rows is left out of that epoch), ranges differing by at most one row for
evaluation, which reads every row exactly once. Ranks therefore get equal work however few or uneven
the row groups are. Training shuffles rows, too, inside windows of ``shuffle_rows`` rows of a rank's
range, each permuted by a generator seeded with (seed, epoch, rank, window): memory stays bounded, an
epoch's order is a function of the seed, and a resumed run skips to any row without replaying the
epoch.

The column-to-role mapping (dense features, sparse features, one label per task, optional sample
weight) comes from the config. A batch is a :class:`Batch`: dense (B, n_dense) float32, a
``KeyedJaggedTensor`` of the sparse features, labels (B, T) float32, weights (B,) float32 and, where a
task's label may be missing (``missing_label: masked``), which labels each row has (B, T).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from concord.trainer.data.layout import DataError, list_files, raw_text_hint


@dataclass
class Batch(Pipelineable):
    """One rank's batch. dense: (B, n_dense); sparse: KJT over the features, B rows per key;
    labels: (B, T); weights: (B,); labelled: (B, T) bool, False where a row has no label for the
    task (its label reads 0), or None where every row has every label. Pipelineable: TorchRec's
    train pipelines copy it to the device on a stream of their own."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    labelled: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` does not block the host."""
        labelled = self.labelled.pin_memory() if self.labelled is not None else None
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory(), self.weights.pin_memory(), labelled)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
            self.labelled.to(device, non_blocking=non_blocking) if self.labelled is not None else None,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for tensor in (self.dense, self.sparse, self.labels, self.weights, self.labelled):
            if tensor is not None:
                tensor.record_stream(stream)


@dataclass(frozen=True)
class Columns:
    """Which Parquet column plays which role. ``sparse`` maps feature name -> column; ``tables`` maps
    feature name -> table size, for the id range check; a label of None is absent from the data."""

    dense: Tuple[str, ...]
    sparse: Tuple[Tuple[str, str], ...]
    labels: Tuple[str, ...]
    weight: Optional[str] = None
    table_sizes: Tuple[Tuple[str, int], ...] = ()
    label_types: Tuple[str, ...] = ()  # per label: binary (must be 0 or 1) | regression (finite)
    masked: Tuple[bool, ...] = ()  # per label: a null (or NaN) is a missing label, not an error
    on_bad_id: str = "error"  # or "hash": id modulo the table size, counted
    on_nonfinite_dense: str = "error"  # or "impute": replaced by impute_value, counted
    impute_value: float = 0.0

    @property
    def all(self) -> List[str]:
        cols = list(self.dense) + [c for _, c in self.sparse] + [c for c in self.labels if c is not None]
        return cols + ([self.weight] if self.weight else [])


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    num_rows: int


def open_parquet(path: str) -> pq.ParquetFile:
    """One Parquet file, or a DataError naming it (and, for raw text, what converts it)."""
    try:
        # Pages written with checksums (concord convert and synth write them) are verified on read.
        return pq.ParquetFile(path, page_checksum_verification=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}){raw_text_hint(path)}") from None


def check_schema(path: str, schema: pa.Schema, columns: Columns) -> None:
    names = set(schema.names)
    for col in columns.all:
        if col not in names:
            raise DataError(f"{path}: missing column {col!r} (file has: {', '.join(schema.names)})")
        if schema.names.count(col) > 1:
            raise DataError(f"{path}: the file has {schema.names.count(col)} columns named {col!r}: rename them so that the "
                            "config's name picks one")
    numeric = lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
    for col in list(columns.dense) + [c for c in columns.labels if c] + ([columns.weight] if columns.weight else []):
        t = schema.field(col).type
        if not numeric(t):
            raise DataError(f"{path}: column {col!r} must be numeric, has type {t}")
    for _, col in columns.sparse:
        t = schema.field(col).type
        one_id = pa.types.is_integer(t)  # a single-valued feature: one id a row, a bag of one
        if not one_id and (not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type)):
            raise DataError(f"{path}: sparse column {col!r} must be a list of integers or an integer, has type {t}")


def plan_row_groups(files: Sequence[str], columns: Columns) -> List[RowGroup]:
    """Every row group that holds rows, of every file, in a fixed order; checks each file's schema
    once. A file or row group of no rows adds none: writers leave such files where a partition or a
    task had no data (Spark, Hive), whole files with the data's schema; a split of no rows at all is
    the caller's to refuse."""
    return [RowGroup(f, i, rows) for f in files for i, rows in enumerate(_row_group_sizes(f, columns)) if rows]


def _row_group_sizes(path: str, columns: Columns) -> List[int]:
    """The rows of each row group of the file ``path``, whose schema is checked."""
    pf = open_parquet(path)
    check_schema(path, pf.schema_arrow, columns)
    return [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]


def plan_together(spec: str, columns: Columns) -> List[RowGroup]:
    """:func:`plan_row_groups` of ``spec``'s files, made by the whole job where a process group of
    several ranks is up (collective: every rank calls it at once), so that the job opens each footer
    once where each rank opened all of them (:func:`each_file_once`)."""
    files = files_together(spec)
    sizes = each_file_once(files, lambda path: _row_group_sizes(path, columns))
    return [RowGroup(path, i, rows) for path, rows_of_file in zip(files, sizes) for i, rows in enumerate(rows_of_file) if rows]


def _job() -> Tuple[int, int]:
    """(rank, world size) where a process group of several ranks is up, else (0, 1)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def files_together(spec: str) -> List[str]:
    """``spec``'s files as rank 0 lists them, on every rank (collective where several ranks are up): a
    rank that saw a network file system's listing late would otherwise cut the rows into other
    ranges than its peers', training some twice and others never."""
    rank, world_size = _job()
    if world_size == 1:
        return list_files(spec)
    listing: list = [None]
    if rank == 0:
        try:
            listing = [list_files(spec)]
        except DataError as e:
            listing = [str(e)]
    dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], str):
        raise DataError(listing[0])
    return listing[0]


def each_file_once(files: Sequence[str], work: Callable[[str], Any]) -> List[Any]:
    """``work(path)`` of every file, in the files' order, each file read by one rank of the job
    (collective where several ranks are up): rank r takes files r, r + W, ... and the results are
    gathered (they must pickle, and small: a file's row counts or sums). Every rank raises the
    :class:`DataError` met first in the files' order, naming its file, as one rank alone would."""
    rank, world_size = _job()
    if world_size == 1:
        return [work(path) for path in files]
    mine: list = []  # this rank's results in order, then a _Problem where one failed
    for index in range(rank, len(files), world_size):
        try:
            mine.append(work(files[index]))
        except DataError as e:
            mine.append(_Problem(index, str(e)))
            break
    results: list = [None] * world_size
    dist.all_gather_object(results, mine)
    problems = [(r[-1].index, r[-1].message) for r in results if r and isinstance(r[-1], _Problem)]
    if problems:
        raise DataError(min(problems)[1])
    return [results[index % world_size][index // world_size] for index in range(len(files))]


@dataclass(frozen=True)
class _Problem:
    index: int
    message: str


class _Block:
    """Decoded rows: dense (n, nd), per feature (lengths (n,), values), labels (n, T), weights (n,),
    labelled (n, T) bool or None (every label present; so for every block of a reader with no
    masked task)."""

    def __init__(self, dense, sparse, labels, weights, labelled=None):
        self.dense, self.sparse, self.labels, self.weights, self.labelled = dense, sparse, labels, weights, labelled

    def _labelled_at(self, index) -> Optional[np.ndarray]:
        return None if self.labelled is None else self.labelled[index]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def split(self, n: int) -> Tuple["_Block", "_Block"]:
        return self.slice(0, n), self.slice(n, len(self))

    def slice(self, start: int, stop: int) -> "_Block":
        sparse = []
        for lengths, values in self.sparse:
            first, last = int(lengths[:start].sum()), int(lengths[:stop].sum())
            sparse.append((lengths[start:stop], values[first:last]))
        return _Block(self.dense[start:stop], sparse, self.labels[start:stop], self.weights[start:stop], self._labelled_at(slice(start, stop)))

    def take(self, rows: np.ndarray) -> "_Block":
        """The rows at ``rows`` (e.g. a permutation), jagged values moved with their rows."""
        sparse = []
        for lengths, values in self.sparse:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)[rows]
            counts = lengths[rows].astype(np.int64)
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            sparse.append((lengths[rows], values[np.repeat(starts, counts) + within]))
        return _Block(self.dense[rows], sparse, self.labels[rows], self.weights[rows], self._labelled_at(rows))

    @staticmethod
    def empty(columns: "Columns") -> "_Block":
        sparse = [(np.zeros(0, np.int32), np.zeros(0, np.int64)) for _ in columns.sparse]
        t = len(columns.labels)
        return _Block(np.zeros((0, len(columns.dense)), np.float32), sparse, np.zeros((0, t), np.float32),
                      np.zeros(0, np.float32), np.zeros((0, t), bool) if any(columns.masked) else None)

    @staticmethod
    def concat(blocks: List["_Block"]) -> "_Block":
        if len(blocks) == 1:
            return blocks[0]
        sparse = [
            (np.concatenate([b.sparse[f][0] for b in blocks]), np.concatenate([b.sparse[f][1] for b in blocks]))
            for f in range(len(blocks[0].sparse))
        ]
        return _Block(
            np.concatenate([b.dense for b in blocks]),
            sparse,
            np.concatenate([b.labels for b in blocks]),
            np.concatenate([b.weights for b in blocks]),
            None if blocks[0].labelled is None else np.concatenate([b.labelled for b in blocks]),
        )

    def to_batch(self, keys: Sequence[str]) -> Batch:
        lengths = np.concatenate([l for l, _ in self.sparse]) if self.sparse else np.zeros(0, np.int32)
        values = np.concatenate([v for _, v in self.sparse]) if self.sparse else np.zeros(0, np.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(keys),
            values=torch.from_numpy(values.astype(np.int64, copy=False)),
            lengths=torch.from_numpy(lengths.astype(np.int32, copy=False)),
        )
        return Batch(
            torch.from_numpy(np.ascontiguousarray(self.dense)),
            kjt,
            torch.from_numpy(np.ascontiguousarray(self.labels)),
            torch.from_numpy(np.ascontiguousarray(self.weights)),
            None if self.labelled is None else torch.from_numpy(np.ascontiguousarray(self.labelled)),
        )


class ParquetReader:
    """Streams one rank's range of the rows as :class:`Batch` es of ``batch_size`` rows.

    ``drop_last=True`` (training): every rank gets ``total_rows // world_size`` rows and yields only
    full batches, so every rank takes the same number of steps; :meth:`rows_left_out` says how many
    rows an epoch leaves out (at most one partial batch per rank, plus fewer than ``world_size``).
    ``drop_last=False`` (evaluation): every row exactly once across ranks, the last batch partial.
    ``shuffle``: row groups in a new order each epoch and rows permuted within windows of
    ``shuffle_rows`` (the memory bound), all seeded by ``seed``. ``groups``: ``spec``'s row groups as
    the job planned them together (:func:`plan_together`); without them the reader plans its own.
    """

    def __init__(
        self,
        spec: str,
        columns: Columns,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_rows: int = 65_536,
        groups: Optional[Sequence[RowGroup]] = None,
    ) -> None:
        if shuffle_rows < 1:
            raise ValueError(f"shuffle_rows must be >= 1, got {shuffle_rows}")
        self.columns = columns
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_rows = shuffle_rows
        # The job's plan (plan_together) where it made one, else this reader's own.
        self.groups = list(groups) if groups is not None else plan_row_groups(list_files(spec), columns)
        self.total_rows = sum(g.num_rows for g in self.groups)
        self.keys = [f for f, _ in columns.sparse]
        self._sizes = dict(columns.table_sizes)
        # Documented, counted repairs (data.on_bad_id: hash, data.on_nonfinite_dense: impute).
        self.counts = {"hashed_ids": 0, "imputed_dense": 0}
        self._file: Tuple[Optional[str], Optional[pq.ParquetFile]] = (None, None)  # file being read
        self._decoded: Tuple[Optional[RowGroup], Optional[_Block]] = (None, None)  # last row group

    # --- how the rows are shared ----------------------------------------------------------------
    def rank_range(self, rank: int) -> Tuple[int, int]:
        """``rank``'s rows ``[start, stop)`` in an epoch's sequence of all rows."""
        if self.drop_last:
            each = self.total_rows // self.world_size
            return rank * each, (rank + 1) * each
        each, extra = divmod(self.total_rows, self.world_size)
        start = rank * each + min(rank, extra)
        return start, start + each + (1 if rank < extra else 0)

    @property
    def num_rows(self) -> int:
        """This rank's rows per epoch."""
        start, stop = self.rank_range(self.rank)
        return stop - start

    def full_batches_per_rank(self) -> int:
        """Full batches every rank makes per epoch (training: all ranks alike)."""
        return min(b - a for a, b in map(self.rank_range, range(self.world_size))) // self.batch_size

    def max_batches_per_rank(self) -> int:
        return math.ceil(max(b - a for a, b in map(self.rank_range, range(self.world_size))) / self.batch_size)

    def rows_left_out(self) -> int:
        """Rows an epoch of full batches on every rank does not train (different rows each epoch when
        shuffled)."""
        return self.total_rows - self.full_batches_per_rank() * self.batch_size * self.world_size

    def _pieces(self, epoch: int) -> List[Tuple[RowGroup, int, int]]:
        """This rank's range as (row group, first row, end row) pieces, in the epoch's order."""
        order = range(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups)).tolist()
        lo, hi = self.rank_range(self.rank)
        pieces, offset = [], 0
        for i in order:
            group = self.groups[i]
            start, stop = max(lo - offset, 0), min(hi - offset, group.num_rows)
            if start < stop:
                pieces.append((group, start, stop))
            offset += group.num_rows
            if offset >= hi:
                break
        return pieces

    # --- reading --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, epoch: int = 0, skip_rows: int = 0) -> Iterator[Batch]:
        """Epoch ``epoch``'s batches after the first ``skip_rows`` rows of this rank's range (resuming
        mid-epoch): row groups and windows wholly inside the skipped range are not read."""
        return self._batched(self._blocks(epoch, skip_rows))

    def piece_batches(self, epoch: int, pieces: Sequence[Tuple[int, int, int, int]]) -> Iterator[Batch]:
        """Epoch ``epoch``'s rows that ``pieces`` name, in full batches: each piece ``(ranks, rank,
        first, end)`` is rows ``[first, end)`` of what rank ``rank`` reads of the epoch laid out for
        ``ranks`` ranks (a run resumed on another number of ranks reads the rest of its epoch so:
        :mod:`concord.trainer.data.position`)."""
        return self._batched(block for piece in pieces for block in self._piece_blocks(epoch, *piece))

    def _piece_blocks(self, epoch: int, ranks: int, rank: int, first: int, end: int) -> Iterator[_Block]:
        layout = copy.copy(self)  # the same files and counters, the rows of another rank and layout
        layout.rank, layout.world_size = rank, ranks
        if not (self.drop_last and 0 <= rank < ranks and 0 <= first <= end <= layout.num_rows):
            raise DataError(f"rows [{first}, {end}) of rank {rank} of {ranks} are not in this training data's epoch "
                            f"({layout.num_rows} rows a rank)")
        left = end - first
        if left == 0:
            return
        for block in layout._blocks(epoch, first):
            block = block.slice(0, min(left, len(block)))
            left -= len(block)
            yield block
            if left == 0:
                return

    def _batched(self, blocks: Iterator[_Block]) -> Iterator[Batch]:
        pending: List[_Block] = []
        pending_rows = 0
        for block in blocks:
            pending.append(block)
            pending_rows += len(block)
            while pending_rows >= self.batch_size:
                head, tail = _Block.concat(pending).split(self.batch_size)
                yield head.to_batch(self.keys)
                pending, pending_rows = ([tail] if len(tail) else []), len(tail)
        if pending_rows and not self.drop_last:
            yield _Block.concat(pending).to_batch(self.keys)

    def check_weights(self) -> None:
        """Reads only the weight column of this rank's share of the row groups (every ``world_size``-th):
        the ranks together read each once, so that a negative or non-finite sample weight anywhere stops
        the run before its first step rather than in the middle, named by the rank that met it, without
        every rank reading a weight a row of the whole data."""
        if not self.columns.weight:
            return
        for group in self.groups[self.rank :: self.world_size]:
            if self._file[0] != group.file:
                self._file = (group.file, open_parquet(group.file))
            column = self._file[1].read_row_group(group.index, columns=[self.columns.weight]).column(0)
            weights = column.to_numpy(zero_copy_only=False).astype(np.float64)
            _check_weights(weights, f"{group.file}: row group {group.index}", self.columns.weight)

    def forget_reads(self) -> None:
        """Drops the open file, the decoded row group and the repair counts: the reader as it was
        made (its plan of the row groups kept, whose making read every file's footer)."""
        self._file, self._decoded = (None, None), (None, None)
        self.counts = {key: 0 for key in self.counts}

    def empty_batch(self) -> Batch:
        """A batch of no rows, with this data's columns (for a rank whose range is empty)."""
        return _Block.empty(self.columns).to_batch(self.keys)

    def _blocks(self, epoch: int, skip_rows: int) -> Iterator[_Block]:
        pieces = self._pieces(epoch)
        if not self.shuffle:
            for group, start, stop in pieces:
                if skip_rows >= stop - start:
                    skip_rows -= stop - start
                    continue
                yield self._rows(group, start + skip_rows, stop)
                skip_rows = 0
            return
        window = self.shuffle_rows
        bounds = np.cumsum([0] + [stop - start for _, start, stop in pieces])  # rank-local row offsets
        for k in range(skip_rows // window, math.ceil(self.num_rows / window)):
            lo, hi = k * window, min((k + 1) * window, self.num_rows)
            parts = [
                self._rows(group, start + max(lo - a, 0), start + min(hi, b) - a)
                for (group, start, _), a, b in zip(pieces, bounds[:-1], bounds[1:])
                if a < hi and b > lo
            ]
            block = _Block.concat(parts)
            block = block.take(np.random.default_rng([self.seed, epoch, self.rank, k]).permutation(len(block)))
            yield block.slice(max(skip_rows - lo, 0), len(block))

    def _rows(self, group: RowGroup, start: int, stop: int) -> _Block:
        """Rows ``[start, stop)`` of a row group; the last decoded row group is kept, since shuffle
        windows and rank ranges cut row groups."""
        if self._decoded[0] != group:
            self._decoded = (group, self._decode(group))
        block = self._decoded[1]
        return block if (start, stop) == (0, len(block)) else block.slice(start, stop)

    def _unreadable_column(self, group: RowGroup) -> str:
        """``"column 'x': "`` for the first column of a row group that fails to read on its own."""
        for name in self.columns.all:
            try:
                self._file[1].read_row_group(group.index, columns=[name])
            except (pa.ArrowInvalid, OSError):
                return f"column {name!r}: "
        return ""

    def _decode(self, group: RowGroup) -> _Block:
        cols = self.columns
        if self._file[0] != group.file:  # open each file once, not once per row group
            self._file = (group.file, open_parquet(group.file))
        try:
            table = self._file[1].read_row_group(group.index, columns=cols.all)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{group.file}: row group {group.index}: {self._unreadable_column(group)}cannot be read ({e})") from None
        where = f"{group.file}: row group {group.index}"

        def numeric(name: str, hint: str = "") -> np.ndarray:
            arr = table.column(name)
            if arr.null_count:
                row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{where}: column {name!r}: null value at row {row}{hint}")
            return arr.to_numpy().astype(np.float32, copy=False)

        n = table.num_rows
        dense = np.stack([numeric(c) for c in cols.dense], axis=1) if cols.dense else np.zeros((n, 0), np.float32)
        labelled = np.ones((n, len(cols.labels)), bool) if any(cols.masked) else None
        labels = np.zeros((n, len(cols.labels)), np.float32)
        for k, name in enumerate(cols.labels):
            if name is None:  # absent from the data (scoring unlabelled data): zeros, never checked
                continue
            if labelled is not None and cols.masked[k]:  # a null or NaN is a missing label: 0, not labelled
                y = table.column(name).cast(pa.float32()).fill_null(math.nan).to_numpy()
                labelled[:, k] = ~np.isnan(y)
                labels[:, k] = np.where(labelled[:, k], y, 0.0)
            else:
                labels[:, k] = numeric(name, " (a task whose label may be missing: tasks[].missing_label: masked)")
        # a float32 column comes without a copy, read-only: a batch's weights own their memory, as the rest do
        weights = np.array(numeric(cols.weight)) if cols.weight else np.ones(n, np.float32)
        _check_weights(weights, where, cols.weight)
        for j, name in enumerate(cols.dense):
            bad = ~np.isfinite(dense[:, j])
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                if cols.on_nonfinite_dense != "impute":
                    raise DataError(
                        f"{where}: column {name!r}: non-finite value {dense[row, j]} at row {row} "
                        "(data.on_nonfinite_dense: impute replaces such values)"
                    )
                dense[bad, j] = cols.impute_value
                self.counts["imputed_dense"] += int(bad.sum())
        for k, (name, kind) in enumerate(zip(cols.labels, cols.label_types)):
            if name is None:
                continue
            y = labels[:, k]
            bad = ~np.isfinite(y) if kind == "regression" else ~((y == 0) | (y == 1))
            bad &= labelled[:, k] if labelled is not None else True
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                expected = "a finite number" if kind == "regression" else "0 or 1"
                raise DataError(f"{where}: label column {name!r}: value {y[row]} at row {row}; a {kind} label must be {expected}")
        sparse = []
        for feature, name in cols.sparse:
            arr = table.column(name).combine_chunks()
            if arr.null_count:
                raise DataError(f"{where}: column {name!r}: null value at row {int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])}")
            if pa.types.is_integer(arr.type):  # one id a row
                values = arr.to_numpy().astype(np.int64, copy=False)
                lengths = np.ones(len(values), np.int32)
            else:
                flat = arr.flatten()
                if flat.null_count:
                    raise DataError(f"{where}: column {name!r}: null id inside a list")
                lengths = np.diff(arr.offsets.to_numpy()).astype(np.int32)
                values = flat.to_numpy().astype(np.int64, copy=False)
            size = self._sizes.get(feature)
            if size is not None and values.size:
                bad = (values < 0) | (values >= size)
                if bad.any():
                    if cols.on_bad_id != "hash":
                        i = int(np.flatnonzero(bad)[0])
                        raise DataError(
                            f"{where}: column {name!r}: id {values[i]} outside the table's range [0, {size}) "
                            "(data.on_bad_id: hash maps such ids into the table)"
                        )
                    values = np.mod(values, size)  # non-negative for negative ids too
                    self.counts["hashed_ids"] += int(bad.sum())
            sparse.append((lengths, values))
        return _Block(dense, sparse, labels, weights, labelled)


def _check_weights(weights: np.ndarray, where: str, column: str) -> None:
    bad = ~(np.isfinite(weights) & (weights >= 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: weight column {column!r}: value {weights[row]} at row {row}; a sample weight must be "
            "finite and >= 0 (0 makes a row count for nothing)"
        )


def columns_from_config(cfg) -> Columns:
    """The reader's column roles for a :class:`concord.trainer.config.Config`."""
    sizes = {f: t.num_embeddings for t in cfg.model.tables for f in t.features}
    features = [f for t in cfg.model.tables for f in t.features]  # KJT key order = table order
    return Columns(
        dense=tuple(cfg.data.dense_columns),
        sparse=tuple((f, cfg.data.sparse_columns[f]) for f in features),
        labels=tuple(t.label for t in cfg.tasks),
        weight=cfg.data.weight_column,
        table_sizes=tuple(sizes.items()),
        label_types=tuple(t.type for t in cfg.tasks),
        masked=tuple(t.missing_label == "masked" for t in cfg.tasks),
        on_bad_id=cfg.data.on_bad_id,
        on_nonfinite_dense=cfg.data.on_nonfinite_dense,
        impute_value=cfg.data.impute_value,
    )
