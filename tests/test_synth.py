"""Synthetic data: deterministic for a seed, and the imbalance the papers describe."""

from __future__ import annotations

import pyarrow.parquet as pq

from concord.trainer.config import SyntheticConfig, SyntheticSparse, SyntheticTask
from concord.trainer.data.synth import write_split


def small(seed: int) -> SyntheticConfig:
    return SyntheticConfig(
        rows=40_000, eval_rows=0, row_group_size=8192, seed=seed, num_dense=3,
        sparse=[SyntheticSparse("u", 1_000_000, 1.0, 1.1), SyntheticSparse("i", 5000, 4.0, 1.2)],
        tasks=[SyntheticTask("ctr", "binary", 0.2, 0.8), SyntheticTask("cvr", "binary", 0.015, 0.5),
               SyntheticTask("watch", "regression", shared=-0.3, scale=8.0)],
    )


def read(files):
    return pq.ParquetFile(files[0]).read()


def test_deterministic_for_a_seed(tmp_path):
    a = read(write_split(small(1), tmp_path / "a", 40_000, 0))
    b = read(write_split(small(1), tmp_path / "b", 40_000, 0))
    c = read(write_split(small(2), tmp_path / "c", 40_000, 0))
    assert a.equals(b)
    assert not a.equals(c)


def test_label_imbalance_and_loss_scale(tmp_path):
    t = read(write_split(small(3), tmp_path / "d", 40_000, 0))
    assert abs(t["label_ctr"].to_numpy().mean() - 0.2) < 0.02
    assert 0.008 < t["label_cvr"].to_numpy().mean() < 0.025
    # A constant predictor's MSE on the regression task vs BCE of the CTR task (~0.5): ~100x.
    assert 40 < t["label_watch"].to_numpy().var() < 400
    lengths = [len(x) for x in t["i"].to_pylist()[:2000]]
    assert min(lengths) >= 1 and 3.5 < sum(lengths) / len(lengths) < 4.5
    assert max(max(x) for x in t["u"].to_pylist()) < 1_000_000


def test_row_groups_stream(tmp_path):
    files = write_split(small(4), tmp_path / "e", 40_000, 0)
    pf = pq.ParquetFile(files[0])
    assert pf.num_row_groups == 5 and pf.metadata.row_group(0).num_rows == 8192
    assert not list((tmp_path / "e").glob("*.tmp"))
