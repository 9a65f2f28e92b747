"""The configuration's cross-field checks, run on every load (:func:`validate`), and what this machine
can run (:func:`check_machine`, by the launcher). Every message names the file and the dotted key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from concord.embeddings.options import CPU_EMBEDDING_OPTIMIZERS, CPU_SHARDING_TYPES, EMBEDDING_OPTIMIZERS, SHARDING_TYPES
from concord.heads.options import TASK_TYPES
from concord.trainer.config import DENSE_OPTIMIZER_CLASSES, MISSING_LABEL, OUTPUT_BIASES, Config, ConfigError, DataConfig


class _Failure:
    """A check's failure: one ConfigError naming the config file and the dotted key."""

    def __init__(self, source) -> None:
        self.source = source

    def __call__(self, key: str, msg: str) -> None:
        raise ConfigError(f"{self.source}: {key}: {msg}")

    def at_least(self, key: str, value, bound: int) -> None:
        if value < bound:
            self(key, f"must be >= {bound}, got {value}")


def validate(cfg: Config) -> None:
    """Cross-field checks: every message names the file and the key."""
    fail = _Failure(cfg.source)

    for key in ("statistics_in_ddp", "statistics_on_host"):
        if getattr(cfg.dist, key) not in (True, False, "auto"):
            fail(f"dist.{key}", f"must be true, false or auto, got {getattr(cfg.dist, key)!r}")
    d = cfg.data
    for key, path in (("train", d.train), ("eval", d.eval), ("validation", d.validation)):
        if path is not None and not path.strip():
            # "" would be read as the working directory
            fail(f"data.{key}", "is empty: give a folder, a file or a glob" + ("" if key == "train" else ", or leave it out"))
    fail.at_least("data.batch_size", d.batch_size, 1)
    if d.on_bad_id not in ("error", "hash"):
        fail("data.on_bad_id", f"must be 'error' or 'hash', got {d.on_bad_id!r}")
    if d.on_nonfinite_dense not in ("error", "impute"):
        fail("data.on_nonfinite_dense", f"must be 'error' or 'impute', got {d.on_nonfinite_dense!r}")
    fail.at_least("data.prefetch", d.prefetch, 0)
    fail.at_least("data.shuffle_rows", d.shuffle_rows, 1)
    if not math.isfinite(d.impute_value):
        fail("data.impute_value", f"must be finite, got {d.impute_value}")
    _each_once("data.dense_columns", d.dense_columns, fail)  # a typo, most likely: the model would read one column twice
    _validate_passthrough(cfg, fail)
    _validate_labels_unread(cfg, fail)
    if not cfg.tasks:
        fail("tasks", "at least one task is required")
    names = cfg.task_names
    for i, t in enumerate(cfg.tasks):
        if t.name in names[:i]:  # named at its second use, with the first
            fail(f"tasks[{i}].name", f"task name {t.name!r} is used twice (tasks[{names.index(t.name)}] has it too)")
        if t.type not in TASK_TYPES:
            fail(f"tasks[{i}].type", f"must be one of {', '.join(map(repr, TASK_TYPES))}, got {t.type!r}")
        if not (t.loss_weight >= 0 and math.isfinite(t.loss_weight)):
            fail(f"tasks[{i}].loss_weight", f"must be finite and >= 0, got {t.loss_weight}")
        if any(h < 1 for h in t.head):
            fail(f"tasks[{i}].head", f"layer sizes must be >= 1, got {t.head}")
        if t.missing_label not in MISSING_LABEL:
            fail(f"tasks[{i}].missing_label", f"must be one of {', '.join(map(repr, MISSING_LABEL))}, got {t.missing_label!r}")
        other = next((u for u in cfg.tasks if u.label == t.label and u.missing_label != t.missing_label
                      and u.missing_label in MISSING_LABEL), None)
        if other is not None:
            fail(f"tasks[{i}].missing_label", f"task {other.name!r} reads label column {t.label!r} too, with missing_label "
                 f"{other.missing_label!r}: tasks that read one column treat its missing values alike")
    m = cfg.model
    if not m.tables:
        fail("model.tables", "at least one embedding table is required")
    seen_tables, feature_table = set(), {}
    for i, tb in enumerate(m.tables):
        k = f"model.tables[{i}]"
        if tb.name in seen_tables:
            fail(f"{k}.name", f"table name {tb.name!r} is used twice")
        seen_tables.add(tb.name)
        if tb.sized_by_data:
            if d.convert is None:
                fail(f"{k}.num_embeddings", "auto sizes a table from the vocabularies concord convert builds, and data.convert "
                                            "is not set: give its number of rows")
        elif isinstance(tb.num_embeddings, bool) or not isinstance(tb.num_embeddings, int) or tb.num_embeddings < 1:
            fail(f"{k}.num_embeddings", f"must be a whole number >= 1 or auto, got {tb.num_embeddings!r}")
        if tb.embedding_dim < 1 or tb.embedding_dim % 4:
            fail(f"{k}.embedding_dim", f"must be a positive multiple of 4 (FBGEMM), got {tb.embedding_dim}")
        if not tb.features:
            fail(f"{k}.features", f"table {tb.name!r} has no features")
        if tb.pooling not in ("sum", "mean"):
            fail(f"{k}.pooling", f"must be 'sum' or 'mean', got {tb.pooling!r}")
        for st in tb.sharding_types or []:
            if st not in SHARDING_TYPES:
                fail(f"{k}.sharding_types", f"unknown sharding type {st!r}; one of {SHARDING_TYPES}")
        for f in tb.features:
            if f in feature_table:
                fail(f"{k}.features", f"feature {f!r} is already read by table {feature_table[f]!r}")
            feature_table[f] = tb.name
            if f not in d.sparse_columns:
                fail(f"{k}.features", f"feature {f!r} has no column in data.sparse_columns")
    for f in d.sparse_columns:
        if f not in feature_table:
            fail(f"data.sparse_columns.{f}", f"feature {f!r} is not read by any table in model.tables")
    if not d.dense_columns and m.dense_mlp:
        fail("data.dense_columns", "model.dense_mlp is set but there are no dense columns")
    for key, sizes in (("model.dense_mlp", m.dense_mlp), ("model.shared", m.shared)):
        if any(s < 1 for s in sizes):
            fail(key, f"layer sizes must be >= 1, got {sizes}")
    ex = m.experts
    if ex.type not in ("none", "mmoe", "ple"):
        fail("model.experts.type", f"must be none, mmoe or ple, got {ex.type!r}")
    if not m.shared and ex.type == "none":
        fail("model.shared", "needs at least one layer: its last size is the representation dim d")
    if ex.type != "none":
        if not ex.layers or any(s < 1 for s in ex.layers):
            fail("model.experts.layers", f"needs layer sizes >= 1, got {ex.layers}")
        for key in ("num_shared", "levels"):
            fail.at_least(f"model.experts.{key}", getattr(ex, key), 1)
        if ex.type == "ple" and ex.num_task < 1:
            fail("model.experts.num_task", f"must be >= 1 for ple, got {ex.num_task}")
    if m.output_bias not in OUTPUT_BIASES:
        fail("model.output_bias", f"must be one of {OUTPUT_BIASES}, got {m.output_bias!r}")
    if m.interaction.type not in ("dcn", "concat"):
        fail("model.interaction.type", f"must be 'dcn' or 'concat', got {m.interaction.type!r}")
    if m.interaction.num_layers < 0 or m.interaction.low_rank < 1:
        fail("model.interaction", "num_layers must be >= 0 and low_rank >= 1")
    if m.embedding_optimizer.name not in EMBEDDING_OPTIMIZERS:
        fail("model.embedding_optimizer.name", f"must be one of {EMBEDDING_OPTIMIZERS}, got {m.embedding_optimizer.name!r}")
    for key, opt in (("model.embedding_optimizer", m.embedding_optimizer), ("train.dense_optimizer", cfg.train.dense_optimizer)):
        if not (opt.lr > 0 and math.isfinite(opt.lr)):
            fail(f"{key}.lr", f"must be > 0, got {opt.lr}")
    if cfg.train.dense_optimizer.name not in DENSE_OPTIMIZER_CLASSES:
        fail("train.dense_optimizer.name", f"must be one of {tuple(DENSE_OPTIMIZER_CLASSES)}, got {cfg.train.dense_optimizer.name!r}")
    tr = cfg.train
    fail.at_least("train.epochs", tr.epochs, 1)
    if tr.max_steps is not None:
        fail.at_least("train.max_steps", tr.max_steps, 1)
    for key in ("eval_every", "qps_skip_steps"):
        fail.at_least(f"train.{key}", getattr(tr, key), 0)
    if tr.on_nonfinite not in ("abort", "skip"):
        fail("train.on_nonfinite", f"must be 'abort' or 'skip', got {tr.on_nonfinite!r}")
    from concord.trainer.fingerprint import SAFE_CHANGES

    for change in tr.allow_changes:
        if change not in SAFE_CHANGES:
            fail("train.allow_changes", f"{change!r} cannot change on resume; only {sorted(SAFE_CHANGES)} can")
    sched = tr.lr_schedule
    fail.at_least("train.lr_schedule.warmup_steps", sched.warmup_steps, 0)
    if sched.decay not in ("constant", "linear", "cosine"):
        fail("train.lr_schedule.decay", f"must be constant, linear or cosine, got {sched.decay!r}")
    if not 0.0 <= sched.min_ratio <= 1.0:
        fail("train.lr_schedule.min_ratio", f"must be in [0, 1], got {sched.min_ratio}")
    if not (tr.clip_grad_norm >= 0 and math.isfinite(tr.clip_grad_norm)):
        fail("train.clip_grad_norm", f"must be >= 0 (0: off), got {tr.clip_grad_norm}")
    if tr.precision not in ("fp32", "bf16"):
        fail("train.precision", f"must be fp32 or bf16, got {tr.precision!r}")
    if tr.pipeline not in ("sparse_dist", "plain"):
        fail("train.pipeline", f"must be sparse_dist or plain, got {tr.pipeline!r}")
    fail.at_least("train.max_skipped_steps", tr.max_skipped_steps, 0)
    fail.at_least("train.checkpoint_every", tr.checkpoint_every, 0)
    for key in ("log_every", "qps_window", "keep_checkpoints"):
        fail.at_least(f"train.{key}", getattr(tr, key), 1)
    ds = cfg.dist
    if ds.nproc_per_node < 1 or ds.nnodes < 1:
        fail("dist", "nproc_per_node and nnodes must be >= 1")
    fail.at_least("dist.max_restarts", ds.max_restarts, 0)
    if ds.backend not in ("auto", "gloo", "nccl"):
        fail("dist.backend", f"must be auto, gloo or nccl, got {ds.backend!r}")
    if ds.device not in ("auto", "cpu", "cuda"):
        fail("dist.device", f"must be auto, cpu or cuda, got {ds.device!r}")
    if ds.threads < 0:
        fail("dist.threads", f"must be >= 0 (0: automatic), got {ds.threads}")
    if ds.device == "cpu" or ds.device == "auto":
        for i, tb in enumerate(m.tables):
            for st in tb.sharding_types or []:
                if st not in CPU_SHARDING_TYPES and ds.device == "cpu":
                    fail(f"model.tables[{i}].sharding_types", f"{st!r} needs CUDA; on CPU use one of {CPU_SHARDING_TYPES}")
    _validate_balancer(cfg, fail)
    if d.synthetic is not None:
        _validate_synthetic(cfg, fail)
    if d.convert is not None:
        _validate_convert(cfg, fail)
    if d.synthetic is not None or d.convert is not None:
        _validate_split_folders(d, fail)


