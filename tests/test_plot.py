"""`concord plot` draws the balancer figure from a run's JSONL log and names a bad run directory."""

from __future__ import annotations

import pytest

from concord.trainer.observe.runlog import RunLog
from concord.trainer.observe.plots import plot_run


def test_plot_from_a_log(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log.write({"kind": "train", "step": step * 10, "balancer": {
            "grad_norm": {"ctr": 0.01, "watch": 1.0 + step}, "weights": {"ctr": 0.4, "watch": 0.6}}}, step * 10)
    log.close()
    (path,) = plot_run(tmp_path)
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_the_missing_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no metrics log"):
        plot_run(tmp_path)
