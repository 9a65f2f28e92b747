"""``concord convert``: raw CSV or Parquet logs -> Concord's Parquet layout, streamed.

Driven by ``data.convert`` in the config (:class:`concord.trainer.config.ConvertConfig`). The input is read
``chunk_rows`` at a time, so files larger than memory work:

- pass 0, a time split without a cutoff only: the times of the rows to write (with ``on_bad_row:
  skip`` every column is decoded for it: a row skipped is none of them), for the cutoff (8
  bytes a row);
- pass 1: the training split only, for the vocabularies (value counts) and the dense statistics
  (mean and variance after the log transform, merged chunk by chunk);
- pass 2: every row, mapped and written to ``data.train`` and ``data.eval``.

Categorical values become ids through a vocabulary of the training split (ids 1..V by falling count,
0 for values unseen in training or rarer than ``min_count``; one per table, shared by its features)
saved as ``vocab/<feature>.parquet``, or through a stable hash (BLAKE2b) into the feature's table size. An empty or missing cell is an
empty bag. Beside the data, ``convert.json`` records the split used, the row counts, every skipped
row by reason and column, the empty and unseen categorical values per feature, the vocabulary sizes,
the dense statistics and the encoding's digest.

Data to score with a trained model is encoded like its training data (``like``): pass 1 is replaced
by that data's vocabularies and statistics, and every row goes to one folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from concord.trainer.config import Config
from concord.trainer.data.raw import bad_value, column_type, csv_columns, input_files, partition_values, read_chunks
from concord.trainer.data.values import (NOT_A_NUMBER_OR_MISSING, NOT_A_TIME, WHAT_A_TIME_IS, ConvertError, as_number, as_text,
                                          holds_categories, holds_stamps, holds_values, matches, parse_number, parse_numbers,
                                          stable_hash, tokens_of, value_advice)
from concord.trainer.observe.progress import progress_bar


def held_out_cutoff(times: np.ndarray, fraction: float) -> float:
    """The time from which rows are held out: of the times rows have (the earliest aside, which would
    hold out every row), the one at or after which the share of rows is closest to ``fraction`` (the
    later on a tie). Rows sharing a time go to one side, so where few times are shared by many rows (a
    survey's years) this is the reachable share nearest the one asked for; with distinct times it is
    the ``1 - fraction`` quantile's row."""
    values, counts = np.unique(times, return_counts=True)
    if values.size == 1:
        return float(values[0])
    share_from = np.cumsum(counts[::-1])[::-1] / times.size  # share of the rows at or after each value
    distance = np.abs(share_from[1:] - fraction)
    return float(values[1:][np.flatnonzero(distance == distance.min())[-1]])

# --- the conversion ------------------------------------------------------------------------------
class _ValueCounts:
    """How often each value of a categorical column occurs, summed chunk by chunk in Arrow: a Python
    counter updated per chunk paid a dictionary operation for every distinct value of every chunk."""

    _COMPACT_AT = 1 << 20  # pending (value, count) pairs before they are summed into one table

    def __init__(self) -> None:
        self._parts: List[pa.Table] = []
        self._pending = 0
        self._summed = 0  # rows of the last sum: compacting again only once as many more arrived

    def add(self, tokens: pa.Array) -> None:
        vc = pc.value_counts(tokens)
        self._parts.append(pa.table({"value": vc.field("values").cast(pa.large_string()), "count": vc.field("counts")}))
        self._pending += len(vc)
        if self._pending >= max(self._COMPACT_AT, self._summed):
            self._parts = [self._sum()]
            self._pending = self._summed = len(self._parts[0])

    def _sum(self) -> pa.Table:
        if not self._parts:
            return pa.table({"value": pa.array([], pa.large_string()), "count": pa.array([], pa.int64())})
        summed = pa.concat_tables(self._parts).group_by("value").aggregate([("count", "sum")])
        return pa.table({"value": summed.column("value"), "count": summed.column("count_sum")})

    def counter(self) -> Counter:
        summed = self._sum()
        return Counter(dict(zip(summed.column("value").to_pylist(), summed.column("count").to_pylist())))


@dataclass
class _Welford:
    """Mean and variance merged chunk by chunk (Chan et al.), stable for long streams."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        n, mean = x.size, float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


@dataclass
class _Moments:
    """A dense column's training mean and standard deviation (after its log transform)."""

    mean: float
    std: float


@dataclass
class _Decoded:
    """One chunk's good rows: dense (n, D) transformed except standardizing, labels (n, T), weights,
    each row's split (``SPLITS``: 0 train, 1 eval, 2 validation), its time (a time split: seconds),
    and the raw chunk (for the categoricals and the passthrough columns) with the file it came from."""

    batch: pa.RecordBatch
    dense: np.ndarray
    labels: np.ndarray
    weights: Optional[np.ndarray]
    split: np.ndarray
    times: Optional[np.ndarray] = None
    path: str = ""


SPLITS = ("train", "eval", "validation")


@dataclass
class Converter:
    """One conversion of ``cfg.data.convert``; :meth:`run` makes the passes and returns the report."""

    cfg: Config
    show_progress: bool = True
    # Encode like this converted data set (its folder: convert.json, vocab/) instead of building an
    # encoding: every input row goes to ``out``, with that data's vocabularies and dense statistics
    # (data to score with a model trained on it); labels and the weight where the input has them.
    like: Optional[Path] = None
    out: Optional[Path] = None

    def __post_init__(self) -> None:
        self._pass_skips: Counter = Counter()  # "column: reason" -> rows dropped in the current pass
        # (label, key) -> values read as 0 that differ from one listed in data.convert.<key> (positive:
        # a 1; unknown: no label) only in case, quotes or a final '.'; counted in the current pass
        self._look_alikes: Dict[Tuple[str, str], Counter] = {}
        self.absent_positives: Dict[str, str] = {}  # label -> note: data.convert.positive's values in no training row
        self.shared_value_notes: List[str] = []  # features of one table that look unrelated but share some values
        self.times_are_stamps = False  # the time column holds dates or timestamps, not plain numbers (years, steps)
        self.unseen_texts: Dict[str, set] = {}  # feature -> some values held-out or encoded rows have and training lacks
        d = self.cfg.data
        self.cv = d.convert
        self.label_inputs: List[Optional[str]] = [self.cv.labels.get(t.label, t.label) for t in self.cfg.tasks]
        by_output = {(rule.name or rule.column): rule for rule in self.cv.dense}
        # a missing indicator reads its rule's column untransformed: 1.0 where missing, else 0.0
        by_output.update({rule.missing_indicator: replace(rule, name=rule.missing_indicator, log=False, standardize=False,
                                                          fill=0.0, missing_indicator=None)
                          for rule in self.cv.dense if rule.missing_indicator is not None})
        self.missing_of = {rule.missing_indicator: rule.column for rule in self.cv.dense if rule.missing_indicator is not None}
        self.dense_rules = [by_output[c] for c in d.dense_columns]  # in the trainer's order
        # None: num_embeddings auto, the table sized by the vocabulary built here
        self.table_size = {f: None if t.sized_by_data else t.num_embeddings
                           for t in self.cfg.model.tables for f in t.features}
        self.weight = self.cv.weight
        sp = self.cv.split
        if self.like is not None:
            self.files = self._files_to_encode_like()
        elif sp.by == "files":  # the user's own split: its files are the input
            self.train_files = {p for spec in sp.train for p, _ in input_files(spec, self.cv.format)}
            self.eval_files = {p for spec in sp.eval for p, _ in input_files(spec, self.cv.format)}
            both = sorted(self.train_files & self.eval_files)
            if both:
                raise ConvertError(f"{both[0]}: listed in both data.convert.split.train and .eval")
            self.files = sorted((p, fmt) for spec in sp.train + sp.eval for p, fmt in input_files(spec, self.cv.format))
        else:
            self.files = input_files(self.cv.input, self.cv.format)
        csv_keys = [k for k in ("column_names", "skip_rows", "comment") if getattr(self.cv, k)]
        if csv_keys and all(fmt == "parquet" for _, fmt in self.files):
            raise ConvertError(f"{self.files[0][0]}: data.convert.{csv_keys[0]} is for CSV files (no header row, lines atop "
                               "the rows), and the input is Parquet, whose columns are named in the file: leave it out")
        columns = [c.column for c in self.cv.categorical] + [r.column for r in self.dense_rules]
        columns += [c for c in self.label_inputs if c is not None] + ([self.weight] if self.weight else [])
        columns += [sp.column] if sp.by in ("time", "column") and self.like is None else []
        self.columns = list(dict.fromkeys(columns + d.passthrough))
        self._read_columns = set(columns)  # the others (passthrough alone) are copied, whatever they hold
        self._passthrough_types: Dict[str, pa.DataType] = {}  # each carried column's type in the output

    def _files_to_encode_like(self) -> List[Tuple[str, str]]:
        """The input to encode like :attr:`like`: ``data.convert.input``. Its labels and weight are
        read where its first file has their columns (data to score often has none): the others are
        left out of :attr:`label_inputs` and :attr:`weight`."""
        if not self.cv.input:
            raise ConvertError(f"{self.cfg.source}: --encode-like reads data.convert.input: set it to the data to encode")
        if self.out is None:
            raise ConvertError("--encode-like needs --out, the folder for the encoded data")
        files = input_files(self.cv.input, self.cv.format)
        path, fmt = files[0]
        try:
            have = set(pq.ParquetFile(path).schema_arrow.names) if fmt == "parquet" else set(csv_columns(path, self.cv))
            have |= set(partition_values(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: not a readable Parquet file ({e})") from None
        self.label_inputs = [c if c in have else None for c in self.label_inputs]
        self.weight = self.weight if self.weight in have else None
        return files

    def load_encoding(self) -> Tuple[Dict[str, List[str]], List[_Moments]]:
        """:attr:`like`'s vocabularies and dense statistics, checked against this config's rules: the
        encoding digest they give must be the one recorded there."""
        like = self.like
        try:
            report = json.loads((like / "convert.json").read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"{like}: not a folder `concord convert` wrote (no readable convert.json: {e})") from None
        vocabs = {}
        for rule in self.cv.categorical:
            if rule.hash:
                continue
            path = like / "vocab" / f"{rule.feature}.parquet"
            try:
                table = pq.read_table(path).to_pydict()
            except (OSError, pa.ArrowInvalid) as e:
                raise ConvertError(f"{path}: the vocabulary of feature {rule.feature!r} cannot be read ({e})") from None
            vocabs[rule.feature] = [v for _, v in sorted(zip(table["id"], table["value"]))]
        moments = []
        for name, rule in zip(self.cfg.data.dense_columns, self.dense_rules):
            stats = report.get("dense", {}).get(name)
            if stats is None:
                raise ConvertError(f"{like}/convert.json: no statistics for dense column {name!r}")
            moments.append(_Moments(float(stats["mean"]), float(stats["std"])))
        digest = encoding_digest(self.cv.categorical, vocabs, self._hashed_sizes(), self._dense_spec(moments))
        if "encoding" not in report:
            raise ConvertError(f"{like}: converted before `concord convert` recorded encodings; convert it again "
                               "(the same config and input give the same ids), then encode like it")
        if digest != report["encoding"]:
            raise ConvertError(
                f"{like}: this config's data.convert rules (categorical, dense, table sizes of hashed features) are "
                f"not the ones it was converted with (encoding {digest}, recorded {report['encoding']}): "
                "encode with the config that converted it"
            )
        return vocabs, moments

    def _check_record_is_ours(self, meta_dir: Path) -> None:
        """The record beside the outputs (``convert.json``, ``vocab/``) is this conversion's to replace:
        a data set's own (its splits converted again), or, encoding data to score, the record of the same
        ``--out``. Another conversion's record replaced would describe its data with this encoding, so
        that data encoded like it later would get this data's ids, silently."""
        try:
            report = json.loads((meta_dir / "convert.json").read_text())
        except (OSError, ValueError):  # none yet, or one cut short, which describes nothing any more
            return
        split = report.get("split") if isinstance(report, dict) else None
        encoded_like = split.get("encoded_like") if isinstance(split, dict) else None
        if self.like is None:
            if encoded_like is None:
                return
            raise ConvertError(
                f"{meta_dir}: holds the record (convert.json, vocab/) of data encoded like {encoded_like}, which "
                f"converting {self.cfg.source}'s splits there would replace; put data.train and data.eval in a folder of their own"
            )
        if encoded_like is not None and report.get("output") == self.out.name:
            return
        what = (f"data encoded like {encoded_like}" + (f" in {meta_dir / report['output']}" if report.get("output") else "")
                if encoded_like is not None else "the data set converted there")
        raise ConvertError(
            f"--out {self.out}: {meta_dir} holds the record (convert.json, vocab/) of {what}, which this encoding would "
            f"replace; give the encoded data a folder of its own, e.g. --out {meta_dir / (self.out.name + '-encoded') / self.out.name}"
        )

    def _hashed_sizes(self) -> Dict[str, int]:
        """The table size each hashed feature's values are hashed into."""
        return {r.feature: self.table_size[r.feature] for r in self.cv.categorical if r.hash}

    def _dense_spec(self, moments: List[_Moments]) -> Dict[str, Dict]:
        """Each dense column's transform and statistics, as the encoding digest and convert.json record them."""
        return {name: {"mean": m.mean, "std": m.std, "log": r.log, "standardize": r.standardize, "fill": r.fill,
                       **({"missing_indicator_of": self.missing_of[name]} if name in self.missing_of else {})}
                for name, r, m in zip(self.cfg.data.dense_columns, self.dense_rules, moments)}

    # --- passes --------------------------------------------------------------------------------
    def _stream(self, what: str, columns: Optional[List[str]] = None) -> Iterator[Tuple[str, str, int, pa.RecordBatch]]:
        bar = progress_bar(None, f"convert: {what}", "row", enabled=self.show_progress)
        for path, fmt in self.files:
            for first, batch in read_chunks(path, fmt, columns or self.columns, self.cv, self._pass_skips, self.cfg.data.passthrough):
                yield path, fmt, first, batch
                bar.update(batch.num_rows)
        bar.close()

    def time_cutoff(self) -> float:
        sp = self.cv.split
        if sp.cutoff is not None:
            cutoff = parse_number(sp.cutoff, time=True)
            if cutoff is None:
                raise ConvertError(f"{self.cfg.source}: data.convert.split.cutoff: not a number or ISO-8601 time: {sp.cutoff!r}")
            return cutoff
        # Over the rows that will be written, so that eval_fraction is the share of the output held
        # out. Where bad rows (or rows without labels) are skipped, a row skipped for a value elsewhere
        # is none of them, so every column is decoded; else any bad row stops the conversion, and
        # reading the time column alone gives the same rows for far less work.
        times = []
        if self.cv.on_bad_row == "skip" or self.cv.unlabelled_rows == "skip":
            times = [chunk.times for chunk in self._decoded("time column", math.inf)]
        else:
            self._pass_skips = Counter()
            for path, fmt, first, batch in self._stream("time column", [sp.column]):
                values, bad = self._numbers(path, batch, sp.column, time=True)
                bad |= ~np.isfinite(values)
                if bad.any():  # the writing pass would stop there: say so now, not "no row" after skipping them all
                    i = int(np.flatnonzero(bad)[0])
                    value = batch.column(0)[i].as_py()
                    advice = value_advice(value, sp.column, NOT_A_TIME, self.cv.thousands_separator) or WHAT_A_TIME_IS
                    raise bad_value(path, fmt, first + i, sp.column, value, NOT_A_TIME, advice, cv=self.cv)
                times.append(values)
        times = np.concatenate(times) if times else np.zeros(0)
        if times.size == 0:
            skipped = f" ({sum(self._pass_skips.values())} rows skipped: {dict(self._pass_skips)})" if self._pass_skips else ""
            raise ConvertError(f"{self.cv.input}: no row to split by time column {sp.column!r}{skipped}")
        return held_out_cutoff(times, sp.eval_fraction)

    def _numbers(self, path: str, batch: pa.RecordBatch, column: str, time: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """:func:`parse_numbers` of ``column``; a column of a type that holds no numbers (a list, a
        struct, bytes that are not text) is an error naming it."""
        try:
            return parse_numbers(batch.column(column), time, self.cv.thousands_separator)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ConvertError(f"{path}: column {column!r} holds {batch.column(column).type}: not numbers, nor text "
                               "that convert reads as numbers") from None

    def decode(self, path: str, fmt: str, first: int, batch: pa.RecordBatch, rngs, cutoff) -> _Decoded:
        """Parses one chunk; drops (skip) or reports (error) its bad rows; assigns the split."""
        n = batch.num_rows
        bad_rows = np.zeros(n, dtype=bool)
        categorical = {rule.column for rule in self.cv.categorical}
        for name in self._read_columns:
            kind = batch.column(name).type
            if name in categorical and not holds_categories(kind):
                raise ConvertError(f"{path}: column {name!r} holds {kind}: a categorical column holds text, numbers or "
                                   "dates, or a list of them (a multi-hot bag)")
            if name not in categorical and not holds_values(kind):
                raise ConvertError(f"{path}: column {name!r} holds {kind}: convert reads text, numbers, dates or true/false there")

        def check(bad: np.ndarray, column: str, reason: str, keeps: str = "", reads_it: str = "") -> None:
            new = bad & ~bad_rows
            if not new.any():
                return
            if self.cv.on_bad_row == "error":
                i = int(np.flatnonzero(new)[0])
                value = batch.column(column)[i].as_py()
                reads_it = value_advice(value, column, reason, self.cv.thousands_separator) or reads_it
                raise bad_value(path, fmt, first + i, column, value, reason, reads_it, keeps, self.cv)
            self._pass_skips[f"{column}: {reason}"] += int(new.sum())
            bad_rows[new] = True

        dense = np.zeros((n, len(self.dense_rules)))
        parsed: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # a column read by a value and its missing indicator: once
        for k, (name, rule) in enumerate(zip(self.cfg.data.dense_columns, self.dense_rules)):
            if rule.column not in parsed:
                parsed[rule.column] = self._numbers(path, batch, rule.column)
                check(parsed[rule.column][1], rule.column, "not a number")
                check(np.isinf(parsed[rule.column][0]), rule.column, "not finite")
            values = parsed[rule.column][0]
            if name in self.missing_of:
                values = np.isnan(values).astype(np.float64)
            elif rule.log:
                values = np.sign(values) * np.log1p(np.abs(values))
            dense[:, k] = values  # NaN = missing, filled after standardizing
        labels = np.zeros((n, len(self.label_inputs)))  # NaN: a missing label of a masked task
        for k, (column, task) in enumerate(zip(self.label_inputs, self.cfg.tasks)):
            if column is None:  # encoding data to score that has no such label
                continue
            masked = task.missing_label == "masked"
            readers = [i for i, c in enumerate(self.label_inputs) if c == column]
            keeps = ("" if len(readers) == len(self.cfg.tasks) else  # no other task for such a row to train
                     f"; missing_label: masked on {', '.join(f'tasks[{i}]' for i in readers)} keeps them for the other tasks")
            unknown = self.cv.unknown.get(task.label, [])  # values that mean no label (the task is masked)
            if task.label in self.cv.positive:  # a text label: 1 for the listed values, else 0
                text = pc.utf8_trim_whitespace(as_text(batch.column(column)))
                missing = text.is_null().to_numpy(zero_copy_only=False) | matches(text, unknown)
                if not masked:
                    check(missing, column, "missing label", keeps)
                positive = pc.is_in(text, value_set=pa.array(self.cv.positive[task.label])).fill_null(False).to_numpy(zero_copy_only=False)
                labels[:, k] = np.where(missing, np.nan, positive)
                self._count_look_alikes(task.label, text.filter(pa.array(~missing & ~positive)))
                continue
            values, bad = self._numbers(path, batch, column)
            if unknown:
                said_unknown = matches(pc.utf8_trim_whitespace(as_text(batch.column(column))), unknown, values)
                values, bad = np.where(said_unknown, np.nan, values), bad & ~said_unknown
            text_label = (f"a binary label written as text is read with data.convert.positive: {{{task.label}: [the values "
                          "that mean 1]}; " if task.type == "binary" else "")
            check(bad, column, "not a number", reads_it=text_label)
            if not masked:
                check(~bad & np.isnan(values), column, "missing label", keeps)
            check(np.isinf(values), column, "not finite")
            bounds = self.cv.positive_range.get(task.label)
            if bounds is not None:  # a measure: 1 inside the range, else 0
                inside = np.isfinite(values)
                if bounds.at_least is not None:
                    inside &= values >= bounds.at_least
                if bounds.at_most is not None:
                    inside &= values <= bounds.at_most
                values = np.where(np.isnan(values), np.nan, inside)
            elif task.type == "binary":
                check(np.isfinite(values) & (values != 0) & (values != 1), column, f"task {task.name!r} is binary: the label must be 0 or 1")
            labels[:, k] = values
        if self.cv.unlabelled_rows == "skip" and self.like is None and labels.shape[1]:
            unlabelled = np.isnan(labels).all(axis=1) & ~bad_rows  # every task masked here: nothing to train
            self._pass_skips["no label for any task"] += int(unlabelled.sum())
            bad_rows |= unlabelled
        weights = None
        if self.weight:
            weights, bad = self._numbers(path, batch, self.weight)
            check(bad | ~np.isfinite(weights), self.weight, NOT_A_NUMBER_OR_MISSING)
            check(np.isfinite(weights) & (weights < 0), self.weight, "negative weight")
        if self.like is not None or self.cv.split.by == "none":  # every row to one output (and validation's coin)
            is_eval = np.zeros(n, dtype=bool)
        elif self.cv.split.by == "time":
            column = batch.column(self.cv.split.column)
            times, bad = self._numbers(path, batch, self.cv.split.column, time=True)
            check(bad | ~np.isfinite(times), self.cv.split.column, NOT_A_TIME, reads_it=WHAT_A_TIME_IS)
            self.times_are_stamps = self.times_are_stamps or holds_stamps(column)
            is_eval = times >= cutoff
        elif self.cv.split.by == "files":
            is_eval = np.full(n, path in self.eval_files)
        elif self.cv.split.by == "column":
            names = as_text(batch.column(self.cv.split.column))
            check(names.is_null().to_numpy(zero_copy_only=False), self.cv.split.column, "missing split name")
            is_eval = pc.is_in(pc.utf8_trim_whitespace(names), value_set=pa.array([str(v) for v in self.cv.split.eval]))
            is_eval = is_eval.fill_null(False).to_numpy(zero_copy_only=False)
        else:
            is_eval = rngs[0].random(n) < self.cv.split.eval_fraction  # drawn for every row, so passes agree
        split = is_eval.astype(np.int8)
        if self.cv.split.validation_fraction > 0 and self.like is None:  # a coin of its own: the eval rows stay the same with or without it
            split[~is_eval & (rngs[1].random(n) < self.cv.split.validation_fraction)] = 2
        keep = ~bad_rows
        return _Decoded(
            batch.filter(pa.array(keep)), dense[keep], labels[keep], None if weights is None else weights[keep], split[keep],
            times[keep] if self.like is None and self.cv.split.by == "time" else None, path,
        )

    def _decoded(self, what: str, cutoff) -> Iterator[_Decoded]:
        self._pass_skips, self._look_alikes = Counter(), {}
        rngs = (np.random.default_rng(self.cv.split.seed), np.random.default_rng([self.cv.split.seed, 2]))
        for path, fmt, first, batch in self._stream(what):
            yield self.decode(path, fmt, first, batch, rngs, cutoff)

    def statistics(self, cutoff) -> Tuple[Dict[str, List[str]], List[_Moments]]:
        """Pass 1: vocabularies and dense statistics over the training split.

        Features that share a table share one vocabulary, so the same value is the same row whichever
        feature holds it (a clicked item and the candidate item, say). It holds every value that
        meets the ``min_count`` of a feature holding it, by falling count over the table's features."""
        counts = {c.feature: _ValueCounts() for c in self.cv.categorical if not c.hash}
        moments = [_Welford() for _ in self.dense_rules]
        text_labels = {task.label: _TextLabel(column, self.cv.positive[task.label]) for task, column in zip(self.cfg.tasks, self.label_inputs)
                       if task.label in self.cv.positive and column is not None}
        for chunk in self._decoded("statistics (training split)", cutoff):
            in_train = chunk.split == 0
            train = chunk.batch.filter(pa.array(in_train))
            for label in text_labels.values():
                label.add(train.column(label.column))
            for rule in self.cv.categorical:
                if not rule.hash:
                    counts[rule.feature].add(tokens_of(train.column(rule.column), rule.separator)[0])
            dense = chunk.dense[in_train]
            for k, m in enumerate(moments):
                column = dense[:, k]
                m.add(column[np.isfinite(column)])
        self.absent_positives = {name: note for name, label in text_labels.items() if (note := label.absent_positives(name))}
        counts = {feature: values.counter() for feature, values in counts.items()}
        vocabs = {}
        for table, rules in self._vocabulary_tables().items():
            self.shared_value_notes += _shared_value_notes(table, [(rule.feature, counts[rule.feature]) for rule in rules])
            total, kept = Counter(), set()
            for rule in rules:
                total.update(counts[rule.feature])
                kept.update(v for v, c in counts[rule.feature].items() if c >= rule.min_count)
            vocab = [v for _, v in sorted((-total[v], v) for v in kept)]  # by falling count, then value
            size = self.table_size[rules[0].feature]
            if size is not None and len(vocab) + 1 > size:
                features = " and ".join(repr(r.feature) for r in rules)
                raise ConvertError(
                    f"{self.cfg.source}: table {table!r} (feature{'s' if len(rules) > 1 else ''} {features}): the training "
                    f"split has {len(vocab)} values (+1 for unseen) but the table holds {size} rows; raise its "
                    "num_embeddings (or set it to auto), raise data.convert.categorical min_count, or set hash: true"
                )
            vocabs.update({rule.feature: vocab for rule in rules})
        return vocabs, [_Moments(m.mean, m.std) for m in moments]

    def _write(self, writers: List["_SplitWriter"], codes: List[int], names: List[str], cutoff, labelled, scale, vocab_arrays):
        """Pass 2: every row encoded into the writer of its split (``codes[i]``: writer i's ``SPLITS``
        index); the rows written, dense values filled, label sums and labelled rows per writer."""
        d = self.cfg.data
        rows, filled = [0] * len(writers), Counter()
        empty = Counter()  # rows whose categorical value is missing: an empty bag
        unseen = [Counter() for _ in writers]  # rows holding a value the vocabulary lacks: the unseen row, id 0
        unlabelled = [0] * len(writers)  # rows kept without a label for any task
        labels = _SplitTotals(len(writers), len(self.cfg.tasks))
        time_range = [math.inf, -math.inf]  # of a time split's column, to say why a split is empty
        self.split_values = Counter()  # a split by column: the rows each of its values holds
        by_column = self.cv.split.by == "column" and self.like is None
        for chunk in self._decoded("writing", cutoff):
            if chunk.times is not None and chunk.times.size:
                time_range = [min(time_range[0], float(chunk.times.min())), max(time_range[1], float(chunk.times.max()))]
            if by_column:
                held = pc.value_counts(pc.utf8_trim_whitespace(as_text(chunk.batch.column(self.cv.split.column))))
                self.split_values.update(dict(zip(held.field("values").to_pylist(), held.field("counts").to_pylist())))
            for split, code in enumerate(codes):
                mask = chunk.split == code
                if not mask.any():
                    continue
                part = chunk.batch.filter(pa.array(mask))
                cols: Dict[str, pa.Array] = {}
                for rule in self.cv.categorical:
                    ids = self.ids(part.column(rule.column), rule, vocab_arrays.get(rule.feature))
                    empty[rule.feature] += int(np.count_nonzero(np.diff(ids.offsets.to_numpy()) == 0))
                    if not rule.hash:
                        parents = pc.list_parent_indices(ids).to_numpy()
                        rows_unseen = int(np.unique(parents[ids.values.to_numpy() == 0]).size)
                        unseen[split][rule.feature] += rows_unseen
                        if rows_unseen and (self.like is not None or code != 0):  # rows the vocabulary was not built on
                            self._collect_unseen(part.column(rule.column), rule, vocab_arrays[rule.feature])
                    cols[d.sparse_columns[rule.feature]] = ids
                for k, (name, rule) in enumerate(zip(d.dense_columns, self.dense_rules)):
                    values = (chunk.dense[mask, k] - scale[k][0]) / scale[k][1]
                    missing = np.isnan(values)
                    filled[name] += int(missing.sum())
                    cols[name] = pa.array(np.where(missing, rule.fill, values).astype(np.float32))
                for k, task in labelled:
                    values = chunk.labels[mask, k]  # a missing label (masked task): null
                    cols[task.label] = pa.array(values.astype(np.float32), mask=np.isnan(values))
                if d.weight_column and self.weight:
                    cols[d.weight_column] = pa.array(chunk.weights[mask].astype(np.float32))
                for name in d.passthrough:
                    cols[name] = self._carried(part.column(name), name, chunk.path)
                writers[split].write(pa.table(cols))
                rows[split] += int(mask.sum())
                labels.add(split, chunk.labels[mask], None if chunk.weights is None else chunk.weights[mask])
                if labelled:
                    unlabelled[split] += int(np.isnan(chunk.labels[mask][:, [k for k, _ in labelled]]).all(axis=1).sum())
        for w in writers:
            w.close()
        for split, count in zip(names, rows):
            if count == 0:
                why = self._time_split_emptied(split, cutoff, *time_range) if self.cv.split.by == "time" else ""
                raise ConvertError(f"{self.cv.input}: the {split} split is empty{why}; check data.convert.split" if self.like is None
                                   else f"{self.cv.input}: no rows to encode")
        return rows, filled, empty, unseen, unlabelled, labels

    def _time_split_emptied(self, split: str, cutoff: float, first: float, last: float) -> str:
        """Why a time split left ``split`` empty: where the cutoff lies against the column's times,
        and where the cutoff's form and the column's differ (a date against plain numbers, which are
        not seconds since 1970 if they are milliseconds or years), which reads it in other units."""
        if first > last or split not in ("train", "eval"):
            return ""

        def shown(seconds: float) -> str:
            return f"{seconds:.12g}" + (f" ({_utc(seconds)})" if self.times_are_stamps else "")

        side = "at or after" if split == "train" else "before"
        why = (f": every row's {self.cv.split.column} is {side} the cutoff {shown(cutoff)}; the column's times run from "
               f"{shown(first)} to {shown(last)}")
        given = self.cv.split.cutoff
        if isinstance(given, str) and parse_number(given) is None and not self.times_are_stamps:
            why += (f" (plain numbers, where the cutoff {given!r} reads as seconds since 1970, UTC: give the cutoff in "
                    "the column's own units)")
        elif given is not None and parse_number(given) is not None and self.times_are_stamps:
            why += f" (dates or times, where the cutoff {given!r} reads as seconds since 1970: write it as a date)"
        return why

    def _carried(self, values: pa.Array, name: str, path: str) -> pa.Array:
        """A passthrough column as it came (CSV: text), in the type its first chunk had: one Parquet
        schema for the whole output, whatever types the input files gave it. A first chunk of nulls
        alone (an untyped column in its file) takes the type of the first file that types it."""
        first = self._passthrough_types.get(name)
        if first is None:
            first = values.type
            if pa.types.is_null(first):
                typed = (column_type(path, fmt, name) for path, fmt in self.files)
                first = next((kind for kind in typed if not pa.types.is_null(kind)), first)
            self._passthrough_types[name] = first
        if values.type == first:
            return values
        try:
            return values.cast(first)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ConvertError(f"{path}: column {name!r} (data.passthrough) is {values.type} here but {first} in the "
                               f"input before it, and does not convert ({e}); give it one type in every file") from None

    def _split_value_notes(self) -> List[str]:
        """A split by column: each value of data.convert.split.eval that no row holds (a value spelled
        otherwise in the data holds its rows in training)."""
        if not self.split_values:
            return []
        held = ", ".join(f"{value!r}" for value, _ in self.split_values.most_common(8))
        return [f"data.convert.split.eval lists {str(value)!r}, which no row's {self.cv.split.column} holds (it holds {held}): "
                "rows of a value not listed there are training rows" for value in self.cv.split.eval
                if str(value) not in self.split_values]

    def _one_class_notes(self, labelled, sums: np.ndarray, counts: np.ndarray) -> List[str]:
        """Binary tasks whose training split holds one label only: their head can learn only a
        constant and their NE and AUC are undefined; the cause is usually the label's rule (a text
        label's absent positives are noted already)."""
        return [f"task {task.name!r}: every labelled row of the training split is {int(sums[k] > 0)} (column "
                f"{self.label_inputs[k]!r}): its head can learn only a constant; check the label's rule "
                "(data.convert.positive, positive_range)"
                for k, task in labelled if task.type == "binary" and counts[k] and sums[k] in (0, counts[k]) and task.label not in self.absent_positives]

    def _constant_dense_notes(self, moments: List[_Moments]) -> List[str]:
        """Dense columns without spread over the training split: a feature the model cannot use."""
        return [(f"dense column {name!r}, the missing indicator of {rule.column!r}, is {m.mean:g} on every training row "
                 f"({rule.column!r} {'always' if m.mean else 'never'} missing there): the model cannot learn from it"
                 if name in self.missing_of else
                 f"dense column {rule.column!r} does not vary over the training split (each value {m.mean:g} after its "
                 "transform, or missing): the model cannot learn from it")
                for name, rule, m in zip(self.cfg.data.dense_columns, self.dense_rules, moments) if m.std == 0]

    @staticmethod
    def _unlabelled_notes(unlabelled: int, rows: int) -> List[str]:
        """Training rows without any task's label train nothing, yet take a batch's places and count in
        every masked task's loss as rows without its label do (each loss is a sum over its labelled rows
        divided by the batch's rows)."""
        if not unlabelled:
            return []
        return [f"{unlabelled:,} training rows ({unlabelled / rows:.1%}) have no label for any task: they train nothing but "
                "take places in every batch; data.convert.unlabelled_rows: skip leaves them out"]

    def _vocabulary_tables(self) -> Dict[str, List]:
        """Table name -> the categorical rules of its features that build a vocabulary."""
        table_of = {f: t.name for t in self.cfg.model.tables for f in t.features}
        tables: Dict[str, List] = {}
        for rule in self.cv.categorical:
            if not rule.hash:
                tables.setdefault(table_of[rule.feature], []).append(rule)
        return tables

    def ids(self, arr: pa.Array, rule, vocab: Optional[pa.Array]) -> pa.Array:
        """A categorical column -> list<int64> ids per row."""
        tokens, parents = tokens_of(arr, rule.separator)
        if rule.hash:
            uniques = pc.unique(tokens)
            table = stable_hash(uniques.to_pylist(), self.table_size[rule.feature])
            ids = table[pc.index_in(tokens, value_set=uniques).to_numpy(zero_copy_only=False)] if len(tokens) else np.zeros(0, np.int64)
        else:
            index = pc.fill_null(pc.index_in(tokens, value_set=vocab), -1).to_numpy(zero_copy_only=False)
            ids = index.astype(np.int64) + 1  # 0 = unseen
        offsets = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=len(arr)))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))

    _UNSEEN_KEPT = 1000  # distinct unseen values a feature keeps for the number-form note

    def _collect_unseen(self, column: pa.Array, rule, vocab: pa.Array) -> None:
        """Some of the distinct values of ``column`` that ``vocab`` lacks, for :meth:`_number_form_notes`."""
        kept = self.unseen_texts.setdefault(rule.feature, set())
        if len(kept) < self._UNSEEN_KEPT:
            tokens, _ = tokens_of(column, rule.separator)
            outside = pc.unique(tokens.filter(pc.invert(pc.fill_null(pc.is_in(tokens, value_set=vocab), False))))
            kept.update(outside.to_pylist()[:self._UNSEEN_KEPT - len(kept)])

    def _count_look_alikes(self, label: str, zeros: pa.Array) -> None:
        """Counts the values of ``zeros`` (a text label's values read as 0) that look like one listed
        as 1 or as no label (``'>50K.'`` beside ``'>50K'``, as UCI's adult.test writes the label)."""
        forms = {key: {_label_form(str(v)) for v in listed.get(label, [])}
                 for key, listed in (("positive", self.cv.positive), ("unknown", self.cv.unknown))}
        vc = pc.value_counts(zeros)
        for value, count in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            for key, listed_forms in forms.items():
                if _label_form(value) in listed_forms:
                    self._look_alikes.setdefault((label, key), Counter())[value] += count

    def _look_alike_notes(self) -> List[str]:
        def counted(values: Counter) -> str:
            return ", ".join(f"{v!r} ({n:,} row{'s' if n != 1 else ''})" for v, n in values.most_common())

        means = {"positive": "1", "unknown": "no label"}
        return [f"data.convert.{key}.{label}: rows read as 0 hold {counted(values)}, each unlike a value listed "
                f"there ({', '.join(repr(v) for v in getattr(self.cv, key)[label])}) only in case, quotes or a final "
                f"'.': list it too if it means {means[key]} (values are compared as text, spaces trimmed)"
                for (label, key), values in sorted(self._look_alikes.items())
                if not (key == "positive" and label in self.absent_positives)]  # that note names the values

    def _number_form_notes(self, vocabs: Dict[str, List[str]]) -> List[str]:
        """Features whose held-out (or encoded) values include numbers the training vocabulary holds
        written otherwise (``3`` beside ``3.0``: pandas writes an integer column with missing values as
        floats): a category is its text, so such rows read as the unseen row, with no error."""
        notes = []
        for feature, texts in sorted(self.unseen_texts.items()):
            written = {}
            for value in vocabs.get(feature, []):
                number = as_number(value)
                if number is not None:
                    written.setdefault(number, value)
            pairs = [(text, written[n]) for text in sorted(texts) if (n := as_number(text)) is not None and n in written]
            if pairs:
                text, value = pairs[0]
                notes.append(f"feature {feature!r}: {len(pairs)} value(s) outside the training vocabulary are numbers it "
                             f"holds written otherwise ({text!r} here, {value!r} in training): a category is its text, so "
                             "they read as the unseen row (id 0); write the column as the training data has it (pandas "
                             "writes an integer column with missing values as 3.0)")
        return notes

    def run(self, force: bool = False) -> Dict:
        d = self.cfg.data
        if self.like is not None:  # data to score: every row to one output, encoded like `like`
            outputs, codes, names = [Path(self.out)], [0], ["data"]
        else:
            codes = [0] + ([1] if self.cv.split.by != "none" else []) + ([2] if self.cv.split.validation_fraction > 0 else [])
            outputs = [Path({0: d.train, 1: d.eval, 2: d.validation}[code]) for code in codes]
            names = [SPLITS[code] for code in codes]
        for out in outputs:
            if out.exists() and any(out.iterdir()) and not force:
                raise ConvertError(f"{out}: already holds data; use --force to overwrite")
        meta_dir = outputs[0].parent
        if self.like is not None and meta_dir.resolve() == Path(self.like).resolve():
            raise ConvertError(f"--out {self.out}: a folder beside the data it is encoded like would replace that data's "
                               f"convert.json and vocab/; choose a folder outside {self.like}")
        self._check_record_is_ours(meta_dir)
        cutoff = self.time_cutoff() if self.cv.split.by == "time" and self.like is None else None
        vocabs, moments = self.load_encoding() if self.like is not None else self.statistics(cutoff)
        vocab_arrays = {f: pa.array(v, pa.string()) for f, v in vocabs.items()}
        scale = [(m.mean, m.std if m.std > 0 else 1.0) if r.standardize else (0.0, 1.0) for r, m in zip(self.dense_rules, moments)]
        labelled = [(k, task) for k, task in enumerate(self.cfg.tasks) if self.label_inputs[k] is not None]
        tmp = [out.with_name(out.name + ".tmp") for out in outputs]
        for t in tmp:
            shutil.rmtree(t, ignore_errors=True)
            t.mkdir(parents=True)
        writers = [_SplitWriter(t / "part-00000.parquet", self.cv.row_group_size) for t in tmp]
        try:
            rows, filled, empty, unseen, unlabelled, label_totals = self._write(
                writers, codes, names, cutoff, labelled, scale, vocab_arrays)
        except BaseException:  # a bad row, an empty split, an interrupt: no half-written split left behind
            for t in tmp:
                shutil.rmtree(t, ignore_errors=True)
            raise
        for t, out in zip(tmp, outputs):  # replace the outputs only once everything is written
            shutil.rmtree(out, ignore_errors=True)
            t.rename(out)
        vocab_dir = meta_dir / "vocab"
        shutil.rmtree(vocab_dir, ignore_errors=True)
        vocab_dir.mkdir(parents=True)
        for feature, values in vocabs.items():
            pq.write_table(pa.table({"value": values, "id": list(range(1, len(values) + 1))}), vocab_dir / f"{feature}.parquet")
        hashed, dense = self._hashed_sizes(), self._dense_spec(moments)
        notes = [*self._number_form_notes(vocabs), *self._look_alike_notes()] if self.like is not None else [
            *self._number_form_notes(vocabs), *self._look_alike_notes(), *self.absent_positives.values(),
            *self._one_class_notes(labelled, label_totals.sums[0], label_totals.counts[0]),
            *self._unlabelled_notes(unlabelled[0], rows[0]), *self._constant_dense_notes(moments), *self.shared_value_notes,
            *self._split_value_notes()]
        report = {
            "input": [p for p, _ in self.files],
            "split": ({"encoded_like": str(self.like)} if self.like is not None else
                      {**vars(self.cv.split), "cutoff_used": cutoff,
                       # seconds since the epoch only where the column holds times, not plain numbers (a year)
                       "cutoff_used_utc": _utc(cutoff) if cutoff is not None and self.times_are_stamps else None}),
            **({"output": self.out.name} if self.like is not None else {}),  # the folder this record describes
            "rows": dict(zip(names, rows)),
            **({"split_values": dict(sorted(self.split_values.items()))} if self.split_values else {}),
            "row_groups": {split: w.row_groups for split, w in zip(names, writers)},
            "skipped_rows": dict(self._pass_skips),
            "filled_dense": dict(filled),
            "empty_categorical": dict(empty),  # rows with no value: an empty bag, which the table reads as nothing
            # rows with a value outside the vocabulary (unseen in training, or rarer than min_count): id 0
            "unseen_values": {split: dict(counts) for split, counts in zip(names, unseen)},
            "passthrough": list(d.passthrough),  # input columns copied unchanged
            # a binary task's positive rate, a regression's mean label, over the rows with the label:
            # what a label rule made of the input; with a weight column, weighted as the loss and the
            # evaluation weigh rows (the constant a head is best started at), and also unweighted
            "label_means": label_totals.means(names, labelled, weighted=label_totals.weighted),
            **({"unweighted_label_means": label_totals.means(names, labelled, weighted=False)} if label_totals.weighted else {}),
            # rows with each task's label (below the split's rows only for a task whose label may be missing)
            "labelled_rows": {split: {task.name: int(counts[k]) for k, task in labelled}
                              for split, counts in zip(names, label_totals.counts)},
            "unlabelled_rows": dict(zip(names, unlabelled)),  # rows kept with no task's label (unlabelled_rows: keep)
            **({"weights": label_totals.weight_summary(names)} if label_totals.weighted else {}),
            "vocab_sizes": {f: len(v) for f, v in vocabs.items()},
            "hashed": hashed,
            "dense": {name: {k: v for k, v in spec.items() if k != "fill"} for name, spec in dense.items()},
            "encoding": encoding_digest(self.cv.categorical, vocabs, hashed, dense),
            "notes": notes,  # what the user should look at before training on it
        }
        # Written aside and renamed: a convert stopped here leaves the previous record or none, never half of one.
        written = meta_dir / "convert.json.tmp"
        written.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(written, meta_dir / "convert.json")
        return report


