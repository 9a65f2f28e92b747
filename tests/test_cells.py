"""compare's and tune's cells stop with their caller: a signal to the caller reaches every running cell
once, no other cell starts, the caller ends with one line; a cell knows to stop should its caller die."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from concord.trainer.tools.cells import STOP_WITH_CALLER_ENV, Cells, CellsStopped

# A stand-in for `concord train`: records its session and environment, then trains (sleeps) until a
# SIGTERM, on which it writes that it stopped and exits 143 as concord train does.
CELL = """
import os, signal, sys, time
out = sys.argv[1]
def stop(signum, frame):
    open(out + ".stopped", "w").write(signal.Signals(signum).name)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
open(out + ".started", "w").write(f"{os.getsid(0)} {os.environ.get('%s')}")
time.sleep(60)
""" % STOP_WITH_CALLER_ENV


def test_a_signal_to_the_caller_stops_the_running_cells_once_and_starts_no_other(tmp_path):
    cells = Cells()
    before = signal.getsignal(signal.SIGTERM)

    def run(i: int, name: str) -> None:
        code = cells.train([sys.executable, "-c", CELL, str(tmp_path / name)], tmp_path / f"{name}.log", os.environ)
        assert code == 0  # never reached: the cell is stopped

    def signal_when_both_started() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((tmp_path / f"{n}.started").exists() for n in ("a", "b")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_both_started, daemon=True).start()
    with pytest.raises(CellsStopped) as stopped:
        cells.run(run, [("a",), ("b",), ("c",)], jobs=2)
    assert (stopped.value.signum, stopped.value.done, stopped.value.total) == (signal.SIGTERM, 0, 3)
    assert str(stopped.value) == ("stopped by SIGTERM: 0 of 3 cells done; the same command goes on from there, reusing them, "
                                  "resuming the stopped ones from their checkpoints")
    for name in ("a", "b"):  # each running cell got the signal, in a session of its own, told to stop with its caller
        assert (tmp_path / f"{name}.stopped").read_text() == "SIGTERM"
        session, flag = (tmp_path / f"{name}.started").read_text().split()
        assert int(session) != os.getsid(0) and flag == "1"
    assert not (tmp_path / "c.log").exists()  # never started
    assert signal.getsignal(signal.SIGTERM) is before


def test_cells_that_ran_to_their_end_are_counted_and_failures_listed(tmp_path):
    def run(i: int, fail: bool) -> None:
        if fail:
            raise RuntimeError(f"cell {i} failed")

    assert Cells().run(run, [(False,), (True,), (False,)], jobs=2) == ["cell 2 failed"]


def test_a_cell_of_compare_or_tune_asks_to_stop_with_its_caller(tmp_path, monkeypatch):
    """`concord train` started with the cells' flag asks the kernel for SIGTERM when its caller dies,
    and does not hand the flag on to processes it starts."""
    from concord.trainer import cli, lifecycle
    from tiny_data import tiny_data

    asked = []
    monkeypatch.setattr(lifecycle, "die_with_parent", lambda *a: asked.append(a) or True)
    monkeypatch.setattr(cli, "_train_worker", lambda cfg: 0)
    monkeypatch.setenv(STOP_WITH_CALLER_ENV, "1")
    overrides = [*tiny_data(tmp_path), f"train.run_dir={tmp_path / 'run'}", "dist.nproc_per_node=1"]
    assert cli.main(["train", "--config", "tiny", *overrides]) == 0
    assert asked == [()] and STOP_WITH_CALLER_ENV not in os.environ
    assert cli.main(["train", "--config", "tiny", *overrides]) == 0
    assert asked == [()]  # started by a user: no such request


def test_a_failed_cell_is_named_with_the_cause_its_training_gave(tmp_path):
    """A cell whose `concord train` stopped on bad input: compare's and tune's error carries the
    cause that training named on its last line, not only where its log is."""
    from concord.trainer.config import load_config
    from concord.trainer.tools.compare import train_cell

    overrides = [f"data.train={tmp_path / 'no-such-data'}", f"data.eval={tmp_path / 'no-such-eval'}"]
    cfg = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(RuntimeError, match=r"equal, seed 0: training failed \(exit \d\): DataError: data\.train: .*no-such-data holds no Parquet data; .*; see .*train\.log"):
        train_cell("configs/tiny.yaml", overrides, cfg, "equal", 0, tmp_path / "cell")
