"""Chooses the base hyper-parameters once, for `equal`, on a validation split; every method then uses them.

    python docs/quality/tune_equal.py --config adult --validation runs/adult/val/validation \
        --out docs/quality/tuning/adult.md data.train=runs/adult/val/train

Trains `equal` on the training split for every cell of a small grid (the dense optimizer's and the
tables' learning rates) and several seeds, scores each cell on the validation split, never on the
held-out one, and writes a table. Score: the mean over tasks of the held-out metric (NE for binary
tasks, MSE for regression) relative to the config's own cell, averaged over seeds; lower is better.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path


def train(config: str, overrides: list, run_dir: Path) -> dict:
    """One run; its output goes to ``run_dir``.log (kept when it fails)."""
    cmd = [sys.executable, "-m", "concord", "train", "--config", config, *overrides, f"train.run_dir={run_dir}",
           "train.resume=false", "train.progress=false", "train.checkpoint_final=false"]
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {code}; its output: {log}")
    return json.loads((run_dir / "summary.json").read_text())["eval"]


def metric(task: dict) -> float:
    return task["ne"] if "ne" in task else task["mse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--validation", required=True, help="the validation split, scored instead of data.eval")
    parser.add_argument("--out", required=True, help="markdown table")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dense-lr", default="0.0003,0.001,0.003")
    parser.add_argument("--table-lr", default="0.02,0.05,0.1")
    parser.add_argument("--base", default="0.001,0.05", help="the config's own cell: dense lr, table lr")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = Path("runs/tune") / Path(args.out).stem
    grid = list(itertools.product([float(v) for v in args.dense_lr.split(",")], [float(v) for v in args.table_lr.split(",")]))
    results = {}
    for cell in grid:
        for seed in range(args.seeds):
            overrides = [*args.overrides, f"data.eval={args.validation}", f"train.seed={seed}",
                         f"train.dense_optimizer.lr={cell[0]}", f"model.embedding_optimizer.lr={cell[1]}"]
            results[cell, seed] = train(args.config, overrides, runs / f"dense{cell[0]}-table{cell[1]}-seed{seed}")
            print(f"dense lr {cell[0]}, table lr {cell[1]}, seed {seed}: "
                  + ", ".join(f"{t} {metric(v):.4f}" for t, v in results[cell, seed].items()), flush=True)
    base = tuple(float(v) for v in args.base.split(","))
    tasks = list(results[base, 0])
    score = {cell: statistics.mean(metric(results[cell, s][t]) / metric(results[base, s][t]) for s in range(args.seeds) for t in tasks)
             for cell in grid}
    best = min(grid, key=score.get)
    lines = [f"# `equal` on the validation split: `--config {args.config}`", "",
             f"Validation split `{args.validation}`; {args.seeds} seeds; overrides `{' '.join(args.overrides) or '-'}`. "
             "Score: mean over tasks and seeds of the validation metric relative to the config's own cell "
             f"(dense lr {base[0]}, table lr {base[1]}); lower is better.", "",
             "| dense lr | table lr | " + " | ".join(f"{t} (mean over seeds)" for t in tasks) + " | score |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for cell in grid:
        means = [statistics.mean(metric(results[cell, s][t]) for s in range(args.seeds)) for t in tasks]
        mark = " **chosen**" if cell == best else (" (config)" if cell == base else "")
        lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {score[cell]:.4f}{mark} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    chosen = {"train.dense_optimizer.lr": best[0], "model.embedding_optimizer.lr": best[1]}
    Path(args.out).with_suffix(".json").write_text(json.dumps({"chosen": chosen, "score": score[best]}, indent=2) + "\n")
    print(f"chosen: dense lr {best[0]}, table lr {best[1]} (score {score[best]:.4f}); table in {args.out}")


if __name__ == "__main__":
    main()
