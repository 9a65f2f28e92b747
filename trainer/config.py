"""Typed configuration: YAML files in ``configs/`` mapped onto dataclasses and validated on load.

Every error names the file and the dotted key (``configs/demo.yaml: model.tables[1].features: ...``).
``key=value`` overrides from the command line are applied to the YAML tree before validation, with
values parsed as YAML scalars (``train.max_steps=100``, ``tasks.0.loss_weight=2``, or as the errors
name it, ``tasks[0].loss_weight=2``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


MISSING_LABEL = ("bad_row", "masked")


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


# train.dense_optimizer.name -> its torch.optim class (trainer/optimizers.py resolves them; named
# here so that checking a config imports no torch)
DENSE_OPTIMIZER_CLASSES = {"adam": "Adam", "adagrad": "Adagrad", "sgd": "SGD"}


# --- the schema ----------------------------------------------------------------------------------
@dataclass
class SyntheticSparse:
    name: str
    vocab: int
    mean_len: float = 1.0  # multi-hot: ids per row ~ 1 + Poisson(mean_len - 1)
    zipf: float = 1.2  # Zipf exponent of the id popularity (> 1)


@dataclass
class SyntheticTask:
    name: str
    type: str = "binary"  # binary | regression
    positive_rate: float = 0.2  # binary: target share of positives
    shared: float = 0.7  # cosine between this task's hidden direction and the shared one (<0: conflict)
    scale: float = 10.0  # regression: label = scale * (score + noise), so MSE ~ scale^2


@dataclass
class SyntheticConfig:
    rows: int = 200_000
    eval_rows: int = 20_000
    validation_rows: int = 0  # > 0: a validation split at data.validation (choosing hyper-parameters)
    row_group_size: int = 16_384
    seed: int = 7
    num_dense: int = 8
    latent_dim: int = 8
    sparse: List[SyntheticSparse] = field(default_factory=list)
    tasks: List[SyntheticTask] = field(default_factory=list)


@dataclass
class CategoricalColumn:
    column: str  # input column
    feature: str  # the feature (a key of data.sparse_columns) it becomes
    separator: Optional[str] = None  # multi-hot: several values in one cell, e.g. "|"
    hash: bool = False  # hash into the feature's table size instead of a vocabulary
    # vocabulary (one per table, shared by the table's features): a value seen fewer times in this
    # feature's training split enters it only through another feature of the table; else it maps to 0
    min_count: int = 1


@dataclass
class DenseColumn:
    column: str  # input column
    name: Optional[str] = None  # the output column (one of data.dense_columns); default: column
    log: bool = False  # sign(x) * log(1 + |x|), before standardizing
    standardize: bool = False  # (x - mean) / std with the training split's statistics
    fill: float = 0.0  # a missing value becomes this, after the transforms (0 = the mean if standardized)
    # a second output column (one of data.dense_columns): 1 where the value is missing, else 0, so the
    # model can tell a filled value (no delinquency on file) from a real one at the fill
    missing_indicator: Optional[str] = None


@dataclass
class NumberRange:
    """A binary label from a number: 1 where ``at_least <= x <= at_most`` (either bound may be left
    out), else 0."""

    at_least: Optional[float] = None
    at_most: Optional[float] = None


@dataclass
class SplitConfig:
    # seed: a seeded coin per row | time: rows at or after the cutoff go to eval | files: the split the
    # user already has, as files (train / eval) | column: a column names each row's split
    by: str = "seed"
    eval_fraction: float = 0.1  # seed: P(eval); time without cutoff: the held-out share the cutoff comes nearest
    validation_fraction: float = 0.0  # > 0: this share of the training rows (a seeded coin) goes to data.validation
    seed: int = 0
    column: Optional[str] = None  # time: a numeric or ISO-8601 timestamp column; column: the split column
    cutoff: Any = None  # time: a number or an ISO-8601 timestamp (quote it in YAML)
    train: List[str] = field(default_factory=list)  # files: the training files (paths or globs)
    eval: List[str] = field(default_factory=list)  # files: the held-out files; column: the values meaning eval


@dataclass
class ConvertConfig:
    """``concord convert``: raw CSV/Parquet -> Parquet at data.train / data.eval (see trainer/data/convert.py)."""

    input: Optional[str] = None  # a CSV or Parquet file, a directory of them, or a glob (split.by files: unused)
    categorical: List[CategoricalColumn] = field(default_factory=list)
    dense: List[DenseColumn] = field(default_factory=list)
    labels: Dict[str, str] = field(default_factory=dict)  # task label column -> input column (default: same name)
    # task label column -> the input values that mean 1 (every other value is 0), for text labels
    # such as income: [">50K"]; without an entry a label must already be 0/1 (binary) or a number
    positive: Dict[str, List[str]] = field(default_factory=dict)
    # task label column -> the range of a number that means 1, for labels thresholded from a measure
    # such as late: {at_least: 15} on an arrival delay in minutes
    positive_range: Dict[str, NumberRange] = field(default_factory=dict)
    # task label column -> the input values that mean "no label" (a survey's "don't know", 98 for
    # refused, a severity coded unknown): the row keeps its other tasks' labels, as a missing value
    # does under missing_label: masked; text values match trimmed text, numbers match numbers
    unknown: Dict[str, List[Any]] = field(default_factory=dict)
    weight: Optional[str] = None  # input column for data.weight_column
    split: SplitConfig = field(default_factory=SplitConfig)
    format: str = "auto"  # auto (by extension) | csv | parquet
    delimiter: str = "auto"  # auto: a tab for .tsv files (compressed too), a comma for others; or one character
    # CSV files without a header row (UCI's adult.data, census-income): their columns' names, in order;
    # empty: each file's first line names its columns
    column_names: List[str] = field(default_factory=list)
    skip_rows: int = 0  # lines at the top of each CSV file before its header (or first row): a title, a note
    # lines at the top of a CSV file (after skip_rows) that start with this are passed over, as many as
    # each file has (UCI's adult.test starts with "|1x3 Cross validator", adult.data with its first row)
    comment: str = ""
    # text that means a missing value in any cell (UCI's "?"), beside an empty cell and Arrow's NA, N/A,
    # NaN, null...; compared trimmed; not a number (a label's codes for no label: unknown)
    missing_values: List[str] = field(default_factory=list)
    # numbers written with their thousands grouped ("1,234,567.5", as spreadsheets export them): the
    # character that groups them, taken out of such a cell wherever a number is read; '.' stays the
    # decimal mark, and a cell not grouped in threes ("12,34") is still not a number
    thousands_separator: str = ""
    on_bad_row: str = "error"  # error (names file, row, column, value) | skip (counted in convert.json)
    # A row whose every task's label is missing (each task masked): keep (it trains nothing but takes
    # a batch's place; counted and noted) | skip (left out, counted)
    unlabelled_rows: str = "keep"
    row_group_size: int = 16_384
    chunk_rows: int = 65_536  # rows decoded at a time: memory stays bounded whatever the input size


@dataclass
class DataConfig:
    train: str
    eval: Optional[str] = None
    validation: Optional[str] = None  # written by synth (validation_rows) / convert (split.validation_fraction)
    dense_columns: List[str] = field(default_factory=list)
    sparse_columns: Dict[str, str] = field(default_factory=dict)  # feature name -> Parquet column
    weight_column: Optional[str] = None
    # Columns the model does not read, carried beside it: convert copies them from its input into every
    # split unchanged, predict copies them into its output (keys to join the scores back, e.g. [request_id])
    passthrough: List[str] = field(default_factory=list)
    batch_size: int = 512  # per rank
    synthetic: Optional[SyntheticConfig] = None  # generate train/eval here on first use
    convert: Optional[ConvertConfig] = None  # concord convert writes train/eval from raw files
    on_bad_id: str = "error"  # a sparse id < 0 or >= its table's size: error | hash (modulo, counted)
    on_nonfinite_dense: str = "error"  # NaN/inf in a dense feature: error | impute (counted)
    impute_value: float = 0.0
    shuffle: bool = True  # training: row groups reordered and rows mixed every epoch (seeded by train.seed)
    shuffle_rows: int = 65_536  # the shuffle window per rank: rows held in memory to mix them
    prefetch: int = 2  # training batches decoded ahead in a background thread (0: decode in the step)


@dataclass
class TaskConfig:
    name: str
    label: str  # Parquet column
    type: str = "binary"  # binary (BCE with logits) | regression (MSE)
    loss_weight: float = 1.0
    head: List[int] = field(default_factory=lambda: [64])
    # A row without this task's label (null): bad_row, the row is bad (convert's on_bad_row decides;
    # training stops on it) | masked, the row trains the other tasks and counts in no loss or metric of this one
    missing_label: str = "bad_row"


@dataclass
class TableConfig:
    name: str
    # rows; "auto": one per value of the vocabulary concord convert builds for its features, plus one
    # for unseen values, read from the convert.json beside data.train (see size_tables_from_data)
    num_embeddings: Any
    embedding_dim: int
    features: List[str]
    pooling: str = "sum"  # sum | mean
    sharding_types: Optional[List[str]] = None  # None: the planner chooses among CPU-legal types
    # num_embeddings was auto (size_tables_from_data); a class attribute, not a field, so that a run's
    # fingerprint sees the rows, not how they were chosen
    sized_by_data = False


@dataclass
class OptimizerConfig:
    name: str
    lr: float
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    """The learning rate over training: linear warm-up from ~0, then constant, linear or cosine decay
    to ``min_ratio`` of the configured rate at the last step."""

    warmup_steps: int = 0
    decay: str = "constant"  # constant | linear | cosine
    min_ratio: float = 0.0
    embeddings: bool = True  # the fused embedding optimizer's rate follows the same schedule


@dataclass
class InteractionConfig:
    type: str = "dcn"  # dcn (DCN-v2 low-rank cross layers) | concat (concat + MLP)
    num_layers: int = 2
    low_rank: int = 64
    mlp: List[int] = field(default_factory=list)  # concat: MLP after the concatenation


@dataclass
class ExpertsConfig:
    """Mixture-of-experts bottoms; the boundary sits at the per-task gates (see heads/experts.py)."""

    type: str = "none"  # none (shared bottom: z = the shared MLP's output) | mmoe | ple
    num_shared: int = 4  # mmoe: experts; ple: shared experts per level
    num_task: int = 1  # ple: task-specific experts per task and level
    layers: List[int] = field(default_factory=lambda: [64])  # each expert's MLP; towers read layers[-1]
    levels: int = 1  # ple: extraction levels; the last one's gates and task experts follow the boundary


@dataclass
class ModelConfig:
    tables: List[TableConfig]
    dense_mlp: List[int] = field(default_factory=lambda: [128, 64])
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    shared: List[int] = field(default_factory=lambda: [256])  # MLP ending in z; d = shared[-1] (may be [] with experts)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    embedding_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="rowwise_adagrad", lr=0.05)
    )
    # labels: each head's output bias starts at its task's training labels, their mean (regression) or
    # the log-odds of their positive rate (binary), from convert's record or else read from the training
    # files; torch: torch's initialisation;
    # auto: labels where convert recorded them, else torch. A start only, not fingerprinted.
    output_bias: str = "auto"


@dataclass
class BalancerConfig:
    name: str = "equal"
    reduction: str = "mean"
    # auto: previous wherever the method allows it (all but GradDrop), else current; current: the
    # specified rule (backward waits at z for the step's statistics); previous: lagged by one step.
    statistics: str = "auto"
    # previous/auto: gather and sum the statistics every k steps (the rule runs every k steps); auto: the
    # method's own cadence when lagged (10 for MultiBalance and EMTL, else 1), 1 in current mode
    statistics_every: Any = "auto"
    knobs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 1
    max_steps: Optional[int] = None  # stop earlier than `epochs`
    dense_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3))
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    clip_grad_norm: float = 0.0  # > 0: the dense gradients' global norm is clipped to this (tables: fused, unclipped)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; the boundary's statistics stay float64)
    pipeline: str = "sparse_dist"  # sparse_dist (TorchRec's TrainPipelineSparseDist) | plain (one batch at a time)
    eval_every: int = 0  # steps; 0 = only at the end
    # also at the end of every epoch (with data.eval a validation split: choosing the epochs in one run)
    eval_each_epoch: bool = False
    on_nonfinite: str = "abort"  # a non-finite task loss: abort (no checkpoint written) | skip the step on every rank
    log_every: int = 20
    qps_skip_steps: int = 5  # the first steps of each invocation, excluded from QPS (allocations, caches)
    qps_window: int = 50
    progress: bool = True
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    checkpoint_final: bool = True
    keep_checkpoints: int = 3
    resume: bool = True  # continue from the newest intact checkpoint in run_dir/checkpoints
    allow_changes: List[str] = field(default_factory=list)  # fingerprint keys that may differ on resume: balancer, world_size, batch_size
    resume_from: Optional[str] = None  # a run directory (or one checkpoint) to start from when run_dir has none
    max_skipped_steps: int = 10  # on_nonfinite: skip stops with an error once more steps than this were skipped


@dataclass
class DistConfig:
    nproc_per_node: int = 2
    nnodes: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: str = "auto"  # auto | cpu | cuda
    max_restarts: int = 0  # torchrun restarts the whole job this often after a rank fails; it resumes
    keep_freed_memory: bool = True  # CPU: reuse freed tensors' memory (glibc thresholds, see runtime)
    threads: int = 0  # intra-op threads per rank; 0: the cores this machine gives each local rank
    # gloo: lagged statistics ride in DDP's gradient all-reduce instead of a collective of their own
    # (balancing/collectives.py, DDPRide); false: their own collective, summed in float64; auto: ride
    # only where the balancer gathers lagged statistics every step (train.statistics_ride_in_ddp)
    statistics_in_ddp: Any = "auto"
    # CPU ranks all on one host (x86-64): lagged statistics summed through shared memory instead of
    # gloo's collective (balancing/collectives.py, HostExchange) where they do not ride in DDP;
    # auto: wherever it can; true: refuse a job where it cannot; false: the collective
    statistics_on_host: Any = "auto"


@dataclass
class Config:
    data: DataConfig
    tasks: List[TaskConfig]
    model: ModelConfig
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    source: str = "<dict>"  # file it was loaded from; set by the loader

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def representation_dim(self) -> int:
        """What each tower reads: z itself for a shared bottom, a gate's mixture for MMoE/PLE."""
        return self.model.experts.layers[-1] if self.model.experts.type != "none" else self.model.shared[-1]

    @property
    def world_size(self) -> int:
        return self.dist.nproc_per_node * self.dist.nnodes


