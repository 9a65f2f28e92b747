"""Chooses the base hyper-parameters once, for `equal`, on a validation split; every method then uses them.

    python docs/quality/tune_equal.py --config adult --validation runs/adult/val/validation \
        --out docs/quality/tuning/adult.md data.train=runs/adult/val/train

Trains `equal` on the training split for every cell of a small grid (the dense optimizer's and the
tables' learning rates, and with --epochs the number of epochs) and several seeds, scores each cell
on the validation split, never on the held-out one, and writes a table. Score: the mean over tasks
of the held-out metric (NE for binary tasks, MSE for regression) relative to a base cell (the config's
own, by default), averaged over seeds; lower is better.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path


def train(config: str, overrides: list, run_dir: Path, reuse: bool) -> dict:
    """One run; its output goes to ``run_dir``.log (kept when it fails). With ``reuse``, a cell that
    already finished (its summary written) is read instead of trained again: a grid extended at its
    edge trains only the new cells."""
    summary = run_dir / "summary.json"
    if reuse and summary.exists():
        return json.loads(summary.read_text())["eval"]
    cmd = [sys.executable, "-m", "concord", "train", "--config", config, *overrides, f"train.run_dir={run_dir}",
           "train.resume=false", "train.progress=false", "train.checkpoint_final=false"]
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {code}; its output: {log}")
    return json.loads(summary.read_text())["eval"]


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
    parser.add_argument("--epochs", default=None, help="also search train.epochs over these values (default: the config's)")
    parser.add_argument("--base", default="0.001,0.05", help="the config's own cell: dense lr, table lr[, epochs]")
    parser.add_argument("--runs", default=None, help="where the cells' runs go (default runs/tune/<out's name>)")
    parser.add_argument("--reuse", action="store_true", help="read the cells already trained there")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = Path(args.runs) if args.runs else Path("runs/tune") / Path(args.out).stem
    epochs = [int(v) for v in args.epochs.split(",")] if args.epochs else [None]
    grid = list(itertools.product([float(v) for v in args.dense_lr.split(",")], [float(v) for v in args.table_lr.split(",")], epochs))
    base_values = args.base.split(",")
    base = (float(base_values[0]), float(base_values[1]), int(base_values[2]) if len(base_values) > 2 else None)
    if base not in grid:
        raise SystemExit(f"the base cell {describe(base)} is not in the grid")
    results = {}
    for cell in grid:
        dense, table, epoch = cell
        for seed in range(args.seeds):
            overrides = [*args.overrides, f"data.eval={args.validation}", f"train.seed={seed}",
                         f"train.dense_optimizer.lr={dense}", f"model.embedding_optimizer.lr={table}"]
            name = f"dense{dense}-table{table}"
            if epoch is not None:
                overrides.append(f"train.epochs={epoch}")
                name += f"-epochs{epoch}"
            results[cell, seed] = train(args.config, overrides, runs / f"{name}-seed{seed}", args.reuse)
            print(f"{describe(cell)}, seed {seed}: " + ", ".join(f"{t} {metric(v):.4f}" for t, v in results[cell, seed].items()), flush=True)
    tasks = list(results[base, 0])
    score = {cell: statistics.mean(metric(results[cell, s][t]) / metric(results[base, s][t]) for s in range(args.seeds) for t in tasks)
             for cell in grid}
    best = min(grid, key=score.get)
    columns = ["dense lr", "table lr"] + (["epochs"] if args.epochs else [])
    method = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("balancer.name=")), "equal")
    lines = [f"# `{method}` on the validation split: `--config {args.config}`", "",
             f"Validation split `{args.validation}`; {args.seeds} seeds; overrides `{' '.join(args.overrides) or '-'}`. "
             "Score: mean over tasks and seeds of the validation metric relative to the base cell "
             f"({describe(base)}); lower is better.", "",
             "| " + " | ".join(columns) + " | " + " | ".join(f"{t} (mean over seeds)" for t in tasks) + " | score |",
             "|" + "---|" * len(columns) + "---|" * len(tasks) + "---|"]
    for cell in grid:
        means = [statistics.mean(metric(results[cell, s][t]) for s in range(args.seeds)) for t in tasks]
        mark = " **chosen**" if cell == best else (" (config)" if cell == base else "")
        values = [str(v) for v in cell if v is not None]
        lines.append("| " + " | ".join(values) + " | " + " | ".join(f"{m:.4f}" for m in means) + f" | {score[cell]:.4f}{mark} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    chosen = {"train.dense_optimizer.lr": best[0], "model.embedding_optimizer.lr": best[1]}
    if best[2] is not None:
        chosen["train.epochs"] = best[2]
    Path(args.out).with_suffix(".json").write_text(json.dumps({"chosen": chosen, "score": score[best]}, indent=2) + "\n")
    print(f"chosen: {describe(best)} (score {score[best]:.4f}); table in {args.out}")


def describe(cell: tuple) -> str:
    dense, table, epochs = cell
    return f"dense lr {dense}, table lr {table}" + (f", {epochs} epochs" if epochs is not None else "")


if __name__ == "__main__":
    main()
