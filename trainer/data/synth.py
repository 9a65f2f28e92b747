"""Synthetic multi-task data written to Parquet, streamed one row group at a time.

Hidden model: every sparse id has a latent vector (a hash of the id, so vocabularies of millions cost
no memory); a row's latent ``x`` (K) pools its ids' latents and mixes in its dense features. Task k
scores ``u_k . x`` plus a shared feature cross, where ``u_k = shared_k * u_0 + sqrt(1 - shared_k^2) o_k``:
``u_0`` is common to all tasks and ``o_k`` is task-specific, so tasks are partly related and, with a
negative ``shared``, conflicting. Binary labels are Bernoulli with a bias solved to hit
``positive_rate``; regression labels are ``scale * (score + noise)`` so their MSE is ~``scale^2``.

Columns: ``dense_<j>`` (float32), one ``list<int64>`` column per sparse feature, ``label_<task>``
(float32). Deterministic for a seed: chunk c of split s draws from ``default_rng([seed, s, c])``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from concord.trainer.config import SyntheticConfig
from concord.trainer.data.layout import dataset_ready

ROW_GROUPS_PER_FILE = 64
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def label_column(task: str) -> str:
    return f"label_{task}"


def dense_column(j: int) -> str:
    return f"dense_{j}"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def id_latents(ids: np.ndarray, feature_index: int, dim: int) -> np.ndarray:
    """(N,) int64 ids -> (N, dim) float32 latents, unit variance, a pure function of (id, feature)."""
    base = ids.astype(np.uint64) * np.uint64(1_000_003) + np.uint64(feature_index * 7919 + 1)
    cols = [_splitmix64(base * np.uint64(dim + 1) + np.uint64(j)) for j in range(dim)]
    u = np.stack(cols, axis=1).astype(np.float64) / 2.0**64  # uniform [0, 1)
    return ((u - 0.5) * math.sqrt(12.0)).astype(np.float32)


class HiddenModel:
    """The generator's ground truth, drawn once from the seed; shared by the train and eval splits."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        if not cfg.sparse or not cfg.tasks:
            raise ValueError("data.synthetic needs at least one sparse feature and one task")
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 999])
        k = cfg.latent_dim
        self.dense_mix = rng.normal(0, 1 / math.sqrt(max(cfg.num_dense, 1)), (cfg.num_dense, k))
        u0 = rng.normal(size=k)
        u0 /= np.linalg.norm(u0)
        self.directions = []
        for t in cfg.tasks:
            o = rng.normal(size=k)
            o -= (o @ u0) * u0
            o /= np.linalg.norm(o)
            self.directions.append(t.shared * u0 + math.sqrt(max(0.0, 1 - t.shared**2)) * o)
        self.cross_weight = 0.5
        # Solve the binary biases on a pilot sample (deterministic: its own seeded stream).
        pilot = self.scores(*self._features(np.random.default_rng([cfg.seed, 998]), 20_000)[:2])
        self.biases = []
        for j, t in enumerate(cfg.tasks):
            self.biases.append(_bias_for_rate(pilot[:, j], t.positive_rate) if t.type == "binary" else 0.0)

    def _features(self, rng: np.random.Generator, n: int):
        cfg = self.cfg
        dense = rng.normal(size=(n, cfg.num_dense)).astype(np.float32)
        pooled = np.zeros((n, cfg.latent_dim), dtype=np.float64)
        sparse = []
        for f, sp in enumerate(cfg.sparse):
            extra = rng.poisson(sp.mean_len - 1.0, size=n) if sp.mean_len > 1 else np.zeros(n, np.int64)
            lengths = 1 + extra.astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = (rng.zipf(sp.zipf, size=int(offsets[-1])).astype(np.int64) - 1) % sp.vocab
            lat = id_latents(ids, f, cfg.latent_dim)
            pooled += np.add.reduceat(lat, offsets[:-1], axis=0) / lengths[:, None]
            sparse.append((offsets, ids))
        latent = pooled / math.sqrt(len(cfg.sparse)) + dense.astype(np.float64) @ self.dense_mix
        return latent, dense, sparse

    def scores(self, latent: np.ndarray, dense: np.ndarray) -> np.ndarray:
        cross = self.cross_weight * latent[:, 0] * latent[:, 1]
        return np.stack([latent @ u + cross for u in self.directions], axis=1) / math.sqrt(2.0)

    def chunk(self, rng: np.random.Generator, n: int) -> pa.Table:
        latent, dense, sparse = self._features(rng, n)
        scores = self.scores(latent, dense)
        cols = {dense_column(j): dense[:, j] for j in range(self.cfg.num_dense)}
        for sp, (offsets, ids) in zip(self.cfg.sparse, sparse):
            cols[sp.name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
        for j, t in enumerate(self.cfg.tasks):
            if t.type == "binary":
                p = 1.0 / (1.0 + np.exp(-(2.0 * scores[:, j] + self.biases[j])))
                y = (rng.random(n) < p).astype(np.float32)
            else:
                y = (t.scale * (scores[:, j] + 0.5 * rng.normal(size=n))).astype(np.float32)
            cols[label_column(t.name)] = y
        return pa.table(cols)


def _bias_for_rate(score: np.ndarray, rate: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(2.0 * score + mid)))) > rate:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def write_split(
    cfg: SyntheticConfig,
    out_dir: str | Path,
    rows: int,
    split_id: int,
    progress: Optional[Callable[[int], None]] = None,
) -> list[Path]:
    """Writes ``rows`` rows as ``part-XXXXX.parquet`` files under ``out_dir``; returns the files.

    Files are written under a temporary name and renamed when complete, so an interrupted run leaves
    no truncated file behind that a later run would mistake for data.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = HiddenModel(cfg)
    files: list[Path] = []
    writer, tmp, written_in_file = None, None, 0
    chunks = math.ceil(rows / cfg.row_group_size)
    for c in range(chunks):
        n = min(cfg.row_group_size, rows - c * cfg.row_group_size)
        table = model.chunk(np.random.default_rng([cfg.seed, split_id, c]), n)
        if writer is None:
            final = out / f"part-{len(files):05d}.parquet"
            tmp = final.with_suffix(".parquet.tmp")
            writer = pq.ParquetWriter(tmp, table.schema, write_page_checksum=True)  # verified by the reader
            files.append(final)
        writer.write_table(table, row_group_size=cfg.row_group_size)
        written_in_file += 1
        if progress:
            progress(n)
        if written_in_file == ROW_GROUPS_PER_FILE or c == chunks - 1:
            writer.close()
            tmp.rename(files[-1])
            writer, written_in_file = None, 0
    return files


def generate(
    cfg: SyntheticConfig,
    train_dir: str | Path,
    eval_dir: Optional[str | Path],
    show_progress: bool = True,
    validation_dir: Optional[str | Path] = None,
    skip_ready: bool = False,
) -> None:
    """Writes the train split and, if ``eval_dir`` and ``eval_rows``, the held-out split; if
    ``validation_dir`` and ``validation_rows``, a validation split (for choosing hyper-parameters
    without reading the held-out one). Each split is its own draw from the same hidden model, so one
    can be written without the others (``skip_ready``: the splits already on disk are kept)."""
    from concord.trainer.observe.progress import progress_bar

    splits = [(train_dir, cfg.rows, 0)]
    if eval_dir is not None and cfg.eval_rows > 0:
        splits.append((eval_dir, cfg.eval_rows, 1))
    if validation_dir is not None and cfg.validation_rows > 0:
        splits.append((validation_dir, cfg.validation_rows, 2))
    for path, rows, split_id in splits:
        if skip_ready and dataset_ready(path):
            continue
        with progress_bar(rows, f"synth {path}", "rows", enabled=show_progress) as bar:
            write_split(cfg, path, rows, split_id, progress=bar.update)
