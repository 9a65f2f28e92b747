"""Parquet reader: every row exactly once across ranks, correct jagged lengths, clear errors."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from concord.trainer.data.position import DataSchedule, EpochReading, PositionError, steps_per_epoch
from concord.trainer.data.reader import Columns, DataError, ParquetReader
from concord.trainer.train import Trainer

COLUMNS = Columns(dense=("d0", "d1"), sparse=(("f", "f"), ("g", "g")), labels=("y",), table_sizes=(("f", 1000), ("g", 1000)))


def write(path, rows: int, start: int = 0, row_group_size: int = 7, **override):
    ids = np.arange(start, start + rows)
    f_lists = [[int(i % 1000)] * int(i % 3) for i in ids]  # lengths 0, 1, 2 in turn
    g_lists = [[int(i % 997), int((i * 7) % 1000)] for i in ids]
    cols = {
        "d0": ids.astype(np.float32),
        "d1": (ids * 2).astype(np.float32),
        "f": pa.array(f_lists, pa.list_(pa.int64())),
        "g": pa.array(g_lists, pa.list_(pa.int64())),
        "y": (ids % 2).astype(np.float32),
    }
    cols.update(override)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_exactly_once_across_ranks_with_correct_lengths(tmp_path, world_size):
    write(tmp_path / "a.parquet", 50, start=0)
    write(tmp_path / "b.parquet", 33, start=50)
    seen = []
    for rank in range(world_size):
        for batch in ParquetReader(str(tmp_path), COLUMNS, batch_size=8, rank=rank, world_size=world_size):
            ids = batch.dense[:, 0].long()
            seen.extend(ids.tolist())
            torch.testing.assert_close(batch.dense[:, 1], batch.dense[:, 0] * 2)
            f, g = batch.sparse["f"], batch.sparse["g"]
            assert f.lengths().tolist() == [int(i % 3) for i in ids]
            assert f.values().tolist() == [int(i % 1000) for i in ids for _ in range(int(i % 3))]
            assert g.lengths().tolist() == [2] * len(ids)
            assert g.values().tolist() == [v for i in ids for v in (int(i % 997), int((i * 7) % 1000))]
    assert sorted(seen) == list(range(83))


def test_full_batches_agree_across_ranks(tmp_path):
    write(tmp_path / "a.parquet", 50)
    readers = [ParquetReader(str(tmp_path), COLUMNS, batch_size=8, rank=r, world_size=2, drop_last=True) for r in range(2)]
    counts = [sum(1 for _ in r) for r in readers]
    assert readers[0].full_batches_per_rank() == readers[1].full_batches_per_rank() == min(counts)


def test_missing_file_and_not_parquet(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ParquetReader(str(tmp_path / "nope.parquet"), COLUMNS, 4)
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        ParquetReader(str(bad), COLUMNS, 4)


def test_a_glob_names_training_data_and_a_partitioned_folder_is_named_with_one(tmp_path):
    """The launcher's check takes what the readers take (a folder of Parquet files, a file, a glob); a
    folder whose files lie in subfolders (a log partitioned by day) is refused with the glob that names
    them, and a glob's data is checked against its convert.json like a folder's."""
    import json

    from concord.trainer.config import load_config
    from concord.trainer.data.layout import check_data_exists

    for folder in ("log/day=1", "log/day=2", "log/_temporary", "held-out"):
        (tmp_path / folder).mkdir(parents=True)
        write(tmp_path / folder / "part-0.parquet", 10)

    def check(train: str, eval_: str) -> None:
        check_data_exists(load_config("configs/tiny.yaml", [f"data.train={train}", f"data.eval={eval_}"]))

    check(str(tmp_path / "log/*/*.parquet"), str(tmp_path / "held-out"))
    assert ParquetReader(str(tmp_path / "log/day=*/*.parquet"), COLUMNS, 4).num_rows == 20
    # What writers keep for themselves (a Spark job's _temporary/, hidden files) is skipped, as Spark
    # and Arrow skip it, where a wildcard matched it; a part written out in the path is the user's.
    write(tmp_path / "log/day=1/.part-1.parquet", 10)
    assert ParquetReader(str(tmp_path / "log/*/*.parquet"), COLUMNS, 4).num_rows == 20
    assert ParquetReader(str(tmp_path / "log/day=1"), COLUMNS, 4).num_rows == 10
    assert ParquetReader(str(tmp_path / "log/_temporary/*.parquet"), COLUMNS, 4).num_rows == 10
    with pytest.raises(DataError, match=r"log/day=\*: matches folders only; name their files, e.g. '.*log/day=\*/\*.parquet'"):
        ParquetReader(str(tmp_path / "log/day=*"), COLUMNS, 4)
    with pytest.raises(DataError, match=r"data.train: .*log holds no Parquet data; its subfolders hold some \(day=[12]/part-0.parquet\): "
                                         r"name them with a glob, e.g. '.*log/\*/\*.parquet'$"):
        check(str(tmp_path / "log"), str(tmp_path / "held-out"))
    (tmp_path / "log/convert.json").write_text(json.dumps({"encoding": "a"}))
    (tmp_path / "other/eval").mkdir(parents=True)
    write(tmp_path / "other/eval/part-0.parquet", 10)
    (tmp_path / "other/convert.json").write_text(json.dumps({"encoding": "b"}))
    with pytest.raises(DataError, match="data.eval: .*other/eval/.*parquet was converted with other vocabularies"):
        check(str(tmp_path / "log/day=1"), str(tmp_path / "other/eval/*.parquet"))
    # A record there but unreadable (cut short, edited by hand) is named, not read as no record: that
    # would turn the encoding check off and train on mismatched vocabularies in silence.
    for text, problem in (('{"encoding": "a"', "invalid JSON"), ('["a"]', "a JSON list")):
        (tmp_path / "other/convert.json").write_text(text)
        with pytest.raises(DataError, match=rf"other/convert.json: not the record concord convert writes \({problem}.*\); "
                                            r"run `concord convert` again$"):
            check(str(tmp_path / "log/day=1"), str(tmp_path / "other/eval/*.parquet"))


def test_a_missing_or_doubled_column_is_named_with_its_file(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10)
    cols = Columns(dense=("d0", "nope"), sparse=(), labels=("y",))
    with pytest.raises(DataError, match=r"x\.parquet: missing column 'nope'"):
        ParquetReader(str(path), cols, 4)
    table = pq.read_table(path)
    pq.write_table(table.append_column("f", table["f"]), path)  # a second column named f
    with pytest.raises(DataError, match=r"x\.parquet: the file has 2 columns named 'f': rename them"):
        ParquetReader(str(path), COLUMNS, 4)


def test_sparse_column_must_be_a_list_of_ints_or_one_int_a_row(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, f=pa.array([["a"]] * 10, pa.list_(pa.string())))
    with pytest.raises(DataError, match="sparse column 'f' must be a list of integers or an integer, has type list<"):
        ParquetReader(str(path), COLUMNS, 4)
    write(path, 10, f=pa.array(range(10, 20), pa.int32()))  # a single-valued feature: each row a bag of one id
    batch = next(iter(ParquetReader(str(path), COLUMNS, 10)))
    assert batch.sparse["f"].lengths().tolist() == [1] * 10 and batch.sparse["f"].values().tolist() == list(range(10, 20))
    assert batch.sparse["g"].lengths().tolist() == [2] * 10  # the list column beside it as ever
    write(path, 10, f=pa.array([3] * 9 + [None], pa.int64()))
    with pytest.raises(DataError, match="column 'f': null value at row 2"):
        list(ParquetReader(str(path), COLUMNS, 4))


def test_id_outside_the_table_names_the_value(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, g=pa.array([[1, 2]] * 9 + [[5, 1000]], pa.list_(pa.int64())))
    with pytest.raises(DataError, match=r"row group 1: column 'g': id 1000 outside the table's range \[0, 1000\)"):
        list(ParquetReader(str(path), COLUMNS, 4))


def test_null_in_a_required_column(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, y=pa.array([0.0] * 9 + [None], pa.float32()))
    with pytest.raises(DataError, match="column 'y': null value at row 2"):
        list(ParquetReader(str(path), COLUMNS, 4))


LABELED = Columns(dense=("d0", "d1"), sparse=(("f", "f"), ("g", "g")), labels=("y",), table_sizes=(("f", 1000), ("g", 1000)),
                  label_types=("binary",))


def test_an_empty_file_is_named_and_a_file_without_rows_adds_none(tmp_path):
    """A file of no bytes is no Parquet file; a file of no rows is (Spark and Hive leave one where a
    partition had no data): it adds no row group, and the others' rows are all read, each once."""
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.parquet: not a readable Parquet file"):
        ParquetReader(str(tmp_path / "empty.parquet"), COLUMNS, 4)
    data = tmp_path / "data"
    data.mkdir()
    write(data / "part-0.parquet", 0)
    write(data / "part-1.parquet", 20)
    write(data / "part-2.parquet", 0)
    reader = ParquetReader(str(data), COLUMNS, 4)
    assert reader.total_rows == 20 and {g.file for g in reader.groups} == {str(data / "part-1.parquet")}
    assert sorted(int(i) for batch in reader for i in batch.dense[:, 0]) == list(range(20))
    assert ParquetReader(str(data / "part-0.parquet"), COLUMNS, 4).total_rows == 0  # refused by the caller: data.train has no rows


