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


def _evaluation(tmp_path, *overrides):
    """An Evaluator of the tiny config's held-out split on one rank, its model a stand-in that
    predicts 0.5 and counts its calls; the split's reader."""
    from types import SimpleNamespace

    import torch

    from tiny_data import ROOT, tiny_data
    from concord.trainer.config import load_config
    from concord.trainer.data.reader import ParquetReader, columns_from_config
    from concord.trainer.evaluation import Evaluator

    cfg = load_config(ROOT / "configs/tiny.yaml", [*tiny_data(tmp_path), *overrides])
    reader = ParquetReader(cfg.data.eval, columns_from_config(cfg), cfg.data.batch_size)
    calls = []
    dmp = lambda batch: calls.append(batch) or SimpleNamespace(logits=torch.zeros(batch.batch_size, len(cfg.tasks)))
    dmp.eval = dmp.train = lambda: None
    heads = SimpleNamespace(predictions=torch.sigmoid)
    rt = SimpleNamespace(world_size=1, rank=0, is_main=True, device=torch.device("cpu"), balancer_group=None)
    return Evaluator(cfg, rt, dmp, heads), reader, calls


def test_a_long_evaluation_shows_its_batches_in_a_log(tmp_path, monkeypatch):
    """Evaluation (and `concord predict`, which runs it) shows rank 0's batches where it takes long:
    each call of tqdm's clock here is 4 s later than the last."""
    import tqdm.std

    evaluator, reader, _ = _evaluation(tmp_path, "train.progress=true")
    clock = iter(range(0, 10**6, 4))
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
    log = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", log)
    evaluator.run(reader)
    batches = reader.max_batches_per_rank()
    lines = log.getvalue().splitlines()
    assert batches > 2 and lines and all(line.startswith("evaluate: ") for line in lines), lines
    assert f"| {batches}/{batches} [" in lines[-1]


def test_an_evaluation_asks_whether_to_stop_every_few_batches_and_stops_without_results(tmp_path):
    """Asked before its first batch and every STOP_CHECK_EVERY after (every rank at the same batches:
    the question is a collective), it ends at the first yes with no results; never asked, it runs on."""
    from concord.trainer.lifecycle import STOP_CHECK_EVERY

    evaluator, reader, calls = _evaluation(tmp_path, "data.batch_size=16")
    assert reader.max_batches_per_rank() > 2 * STOP_CHECK_EVERY
    answers = iter([False, False, True])
    assert evaluator.run(reader, stop=lambda: next(answers)) is None
    assert len(calls) == 2 * STOP_CHECK_EVERY and next(answers, "all asked") == "all asked"
    calls.clear()
    assert set(evaluator.run(reader, stop=lambda: False)) == {"ctr", "cvr", "watch"}
    assert len(calls) == reader.max_batches_per_rank()
