"""``concord tune``: the base hyper-parameters, chosen once for the config's method on a validation split.

The protocol behind every quality report (docs/quality/): train the config's method (``equal`` for a
comparison) for every cell of a small grid (the dense optimizer's learning rate, the tables' and, if
asked, the number of epochs) and a few seeds, score each cell on the validation split, never on the
held-out one, and choose the best; every method is then compared at that base. Score: the mean over
tasks and seeds of the validation metric (NE for binary tasks, MSE for regression) relative to the
config's own cell, which is always in the grid; lower is better.

Cells are trained as ``concord compare``'s are (``data.eval`` pointed at the validation split), one
run directory each under ``OUT/runs``, every one from the config as it read at the start
(``OUT/config.yaml``); a cell trained earlier is reused where it trained what this grid would, and
the cells an earlier call trained in ``OUT`` for the same setup join the grid (a grid extended at
its edge is chosen from whole). ``OUT/report.md`` holds the table, ``OUT/chosen.json`` the chosen
overrides; with two seeds or more both also give the seed noise of a cell's score against the chosen
one's and the cells within it, which those seeds cannot tell from the choice (a flat neighbourhood
keeps "extending the edge" otherwise). The report asks for a grid's edge to be extended where the chosen
cell lies on it and its neighbour inward scores worse beyond that noise; where the neighbour is within
it, the report says the seeds show no slope there, and that a cell beyond wants more seeds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from concord.trainer.config import Config, load_config
from concord.trainer.data.layout import check_data_exists
from concord.trainer.tools.cells import Cells
from concord.trainer.tools.compare import CompareError, check_reusable, config_label, quality, snapshot_config, train_cell

Cell = Tuple[float, float, Optional[int]]  # dense lr, table lr, epochs (None: the config's)


class TuneError(RuntimeError):
    """Tune cannot run as asked, checked before any cell trains, or some cells did not train."""


def around(value: float) -> List[float]:
    """The default grid of a learning rate: a third of the config's value, the value, three times it."""
    return [float(f"{value / 3:.3g}"), value, float(f"{value * 3:.3g}")]


def cell_overrides(cell: Cell) -> List[str]:
    dense, table, epochs = cell
    out = [f"train.dense_optimizer.lr={dense}", f"model.embedding_optimizer.lr={table}"]
    return out + ([f"train.epochs={epochs}"] if epochs is not None else [])


def describe(cell: Cell) -> str:
    dense, table, epochs = cell
    return f"dense lr {dense}, table lr {table}" + (f", {epochs} epochs" if epochs is not None else "")


