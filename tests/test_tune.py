"""concord tune: the grid's score relative to the config's cell, the refusals before any cell trains,
and one small grid end to end (tiny data, 1 rank) with its reuse."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from concord.trainer.config import load_config
from concord.trainer.data.synth import generate
from concord.trainer.tools.tune import TuneError, around, run_tune, score

ROOT = Path(__file__).resolve().parents[1]


def test_the_score_is_each_cells_metric_relative_to_the_configs_cell_over_tasks_and_seeds():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    base, other = (0.001, 0.05, None), (0.003, 0.05, None)
    results = {
        (base, 0): {"ctr": {"ne": 1.0}, "cvr": {"ne": 2.0}, "watch": {"mse": 100.0}},
        (base, 1): {"ctr": {"ne": 0.5}, "cvr": {"ne": 1.0}, "watch": {"mse": 50.0}},
        (other, 0): {"ctr": {"ne": 0.9}, "cvr": {"ne": 2.0}, "watch": {"mse": 80.0}},
        (other, 1): {"ctr": {"ne": 0.5}, "cvr": {"ne": 1.1}, "watch": {"mse": 50.0}},
    }
    got = score(cfg, [base, other], base, 2, results)
    assert got[base] == 1.0
    assert got[other] == pytest.approx(statistics.mean([0.9, 1.0, 0.8, 1.0, 1.1, 1.0]))
    assert around(0.05) == [0.0167, 0.05, 0.15]


@pytest.mark.parametrize("cvr", [None, {"calibration": 0.97, "label_mean": 1.0}])
def test_a_task_the_validation_split_has_no_label_for_is_named_and_left_out_of_the_score(tmp_path, cvr):
    """A masked task none of whose validation rows is labelled has no figures, and a binary task whose
    rows are all of one class no NE: the score is the other tasks', its column dashes, and the report
    says why."""
    from concord.trainer.tools.tune import write_report

    cfg = load_config(ROOT / "configs/tiny.yaml")
    base, other = (0.001, 0.05, None), (0.003, 0.05, None)
    results = {(base, 0): {"ctr": {"ne": 1.0}, "watch": {"mse": 100.0}}, (other, 0): {"ctr": {"ne": 0.9}, "watch": {"mse": 90.0}}}
    for figures in results.values():
        figures.update({"cvr": cvr} if cvr else {})
    assert score(cfg, [base, other], base, 1, results)[other] == pytest.approx(0.9)
    assert write_report(tmp_path, cfg, [], "val", [base, other], base, 1, results)[0] == other
    report = (tmp_path / "report.md").read_text()
    assert (("Not scored, for want of labels: 'cvr' (no row of the validation split holds its label with a weight above 0).")
            if cvr is None else ("Not scored, for want of two classes: 'cvr' (every row of the validation split that holds its "
                                 "label holds the same).")) in report
    assert "| 0.003 | 0.05 | 0.9000 | – | 90.0000 | 0.9000 **chosen** |" in report


def test_seed_noise_is_the_paired_differences_standard_error_pooled_over_the_grid(tmp_path):
    """Each cell's score less the chosen one's, seed by seed: variances pooled over the cells, over the
    number of seeds, give the standard error; a cell whose mean difference is under two of it is one
    the seeds do not tell from the chosen."""
    from concord.trainer.tools.tune import seed_noise

    chosen, close, far = (0.003, 0.1, 4), (0.001, 0.1, 4), (0.01, 0.1, 4)
    per_seed = {chosen: [0.99, 1.0], close: [0.995, 1.025], far: [1.09, 1.12]}  # differences .005/.025 and .10/.12
    error, within = seed_noise(per_seed, chosen)
    assert error == pytest.approx(math.sqrt(statistics.mean([statistics.variance([0.005, 0.025]),
                                                              statistics.variance([0.10, 0.12])]) / 2))
    assert error == pytest.approx(0.01) and within == [close]  # 0.015 < 2 x 0.01 < 0.11
    assert seed_noise({chosen: [1.0], close: [1.1]}, chosen) is None  # one seed: no spread to measure
    assert seed_noise({chosen: [1.0, 0.9]}, chosen) is None  # nothing to compare with

    # In the report and chosen.json, from the cells' metrics (one task: its NE is the relative score x 2).
    from concord.trainer.tools.tune import write_report

    cfg = load_config(ROOT / "configs/tiny.yaml", ["tasks=[{name: ctr, label: ctr}]"])
    base = (0.003, 0.1, 4)
    results = {(cell, s): {"ctr": {"ne": 2 * v}} for cell, values in per_seed.items() for s, v in enumerate(values)}
    results[base, 0], results[base, 1] = {"ctr": {"ne": 2.0}}, {"ctr": {"ne": 2.0}}  # the relative scores above
    per_seed[chosen] = [1.0, 1.0]
    assert write_report(tmp_path, cfg, [], "val", list(per_seed), base, 2, results) == (base, [close])
    recorded = json.loads((tmp_path / "chosen.json").read_text())
    assert recorded["within_noise"] == [{"train.dense_optimizer.lr": 0.001, "model.embedding_optimizer.lr": 0.1, "train.epochs": 4}]
    assert "Within two of it, 1 cell(s) these seeds do not tell from the chosen one: dense lr 0.001, table lr 0.1, 4 epochs." \
        in (tmp_path / "report.md").read_text()


def test_the_edge_note_names_the_axes_where_the_chosen_value_is_the_grids_largest_or_smallest():
    from concord.trainer.tools.tune import _edges

    grid = [(d, t, e) for d in (0.001, 0.003) for t in (0.05, 0.1, 0.2) for e in (1, 2)]
    assert _edges(grid, (0.003, 0.1, 2)) == [("the dense lr", (0.001, 0.1, 2)), ("the epochs", (0.003, 0.1, 1))]
    assert _edges(grid, (0.003, 0.1, 1)) == [("the dense lr", (0.001, 0.1, 1))]  # one epoch is the least there is
    grid = [(d, t, None) for d in (0.001, 0.003) for t in (0.05, 0.1, 0.2)] + [(0.01, 0.1, None)]
    assert _edges(grid, (0.001, 0.05, None)) == [("the dense lr", (0.003, 0.05, None)), ("the table lr", (0.001, 0.1, None))]
    assert _edges(grid, (0.01, 0.1, None)) == [("the dense lr", (0.003, 0.1, None))]
    assert _edges(grid, (0.003, 0.2, None)) == [("the table lr", (0.003, 0.1, None))]
    assert _edges([(0.01, 0.1, None), (0.001, 0.2, None)], (0.01, 0.1, None)) == [  # no cell in line with it
        ("the dense lr", None), ("the table lr", None)]


def test_an_edge_whose_inward_neighbour_is_within_the_seeds_noise_is_called_flat_not_to_extend(tmp_path):
    """The report asks for the grid to be extended past an edge where the score still falls toward it;
    where the neighbour inward is one the seeds do not tell from the chosen cell, it says that these
    seeds show no slope there, and that a cell beyond wants more seeds (extending past such an edge
    chased noise on a real data set, call after call)."""
    from concord.trainer.tools.tune import write_report

    cfg = load_config(ROOT / "configs/tiny.yaml", ["tasks=[{name: ctr, label: ctr}]"])
    chosen, close, far = (0.003, 0.1, 4), (0.001, 0.1, 4), (0.01, 0.1, 4)
    per_seed = {chosen: [1.0, 1.0], close: [1.005, 1.025], far: [1.10, 1.12]}  # relative to the chosen (the base)
    results = {(cell, s): {"ctr": {"ne": 2 * v}} for cell, values in per_seed.items() for s, v in enumerate(values)}

    def report(grid):
        write_report(tmp_path, cfg, [], "val", grid, chosen, 2, results)
        return (tmp_path / "report.md").read_text()

    assert "grid's edge" not in report([close, chosen, far])
    flat = report([close, chosen])
    assert ("The chosen cell lies at the grid's edge in the dense lr, but its neighbour inward (dense lr 0.001, table lr 0.1, "
            "4 epochs) scores within the seeds' noise of it (below): these seeds show no slope to follow there; a cell "
            "beyond that edge is worth training with more of them (`--seeds 4`), not instead.") in flat
    assert "extend the grid there" not in flat
    rising = report([chosen, far])
    assert "The chosen cell lies at the grid's edge in the dense lr: extend the grid there" in rising and "slope" not in rising


def test_a_cells_run_directory_gives_back_its_cell_and_seed():
    from concord.trainer.tools.tune import _name, cell_of

    for cell in [(0.003, 0.1, 4), (1e-05, 3e-06, None), (0.01, 1e-05, 2)]:
        assert cell_of(f"{_name(cell)}-seed7") == (cell, 7)
    assert cell_of("equal-seed0") is None and cell_of("densex-table0.1-seed0") is None


def test_tuning_needs_a_validation_split_other_than_the_held_out_one(tmp_path):
    """Refused before any cell trains: no validation split, or the held-out split given as one."""
    paths = [f"data.train={tmp_path}/train", f"data.eval={tmp_path}/eval"]
    with pytest.raises(TuneError, match=r"no validation split: set data\.validation .* or pass --validation"):
        run_tune(str(ROOT / "configs/tiny.yaml"), paths, str(tmp_path / "out"))
    with pytest.raises(TuneError, match=r"--validation .*eval is data\.eval, the held-out split"):
        run_tune(str(ROOT / "configs/tiny.yaml"), paths, str(tmp_path / "out"), validation=f"{tmp_path}/eval")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer", ["convert", "synthetic"])
def test_a_config_that_writes_its_validation_split_is_scored_there(tmp_path, writer):
    """data.validation beside the share that convert (or synth) writes to it, as a user's config has it:
    a cell scores on that folder as data.eval, and loads (data.validation alone left out would leave
    the share with nowhere to go, a config error)."""
    from concord.trainer.tools.tune import scored_on

    validation = f"{tmp_path}/data/validation"
    paths = [f"data.train={tmp_path}/data/train", f"data.eval={tmp_path}/data/eval", f"data.validation={validation}"]
    if writer == "convert":
        config, share = ROOT / "configs/movies.yaml", "data.convert.split.validation_fraction=0.1"
    else:
        config, share = ROOT / "configs/tiny.yaml", "data.synthetic.validation_rows=1024"
    cfg = load_config(config, [*paths, share])
    cell = load_config(config, [*paths, share, *scored_on(cfg, validation)])
    assert cell.data.eval == validation and cell.data.validation is None and cell.data.train == cfg.data.train


@pytest.mark.parametrize("command", ["compare", "tune"])
def test_every_cell_trains_the_config_as_it_read_at_the_start(tmp_path, monkeypatch, command):
    """An edit to the config file while the cells train reaches none of them: they train a copy taken
    at the start (a rerun reads the file again and checks the cells against it)."""
    from concord.trainer.tools import compare, tune
    from tiny_data import tiny_data

    paths = tiny_data(tmp_path)
    config = tmp_path / "my.yaml"
    original = (ROOT / "configs/tiny.yaml").read_text()
    config.write_text(original)
    seen = []

    def train_cell(config_path, *args, **kwargs):
        seen.append(Path(config_path).read_text())
        config.write_text(original.replace("batch_size: 64", "batch_size: 32"))  # the user edits the file
        raise RuntimeError("not trained here")

    monkeypatch.setattr(compare if command == "compare" else tune, "train_cell", train_cell)
    with pytest.raises(compare.CompareError if command == "compare" else TuneError, match=r"(\d+) of \1 cells failed; first: not trained here"):
        if command == "compare":
            compare.run_compare(str(config), paths, ["equal", "multibalance"], 1, str(tmp_path / "out"))
        else:
            shutil.copytree(tmp_path / "data/eval", tmp_path / "data/validation")
            run_tune(str(config), paths, str(tmp_path / "out"), validation=f"{tmp_path}/data/validation", dense_lrs=[0.01], seeds=1)
    assert "batch_size: 64" in original and len(seen) >= 2 and set(seen) == {original}


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_tune_trains_the_grid_on_the_validation_split_chooses_the_best_cell_and_reuses_it(tmp_path):
    data = tmp_path / "data"
    splits = [f"data.train={data}/train", f"data.eval={data}/eval", f"data.validation={data}/validation",
              "data.synthetic.validation_rows=1024"]  # the config that wrote the validation split
    cfg = load_config(ROOT / "configs/tiny.yaml", splits)
    generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, validation_dir=cfg.data.validation, show_progress=False)
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "concord", "tune", "--config", "tiny", "--dense-lr", "0.01", "--table-lr", "0.05",
           "--seeds", "1", "--out", str(out), *splits, "train.max_steps=4", "dist.nproc_per_node=1"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "[2/2] dense lr 0.01, table lr 0.05, seed 0: training ..." in first.stdout
    cells = {0.001: "dense0.001-table0.05", 0.01: "dense0.01-table0.05"}  # the config's own cell joins the grid
    scored = {lr: json.loads((out / f"runs/{name}-seed0/summary.json").read_text()) for lr, name in cells.items()}
    for name in cells.values():  # every cell scored on the validation split, never the held-out one
        assert yaml.safe_load((out / f"runs/{name}-seed0/config.yaml").read_text())["data"]["eval"] == f"{data}/validation"

    def metric(summary: dict, task: str) -> float:
        return summary["eval"][task]["mse" if task == "watch" else "ne"]

    relative = {lr: statistics.mean(metric(s, t) / metric(scored[0.001], t) for t in ("ctr", "cvr", "watch")) for lr, s in scored.items()}
    best = min(relative, key=relative.get)
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["chosen"] == {"train.dense_optimizer.lr": best, "model.embedding_optimizer.lr": 0.05}
    assert chosen["score"] == pytest.approx(relative[best])
    report = (out / "report.md").read_text()
    assert f"| {best} | 0.05 |" in report and f"{relative[best]:.4f} **chosen**" in report and "(config)" in report
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "training" not in second.stdout and second.stdout.count("(done earlier, reused)") == 2
    # A grid extended elsewhere: the cell trained earlier outside it (dense 0.01) joins, and is chosen from.
    third = subprocess.run([*cmd[:cmd.index("--dense-lr") + 1], "0.03", *cmd[cmd.index("--dense-lr") + 2:]], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "1 cell(s) trained earlier in" in third.stdout and "join the grid: dense lr 0.01, table lr 0.05" in third.stdout
    assert third.stdout.count("training ...") == 1 and third.stdout.count("(done earlier, reused)") == 2
    report = (out / "report.md").read_text()
    assert all(f"| {lr} | 0.05 |" in report for lr in (0.001, 0.01, 0.03))
    # More seeds: every cell, the earlier call's too, trains the seed it lacks and the report gives the seeds' noise.
    fourth = subprocess.run([*cmd[:cmd.index("--seeds") + 1], "2", *cmd[cmd.index("--seeds") + 2:]], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stdout[-2000:] + fourth.stderr[-3000:]
    assert "(1 of them trained for fewer seeds than 2: their other seeds train now)" in fourth.stdout
    assert fourth.stdout.count("seed 1: training ...") == 3 and fourth.stdout.count("(done earlier, reused)") == 3
    assert "Seed noise: a cell's score less the chosen one's, paired by seed, has a standard error of" in (out / "report.md").read_text()
    assert "standard_error" in json.loads((out / "chosen.json").read_text())
