"""Progress bars for long work: redraw twice a second on a terminal, a line every 10 s in logs."""

from __future__ import annotations

import sys


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...
    def write(self, line: str) -> None:  # tqdm.write: a line above the bar; without one, printed
        print(line, flush=True)
    def __enter__(self):
        return self
    def __exit__(self, *exc) -> None: ...


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=interval)