# --- loading -------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: Sequence[str] = (), single_task: Optional[str] = None) -> Config:
    """Reads a YAML file, applies ``key=value`` overrides, builds and validates the :class:`Config`.

    ``single_task``: keep that task only (with ``equal``), the single-task baseline against which a
    multi-task model's negative transfer is measured; the data and the rest of the model are unchanged.
    """
    path = resolve_config_path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return config_with(raw, overrides, single_task, str(path))


def config_with(raw: Dict[str, Any], overrides: Sequence[str] = (), single_task: Optional[str] = None,
                source: str = "<dict>") -> Config:
    """The :class:`Config` of a parsed YAML mapping ``raw`` (changed in place) with ``overrides`` and
    ``single_task`` applied as :func:`load_config` applies them."""
    for item in overrides:
        apply_override(raw, item, source)
    if single_task is not None:
        keep_one_task(raw, single_task, source)
    return config_from_dict(raw, source=source)


def packaged_configs() -> Dict[str, Path]:
    """The example configs shipped in ``concord.configs``, by name (``demo``, ``tiny``, ...)."""
    import concord.configs

    folder = Path(concord.configs.__file__).parent
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A config file by path; failing that, a shipped example by name (``demo`` or ``configs/demo.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = packaged_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in shipped and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped[name]
    if path.is_dir():  # a run directory, most likely: its config is the file in it
        inside = path / "config.yaml"
        hint = f"; the run's config is {inside}" if inside.is_file() else ""
        raise ConfigError(f"{path}: is a folder, not a config file{hint}")
    raise ConfigError(f"{path}: config file not found (shipped examples: {', '.join(shipped)})")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong, where ("line 3, column 8"), and what it was reading
    there when that says more (PyYAML spreads it over five lines with the text quoted)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" + (f" ({context})" if context else "")


class StrictLoader(yaml.SafeLoader):
    """YAML as a person reads it: a key given twice is an error rather than silently the last one,
    and ``1e6`` is the number 10^6 (YAML 1.1 wants ``1.0e+6``)."""

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def keep_one_task(raw: Dict[str, Any], name: str, source: str) -> None:
    tasks = raw.get("tasks") or []
    kept = [t for t in tasks if isinstance(t, dict) and t.get("name") == name]
    if not kept:
        names = [t.get("name") for t in tasks if isinstance(t, dict)]
        raise ConfigError(f"{source}: --single-task {name}: no such task (tasks: {', '.join(map(str, names))})")
    raw["tasks"] = kept
    raw["balancer"] = {"name": "equal"}  # one task: every balancer is the identity
    convert = (raw.get("data") or {}).get("convert")
    for key in ("labels", "positive", "positive_range", "unknown"):  # the other tasks' label rules go with them
        if isinstance(convert, dict) and isinstance(convert.get(key), dict):
            convert[key] = {k: v for k, v in convert[key].items() if k == kept[0].get("label")}


def config_from_dict(raw: Dict[str, Any], source: str = "<dict>") -> Config:
    raw = dict(raw)
    raw.pop("source", None)
    balancer = raw.get("balancer")
    if isinstance(balancer, dict):  # knobs sit beside name/reduction in the YAML
        knobs = {k: v for k, v in balancer.items() if k not in ("name", "reduction", "statistics", "statistics_every", "knobs")}
        raw["balancer"] = {k: v for k, v in balancer.items() if k in ("name", "reduction", "statistics", "statistics_every")}
        raw["balancer"]["knobs"] = {**balancer.get("knobs", {}), **knobs}
    model, data = raw.get("model"), raw.get("data")
    if isinstance(model, dict) and "dense_mlp" not in model and isinstance(data, dict) and not data.get("dense_columns"):
        raw["model"] = {**model, "dense_mlp": []}  # the default MLP is for dense columns; without any there is none
    cfg = _build(Config, raw, source, "")
    cfg.source = source
    size_tables_from_data(cfg)
    from concord.trainer.config_checks import validate  # the checks read the schema above: imported once it is defined

    validate(cfg)
    return cfg


def size_tables_from_data(cfg: Config) -> None:
    """Tables with ``num_embeddings: auto`` get one row per value of their features' vocabulary plus
    one for unseen values, from what ``concord convert`` recorded beside ``data.train``; before it has
    run they stay ``auto`` (convert then builds the vocabularies without a size cap, and nothing else
    runs: :func:`require_table_sizes`). ``sized_by_data`` marks them. An unreadable record leaves them
    ``auto`` too: it is convert's to write again, and what needs the sizes names it."""
    from concord.trainer.data.layout import DataError, convert_report

    auto = [t for t in cfg.model.tables if t.num_embeddings == "auto"]
    try:
        vocab_sizes = (convert_report(cfg.data.train).get("vocab_sizes") or {}) if auto and cfg.data.train else {}
    except DataError:
        vocab_sizes = {}
    for table in auto:
        table.sized_by_data = True
        if all(f in vocab_sizes for f in table.features):
            table.num_embeddings = rows_for_vocabulary(table, vocab_sizes)


def rows_for_vocabulary(table: TableConfig, vocab_sizes: Dict[str, int]) -> int:
    """A table's rows for its features' vocabulary (one, shared by the table's features: convert.json
    gives its size for each) and the row of unseen values, id 0."""
    return max(int(vocab_sizes[f]) for f in table.features) + 1


OUTPUT_BIASES = ("auto", "labels", "torch")


def training_label_means(cfg: Config) -> Dict[str, Optional[float]]:
    """Each task's mean label over the training split (a binary task's positive rate), as ``concord
    convert`` recorded it beside ``data.train``; empty for data convert did not write."""
    from concord.trainer.data.layout import convert_report

    return (convert_report(cfg.data.train).get("label_means") or {}).get("train") or {}


def output_bias_means(cfg: Config) -> Optional[Dict[str, float]]:
    """Where ``model.output_bias`` starts the heads: each task's mean label over the training split, as
    ``concord convert`` recorded it beside ``data.train``, or None for torch's initialisation (``torch``;
    ``auto`` without that record, as for synthetic data or Parquet written by other tools). ``labels``
    without it reads the means from the training data (collective where several ranks are up)."""
    if cfg.model.output_bias == "torch":
        return None
    means = training_label_means(cfg)
    missing = [t.name for t in cfg.tasks if means.get(t.name) is None]
    if not missing:
        return {t.name: float(means[t.name]) for t in cfg.tasks}
    if cfg.model.output_bias == "auto":
        return None
    return _label_means_of_data(cfg)


def _label_means_of_data(cfg: Config) -> Dict[str, float]:
    from concord.trainer.data.label_means import label_means
    from concord.trainer.data.reader import columns_from_config

    if not cfg.data.train:
        raise ConfigError(f"{cfg.source}: model.output_bias: labels starts each head at its training labels' mean: "
                          "it needs data.train")
    means = label_means(cfg.data.train, columns_from_config(cfg))
    empty = [t.name for t, mean in zip(cfg.tasks, means) if mean is None]
    if empty:
        raise ConfigError(f"{cfg.source}: model.output_bias: labels starts each head at its training labels' mean, and "
                          f"{cfg.data.train} holds no label for task(s) {empty} (or only labels of weight 0): set "
                          "model.output_bias: torch")
    return {t.name: float(mean) for t, mean in zip(cfg.tasks, means)}


def require_table_sizes(cfg: Config) -> None:
    """Every table has its number of rows: a model cannot be built on an ``auto`` size whose data has
    not been converted yet."""
    from concord.trainer.data.layout import convert_report, convert_report_path

    for i, table in enumerate(cfg.model.tables):
        if table.num_embeddings == "auto":
            convert_report(cfg.data.train)  # an unreadable record is named as such
            raise ConfigError(f"{cfg.source}: model.tables[{i}].num_embeddings: auto takes the size of table {table.name!r} from the "
                              f"vocabulary sizes in {convert_report_path(cfg.data.train)}, which gives none for its features: "
                              f"convert the data with this config first (`concord convert --config {cfg.source}`), or "
                              "give a trained run's run_dir/config.yaml, which holds the sizes it trained with")


def apply_override(raw: Dict[str, Any], item: str, source: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key)  # model.tables[1].embedding_dim, as errors and refusals name a setting
    value = yaml.load(text, Loader=StrictLoader) if text != "" else None
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: override {key}: {part!r} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"{source}: override {key}: {part} is not a mapping")


