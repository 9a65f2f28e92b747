"""How ``bench`` and ``compare`` name a method and its statistics mode: ``METHOD``,
``METHOD@previous`` (lagged statistics) or ``METHOD@previous/K`` (gathered every K steps)."""

from __future__ import annotations

from typing import Tuple


def parse_method(spec: str) -> Tuple[str, str, int]:
    """``(method, statistics, statistics_every)`` of a spec."""
    method, _, mode = spec.partition("@")
    mode, _, every = mode.partition("/")
    if every and not every.isdigit():
        raise ValueError(f"{spec}: K in METHOD@previous/K must be a whole number of steps, got {every!r}")
    return method, mode or "current", int(every or 1)
