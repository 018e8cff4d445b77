"""Readers for the common dataset formats, all landing in the canonical Example record.

One input (a file, a folder of files, or a saved Hugging Face dataset) is streamed record by record.
Each record becomes an Example or a Reject that says where it is and what to fix; a bad record never
stops the read. Only a problem with the input as a whole (not found, unknown extension, unknown format
name, a mapped column the table lacks, a damaged file, a file over the size limits) raises DataError.

Layers, top to bottom: plan the input (which files, which reader) -> a reader turns a file into raw
records (`_Row`) -> `_to_example` renames columns, picks the format, converts and checks.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from tailor.data.example import DataError, Example, check_example

FORMATS = ("chat", "alpaca", "sharegpt", "prompt_completion", "preference", "openai_preference", "text")

# Every field name a format reads; `columns` may map these (and only these) to a table's columns.
FIELDS = ("messages", "task", "instruction", "input", "output", "system", "conversations", "prompt",
          "completion", "chosen", "rejected", "preferred_output", "non_preferred_output", "text")

EXTENSIONS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
TABLES = ("csv", "tsv", "parquet", "hf")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what `save_to_disk` writes

BOM = b"\xef\xbb\xbf"
# Limits on what one file can make Tailor hold in memory: a hostile or broken file (a gzip "bomb"
# expands a few kilobytes into gigabytes; a line with no end) must stop with an error, not exhaust
# the machine. Lines are read at most this long: a longer JSONL record or text line is rejected
# unread, and a CSV file with one is an error.
MAX_LINE_BYTES = 64 << 20
# A .json array is parsed whole (the standard library cannot stream one), and its records take a
# few times its size in memory: larger files (decompressed) are an error that says to use JSONL.
MAX_JSON_BYTES = 1 << 30
SURROGATE = re.compile("[\ud800-\udfff]")
RECORD_CHARS = 2000
BATCH_ROWS = 1000

# The csv module refuses cells over 128 KiB by default; a document column easily holds more.
csv.field_size_limit(2**31 - 1)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class Reject:
    """A record that could not become an Example.

    `line` is 1-based and means: the line for JSONL and plain text (a paragraph's first line); the
    line where the record starts for a JSON array file; the data row for CSV/TSV (the header is not
    counted, blank rows are, so row n is spreadsheet row n + 1); the row for Parquet and for a saved
    Hugging Face dataset (within its split)."""

    source: str  # the file; for a saved HF dataset its folder (a DatasetDict's split folder)
    line: int | None
    reason: str  # what is wrong and how to fix it
    record: str  # the raw record as text, cut to 2,000 characters

    def __post_init__(self):
        # Text out of a broken file can hold lone surrogates; a rejects file must still be writable.
        self.reason, self.record = _utf8(self.reason), _utf8(self.record[:RECORD_CHARS])

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}" if self.line is not None else f"{self.source}: {self.reason}"


class _Row(NamedTuple):
    """One raw record out of a file reader, before it is understood."""

    line: int
    raw: str  # the text shown in a Reject
    record: object  # normally a dict; anything else is rejected
    split: str | None = None


class _Bad(Exception):
    """A converter's way of saying 'this record cannot be read': the message is the Reject's reason."""


# --- the public entry points -----------------------------------------------------------------------


def read_source(path, format: str = "auto", task: str | None = None, columns: dict[str, str] | None = None,
                task_column: str | None = None) -> Iterator[Example | Reject]:
    """Stream one input, a file or a folder (recursively, sorted, skipping hidden files), yielding an
    Example or a Reject per record and never raising for a bad record.

    format       "auto" (per record, from its keys) or one of FORMATS
    task         the task of every record that does not name its own
    columns      {canonical field: column}, e.g. {"prompt": "question", "completion": "answer"}; unmapped
                 columns keep their names. Meant for tables (CSV/TSV/Parquet/HF), applied to JSON too
    task_column  the column (or JSON key) holding each record's task; default: a "task" field

    A CSV/TSV cell that holds a JSON list of objects (a `messages` column) is parsed; null cells, and
    empty CSV cells in optional fields, count as absent. A .json array is read whole, up to
    MAX_JSON_BYTES (JSONL streams; a line longer than MAX_LINE_BYTES is rejected unread).

    Raises DataError for a problem with the input as a whole: at the call for a wrong argument, a
    missing path, an unknown file type, an unreadable table header or a mapped column the table lacks;
    while reading only for a file damaged midway (a cut .gz, a broken Parquet row group, a .json
    file that stops being valid JSON), or over the limits (a .json file over MAX_JSON_BYTES, a CSV
    line over MAX_LINE_BYTES)."""
    path = Path(path)
    columns = dict(columns or {})
    problems = _check_arguments(format, columns)
    if problems:
        raise DataError(problems)
    units = _plan(path, format)
    problems = [p for unit_path, kind in units for p in _check_table(unit_path, kind, columns, task_column)]
    if problems:
        raise DataError(problems)
    return _read_units(units, format, task, columns, task_column)


def detect_record_format(record: dict) -> str | None:
    """The format a record is in, judged by its keys (null values do not count), or None.

    A format's most telling key decides, so that a record missing its other fields is read in that
    format and rejected with a precise reason ("'output' is missing") rather than 'unknown format'.
    Preference comes before chat: datasets like UltraFeedback carry a `messages` copy of the chosen
    conversation next to `chosen`/`rejected` (pass format="chat" to train on `messages`)."""
    if not isinstance(record, dict):
        return None
    keys = {k for k, v in record.items() if v is not None}
    if keys & {"preferred_output", "non_preferred_output"}:
        return "openai_preference"
    if keys & {"chosen", "rejected"}:
        return "preference"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


# --- planning: what to read, checked before reading ------------------------------------------------


def _check_arguments(format: str, columns: dict) -> list[str]:
    problems = []
    if format != "auto" and format not in FORMATS:
        problems.append(f"unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")
    for field in columns:
        if field not in FIELDS:
            problems.append(f"columns: {field!r} is not a field Tailor reads; map one of {', '.join(FIELDS)} "
                            f"to your column, like {{\"prompt\": \"question\"}}")
    return problems


def _plan(path: Path, format: str) -> list[tuple[Path, str]]:
    """The (path, reader kind) pairs to read, in order."""
    if not path.exists():
        raise DataError([f"{path}: not found; check the path"])
    if path.is_dir() and _is_hf_dataset(path):
        return [(path, "hf")]
    units = data_files(path)
    problems = [f"{p}: unknown file type; Tailor reads {', '.join(EXTENSIONS)} files and saved Hugging Face "
                f"datasets; convert the file or move it out of the folder" for p, kind in units if kind is None]
    if format not in ("auto", "text"):
        problems += [f"{p}: a plain-text file is read as format 'text', not {format!r}; move it out of the "
                     f"folder or read it separately" for p, kind in units if kind == "text"]
    if not units:
        problems.append(f"{path}: no data files in this folder")
    if problems:
        raise DataError(problems)
    return units


def data_files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, reader kind or None) for a file, or for each file in a folder as prepare reads it:
    hidden files skipped, a saved Hugging Face dataset inside it as one unit ("hf")."""
    return list(_walk(path)) if path.is_dir() else [(path, _file_kind(path))]


def _walk(folder: Path, seen: frozenset = frozenset()) -> Iterator[tuple[Path, str | None]]:
    seen = seen | {folder.resolve()}  # a symlink back up the tree must not loop forever
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or child.resolve() in seen:
            continue
        if child.is_dir():
            # A saved dataset's files (.arrow, state.json) mean nothing one by one: read it whole.
            yield from [(child, "hf")] if _is_hf_dataset(child) else _walk(child, seen)
        else:
            yield child, _file_kind(child)


def _is_hf_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_MARKERS)


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):  # ".jsonl.gz" before ".gz"-less matches
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _check_table(path: Path, kind: str, columns: dict, task_column: str | None) -> list[str]:
    """A table that cannot be opened, or a mapping that names a column it lacks, is a problem with the
    input, found before any record is read."""
    if kind not in TABLES:
        return []
    try:
        tables = _table_columns(path, kind)
    except DataError as exc:
        return exc.problems
    wanted = [(f"columns maps {field!r} to", col) for field, col in columns.items()]
    wanted += [("task_column is", task_column)] if task_column else []
    problems = []
    for where, have in tables:
        missing = [(what, col) for what, col in wanted if col not in have]
        problems += [f"{where}: {what} column {col!r}, which it does not have; its columns are: "
                     f"{', '.join(map(str, have))}" for what, col in missing]
    return problems


