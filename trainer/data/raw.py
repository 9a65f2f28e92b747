"""Raw input for ``concord convert``: the files ``data.convert.input`` names, and their rows as text
chunks (CSV or TSV, compressed too, or Parquet; the folder values of a Hive-partitioned log as
columns), with the errors that name a bad file, line or value and the way out."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from concord.trainer.data.layout import CSV_SUFFIXES, HIDDEN_PREFIXES, folder_files, glob_files, nested_parquet_hint
from concord.trainer.data.values import ConvertError, is_text, parse_numbers


# CSV (or TSV: data.convert.delimiter) files may be compressed: Arrow's CSV reader decompresses
# by the file's extension.


def input_files(spec: str, fmt: str) -> List[Tuple[str, str]]:
    """(path, format) for a file, a directory (its CSV files, compressed too, and Parquet files) or a
    glob, sorted."""
    p = Path(spec)
    if p.is_dir():
        paths = [str(f) for f in folder_files(p, "*") if f.name.endswith((*CSV_SUFFIXES, ".parquet"))]
    elif p.is_file():
        paths = [str(p)]
    else:
        paths = glob_files(spec)
    if not paths:
        nested = nested_parquet_hint(spec, (*CSV_SUFFIXES, ".parquet")) if p.is_dir() else ""
        raise ConvertError(f"{spec}: no CSV or Parquet input found{nested}")
    out = []
    for path in paths:
        suffix = "".join(Path(path).suffixes[-1:]).lower()
        if fmt == "auto" and suffix in _OTHER_FORMATS:
            raise ConvertError(f"{path}: {_OTHER_FORMATS[suffix]}; convert reads CSV and Parquet (data.convert.format: "
                               "csv or parquet reads a file so named all the same)")
        kind = fmt if fmt != "auto" else ("parquet" if path.endswith(".parquet") else "csv")
        out.append((path, kind))
    return out


# Formats a file's name says it is in, which convert does not read (any other name reads as CSV:
# UCI's adult.data is one): named at once, where read as CSV they failed on a garbled header.
_OTHER_FORMATS = {
    **dict.fromkeys((".xlsx", ".xls", ".ods"), "a spreadsheet: save it as CSV"),
    **dict.fromkeys((".json", ".jsonl", ".ndjson"), "JSON: write it as Parquet (pyarrow.json reads JSON lines)"),
    ".orc": "ORC: write it as Parquet (pyarrow.orc reads it)", ".avro": "Avro: write it as Parquet",
    **dict.fromkeys((".feather", ".arrow"), "Arrow IPC: write it as Parquet (pyarrow.feather reads it)"),
    ".zip": "a zip archive: unpack it",
    # What lies beside the data in a downloaded folder (UCI's adult.names), which a glob such as
    # raw/* matches: it failed as a CSV with no 'user' column.
    **dict.fromkeys((".md", ".rst", ".names", ".pdf", ".html", ".htm", ".doc", ".docx", ".py", ".ipynb", ".yaml", ".yml"),
                    "a document, not data: leave it out of data.convert.input (a glob such as '*.csv' names the data alone)"),
}


def partition_values(path: str) -> Dict[str, Optional[str]]:
    """The columns a file's folders give it in Hive's partitioned layout (``ds=2020-01-01/part-0.parquet``,
    as Spark, Hive and Arrow's datasets write a log): each folder on its path named ``key=value``,
    ``value`` as text (%-escapes decoded; Hive's ``__HIVE_DEFAULT_PARTITION__`` a missing value)."""
    out: Dict[str, Optional[str]] = {}
    for part in Path(path).parent.parts:
        key, is_pair, value = part.partition("=")
        if is_pair and key and not key.startswith(HIDDEN_PREFIXES):
            out[unquote(key)] = None if value == "__HIVE_DEFAULT_PARTITION__" else unquote(value)
    return out


def read_chunks(path: str, fmt: str, columns: List[str], cv, skipped: Counter, carried: Sequence[str] = ()) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(index of the chunk's first data row in the file, the chunk), ``cv.chunk_rows`` rows at most,
    with every text cell that is empty, only spaces or one of ``cv.missing_values`` a null, in every
    column but the ``carried`` ones (copied as they are). A column the file lacks and its folders give
    (:func:`partition_values`) holds their value, as text, in every row."""
    partitions = partition_values(path)
    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: not a readable Parquet file ({e})") from None
        have = pf.schema_arrow.names
        read = [c for c in columns if c in have or c not in partitions]
        _check_columns(path, have, read)
        batches = pf.iter_batches(batch_size=cv.chunk_rows, columns=read or have[:1])
    else:
        have = csv_columns(path, cv)
        read = [c for c in columns if c in have or c not in partitions]
        batches = _csv_batches(path, have, read or have[:1], cv, skipped)
    first = 0
    for batch in batches:
        if len(read) < len(columns):  # a column from the folders' names, or only those
            batch = pa.RecordBatch.from_arrays(
                [batch.column(c) if c in read else pa.array([partitions[c]] * batch.num_rows, pa.string()) for c in columns],
                names=columns)
        for start in range(0, batch.num_rows, cv.chunk_rows):
            piece = batch.slice(start, cv.chunk_rows)
            yield first, _blanks_as_null(piece, cv.missing_values, carried)
            first += piece.num_rows


def column_type(path: str, fmt: str, name: str) -> pa.DataType:
    """The type :func:`read_chunks` gives column ``name`` of the file ``path``, from its schema alone:
    a Parquet column's in :func:`_plain_layout`; text for a CSV column or one its folders give."""
    if fmt == "parquet":
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: not a readable Parquet file ({e})") from None
        if name in schema.names:
            return _plain_layout(pa.array([], schema.field(name).type)).type
    return pa.string()


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _plain_layout(column: pa.Array) -> pa.Array:
    """``column`` with Arrow's view layout of text (``string_view``, which Polars and newer Arrow
    writers keep in a Parquet file's schema), also as a list's elements or a dictionary's values, as
    ``large_string``: the same text, in a layout every kernel convert uses takes. So are bytes that are
    UTF-8 text (older Hive and Impala write text without marking it so); other bytes stay bytes."""
    kind = column.type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if pa.types.is_string_view(value):
        return pc.cast(column, pa.large_string())
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_string_view(kind.value_type):
        return pc.cast(column, pa.large_list(pa.large_string()))
    if _is_bytes(value):
        try:
            return pc.cast(column, pa.large_string())
        except pa.ArrowInvalid:  # not UTF-8: read as it is, named where a value must be a number
            pass
    return column


def _blanks_as_null(batch: pa.RecordBatch, markers: List[str], carried: Sequence[str]) -> pa.RecordBatch:
    """``batch`` in :func:`_plain_layout` (a passthrough column too: it may also be a column convert
    reads), with every text cell that is empty, only spaces, or one of ``markers`` (trimmed) a null, in
    every column but the ``carried`` ones. Arrow's CSV reader reads an empty cell as null, but not one
    of spaces (`", "` between fields leaves one in an empty field) nor a Parquet file's ``''`` (a table
    written from a CSV often keeps its empty cells so): read as text, such a cell would be a negative
    label or "not a number"."""
    marker_set = pa.array(markers, pa.string()) if markers else None
    columns = []
    for name, column in zip(batch.schema.names, batch.columns):
        column = _plain_layout(column)
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if name not in carried and is_text(kind):
            text = pc.cast(column, kind)  # a dictionary's values as plain text
            blank = pc.or_(pc.equal(pc.utf8_length(text), 0), pc.utf8_is_space(text))
            if marker_set is not None:
                blank = pc.or_(blank, pc.is_in(pc.utf8_trim_whitespace(text), value_set=marker_set))
            if pc.any(blank).as_py():
                column = pc.if_else(blank, pa.scalar(None, text.type), text)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _csv_batches(path: str, header: List[str], columns: List[str], cv, skipped: Counter) -> Iterator[pa.RecordBatch]:
    """``columns`` of the CSV file ``path`` whose columns are ``header`` (:func:`csv_columns`), as text."""

    def on_invalid(row) -> str:  # a row with the wrong number of fields
        if cv.comment and row.text.startswith(cv.comment):  # a note further down the file
            skipped["comment line"] += 1
            return "skip"
        if cv.on_bad_row == "skip":
            skipped["malformed row"] += 1
            return "skip"
        return "error"

    delimiter = delimiter_of(path, cv.delimiter)
    _check_columns(path, header, columns, delimiter, named=bool(cv.column_names))
    atop = lines_atop(path, cv)
    try:  # opening reads the first block, so parse errors can come from here too
        reader = pacsv.open_csv(
            path,
            # small blocks: the reader reads ahead; column_names: the file has no header row
            read_options=pacsv.ReadOptions(block_size=1 << 20, use_threads=False, column_names=cv.column_names or None,
                                           skip_rows=atop),
            # newlines_in_values: a quoted value may hold line breaks (free text); without it, one that
            # straddles the reader's block boundary split its row in two.
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, newlines_in_values=True),
            # Everything as text: the converter parses each value itself, to name a bad one exactly.
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.string() for c in columns}, strings_can_be_null=True
            ),
        )
        for batch in reader:
            yield batch
    except pa.ArrowInvalid as e:
        if "invalid UTF8" in str(e):  # no row rule applies: the file's encoding is another
            raise ConvertError(f"{path}: {e}; convert reads UTF-8 CSV ({_reencoding(path)})") from None
        extra = re.search(r"Expected (\d+) columns, got (\d+): (.*)", str(e), re.S)
        if extra and int(extra[2]) == int(extra[1]) + 1 and extra[3].rstrip("\r\n").endswith(delimiter):
            raise ConvertError(f"{path}: {e}; its rows end with the delimiter (an empty last field) where its header "
                               "does not: name the columns with data.convert.column_names, one more for that field, "
                               "and pass over the header with skip_rows: 1") from None
        raise ConvertError(f"{path}: {e} (data.convert.on_bad_row: skip drops such rows, counted)") from None


