"""What must match for a checkpoint to be resumed, recorded beside every checkpoint.

A mismatch stops the run with one line naming the differing keys and the ways out. Three changes are
safe to continue from when asked for (``train.allow_changes=[...]``): the balancer (the new one starts
fresh on the trained model), and the world size and the batch size (the rest of the checkpoint's epoch
is shared out anew: :mod:`concord.trainer.data.position`). Everything else (tables, model shape, tasks,
the training data, the seed) would silently re-train rows or load the wrong shapes.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from concord.trainer.config import BalancerConfig, ModelConfig
from concord.trainer.data.layout import count_rows, data_encoding, published_checkpoints, saved_fingerprint

# Keys of the fingerprint a user may let differ, with what then happens.
SAFE_CHANGES = {
    "balancer": "the new balancer starts with fresh state on the trained model",
    "world_size": "the rows the checkpoint's epoch has not trained are shared out among the new ranks",
    "batch_size": "the rows the checkpoint's epoch has not trained are read in batches of the new size",
}


def fingerprint(cfg, world_size: int, train_rows: int) -> Dict[str, Any]:
    model = dataclasses.asdict(cfg.model)
    embedding_optimizer = model.pop("embedding_optimizer")
    model.pop("output_bias")  # where the heads start: a resumed run loads them, a scored one too (_NOT_FINGERPRINTED)
    return {
        "model": model,
        "embedding_optimizer": embedding_optimizer["name"],
        "dense_optimizer": cfg.train.dense_optimizer.name,
        "tasks": [[t.name, t.type, t.label, list(t.head)] for t in cfg.tasks],
        "balancer": {"name": cfg.balancer.name, "reduction": cfg.balancer.reduction,
                     "statistics": cfg.balancer.statistics,
                     "statistics_every": cfg.balancer.statistics_every, **cfg.balancer.knobs},
        "batch_size": cfg.data.batch_size,
        "world_size": world_size,
        "data": {"train": cfg.data.train, "rows": train_rows, "shuffle": cfg.data.shuffle, "shuffle_rows": cfg.data.shuffle_rows},
        "seed": cfg.train.seed,
        # convert's digest of the training data's vocabularies and dense statistics (None: data convert
        # did not write): the same rows re-converted with other ids must not resume or be scored alike
        "encoding": data_encoding(cfg.data.train) if cfg.data.train else None,
    }


# Settings that say how to resume, not how to train: their change is the point of the new start.
_RESUME_SETTINGS = ("resume", "resume_from", "allow_changes")


def settings_changed(saved: Dict[str, Any], now: Dict[str, Any]) -> str:
    """``key: old -> new`` for the settings of the config a checkpoint was written with (``saved``, as
    ``to_dict`` gives it) that the resuming config (``now``) sets otherwise, the first few of them
    ("" where none): the learning rates, the schedule, the precision, which the fingerprint lets
    change, so that a resumed run says what it changed rather than go on under other settings unsaid."""
    saved, now = _without_resume_settings(saved), _without_resume_settings(now)
    return describe_changes(differences(saved, now), saved, now)


def _without_resume_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    train = {k: v for k, v in (config.get("train") or {}).items() if k not in _RESUME_SETTINGS}
    return {**config, "train": train}


class ResumeError(RuntimeError):
    """The newest checkpoint was written by a setup that cannot be continued; the message names the
    differing keys and the ways out."""


def with_todays_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A fingerprint written by an earlier version, as this one would have written it: a model or
    balancer setting added since (whose default keeps what the earlier version built) takes its
    default, so that an upgrade alone does not make a checkpoint another setup."""
    upgraded = dict(saved)
    if isinstance(saved.get("model"), dict):
        upgraded["model"] = _filled(saved["model"], ModelConfig, _NOT_FINGERPRINTED)
    if isinstance(saved.get("balancer"), dict):  # its settings beside the knobs (only set knobs are recorded)
        upgraded["balancer"] = _filled(saved["balancer"], BalancerConfig, ("knobs",))
    return upgraded


_NOT_FINGERPRINTED = ("embedding_optimizer", "output_bias")  # model settings :func:`fingerprint` leaves out