def test_truncated_and_corrupt_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 40)
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file"):
        ParquetReader(str(tmp_path / "cut.parquet"), COLUMNS, 4)
    pf = pq.ParquetFile(path)
    start = pf.metadata.row_group(2).column(0).data_page_offset
    corrupt = bytearray(data)
    corrupt[start : start + 40] = b"\xff" * 40
    (tmp_path / "bad.parquet").write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match=r"bad\.parquet: row group 2"):
        list(ParquetReader(str(tmp_path / "bad.parquet"), COLUMNS, 4))


def test_dense_column_of_the_wrong_type(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, d1=pa.array(["a"] * 10))
    with pytest.raises(DataError, match="column 'd1' must be numeric, has type string"):
        ParquetReader(str(path), COLUMNS, 4)


def test_negative_id_is_an_error_by_default_and_hashed_and_counted_on_request(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, g=pa.array([[1, 2]] * 8 + [[-3, 5], [1004, 2000]], pa.list_(pa.int64())))
    with pytest.raises(DataError, match=r"id -3 outside the table's range \[0, 1000\)"):
        list(ParquetReader(str(path), COLUMNS, 4))
    reader = ParquetReader(str(path), dataclasses.replace(COLUMNS, on_bad_id="hash"), 10)
    (batch,) = list(reader)
    assert batch.sparse["g"].values().tolist()[-4:] == [997, 5, 4, 0]
    assert reader.counts["hashed_ids"] == 3