def delimiter_of(path: str, configured: str) -> str:
    """``data.convert.delimiter`` for ``path``: ``auto`` reads a .tsv file (compressed too) on tabs,
    any other on commas."""
    if configured != "auto":
        return configured
    return "\t" if ".tsv" in Path(path).suffixes else ","


def csv_columns(path: str, cv) -> List[str]:
    """The columns of the CSV file ``path``: its header's, or ``data.convert.column_names`` for files
    without one, checked against the first line (as many fields, and not the names themselves: a
    header read as data would stop convert later, at a value that is a name)."""
    first = _csv_first_line(path, delimiter_of(path, cv.delimiter), lines_atop(path, cv))
    names = cv.column_names
    if not names:
        return first
    if [field.strip() for field in first] == [name.strip() for name in names]:
        raise ConvertError(f"{path}: its first line is a header naming the columns of data.convert.column_names: "
                           "leave column_names out for files with a header row")
    if len(first) != len(names):
        raise ConvertError(f"{path}: data.convert.column_names names {len(names)} columns, but the file's first line "
                           f"has {len(first)} fields ({', '.join(first[:4])}{', ...' if len(first) > 4 else ''})")
    return list(names)


def _csv_line(path: str, index: int) -> bytes:
    """Line ``index`` (0-based) of a CSV file as Arrow's CSV reader will read it (decompressed by its
    extension, a byte-order mark dropped), without its line end; empty past the end of the file."""
    try:
        with pa.input_stream(path, compression="detect") as f:
            text = b""
            while text.count(b"\n") <= index and (block := f.read(1 << 20)):
                text += block
    except (OSError, pa.ArrowInvalid) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None
    lines = text.split(b"\n", index + 1)
    line = lines[index] if len(lines) > index else b""
    return (line[3:] if index == 0 and line.startswith(b"\xef\xbb\xbf") else line).rstrip(b"\r")


