"""``concord compare``: the papers' comparison on your own config, N seeds, one command.

Every (seed, method) cell trains the same config with that balancer and ``train.seed`` (the same
initialisation and data order for every method of a seed), evaluates on the held-out split and leaves
``summary.json`` in its run directory. A cell whose summary exists is reused, so an interrupted
comparison resumes where it stopped, if it trained what the comparison would (the same resolved
config and training data; else one line names the difference before any cell trains). The report
(Markdown + PNG) then has:

- Table 2 (MultiBalance paper): method, what is balanced, QPS drop vs ``equal`` of the same seed, and
  the quality gain per task, mean ± std over seeds;
- Table 3: quality gain per task and averaged, AUC and calibration per task;
- the verdicts: for each method and task, the paired difference to ``equal`` over seeds with its 95%
  confidence interval, and "better", "worse" or "no detectable difference";
- each balancer's weight/gradient figure (seed 0), copied to ``figures/`` beside the report.

Gain is ``(NE_equal - NE_method) / NE_equal * 100`` for binary tasks, and the same with MSE for
regression tasks. Cells run ``--jobs`` at a time (each on its own ranks, the cores shared out), so the
QPS drops carry the machine's load and drift between runs; ``concord bench`` measures QPS side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from concord.balancing import RepresentationBoundary, available_balancers, build_balancer
from concord.balancing.param_level import PARAMETER_LEVEL
from concord.trainer.config import Config, ConfigError, config_with, load_config, packaged_configs, resolve_config_path, to_dict
from concord.trainer.data.layout import check_data_exists, count_rows, data_encoding, published_checkpoints, saved_fingerprint
from concord.trainer.fingerprint import describe_changes
from concord.trainer.tools.cells import Cells
from concord.trainer.tools.methods import parse_method, resolve_method

WHAT_IS_BALANCED = {
    "boundary": "shared representation z (dense bottom and embedding tables)",
    "parameter": "dense bottom parameters (numerical MLP, interaction, shared MLP); tables unbalanced",
}


class CompareError(RuntimeError):
    """Compare cannot run as asked (a method, ``--seeds``, ``--jobs``), checked before any cell trains,
    or some cells did not train; the message names the first and its log."""


def cell_name(method: str, seed: int) -> str:
    return f"{_file_name(method)}-seed{seed}"


def _file_name(method: str) -> str:
    """``METHOD@previous/K`` as one path component."""
    return method.replace("/", "-every")


def single_cell_name(task: str, seed: int) -> str:
    return f"single-{task}-seed{seed}"


def run_compare(
    config_path: str,
    overrides: Sequence[str],
    methods: List[str],
    seeds: int,
    out_dir: str,
    single_task: bool = False,
    jobs: int = 1,
) -> Path:
    cfg = load_config(config_path, overrides)  # validates the base config and the method names below
    if seeds < 1 or jobs < 1:
        raise CompareError(f"--seeds and --jobs must be >= 1, got {seeds} and {jobs}")
    try:
        check_methods(methods, cfg)
    except ValueError as error:  # before any cell trains: one line naming the method
        raise CompareError(str(error)) from None
    if not cfg.data.eval:
        raise CompareError(f"{cfg.source}: data.eval is not set: compare scores every cell on held-out data; point data.eval at it")
    check_data_exists(cfg)  # one line now, rather than the same failure in every cell
    methods = ["equal"] + [m for m in methods if m != "equal"]
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    config_path = snapshot_config(config_path, out)
    cells = [(seed, m) for seed in range(seeds) for m in methods]
    singles = [(seed, t) for seed in range(seeds) for t in cfg.task_names] if single_task else []
    todo = [(s, m, out / "runs" / cell_name(m, s), None) for s, m in cells]
    todo += [(s, "equal", out / "runs" / single_cell_name(t, s), t) for s, t in singles]
    threads = max(1, (os.cpu_count() or 1) // (jobs * cfg.world_size))
    for seed, method, run_dir, task in todo:  # before any cell trains: one line naming the first that cannot join
        if (run_dir / "summary.json").is_file():
            check_reusable(config_path, overrides, cfg, method, seed, run_dir, task)

    runner = Cells()

    def run(i: int, seed: int, method: str, run_dir: Path, task: str | None) -> None:
        what = f"{method}, seed {seed}" if task is None else f"{task} alone, seed {seed}"
        if (run_dir / "summary.json").is_file():
            print(f"[{i}/{len(todo)}] {what}: done earlier, reused", flush=True)
            return
        print(f"[{i}/{len(todo)}] {what}: training ...", flush=True)
        train_cell(config_path, overrides, cfg, method, seed, run_dir, task, threads, runner)
        print(f"[{i}/{len(todo)}] {what}: done", flush=True)

    failed = runner.run(run, todo, jobs)
    if failed:  # every other cell ran; a rerun trains only the failed ones
        raise CompareError(f"{len(failed)} of {len(todo)} cells failed; first: {failed[0]}")
    summaries = {(s, m): json.loads((out / "runs" / cell_name(m, s) / "summary.json").read_text()) for s, m in cells}
    single = {(s, t): json.loads((out / "runs" / single_cell_name(t, s) / "summary.json").read_text()) for s, t in singles}
    unscored = {t.name: _why_unscored(t, summaries, cfg) for t in cfg.tasks
                if any(_quality(summary, t) is None for summary in summaries.values())}
    if len(unscored) == len(cfg.tasks):  # e.g. missing_label: masked, and no held-out row has any task's label
        raise CompareError(f"no task has a held-out NE or MSE: {_reasons(unscored)}; hold out rows that have labels of "
                           "both classes (data.convert.split)")
    if unscored:  # the report compares the others, and says so
        print(f"concord compare: {_unscored_line(unscored)}", flush=True)
    scored = dataclasses.replace(cfg, tasks=[t for t in cfg.tasks if t.name not in unscored])
    report = write_report(out, scored, methods, seeds, summaries, single, overrides, jobs, unscored)
    print(f"report: {report}")
    return report


def _capitalized(line: str) -> str:
    return line[:1].upper() + line[1:]


def _why_unscored(task, summaries: Dict, cfg: Config) -> str:
    """Why ``task`` has no held-out NE or MSE in some cell: no labelled row (the cell has no figure of
    it at all), or (binary) one class (it has the others)."""
    if any(task.name not in summary["eval"] for summary in summaries.values()):
        return f"no row of {cfg.data.eval} holds its label with a weight above 0 (a masked task the held-out split lacks)"
    return f"every row of {cfg.data.eval} that holds its label holds the same class (its NE needs both)"


def _reasons(unscored: Dict[str, str]) -> str:
    """``unscored``'s reasons (:func:`_why_unscored`), each once, with its tasks where they differ."""
    names_of: Dict[str, List[str]] = {}
    for name, why in unscored.items():
        names_of.setdefault(why, []).append(name)
    return "; ".join(why if len(names_of) == 1 else f"{', '.join(map(repr, names))}: {why}" for why, names in names_of.items())


