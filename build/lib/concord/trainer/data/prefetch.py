"""Batches decoded ahead of the step, in a background thread with a bounded queue.

Parquet decoding (pyarrow, NumPy) spends most of its time outside the GIL, so a thread overlaps it with
the step's forward and backward. On CUDA the thread also pins each batch's memory, so that the step's
copy to the device is asynchronous (``non_blocking``).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")

_END = object()


class Prefetcher(Generic[T]):
    """Iterates ``source`` in a daemon thread, at most ``depth`` items ahead; ``prepare`` (e.g. pinning
    memory) runs in that thread too. An exception in the thread is raised here, at the item where it
    happened; :meth:`close` stops the thread."""

    def __init__(self, source: Iterator[T], depth: int = 2, prepare: Optional[Callable[[T], T]] = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, prepare), name="concord-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[T], prepare: Optional[Callable[[T], T]]) -> None:
        try:
            for item in source:
                item = prepare(item) if prepare is not None else item
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(error)
            return
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls see the end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
