"""Cell values for ``concord convert``: numbers and times read from text (ISO-8601, grouped thousands,
true/false), a categorical column's tokens and their stable hash, the advice for a value whose form
suggests a cause, and the error every bad input to convert raises. Nothing here reads a file."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


# A number written with a decimal comma ("0,75", "-1,5"), as some locales export CSV.
_DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+")
# A number with its thousands grouped ("1,234", "-12 345 678.5", "1'000"), as spreadsheets export them.
_GROUPED = re.compile(r"[+-]?\d{1,3}([,' _])\d{3}(?:\1\d{3})*(?:\.\d*)?")
_ISO_MONTH = re.compile(r"\d{4}-\d{2}")
# Words writers put for a missing value beyond Arrow's own (NA, null, NaN...): Hive's and MySQL's \N,
# Python's None, and their kin. Named in the advice for a value that is not a number, not read so.
_MISSING_WORDS = {"\\n", "none", "nil", "(null)", "missing", "undefined", "unknown", "n.a.", "na's", "#n/a"}
_TRUTH = {"true": 1.0, "false": 0.0}
_TICKS_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


class ConvertError(ValueError):
    """Bad input to ``concord convert``; the message names the file, the row and the column."""


def is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def as_text(arr: pa.Array) -> pa.Array:
    return arr if is_text(arr.type) else pc.cast(arr, pa.string())


def parse_numbers(arr: pa.Array, time: bool = False, thousands: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """(values float64 with NaN where missing, mask of unparseable values). ``time`` also accepts
    ISO-8601 timestamps, as seconds since the epoch (UTC when no zone is given); a date or timestamp
    column is such seconds whatever ``time`` says. With ``thousands`` (data.convert.thousands_separator),
    a text cell whose digits it groups in threes ("1,234,567.5") reads as the number."""
    if thousands and is_text(arr.type):
        arr = _ungrouped(arr, thousands)
    if not is_text(arr.type):
        if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
            arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
        elif pa.types.is_duration(arr.type) or pa.types.is_time(arr.type):  # seconds (of the span, since midnight)
            ticks = pc.cast(arr, pa.int32() if pa.types.is_time32(arr.type) else pa.int64())
            ticks = ticks.to_numpy(zero_copy_only=False).astype(np.float64)
            return ticks / _TICKS_PER_SECOND[arr.type.unit], np.zeros(len(arr), dtype=bool)
        values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        return values, np.zeros(len(values), dtype=bool)
    values = _iso_seconds(arr) if time else np.full(len(arr), np.nan)
    rest = np.isnan(values) & arr.is_valid().to_numpy(zero_copy_only=False)
    if not rest.any():  # every cell a time in ISO-8601's commonest forms (or missing)
        return values, np.zeros(len(arr), dtype=bool)
    if np.isnan(values).all():  # no such time: numbers, read at once if every cell is one
        try:
            return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), np.zeros(len(arr), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    bad = np.zeros(len(arr), dtype=bool)
    rest = np.flatnonzero(rest)
    for i, text in zip(rest, arr.take(pa.array(rest, pa.int64())).to_pylist()):  # cell by cell, the cells left
        number = parse_number(text, time)
        if number is None:
            bad[i] = True
        else:
            values[i] = number
    return values, bad


# ISO-8601's commonest forms of a time, without a zone (what a log's time column mostly holds): each
# strptime form with the text it reads, every field zero-padded and in its range.
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_CLOCK = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d"
_ISO_FORMS = {"%Y-%m-%d": f"^{_DATE}$", "%Y-%m-%dT%H:%M:%S": f"^{_DATE}T{_CLOCK}$", "%Y-%m-%d %H:%M:%S": f"^{_DATE} {_CLOCK}$"}


def _iso_seconds(text: pa.Array) -> np.ndarray:
    """:func:`parse_number`'s seconds (UTC) of each cell written in one of ``_ISO_FORMS``, by Arrow's
    vectorised parse; NaN for every other cell, which is left to :func:`parse_number`. The parse alone
    also takes what Python refuses (``2024-1-5``, `` 2024-01-05``, ``2024-02-30`` as March 1st, year
    0): a cell counts only where its text has the form's exact layout, its year is 1 or later and its
    day of the month is the day parsed."""
    seconds = np.full(len(text), np.nan)
    unread = len(text) - text.null_count
    for form, layout in _ISO_FORMS.items():
        if unread == 0:  # a column holds one form: the others need not look
            break
        shaped = pc.fill_null(pc.match_substring_regex(text, layout), False)
        if not pc.any(shaped).as_py():
            continue
        where = np.flatnonzero(shaped.to_numpy(zero_copy_only=False))
        cells = text.filter(shaped)
        stamps = pc.strptime(cells, format=form, unit="s", error_is_null=True)
        written_day = pc.cast(pc.utf8_slice_codeunits(cells, 8, 10), pa.int64())
        exact = pc.fill_null(pc.and_(pc.equal(pc.day(stamps), written_day), pc.greater_equal(pc.year(stamps), 1)), False)
        exact = exact.to_numpy(zero_copy_only=False)
        seconds[where[exact]] = pc.cast(stamps, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)[exact]
        unread -= int(exact.sum())
    return seconds


def _ungrouped(text: pa.Array, separator: str) -> pa.Array:
    """``text`` with ``separator`` taken out of the cells that are numbers with their thousands
    grouped by it (one to three digits, then groups of three, then the decimals); every other cell
    as it is, so that "12,34" stays "not a number"."""
    mark = "\\" + separator if separator in "\\]^-" else separator
    grouped = pc.match_substring_regex(text, rf"^\s*[+-]?\d{{1,3}}([{mark}]\d{{3}})+(\.\d*)?\s*$").fill_null(False)
    return pc.if_else(grouped, pc.replace_substring(text, separator, ""), text)


def value_advice(value, column: str, reason: str, thousands: str) -> str:
    """Advice for a bad ``value`` of ``column``, where its form suggests a cause; empty where none."""
    if isinstance(value, str) and value.strip() == column:  # `cat a.csv b.csv`: the second header is a row
        return "the value is the column's name: a header repeated among the rows (files joined with their headers?); "
    if reason in ("not a number", NOT_A_NUMBER_OR_MISSING, NOT_A_TIME):
        return _number_hint(value, thousands, reason == "not a number")
    return ""


def _number_hint(value, thousands: str, may_be_missing: bool = True) -> str:
    """Advice for a cell that is not a number but would be one written as convert reads numbers
    (or, where a cell ``may_be_missing``, one that may be a code for a missing value)."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    grouped = _GROUPED.fullmatch(text)
    if grouped and not thousands:
        mark = grouped.group(1)
        decimal = "; if it is a decimal mark, write the file's numbers with '.'" if mark == "," else ""
        return (f"if {mark!r} groups thousands there, data.convert.thousands_separator: {mark!r} reads {text!r} as "
                f"{text.replace(mark, '')}{decimal}; ")
    if _DECIMAL_COMMA.fullmatch(text):
        return "convert reads '.' as the decimal mark, not ',': write the file's numbers with '.'; "
    if may_be_missing and text and (not any(c.isalnum() for c in text) or text.lower() in _MISSING_WORDS):
        return f"if {text!r} means a missing value, list it in data.convert.missing_values; "
    return ""