def _unscored_line(unscored: Dict[str, str]) -> str:
    return f"task(s) {', '.join(map(repr, unscored))} trained but left out of the comparison: {_reasons(unscored)}; data.convert.split"


def snapshot_config(config_path: str, out: Path) -> str:
    """The config as it reads now, copied to ``out/config.yaml``: every cell of this run trains that,
    whatever becomes of the file meanwhile (an edit halfway through would mix two setups in one
    report; a rerun reads the file again and refuses the cells it no longer describes)."""
    snapshot = out / "config.yaml"
    snapshot.write_text(resolve_config_path(config_path).read_text())
    return str(snapshot)


def check_methods(methods: Sequence[str], cfg: Config) -> None:
    """Every ``METHOD`` or ``METHOD@previous[/K]`` names a method, and its statistics mode suits it."""
    unknown = [m for m in methods if parse_method(m)[0] not in available_balancers() and parse_method(m)[0] not in PARAMETER_LEVEL]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; available: "
                         f"{', '.join(available_balancers() + list(PARAMETER_LEVEL))}")
    for spec in methods:
        balancer = cell_balancer(cfg, spec)
        if balancer["name"] in PARAMETER_LEVEL:
            if "@" in spec:
                raise ValueError(f"{spec}: a parameter-level method has no boundary statistics to lag")
            continue
        knobs = {k: v for k, v in balancer.items() if k not in ("name", "reduction", "statistics", "statistics_every")}
        try:
            RepresentationBoundary(build_balancer(balancer["name"], cfg.task_names, **knobs), statistics=balancer["statistics"],
                                   statistics_every=balancer["statistics_every"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{spec}: {error}") from None


def cell_balancer(cfg: Config, spec: str) -> dict:
    """The ``balancer`` section of a cell: the method of ``spec``, with the base config's knobs where it
    is the base config's own method (``--config`` and ``balancer.*`` overrides), the base config's
    statistics mode unless ``spec`` names one (``METHOD@previous[/K]``)."""
    base = cfg.balancer
    name, mode, every = resolve_method(spec, base.statistics, base.statistics_every)
    balancer = {"name": name, "reduction": base.reduction, "statistics": mode, "statistics_every": every}
    if name == base.name:
        balancer.update(base.knobs)
    return balancer


def _cell_input(config_path: str, overrides: Sequence[str], cfg: Config, method: str, seed: int, run_dir: Path) -> Tuple[dict, List[str]]:
    """What a cell trains: the base config with the balancer section of :func:`cell_balancer`, and the
    overrides ``concord train`` gets for it."""
    raw = yaml.safe_load(resolve_config_path(config_path).read_text())
    raw["balancer"] = cell_balancer(cfg, method)
    # The balancer.* overrides are in the cell's balancer section already (cfg has them); passed on
    # they would make every cell train the base config's method.
    cell_overrides = [o for o in overrides if not o.startswith("balancer.")]
    return raw, [*cell_overrides, f"train.seed={seed}", f"train.run_dir={run_dir}", "train.progress=false"]


def train_cell(
    config_path: str,
    overrides: Sequence[str],
    cfg: Config,
    method: str,
    seed: int,
    run_dir: Path,
    task: str | None = None,
    threads: int = 1,
    cells: Optional[Cells] = None,
) -> None:
    """Writes the cell's config (:func:`_cell_input`) and trains it with ``concord train``
    (``--single-task`` for ``task``), each rank on ``threads`` intra-op threads, as one of ``cells``
    (stopped with them)."""
    raw, cell_overrides = _cell_input(config_path, overrides, cfg, method, seed, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cell_config = run_dir / "input.yaml"
    cell_config.write_text(yaml.safe_dump(raw, sort_keys=False))
    single = ["--single-task", task] if task else []
    cmd = [sys.executable, "-m", "concord.trainer.cli", "train", "--config", str(cell_config), *single, *cell_overrides]
    log = run_dir / "train.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rc = (cells or Cells()).train(cmd, log, env)
    if rc != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"{task or method}, seed {seed}: training failed (exit {rc}){_cause_in(log)}; see {log}")


def _cause_in(log: Path) -> str:
    """The cause a failed ``concord train`` named in its last line (``concord: ...``), as ``: cause``;
    empty where it named none (a crash: its log holds the traceback)."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    if not lines or not lines[-1].startswith("concord: "):
        return ""
    return ": " + lines[-1].removeprefix("concord: ").removeprefix("failed: ")


def check_reusable(config_path: str, overrides: Sequence[str], cfg: Config, method: str, seed: int, run_dir: Path,
                   task: str | None) -> None:
    """A cell trained earlier (its ``summary.json``) is reused only if it trained what this comparison
    would: the same resolved config (``config.yaml`` in its run directory) and the same training data
    (rows and encoding, from its checkpoint's record). A base config, an override or data changed since
    would otherwise mix two experiments in one report, unsaid."""
    raw, cell_overrides = _cell_input(config_path, overrides, cfg, method, seed, run_dir)
    now = to_dict(config_with(raw, cell_overrides, task, str(resolve_config_path(config_path))))
    try:
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        trained = None
    if not isinstance(trained, dict):
        raise CompareError(f"{run_dir}: has a summary.json but no readable config.yaml, so what it trained is unknown; "
                           f"remove {run_dir} to train it again")
    trained = _with_todays_defaults(trained, run_dir)
    changed = sorted(k for k in set(now) | set(trained) if now.get(k) != trained.get(k))
    then_data, now_data = _training_data(run_dir, now["data"]["train"])
    if then_data != now_data:
        trained, now = {**trained, "training data": then_data}, {**now, "training data": now_data}
        changed.append("training data")
    if changed:
        raise CompareError(f"{run_dir}: trained with another setup than this command's ({describe_changes(changed, trained, now)}), "
                           f"so its results cannot join this report; use another --out, or remove {run_dir.parent} to train every cell again")


def _with_todays_defaults(trained: dict, run_dir: Path) -> dict:
    """A cell's recorded config read by this version of Concord: a key added since (a new setting,
    whose default keeps what the cell's version did) takes its default, so an upgrade alone does not
    make every earlier cell "another setup". A record this version cannot read is compared as it is."""
    try:
        return to_dict(config_with(dict(trained), source=str(run_dir / "config.yaml")))
    except ConfigError:
        return trained


def _training_data(run_dir: Path, train: str | None) -> Tuple[dict, dict]:
    """The training data a cell's newest checkpoint records and the data at ``train`` now, as far as
    both are known: rows, and convert's encoding digest where both sides have one."""
    checkpoints = published_checkpoints(run_dir / "checkpoints")
    recorded = (saved_fingerprint(checkpoints[-1]) or {}) if checkpoints else {}
    if not recorded or not train:
        return {}, {}
    then = {"rows": recorded.get("data", {}).get("rows"), "encoding": recorded.get("encoding")}
    now = {"rows": count_rows(train), "encoding": data_encoding(train)}
    if then["encoding"] is None or now["encoding"] is None:
        del then["encoding"], now["encoding"]
    return then, now


def quality(results: Dict[str, Dict[str, float]], task) -> Optional[float]:
    """``task``'s held-out NE (binary) or MSE (regression) in a run's ``results`` (its summary's
    ``eval``), the figure compare and tune score it by; None where the split gave none (no row held its
    label, or, for a binary task, every row held the same)."""
    return results.get(task.name, {}).get("ne" if task.type == "binary" else "mse")


def _quality(summary: dict, task) -> Optional[float]:
    return quality(summary["eval"], task)


def gains(cfg: Config, methods: List[str], seeds: int, summaries: Dict) -> Dict[str, Dict[str, List[float]]]:
    """{method: {task: [gain % per seed]}} against ``equal`` of the same seed."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for m in methods:
        for t in cfg.tasks:
            per_seed = []
            for s in range(seeds):
                base, got = _quality(summaries[(s, "equal")], t), _quality(summaries[(s, m)], t)
                per_seed.append(100.0 * (base - got) / base)
            out.setdefault(m, {})[t.name] = per_seed
    return out


def _mean_and_spread(values: List[float]) -> Tuple[float, float]:
    """Mean and population standard deviation over seeds (0 for one seed)."""
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _mean_std(values: List[float]) -> str:
    mean, sd = _mean_and_spread(values)
    return f"{mean:+.2f} ± {sd:.2f}"


def config_label(source: str) -> str:
    """How the report names its config: a shipped example by its ``--config`` name, another file by
    its path from the working directory where it lies below it (a report is read on other machines)."""
    path = Path(source).resolve()
    for name, shipped in packaged_configs().items():
        if shipped.resolve() == path:
            return f"--config {name}"
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_report(
    out: Path, cfg: Config, methods: List[str], seeds: int, summaries: Dict, single: Dict | None = None, overrides: Sequence[str] = (),
    jobs: int = 1, unscored: Optional[Dict[str, str]] = None,
) -> Path:
    """``cfg.tasks``: the tasks compared; ``unscored``: those left out for want of held-out figures, with why."""
    g = gains(cfg, methods, seeds, summaries)
    qps = {m: [summaries[(s, m)]["qps_lifetime"] for s in range(seeds)] for m in methods}
    drops = {m: [100.0 * (qps["equal"][s] - qps[m][s]) / qps["equal"][s] for s in range(seeds)] for m in methods}
    label = {t.name: ("NE" if t.type == "binary" else "MSE") for t in cfg.tasks}
    lines = [
        f"# Balancer comparison: `{' '.join([config_label(cfg.source), *overrides])}`",
        "",
        f"{seeds} seed(s); every method of a seed starts from the same initialisation and reads the same data. "
        "Gain: `(equal - method) / equal * 100` of the held-out NE (binary tasks) or MSE (regression); "
        "positive is better"
        + (f" (every metric weighs each row by its `{cfg.data.weight_column}`)" if cfg.data.weight_column else "")
        + ". Mean ± std over seeds. QPS: lifetime training QPS of each run, "
        + ("which ran one after another" if jobs == 1 else f"{jobs} at a time sharing the machine's cores, so each carries the others' load")
        + " (see `concord bench` for side-by-side QPS)."
        + (f" {_capitalized(_unscored_line(unscored))}." if unscored else ""),
        "",
        "## Table 2: what is balanced, cost, gain",
        "",
        "| method | balanced | QPS | QPS drop (%) | " + " | ".join(f"{label[t.name]} gain {t.name} (%)" for t in cfg.tasks) + " |",
        "|---|---|---|---|" + "---|" * len(cfg.tasks),
    ]
    for m in methods:
        kind = "parameter" if parse_method(m)[0] in PARAMETER_LEVEL else "boundary"
        lines.append(
            f"| {m} | {WHAT_IS_BALANCED[kind]} | {statistics.mean(qps[m]):,.0f} | {_mean_std(drops[m])} | "
            + " | ".join(_mean_std(g[m][t.name]) for t in cfg.tasks) + " |"
        )
    binary = [t for t in cfg.tasks if t.type == "binary"]
    lines += [
        "",
        "## Table 3: gain per task and averaged; AUC",
        "",
        "| method | " + " | ".join(f"{label[t.name]} gain {t.name}" for t in cfg.tasks) + " | average gain | "
        + " | ".join(f"AUC {t.name}" for t in binary) + " | " + " | ".join(f"calibration {t.name}" for t in binary) + " |",
        "|---|" + "---|" * (len(cfg.tasks) + 1 + 2 * len(binary)),
    ]
    for m in methods:
        avg = [statistics.mean(g[m][t.name][s] for t in cfg.tasks) for s in range(seeds)]
        aucs = [statistics.mean(summaries[(s, m)]["eval"][t.name]["auc"] for s in range(seeds)) for t in binary]
        calib = [_mean_metric(summaries, m, seeds, t.name, "calibration") for t in binary]
        lines.append(
            f"| {m} | " + " | ".join(_mean_std(g[m][t.name]) for t in cfg.tasks) + f" | {_mean_std(avg)} | "
            + " | ".join(f"{a:.4f}" for a in aucs) + " | " + " | ".join(calib) + " |"
        )
    lines += ["", "## Verdicts: paired differences to `equal`", "", *verdict_table(cfg, methods, g), ""]
    lines += ["## Worst task", "", *worst_task_verdicts(cfg, methods, seeds, summaries, g), ""]
    if mode_pairs(methods):
        lines += ["## Statistics modes: the same method, paired", "", *mode_table(cfg, seeds, summaries, mode_pairs(methods)), ""]
    if single:
        lines += ["## Transfer: multi-task against single-task models", "", *transfer_table(cfg, methods, seeds, summaries, single), ""]
    lines += ["## Figures", "", f"![gains]({plot_gains(out, cfg, methods, g).relative_to(out)})", ""]
    import shutil

    from concord.trainer.observe.plots import plot_run

    figures = out / "figures"  # beside the report: the runs/ directories are not meant to be committed
    figures.mkdir(exist_ok=True)
    for m in methods:
        try:
            (path,) = plot_run(out / "runs" / cell_name(m, 0))
        except ValueError as error:  # e.g. a run shorter than its first statistics: the tables stand
            lines.append(f"(no figure for {m}, seed 0: {error})")
            continue
        copy = figures / f"balancer-{_file_name(m)}.png"
        shutil.copyfile(path, copy)
        lines.append(f"![{m}]({copy.relative_to(out)})")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def transfer_table(cfg: Config, methods: List[str], seeds: int, summaries: Dict, single: Dict) -> List[str]:
    """Per task, ``(Q_single - Q_method) / Q_single * 100`` of the same seed: negative where sharing the
    model hurts the task (negative transfer), positive where it helps."""
    label = {t.name: ("NE" if t.type == "binary" else "MSE") for t in cfg.tasks}
    lines = [
        "Each task also trained alone (`concord train --single-task`, same seed, data and model). Transfer: "
        "`(single - multi) / single * 100` of the held-out NE or MSE; negative means negative transfer.",
        "",
        "| model | " + " | ".join(f"{label[t.name]} {t.name}" for t in cfg.tasks) + " | "
        + " | ".join(f"transfer {t.name} (%)" for t in cfg.tasks) + " |",
        "|---|" + "---|" * (2 * len(cfg.tasks)),
    ]
    alone = [statistics.mean(_quality(single[(s, t.name)], t) for s in range(seeds)) for t in cfg.tasks]
    lines.append("| single-task | " + " | ".join(f"{q:.4f}" for q in alone) + " |" + " – |" * len(cfg.tasks))
    for m in methods:
        quality = [statistics.mean(_quality(summaries[(s, m)], t) for s in range(seeds)) for t in cfg.tasks]
        transfer = [
            [100.0 * (_quality(single[(s, t.name)], t) - _quality(summaries[(s, m)], t)) / _quality(single[(s, t.name)], t) for s in range(seeds)]
            for t in cfg.tasks
        ]
        lines.append(f"| {m} | " + " | ".join(f"{q:.4f}" for q in quality) + " | " + " | ".join(_mean_std(v) for v in transfer) + " |")
    return lines


def _mean_metric(summaries: Dict, method: str, seeds: int, task: str, metric: str) -> str:
    values = [summaries[(s, method)]["eval"][task].get(metric) for s in range(seeds)]
    return f"{statistics.mean(values):.4f}" if None not in values else "–"


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no SciPy in the stack).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def paired_interval(differences: Sequence[float]) -> Tuple[float, float, float]:
    """Mean of per-seed paired differences and its 95% confidence interval (Student's t, n - 1 degrees
    of freedom); with one seed the interval is unbounded."""
    n = len(differences)
    mean = statistics.mean(differences)
    if n < 2:
        return mean, -math.inf, math.inf
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.960) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(differences: Sequence[float]) -> str:
    """"better" / "worse" when the interval excludes 0, else "no detectable difference"."""
    _, lo, hi = paired_interval(differences)
    return "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"


def _interval(differences: Sequence[float]) -> str:
    mean, lo, hi = paired_interval(differences)
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]" if math.isfinite(lo) else f"{mean:+.2f} [one seed]"


def verdict_table(cfg: Config, methods: List[str], g) -> List[str]:
    """Per method and task: the mean paired gain (%) with its 95% interval, and the verdict."""
    lines = [
        "Each seed pairs a method with `equal` on the same initialisation and data. Gain (%) with its 95% "
        "confidence interval over seeds (Student's t); \"better\" or \"worse\" only where the interval "
        "excludes zero.",
        "",
        "| method | " + " | ".join(t.name for t in cfg.tasks) + " |",
        "|---|" + "---|" * len(cfg.tasks),
    ]
    compared = [m for m in methods if m != "equal"]
    for m in compared:
        cells = [f"{_interval(g[m][t.name])}: {verdict(g[m][t.name])}" for t in cfg.tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + ["", chance_note(len(compared) * len(cfg.tasks))]


def chance_note(comparisons: int) -> str:
    """What a table of ``comparisons`` verdicts at the 95% level shows by chance alone: each reads
    "better" or "worse" with probability 5% where nothing differs, so a lone verdict near zero in a
    large table is expected now and then, and worth repeating over more seeds before acting on it."""
    expected, any_at_all = 0.05 * comparisons, 1.0 - 0.95**comparisons
    plural = "s" if comparisons != 1 else ""
    return (f"{comparisons} comparison{plural}: where no method differs from `equal`, each still reads \"better\" or "
            f"\"worse\" with probability 5%, so about {expected:.1f} such verdicts arise by chance in this table "
            f"(at least one with probability {any_at_all:.0%}). Repeat a surprising one over more seeds: "
            "`concord compare` with a larger `--seeds` and the same `--out` trains only the seeds not run yet.")


def mode_pairs(methods: Sequence[str]) -> List[Tuple[str, str]]:
    """``(METHOD@mode, METHOD)`` for every spec with a statistics mode whose plain method also ran."""
    return [(m, parse_method(m)[0]) for m in methods if "@" in m and parse_method(m)[0] in methods]


def mode_table(cfg: Config, seeds: int, summaries: Dict, pairs: List[Tuple[str, str]]) -> List[str]:
    """Per pair and task: the gain (%) of ``METHOD@mode`` over ``METHOD`` (the base config's mode),
    paired by seed, with its interval: what the statistics mode alone changes."""
    lines = [
        "Each seed pairs a method in another statistics mode with the same method in the base config's "
        "mode (`auto` unless set: docs/ALGORITHMS.md, item 8). Gain (%) of the first over the second.",
        "",
        "| method | against | " + " | ".join(t.name for t in cfg.tasks) + " |",
        "|---|---|" + "---|" * len(cfg.tasks),
    ]
    for spec, plain in pairs:
        cells = []
        for t in cfg.tasks:
            diffs = [100.0 * (_quality(summaries[(s, plain)], t) - _quality(summaries[(s, spec)], t)) / _quality(summaries[(s, plain)], t)
                     for s in range(seeds)]
            cells.append(f"{_interval(diffs)}: {verdict(diffs)}")
        lines.append(f"| {spec} | {plain} | " + " | ".join(cells) + " |")
    return lines


def worst_task_verdicts(cfg: Config, methods, seeds, summaries, g) -> List[str]:
    """Does each method improve the worst binary task (highest NE under ``equal``), with a paired
    confidence interval above zero, while no other task is worse (interval below zero)?"""
    binary = [t for t in cfg.tasks if t.type == "binary"]
    if not binary:
        return ["(no binary task)"]
    worst = max(binary, key=lambda t: statistics.mean(summaries[(s, "equal")]["eval"][t.name]["ne"] for s in range(seeds)))
    lines = [f"Worst task under `equal`: **{worst.name}** (highest held-out NE). A method passes if its paired NE "
             "gain on it has a 95% interval above zero and no other task's interval lies below zero.", "",
             "| method | gain on worst [95% CI] | other tasks worse | passes |", "|---|---|---|---|"]
    for m in methods:
        if m == "equal":
            continue
        worse = [t.name for t in cfg.tasks if t.name != worst.name and verdict(g[m][t.name]) == "worse"]
        ok = verdict(g[m][worst.name]) == "better" and not worse
        lines.append(f"| {m} | {_interval(g[m][worst.name])}% | {', '.join(worse) or 'none'} | {'yes' if ok else 'no'} |")
    return lines


def plot_gains(out: Path, cfg: Config, methods: List[str], g) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [m for m in methods if m != "equal"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(others) * len(cfg.tasks) / 2), 4))
    width = 0.8 / len(cfg.tasks)
    for k, t in enumerate(cfg.tasks):
        means = [statistics.mean(g[m][t.name]) for m in others]
        stds = [statistics.pstdev(g[m][t.name]) if len(g[m][t.name]) > 1 else 0.0 for m in others]
        ax.bar([i + k * width for i in range(len(others))], means, width, yerr=stds, label=t.name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(cfg.tasks) - 1) / 2 for i in range(len(others))], others, rotation=30)
    ax.set_ylabel("gain vs equal (%)")
    ax.legend()
    fig.tight_layout()
    path = out / "gains.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
