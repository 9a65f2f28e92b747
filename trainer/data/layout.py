"""What a data path must hold before training starts, and the error bad data ends with. No torch or
TorchRec import: ``concord train``'s launcher checks the paths here before it starts the ranks, and
importing TorchRec would add seconds to every launch."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input; the message names the file, row group, column and value."""


def dataset_ready(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("*.parquet"))


def check_data_exists(cfg) -> None:
    """Training reads data that exists: nothing is generated because a path is missing (a mistyped
    ``data.train`` must not become a fresh synthetic data set); the error says how to make it."""
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if not path or dataset_ready(path) or Path(path).is_file():
            continue
        if cfg.data.convert is not None:
            how = f"; `concord convert --config {cfg.source}` writes it from data.convert.input"
        elif cfg.data.synthetic is not None:
            how = f"; `concord synth --config {cfg.source}` writes the config's synthetic data there"
        else:
            how = ""
        raise DataError(f"{key}: {path} holds no Parquet data{how}")
