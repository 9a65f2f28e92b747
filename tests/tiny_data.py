"""The tiny config's synthetic data written under a test's folder (training never generates data)."""

from __future__ import annotations

from pathlib import Path

from concord.trainer.config import load_config
from concord.trainer.data.layout import dataset_ready
from concord.trainer.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(folder: Path, *overrides: str) -> list[str]:
    """Writes ``folder/data/{train,eval}`` once; returns the overrides that point a config at them."""
    paths = [f"data.train={folder}/data/train", f"data.eval={folder}/data/eval"]
    cfg = load_config(ROOT / "configs/tiny.yaml", [*paths, *overrides])
    if not dataset_ready(cfg.data.train):
        generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, show_progress=False)
    return paths