def _build(tp: Any, value: Any, source: str, key: str) -> Any:
    where = key or "(top level)"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, source, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.name != "source"}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: {_join(key, unknown[0])}: unknown key (allowed: {', '.join(fields)})"
            )
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                given = value[name]
                if isinstance(given, dict) and f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                    if dataclasses.is_dataclass(default):  # a partial mapping keeps the other defaults
                        given = {**dataclasses.asdict(default), **given}
                kwargs[name] = _build(hints[name], given, source, _join(key, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {_join(key, name)}: required key is missing")
        return tp(**kwargs)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        return [_build(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, source, _join(key, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e6 rows, as one writes it
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            quote = ("; YAML reads yes, no, on, off, true and false unquoted as true/false: quote the text, e.g. \"yes\""
                     if isinstance(value, bool) else f"; quote it: \"{value}\"" if isinstance(value, (int, float))
                     else _label_rule_hint(key) if isinstance(value, dict) else "")
            raise ConfigError(f"{source}: {where}: expected a string, got {value!r}{quote}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _label_rule_hint(key: str) -> str:
    """Where a mapping was given for a label's input column: the rules that make a label go beside
    ``labels``, keyed by the task's label column as it is."""
    prefix = "data.convert.labels."
    if not key.startswith(prefix):
        return ""
    label = key[len(prefix):]
    return (f"; name the input column here ({label}: COLUMN) and give the rule that makes the label beside labels, "
            f"under the same key: positive: {{{label}: [VALUES]}} or positive_range: {{{label}: {{at_least: N}}}}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain-dict form, for the run directory's ``config.yaml``."""
    out = dataclasses.asdict(cfg)
    out.pop("source")
    knobs = out["balancer"].pop("knobs")
    out["balancer"].update(knobs)
    return out