def run_tune(
    config_path: str,
    overrides: Sequence[str],
    out_dir: str,
    validation: Optional[str] = None,
    dense_lrs: Optional[List[float]] = None,
    table_lrs: Optional[List[float]] = None,
    epochs: Optional[List[int]] = None,
    seeds: int = 2,
    jobs: int = 1,
) -> Dict[str, float]:
    """Trains the grid and writes the report; returns the chosen overrides (key -> value)."""
    cfg = load_config(config_path, overrides)
    validation = validation or cfg.data.validation
    if not validation:
        raise TuneError(f"{cfg.source}: no validation split: set data.validation (concord convert writes it with "
                        "data.convert.split.validation_fraction) or pass --validation; the held-out split is never tuned on")
    if cfg.data.eval and Path(validation).resolve() == Path(cfg.data.eval).resolve():
        raise TuneError(f"--validation {validation} is data.eval, the held-out split the comparison scores: tune on a "
                        "validation split carved from the training data (data.convert.split.validation_fraction)")
    if seeds < 1 or jobs < 1:
        raise TuneError(f"--seeds and --jobs must be >= 1, got {seeds} and {jobs}")
    base: Cell = (cfg.train.dense_optimizer.lr, cfg.model.embedding_optimizer.lr, cfg.train.epochs if epochs else None)
    grid: List[Cell] = sorted(set(itertools.product(
        dense_lrs or around(base[0]), table_lrs or around(base[1]), epochs or [None])) | {base}, key=_order)
    on_validation = [*overrides, *scored_on(cfg, validation)]
    check_data_exists(load_config(config_path, on_validation))
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    config_path = snapshot_config(config_path, out)
    method = cfg.balancer.name
    grid = sorted(set(grid) | set(earlier_cells(out, config_path, on_validation, cfg, grid, seeds)), key=_order)
    todo = [(cell, seed, _run_dir(out, cell, seed)) for cell in grid for seed in range(seeds)]
    threads = max(1, (os.cpu_count() or 1) // (jobs * cfg.world_size))
    try:
        for cell, seed, run_dir in todo:  # before any cell trains: one line naming the first that cannot join
            if (run_dir / "summary.json").is_file():
                check_reusable(config_path, [*on_validation, *cell_overrides(cell)], cfg, method, seed, run_dir, None)
    except CompareError as error:
        raise TuneError(str(error)) from None

    runner = Cells()

    def run(i: int, cell: Cell, seed: int, run_dir: Path) -> None:
        what = f"{describe(cell)}, seed {seed}"
        reused = (run_dir / "summary.json").is_file()
        if not reused:
            print(f"[{i}/{len(todo)}] {what}: training ...", flush=True)
            train_cell(config_path, [*on_validation, *cell_overrides(cell)], cfg, method, seed, run_dir, None, threads, runner)
        scores = json.loads((run_dir / "summary.json").read_text())["eval"]
        shown = ", ".join(f"{t} {_metric(cfg, t, scores):.4f}" for t in cfg.task_names if _metric(cfg, t, scores) is not None)
        print(f"[{i}/{len(todo)}] {what}{' (done earlier, reused)' if reused else ''}: {shown}", flush=True)

    failed = runner.run(run, todo, jobs)
    if failed:  # every other cell ran; a rerun trains only the failed ones
        raise TuneError(f"{len(failed)} of {len(todo)} cells failed; first: {failed[0]}")
    results = {(cell, seed): json.loads((run_dir / "summary.json").read_text())["eval"] for cell, seed, run_dir in todo}
    chosen, close = write_report(out, cfg, overrides, validation, grid, base, seeds, results)
    noise = f" ({len(close)} other cell(s) within its seed noise: the report names them)" if close else ""
    print(f"chosen: {describe(chosen)}{noise}; report in {out / 'report.md'}; train with: " + " ".join(cell_overrides(chosen)))
    return chosen_settings(chosen)


# A cell's run directory, as _name and the seed make it; a rate may hold '-' itself (1e-05).
_CELL_DIR = re.compile(r"dense(?P<dense>.+?)-table(?P<table>.+?)(?:-epochs(?P<epochs>\d+))?-seed(?P<seed>\d+)")


def cell_of(run_dir: str) -> Optional[Tuple[Cell, int]]:
    """The cell and seed a run directory's name holds (``_name(cell)-seedN``); None for another name."""
    match = _CELL_DIR.fullmatch(run_dir)
    try:
        cell = (float(match["dense"]), float(match["table"]), int(match["epochs"]) if match["epochs"] else None)
    except (TypeError, ValueError):  # no match, or not numbers
        return None
    return cell, int(match["seed"])


def earlier_cells(out: Path, config_path: str, overrides: Sequence[str], cfg: Config, grid: List[Cell], seeds: int) -> List[Cell]:
    """Cells outside ``grid`` that an earlier call trained in ``out`` with what this call would train
    there: they join the grid, so a grid extended at its edge is chosen from as a whole, and a call
    with more ``seeds`` trains their other seeds too (they are scored alike). A cell of another setup
    (config, overrides, data) is named and left out."""
    found: Dict[Cell, set] = {}
    for run_dir in sorted((out / "runs").iterdir()):
        parsed = cell_of(run_dir.name)
        if parsed is None or not (run_dir / "summary.json").is_file():
            continue
        cell, seed = parsed
        if (cell[2] is None) == (grid[0][2] is None):  # epochs searched in both, or in neither
            found.setdefault(cell, set()).add(seed)
    joined, short = [], 0
    for cell in sorted(set(found) - set(grid), key=_order):
        trained = sorted(found[cell] & set(range(seeds)))
        if not trained:
            continue
        try:
            for seed in trained:
                check_reusable(config_path, [*overrides, *cell_overrides(cell)], cfg, cfg.balancer.name, seed,
                               _run_dir(out, cell, seed), None)
        except CompareError as error:
            print(f"not joined, trained earlier for another setup: {describe(cell)} ({error})", flush=True)
            continue
        joined.append(cell)
        short += len(trained) < seeds
    if joined:
        shown = "; ".join(map(describe, joined[:3])) + (f"; and {len(joined) - 3} more" if len(joined) > 3 else "")
        more = f" ({short} of them trained for fewer seeds than {seeds}: their other seeds train now)" if short else ""
        print(f"{len(joined)} cell(s) trained earlier in {out} join the grid{more}: {shown}", flush=True)
    return joined


def chosen_settings(cell: Cell) -> Dict[str, float]:
    """The chosen cell as config keys and values (``OUT/chosen.json``)."""
    dense, table, epochs = cell
    settings = {"train.dense_optimizer.lr": dense, "model.embedding_optimizer.lr": table}
    return {**settings, "train.epochs": epochs} if epochs is not None else settings


def seed_scores(cfg: Config, grid: List[Cell], base: Cell, seeds: int, results: Dict) -> Dict[Cell, List[float]]:
    """Each cell's score per seed: its mean over tasks of the validation metric relative to the base
    cell's of the same seed (a task unscored on the validation split, for want of labels, is left out)."""
    tasks = [t for t in cfg.task_names if all(_metric(cfg, t, results[base, s]) is not None for s in range(seeds))]
    if not tasks:
        raise TuneError("no task has a validation NE or MSE: no row of the validation split has a label, or (binary tasks) "
                        "every one has the same")
    return {cell: [statistics.mean(_metric(cfg, t, results[cell, s]) / _metric(cfg, t, results[base, s]) for t in tasks)
                   for s in range(seeds)] for cell in grid}


def score(cfg: Config, grid: List[Cell], base: Cell, seeds: int, results: Dict) -> Dict[Cell, float]:
    """Each cell's mean over tasks and seeds of its validation metric relative to the base cell's of
    the same seed."""
    return {cell: statistics.mean(per_seed) for cell, per_seed in seed_scores(cfg, grid, base, seeds, results).items()}


def seed_noise(per_seed: Dict[Cell, List[float]], chosen: Cell) -> Optional[Tuple[float, List[Cell]]]:
    """How far apart the seeds leave a cell's score and the chosen one's: the standard error of the
    mean paired difference (same seed: same initialisation and data order), its variance pooled over
    the grid's other cells, as seed noise is much the same from cell to cell and a grid has few seeds
    a cell; and the cells whose mean difference from the chosen is within two such errors, which
    these seeds do not tell apart from it. None with one seed or a grid of one cell."""
    others = [cell for cell in per_seed if cell != chosen]
    seeds = len(per_seed[chosen])
    if seeds < 2 or not others:
        return None
    differences = {cell: [a - b for a, b in zip(per_seed[cell], per_seed[chosen])] for cell in others}
    variance = statistics.mean(statistics.variance(d) for d in differences.values())
    error = math.sqrt(variance / seeds)
    return error, [cell for cell in others if statistics.mean(differences[cell]) < 2 * error]


def scored_on(cfg: Config, validation: str) -> List[str]:
    """Overrides that make a cell score on ``validation``: it becomes ``data.eval``, and
    ``data.validation``, now the same folder, is left out together with what would write it (convert's
    and synth's validation share, which training never reads)."""
    overrides = [f"data.eval={validation}", "data.validation=null"]
    if cfg.data.convert is not None and cfg.data.convert.split.validation_fraction > 0:
        overrides.append("data.convert.split.validation_fraction=0")
    if cfg.data.synthetic is not None and cfg.data.synthetic.validation_rows > 0:
        overrides.append("data.synthetic.validation_rows=0")
    return overrides


def write_report(out: Path, cfg: Config, overrides: Sequence[str], validation: str, grid: List[Cell], base: Cell, seeds: int,
                 results: Dict) -> Tuple[Cell, List[Cell]]:
    """Writes ``report.md`` and ``chosen.json``; the chosen cell and the cells within its seed noise."""
    per_seed = seed_scores(cfg, grid, base, seeds, results)
    scores = {cell: statistics.mean(values) for cell, values in per_seed.items()}
    chosen = min(grid, key=lambda cell: (scores[cell], cell != base))  # a tie keeps the config's own cell
    with_epochs = base[2] is not None
    unscored = [t for t in cfg.task_names if _metric(cfg, t, results[base, 0]) is None]
    columns = ["dense lr", "table lr"] + (["epochs"] if with_epochs else [])
    lines = [f"# `{cfg.balancer.name}` on the validation split: `{config_label(cfg.source)}`", "",
             f"Validation split `{validation}`; {seeds} seed(s); overrides `{' '.join(overrides) or '-'}`. Score: mean "
             f"over tasks and seeds of the validation metric (NE, MSE for regression) relative to the config's cell "
             f"({describe(base)}); lower is better."
             + "".join(f" Not scored, {_why_unscored(t, results[base, 0])}." for t in unscored), "",
             "| " + " | ".join(columns) + " | " + " | ".join(f"{t} (mean over seeds)" for t in cfg.task_names) + " | score |",
             "|" + "---|" * (len(columns) + len(cfg.task_names) + 1)]
    for cell in grid:
        means = [statistics.mean(_metric(cfg, t, results[cell, s]) for s in range(seeds)) if _metric(cfg, t, results[cell, 0]) is not None else float("nan")
                 for t in cfg.task_names]
        mark = " **chosen**" if cell == chosen else (" (config)" if cell == base else "")
        values = [str(v) for v in cell if v is not None]
        lines.append("| " + " | ".join(values) + " | " + " | ".join("–" if math.isnan(m) else f"{m:.4f}" for m in means)
                     + f" | {scores[cell]:.4f}{mark} |")
    noise = seed_noise(per_seed, chosen)
    edges = _edges(grid, chosen)
    flat = [(name, inward) for name, inward in edges if noise is not None and inward in noise[1]]
    rising = [name for name, inward in edges if (name, inward) not in flat]
    if rising:
        lines += ["", f"The chosen cell lies at the grid's edge in {', '.join(rising)}: extend the grid there "
                  "(a cell trained already is reused)."]
    if flat:  # seeds that cannot tell the neighbour from the choice show no slope: a cell beyond wants more of them
        lines += ["", f"{'It' if rising else 'The chosen cell'} lies at the grid's edge in {', '.join(name for name, _ in flat)}"
                  f"{' too' if rising else ''}, but its neighbour inward ({'; '.join(describe(cell) for _, cell in flat)}) scores "
                  f"within the seeds' noise of it (below): these seeds show no slope to follow there; a cell beyond "
                  f"that edge is worth training with more of them (`--seeds {2 * seeds}`), not instead."]
    if noise is not None:
        error, close = noise
        lines += ["", f"Seed noise: a cell's score less the chosen one's, paired by seed, has a standard error of "
                  f"{error:.4f} (pooled over the grid's cells). "
                  + (f"Within two of it, {len(close)} cell(s) these seeds do not tell from the chosen one: "
                     + "; ".join(describe(cell) for cell in close) + f". More seeds (`--seeds {2 * seeds}`: every cell of "
                     "this grid and of the earlier calls trains the seeds it lacks) tell them apart, or show that the "
                     "choice among them matters little."
                     if close else "Every other cell scores worse by more than two of it.")]
    chosen_record = {"chosen": chosen_settings(chosen), "score": scores[chosen]}
    if noise is not None:
        chosen_record.update(standard_error=noise[0], within_noise=[chosen_settings(cell) for cell in noise[1]])
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "chosen.json").write_text(json.dumps(chosen_record, indent=2) + "\n")
    return chosen, noise[1] if noise is not None else []