def _each_once(key: str, names: Sequence, fail) -> None:
    """Each of a list's names once: a second place is named, with the first."""
    for i, name in enumerate(names):
        first = names.index(name)
        if first != i:
            fail(f"{key}[{i}]", f"{name!r} is listed twice ({key}[{first}] has it too)")


def _validate_labels_unread(cfg: Config, fail) -> None:
    """No task's label column is also a feature: a head that reads its own label learns nothing it can
    use on rows without it, and held-out figures computed so say nothing."""
    d = cfg.data
    task_of = {}
    for t in cfg.tasks:
        task_of.setdefault(t.label, t.name)
    read = [(f"data.dense_columns[{j}]", col) for j, col in enumerate(d.dense_columns)]
    read += [(f"data.sparse_columns.{f}", col) for f, col in d.sparse_columns.items()]
    for key, col in read:
        if col in task_of:
            fail(key, f"{col!r} is the label column of task {task_of[col]!r}: the model would read the label it predicts")


def _validate_passthrough(cfg: Config, fail) -> None:
    """Each carried column once, under a name no column the model reads or predict writes has: convert
    and predict would write two columns of one name."""
    d = cfg.data
    read = {**{c: f"sparse feature {f!r}" for f, c in d.sparse_columns.items()}, **{c: "a dense column" for c in d.dense_columns},
            **{t.label: f"the label column of task {t.name!r}" for t in cfg.tasks}, **({d.weight_column: "the weight column"} if d.weight_column else {})}
    written = {"row", "weight", *(f"{kind}_{t.name}" for t in cfg.tasks for kind in ("pred", "label"))}
    _each_once("data.passthrough", d.passthrough, fail)
    for i, name in enumerate(d.passthrough):
        key = f"data.passthrough[{i}]"
        if not isinstance(name, str) or not name:
            fail(key, f"must be a column name, got {name!r}")
        if name in read:
            fail(key, f"{name!r} is also {read[name]} (a column the model reads); the model's column needs another name")
        if name in written:
            fail(key, f"{name!r} is a column of concord predict's output (row, pred_<task>, label_<task>, weight); "
                      "rename it in the data")


