"""`concord plot` draws the balancer figure from a run's JSONL log and names a bad run directory; the
command line refuses counts below one."""

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


def test_the_tasks_are_drawn_in_the_configs_order_each_at_its_own_steps(tmp_path):
    """The log keeps its keys sorted; the legend follows the config's tasks. A task absent from some
    logged steps (no loss there) is drawn at the steps it has, not shifted onto the first ones."""
    from concord.trainer.observe.plots import figure_series

    (tmp_path / "config.yaml").write_text("balancer: {name: multibalance}\ntasks: [{name: watch}, {name: ctr}]\n")
    log = RunLog(tmp_path)
    for step in (10, 20, 30):
        norms = {"watch": float(step)} if step == 20 else {"ctr": 0.01, "watch": float(step)}
        log.write({"kind": "train", "step": step, "balancer": {"grad_norm": norms, "weights": {"ctr": 0.5, "watch": 0.5}}}, step)
    log.close()
    method, panels = figure_series(tmp_path)
    assert method == "multibalance" and [title for title, _, _ in panels][1] == "(d) learned task weights"
    norms, weights, weighted = (series for _, series, _ in panels)
    assert list(norms) == list(weights) == list(weighted) == ["watch", "ctr"]
    assert norms["ctr"] == ([10, 30], [0.01, 0.01]) and norms["watch"] == ([10, 20, 30], [10.0, 20.0, 30.0])
    assert weighted["ctr"] == ([10, 30], [0.005, 0.005])  # weight x norm where both were logged


def test_an_element_wise_correction_gets_a_panel_of_its_own(tmp_path):
    """CoGrad's weights stay put: its correction's size, and with its guard what the correction costs
    each task, are a fourth panel, each at the steps that logged it; other methods keep three."""
    from concord.trainer.observe.plots import figure_series

    (tmp_path / "config.yaml").write_text("balancer: {name: cograd}\ntasks: [{name: watch}, {name: ctr}]\n")
    log = RunLog(tmp_path)
    for step in (10, 20):
        log.write({"kind": "train", "step": step, "balancer": {
            "grad_norm": {"ctr": 0.01, "watch": 1.0}, "weights": {"ctr": 0.5, "watch": 0.5}, "correction_ratio": step / 1000,
            "correction_cost": {"ctr": 0.02, "watch": 0.001}}}, step)
    log.close()
    _, panels = figure_series(tmp_path)
    title, correction, log_scale = panels[3]
    assert title.startswith("(f) correction") and not log_scale
    assert correction == {"||A - P|| / ||P||": ([10, 20], [0.01, 0.02]), "cost to watch": ([10, 20], [0.001, 0.001]),
                          "cost to ctr": ([10, 20], [0.02, 0.02])}
    (path,) = plot_run(tmp_path)
    assert path.is_file()
    (other := tmp_path / "other").mkdir()
    log = RunLog(other)
    log.write({"kind": "train", "step": 10, "balancer": {"grad_norm": {"ctr": 0.01}, "weights": {"ctr": 1.0}}}, 10)
    log.close()
    assert len(figure_series(other)[1]) == 3


def test_a_method_that_logs_no_weights_at_z_plots_without_a_warning(tmp_path):
    import warnings

    log = RunLog(tmp_path)
    for step in range(1, 6):  # a parameter-level method: gradient norms, no weights at z
        log.write({"kind": "train", "step": step, "balancer": {"grad_norm": {"ctr": 0.01, "watch": 1.0}}}, step)
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        (path,) = plot_run(tmp_path)
    assert path.is_file()


def test_plot_names_the_missing_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no metrics log"):
        plot_run(tmp_path)


def test_concord_plot_names_a_directory_without_a_log_in_one_line(tmp_path, capsys):
    from concord.trainer.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"concord: plot: {tmp_path}/metrics.jsonl: no metrics log (is {tmp_path} a Concord run directory?)"


@pytest.mark.parametrize("command, message", [
    (["bench", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (["bench", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["compare", "--out", "x", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["compare", "--out", "x", "--jobs", "two"], "argument --jobs: expected a whole number, got 'two'"),
])
def test_counts_below_one_are_refused_when_the_command_line_is_read(command, message, capsys):
    from concord.trainer.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