def _edges(grid: List[Cell], chosen: Cell) -> List[Tuple[str, Optional[Cell]]]:
    """The axes along which the chosen value is the grid's largest or smallest (where it has several),
    each with the chosen cell's neighbour inward along it (None where the grid lacks that cell)."""
    names = ("the dense lr", "the table lr", "the epochs")
    edges = []
    for axis, name in enumerate(names):
        values = sorted({cell[axis] for cell in grid if cell[axis] is not None})
        one_epoch = axis == 2 and chosen[axis] == 1  # the least there is: nothing to extend below it
        if len(values) > 1 and chosen[axis] in (values[0], values[-1]) and not one_epoch:
            inward = values[1] if chosen[axis] == values[0] else values[-2]
            neighbour = tuple(inward if i == axis else value for i, value in enumerate(chosen))
            edges.append((name, neighbour if neighbour in grid else None))
    return edges


def _why_unscored(task: str, scores: dict) -> str:
    """Why ``task`` has no validation NE or MSE in ``scores`` (a cell's summary ``eval``)."""
    if task in scores:
        return f"for want of two classes: {task!r} (every row of the validation split that holds its label holds the same)"
    return f"for want of labels: {task!r} (no row of the validation split holds its label with a weight above 0)"


def _metric(cfg: Config, task: str, scores: dict) -> Optional[float]:
    return quality(scores, next(t for t in cfg.tasks if t.name == task))


def _run_dir(out: Path, cell: Cell, seed: int) -> Path:
    """Where a cell's seed trains: ``OUT/runs/<cell>-seed<N>`` (:func:`cell_of` reads the name back)."""
    return out / "runs" / f"{_name(cell)}-seed{seed}"


def _name(cell: Cell) -> str:
    dense, table, epochs = cell
    return f"dense{dense}-table{table}" + (f"-epochs{epochs}" if epochs is not None else "")


def _order(cell: Cell) -> tuple:
    return tuple(-1 if v is None else v for v in cell)