def _filled(saved: Dict[str, Any], cls, leave_out=()) -> Dict[str, Any]:
    """``saved`` (a section of dataclass ``cls``, as ``asdict`` wrote it) with the fields it lacks at
    their defaults, nested sections and lists of them (the tables) alike."""
    out = dict(saved)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, value = hints[f.name], out.get(f.name)
        if f.name in leave_out:
            continue
        if f.name not in out:
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if default is not dataclasses.MISSING:
                out[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        elif dataclasses.is_dataclass(kind) and isinstance(value, dict):
            out[f.name] = _filled(value, kind)
        elif typing.get_origin(kind) is list and isinstance(value, list):
            (item,) = typing.get_args(kind)
            if dataclasses.is_dataclass(item):  # the tables
                out[f.name] = [_filled(v, item) if isinstance(v, dict) else v for v in value]
    return out


def check_resume(checkpoint: str | Path, saved: Dict[str, Any], now: Dict[str, Any], allowed: List[str],
                 from_other_run: bool = False) -> List[str]:
    """The keys in which ``now`` differs from the ``saved`` fingerprint of ``checkpoint`` (read with
    today's defaults); raises :class:`ResumeError` where one of them is not in ``allowed``
    (``train.allow_changes``). ``from_other_run``: the checkpoint is ``train.resume_from``'s."""
    saved = with_todays_defaults(saved)
    changed = differences(saved, now)
    refused = [key for key in changed if key not in allowed]
    if refused:
        raise ResumeError(mismatch_message(str(checkpoint), refused, saved, now, allowed, from_other_run))
    return changed


def check_resumable(cfg) -> None:
    """``concord train``'s launcher, before the ranks start: the checkpoint the run would continue
    from was written by a setup this config may continue, as far as its record (``concord.json``) and
    the training files' footers tell. The ranks check again on the checkpoint they load (the newest
    intact one); a record or file that cannot be read here is theirs to report."""
    own = published_checkpoints(Path(cfg.train.run_dir) / "checkpoints") if cfg.train.resume else []
    path = own[-1] if own else _named_checkpoint(cfg.train.resume_from) if cfg.train.resume_from else None
    if path is None:
        if cfg.train.resume_from:
            raise nothing_to_resume_from(cfg.train.resume_from)
        return
    saved = saved_fingerprint(path)
    rows = count_rows(cfg.data.train) if cfg.data.train else None
    if saved and rows is not None:
        check_resume(path, saved, fingerprint(cfg, cfg.world_size, rows), cfg.train.allow_changes, from_other_run=not own)


def nothing_to_resume_from(source) -> ResumeError:
    return ResumeError(f"train.resume_from: {source} holds no checkpoint (neither a run directory nor a step-… directory)")


def _named_checkpoint(source: str) -> Optional[Path]:
    """The checkpoint ``train.resume_from`` names: a checkpoint directory, or a run directory's newest
    published one; None where it holds none."""
    if (Path(source) / "concord.json").is_file():
        return Path(source)
    published = published_checkpoints(Path(source) / "checkpoints")
    return published[-1] if published else None


def differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    keys = set(saved) | set(now)
    if saved.get("encoding") is None or now.get("encoding") is None:  # unknown on one side: not a difference
        keys.discard("encoding")
    return sorted(key for key in keys if saved.get(key) != now.get(key))


def mismatch_message(checkpoint: str, keys: List[str], saved: Dict[str, Any], now: Dict[str, Any], allowed: List[str],
                     from_other_run: bool = False) -> str:
    details = describe_changes(keys, saved, now)
    safe = [k for k in keys if k in SAFE_CHANGES]
    # A checkpoint of this run directory is left by a fresh start or another directory; one that
    # train.resume_from names, only by not naming it.
    ways = (["no train.resume_from (a fresh start)"] if from_other_run else
            ["train.resume=false (the old run moves to previous-<id>/)", "another train.run_dir"])
    if safe and set(safe) != set(keys):
        ways.append(f"only {', '.join(safe)} may differ with train.allow_changes=[{','.join(safe)}]")
    elif safe:
        ways.append(f"train.allow_changes=[{','.join(safe)}] ({'; '.join(SAFE_CHANGES[k] for k in safe)})")
    return f"{checkpoint} was written by a different setup ({details}); to go on: {' or '.join(ways)}"


_SHOWN_CHANGES = 6
_SHORT = 80  # characters of a value shown


def describe_changes(keys: List[str], saved: Dict[str, Any], now: Dict[str, Any]) -> str:
    """The settings under ``keys`` that differ, ``key: old -> new``, the first few of them."""
    changed = [line for k in keys for line in _changed_values(k, saved.get(k), now.get(k))]
    return "; ".join(changed[:_SHOWN_CHANGES] + ([f"and {len(changed) - _SHOWN_CHANGES} more"] if len(changed) > _SHOWN_CHANGES else []))


def _changed_values(key: str, saved: Any, now: Any) -> List[str]:
    """``key: old -> new`` for each value that differs, down to the setting (``model.tables[1].
    embedding_dim: 16 -> 8``), rather than two whole sections cut short."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [line for k in sorted(set(saved) | set(now), key=str) if saved.get(k) != now.get(k)
                for line in _changed_values(f"{key}.{k}", saved.get(k), now.get(k))]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now) and _sections(saved) and _sections(now):
        return [line for i, (a, b) in enumerate(zip(saved, now)) if a != b for line in _changed_values(f"{key}[{i}]", a, b)]
    if isinstance(saved, list) and isinstance(now, list) and max(len(str(saved)), len(str(now))) > _SHORT:
        return [f"{key}: {_list_change(saved, now)}"]  # two long lists cut short would hide what differs
    return [f"{key}: {_short(saved)} -> {_short(now)}"]


def _list_change(saved: List[Any], now: List[Any]) -> str:
    """What a long list of values gained and lost (``adds 'x'; drops 'y'``), or that only its order moved."""
    added, dropped = [v for v in now if v not in saved], [v for v in saved if v not in now]
    if not added and not dropped:
        return f"the same {len(now)} values in another order" if sorted(map(str, saved)) == sorted(map(str, now)) else \
            f"{len(saved)} -> {len(now)} values (repeats differ)"
    return "; ".join(f"{verb} {_short(', '.join(map(repr, values)))}" for verb, values in (("adds", added), ("drops", dropped)) if values)


def _sections(values: List[Any]) -> bool:
    """A list of tables or tasks, named entry by entry; a list of values (layer sizes, one task's
    record) is one setting."""
    return all(isinstance(v, (dict, list)) for v in values)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _SHORT else text[:_SHORT - 3] + "..."