class _TextLabel:
    """The values of a text label column over the training split, against the values that mean 1
    (``data.convert.positive``): where no row holds any of them (``"Yes"`` listed for ``yes``) every
    label is 0, and the note says which values there are."""

    SHOWN, KEPT = 5, 10_000  # values named in the note; distinct values counted for it

    def __init__(self, column: str, positive: List[str]) -> None:
        self.column, self.positive = column, pa.array(positive, pa.string())
        self.found = False
        self.counts: Counter = Counter()

    def add(self, column: pa.Array) -> None:
        text = pc.utf8_trim_whitespace(as_text(column)).drop_null()
        self.found = self.found or bool(pc.any(pc.is_in(text, value_set=self.positive)).as_py())
        if len(self.counts) < self.KEPT:
            vc = pc.value_counts(text)
            self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))

    def absent_positives(self, label: str) -> Optional[str]:
        if self.found or not self.counts:
            return None
        commonest = ", ".join(repr(v) for v, _ in self.counts.most_common(self.SHOWN))
        return (f"data.convert.positive.{label}: no row of the training split holds "
                f"{', '.join(repr(v) for v in self.positive.to_pylist())} in column {self.column!r}, so every label is 0 "
                f"(its commonest values: {commonest}; compared as text, spaces trimmed, case kept)")


