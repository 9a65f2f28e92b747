"""Progress bars for long work: redraw twice a second on a terminal; in a log (a file, a job's
captured output), a line of its own every 10 s, and none for work done sooner."""

from __future__ import annotations

import sys
from typing import TextIO


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...
    def write(self, line: str) -> None:  # tqdm.write: a line above the bar; without one, printed
        print(line, flush=True)
    def __enter__(self):
        return self
    def __exit__(self, *exc) -> None: ...


class _Lines:
    """The stream tqdm writes to in a log. tqdm redraws its line in place (a carriage return, then
    the new state), which a log file keeps as one line growing for the whole run; here every redraw
    is a line of its own, and the blanks tqdm writes to clear its line are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, leave: bool = True):
    """``leave=False``: a terminal's bar is wiped when done (work inside other work with a bar of its own)."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, leave=leave)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(sys.stderr), ncols=100, ascii=True, mininterval=10.0, delay=10.0)