def lines_atop(path: str, cv) -> int:
    """The lines of the CSV file ``path`` before its header (or first row): ``cv.skip_rows``, then those
    that start with ``cv.comment``."""
    atop = cv.skip_rows
    if cv.comment:
        while (line := _csv_line(path, atop)) and line.startswith(cv.comment.encode()):
            atop += 1
    return atop


def _csv_first_line(path: str, delimiter: str, skip: int = 0) -> List[str]:
    """The fields of the first line after ``skip`` lines, read as Arrow's CSV reader will read the file."""
    try:
        return next(csv.reader([_csv_line(path, skip).decode("utf-8")], delimiter=delimiter), [])
    except UnicodeDecodeError:
        raise ConvertError(f"{path}: the header is not UTF-8 text; convert reads UTF-8 CSV ({_reencoding(path)})") from None


def _reencoding(path: str) -> str:
    """How to re-encode the CSV file ``path`` as UTF-8: from UTF-16 where its byte-order mark says so (a
    spreadsheet's "Unicode text" export), else from a one-byte code page such as Latin-1."""
    try:
        with pa.input_stream(path, compression="detect") as f:
            start = f.read(2)
    except (OSError, pa.ArrowInvalid):
        start = b""
    source = "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "latin1"
    return f"re-encode the file, e.g. `iconv -f {source} -t utf-8`"