def _label_form(text: str) -> str:
    """A text label as compared for look-alikes of the positive values: quotes, a final '.' and case
    set aside."""
    return text.strip().strip("\"'").rstrip(".").strip().casefold()


_FEW_VALUES = 16  # a feature with no more values than this may share them with another by chance


def _shared_value_notes(table: str, features: List[Tuple[str, Counter]]) -> List[str]:
    """Features of a table that hold some of the same values but mostly others: each shared value is
    one embedding row for both, which is what sharing a table means for ids of one kind (a clicked
    item and the candidate item) and a silent merge for codes of different things put in one table
    (``none`` as an airbag's state and as a seat belt's). Pairs sharing most of their values are the
    first kind, and those sharing none merge nothing: neither is noted. But codes with few values
    (flags, 0/1 or yes/no; a credit history 1-6 beside a mortgage history 1-4) share most of them
    whatever they mean: where a feature has ``_FEW_VALUES`` or fewer, sharing tells nothing, and any
    shared value is noted. Features linked through such pairs (ten yes/no questions in one table)
    are one note, not one a pair."""
    linked: Dict[str, str] = {name: name for name, _ in features}  # union-find over the noted pairs

    def root(name: str) -> str:
        while linked[name] != name:
            name = linked[name]
        return name

    pairs = []
    for i, (a, a_counts) in enumerate(features):
        for b, b_counts in features[i + 1 :]:
            shared = a_counts.keys() & b_counts.keys()
            fewest = min(len(a_counts), len(b_counts))
            if shared and (2 * len(shared) <= fewest or fewest <= _FEW_VALUES):
                pairs.append((a, b, shared))
                linked[root(b)] = root(a)
    counts = dict(features)
    notes = []
    for group in dict.fromkeys(root(name) for name, _ in features):
        members = [(a, b, shared) for a, b, shared in pairs if root(a) == group]
        if not members:
            continue
        names = [name for name, _ in features if root(name) == group]  # in the table's order
        shared = set().union(*(shared for _, _, shared in members))
        total = Counter({v: sum(counts[name][v] for name in names) for v in shared})
        commonest = sorted(shared, key=lambda v: (-total[v], v))[:3]
        examples = ", ".join(repr(v) for v in commonest) + (", ..." if len(shared) > 3 else "")
        if len(names) == 2:
            notes.append(f"table {table!r}: features {names[0]!r} and {names[1]!r} share {len(shared)} of their values ({examples}), "
                         "each one embedding row for both; if the two name different things, give each a table of its own")
        else:
            notes.append(f"table {table!r}: features {', '.join(repr(n) for n in names)} share values among them "
                         f"({len(shared)}: {examples}), each one embedding row for every feature holding it; "
                         "if they name different things, give each a table of its own")
    return notes


