"""End to end: a 2-rank job through the torchx component (local_cwd scheduler) trains and writes
metrics; `concord train` does the same through torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_data import tiny_data

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]


def env_with_venv():
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # torchrun
    env["OMP_NUM_THREADS"] = "1"
    return env


def read_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"plan", "train", "eval", "summary"} <= kinds
    return next(r for r in records if r["kind"] == "summary")


def check_summary(summary: dict) -> None:
    assert summary["qps_lifetime"] > 0
    assert set(summary["eval"]) == {"ctr", "cvr", "watch"}
    assert {"ne", "auc"} <= set(summary["eval"]["ctr"]) and "mse" in summary["eval"]["watch"]


@pytest.mark.parametrize("j", ["1x2", "2x1"])
def test_torchx_component_trains_and_writes_metrics(tmp_path, j):
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd",
        "launch/components.py:train", "--j", j, "--config", "configs/tiny.yaml", *tiny_data(tmp_path),
        f"train.run_dir={run_dir}", "train.max_steps=12",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_summary(read_summary(run_dir))


def test_concord_train_launches_torchrun_and_evaluates_after_each_epoch(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [  # tiny: 4,096 rows, 2 ranks of 64 a step: 32 steps an epoch
        sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", *tiny_data(tmp_path),
        f"train.run_dir={run_dir}", "train.epochs=2", "train.max_steps=40", "train.eval_each_epoch=true",
        "balancer.name=multibalance",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training QPS" in proc.stdout and "NE" in proc.stdout
    assert "not held out" not in proc.stdout + proc.stderr  # separate splits: no warning
    summary = read_summary(run_dir)
    check_summary(summary)
    assert summary["balancer"] == "multibalance"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]
    assert [(r["step"], r.get("epoch")) for r in evals] == [(32, 1), (40, None)]  # the epoch's, then the final one
    assert f"eval at epoch 1, step 32: ctr NE {evals[0]['eval']['ctr']['ne']:.4f}" in proc.stdout


def test_config_error_is_reported_not_raised(tmp_path):
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", "train.nope=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "configs/tiny.yaml: train.nope: unknown key" in proc.stderr


def test_the_launcher_starts_the_ranks_without_importing_torchrec(tmp_path):
    """``concord train`` checks the config, the machine and the data, then starts torchrun, whose
    ranks import TorchRec: importing it in the launcher too would add seconds to every launch."""
    code = ("import sys; from concord.trainer import cli; "
            "cli._launch = lambda cfg, args: print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchrec')) or 0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "train", "--config", "configs/tiny.yaml", *tiny_data(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_compare_writes_the_report_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "concord.trainer.cli", "compare", "--config", "configs/tiny.yaml",
        "--methods", "equal,multibalance", "--seeds", "1", "--out", str(out), *tiny_data(tmp_path), "train.max_steps=12",  # past MultiBalance's first sum (every 10 steps)
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "[2/2] multibalance, seed 0: training" in first.stdout
    report = (out / "report.md").read_text()
    title = report.splitlines()[0]  # names what ran: the config and every override
    assert title.startswith("# Balancer comparison: `--config tiny data.train=") and title.endswith(" train.max_steps=12`")
    assert "| multibalance | shared representation z" in report and "## Table 3" in report
    assert "## Verdicts: paired differences to `equal`" in report and "[one seed]: no detectable difference" in report
    assert (out / "gains.png").is_file() and (out / "figures/balancer-multibalance.png").is_file()
    assert "](figures/balancer-multibalance.png)" in report and "each run, which ran one after another" in report
    # Resumed with the single-task baselines: the two cells are reused, each task trains alone.
    second = subprocess.run([*cmd, "--single-task", "--jobs", "2"], cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "[1/5] equal, seed 0: done earlier, reused" in second.stdout
    assert "[2/5] multibalance, seed 0: done earlier, reused" in second.stdout
    assert "[3/5] ctr alone, seed 0: training" in second.stdout and "[5/5] watch alone, seed 0: done" in second.stdout
    alone = json.loads((out / "runs/single-ctr-seed0/summary.json").read_text())
    assert set(alone["eval"]) == {"ctr"} and alone["balancer"] == "equal"
    multi = json.loads((out / "runs/equal-seed0/summary.json").read_text())
    transfer = 100 * (alone["eval"]["ctr"]["ne"] - multi["eval"]["ctr"]["ne"]) / alone["eval"]["ctr"]["ne"]
    report = (out / "report.md").read_text()
    assert "## Transfer: multi-task against single-task models" in report
    assert "each run, 2 at a time sharing the machine's cores, so each carries the others' load" in report
    assert f"| equal | {multi['eval']['ctr']['ne']:.4f} |" in report and f"{transfer:+.2f} ± 0.00" in report
    # A cell recorded before a setting existed (its config.yaml lacks the key) reads it at its default:
    # an upgrade alone does not make it another setup.
    recorded = yaml.safe_load((out / "runs/equal-seed0/config.yaml").read_text())
    del recorded["data"]["prefetch"]
    (out / "runs/equal-seed0/config.yaml").write_text(yaml.safe_dump(recorded))
    upgraded = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert upgraded.returncode == 0 and "[1/2] equal, seed 0: done earlier, reused" in upgraded.stdout, upgraded.stderr[-2000:]
    # A task no held-out row had the label for (missing_label: masked) has no metrics: the report compares
    # the others and names it, as the console does.
    del multi["eval"]["cvr"]
    (out / "runs/equal-seed0/summary.json").write_text(json.dumps(multi))
    third = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    left_out = "ask(s) 'cvr' trained but left out of the comparison: no row of "
    assert f"concord compare: t{left_out}" in third.stdout
    report = (out / "report.md").read_text()
    assert f"T{left_out}" in report and "| method | ctr | watch |" in report and "gain cvr" not in report
    # A cell is reused only where it trained what this comparison would: with another override, or
    # with the training data changed since, the comparison stops before any cell trains, naming it.
    fourth = subprocess.run([*cmd[:-1], "train.max_steps=13"], cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 3 and "training" not in fourth.stdout
    assert f"concord: compare: {out}/runs/equal-seed0: trained with another setup than this command's (train.max_steps: 12 -> 13)" in fourth.stderr
    import pyarrow.parquet as pq

    (train_file,) = (tmp_path / "data/train").glob("*.parquet")
    pq.write_table(pq.read_table(train_file).slice(0, 2048), train_file)
    fifth = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert fifth.returncode == 3 and "(training data.rows: 4096 -> 2048)" in fifth.stderr, fifth.stderr[-2000:]


def test_torchx_component_passes_the_single_task_and_restarts(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from concord.launch.components import train

    monkeypatch.setenv("PATH", env_with_venv()["PATH"])  # torchrun, as in an activated environment

    app = train("train.max_steps=5", config="configs/tiny.yaml", single_task="cvr", max_restarts=2)
    (role,) = app.roles
    command = role.args[-1]  # dist.ddp runs torchrun through bash -c
    assert command.endswith("-m concord.trainer.cli train --config configs/tiny.yaml --single-task cvr train.max_steps=5")
    assert role.env["PET_MAX_RESTARTS"] == "2"
    assert "--single-task" not in train(config="configs/tiny.yaml").roles[0].args[-1]


def test_a_task_left_out_of_a_comparison_is_named_with_why():
    """A task some cell has no held-out NE or MSE for is left out, and the line says why: no labelled
    held-out row (a masked task), or, for a binary task, held-out rows of one class."""
    from concord.trainer.config import load_config
    from concord.trainer.tools.compare import _unscored_line, _why_unscored

    cfg = load_config(ROOT / "configs/tiny.yaml")
    ctr, cvr, _ = cfg.tasks
    summaries = {(0, "equal"): {"eval": {"ctr": {"calibration": 0.9, "label_mean": 1.0}, "watch": {"mse": 1.0}}},
                 (0, "emtl"): {"eval": {"ctr": {"calibration": 0.8, "label_mean": 1.0}, "cvr": {"ne": 0.9, "label_mean": 0.1},
                                        "watch": {"mse": 1.1}}}}  # cvr's labels absent from one cell: no labelled row
    unscored = {task.name: _why_unscored(task, summaries, cfg) for task in (ctr, cvr)}
    one_class = f"every row of {cfg.data.eval} that holds its label holds the same class (its NE needs both)"
    unlabelled = f"no row of {cfg.data.eval} holds its label with a weight above 0 (a masked task the held-out split lacks)"
    assert _unscored_line(unscored) == (f"task(s) 'ctr', 'cvr' trained but left out of the comparison: 'ctr': {one_class}; "
                                        f"'cvr': {unlabelled}; data.convert.split")
    assert _unscored_line({"ctr": unscored["ctr"]}) == (f"task(s) 'ctr' trained but left out of the comparison: {one_class}; "
                                                        "data.convert.split")


def test_the_verdict_is_a_paired_confidence_interval_over_seeds():
    from concord.trainer.tools.compare import paired_interval, verdict

    mean, lo, hi = paired_interval([0.4, 0.6, 0.5])  # sd 0.1, t(2) = 4.303: half-width 0.248
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5 - 4.303 * 0.1 / 3**0.5)
    assert verdict([0.4, 0.6, 0.5]) == "better"
    assert verdict([0.30, 0.05, 0.16]) == "no detectable difference"  # +0.17, but inside its interval
    assert verdict([-0.2, -0.25, -0.3]) == "worse"
    assert verdict([0.02]) == "no detectable difference"  # one seed: no interval


def test_compare_refuses_a_misspelt_method_in_one_line_before_any_cell_trains(tmp_path, capsys):
    from concord.trainer.cli import main

    args = ["compare", "--config", str(ROOT / "configs/tiny.yaml"), "--out", str(tmp_path / "out")]
    assert main([*args, "--methods", "equal,multibalanse", "--seeds", "2"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("concord: compare: unknown method 'multibalanse'; available: cograd, ") and "\n" not in err
    from concord.trainer.tools.compare import CompareError, run_compare

    with pytest.raises(CompareError, match="--seeds and --jobs must be >= 1, got 0 and 1"):  # called from Python
        run_compare(str(ROOT / "configs/tiny.yaml"), [], ["equal"], 0, str(tmp_path / "out"))
    with pytest.raises(CompareError, match=r"tiny.yaml: data.eval is not set: compare scores every cell on held-out data"):
        run_compare(str(ROOT / "configs/tiny.yaml"), ["data.eval="], ["equal"], 1, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "runs").exists()


def test_the_verdicts_say_how_many_a_table_of_that_size_shows_by_chance():
    """Nine comparisons at the 95% level: 0.45 chance verdicts expected, at least one with
    probability 1 - 0.95^9 = 37%; the note follows the verdict table."""
    from concord.trainer.config import load_config
    from concord.trainer.tools.compare import chance_note, verdict_table

    assert "9 comparisons:" in chance_note(9) and "about 0.5 such" in chance_note(9) and "probability 37%" in chance_note(9)
    cfg = load_config(str(ROOT / "configs/tiny.yaml"))
    gains = {m: {t.name: [0.1, -0.1] for t in cfg.tasks} for m in ("emtl", "cograd")}
    lines = verdict_table(cfg, ["equal", "emtl", "cograd"], gains)
    assert lines[-1] == chance_note(2 * len(cfg.tasks)) and lines[-3].startswith("| cograd |")


def test_compare_runs_a_method_in_lagged_mode_as_a_cell_of_its_own(tmp_path, monkeypatch):
    """``METHOD@previous[/K]`` in ``--methods``: checked before any cell trains, and its cell's config
    sets the statistics mode (so one report pairs both modes with ``equal`` over the same seeds).
    ``balancer.*`` overrides describe the base config's method: its cells get them, the others not."""
    import yaml

    from concord.trainer.config import load_config
    from concord.trainer.tools import compare

    config = str(ROOT / "configs/tiny.yaml")
    cfg = load_config(config)
    compare.check_methods(["equal", "multibalance", "multibalance@previous/10", "cograd@previous", "emtl@auto", "graddrop@auto"], cfg)
    for spec, message in [("graddrop@previous", "needs each step's own statistics"),
                          ("param_mgda@previous", "parameter-level"), ("emtl@later", "statistics must be one of"),
                          ("emtl@previous/x", "whole number"), ("nosuch@previous", "unknown method")]:
        with pytest.raises(ValueError, match=message):
            compare.check_methods([spec], cfg)
    assert compare.cell_name("multibalance@previous/10", 3) == "multibalance@previous-every10-seed3"

    commands = []

    def fake_train(_cells, cmd, log, env):
        commands.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("train.run_dir=")).split("=", 1)[1])
        (run_dir / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(compare.Cells, "train", fake_train)
    overrides = ["balancer.name=multibalance", "balancer.relax=0.5", "balancer.statistics=previous", "train.max_steps=3"]
    cfg = load_config(config, overrides)
    with pytest.raises(ValueError, match="graddrop@previous/10: .*needs each step's own statistics"):
        compare.check_methods(["graddrop@previous/10"], cfg)
    reduction = cfg.balancer.reduction
    for spec, expected in [
        ("multibalance@previous/10", {"name": "multibalance", "statistics": "previous", "statistics_every": 10, "relax": 0.5}),
        ("multibalance", {"name": "multibalance", "statistics": "previous", "statistics_every": "auto", "relax": 0.5}),
        ("equal", {"name": "equal", "statistics": "previous", "statistics_every": "auto"}),
        ("emtl@current", {"name": "emtl", "statistics": "current", "statistics_every": 1}),
        ("emtl@previous", {"name": "emtl", "statistics": "previous", "statistics_every": 1}),
        ("emtl@auto", {"name": "emtl", "statistics": "auto", "statistics_every": "auto"}),
    ]:
        run_dir = tmp_path / compare.cell_name(spec, 0)
        compare.train_cell(config, overrides, cfg, spec, 0, run_dir)
        assert yaml.safe_load((run_dir / "input.yaml").read_text())["balancer"] == {"reduction": reduction, **expected}
        assert "train.max_steps=3" in commands[-1] and not any(a.startswith("balancer.") for a in commands[-1])


def test_the_report_pairs_a_method_across_statistics_modes():
    from concord.trainer.config import load_config
    from concord.trainer.tools.compare import mode_pairs, mode_table

    methods = ["equal", "emtl", "emtl@current", "cograd@current", "emtl@previous/10"]
    assert mode_pairs(methods) == [("emtl@current", "emtl"), ("emtl@previous/10", "emtl")]  # cograd ran in one mode
    cfg = load_config(str(ROOT / "configs/tiny.yaml"))
    ne = {"emtl": [0.50, 0.40], "emtl@current": [0.45, 0.38], "emtl@previous/10": [0.50, 0.40]}
    summaries = {(s, m): {"eval": {t.name: {"ne": v[s], "mse": v[s]} for t in cfg.tasks}} for m, v in ne.items() for s in range(2)}
    table = mode_table(cfg, 2, summaries, mode_pairs(methods))
    current = next(line for line in table if line.startswith("| emtl@current | emtl |"))
    assert current.count("+7.50 [") == len(cfg.tasks)  # (10% + 5%) / 2, paired by seed
    assert "| emtl@previous/10 | emtl | +0.00 [+0.00, +0.00]: no detectable difference |" in "\n".join(table)


def bench_tiny(tmp_path: Path, methods: str, rounds: int, steps: int, *overrides: str) -> dict:
    """``concord bench`` of the tiny config on 2 ranks into ``tmp_path/bench``; its report's methods."""
    run_dir = tmp_path / "bench"
    cmd = [sys.executable, "-m", "concord.trainer.cli", "bench", "--config", "configs/tiny.yaml", "--methods", methods,
           "--rounds", str(rounds), "--steps", str(steps), *tiny_data(tmp_path), f"train.run_dir={run_dir}",
           "train.qps_skip_steps=2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "bench.json").read_text())["methods"]


@pytest.mark.parametrize("carrier, header", [
    ("dist.statistics_in_ddp=true", "lagged statistics summed in DDP's gradient all-reduce"),  # equal's config would not ride (auto)
    ("dist.statistics_on_host=true", "lagged statistics summed through shared memory on this host"),
])
def test_bench_alternates_methods_every_step_and_keeps_each_balancers_state(tmp_path, carrier, header):
    """``concord bench --steps 1``: one timed step per method per round, each method's balancer built
    once and swapped back in, so its step count runs on across rounds; the report gives the standard
    error of each mean drop. A method named without a mode runs as ``concord train`` would run it
    (the config's ``balancer.statistics: auto``: MultiBalance lagged, every 10 steps). The lagged
    statistics go with DDP's all-reduce, or through shared memory."""
    report = bench_tiny(tmp_path, "none,equal,multibalance,multibalance@previous,multibalance@current", 4, 1, carrier)
    assert set(report) == {"none", "equal", "multibalance", "multibalance@previous", "multibalance@current"}
    assert {m: r["statistics"] for m, r in report.items()} == {
        "none": "-", "equal": "previous", "multibalance": "previous/10", "multibalance@previous": "previous",
        "multibalance@current": "current"}
    assert report["equal"]["drop_pct_mean"] == 0.0 and report["equal"]["drop_pct_sem"] == 0.0
    assert all(r["qps_mean"] > 0 for r in report.values())
    table = (tmp_path / "bench/bench.md").read_text()
    assert "± s.e." in table and header in table  # 2 gloo ranks
    # warm-up (at least 3 steps) + 4 rounds x 1 step, and no untimed step after a switch with --steps 1
    assert report["multibalance"]["balancer_steps"] == report["equal"]["balancer_steps"] == 3 + 4
    # Lagged, its sums went by the carrier; one that never arrived would have stopped the run.
    assert report["multibalance@previous"]["balancer_steps"] == 3 + 4
    assert report["none"]["balancer_steps"] == 0


def test_bench_blocks_longer_than_the_shared_memory_ring_keep_each_methods_sum_in_flight(tmp_path):
    """Blocks of 5 steps: while one lagged method is swapped out with a sum in flight, the other
    writes more statistics than a host exchange keeps slots for: each method's sums go through an
    exchange of its own, and none is written over before it is read."""
    report = bench_tiny(tmp_path, "equal@previous,multibalance@previous,emtl@previous", 3, 5, "dist.statistics_on_host=true")
    assert all(report[m]["balancer_steps"] == 3 + 3 * (1 + 5) for m in ("multibalance@previous", "emtl@previous"))


def test_bench_names_a_bad_method_before_any_rank_starts(tmp_path):
    cmd = [sys.executable, "-m", "concord.trainer.cli", "bench", "--config", "configs/tiny.yaml",
           "--methods", "none,equal,param_mgda@previous", *tiny_data(tmp_path), f"train.run_dir={tmp_path / 'bench'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "concord: bench: param_mgda@previous: a parameter-level method has no boundary statistics to lag")
    assert not (tmp_path / "bench").exists()


def _auc(scores, labels):
    """Area under the ROC curve from first principles: P(score of a positive > score of a negative)."""
    import numpy as np

    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_predict_without_a_checkpoint_is_one_line_before_any_rank_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--checkpoint", str(tmp_path / "rnu"),
                           "--out", str(tmp_path / "p.parquet")], cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and proc.stderr == f"concord: predict: {tmp_path / 'rnu'}: no checkpoint to score with (no such run directory)\n"
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml",
                           *tiny_data(tmp_path), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "p.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and proc.stderr == (
        f"concord: predict: {tmp_path / 'run'}: no checkpoint to score with (run_dir/checkpoints holds none)\n")

    # Raw CSV to score: one line saying what makes Parquet of it, before any rank starts.
    (tmp_path / "run/checkpoints/step-00000001").mkdir()
    (tmp_path / "raw.csv").write_text("user,item\n1,2\n")
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml",
                           "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "raw.csv"), "--out", str(tmp_path / "p.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert f"--data: {tmp_path / 'raw.csv'} is not Parquet data; it is raw text: `concord convert` writes Parquet" in proc.stderr
    # With the checkpoint's record of its training data, the line gives the command that encodes it alike.
    (tmp_path / "run/checkpoints/step-00000001/concord.json").write_text(json.dumps({"fingerprint": {"data": {"train": "runs/x/data/train"}}}))
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml",
                           "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "raw.csv"), "--out", str(tmp_path / "p.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert (f"it is raw text: encode it like the data the checkpoint trained on, `concord convert --config "
            f"{tmp_path / 'run/config.yaml'} --encode-like runs/x/data "
            f"--out DIR data.convert.input={tmp_path / 'raw.csv'}`") in proc.stderr
    # --out naming a folder: one line now, rather than an error from the file write after every row is scored.
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *tiny_data(tmp_path),
                           "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (
        f"concord: predict: --out {tmp_path}: is a folder; name the predictions' file, e.g. {tmp_path / 'predictions.parquet'}\n")