def _validate_split_folders(d: DataConfig, fail) -> None:
    """Where Concord writes the splits (synth, convert), each goes to a folder of its own: one split's
    folder equal to, inside or around another's would be replaced when that one is written."""
    splits = [(key, Path(path).resolve()) for key, path in (("data.train", d.train), ("data.eval", d.eval), ("data.validation", d.validation)) if path]
    for i, (key, path) in enumerate(splits):
        for other, other_path in splits[:i]:
            where = ("is" if path == other_path else "lies inside" if other_path in path.parents
                     else "holds" if path in other_path.parents else None)
            if where:
                fail(key, f"{path} {where} {other}'s folder ({other_path}); each split is written to a folder of its own")


def check_machine(cfg: Config) -> None:
    """What this machine cannot run, before anything starts: a config valid for a GPU cluster may not
    be for this host. Raises :class:`ConfigError` naming the key."""
    import torch

    ds = cfg.dist
    has_gpu = torch.cuda.is_available()

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{cfg.source}: {key}: {message}")

    if ds.statistics_on_host is True:
        from concord.balancing.collectives import host_exchange_possible

        device = torch.device("cuda" if ds.device == "cuda" or (ds.device == "auto" and has_gpu) else "cpu")
        why_not = host_exchange_possible(cfg.world_size, ds.nproc_per_node, device)
        if why_not is not None:
            fail("dist.statistics_on_host", f"true, but {why_not}; set it to auto or false")
    if ds.device == "cuda" and not has_gpu:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (make install-gpu)"
        fail("dist.device", f"cuda, but this machine has no usable GPU (torch {torch.__version__} is {build})")
    on_gpu = ds.device == "cuda" or (ds.device == "auto" and has_gpu)
    if on_gpu and ds.nproc_per_node > torch.cuda.device_count():
        fail("dist.nproc_per_node", f"{ds.nproc_per_node} ranks, but this machine has {torch.cuda.device_count()} GPU(s)")
    if not on_gpu:
        if ds.backend == "nccl":
            fail("dist.backend", "nccl needs CUDA devices; on CPU use gloo (or auto)")
        for i, t in enumerate(cfg.model.tables):
            gpu_only = [st for st in t.sharding_types or () if st not in CPU_SHARDING_TYPES]
            if gpu_only:
                fail(f"model.tables[{i}].sharding_types", f"{gpu_only[0]!r} needs CUDA; on CPU use one of {CPU_SHARDING_TYPES}")
        if cfg.model.embedding_optimizer.name not in CPU_EMBEDDING_OPTIMIZERS:
            fail("model.embedding_optimizer.name",
                 f"{cfg.model.embedding_optimizer.name!r} has no CPU kernel in FBGEMM; on CPU use one of {CPU_EMBEDDING_OPTIMIZERS}")


