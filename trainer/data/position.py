"""Where a training run stands in its data, and how it goes on with other ranks or another batch size.

An epoch lays every row end to end and cuts the sequence into one range per rank (``reader.py``); a
rank reads its range as its *sequence*: its rows in the epoch's order, shuffled within windows. An
epoch is normally read as each rank's sequence from its first row, in full batches, the same number on
every rank. A run resumed on another number of ranks, or with another batch size, cannot read on that
way: the rows the interrupted epoch has not trained yet are the tails of the earlier ranks' sequences.
They are laid end to end, rank after rank, and shared out anew in equal whole batches; what is left
over, fewer rows than one batch on every rank, stays out of that epoch, as an epoch's remainder always
does. Later epochs are read normally.

The position is plain numbers (the epoch, the step its reading began at, the pieces read), recorded in
every checkpoint's ``concord.json``, so that a run resumed on any number of ranks trains no row of
the epoch it continues twice, and every row of it but the remainders counted at each change
(:class:`EpochReading`, :class:`DataSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

# Rows [first, end) of rank ``rank``'s sequence when an epoch is laid out for ``ranks`` ranks.
Piece = Tuple[int, int, int, int]  # (ranks, rank, first, end)


def steps_per_epoch(total_rows: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank reads in an epoch laid out for ``world_size`` ranks."""
    return (total_rows // world_size) // batch_size


@dataclass(frozen=True)
class EpochReading:
    """How ``epoch`` is read from step ``began_at`` on by ``world_size`` ranks of ``batch_size`` rows:
    each rank its own sequence from its first row (``pieces`` None), or the rows ``pieces`` hold, laid
    end to end and cut into one equal share of whole batches per rank."""

    epoch: int
    began_at: int
    world_size: int
    batch_size: int
    total_rows: int
    pieces: Optional[Tuple[Piece, ...]] = None

    @property
    def steps(self) -> int:
        if self.pieces is None:
            return steps_per_epoch(self.total_rows, self.world_size, self.batch_size)
        return self.rows_held // (self.world_size * self.batch_size)

    @property
    def rows_held(self) -> int:
        """The rows this reading can give out (before the cut into whole batches)."""
        if self.pieces is None:
            return self.total_rows
        return sum(end - first for _, _, first, end in self.pieces)

    @property
    def rows_left_out(self) -> int:
        """Of :attr:`rows_held`, those no rank reads: less than one batch a rank."""
        return self.rows_held - self.steps * self.world_size * self.batch_size

    @property
    def ends_at(self) -> int:
        return self.began_at + self.steps

    def share(self, rank: int, done: int = 0) -> List[Piece]:
        """What ``rank`` reads after its first ``done`` batches of this reading."""
        size = self.steps * self.batch_size
        if self.pieces is None:
            return [(self.world_size, rank, done * self.batch_size, size)] if done < self.steps else []
        return _cut(self.pieces, rank * size + done * self.batch_size, (rank + 1) * size)

    def unread(self, done: int) -> Tuple[Piece, ...]:
        """The rows this reading gives out that no rank has read after ``done`` steps, rank by rank."""
        return tuple(piece for rank in range(self.world_size) for piece in self.share(rank, done))

    def record(self) -> Dict[str, Any]:
        """JSON: what a checkpoint's ``concord.json`` keeps (the row count is the fingerprint's)."""
        return {"epoch": self.epoch, "began_at": self.began_at, "world_size": self.world_size,
                "batch_size": self.batch_size, "pieces": None if self.pieces is None else [list(p) for p in self.pieces]}


def _cut(pieces: Tuple[Piece, ...], start: int, stop: int) -> List[Piece]:
    """Rows ``[start, stop)`` of ``pieces`` laid end to end, as pieces."""
    out, offset = [], 0
    for ranks, rank, first, end in pieces:
        lo, hi = max(start - offset, 0), min(stop - offset, end - first)
        if lo < hi:
            out.append((ranks, rank, first + lo, first + hi))
        offset += end - first
        if offset >= stop:
            break
    return out


class PositionError(ValueError):
    """A checkpoint's data position that does not fit the data it is resumed on."""


@dataclass(frozen=True)
class DataSchedule:
    """The run's epochs as steps: ``current`` (the epoch a run starts or resumes in, as it is read),
    then every later epoch read normally by ``world_size`` ranks of ``batch_size`` rows."""

    current: EpochReading

    @classmethod
    def fresh(cls, total_rows: int, world_size: int, batch_size: int) -> "DataSchedule":
        return cls(EpochReading(0, 0, world_size, batch_size, total_rows))

    @property
    def steps_per_epoch(self) -> int:
        c = self.current
        return steps_per_epoch(c.total_rows, c.world_size, c.batch_size)

    def reading_at(self, step: int) -> EpochReading:
        """The reading step ``step`` (taken from 0) falls in; a step that ends one falls in the next."""
        c = self.current
        if step < c.ends_at:
            return c
        later, _ = divmod(step - c.ends_at, max(self.steps_per_epoch, 1))
        return EpochReading(c.epoch + 1 + later, c.ends_at + later * self.steps_per_epoch, c.world_size,
                            c.batch_size, c.total_rows)

    def total_steps(self, epochs: int) -> int:
        """The step at which ``epochs`` epochs are done."""
        c = self.current
        if c.epoch >= epochs:
            return c.began_at
        return c.ends_at + (epochs - c.epoch - 1) * self.steps_per_epoch

    def epochs_ended_at(self, step: int) -> Optional[int]:
        """The epochs completed where ``step`` (counted from 1) ends one, else None."""
        c = self.current
        if step == c.began_at and c.pieces is None and step > 0:  # where it began, an epoch had ended
            return c.epoch
        if step < c.ends_at or step == 0:
            return None
        later, inside = divmod(step - c.ends_at, max(self.steps_per_epoch, 1))
        return c.epoch + 1 + later if inside == 0 else None

    def record(self, step: int) -> Dict[str, Any]:
        return self.reading_at(step).record()

    @classmethod
    def resumed(cls, step: int, record: Optional[Dict[str, Any]], saved_world_size: int, saved_batch_size: int,
                total_rows: int, world_size: int, batch_size: int) -> "DataSchedule":
        """The schedule of a run resumed at ``step`` from a checkpoint whose position is ``record`` (None:
        a checkpoint written before positions were recorded, read normally since its first epoch), on
        ``world_size`` ranks of ``batch_size`` rows. Where either differs from the checkpoint's, the
        rows its epoch has not trained are shared out anew."""
        if record is None:
            spe = steps_per_epoch(total_rows, saved_world_size, saved_batch_size)
            epoch = step // spe if spe else 0
            was = EpochReading(epoch, epoch * spe, saved_world_size, saved_batch_size, total_rows)
        else:
            pieces = record.get("pieces")
            was = EpochReading(int(record["epoch"]), int(record["began_at"]), int(record["world_size"]),
                               int(record["batch_size"]), total_rows,
                               None if pieces is None else tuple(tuple(int(v) for v in p) for p in pieces))
        done = step - was.began_at
        if not 0 <= done <= was.steps:
            raise PositionError(f"the checkpoint of step {step} records a reading of epoch {was.epoch} from step "
                                f"{was.began_at} of {was.steps} steps: it was written for other data")
        if (was.world_size, was.batch_size) == (world_size, batch_size):
            return cls(was)
        if done == was.steps:  # the epoch was complete: the next one starts normally
            return cls(EpochReading(was.epoch + 1, step, world_size, batch_size, total_rows))
        if done == 0 and was.pieces is None:  # nothing read yet: the epoch is read normally
            return cls(EpochReading(was.epoch, step, world_size, batch_size, total_rows))
        return cls(EpochReading(was.epoch, step, world_size, batch_size, total_rows, was.unread(done)))