def test_predict_names_a_file_without_a_passthrough_column_or_of_another_type_before_scoring(tmp_path):
    """Each carried column takes the type of the first file that types it (files where it holds only
    nulls, untyped, do not count); a file without it, or of another type, is named before the model
    is built."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from concord.trainer.data.layout import DataError
    from concord.trainer.predict import _passthrough_schema

    files = [str(tmp_path / f"{name}.parquet") for name in "abcd"]
    pq.write_table(pa.table({"request": pa.nulls(1), "x": [1]}), files[0])
    pq.write_table(pa.table({"request": ["a"], "x": [1]}), files[1])
    pq.write_table(pa.table({"x": [2]}), files[2])
    pq.write_table(pa.table({"request": [7], "x": [2]}), files[3])
    assert _passthrough_schema(files[:2], []) is None
    assert _passthrough_schema(files[:1], ["request"]) == pa.schema([pa.field("request", pa.null())])
    assert _passthrough_schema(files[:2], ["x", "request"]) == pa.schema([pa.field("x", pa.int64()), pa.field("request", pa.string())])
    with pytest.raises(DataError, match=r"c.parquet: no column 'request' \(data.passthrough\); convert the data again with it"):
        _passthrough_schema(files[:3], ["request"])
    with pytest.raises(DataError, match=rf"d\.parquet: column 'request' \(data.passthrough\) is int64 here but string in {files[1]}"):
        _passthrough_schema([files[0], files[1], files[3]], ["request"])


def test_predict_joins_the_ranks_parts_and_the_passthrough_columns_a_batch_at_a_time(tmp_path):
    """Rank 0 streams the parts into the output beside the data's passthrough columns, however the
    parts' rows and the files' rows are cut, in row order; files whose passthrough column holds only
    nulls join, the first of them too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from concord.trainer.predict import _join, _passthrough_schema

    keys = [f"k{r}" if r not in (0, 1, 2, 3, 4) else None for r in range(10)]
    for name, rows in (("a", range(0, 4)), ("b", range(4, 5)), ("c", range(5, 10))):
        request = pa.array(keys[rows.start:rows.stop], pa.string() if name == "c" else pa.null())  # a's, b's: nulls alone
        pq.write_table(pa.table({"request": request, "day": [r // 3 for r in rows]}), tmp_path / f"{name}.parquet", row_group_size=2)
    parts = []
    for rank, rows in enumerate((range(0, 3), range(3, 10))):
        parts.append(tmp_path / f"rank-{rank}.parquet")
        pq.write_table(pa.table({"row": list(rows), "pred": [r / 10 for r in rows]}), parts[-1], row_group_size=2)
    files = [str(tmp_path / f"{name}.parquet") for name in "abc"]
    _join(parts, files, _passthrough_schema(files, ["day", "request"]), str(tmp_path / "out.parquet"))
    assert pq.read_table(tmp_path / "out.parquet").to_pydict() == {
        "row": list(range(10)), "pred": [r / 10 for r in range(10)], "day": [r // 3 for r in range(10)], "request": keys}


def test_predict_writes_one_row_per_input_row_with_the_evaluations_metrics(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tiny_data(tmp_path)
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "train", "--config", "configs/tiny.yaml", *data,
                            f"train.run_dir={run}", "train.max_steps=10"], cwd=ROOT, env=env_with_venv(),
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "pred.parquet"
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *data,
                           "--checkpoint", str(run), "--out", str(out)], cwd=ROOT, env=env_with_venv(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pq.read_table(out).to_pydict()
    eval_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "data/eval").glob("*.parquet"))
    assert table["row"] == list(range(eval_rows))  # every row once, in the data's order
    import numpy as np

    auc = _auc(np.array(table["pred_ctr"]), np.array(table["label_ctr"]))
    summary = json.loads((run / "summary.json").read_text())
    # torchrec sums its trapezoids in float32 and breaks ties among equal float32 predictions its own
    # way; 1e-4 is far below any AUC difference a user would read.
    assert auc == pytest.approx(summary["eval"]["ctr"]["auc"], abs=1e-4)

    # Data to score without the ctr label: its predictions, and no metrics for it (its labels would read as zeros).
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for part in (tmp_path / "data/eval").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["label_ctr"]), unlabelled / part.name)
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *data,
                           "--checkpoint", str(run), "--data", str(unlabelled), "--out", str(tmp_path / "p2.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(line.startswith("ctr ") for line in proc.stdout.splitlines())  # no row of dashes
    assert "no metrics for ctr: the scored data holds no such labels" in proc.stdout.splitlines()
    assert any(line.startswith("cvr ") for line in proc.stdout.splitlines())
    written = pq.read_table(tmp_path / "p2.parquet").column_names
    assert "pred_ctr" in written and "label_ctr" not in written and "label_cvr" in written

    # Data where some rows have no ctr label, for a task whose label may be missing: those rows read
    # null in the output, and the metrics are over the rest. Each row has a key the model does not
    # read (data.passthrough): the output carries it beside the row's scores.
    partly = tmp_path / "partly"
    partly.mkdir()
    for i, part in enumerate(sorted((tmp_path / "data/eval").glob("*.parquet"))):
        t = pq.read_table(part)
        ctr = np.array(t.column("label_ctr"))
        missing = np.arange(len(ctr)) % 3 == 0
        t = t.append_column("request", pa.array([f"{i}-{r}" for r in range(len(t))]))
        pq.write_table(t.set_column(t.schema.get_field_index("label_ctr"), "label_ctr", pa.array(ctr, mask=missing)), partly / part.name)
    pq.write_table(t.slice(0, 0), partly / "0-no-rows.parquet")  # as Spark leaves one: the first file, adding no row
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *data,
                           "tasks.0.missing_label=masked", "data.passthrough=[request]", "--checkpoint", str(run), "--data", str(partly),
                           "--out", str(tmp_path / "p3.parquet")], cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = pq.read_table(tmp_path / "p3.parquet").to_pydict()
    assert scored["request"] == [r for part in sorted(partly.glob("*.parquet")) for r in pq.read_table(part).column("request").to_pylist()]
    labels = np.array([np.nan if y is None else y for y in scored["label_ctr"]])
    expected = np.array([y for part in sorted(partly.glob("*.parquet")) for y in pq.read_table(part).column("label_ctr").to_pylist()], dtype=float)
    np.testing.assert_array_equal(labels, expected)  # null where the data had none, in the data's row order
    present = ~np.isnan(labels)
    assert 0 < present.sum() < len(labels)
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("ctr "))
    assert float(row[3]) == pytest.approx(_auc(np.array(scored["pred_ctr"])[present], labels[present]), abs=1e-4)

    # Data of no rows at all: one line, and no output file claimed.
    (tmp_path / "no_rows").mkdir()
    shutil.copy(partly / "0-no-rows.parquet", tmp_path / "no_rows")
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *data,
                           "--checkpoint", str(run), "--data", str(tmp_path / "no_rows"), "--out", str(tmp_path / "p5.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and not (tmp_path / "p5.parquet").exists()
    assert proc.stderr.strip().splitlines()[-1].endswith(f"DataError: {tmp_path / 'no_rows'}: no rows to score (its files hold none)")

    # A config describing another model: one line naming the setting that differs.
    proc = subprocess.run([sys.executable, "-m", "concord.trainer.cli", "predict", "--config", "configs/tiny.yaml", *data,
                           "model.tables.1.embedding_dim=16", "--checkpoint", str(run), "--out", str(tmp_path / "p4.parquet")],
                          cwd=ROOT, env=env_with_venv(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3
    assert "holds another model than configs/tiny.yaml describes (model.tables[1].embedding_dim: 8 -> 16)" in proc.stderr.strip().splitlines()[-1]
