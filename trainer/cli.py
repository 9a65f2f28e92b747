"""``concord``: train, synth, convert, bench, compare, tune, predict, plot.

``concord train`` started by a user runs torchrun's agent with the config's ranks; started by that agent,
torchrun or torchx (``TORCHELASTIC_RUN_ID`` is set) it is one worker of the job.

Exit codes: 0 done; 1 an unexpected error (traceback in the worker's log); 2 a config or usage error;
3 a data, model or training error named on one line; 130 / 143 stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import concord
from concord.trainer import failures
from concord.trainer.config import ConfigError, load_config, packaged_configs, rows_for_vocabulary
from concord.trainer.data.layout import DataError, check_data_exists, check_data_to_score, published_checkpoints, run_config

DEFAULT_CONFIG = "demo"


def _numbers(kind):
    """argparse type: comma-separated positive numbers of ``kind`` (a grid of learning rates, of epochs)."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return values
    return parse


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of rounds, steps, seeds or jobs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concord", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"concord {concord.__version__}")
    p.add_argument("--show-warnings", action="store_true",
                   help="show the third-party warnings Concord filters as known harmless")
    sub = p.add_subparsers(dest="command", required=True)
    shipped = ", ".join(packaged_configs())

    def with_config(sp: argparse.ArgumentParser, default: str = f"default {DEFAULT_CONFIG}") -> None:
        sp.add_argument("--config", help=f"YAML file, or the name of a shipped example ({shipped}; {default})")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")

    sp = sub.add_parser("train", help="train (runs torchrun's agent with dist.nproc_per_node ranks)")
    with_config(sp)
    sp.add_argument("--single-task", metavar="TASK", help="train that task alone: the single-task baseline")
    sp = sub.add_parser("synth", help="write the config's synthetic dataset to Parquet")
    with_config(sp)
    sp.add_argument("--force", action="store_true", help="overwrite an existing dataset")
    sp.add_argument("--if-missing", action="store_true", help="do nothing (exit 0) where the data already exists")
    sp = sub.add_parser("convert", help="raw CSV/Parquet -> Concord's Parquet layout (data.convert in the config)")
    with_config(sp)
    sp.add_argument("--force", action="store_true", help="overwrite existing train/eval data")
    sp.add_argument("--encode-like", metavar="DIR", help="encode data.convert.input as the data convert wrote in DIR "
                    "(its vocabularies and dense statistics; every row to --out): data to score with a model trained on it")
    sp.add_argument("--out", metavar="DIR", help="with --encode-like: the folder for the encoded data")
    sp = sub.add_parser("bench", help="training QPS per balancer, alternating on one model")
    with_config(sp)
    sp.add_argument("--methods", default="none,equal,multibalance,emtl,cograd",
                    help="comma-separated balancers, each run as the config runs it (METHOD@current, "
                         "METHOD@previous[/K] for another statistics mode); 'none' is the model without the boundary")
    sp.add_argument("--rounds", type=_at_least_one, default=3, help="rounds; every method runs once a round, in an order that rotates")
    sp.add_argument("--steps", type=_at_least_one, default=30, help="timed steps per method per round")
    sp = sub.add_parser("compare", help="train every method for N seeds; Markdown report with tables and plots")
    with_config(sp)
    sp.add_argument("--methods", default="equal,multibalance,emtl,cograd",
                    help="comma-separated methods; METHOD@previous[/K] for lagged statistics (every K steps)")
    sp.add_argument("--seeds", type=_at_least_one, default=3,
                    help="seeds 0..N-1, each a run per method (same initialisation and data for all) (default 3)")
    sp.add_argument("--out", required=True, help="output directory (runs/, report.md, PNGs); reused to resume")
    sp.add_argument("--single-task", action="store_true",
                    help="also train each task alone per seed and report the negative transfer")
    sp.add_argument("--jobs", type=_at_least_one, default=1, help="cells trained at a time, the cores shared among them")
    sp = sub.add_parser("tune", help="choose the base learning rates (and epochs) for the config's method on a validation split")
    with_config(sp)
    sp.add_argument("--validation", metavar="PATH", help="the validation split scored (default: data.validation)")
    sp.add_argument("--dense-lr", type=_numbers(float), help="comma-separated dense learning rates (default: the config's /3, x1, x3)")
    sp.add_argument("--table-lr", type=_numbers(float), help="comma-separated table learning rates (default: the config's /3, x1, x3)")
    sp.add_argument("--epochs", type=_numbers(int), help="comma-separated epochs to try as well (default: the config's only)")
    sp.add_argument("--seeds", type=_at_least_one, default=2,
                    help="seeds 0..N-1 a cell, scored by their mean (default 2)")
    sp.add_argument("--out", required=True, help="output directory (runs/, report.md, chosen.json); reused to resume")
    sp.add_argument("--jobs", type=_at_least_one, default=1, help="cells trained at a time, the cores shared among them")
    sp = sub.add_parser("predict", help="per-row predictions of a trained run on a data set, with its metrics")
    with_config(sp, "default: the run's own, RUN_DIR/config.yaml")
    sp.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="the run whose newest intact checkpoint scores")
    sp.add_argument("--data", help="Parquet data to score (default: the config's data.eval)")
    sp.add_argument("--out", required=True, help="the predictions' Parquet file")
    sp = sub.add_parser("plot", help="draw balancer figures (PNG) from a run directory")
    sp.add_argument("run_dir", help="a training run's directory (train.run_dir, holding metrics.jsonl)")
    return p


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides anywhere among the options (argparse alone takes
    them in one run: ``a=1 --methods m b=2`` would refuse ``b=2``), in the order given."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if hasattr(args, "overrides") and args.config is None:
        # Scoring reads the run's model, data and rules as it trained them, where the run recorded them.
        trained = run_config(args.checkpoint) if args.command == "predict" else None
        args.config = str(trained) if trained is not None and trained.is_file() else DEFAULT_CONFIG
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    # FBGEMM and TorchRec log every kernel choice at INFO on the root logger: keep theirs at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    logging.getLogger("concord").setLevel(logging.INFO)
    if not args.show_warnings:
        failures.filter_known_warnings()
    try:
        if args.command == "plot":
            from concord.trainer.observe.plots import plot_run

            try:
                paths = plot_run(args.run_dir)
            except FileNotFoundError as e:
                print(f"concord: plot: {e}", file=sys.stderr)
                return 2
            for path in paths:
                print(path)
            return 0
        if args.command in ("compare", "tune"):
            from concord.trainer.tools.cells import CellsStopped

            try:
                return _compare_or_tune(args)
            except CellsStopped as stopped:
                print(f"concord: {args.command}: {stopped}", file=sys.stderr)
                return 128 + stopped.signum
        cfg = load_config(args.config, args.overrides, getattr(args, "single_task", None))
        if args.command == "synth":
            return _synth(cfg, args.force, args.if_missing)
        if args.command == "convert":
            return _convert(cfg, args.force, args.encode_like, args.out)
        if args.command in ("train", "bench"):
            from concord.trainer.config_checks import check_machine

            check_machine(cfg)
            check_data_exists(cfg)
        if args.command == "train":
            from concord.trainer.fingerprint import ResumeError, check_resumable
            from concord.trainer.lifecycle import die_with_parent
            from concord.trainer.tools.cells import STOP_WITH_CALLER_ENV

            if os.environ.pop(STOP_WITH_CALLER_ENV, None):  # a cell of compare or tune: it ends with its caller
                die_with_parent()

            try:  # before the ranks start and build the model only to refuse the checkpoint (they check again)
                if not _is_worker():
                    check_resumable(cfg)
            except ResumeError as error:
                print(f"concord: ResumeError: {error}", file=sys.stderr)
                return 3
            if _is_worker() or cfg.world_size == 1:
                return _train_worker(cfg)
            single = ["--single-task", args.single_task] if args.single_task else []
            return _launch(cfg, ["train", "--config", str(cfg.source), *single, *args.overrides])
        if args.command == "predict":
            if not published_checkpoints(Path(args.checkpoint) / "checkpoints"):  # before the ranks build the model only to find none
                why = "run_dir/checkpoints holds none" if Path(args.checkpoint).is_dir() else "no such run directory"
                print(f"concord: predict: {args.checkpoint}: no checkpoint to score with ({why})",
                      file=sys.stderr)
                return 3
            check_data_to_score(args.checkpoint, "--data" if args.data else "data.eval", args.data or cfg.data.eval)
            if Path(args.out).is_dir():  # the predictions are one file, written once every row is scored
                print(f"concord: predict: --out {args.out}: is a folder; name the predictions' file, e.g. "
                      f"{Path(args.out) / 'predictions.parquet'}", file=sys.stderr)
                return 2
            if _is_worker() or cfg.world_size == 1:
                return _predict_worker(cfg, args.checkpoint, args.data, args.out)
            data = ["--data", args.data] if args.data else []
            return _launch(cfg, ["predict", "--config", str(cfg.source), "--checkpoint", args.checkpoint, *data,
                                 "--out", args.out, *args.overrides])
        if args.command == "bench":
            from concord.trainer.tools.compare import check_methods

            try:  # before any rank starts: one line naming the method
                check_methods([m for m in args.methods.split(",") if m != "none"], cfg)
            except ValueError as error:
                print(f"concord: bench: {error}", file=sys.stderr)
                return 2
            if _is_worker() or cfg.world_size == 1:
                from concord.trainer.tools.bench import run_bench

                run_bench(cfg, args.methods.split(","), args.rounds, args.steps)
                return 0
            return _launch(cfg, ["bench", "--config", str(cfg.source), "--methods", args.methods,
                                 "--rounds", str(args.rounds), "--steps", str(args.steps), *args.overrides])
    except ConfigError as e:
        print(f"concord: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"concord: DataError: {e}", file=sys.stderr)
        return 3
    return 1


def _is_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def _label_means(report: dict, tasks, weight: Optional[str] = None) -> str:
    """Each task's mean label in the training split; for a task whose label may be missing, over the
    rows that have one, and the share of rows that do; weighted by the ``weight`` column where there
    is one, with the unweighted means after."""
    def one(task, means: dict, share: bool) -> str:
        mean, count = means["train"][task.name], report["labelled_rows"]["train"][task.name]
        text = f"{task.name} {mean:.4g}" if mean is not None else f"{task.name} -"
        rows = report["rows"]["train"]
        return text + (f" (labelled on {count / rows:.1%} of rows)" if share and task.missing_label == "masked" else "")

    line = ", ".join(one(t, report["label_means"], True) for t in tasks)
    if "unweighted_label_means" in report:
        line = (f"weighted by column {weight!r}: {line}; unweighted: "
                + ", ".join(one(t, report["unweighted_label_means"], False) for t in tasks))
    return line


def _weights_line(report: dict, column: str) -> str:
    """Each split's rows against the equally weighted rows they count as (Kish's effective number), and
    the training rows that weigh 0: how noisy weighted metrics are, and what trains nothing."""
    weights = report["weights"]
    splits = ", ".join(f"{split} {report['rows'][split]:,} as {w['effective_rows']:,.0f}" for split, w in weights.items())
    zero = weights.get("train", {}).get("zero_weight_rows", 0)
    return (f"rows weighted by column {column!r} count as fewer equally weighted ones (Kish's effective number, "
            f"(sum w)^2 / sum w^2: a split's metrics are as noisy as that many rows make them): {splits}"
            + (f"; {zero:,} training rows weigh 0 and train nothing" if zero else ""))


def _convert(cfg, force: bool, like: Optional[str] = None, out: Optional[str] = None) -> int:
    """``concord convert``: the config's input into its splits, or with ``like`` and ``out`` (data to
    score) every row into ``out``, encoded as the data in ``like`` was."""
    from concord.trainer.data.convert import ConvertError, convert

    if bool(like) != bool(out):
        print("concord: convert: --encode-like DIR and --out DIR go together", file=sys.stderr)
        return 2
    try:
        report = convert(cfg, force, like=like, out=out)
    except ConvertError as e:
        print(f"concord: ConvertError: {e}", file=sys.stderr)
        return 3
    count = sum(report["skipped_rows"].values())
    skipped = f"{count:,} row{'' if count == 1 else 's'} skipped"
    if count:  # why, the commonest reasons first (convert.json has them all)
        reasons = sorted(report["skipped_rows"].items(), key=lambda item: -item[1])
        skipped += " (" + ", ".join(f"{reason} {n:,}" for reason, n in reasons[:3]) + (", ..." if len(reasons) > 3 else "") + ")"
    rows = report["rows"]
    if like:
        labels = ", ".join(report["label_means"]["data"]) or "none"
        print(f"concord convert: {rows['data']:,} rows -> {out}, encoded like {like} (encoding {report['encoding']}); "
              f"{skipped}; labels: {labels}; report in "
              f"{os.path.join(os.path.dirname(os.path.normpath(out)), 'convert.json')}")
        _print_filled(report, cfg)
        for note in report["notes"]:
            print(f"concord convert: note: {note}")
        return 0
    written = ", ".join(f"{rows[split]:,} {split if split != 'train' else 'training'} rows -> {path}" for split, path in
                        (("train", cfg.data.train), ("eval", cfg.data.eval), ("validation", cfg.data.validation)) if split in rows)
    how = "every row to training (split by none)" if report["split"]["by"] == "none" else f"split by {report['split']['by']}"
    if report["split"]["by"] == "time":  # where it fell: a column of few values holds out the share nearest eval_fraction, not it
        split = report["split"]
        stamp = f" ({split['cutoff_used_utc']})" if split.get("cutoff_used_utc") else ""
        how += (f" at {split['column']} >= {split['cutoff_used']:.12g}{stamp}, "
                f"{rows.get('eval', 0) / max(1, sum(rows.values())):.1%} of the rows held out")
    if report.get("split_values"):  # which values went where: a value spelled otherwise trains
        held = set(map(str, cfg.data.convert.split.eval))
        sides = [(side, [f"{value} ({count:,})" for value, count in report["split_values"].items() if (value in held) == out])
                 for side, out in (("held out", True), ("training", False))]
        how += f" {report['split']['column']} (" + "; ".join(f"{side}: {', '.join(v)}" for side, v in sides if v) + ")"
    print(f"concord convert: {written}; {skipped}; {how}; report in {os.path.join(os.path.dirname(cfg.data.train), 'convert.json')}")
    _print_filled(report, cfg)
    print(f"concord convert: training split's positive rate (binary) or mean (regression): {_label_means(report, cfg.tasks, cfg.data.convert.weight)}")
    if "weights" in report:
        print(f"concord convert: {_weights_line(report, cfg.data.convert.weight)}")
    auto = [t for t in cfg.model.tables if t.sized_by_data]
    if auto:
        print("concord convert: num_embeddings auto: " + ", ".join(
            f"{t.name} {rows_for_vocabulary(t, report['vocab_sizes']):,} rows" for t in auto))
    for note in report["notes"]:
        print(f"concord convert: note: {note}")
    return 0


def _print_filled(report: Dict[str, Any], cfg) -> None:
    """Dense columns with values missing, filled with their rule's ``fill``, categorical ones read as empty
    bags, and the held-out rows whose values training never saw: shares the user should know."""
    total = sum(report["rows"].values())
    filled = [f"{name} {count:,} ({count / total:.1%})" for name, count in report["filled_dense"].items() if count]
    if filled:
        print("concord convert: missing dense values given their fill (data.convert.dense[].fill): " + ", ".join(filled))
    empty = [f"{name} {count:,} ({count / total:.1%})" for name, count in report["empty_categorical"].items() if count]
    if empty:
        print("concord convert: missing categorical values, read as an empty bag (no embedding row): " + ", ".join(empty))
    rare = {c.feature for c in cfg.data.convert.categorical if c.min_count > 1}  # its values seen too rarely are unseen too
    for split, counts in report["unseen_values"].items():
        unseen = [f"{name} {count:,} ({count / report['rows'][split]:.1%})" for name, count in counts.items() if count]
        if unseen and split != "train":  # the training split's are only its values rarer than min_count
            rows = "rows" if split == "data" else f"{split} rows"  # data: rows encoded like a training split
            lacks = "lacks or holds fewer than min_count times" if rare & {n for n, c in counts.items() if c} else "lacks"
            print(f"concord convert: {rows} with a value the training split {lacks} (the unseen row, id 0): " + ", ".join(unseen))


def _synth(cfg, force: bool, if_missing: bool = False) -> int:
    from concord.trainer.data.layout import dataset_ready
    from concord.trainer.data.synth import generate

    if cfg.data.synthetic is None:
        print(f"concord: {cfg.source}: data.synthetic is not set; nothing to generate", file=sys.stderr)
        return 2
    keep = if_missing and not force  # only the splits not on disk yet are written
    for path in (cfg.data.train, cfg.data.eval, cfg.data.validation):
        if path and dataset_ready(path) and not keep:
            if not force:
                print(f"concord: {path} already holds Parquet files; use --force to overwrite", file=sys.stderr)
                return 2
            shutil.rmtree(path)
    generate(cfg.data.synthetic, cfg.data.train, cfg.data.eval, validation_dir=cfg.data.validation, skip_ready=keep)
    return 0


def _run_worker(cfg, work) -> int:
    """One rank's life: ``work(rt)`` between joining the job and leaving it; the errors Concord names
    end as one line and exit code 3, a signal's stop as 128 + the signal."""
    from concord.embeddings.sharding import EmbeddingOptimizerError, ShardingPlanError
    from concord.trainer.checkpoint import CheckpointError
    from concord.trainer.lifecycle import Stopped, die_with_parent
    from concord.trainer.nonfinite import NonFiniteLoss
    from concord.trainer.rundir import RunDirError
    from concord.trainer.runtime import init_runtime, shutdown
    from concord.trainer.fingerprint import ResumeError

    if _is_worker():
        die_with_parent()  # a worker never runs on after torchrun's agent is gone
    rt = init_runtime(cfg.dist.device, cfg.dist.backend, keep_memory=cfg.dist.keep_freed_memory, threads=cfg.dist.threads)
    try:
        work(rt)
    except Stopped as stopped:
        if rt.is_main:
            print(f"concord: {stopped}", file=sys.stderr, flush=True)
        return stopped.exit_code
    except (CheckpointError, DataError, EmbeddingOptimizerError, NonFiniteLoss, ResumeError, RunDirError,
            ShardingPlanError) as e:
        failures.report(e, rt.rank, rt.world_size)
        return 3
    finally:
        shutdown()
    return 0


def _train_worker(cfg) -> int:
    from concord.trainer.train import Trainer

    return _run_worker(cfg, lambda rt: Trainer.build(cfg, rt).fit())


def _predict_worker(cfg, run_dir: str, data: Optional[str], out: str) -> int:
    from concord.trainer.observe.metrics import format_table, one_value_note
    from concord.trainer.predict import predict

    def work(rt) -> None:
        results = predict(cfg, rt, run_dir, data, out)
        if rt.is_main:
            unlabelled = [t.name for t in cfg.tasks if t.name not in results]
            if len(unlabelled) < len(cfg.tasks):
                print(format_table(results, [t for t in cfg.tasks if t.name in results]))
            for task in cfg.tasks:
                if note := one_value_note(task, results.get(task.name, {}), rows="scored"):
                    print(note)
            if unlabelled:
                print(f"no metrics for {', '.join(unlabelled)}: the scored data holds no such labels")
            print(f"predictions: {out}")

    return _run_worker(cfg, work)


def _compare_or_tune(args: argparse.Namespace) -> int:
    """``concord compare`` or ``concord tune``: their errors as one line, exit code 3."""
    if args.command == "compare":
        from concord.trainer.tools.compare import CompareError, run_compare

        try:
            run_compare(args.config, args.overrides, args.methods.split(","), args.seeds, args.out, args.single_task, args.jobs)
        except (CompareError, DataError) as e:
            print(f"concord: compare: {e}", file=sys.stderr)
            return 3
        return 0
    from concord.trainer.tools.tune import TuneError, run_tune

    try:
        run_tune(args.config, args.overrides, args.out, args.validation, args.dense_lr, args.table_lr, args.epochs,
                 args.seeds, args.jobs)
    except TuneError as e:
        print(f"concord: tune: {e}", file=sys.stderr)
        return 3
    return 0


def _launch(cfg, worker_args: List[str]) -> int:
    """Runs this command again as ``nproc_per_node`` local workers under torchrun's agent (single node),
    in this process: a torchrun of its own would start another interpreter and import torch again
    before the workers start, on every run and every cell of compare and tune.

    SIGINT and SIGTERM reach the agent, which stops the workers (they checkpoint first) before this
    process returns; a worker never outlives it. A failed job ends with the first failing rank's
    one-line cause; torchrun's own report (the worker's traceback, a table of every rank) is printed
    where no worker named the cause in one line (an unexpected error, a worker killed or crashed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if cfg.dist.nnodes != 1:
        print(
            f"concord: dist.nnodes={cfg.dist.nnodes}: launch multi-node jobs with torchx "
            "(see README, 'Launch'), or run torchrun on each node",
            file=sys.stderr,
        )
        return 2
    agent_args = parse_args([
        "--standalone", f"--nproc-per-node={cfg.dist.nproc_per_node}", f"--max-restarts={cfg.dist.max_restarts}",
        "-m", "concord.trainer.cli", *worker_args,
    ])
    threads = str(max(1, (os.cpu_count() or 1) // cfg.dist.nproc_per_node))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    with tempfile.TemporaryDirectory(prefix="concord-errors-") as error_dir, _WorkerExitNotes(), \
            _workers_environment({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
                                  failures.ERROR_DIR_ENV: error_dir}):
        try:
            run(agent_args)
        except SignalException as stopped:
            return 128 + int(stopped.sigval)
        except ChildFailedError as failed:
            first = failures.first_error(error_dir)
            if first is None or first[0] == 1:
                print(failed, file=sys.stderr)
            if first:  # the root cause, last, and its exit code
                print(f"concord: failed: {first[1]}", file=sys.stderr)
                return first[0]
            return 1
        finally:
            for s, handler in handlers.items():  # the agent's handlers raise SignalException: ours again
                signal.signal(s, handler)
    return 0


class _WorkerExitNotes(logging.Filter):
    """Leaves out the agent's notes of a worker that ended naming its cause (a bad config or data:
    exit 2 or 3) or stopped by a signal, and of the peers it then stops: the worker's line and the
    launcher's last one say it. A crash (exit 1, or killed) keeps the agent's note. Not where the
    user set LOGLEVEL, torch's switch for these notes."""

    LOGGER = "torch.distributed.elastic.multiprocessing.api"

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Sending process"):
            return False
        return not (str(record.msg).startswith("failed (exitcode") and record.args and record.args[0] > 1)

    def __enter__(self) -> "_WorkerExitNotes":
        if "LOGLEVEL" not in os.environ:
            logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)


@contextlib.contextmanager
def _workers_environment(values: Dict[str, str]):
    """``values`` in this process's environment, which the agent hands to the workers, until the
    job ends."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_JOBS = ("train", "bench", "predict")  # the commands whose files are all closed when main returns


def entry() -> None:
    """The ``concord`` command and ``python -m concord``: exits with :func:`main`'s code."""
    _end(main())


def _end(code: int) -> None:
    """Exits with ``code``: a job's process at once (:func:`_exit_at_once`), any other as Python does."""
    if sys.argv[1:2] and sys.argv[1] in _JOBS:
        _exit_at_once(code)
    sys.exit(code)


def _exit_at_once(code: int) -> None:
    """The end of a job's process (a launcher, a worker): the exit handlers run and the streams are
    flushed, then the process ends without the interpreter's teardown, which frees torch's and
    TorchRec's objects one by one (about a second on a worker, half of one on a launcher, on every
    run). Every file the job wrote is closed by then."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # a worker started by torchrun's agent, or a launcher started so
    _end(failures.recorded(main)())