def test_nonfinite_dense_is_an_error_or_imputed_and_counted(tmp_path):
    path = tmp_path / "x.parquet"
    d1 = np.arange(10, dtype=np.float32) * 2
    d1[3], d1[7] = np.nan, np.inf
    write(path, 10, d1=d1)
    with pytest.raises(DataError, match="column 'd1': non-finite value nan at row 3"):
        list(ParquetReader(str(path), COLUMNS, 10))
    reader = ParquetReader(str(path), dataclasses.replace(COLUMNS, on_nonfinite_dense="impute", impute_value=-1.0), 10)
    (batch,) = list(reader)
    assert batch.dense[3, 1] == -1.0 and batch.dense[7, 1] == -1.0 and batch.dense[4, 1] == 8.0
    assert reader.counts["imputed_dense"] == 2


def test_binary_label_outside_0_1_and_regression_label_nan(tmp_path):
    path = tmp_path / "x.parquet"
    write(path, 10, y=np.array([0, 1, 1, 0, 2, 0, 1, 0, 0, 1], dtype=np.float32))
    with pytest.raises(DataError, match="row group 0: label column 'y': value 2.0 at row 4; a binary label must be 0 or 1"):
        list(ParquetReader(str(path), LABELED, 10))
    write(path, 10, y=np.array([0.5] * 9 + [np.nan], dtype=np.float32))
    regression = dataclasses.replace(LABELED, label_types=("regression",))
    with pytest.raises(DataError, match="row group 1: label column 'y': value nan at row 2; a regression label must be a finite number"):
        list(ParquetReader(str(path), regression, 10))