def encoding_digest(categorical, vocabs: Dict[str, List[str]], hashed: Dict[str, int], dense: Dict[str, Dict]) -> str:
    """What the ids and dense values of converted data mean, as a short SHA-256: the features' rules,
    their vocabularies (values in id order), the hashed features' table sizes, and each dense column's
    transform and statistics. Data written with one digest can be scored by a model trained on data
    with the same digest; with another, the same id names another value. The input column names are
    left out: renaming a column changes no id. The statistics enter to 9 significant digits: merged
    over other chunks of the input they differ in the last bits, and the data written do not."""
    payload = {
        "categorical": [[r.feature, r.separator, r.hash, r.min_count] for r in categorical],
        "vocab": vocabs,
        "hashed": hashed,
        "dense": {name: {k: f"{v:.9g}" if isinstance(v, float) else v for k, v in rule.items()} for name, rule in dense.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _SplitTotals:
    """Per split (row) and task (column): the label sums and labelled rows, and with a weight column
    the same weighted (the weights' sum over labelled rows), and per split the weights' sum, sum of
    squares and rows of weight 0; a missing label is NaN and not counted."""

    def __init__(self, splits: int, tasks: int) -> None:
        self.sums, self.weighted_sums, self.label_weights = (np.zeros((splits, tasks)) for _ in range(3))
        self.counts = np.zeros((splits, tasks), dtype=np.int64)
        self.weight_sum, self.weight_squares, self.zero_weight_rows = np.zeros(splits), np.zeros(splits), np.zeros(splits, np.int64)
        self.weighted = False

    def add(self, split: int, labels: np.ndarray, weights: Optional[np.ndarray]) -> None:
        has = ~np.isnan(labels)
        self.sums[split] += np.nansum(labels, axis=0)
        self.counts[split] += has.sum(axis=0)
        if weights is not None:
            self.weighted = True
            self.weighted_sums[split] += np.where(has, weights[:, None] * np.nan_to_num(labels), 0.0).sum(axis=0)
            self.label_weights[split] += (weights[:, None] * has).sum(axis=0)
            self.weight_sum[split] += weights.sum()
            self.weight_squares[split] += np.square(weights).sum()
            self.zero_weight_rows[split] += int(np.count_nonzero(weights == 0))

    def means(self, names: List[str], labelled, weighted: bool) -> Dict[str, Dict[str, Optional[float]]]:
        sums, totals = (self.weighted_sums, self.label_weights) if weighted else (self.sums, self.counts)
        return {split: {task.name: float(sums[i, k] / totals[i, k]) if totals[i, k] else None for k, task in labelled}
                for i, split in enumerate(names)}

    def weight_summary(self, names: List[str]) -> Dict[str, Dict[str, float]]:
        """Each split's weights: their sum, the rows of weight 0 (which train nothing) and Kish's effective
        number of rows, (sum w)^2 / sum w^2: as many equally weighted rows would give metrics as noisy."""
        return {split: {"sum": float(self.weight_sum[i]), "zero_weight_rows": int(self.zero_weight_rows[i]),
                        "effective_rows": float(self.weight_sum[i] ** 2 / self.weight_squares[i]) if self.weight_squares[i] else 0.0}
                for i, split in enumerate(names)}


class _SplitWriter:
    """Appends tables to one Parquet file in row groups of exactly ``row_group_size`` (the last shorter)."""

    def __init__(self, path: Path, row_group_size: int) -> None:
        self.path, self.size = path, row_group_size
        self.pending: List[pa.Table] = []
        self.rows = 0
        self.row_groups = 0
        self.writer: Optional[pq.ParquetWriter] = None

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        full = table.num_rows if final else table.num_rows - table.num_rows % self.size
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, write_page_checksum=True)  # verified by the reader
        if full:
            self.writer.write_table(table.slice(0, full), row_group_size=self.size)
            self.row_groups += -(-full // self.size)
        rest = table.slice(full)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        if self.writer is not None:
            self.writer.close()


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()


def convert(cfg: Config, force: bool = False, show_progress: bool = True, like: Optional[str] = None,
            out: Optional[str] = None) -> Dict:
    """Converts ``cfg.data.convert.input`` into ``cfg.data.train`` / ``cfg.data.eval``; returns the report.
    With ``like`` (a folder convert wrote: its ``convert.json`` and ``vocab/``), every input row goes
    to ``out`` encoded as that data was: data to score with a model trained on it."""
    if cfg.data.convert is None:
        raise ConvertError(f"{cfg.source}: data.convert is not set; nothing to convert")
    return Converter(cfg, show_progress, Path(like) if like else None, Path(out) if out else None).run(force)
