"""The one reader of every table the project reads: file -> DataFrame, one-line errors naming file, line, column."""

# Layers: read_bytes (file -> bytes, streamed within the input limits of magnet_core.cohort.limits) -> read_text
# (bytes -> checked text: gzip integrity, UTF-8) -> read_table (text -> ids x columns as written, ragged rows refused)
# -> cell_problems / numeric_values (cells -> float64; text, infinities, missing cells and values beyond float32
# named by line and column) -> orientation (which axis holds the sample ids). magnet_core.cohort.data (cohorts),
# magnet_core.cohort.preprocess (raw site matrices) and magnet_core.cohort.validation (a site against the manifest)
# all read through these functions.

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import zlib
from pathlib import Path
from typing import Iterable, Literal, NoReturn

import numpy as np
import pandas as pd

from magnet_core.cohort.errors import DataError  # noqa: F401  (defined without pandas, so light modules need not load it)
from magnet_core.cohort.limits import DEFAULT_INPUT_LIMITS, InputLimits, describe_size

FLOAT32_MAX = float(np.finfo(np.float32).max)
GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20  # read (and decompress) this much at a time
NEWLINE, TAB, COMMA = ord("\n"), ord("\t"), ord(",")
TAB_BYTE = b"\t"
Orientation = Literal["auto", "samples-x-features", "features-x-samples"]