def _check_columns(path: str, have: List[str], need: List[str], delimiter: Optional[str] = None, named: bool = False) -> None:
    """Every column of ``need`` in the header ``have`` (a CSV's, split on ``delimiter``; ``named``:
    data.convert.column_names) once, or an error naming the first missing, with the likely cause
    where the header shows one, or the first named twice (a reader would take one of them, unsaid)."""
    for col in need:
        if col not in have:
            hint = _header_hint(col, have, delimiter) if delimiter is not None and not named else ""
            cased = [name for name in have if name.strip().lower() == col.lower()]
            if not hint and cased:
                hint = f"; the file names it {cased[0]!r}: names are compared exactly, case included"
            source = "data.convert.column_names has" if named else "file has"
            raise ConvertError(f"{path}: missing column {col!r} ({source}: {', '.join(have)}){hint}")
        places = [str(i + 1) for i, name in enumerate(have) if name == col]
        if len(places) > 1:
            raise ConvertError(f"{path}: the header names column {col!r} {len(places)} times (columns {', '.join(places)}): "
                               "rename them so that the config's name picks one")


def _header_hint(col: str, have: List[str], delimiter: str) -> str:
    """Why a CSV header split on ``delimiter`` may lack ``col``: another delimiter splits it out, or
    the header has it with spaces around it. Empty where neither."""
    line = delimiter.join(have)
    if re.fullmatch(r"sep=.", line.strip()):  # Excel's directive naming the delimiter, atop the header
        mark = line.strip()[4:]
        as_yaml = '"\\t"' if mark == "\t" else f"'{mark}'"
        return f"; its first line {line.strip()!r} is Excel's note of the delimiter: set data.convert.skip_rows: 1 and delimiter: {as_yaml}"
    for other in (";", "\t", "|", ","):
        if other != delimiter and col in (name.strip() for name in line.split(other)):
            as_yaml = '"\\t"' if other == "\t" else f"'{other}'"
            return f"; the header splits on {as_yaml}: set data.convert.delimiter: {as_yaml}"
    spaced = [name for name in have if name.strip() == col]
    if spaced:
        return (f"; the file names it {spaced[0]!r}, with spaces: name it so in the config, or remove the spaces "
                "after the file's delimiters (its values have them too)")
    numbers, _ = parse_numbers(pa.array(have, pa.string()))
    if 2 * int(np.isfinite(numbers).sum()) >= len(have):
        return "; its first line looks like data, not a header: name the columns of such files with data.convert.column_names"
    return ""


def csv_line_of_row(path: str, row: int, cv) -> int:
    """The line (1-based) of the CSV file ``path`` on which data row ``row`` (0-based, as the reader
    counts them) starts. A quoted value may hold line breaks, and the reader passes over blank lines,
    notes and (with ``on_bad_row: skip``) malformed lines, so rows and lines differ: the file is read
    again up to that row, as the reader reads it, to say (only where a value is bad)."""
    atop = lines_atop(path, cv)
    width = len(csv_columns(path, cv))
    with pa.input_stream(path, compression="detect") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        for _ in range(atop):
            text.readline()
        records = csv.reader(text, delimiter=delimiter_of(path, cv.delimiter))
        if not cv.column_names:
            next(records, None)  # the header
        seen, before = -1, records.line_num
        for record in records:
            if len(record) == width:  # not a blank line, a note or a malformed line
                seen += 1
                if seen == row:
                    return atop + before + 1
            before = records.line_num
    return atop + row + (1 if cv.column_names else 2)  # not found again (the file changed): as if one line a row


def bad_value(path: str, fmt: str, row: int, column: str, value, reason: str, advice: str = "", keeps: str = "",
               cv=None) -> ConvertError:
    """The error for a bad value at ``row`` (0-based among the file's data rows) of ``column``: a
    Parquet file's row, a CSV file's line (read with ``cv``)."""
    where = f"line {csv_line_of_row(path, row, cv)}" if fmt == "csv" else f"row {row + 1}"
    return ConvertError(f"{path}: {where}: column {column!r}: {reason} ({'no value' if value is None else f'value {value!r}'}); "
                        f"{advice}data.convert.on_bad_row: skip drops such rows, counted{keeps}")
