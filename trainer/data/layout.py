"""What a data path must hold before training starts, and the error bad data ends with; which
checkpoints a run has published. No torch or TorchRec import: ``concord train``'s and ``concord
predict``'s launchers check the paths here before they start the ranks, and importing TorchRec would
add seconds to every launch."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import List, Optional, Tuple

import yaml


class DataError(ValueError):
    """Bad input; the message names the file, row group, column and value."""


# Raw text `concord convert` reads; training and scoring read Parquet.
CSV_SUFFIXES = tuple(kind + packed for kind in (".csv", ".tsv") for packed in ("", ".gz", ".bz2", ".zst", ".lz4"))


def check_not_raw_text(key: str, path: str | Path) -> None:
    """Data to train on or score is Parquet: a CSV or TSV given there is one line before the ranks
    start (they would meet it as a file without Parquet's footer)."""
    if raw_text_hint(path):
        raise DataError(f"{key}: {path} is not Parquet data{raw_text_hint(path)}")


def raw_text_hint(path: str | Path) -> str:
    """For a path that names a CSV or TSV file: what turns it into the Parquet training and scoring
    read (empty otherwise)."""
    if not str(path).endswith(CSV_SUFFIXES):
        return ""
    return ("; it is raw text: `concord convert` writes Parquet from it (data.convert.input), or with `--encode-like "
            "TRAINING_DATA_DIR --out DIR` encoded like a model's training data, for scoring")


# Names that writers of partitioned data keep for their own bookkeeping (Spark's _SUCCESS and
# _temporary/, checksum .crc files): Spark, Hive and Arrow's datasets skip them, and so does Concord.
HIDDEN_PREFIXES = (".", "_")


def folder_files(folder: Path, pattern: str) -> List[Path]:
    """The files directly in ``folder`` matching ``pattern``, without hidden ones (``HIDDEN_PREFIXES``)."""
    return sorted(f for f in folder.glob(pattern) if f.is_file() and not f.name.startswith(HIDDEN_PREFIXES))


def glob_files(spec: str) -> List[str]:
    """The files a glob matches, sorted, without those where a part the glob's wildcards matched is
    hidden (a ``_temporary/`` folder a Spark job left behind); parts written out in ``spec`` count
    as the user's, whatever they are named."""
    written = 0
    parts = Path(spec).parts
    while written < len(parts) and not re.search(r"[*?[]", parts[written]):
        written += 1
    return sorted(m for m in glob.glob(spec, recursive=True) if Path(m).is_file()
                  and not any(part.startswith(HIDDEN_PREFIXES) for part in Path(m).parts[written:]))


def list_files(spec: str) -> List[str]:
    """A directory (its ``*.parquet``), a file, or a glob; sorted so every rank sees the same order."""
    p = Path(spec)
    if p.is_dir():
        files = [str(f) for f in folder_files(p, "*.parquet")]
        if not files:
            raise DataError(f"{spec}: directory holds no *.parquet files{nested_parquet_hint(spec)}")
        return files
    if p.is_file():
        return [str(p)]
    files = glob_files(spec)
    if not files:
        folders = any(Path(m).is_dir() for m in glob.glob(spec, recursive=True))
        raise DataError(f"{spec}: matches folders only; name their files, e.g. '{Path(spec) / '*.parquet'}'" if folders
                        else f"{spec}: no such file or directory")
    return files


def nested_parquet_hint(folder: str | Path, suffixes: Tuple[str, ...] = (".parquet",)) -> str:
    """For a folder whose Parquet files (or others ending in ``suffixes``) lie in subfolders only (a
    partitioned log, ``date=.../``): how to name them (empty otherwise). The files directly in a folder
    are what a folder names, so that a folder of older or unrelated data below it is never read unasked."""
    p = Path(folder)
    # The first found, not the first in order: a mistyped path may be the root of a large tree.
    first = next((f for f in p.rglob("*") if f.name.endswith(suffixes) and f.is_file()
                  and not any(part.startswith(HIDDEN_PREFIXES) for part in f.relative_to(p).parts)), None)
    if first is None:
        return ""
    depth = len(first.relative_to(p).parts) - 1
    suffix = next(s for s in sorted(suffixes, key=len, reverse=True) if first.name.endswith(s))
    pattern = str(p / "/".join(["*"] * depth) / f"*{suffix}")
    return f"; its subfolders hold some ({first.relative_to(p)}): name them with a glob, e.g. '{pattern}'"


def count_rows(spec: str) -> Optional[int]:
    """The rows of the Parquet data at ``spec``, from its files' footers; None where a file cannot be
    read (the ranks name it)."""
    import pyarrow.parquet as pq

    try:
        return sum(pq.read_metadata(path).num_rows for path in list_files(spec))
    except (OSError, ValueError):  # DataError and pyarrow's ArrowInvalid among them
        return None


def _holds_parquet(spec: str) -> bool:
    """Whether ``spec`` names Parquet files as the readers take it: a folder of them, a file, a glob."""
    try:
        list_files(spec)
    except DataError:
        return False
    return True


def dataset_ready(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and bool(folder_files(p, "*.parquet"))


def convert_report_path(path: str | Path) -> Path:
    """Where ``concord convert`` records what it wrote for the data at ``path`` (a split's folder, or
    a file in one)."""
    p = Path(path)
    if not p.exists():  # a glob: where its first file lies
        p = Path(next(iter(sorted(glob.glob(str(path), recursive=True))), path))
    return (p.parent.parent if p.is_file() else p.parent) / "convert.json"


def convert_report(path: str | Path) -> dict:
    """``convert.json`` of the data at ``path``; empty for data convert did not write. One that is
    there but unreadable is an error: read as absent, it would turn off the checks of the data's
    encoding and ids and change the tables' sizes and the heads' start."""
    where = convert_report_path(path)
    try:
        text = where.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DataError(f"{where}: cannot read concord convert's record of the data: {e.strerror or e}") from e
    try:
        report = json.loads(text)
        problem = "" if isinstance(report, dict) else f"a JSON {type(report).__name__}"
    except ValueError as e:
        problem = f"invalid JSON: {e}"
    if problem:
        raise DataError(f"{where}: not the record concord convert writes ({problem}); run `concord convert` again")
    return report


def data_encoding(path: str | Path) -> Optional[str]:
    """The encoding digest ``concord convert`` recorded beside the data at ``path``; None for data
    convert did not write."""
    return convert_report(path).get("encoding")


def check_data_exists(cfg) -> None:
    """Training reads data that exists: nothing is generated because a path is missing (a mistyped
    ``data.train`` must not become a fresh synthetic data set); the error says how to make it. And
    where ``concord convert`` wrote both splits, they were encoded alike: evaluation data with other
    vocabularies would be scored silently wrong (its id 7 is another user)."""
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if not path:
            continue
        check_not_raw_text(key, path)
        folder = Path(path).is_dir()
        # A folder is asked directly: list_files would walk its subfolders for the hint, then this again.
        if dataset_ready(path) if folder else _holds_parquet(path):
            continue
        nested = nested_parquet_hint(path) if folder else ""
        if nested:
            how = nested
        elif cfg.data.convert is not None:
            how = f"; `concord convert --config {cfg.source}` writes it from data.convert.input"
        elif cfg.data.synthetic is not None:
            how = f"; `concord synth --config {cfg.source}` writes the config's synthetic data there"
        else:
            how = ""
        raise DataError(f"{key}: {path} holds no Parquet data{how}")
    trained = convert_report(cfg.data.train) if cfg.data.train else {}
    check_same_encoding("data.eval", cfg.data.eval, "data.train", cfg.data.train, trained.get("encoding"), str(cfg.source))
    if trained:
        check_tables_hold_ids(cfg, trained, str(convert_report_path(cfg.data.train)))


def check_tables_hold_ids(cfg, report: dict, where: str) -> None:
    """Every id ``concord convert`` wrote has a row in its feature's table: a vocabulary of V values
    writes ids 0..V, a hashed feature ids below the size it was hashed into. Convert checked the
    tables it was given; a table made smaller since (an override, an edited config) would otherwise
    meet its first large id steps into training, on one rank. With ``data.on_bad_id: hash`` such ids
    are the reader's to fold into the table."""
    if cfg.data.on_bad_id != "error":
        return
    written = {f: int(v) + 1 for f, v in (report.get("vocab_sizes") or {}).items()}
    written.update({f: int(v) for f, v in (report.get("hashed") or {}).items()})
    for i, table in enumerate(cfg.model.tables):
        for feature in table.features:
            needed = written.get(feature)
            if needed is not None and needed > table.num_embeddings:
                raise DataError(
                    f"model.tables[{i}].num_embeddings: table {table.name!r} has {table.num_embeddings} rows, but "
                    f"{where} gives feature {feature!r} ids up to {needed - 1}; make the table at least {needed} rows, "
                    "or set data.on_bad_id: hash to fold larger ids into it"
                )


CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


def published_checkpoints(root: str | Path) -> List[Path]:
    """The checkpoints published under ``root`` (``step-XXXXXXXX`` folders; a ``.tmp`` one is still
    being written), oldest first, intact or not. Here, without torch, for the launcher's checks too."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)), key=lambda p: p.name)


def saved_fingerprint(checkpoint: Path) -> Optional[dict]:
    """The resume fingerprint a checkpoint's ``concord.json`` records ({} where it records none); None
    where the record cannot be read (the ranks, which verify the checkpoint, report it)."""
    try:
        record = json.loads((checkpoint / "concord.json").read_text())
    except (OSError, ValueError):
        return None
    return (record.get("fingerprint") or {}) if isinstance(record, dict) else None


def check_data_to_score(run_dir: str | Path, key: str, spec: Optional[str]) -> None:
    """The data to score (``spec``, given as ``key``) is Parquet, encoded as the data the newest
    checkpoint of ``run_dir`` trained on, as far as their records say: read from the checkpoint's
    ``concord.json``, before the ranks build the model only to refuse it (they check again, on the
    checkpoint they load). Raw text is told how to become such data, with the run's own config (its
    ``data.convert`` rules; ``concord convert`` without ``--config`` would read the demo's)."""
    steps = published_checkpoints(Path(run_dir) / "checkpoints")
    saved = saved_fingerprint(steps[-1]) if steps else {}
    trained = (saved or {}).get("data", {}).get("train")
    if spec and raw_text_hint(spec) and trained:
        raise DataError(f"{key}: {spec} is not Parquet data; it is raw text: encode it like the data the checkpoint trained "
                        f"on, `concord convert --config {run_config(run_dir)} --encode-like {Path(trained).parent} --out DIR "
                        f"data.convert.input={spec}`")
    check_not_raw_text(key, spec)
    if spec:
        try:
            list_files(spec)
        except DataError as error:
            raise DataError(f"{key}: {error}{_trained_eval_hint(run_dir, spec)}") from None
    if saved is not None:
        check_scored_encoding(spec, saved, run_config(run_dir))


def _trained_eval_hint(run_dir: str | Path, spec: str) -> str:
    """Where the run's own config (its ``data.eval``) names other data that exists: scoring with the
    config file the run started from, without the overrides it was trained with, reads that file's
    paths."""
    try:
        trained_eval = (yaml.safe_load(run_config(run_dir).read_text()) or {}).get("data", {}).get("eval")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ""
    if not isinstance(trained_eval, str) or trained_eval == spec or not _holds_parquet(trained_eval):
        return ""
    return (f"; the run evaluated {trained_eval} (its config, {run_config(run_dir)}): "
            f"--data {trained_eval}, or --config {run_config(run_dir)}")


def run_config(run_dir: str | Path) -> Path:
    """The config a run was trained with, as training wrote it (``run_dir/config.yaml``)."""
    return Path(run_dir) / "config.yaml"


def check_scored_encoding(spec: Optional[str], fingerprint: dict, config: Path) -> None:
    """The data to score (``spec``) was encoded as the training data of the checkpoint whose run
    ``fingerprint`` is given, where both are known; ``config``: the run's."""
    check_same_encoding("the data to score", spec, "the data the checkpoint trained on",
                        fingerprint.get("data", {}).get("train", "?"), fingerprint.get("encoding"), str(config))


def check_same_encoding(key: str, path: Optional[str], trained_key: str, trained_path: str, trained: Optional[str],
                        config: str) -> None:
    """``path``'s data was encoded as ``trained`` (the encoding of the data at ``trained_path``), where
    both are known; else one line saying so and how to make them alike with ``config`` (whose
    ``data.convert`` rules encoded the training data)."""
    encoding = data_encoding(path) if path else None
    if encoding is None or trained is None or encoding == trained:
        return
    since = data_encoding(trained_path)
    if since is not None and since != trained:  # encoding like it now would give the new ids, refused again
        raise DataError(
            f"{key}: {path} has encoding {encoding}, {trained_key} {trained_path} had {trained}, and that folder was "
            f"converted again since (now {since}): what the model's ids mean is no longer on disk; train again on the "
            f"data as converted now, or convert the raw input with the rules it was trained with ({config}) into folders "
            "of their own (data.train, data.eval: the same rules and input give the same ids) and encode like those"
        )
    raise DataError(
        f"{key}: {path} was converted with other vocabularies or dense statistics than {trained_key} {trained_path} "
        f"(convert.json encoding {encoding} against {trained}): the same id would name another value there; encode "
        f"its raw input like the training data: `concord convert --config {config} --encode-like {Path(trained_path).parent} "
        "--out DIR data.convert.input=RAW`"
    )
