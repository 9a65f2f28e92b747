"""How ``bench`` and ``compare`` name a method and its statistics mode: ``METHOD`` (as the config runs
it: ``concord train``'s mode), ``METHOD@current``, ``METHOD@previous`` (lagged statistics),
``METHOD@previous/K`` (gathered every K steps) or ``METHOD@auto`` (the trainer's default: lagged
where the method can be, at its own cadence)."""

from __future__ import annotations

from typing import Tuple, Union


def parse_method(spec: str) -> Tuple[str, str, Union[int, str]]:
    """``(method, statistics, statistics_every)`` of a spec (a bare ``METHOD``: ``current``, every step)."""
    method, _, mode = spec.partition("@")
    mode, _, every = mode.partition("/")
    if every and not every.isdigit():
        raise ValueError(f"{spec}: K in METHOD@previous/K must be a whole number of steps, got {every!r}")
    if every:
        return method, mode or "current", int(every)
    return method, mode or "current", "auto" if mode == "auto" else 1


def resolve_method(spec: str, statistics: str, statistics_every: Union[int, str]) -> Tuple[str, str, Union[int, str]]:
    """``(method, statistics, statistics_every)`` as a run of ``spec`` uses them: a bare ``METHOD`` in
    the mode given (a config's ``balancer.statistics`` and ``statistics_every``, what ``concord
    train`` would run), a suffixed one in its own."""
    method, mode, every = parse_method(spec)
    return (method, mode, every) if "@" in spec else (method, statistics, statistics_every)