def _table_columns(path: Path, kind: str) -> list[tuple[Path, list[str]]]:
    if kind in ("csv", "tsv"):
        rows = _csv_rows(path, "\t" if kind == "tsv" else ",")
        try:
            return [(path, _csv_header(path, rows) or [])]
        finally:
            rows.close()
    if kind == "parquet":
        return [(path, _parquet_file(path).schema_arrow.names)]
    return [(_split_source(path, split), ds.column_names) for split, ds in _load_hf(path)]


# --- reading: files into raw records ---------------------------------------------------------------


def _read_units(units, format, task, columns, task_column) -> Iterator[Example | Reject]:
    for path, kind in units:
        for row in _rows(path, kind):
            if isinstance(row, Reject):
                yield row
            else:
                source = _split_source(path, row.split)
                yield _to_example(row, source, "text" if kind == "text" else format, task, columns, task_column)


def _rows(path: Path, kind: str) -> Iterator[_Row | Reject]:
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path)
    if kind in ("csv", "tsv"):
        return _read_csv(path, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "hf":
        return _read_hf(path)
    return _read_text(path)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _guard(path: Path, lines):
    """A damaged gzip stream ends the file, with a DataError naming it, not a traceback."""
    try:
        yield from lines
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError([f"{path}: cannot read the file ({exc}); check that it is complete and, for .gz, "
                         f"really gzip-compressed"]) from exc


def _decode(raw: bytes, file_offset: int) -> tuple[str, str | None]:
    """The text of some bytes, and the reason they are not UTF-8 (None when they are)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", "replace"), (f"not UTF-8 ({exc.reason} at byte {file_offset + exc.start} "
                                                f"of the file); re-save the file as UTF-8")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, bytes without the BOM) for each line of a file, .gz or not; the
    bytes are None for a line longer than MAX_LINE_BYTES, which is skipped, never held whole."""
    with _open_binary(path) as f:
        offset = 0
        for lineno, (raw, size) in enumerate(_guard(path, _capped_lines(f, MAX_LINE_BYTES)), start=1):
            start, offset = offset, offset + size
            if lineno == 1 and raw is not None and raw.startswith(BOM):
                raw, start = raw[len(BOM):], start + len(BOM)
            yield lineno, start, raw


def _capped_lines(f, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, its size in bytes) for each line of a binary file; None for a line over `limit`."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        while raw and not raw.endswith(b"\n"):  # the rest of the line, a megabyte at a time
            raw = f.readline(1 << 20)
            size += len(raw)
        yield None, size


def _too_long() -> str:
    return (f"the line is longer than {MAX_LINE_BYTES >> 20} MiB, the most Tailor reads as one record "
            "(MAX_LINE_BYTES in tailor/data/formats.py); it was skipped unread. If it is a real record, "
            "shorten it; more often the file is broken here or is not line-based")


def _read_jsonl(path: Path) -> Iterator[_Row | Reject]:
    for lineno, offset, raw in _lines(path):
        if raw is None:
            yield _reject(path, lineno, _too_long(), "")
            continue
        if not raw.strip():
            continue
        text, problem = _decode(raw, offset)
        text = text.rstrip("\r\n")
        if problem:
            yield _reject(path, lineno, problem, text)
            continue
        try:
            yield _Row(lineno, text, json.loads(text))
        except json.JSONDecodeError as exc:
            yield _reject(path, lineno, f"not valid JSON ({exc.msg}, column {exc.colno})", text)
        except (ValueError, RecursionError) as exc:  # e.g. a number too long, nesting too deep
            yield _reject(path, lineno, f"not valid JSON ({exc})", text)


def _read_json(path: Path) -> Iterator[_Row | Reject]:
    """A .json file holds one array of records, one (possibly pretty-printed) record, or JSON lines."""
    first = _first_line(path)
    if first.startswith(b"["):
        return _read_json_whole(path)
    if first.startswith(b"{") and not _parses(first):
        return _read_json_whole(path)
    return _read_jsonl(path)


def _first_line(path: Path) -> bytes:
    """The first line with anything on it, cut to MAX_LINE_BYTES (one minified array is one line)."""
    with _open_binary(path) as f:
        for n, raw in enumerate(_guard(path, iter(lambda: f.readline(MAX_LINE_BYTES), b""))):
            raw = raw.removeprefix(BOM) if n == 0 else raw
            if raw.strip():
                return raw.strip()
    return b""


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except (ValueError, RecursionError):
        return False


def _read_json_whole(path: Path) -> Iterator[_Row | Reject]:
    """An array of records, or records one after another (one pretty-printed object; JSON lines
    whose first line was too long to tell), read from the whole text: the standard library cannot
    stream a JSON array, so such a file is held in memory, up to MAX_JSON_BYTES; use JSONL for large
    data. Bytes that are not UTF-8 become lone surrogates, so a bad byte costs only the record around
    it. Any other error ends the read with a DataError that names the line and column: past it no
    record can be told apart, and a file read only in part would leave a card whose counts add up
    without the records lost."""
    data = _whole(path)
    bom = len(BOM) if data.startswith(BOM) else 0
    text = data[bom:].decode("utf-8", "surrogateescape")
    del data
    bad_chars = [m.start() for m in SURROGATE.finditer(text)]  # bytes that were not UTF-8
    lines = _LineCounter(text)
    decoder = json.JSONDecoder()

    def broken(pos: int, what: str) -> DataError:
        line = lines.at(pos)
        column = pos - text.rfind("\n", 0, pos)
        return DataError([f"{path}:{line}: not valid JSON at column {column} ({what}); a .json file is read "
                          "whole, and no record after this point can be found, so the file was not used: fix it "
                          "there, or convert it to JSON lines (.jsonl), where a bad line costs only its record"])

    pos = _skip_space(text, 0)
    in_array = text.startswith("[", pos)
    pos = _skip_space(text, pos + 1) if in_array else pos
    while pos < len(text) and not (in_array and text[pos] == "]"):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise broken(exc.pos, exc.msg) from None
        except (ValueError, RecursionError) as exc:  # e.g. a number too long, nesting too deep
            raise broken(pos, str(exc) or type(exc).__name__) from None
        raw = text[pos:end]
        bad = bisect.bisect_left(bad_chars, pos)
        if bad < len(bad_chars) and bad_chars[bad] < end:
            offset = bom + len(text[:bad_chars[bad]].encode("utf-8", "surrogateescape"))
            yield _reject(path, lines.at(pos), f"not UTF-8 (invalid byte at byte {offset} of the file); re-save "
                                               "the file as UTF-8", raw)
        else:
            yield _Row(lines.at(pos), raw, value)
        pos = _skip_space(text, end)
        if in_array and text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif in_array and pos < len(text) and not text.startswith("]", pos):
            raise broken(pos, "expected ',' or ']' after a record")
    if in_array and pos >= len(text):
        raise broken(pos, "the array is not closed with ']'; check whether the file is complete")
    pos = _skip_space(text, pos + 1) if in_array else pos
    if pos < len(text):
        raise broken(pos, "extra data after the array's closing ']'")


def _whole(path: Path) -> bytes:
    """The file's bytes (decompressed), read in pieces so that a file over MAX_JSON_BYTES stops
    with an error once it gets there rather than after it has filled the memory."""
    parts, size = [], 0
    with _open_binary(path) as f:
        for chunk in _guard(path, iter(lambda: f.read(1 << 20), b"")):
            size += len(chunk)
            if size > MAX_JSON_BYTES:
                unpacked = " once decompressed" if path.name.lower().endswith(".gz") else ""
                raise DataError([f"{path}: more than {MAX_JSON_BYTES >> 20} MiB of JSON{unpacked}, the most "
                                 "Tailor parses as one .json document (MAX_JSON_BYTES in tailor/data/formats.py): "
                                 "convert it to JSON lines, one record per line, which "
                                 "are read a record at a time (e.g. `jq -c '.[]' FILE.json > FILE.jsonl`), or "
                                 "split it into smaller files"])
            parts.append(chunk)
    return b"".join(parts)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _LineCounter:
    """Line numbers of positions visited in increasing order, without recounting from the start."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            return self.text.count("\n", 0, pos) + 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_text(path: Path) -> Iterator[_Row | Reject]:
    """Documents separated by one or more blank lines; a document's line is its first line."""
    start, lines, problem = None, [], None
    for lineno, offset, raw in _lines(path):
        if raw is None:  # a line over MAX_LINE_BYTES spoils its document
            start, problem = start or lineno, problem or _too_long()
            continue
        if raw.strip():
            text, bad = _decode(raw, offset)
            start, problem = start or lineno, problem or bad
            lines.append(text.rstrip("\r\n"))
            continue
        if start is not None:
            yield _document(path, start, lines, problem)
        start, lines, problem = None, [], None
    if start is not None:
        yield _document(path, start, lines, problem)


def _document(path: Path, line: int, lines: list[str], problem: str | None) -> _Row | Reject:
    text = "\n".join(lines)
    return _reject(path, line, problem, text) if problem else _Row(line, text, {"text": text})


def _csv_rows(path: Path, delimiter: str) -> Iterator[list[str] | Reject]:
    """The header, then each row's cells, streamed. Lines are decoded one by one so that a bad byte
    spoils only its row: such a row, or one that is not valid CSV, comes out as a Reject whose line
    the caller fills in. A header that cannot be read is a DataError."""
    bad: dict[int, str] = {}  # physical line -> why it is not UTF-8
    current: list[str] = []  # the physical lines of the row being parsed (csv.reader never reads ahead)

    def lines():
        for lineno, offset, raw in _lines(path):
            if raw is None:  # no way to tell where the row ends: the file cannot be read on
                raise DataError([f"{path}:{lineno}: {_too_long()}; a CSV/TSV file cannot be read past it, "
                                 "so the file was not used"])
            text, problem = _decode(raw, offset)
            if problem:
                bad[lineno] = problem
            current.append(text)
            yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    seen, header = 0, True
    while True:
        try:
            cells = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as exc:
            cells, problem = None, f"not valid CSV ({exc}); check the quoting around this row"
        problem = next((bad[n] for n in range(seen + 1, reader.line_num + 1) if n in bad), problem)
        raw = "".join(current).rstrip("\r\n")
        seen = reader.line_num
        current.clear()
        if problem and header:
            raise DataError([f"{path}: the header is {problem}"])
        yield Reject(str(path), None, problem, raw[:RECORD_CHARS]) if problem else cells
        header = False


def _read_csv(path: Path, delimiter: str) -> Iterator[_Row | Reject]:
    rows = _csv_rows(path, delimiter)
    header = _csv_header(path, rows)
    if header is None:  # an empty file
        return
    for number, cells in enumerate(rows, start=1):
        if isinstance(cells, Reject):
            yield Reject(cells.source, number, cells.reason, cells.record)
        elif len(cells) != len(header) and cells:
            yield _reject(path, number, f"the row has {len(cells)} cells but the header has {len(header)} columns; "
                                        f"quote cells that contain {'tabs' if delimiter == chr(9) else 'commas'}",
                          _dumps(cells))
        elif cells:  # (an empty list is a blank line)
            # A column without a name (a pandas index) holds nothing a format reads.
            yield _Row(number, _dumps(dict(zip(header, cells))), {h: _cell(c) for h, c in zip(header, cells) if h})


def _csv_header(path: Path, rows: Iterator) -> list[str] | None:
    header = next(rows, None)
    named = [h for h in header or [] if h != ""]
    duplicated = sorted({h for h in named if named.count(h) > 1})
    if duplicated:
        raise DataError([f"{path}: column(s) {duplicated} appear more than once in the header; rename them"])
    return header


def _cell(value: str):
    """A CSV cell that holds a JSON list of objects (a `messages` column) or an object with messages
    (OpenAI's preference `input`) is that JSON; every other cell is its text."""
    text = value.strip()
    if not text.startswith(("[", "{")):
        return value
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return value
    if isinstance(parsed, list) and parsed and all(isinstance(v, dict) for v in parsed):
        return parsed
    if isinstance(parsed, dict) and "messages" in parsed:
        return parsed
    return value


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise DataError([f"{path}: not a readable Parquet file ({exc}); re-export it"]) from exc


def _read_parquet(path: Path) -> Iterator[_Row | Reject]:
    number = 0
    batches = _parquet_file(path).iter_batches(batch_size=BATCH_ROWS)
    while True:
        try:
            rows = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # a damaged row group: the rest of the file cannot be trusted
            raise DataError([f"{path}: cannot read past row {number} ({exc}); re-export the file"]) from exc
        for row in rows:
            number += 1
            yield _Row(number, _dumps(row), row)


def _load_hf(folder: Path) -> list[tuple[str | None, object]]:
    """[(split or None, Dataset)] of a folder written by `save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError([f"{folder}: not a readable saved Hugging Face dataset ({exc}); save it again with "
                         f"Dataset.save_to_disk"]) from exc
    if isinstance(loaded, datasets.DatasetDict):
        return list(loaded.items())
    return [(None, loaded)]


def _split_source(path: Path, split: str | None) -> str:
    """A DatasetDict split's rows point at the split's own folder, so (source, line) stays unique."""
    return str(path / split) if split is not None else str(path)


def _read_hf(folder: Path) -> Iterator[_Row | Reject]:
    for split, ds in _load_hf(folder):
        number = 0
        for batch in ds.with_format(None).iter(batch_size=BATCH_ROWS):  # memory-mapped Arrow, read a batch at a time
            for values in zip(*batch.values()):
                number += 1
                row = dict(zip(batch.keys(), values))
                yield _Row(number, _dumps(row), row, split)


# --- understanding: a raw record into an Example --------------------------------------------------


def _to_example(row: _Row, source: str, format: str, task: str | None, columns: dict,
                task_column: str | None) -> Example | Reject:
    def reject(reason: str) -> Reject:
        return Reject(source, row.line, reason, row.raw)

    if not isinstance(row.record, dict):
        return reject(f"a record must be a JSON object like {{\"messages\": [...]}}; got {type(row.record).__name__}")
    record = {k: v for k, v in _rename(row.record, columns).items() if v is not None}  # null = absent
    name = detect_record_format(record) if format == "auto" else format
    if name is None:
        return reject(_unknown_format(record))
    try:
        ex = CONVERTERS[name](record)
        ex.task = _task_of(row.record, record, task, task_column)
        ex.meta = {"source": source, "line": row.line, **({"split": row.split} if row.split is not None else {})}
        problem = check_example(ex) or _unencodable(ex)
    except _Bad as exc:
        detected = detect_record_format(record)
        hint = f" (the record looks like {detected}; check the format setting)" if detected not in (None, name) else ""
        return reject(f"{exc}{hint}")
    except Exception as exc:  # the promise is that one odd record never stops a whole read
        return reject(f"could not read this record ({type(exc).__name__}: {exc}); please report it as a Tailor bug")
    return reject(problem) if problem else ex


def _rename(record: dict, columns: dict) -> dict:
    """Apply {field: column}; a column already called like a mapped field gives way to the mapping."""
    if not columns:
        return record
    sources = set(columns.values())
    replaced = {field for field, col in columns.items() if col in record}
    out = {k: v for k, v in record.items() if k not in sources and k not in replaced}
    out.update({field: record[col] for field, col in columns.items() if col in record})
    return out


def _task_of(original: dict, record: dict, default: str | None, task_column: str | None):
    """The record's own task (its task_column, else a `task` field), else the source's task. The
    column is looked up before renaming, so it may also be one that `columns` maps."""
    for value in (original.get(task_column) if task_column else None, record.get("task")):
        if value is not None and value != "":
            return value
    return default


def _unknown_format(record: dict) -> str:
    keys = sorted(map(str, record))
    shown = ", ".join(keys[:20]) + (", …" if len(keys) > 20 else "")
    return (f"no known format: the record's fields are [{shown}]; expected messages (chat), "
            f"instruction + output (alpaca), conversations (sharegpt), prompt + completion, "
            f"prompt + chosen + rejected (preference), input + preferred_output + non_preferred_output "
            f"(openai_preference) or text; rename the fields or map them with `columns`")


def _unencodable(ex: Example) -> str | None:
    """JSON's \\ud83d escapes can leave half an emoji, which no file format downstream can store."""
    dumped = json.dumps([ex.messages, ex.chosen, ex.rejected, ex.text, ex.task], ensure_ascii=False, default=str)
    if SURROGATE.search(dumped):
        return ("the text holds an unpaired surrogate (half of a \\ud83d-style escape, often a cut emoji); "
                "fix or remove it")
    return None


# --- the formats: each a small function from a record (dict) to an Example -------------------------


def _from_chat(record: dict) -> Example:
    return Example(messages=_message_list(record.get("messages"), "messages"))


def _from_alpaca(record: dict) -> Example:
    instruction, output = _string(record, "instruction"), _string(record, "output")
    extra, system = _string(record, "input", required=False), _string(record, "system", required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return Example(messages=messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _from_sharegpt(record: dict) -> Example:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Bad(f"'conversations' must be a non-empty list of {{from, value}}; got {type(turns).__name__}")
    messages = [_sharegpt_turn(turn, f"conversations[{i}]") for i, turn in enumerate(turns)]
    system = _string(record, "system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=messages)


def _sharegpt_turn(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise _Bad(f"{where} must be an object {{from, value}}; got {type(turn).__name__}")
    turn = {k: v for k, v in turn.items() if v is not None}  # a table's struct fields: null = absent
    speaker, text = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"), turn.get("content"))
    key = "from" if "from" in turn else "role"
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise _Bad(f"{where}.{key} must be one of {', '.join(SHAREGPT_ROLES)}; got {speaker!r}")
    if not isinstance(text, str):
        raise _Bad(f"{where}.{'value' if key == 'from' else 'content'} must be a string; got {type(text).__name__}")
    message = {"role": role, "content": text}
    if turn.get("weight") is not None:
        message["weight"] = turn["weight"]
    return message


def _from_prompt_completion(record: dict) -> Example:
    if isinstance(record.get("label"), bool):
        raise _Bad("an unpaired preference record (prompt, completion, label) as KTO uses; Tailor reads "
                   "preferences as pairs: give 'prompt', 'chosen' and 'rejected'")
    prompt, completion = _required(record, "prompt"), _required(record, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    if isinstance(prompt, list) and isinstance(completion, list):
        return Example(messages=_message_list(prompt, "prompt") + _message_list(completion, "completion"))
    raise _Bad(f"'prompt' and 'completion' must both be strings or both lists of {{role, content}}; "
               f"got {type(prompt).__name__} and {type(completion).__name__}")


def _from_preference(record: dict) -> Example:
    chosen, rejected = _required(record, "chosen"), _required(record, "rejected")
    if _whole_conversation(chosen) and _whole_conversation(rejected):
        return _split_shared_prompt(_message_list(chosen, "chosen"), _message_list(rejected, "rejected"))
    prompt = record.get("prompt")
    if prompt is None or prompt == "":
        raise _Bad("'prompt' is missing; give it, or make 'chosen' and 'rejected' whole conversations "
                   "that start with the same prompt turns")
    return Example(messages=_turns(prompt, "prompt", "user"), chosen=_turns(chosen, "chosen", "assistant"),
                   rejected=_turns(rejected, "rejected", "assistant"))


def _whole_conversation(value) -> bool:
    """TRL's implicit-prompt style: the answers repeat the prompt turns before they differ."""
    first = value[0] if isinstance(value, list) and value else None
    return isinstance(first, dict) and first.get("role") != "assistant"


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> Example:
    """The turns both conversations share are the prompt (a `prompt` field, if any, is not needed)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise _Bad("'chosen' and 'rejected' are the same conversation; a preference pair needs two different answers")
    if n == 0 or chosen[n - 1].get("role") != "user":
        raise _Bad(f"'chosen' and 'rejected' must share the conversation up to a user turn and then differ in "
                   f"the answer; they first differ at chosen[{n}]")
    return Example(messages=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])


def _turns(value, name: str, role: str) -> list[dict]:
    """A string is one turn of `role`; a list is already turns."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _message_list(value, name)


def _from_openai_preference(record: dict) -> Example:
    given = record.get("input")
    if not isinstance(given, dict):
        raise _Bad(f"'input' must be an object {{\"messages\": [...]}}; got {type(given).__name__}")
    return Example(messages=_message_list(given.get("messages"), "input.messages"),
                   chosen=_message_list(record.get("preferred_output"), "preferred_output"),
                   rejected=_message_list(record.get("non_preferred_output"), "non_preferred_output"))


def _from_text(record: dict) -> Example:
    return Example(messages=[], text=_string(record, "text"))


CONVERTERS = {"chat": _from_chat, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt,
              "prompt_completion": _from_prompt_completion, "preference": _from_preference,
              "openai_preference": _from_openai_preference, "text": _from_text}


# --- field helpers ---------------------------------------------------------------------------------


def _required(record: dict, key: str):
    value = record.get(key)
    if value is None or value == "" or value == []:
        raise _Bad(f"'{key}' is missing or empty; fill it in or remove the record")
    return value


def _string(record: dict, key: str, required: bool = True) -> str | None:
    """A text field; an optional one that is absent or blank is None."""
    value = record.get(key)
    if not required and (value is None or isinstance(value, str) and not value.strip()):
        return None
    value = _required(record, key)
    if not isinstance(value, str):
        raise _Bad(f"'{key}' must be a string; got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"'{key}' is empty; fill it in or remove the record")
    return value


def _message_list(value, name: str) -> list[dict]:
    """Turns in OpenAI's shape, copied and normalised; roles, order and content are judged later by
    check_example, which words those problems for every format alike."""
    if not isinstance(value, list) or not value:
        raise _Bad(f"'{name}' must be a non-empty list of {{role, content}}; got {type(value).__name__}")
    return [_message(m, f"{name}[{i}]") for i, m in enumerate(value)]


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise _Bad(f"{where} must be an object {{role, content}}; got {type(message).__name__}")
    # Tables give every message every struct field, absent ones as null: null means absent.
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("role") == "developer":  # OpenAI's newer name for the system message
        out["role"] = "system"
    if isinstance(out.get("content"), list):
        out["content"] = _join_parts(out["content"], f"{where}.content")
    if "name" in out and not isinstance(out["name"], str):  # check_messages allows the key, not its type
        raise _Bad(f"{where}.name must be a string; got {type(out['name']).__name__}")
    return out


def _join_parts(parts: list, where: str) -> str:
    """OpenAI's content parts: text parts joined by newlines; images, audio and files cannot be trained."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _Bad(f"{where}[{j}] is a {kind or type(part).__name__!r} part; only text parts "
                       f"{{\"type\": \"text\", \"text\": ...}} can be trained: remove it or describe it in text")
        if not isinstance(part.get("text"), str):
            raise _Bad(f"{where}[{j}].text must be a string; got {type(part.get('text')).__name__}")
        texts.append(part["text"])
    return "\n".join(texts)


def _reject(path: Path, line: int, reason: str, raw: str) -> Reject:
    return Reject(str(path), line, reason, raw)


def _utf8(text: str) -> str:
    """The text with any lone surrogate (a byte that was not UTF-8, half an emoji) shown as U+FFFD."""
    return SURROGATE.sub("\ufffd", text)


def _dumps(value) -> str:
    """A table row as JSON text for a Reject; dates and bytes shown by their str()."""
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:RECORD_CHARS]
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:RECORD_CHARS]