def read_bytes(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> bytes:
    """The file's content, decompressed when it is gzip (by name or by its first bytes), read in chunks and refused
    at the first input limit it crosses (decompressed bytes, line length, cells in a line, rows, rows x widest line):
    a gzip bomb stops after at most ``limits.max_bytes`` bytes, one chunk at a time. A corrupt or truncated gzip
    stream is refused (gzip's CRC and length check run over the whole stream)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(4)
            is_gzip = path.name.endswith(".gz") or head[:2] == GZIP_MAGIC
            if is_gzip and head[:2] != GZIP_MAGIC:
                raise DataError(f"{path}: not a gzip file (named .gz but its first bytes are {head!r})")
            file.seek(0)
            if not is_gzip:
                return _bounded(file, path, limits, "")
            with gzip.GzipFile(fileobj=file, mode="rb") as stream:
                return _bounded(stream, path, limits, f" once decompressed (a gzip file of {_size(path)} bytes)")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a table file") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (the compressed stream ends early; copy the file "
                        "again)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip file ({exc}); copy or compress the file again") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,}"
    except OSError:
        return "unknown"


@dataclasses.dataclass
class _Counts:
    """What has streamed out of a file so far."""

    bytes: int = 0
    lines: int = 0  # complete lines (newlines seen)
    line_bytes: int = 0  # bytes of the line in progress
    line_seps: int = 0  # separators in the line in progress
    widest: int = 0  # most cells in a complete line
    sep: int | None = None  # the separator's byte, known once the header line is complete

    @property
    def rows(self) -> int:
        """Lines begun below the header (blank lines included: an upper bound on the parsed rows)."""
        return max(self.lines + (self.line_bytes > 0) - 1, 0)


def _bounded(stream, path: Path, limits: InputLimits, decompressed: str) -> bytes:
    """Read ``stream`` to its end in chunks, refusing at the first limit crossed; the chunks read, joined."""
    counts, kept, pending = _Counts(), [], b""
    while chunk := stream.read(CHUNK_BYTES):
        counts.bytes += len(chunk)
        if counts.bytes > limits.max_bytes:
            _refuse(path, f"more than {describe_size(limits.max_bytes, 'max_bytes')}{decompressed}", "max_bytes",
                    limits)
        if counts.sep is None:  # the header line decides the separator, as _header does on the text
            pending += chunk
            end = pending.find(b"\n")
            if end < 0 and len(pending) <= limits.max_line_bytes:
                continue
            chunk, pending = pending, b""
            counts.sep = TAB if TAB_BYTE in chunk[: end if end >= 0 else len(chunk)] else COMMA
        _count(chunk, counts, path, limits)
        kept.append(chunk)
    if pending:
        counts.sep = TAB if TAB_BYTE in pending else COMMA
        _count(pending, counts, path, limits)
        kept.append(pending)
    return b"".join(kept)


def _count(chunk: bytes, c: _Counts, path: Path, limits: InputLimits) -> None:
    """Add one chunk to the counts; refuse a line too long or too wide, too many rows or cells."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    newlines = np.flatnonzero(data == NEWLINE)
    seps = np.flatnonzero(data == c.sep)
    if len(newlines):
        starts = np.concatenate(([0], newlines[:-1] + 1))
        lengths = newlines - starts
        lengths[0] += c.line_bytes
        before = np.searchsorted(seps, newlines)  # separators before each newline
        cells = np.diff(before, prepend=0) + 1
        cells[0] += c.line_seps
        _check_line(int(lengths.max()), c.lines + 1 + int(lengths.argmax()), int(cells.max()),
                    c.lines + 1 + int(cells.argmax()), path, limits)
        c.widest = max(c.widest, int(cells.max()))
        c.lines += len(newlines)
        c.line_bytes = len(data) - int(newlines[-1]) - 1
        c.line_seps = len(seps) - int(before[-1])
    else:
        c.line_bytes += len(data)
        c.line_seps += len(seps)
    _check_line(c.line_bytes, c.lines + 1, c.line_seps + 1, c.lines + 1, path, limits)
    if c.rows > limits.max_rows:
        _refuse(path, f"more than {limits.max_rows:,} rows below the header", "max_rows", limits)
    widest = max(c.widest, c.line_seps + 1)
    if c.rows * widest > limits.max_cells:
        _refuse(path, f"at least {c.rows:,} rows x {widest:,} cells in its widest line = {c.rows * widest:,} "
                      f"cells, more than {limits.max_cells:,}", "max_cells", limits)


def _check_line(length: int, line: int, cells: int, wide_line: int, path: Path, limits: InputLimits) -> None:
    if length > limits.max_line_bytes:
        _refuse(path, f"line {line} is longer than {describe_size(limits.max_line_bytes, 'max_line_bytes')}",
                "max_line_bytes", limits)
    if cells > limits.max_columns:
        _refuse(path, f"line {wide_line} has {cells:,} cells or more, more than {limits.max_columns:,} columns",
                "max_columns", limits)


def _refuse(path: Path, what: str, key: str, limits: InputLimits) -> NoReturn:
    raise DataError(f"{path}: {what}: refused before parsing by the input limit {key} = "
                    f"{getattr(limits, key)}. If the file is genuine, raise {key} under [input_limits] in the "
                    "consortium manifest (or in the prepare config).")


def read_text(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped), within ``limits``; other encodings and binary files
    are refused."""
    data = read_bytes(path, limits)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{Path(path)}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}); save the table as UTF-8 CSV/TSV") from None
    if "\x00" in text:
        raise DataError(f"{Path(path)}: binary content (NUL bytes), not a CSV/TSV table")
    return text


def _header(text: str, path: Path) -> tuple[list[str], str]:
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first.strip():
        raise DataError(f"{path}: empty file" if not text.strip() else f"{path}: the first line (the header) "
                        "is empty")
    sep = "\t" if "\t" in first else ","
    return [c.strip() for c in next(csv.reader([first], delimiter=sep))], sep


def read_header(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> list[str]:
    """The header's cells (as written, stripped)."""
    return _header(read_text(path, limits), Path(path))[0]


def read_table(path: str | Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> pd.DataFrame:
    """A table as written: first column = row ids (stripped text), first line = column names (duplicates kept,
    so they can be reported), cells parsed as numbers where pandas can. Tab-separated when the header holds a
    tab, else comma-separated; an R-style header without a cell above the row ids is accepted. A file beyond
    ``limits`` is refused before pandas sees it. ``frame.attrs`` holds ``path`` and ``sep``."""
    path = Path(path)
    text = read_text(path, limits)
    header, sep = _header(text, path)
    try:
        body = pd.read_csv(io.StringIO(text), sep=sep, header=None, skiprows=1, index_col=0, dtype={0: str},
                           low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: no data rows below the header") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: cannot be read as a table ({str(exc).strip()}; line numbers count from the line "
                        "after the header)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as a table ({exc})") from None
    if body.shape[1] == 0:
        raise DataError(f"{path}: a single column; expected ids in the first column and values after it")
    if len(header) == body.shape[1] + 1:
        columns = header[1:]
    elif len(header) == body.shape[1]:  # R-style header without a cell above the row ids
        columns = header
    else:
        raise DataError(f"{path}: the header has {len(header)} cells but the rows have {body.shape[1] + 1}")
    empty = [j for j, c in enumerate(columns) if not c]
    if empty:
        raise DataError(f"{path}: empty name in header cell {empty[0] + 1 + (len(header) > len(columns))}")
    _refuse_short_rows(text, body, sep, path)
    body.columns = pd.Index(columns, dtype=object)
    body.index = pd.Index([str(s).strip() for s in body.index], dtype=object)
    body.attrs.update(path=str(path), sep=sep)
    return body


def _refuse_short_rows(text: str, body: pd.DataFrame, sep: str, path: Path) -> None:
    """pandas fills a row with too few cells with NaN; a truncated or ragged row is an error, not missing data."""
    last = body.iloc[:, -1]
    candidates = np.flatnonzero(last.isna().to_numpy())
    if not len(candidates):
        return
    lines = [(n, line) for n, line in enumerate(text.splitlines()[1:], start=2) if line.strip()]
    if len(lines) != len(body):  # quoted line breaks: positions cannot be mapped, leave it to the cell checks
        return
    expected = body.shape[1] + 1
    for i in candidates:
        number, line = lines[i]
        cells = len(next(csv.reader([line], delimiter=sep)))
        if cells < expected:
            raise DataError(f"{path}, line {number}: {cells} cells where the other rows have {expected} (a truncated "
                            "or ragged row; an empty cell still needs its separator)")


# ----------------------------------------------------------------------------------------------- cells


def locate(path: Path, table: pd.DataFrame, i: int, j: int, transposed: bool, offset: int = 0) -> str:
    """``file, line L (sample 's'), column C 'feature'`` (or ``(feature 'f'), column C 'sample'`` when the
    file is features x samples); ``offset``: columns of the file before ``table``'s first one (ids = 1)."""
    kind = "feature" if transposed else "sample"
    return f"{path}, line {i + 2} ({kind} {table.index[i]!r}), column {j + 2 + offset} {table.columns[j]!r}"


def _numeric(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, mask of cells holding text that is not a number)."""
    values = np.empty(table.shape, dtype=np.float64)
    text = np.zeros(table.shape, dtype=bool)
    for j in range(table.shape[1]):
        col = table.iloc[:, j]
        if col.dtype.kind in "fiub":
            values[:, j] = col.to_numpy(dtype=np.float64)
        else:
            num = pd.to_numeric(col, errors="coerce")
            values[:, j] = num.to_numpy(dtype=np.float64)
            text[:, j] = (num.isna() & col.notna()).to_numpy()
    return values, text


def cell_problems(table: pd.DataFrame, path: str | Path, *, allow_missing: bool = False, transposed: bool = False,
                  columns: list[int] | None = None) -> tuple[list[str], pd.DataFrame]:
    """Check every cell (of ``columns`` positions, default all): numbers only, finite, within float32, and present
    unless ``allow_missing``. Returns one message per kind of problem (its first cell, and how many) and the
    values as float64 (NaN = missing or refused cell)."""
    path = Path(path)
    cols = list(range(table.shape[1])) if columns is None else list(columns)
    part = table.iloc[:, cols]
    values, text = _numeric(part)
    problems = []

    def report(mask: np.ndarray, describe) -> None:
        if mask.any():
            i, j = (int(v) for v in np.argwhere(mask)[0])
            text = describe(i, j)
            count = f"{int(mask.sum())} such cells"
            problems.append(f"{locate(path, part, i, j, transposed, cols[j] - j)}: "
                            + (f"{text[:-2]}; {count})" if text.endswith(");") else f"{text} ({count})"))

    report(text, lambda i, j: f"non-numeric value {part.iat[i, j]!r}"
           + ("; missing values must be empty or NA" if allow_missing else ""))
    with np.errstate(invalid="ignore"):
        infinite = np.isinf(values)
        huge = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
    report(infinite, lambda i, j: f"non-finite ({values[i, j]}) value")
    report(huge, lambda i, j: f"too large for float32: value {values[i, j]:g} (float32 holds up to "
                              f"{FLOAT32_MAX:.3g});")
    if not allow_missing:
        report(np.isnan(values) & ~text, lambda i, j: "missing (empty or NA) value")
    values[text | infinite | huge] = np.nan
    return problems, pd.DataFrame(values, index=part.index, columns=part.columns)


def numeric_values(table: pd.DataFrame, path: str | Path, *, allow_missing: bool = False,
                   transposed: bool = False) -> pd.DataFrame:
    """The table's cells as float64, or a DataError naming the first bad cell (file, line, column)."""
    problems, values = cell_problems(table, path, allow_missing=allow_missing, transposed=transposed)
    if problems:
        raise DataError(problems[0])
    return values


def duplicates(index: Iterable) -> list[str]:
    """Names given more than once, in order of first repetition."""
    seen, dup = set(), []
    for name in map(str, index):
        if name in seen and name not in dup:
            dup.append(name)
        seen.add(name)
    return dup


# ----------------------------------------------------------------------------------------------- orientation


def orientation(table: pd.DataFrame, path: str | Path, sample_ids: Iterable[str], wanted: Orientation = "auto",
                label_source: str = "the labels file", hint: str = "write one row per sample") -> bool:
    """Whether the matrix is features x samples (its column names are the labelled sample ids). ``wanted`` other
    than ``auto`` refuses the other orientation with a message saying which one the file has. Raises when
    neither axis holds a labelled sample only for ``auto`` (callers with another wording check that first)."""
    path = Path(path)
    ids = set(map(str, sample_ids))
    rows_hit = sum(1 for s in table.index if s in ids)
    cols_hit = sum(1 for s in table.columns if str(s) in ids)
    if rows_hit == 0 and cols_hit == 0:
        if wanted != "auto":
            return wanted == "features-x-samples"
        raise DataError(f"{path}: neither its row ids nor its column names match the labelled samples of "
                        f"{label_source} (first rows {list(table.index[:3])}, first columns "
                        f"{list(table.columns[:3])}, first labelled ids {sorted(ids)[:3]})")
    if wanted == "samples-x-features" and rows_hit == 0:
        raise DataError(f"{path}: wrong orientation: no row id is a labelled sample of {label_source} while "
                        f"{cols_hit} column names are: the file is features x samples (transposed); {hint}")
    if wanted == "features-x-samples" and cols_hit == 0:
        raise DataError(f"{path}: wrong orientation: no column name is a labelled sample of {label_source} while "
                        f"{rows_hit} row ids are: the file is samples x features; {hint}")
    if wanted == "auto":
        return cols_hit > rows_hit
    return wanted == "features-x-samples"
