"""Progress in a log (a file, a job's captured output): a line per redraw, nothing for short work."""

from __future__ import annotations

import io

from concord.trainer.observe import progress


def test_each_redraw_is_a_line_of_its_own_in_a_log():
    log = io.StringIO()
    lines = progress._Lines(log)
    lines.write("\rtrain:  40%|####      | 20/50 [00:10<00:15,  2.00step/s]")
    lines.write("\r" + " " * 40 + "\r")  # tqdm clearing its line before a message: nothing
    lines.write("eval at step 25: ctr NE 0.81")
    lines.write("\n")
    lines.write("\rtrain: 100%|##########| 50/50 [00:25<00:00,  2.00step/s]")
    assert log.getvalue().splitlines() == ["train:  40%|####      | 20/50 [00:10<00:15,  2.00step/s]",
                                           "eval at step 25: ctr NE 0.81",
                                           "train: 100%|##########| 50/50 [00:25<00:00,  2.00step/s]"]


def test_short_work_leaves_no_progress_in_a_log(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress.sys, "stderr", log)
    with progress.progress_bar(100, "convert: writing", "row") as bar:
        bar.update(100)
    assert log.getvalue() == ""