NOT_A_TIME = "missing or not a time"
NOT_A_NUMBER_OR_MISSING = "missing or not a finite number"
WHAT_A_TIME_IS = "a time is a number or ISO-8601 text (2018-03, 2018-03-01, 2018-03-01T09:30:00); "


def matches(text: pa.Array, values: List, numbers: Optional[np.ndarray] = None) -> np.ndarray:
    """Where a column (``text``: its trimmed text; ``numbers``: its parsed numbers, if any) holds one of
    ``values``: a text value matches the text, a number the number (``5`` matches ``5.0``)."""
    found = np.zeros(len(text), dtype=bool)
    if values:
        found |= pc.is_in(text, value_set=pa.array([str(v) for v in values])).fill_null(False).to_numpy(zero_copy_only=False)
    wanted = [float(v) for v in values if not isinstance(v, str)]
    if numbers is not None and wanted:
        found |= np.isin(numbers, wanted)
    return found


def as_number(text: str) -> Optional[float]:
    """A category's text as a finite number, or None."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def holds_stamps(arr: pa.Array) -> bool:
    """Whether a time column holds dates or timestamps (typed, or as ISO-8601 text) rather than plain
    numbers, which may be years or step counts as well as seconds since the epoch."""
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        return True
    if not is_text(arr.type):
        return False
    try:
        pc.cast(arr, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return True
    return False


def parse_number(text, time: bool = False) -> Optional[float]:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if time and isinstance(text, dt.date):
        text = text.isoformat()
    try:
        return float(text)
    except (TypeError, ValueError):
        pass
    if not time:  # true/false as pandas writes a bool column to CSV: 1/0, as a Parquet bool column casts
        return _TRUTH.get(str(text).strip().lower())
    text = str(text).strip()
    if _ISO_MONTH.fullmatch(text):  # ISO-8601's reduced form YYYY-MM, which fromisoformat refuses: its first day
        text += "-01"
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


def holds_values(kind: pa.DataType) -> bool:
    """Whether a column of type ``kind`` holds single values that have a text form: not a list, a
    struct or a map."""
    return not pa.types.is_nested(kind.value_type if pa.types.is_dictionary(kind) else kind)


def holds_categories(kind: pa.DataType) -> bool:
    """Whether a column of type ``kind`` is one :func:`tokens_of` reads: single values, or a list of
    them (a multi-hot bag)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    return holds_values(kind)


def tokens_of(arr: pa.Array, separator: Optional[str]) -> Tuple[pa.Array, np.ndarray]:
    """The non-empty values of a categorical column and the row each came from (ascending). A list
    column (Parquet's ``list<...>``) is a multi-hot bag of its elements, as a text cell is with a
    ``separator``."""
    parents = np.arange(len(arr))
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        arr = pc.list_flatten(arr)
    if pa.types.is_floating(arr.type):  # NaN is how pandas writes a missing number: no value, as a null
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    arr = as_text(arr)
    if separator:
        lists = pc.split_pattern(arr, separator)
        tokens = pc.list_flatten(lists)
        parents = parents[pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)]
    else:
        tokens = arr
    tokens = pc.utf8_trim_whitespace(tokens)
    keep = pc.fill_null(pc.greater(pc.utf8_length(tokens), 0), False)
    return tokens.filter(keep), parents[keep.to_numpy(zero_copy_only=False)]


def stable_hash(values: List[str], size: int) -> np.ndarray:
    """Ids in [0, size): the first 8 bytes of BLAKE2b of the UTF-8 value, the same on every machine."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % size for v in values],
        dtype=np.int64,
    )