def test_a_masked_task_reads_a_null_or_nan_label_as_missing_and_other_tasks_still_refuse_it(tmp_path):
    path = tmp_path / "x.parquet"
    y = pa.array([0.0, None, 1.0, float("nan"), 1.0, 0.0, None, 1.0, 0.0, 1.0], pa.float32())
    write(path, 10, y=y, z=pa.array([1.0, 0.0] * 5, pa.float32()))
    two = dataclasses.replace(LABELED, labels=("y", "z"), label_types=("binary", "binary"), masked=(True, False))
    batch = next(iter(ParquetReader(str(path), two, 10)))
    present = [True, False, True, False, True, True, False, True, True, True]
    assert batch.labelled.tolist() == [[p, True] for p in present]
    assert batch.labels[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # missing -> 0
    shuffled = next(iter(ParquetReader(str(path), two, 10, shuffle=True, seed=3)))  # the mask moves with its rows
    index = [int(i) for i in shuffled.dense[:, 0].tolist()]
    assert shuffled.labelled[:, 0].tolist() == [present[i] for i in index] and sorted(index) != index
    with pytest.raises(DataError, match=r"column 'y': null value at row 1 \(a task whose label may be missing: tasks\[\]\.missing_label: masked\)"):
        list(ParquetReader(str(path), dataclasses.replace(two, masked=(False, False)), 10))
    write(path, 10, y=np.array([0, 1, 1, 0, 2, 0, 1, 0, 0, 1], dtype=np.float32), z=np.ones(10, np.float32))
    with pytest.raises(DataError, match="label column 'y': value 2.0 at row 4; a binary label must be 0 or 1"):
        list(ParquetReader(str(path), two, 10))  # a label that is there is checked as ever
    write(path, 10)
    assert next(iter(ParquetReader(str(path), LABELED, 10))).labelled is None  # no masked task: no mask at all


# --- equal work, nothing lost, shuffling ------------------------------------------------------------------
def _ids(reader, epoch=0, skip_rows=0):
    return [int(i) for b in reader.batches(epoch=epoch, skip_rows=skip_rows) for i in b.dense[:, 0].tolist()]


@pytest.mark.parametrize("groups,world_size", [((30, 30, 30), 2), ((90,), 2), ((50, 7, 33), 3), ((5, 60), 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_training_trains_every_row_once_per_epoch_but_the_counted_remainder(tmp_path, groups, world_size, shuffle):
    start = 0
    for i, rows in enumerate(groups):
        write(tmp_path / f"part{i}.parquet", rows, start=start, row_group_size=rows)
        start += rows
    total, batch = sum(groups), 4
    readers = [ParquetReader(str(tmp_path), COLUMNS, batch, r, world_size, drop_last=True, shuffle=shuffle,
                             shuffle_rows=16) for r in range(world_size)]
    for epoch in range(2):
        per_rank = [_ids(r, epoch) for r in readers]
        steps = readers[0].full_batches_per_rank()
        assert all(len(ids) == steps * batch for ids in per_rank)  # equal work on every rank
        seen = [i for ids in per_rank for i in ids]
        assert len(seen) == len(set(seen))  # no row twice
        left_out = readers[0].rows_left_out()
        assert len(seen) + left_out == total  # the rest is counted exactly
        assert left_out < world_size * batch + world_size  # at most a partial batch per rank, plus < W


def _trained(tmp_path, schedule, step, steps, shuffle):
    """The ids each rank reads in ``steps`` steps from ``step`` under ``schedule``, as the trainer reads them."""
    reading = schedule.reading_at(step)
    readers = [ParquetReader(str(tmp_path), COLUMNS, reading.batch_size, r, reading.world_size, drop_last=True,
                             shuffle=shuffle, seed=5, shuffle_rows=16) for r in range(reading.world_size)]
    per_rank = []
    for reader in readers:
        batches = Trainer._epochs(reader, schedule, step)
        per_rank.append([[int(i) for i in next(batches).dense[:, 0].tolist()] for _ in range(steps)])
    return per_rank


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_run_resumed_on_other_ranks_or_batches_trains_the_rest_of_its_epoch_once(tmp_path, shuffle):
    """2 ranks of 4 rows stop 3 steps into epoch 1; 3 ranks of 5 go on, stop, and 1 rank of 7 ends the
    epoch: every row of the epoch is trained once but a counted remainder (under one batch a rank at
    each change, besides the epoch's own), every rank reads as many batches as the others, and the
    next epoch is read as usual."""
    write(tmp_path / "a.parquet", 130, row_group_size=9)
    write(tmp_path / "b.parquet", 41, start=130, row_group_size=41)
    total = 171
    first = DataSchedule.fresh(total, 2, 4)
    spe = first.steps_per_epoch  # 21
    stop = spe + 3
    before = _trained(tmp_path, first, spe, 3, shuffle)
    second = DataSchedule.resumed(stop, first.record(stop), 2, 4, total, 3, 5)
    reading = second.current
    assert (reading.epoch, reading.began_at, reading.world_size, reading.batch_size) == (1, stop, 3, 5)
    assert reading.rows_held == 2 * (spe - 3) * 4 and reading.steps == reading.rows_held // 15
    middle = _trained(tmp_path, second, stop, 2, shuffle)
    third = DataSchedule.resumed(stop + 2, second.record(stop + 2), 3, 5, total, 1, 7)
    after = _trained(tmp_path, third, stop + 2, third.current.steps, shuffle)
    rows = [i for part in (before, middle, after) for ids in part for batch in ids for i in batch]
    assert len(rows) == len(set(rows))  # no row twice
    epoch = {i for ids in _trained(tmp_path, first, spe, spe, shuffle) for batch in ids for i in batch}
    assert set(rows) <= epoch  # only the epoch's rows, and all but the remainders counted at each change
    assert len(epoch) - len(rows) == second.current.rows_left_out + third.current.rows_left_out
    assert second.current.rows_left_out < 3 * 5 and third.current.rows_left_out < 7
    for reading in (second.current, third.current):  # equal work on every rank: whole batches, as many
        for rank in range(reading.world_size):
            assert sum(end - first for *_, first, end in reading.share(rank)) == reading.steps * reading.batch_size
    # The same ranks resuming inside a shared-out epoch read on where they stopped.
    again = DataSchedule.resumed(stop + 2, second.record(stop + 2), 3, 5, total, 3, 5)
    assert _trained(tmp_path, again, stop + 2, 3, shuffle) == [ids[2:5] for ids in _trained(tmp_path, second, stop, 5, shuffle)]
    # After it, epoch 2 on 1 rank of 7, from the step the shared-out epoch ended at.
    end = third.current.ends_at
    assert third.epochs_ended_at(end) == 2 and third.epochs_ended_at(end - 1) is None
    assert third.reading_at(end).pieces is None and third.reading_at(end).epoch == 2
    assert third.total_steps(3) == end + steps_per_epoch(total, 1, 7)
    assert _trained(tmp_path, third, end, 2, shuffle) == _trained(tmp_path, DataSchedule(EpochReading(2, end, 1, 7, total)), end, 2, shuffle)


def test_a_position_resumed_at_an_epoch_boundary_or_without_a_record():
    """A checkpoint at an epoch's end continues with the next epoch read by the new ranks; one written
    before positions were recorded is read as the old ranks read it; a position that does not fit the
    data is refused."""
    old = DataSchedule.fresh(100, 2, 5)  # 10 steps an epoch
    assert old.total_steps(3) == 30 and old.epochs_ended_at(20) == 2 and old.epochs_ended_at(25) is None
    at_end = DataSchedule.resumed(20, old.record(20), 2, 5, 100, 4, 5)
    assert at_end.current == EpochReading(2, 20, 4, 5, 100) and at_end.total_steps(3) == 25
    assert at_end.epochs_ended_at(20) == 2  # a finished run resumed is evaluated as at its epoch's end
    assert DataSchedule.resumed(30, old.record(30), 2, 5, 100, 2, 5).epochs_ended_at(30) == 3
    unrecorded = DataSchedule.resumed(13, None, 2, 5, 100, 2, 5)
    assert unrecorded.current == EpochReading(1, 10, 2, 5, 100)
    assert DataSchedule.resumed(13, None, 2, 5, 100, 1, 5).current.pieces == ((2, 0, 15, 50), (2, 1, 15, 50))
    with pytest.raises(PositionError, match="of 10 steps: it was written for other data"):
        DataSchedule.resumed(13, {"epoch": 1, "began_at": 0, "world_size": 2, "batch_size": 5, "pieces": None}, 2, 5, 100, 1, 5)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_evaluation_reads_every_row_exactly_once(tmp_path, world_size):
    write(tmp_path / "a.parquet", 5, row_group_size=5)  # one row group, fewer rows than some world sizes
    seen = []
    for r in range(world_size):
        reader = ParquetReader(str(tmp_path), COLUMNS, 2, r, world_size)
        seen += _ids(reader)
        assert reader.empty_batch().batch_size == 0
    assert sorted(seen) == list(range(5))


def test_shuffling_differs_between_epochs_repeats_for_a_seed_and_resumes_exactly(tmp_path):
    write(tmp_path / "a.parquet", 200, row_group_size=25)

    def reader(seed):
        return ParquetReader(str(tmp_path), COLUMNS, 8, 0, 1, drop_last=True, shuffle=True, seed=seed, shuffle_rows=64)

    first, again = reader(3), reader(3)
    epoch0, epoch1 = _ids(first, 0), _ids(first, 1)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) == list(range(200))
    assert _ids(again, 1) == epoch1  # the same seed gives the same order
    assert _ids(reader(4), 0) != epoch0
    assert epoch0 != sorted(epoch0)  # rows are mixed, not only row groups
    for skip in (0, 8, 64, 72, 192):  # resuming mid-window, at a window's start, near the end
        assert _ids(again, 1, skip_rows=skip) == epoch1[skip:]


def test_unshuffled_training_keeps_the_file_order(tmp_path):
    write(tmp_path / "a.parquet", 40, row_group_size=10)
    assert _ids(ParquetReader(str(tmp_path), COLUMNS, 8, 0, 1, drop_last=True)) == list(range(40))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_sample_weight_is_named(tmp_path, value):
    path = tmp_path / "w.parquet"
    weights = np.ones(10, np.float32)
    weights[6] = value
    write(path, 10, w=weights)
    cols = dataclasses.replace(COLUMNS, weight="w")
    with pytest.raises(DataError, match=r"w\.parquet: row group 0: weight column 'w': value .* at row 6; a sample weight must be finite and >= 0"):
        list(ParquetReader(str(path), cols, 4))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_ranks_check_every_sample_weight_before_training_each_its_share(tmp_path, world_size):
    """A bad weight in any row group stops exactly one rank's check (the one whose share holds it),
    before any batch is read; with every weight valid, no rank stops."""
    weights = np.ones(40, np.float32)
    write(tmp_path / "w.parquet", 40, w=weights, row_group_size=7)  # 6 row groups
    cols = dataclasses.replace(COLUMNS, weight="w")
    for rank in range(world_size):
        ParquetReader(str(tmp_path), cols, 4, rank, world_size, drop_last=True).check_weights()
    for row in range(0, 40, 7):
        bad = weights.copy()
        bad[row] = -1.0
        write(tmp_path / "w.parquet", 40, w=bad, row_group_size=7)
        stopped = []
        for rank in range(world_size):
            try:
                ParquetReader(str(tmp_path), cols, 4, rank, world_size, drop_last=True).check_weights()
            except DataError as error:
                assert f"row group {row // 7}: weight column 'w': value -1.0 at row 0" in str(error)
                stopped.append(rank)
        assert stopped == [(row // 7) % world_size]


def _plans_together(rank, world_size, specs, columns):
    """On each rank, for each of ``specs``: the job's plan and the files this rank opened for it, or
    the DataError it raised."""
    import torch.distributed as dist

    from concord.trainer.data import reader

    dist.init_process_group("gloo")
    open_parquet, results = reader.open_parquet, []
    for spec in specs:
        opened = []
        reader.open_parquet = lambda path: opened.append(path) or open_parquet(path)
        try:
            results.append((reader.plan_together(spec, columns), opened))
        except DataError as error:
            results.append((str(error), opened))
    return results


@pytest.mark.multiprocess
def test_the_ranks_plan_the_row_groups_together_each_opening_its_share_of_the_files(tmp_path):
    """The job's plan is the plan one rank makes of the same files, every row group in the files' order,
    and each footer is opened once in the job; a bad file stops every rank with its own line (the first
    bad file in the files' order, whichever rank opened it), as does a path that names no data."""
    from distributed import run_ranks

    from concord.trainer.data.reader import plan_row_groups

    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        for i, (rows, group_size) in enumerate([(50, 7), (9, 9), (33, 5), (12, 4), (20, 20)]):
            write(folder / f"{'abcde'[i]}.parquet", rows, start=100 * i, row_group_size=group_size)
    # f: a row group of no rows between two (a writer handed an empty table): the plan skips it and
    # names the next by its own index; g: a file of no rows adds none
    write(tmp_path / "f.parquet", 8, start=500)
    table = pq.read_table(tmp_path / "f.parquet")
    with pq.ParquetWriter(good / "f.parquet", table.schema) as writer:
        for part in (table.slice(0, 5), table.slice(0, 0), table.slice(5)):
            writer.write_table(part)
    write(good / "g.parquet", 0)
    write(bad / "b.parquet", 9, y=np.arange(9).astype(str))  # rank 1's first file
    (bad / "c.parquet").write_bytes(b"not parquet")  # rank 0's second: a later problem
    files = [str(good / f"{name}.parquet") for name in "abcdefg"]
    alone = plan_row_groups(files, COLUMNS)
    assert [(group.index, group.num_rows) for group in alone if group.file == files[5]] == [(0, 5), (2, 3)]

    ranks = run_ranks(_plans_together, 2, [str(good), str(bad), str(tmp_path / "nowhere")], COLUMNS)
    assert [rank[0] for rank in ranks] == [(alone, files[0::2]), (alone, files[1::2])]
    assert [rank[1][0] for rank in ranks] == [f"{bad / 'b.parquet'}: column 'y' must be numeric, has type string"] * 2
    assert [rank[2][0] for rank in ranks] == [f"{tmp_path / 'nowhere'}: no such file or directory"] * 2


def _label_files(folder):
    """Two files of three labels and a weight: ``y`` binary, ``m`` masked (nulls), ``r`` a regression
    with a NaN (the reader names it; a mean leaves it out); one row of negative weight. Returns the
    columns to read them with and the labels' weighted means over the rows that hold them."""
    folder.mkdir()
    frames = []
    for name, rows, start in (("a", 9, 0), ("b", 6, 9), ("c", 4, 15)):
        ids = np.arange(start, start + rows)
        m = pa.array([None if i % 3 == 0 else float(i % 2) for i in ids], pa.float64())
        r = (ids * 1.5).astype(np.float64)
        r[ids == 4] = np.nan
        w = (1.0 + ids % 4).astype(np.float32)
        w[ids == 7] = -1.0
        write(folder / f"{name}.parquet", rows, start=start, row_group_size=4, m=m, r=r, w=w)
        frames.append((ids, r, w))
    ids, r, w = (np.concatenate(parts) for parts in zip(*frames))
    use = w >= 0
    expected = [
        np.dot(w[use], ids[use] % 2) / w[use].sum(),
        np.dot(w[use & (ids % 3 != 0)], ids[use & (ids % 3 != 0)] % 2) / w[use & (ids % 3 != 0)].sum(),
        np.dot(w[use & (ids != 4)], r[use & (ids != 4)]) / w[use & (ids != 4)].sum(),
    ]
    columns = dataclasses.replace(COLUMNS, labels=("y", "m", "r"), weight="w", label_types=("binary", "binary", "regression"),
                                  masked=(False, True, False))
    return columns, expected


def test_the_training_labels_means_are_weighted_over_the_rows_that_hold_each_label(tmp_path):
    from concord.trainer.data.label_means import label_means

    columns, expected = _label_files(tmp_path / "data")
    assert label_means(str(tmp_path / "data"), columns) == pytest.approx(expected, rel=1e-12)
    unweighted = dataclasses.replace(columns, weight=None, labels=("y",))
    assert label_means(str(tmp_path / "data"), unweighted) == pytest.approx([9 / 19])  # ids 0..18: 9 odd
    write(tmp_path / "none.parquet", 5, m=pa.array([None] * 5, pa.float64()), r=np.ones(5), w=np.ones(5, np.float32))
    assert label_means(str(tmp_path / "none.parquet"), columns)[1] is None  # no row holds it


def _means_together(rank, world_size, spec, columns):
    import torch.distributed as dist

    from concord.trainer.data import label_means, reader

    dist.init_process_group("gloo")
    opened, open_parquet = [], reader.open_parquet
    label_means.open_parquet = lambda path: opened.append(path) or open_parquet(path)
    return label_means.label_means(spec, columns), opened


@pytest.mark.multiprocess
def test_the_ranks_read_the_training_labels_means_together_each_its_share_of_the_files(tmp_path):
    """Every rank gets the means one rank reads (the same bits: the sums are added in the files' order),
    each file read by one rank."""
    from distributed import run_ranks

    from concord.trainer.data.label_means import label_means

    columns, _ = _label_files(tmp_path / "data")
    files = [str(tmp_path / "data" / f"{name}.parquet") for name in "abc"]
    alone = label_means(str(tmp_path / "data"), columns)
    assert run_ranks(_means_together, 2, str(tmp_path / "data"), columns) == [(alone, files[0::2]), (alone, files[1::2])]


def test_sample_weights_arrive_as_writable_tensors_with_no_warning(tmp_path):
    """A float32 weight column read without a copy is a read-only array, which torch warns about (once
    a rank, on the console) and may not write: a batch's weights own their memory, as its other parts do."""
    import warnings

    weights = np.linspace(0.5, 2.0, 10, dtype=np.float32)
    write(tmp_path / "w.parquet", 10, w=weights, row_group_size=10)  # batches sliced from one row group, no copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(ParquetReader(str(tmp_path / "w.parquet"), dataclasses.replace(COLUMNS, weight="w"), 5))
    assert len(batches) == 2 and torch.equal(torch.cat([b.weights for b in batches]), torch.from_numpy(weights))
    batches[0].weights.mul_(2)  # writable: the caller may scale them in place


# --- the background pipeline ----------------------------------------------------------------------------
def test_the_prefetcher_yields_the_same_batches_in_order_and_passes_errors_on():
    from concord.trainer.data.prefetch import Prefetcher

    assert list(Prefetcher(iter(range(20)), depth=3)) == list(range(20))

    def failing():
        yield 1
        raise DataError("x.parquet: row group 1: bad")

    it = Prefetcher(failing())
    assert next(it) == 1
    with pytest.raises(DataError, match="row group 1"):
        next(it)
    endless = Prefetcher(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()  # the thread stops instead of running on
    assert not endless._thread.is_alive()


def test_synth_writes_a_validation_split_drawn_apart_and_only_missing_splits_with_if_missing(tmp_path):
    from concord.trainer.cli import _synth
    from concord.trainer.config import load_config

    paths = [f"data.{s}={tmp_path}/{s}" for s in ("train", "eval", "validation")]
    cfg = load_config("configs/tiny.yaml", [*paths, "data.synthetic.validation_rows=512", "data.synthetic.eval_rows=512"])
    assert _synth(cfg, force=False) == 0
    validation, held_out = (pq.read_table(tmp_path / s).to_pydict() for s in ("validation", "eval"))
    assert len(validation["label_ctr"]) == 512 and validation["dense_0"] != held_out["dense_0"]  # another draw
    train_files = sorted((tmp_path / "train").glob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in train_files]
    shutil.rmtree(tmp_path / "validation")
    assert _synth(cfg, force=False, if_missing=True) == 0
    assert pq.read_table(tmp_path / "validation").to_pydict() == validation  # the same draw again
    assert [f.stat().st_mtime_ns for f in train_files] == mtimes  # the splits on disk were kept
    assert _synth(cfg, force=False) == 2  # without --force nothing is overwritten