def _is_finite_number_text(text: str) -> bool:
    """Whether a cell holding ``text`` reads as a number. NaN and infinities do not: a cell of NaN is
    missing already, and one of inf is a bad value that a user may rightly declare missing."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _validate_convert(cfg: Config, fail) -> None:
    """Every column the trainer reads is produced by exactly one conversion rule."""
    cv, d = cfg.data.convert, cfg.data
    if d.synthetic is not None:
        fail("data.convert", "data.synthetic is set too; a data set is either generated or converted")
    if d.eval is None and cv.split.by != "none":
        fail("data.eval", "concord convert writes an eval split; set data.eval (or data.convert.split.by: none, every row to training)")
    if cv.format not in ("auto", "csv", "parquet"):
        fail("data.convert.format", f"must be auto, csv or parquet, got {cv.format!r}")
    if cv.on_bad_row not in ("error", "skip"):
        fail("data.convert.on_bad_row", f"must be 'error' or 'skip', got {cv.on_bad_row!r}")
    if cv.unlabelled_rows not in ("keep", "skip"):
        fail("data.convert.unlabelled_rows", f"must be 'keep' or 'skip', got {cv.unlabelled_rows!r}")
    if len(cv.delimiter) != 1 and cv.delimiter != "auto":
        fail("data.convert.delimiter", f"must be one character or auto, got {cv.delimiter!r}")
    names = cv.column_names  # the loader has checked that each is text
    for i, name in enumerate(names):
        if not name.strip():
            fail(f"data.convert.column_names[{i}]", f"must be a column's name, got {name!r}")
        elif names.index(name) != i:
            fail(f"data.convert.column_names[{i}]", f"{name!r} is also data.convert.column_names[{names.index(name)}]: each column once")
    for i, marker in enumerate(cv.missing_values):
        if not marker.strip():
            fail(f"data.convert.missing_values[{i}]", f"must be text that a cell holds (such as '?'), got {marker!r}")
        elif _is_finite_number_text(marker):
            fail(f"data.convert.missing_values[{i}]", f"{marker!r} is a number, which would mean missing in every numeric "
                 "column; a label's codes for no label go in data.convert.unknown")
    sep = cv.thousands_separator
    if sep and (len(sep) != 1 or sep.isalnum() or sep in ".+-"):
        fail("data.convert.thousands_separator", f"must be the one character that groups a number's thousands "
             f"(such as ',', ' ' or \"'\"; '.' is the decimal mark), got {sep!r}")
    fail.at_least("data.convert.skip_rows", cv.skip_rows, 0)
    if cv.comment != cv.comment.strip() or "\n" in cv.comment:
        fail("data.convert.comment", f"must be the text a note line starts with (such as '#' or '|'), got {cv.comment!r}")
    for key in ("row_group_size", "chunk_rows"):
        fail.at_least(f"data.convert.{key}", getattr(cv, key), 1)
    label_input_of = {}  # input column -> the first task whose label convert makes of it
    for t in cfg.tasks:
        label_input_of.setdefault(cv.labels.get(t.label, t.label), t.name)
    for kind, rules in (("categorical", cv.categorical), ("dense", cv.dense)):
        for i, c in enumerate(rules):
            if c.column in label_input_of:
                fail(f"data.convert.{kind}[{i}].column", f"{c.column!r} is the input column of the label of task "
                     f"{label_input_of[c.column]!r}: the model would read the label it predicts")
    features = [c.feature for c in cv.categorical]
    for i, c in enumerate(cv.categorical):
        if c.feature not in d.sparse_columns:
            fail(f"data.convert.categorical[{i}].feature", f"{c.feature!r} is not a key of data.sparse_columns")
        if features.count(c.feature) > 1:
            fail(f"data.convert.categorical[{i}].feature", f"feature {c.feature!r} is produced twice")
        fail.at_least(f"data.convert.categorical[{i}].min_count", c.min_count, 1)
        if c.separator == "":
            fail(f"data.convert.categorical[{i}].separator", "must not be empty")
    # Features of one table share its rows, so convert gives them one id space: a vocabulary of the
    # table (the same value, the same row), or the one hash. A hashed and a vocabulary feature would
    # collide in rows that mean unrelated values.
    table_of = {f: t.name for t in cfg.model.tables for f in t.features}
    hashed = {}
    for i, c in enumerate(cv.categorical):
        table = table_of.get(c.feature)
        if table is not None and hashed.setdefault(table, (c.hash, c.feature))[0] != c.hash:
            other = hashed[table][1]
            fail(f"data.convert.categorical[{i}].hash", f"feature {c.feature!r} shares table {table!r} with {other!r}, "
                 "which is hashed differently: the features of one table are all hashed or all given its vocabulary")
    sized_by_data = {t.name for t in cfg.model.tables if t.sized_by_data}
    for i, c in enumerate(cv.categorical):
        if c.hash and table_of.get(c.feature) in sized_by_data:
            fail(f"data.convert.categorical[{i}].hash", f"feature {c.feature!r} is hashed into the rows of its table "
                 f"{table_of[c.feature]!r}, whose num_embeddings is auto (sized by a vocabulary): give the table its number of rows")
    for f in d.sparse_columns:
        if f not in features:
            fail("data.convert.categorical", f"no rule produces feature {f!r} (data.sparse_columns)")
    outputs = [(i, "", c.name or c.column) for i, c in enumerate(cv.dense)] + [
        (i, ".missing_indicator", c.missing_indicator) for i, c in enumerate(cv.dense) if c.missing_indicator is not None]
    names = [name for _, _, name in outputs]
    for i, key, name in outputs:
        if name not in d.dense_columns:
            fail(f"data.convert.dense[{i}]{key}", f"output column {name!r} is not in data.dense_columns")
        if names.count(name) > 1:
            fail(f"data.convert.dense[{i}]{key}", f"output column {name!r} is produced twice")
    for i, c in enumerate(cv.dense):
        if not math.isfinite(c.fill):
            fail(f"data.convert.dense[{i}].fill", f"must be finite, got {c.fill}")
    for col in d.dense_columns:
        if col not in names:
            fail("data.convert.dense", f"no rule produces dense column {col!r} (data.dense_columns)")
    types = {t.label: t.type for t in cfg.tasks}  # a task's label column -> its type

    def not_a_label(col: str) -> str:
        """The error for a key ``col`` that is no task's label column. Label rules are keyed by the label
        column, not by the input column ``labels`` reads it from (``labels: {female: sex}``, then
        ``positive: {female: [F]}``): where ``col`` is such an input column, the line names the key."""
        read_as = [label for label, source in cv.labels.items() if source == col and label != col]
        return (f"{col!r} is not the label column of any task (they are {', '.join(map(repr, types))})"
                + (f"; it is the input column that data.convert.labels reads {read_as[0]!r} from: key the rule by "
                   f"{read_as[0]!r}" if read_as else ""))

    for col in cv.labels:
        if col not in types:
            fail(f"data.convert.labels.{col}", not_a_label(col))

    def binary_rule(key: str, col: str, makes: str) -> None:  # a rule that makes a task's binary label
        if col not in types:
            fail(key, not_a_label(col))
        if types[col] != "binary":
            fail(key, f"{makes} a binary label; this task is a regression")

    for col, values in cv.positive.items():
        binary_rule(f"data.convert.positive.{col}", col, "positive values make")
        if not values:
            fail(f"data.convert.positive.{col}", "list at least one value that means 1")
    for col, bounds in cv.positive_range.items():
        key = f"data.convert.positive_range.{col}"
        binary_rule(key, col, "a range that means 1 makes")
        if col in cv.positive:
            fail(key, f"{col!r} also has data.convert.positive (text values): give one of the two")
        if bounds.at_least is None and bounds.at_most is None:
            fail(key, "give at_least, at_most or both")
        if not all(math.isfinite(b) for b in (bounds.at_least, bounds.at_most) if b is not None):
            fail(key, f"the bounds must be finite, got at_least {bounds.at_least}, at_most {bounds.at_most}")
        if bounds.at_least is not None and bounds.at_most is not None and bounds.at_least > bounds.at_most:
            fail(key, f"at_least {bounds.at_least} is above at_most {bounds.at_most}: no number would mean 1")
    masked = {t.label for t in cfg.tasks if t.missing_label == "masked"}
    for col, values in cv.unknown.items():
        key = f"data.convert.unknown.{col}"
        if col not in types:
            fail(key, not_a_label(col))
        if not values:
            fail(key, "list at least one value that means no label")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                fail(key, f"values are text or numbers, got {value!r}" + (
                    "; YAML reads yes, no, true and false unquoted as true/false: quote them" if isinstance(value, bool) else ""))
        if col not in masked:
            names = [t.name for t in cfg.tasks if t.label == col]
            fail(key, f"an unknown value leaves a row without this label, which task {names[0]!r} cannot train around: "
                      "give it missing_label: masked")
        both = sorted({str(v) for v in values} & set(cv.positive.get(col, [])))
        if both:
            fail(key, f"{both[0]!r} is also in data.convert.positive.{col}: a value means 1 or no label, not both")
    if (d.weight_column is None) != (cv.weight is None):
        fail("data.convert.weight", "set it together with data.weight_column (the input and output weight columns)")
    sp = cv.split
    if sp.by not in ("seed", "time", "files", "column", "none"):
        fail("data.convert.split.by", f"must be seed, time, files, column or none, got {sp.by!r}")
    if sp.by in ("seed", "time") and not 0.0 < sp.eval_fraction < 1.0 and not (sp.by == "time" and sp.cutoff is not None):
        fail("data.convert.split.eval_fraction", f"must be in (0, 1), got {sp.eval_fraction}")
    if not 0.0 <= sp.validation_fraction < 1.0:
        fail("data.convert.split.validation_fraction", f"must be in [0, 1), got {sp.validation_fraction}")
    if sp.validation_fraction > 0 and not d.validation:
        fail("data.validation", "not set: data.convert.split.validation_fraction needs a path to write the validation split to")
    if sp.by == "time" and not sp.column:
        fail("data.convert.split.column", "a time split needs the time column")
    if sp.by == "column" and not sp.column:
        fail("data.convert.split.column", "a split by column needs the column that names each row's split")
    if sp.by != "files" and not cv.input:
        fail("data.convert.input", "name the raw data (a file, a directory or a glob)")
    if sp.by == "files" and not (sp.train and sp.eval):
        fail("data.convert.split", "a split by files lists both train: [...] and eval: [...] (paths or globs)")
    if sp.by == "column" and not sp.eval:
        fail("data.convert.split.eval", "list the column's values that mean a held-out row, e.g. [test]")


def _validate_balancer(cfg: Config, fail) -> None:
    from concord.balancing import build_balancer

    from concord.balancing.param_level import PARAMETER_LEVEL, check_parameter_level_knobs

    b = cfg.balancer
    if b.reduction not in ("mean", "sum"):
        fail("balancer.reduction", f"must be 'mean' or 'sum', got {b.reduction!r}")
    if b.statistics not in ("current", "previous", "auto"):
        fail("balancer.statistics", f"must be 'auto', 'current' or 'previous', got {b.statistics!r}")
    every = b.statistics_every
    if every != "auto" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        fail("balancer.statistics_every", f"must be 'auto' or a whole number of steps >= 1, got {every!r}")
    try:
        if b.name in PARAMETER_LEVEL:
            check_parameter_level_knobs(b.name, len(cfg.tasks), **b.knobs)
        else:  # what a boundary would refuse, without building one (that would import Dynamo)
            from concord.balancing.lagged import statistics_for

            statistics_for(build_balancer(b.name, cfg.task_names, **b.knobs), b.statistics, b.statistics_every)
    except (ValueError, TypeError) as e:
        fail("balancer", str(e))


def _validate_synthetic(cfg: Config, fail) -> None:
    s = cfg.data.synthetic
    assert s is not None
    if s.rows < 1 or s.eval_rows < 0 or s.validation_rows < 0 or s.row_group_size < 1:
        fail("data.synthetic", "rows and row_group_size must be >= 1, eval_rows and validation_rows >= 0")
    if s.validation_rows > 0 and not cfg.data.validation:
        fail("data.validation", "not set: data.synthetic.validation_rows needs a path to write the validation split to")
    for i, sp in enumerate(s.sparse):
        fail.at_least(f"data.synthetic.sparse[{i}].vocab", sp.vocab, 1)
        if sp.zipf <= 1.0:
            fail(f"data.synthetic.sparse[{i}].zipf", f"a Zipf exponent must be > 1, got {sp.zipf}")
        fail.at_least(f"data.synthetic.sparse[{i}].mean_len", sp.mean_len, 1)
    for i, t in enumerate(s.tasks):
        if t.type not in TASK_TYPES:
            fail(f"data.synthetic.tasks[{i}].type", f"must be one of {', '.join(map(repr, TASK_TYPES))}, got {t.type!r}")
        if not 0.0 < t.positive_rate < 1.0:
            fail(f"data.synthetic.tasks[{i}].positive_rate", f"must be in (0, 1), got {t.positive_rate}")
        if not -1.0 <= t.shared <= 1.0:
            fail(f"data.synthetic.tasks[{i}].shared", f"is a cosine in [-1, 1], got {t.shared}")
