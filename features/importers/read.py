"""Reading source files into string columns, one row per record, with file, line, raw text and field count.

Delimited text goes through pyarrow's CSV reader (RFC 4180: fields quoted with `quote` may hold the
delimiter, doubled quotes and line breaks; `quote = ""` turns quoting off); Parquet through polars.
Every value is read as a string, stripped of surrounding white space, so that `validate` can say per
row what is wrong with it.

Frame contract of `read_strings` (one String column per source column, plus):
- SRC: the file name.
- LINE: the 1-based line of the file's DATA on which the record STARTS (line 1 is the first line
  after the header). Line breaks are ``\\n``, ``\\r\\n`` and ``\\r`` only: U+2028, form feed etc.
  inside a field are data. A record whose quoted field holds line breaks spans several lines and the
  next record's LINE counts them all, so LINE + header lines is what an editor shows. Blank lines
  count as lines but are not records. Parquet: the 1-based row number.
- RAW: the record's exact source text without its line break (Parquet: the values joined by ',').
- FIELDS: how many fields the record has. A record whose count differs from the header's (or from
  `columns` without a header) is kept with null values, for the quarantine.

Decoding: `encoding`, undecodable bytes replaced by U+FFFD; a UTF-8 byte-order mark is dropped.
Multi-character delimiters (MovieLens-1M's "::"): in the decoded text the delimiter is replaced by a
control character that the file does not contain (U+001F, else U+001E, U+001D, U+001C), parsed, and
mapped back in values and raw text — so a quoted "::" stays data.
Empty and header-only files have no records; `read_strings` raises ImportFailed "no rows in ..." when
no file has any. An unreadable Parquet file raises ImportFailed naming it.
"""

from __future__ import annotations

import codecs
import glob
import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from features.importers.errors import ImportFailed
from features.importers.mapping import SourceTable

SRC, LINE, RAW, FIELDS = "__source", "__line", "__raw", "__fields"
_NUM, _SPAN = "__record", "__span"  # record number (1-based, header included), lines the record spans
STAND_INS = "\x1f\x1e\x1d\x1c"
BREAK = r"\r\n|\r|\n"


def source_files(table: SourceTable, root: Path, required: bool = True) -> list[Path]:
    """Files of `table`: its glob patterns under `root` (a folder), or `root` itself when it is a file."""
    if root.is_file():
        return [root]
    found = sorted({Path(p) for pattern in table.files for p in glob.glob(str(root / pattern))})
    if not found and required:
        raise ValueError(f"no source files match {list(table.files)} under {root}")
    return found


def _decode(path: Path, table: SourceTable) -> tuple[str, str]:
    """(the file as text with a single-character delimiter, that delimiter)."""
    try:
        utf8 = codecs.lookup(table.encoding).name == "utf-8"
    except LookupError:
        raise ValueError(f"mapping: unknown encoding {table.encoding!r}") from None
    text = path.read_bytes().decode("utf-8-sig" if utf8 else table.encoding, errors="replace")
    if len(table.delimiter) == 1:
        return text, table.delimiter
    free = next((c for c in STAND_INS if c not in text), None)
    if free is None:
        raise ImportFailed(
            f"{path}: holds U+001C..U+001F, so none can stand in for delimiter {table.delimiter!r}"
        )
    return text.replace(table.delimiter, free), free


def _parse_options(sep: str, quote: str, bad: list[tuple[int, int, str]] | None) -> pacsv.ParseOptions:
    def keep(row: pacsv.InvalidRow) -> str:
        if bad is not None:
            bad.append((row.number, row.actual_columns, row.text))
        return "skip"

    return pacsv.ParseOptions(
        delimiter=sep,
        quote_char=quote or False,
        newlines_in_values=bool(quote),
        ignore_empty_lines=False,  # blank lines stay records, so that record numbers map to lines
        invalid_row_handler=keep,
    )


def _parse(payload: bytes, sep: str, quote: str, count: int | None) -> tuple[pl.DataFrame, int]:
    """(every record in file order: f0..f<n-1>, FIELDS, _NUM, _SPAN; n) — n from the first record if not given."""
    if count is None:
        first = pacsv.open_csv(
            io.BytesIO(payload),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True, use_threads=False),
            parse_options=_parse_options(sep, quote, None),
        )
        count = len(first.schema)
    cols = [f"f{i}" for i in range(count)]
    bad: list[tuple[int, int, str]] = []
    table = pacsv.read_csv(
        io.BytesIO(payload),
        read_options=pacsv.ReadOptions(column_names=cols, use_threads=False),  # serial: rows keep numbers
        parse_options=_parse_options(sep, quote, bad),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(cols, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    good = pl.from_arrow(table)
    assert isinstance(good, pl.DataFrame)
    numbers = np.ones(good.height + len(bad), dtype=bool)
    if any(n is None or not 0 < n <= len(numbers) for n, _, _ in bad):
        raise ImportFailed("the CSV reader's record numbers of malformed rows are out of order")
    numbers[[n - 1 for n, _, _ in bad]] = False
    breaks = (
        pl.sum_horizontal(pl.col(c).str.count_matches(BREAK) for c in cols)
        if quote and quote.encode() in payload
        else 0
    )
    good = good.with_columns(
        pl.lit(count, pl.Int64).alias(FIELDS),
        pl.Series(_NUM, np.flatnonzero(numbers) + 1, pl.Int64),
        (pl.lit(1) + breaks).cast(pl.Int64).alias(_SPAN),
    )
    ragged = pl.DataFrame(
        {
            FIELDS: [n for _, n, _ in bad],
            _NUM: [n for n, _, _ in bad],
            _SPAN: [1 + text.count("\n") + text.count("\r") - text.count("\r\n") for _, _, text in bad],
        },
        schema={FIELDS: pl.Int64, _NUM: pl.Int64, _SPAN: pl.Int64},
    )
    return pl.concat([good, ragged], how="diagonal").sort(_NUM), count


def _raw(payload: bytes, spans: pl.Series, path: Path) -> pl.Series:
    """Each record's exact text: the payload between its first line's start and the next record's."""
    data = np.frombuffer(payload, dtype=np.uint8)
    cr_alone = data == 13
    cr_alone[:-1] &= data[1:] != 10
    starts = np.concatenate([[0], np.flatnonzero((data == 10) | cr_alone) + 1])
    line_of = np.cumsum(spans.to_numpy()) - spans.to_numpy()  # 0-based first line of each record
    if len(spans) and line_of[-1] >= len(starts):
        raise ImportFailed(f"{path}: the CSV reader's records do not line up with the file's lines")
    offsets = np.append(starts[line_of], len(payload)).astype(np.int64)
    raw = pa.LargeStringArray.from_buffers(len(spans), pa.py_buffer(offsets), pa.py_buffer(payload))
    return pl.Series(RAW, raw).str.strip_chars_end("\r\n")


def _delimited(path: Path, table: SourceTable) -> tuple[list[str], pl.DataFrame]:
    """(column names, frame in the `read_strings` layout) for one delimited text file."""
    text, sep = _decode(path, table)
    if not text.strip():
        return list(table.columns), pl.DataFrame()
    payload = text.encode()
    count = None if table.header else len(table.columns)
    try:
        records, count = _parse(payload, sep, table.quote, count)
    except pa.ArrowInvalid as exc:
        raise ImportFailed(
            f"{path}: the CSV reader failed ({first_line(exc)}); a quote that never closes makes the rest "
            f'of the file one field: fix the quoting, or set quote = "" in the mapping'
        ) from None
    records = records.with_columns(_raw(payload, records[_SPAN], path))
    line = pl.col(_SPAN).cum_sum() - pl.col(_SPAN) + 1
    names = list(table.columns)
    if table.header:
        head = records.row(0, named=True)
        names = names or [str(head[f"f{i}"]).strip() for i in range(count)]
        line = line - head[_SPAN]
        if len(names) != count or len(set(names)) != count:
            raise ImportFailed(
                f"{path}: header has {count} fields {names[:count]}; `columns` or duplicate names clash"
            )
    records = records.with_columns(line.alias(LINE)).slice(1 if table.header else 0)
    return names, records.filter(pl.col(RAW).str.strip_chars() != "").select(  # blank lines are not rows
        pl.lit(path.name).alias(SRC),
        LINE,
        _restore(pl.col(RAW), sep, table.delimiter),
        FIELDS,
        *[
            _restore(pl.col(f"f{i}").str.strip_chars(), sep, table.delimiter).alias(n)
            for i, n in enumerate(names)
        ],
    )


def _restore(text: pl.Expr, stand_in: str, delimiter: str) -> pl.Expr:
    """Map a multi-character delimiter's stand-in back (see module docstring)."""
    return text if stand_in == delimiter else text.str.replace_all(stand_in, delimiter, literal=True)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _parquet(path: Path) -> tuple[list[str], pl.DataFrame]:
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, pa.ArrowException) as exc:
        raise ImportFailed(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    nested = [n for n, t in frame.schema.items() if t.is_nested()]
    if nested:
        raise ImportFailed(
            f"{path}: columns {nested} are nested (list/struct); the importer reads scalar columns"
        )
    names = frame.columns
    frame = frame.with_columns(pl.col(n).cast(pl.String) for n in names)
    raw = pl.concat_str([pl.col(n).fill_null("") for n in names], separator=",")
    return names, frame.with_columns(
        raw.alias(RAW),
        pl.lit(path.name).alias(SRC),
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(LINE),
        pl.lit(len(names), pl.Int64).alias(FIELDS),
    )


def _read_all(table: SourceTable, files: list[Path]) -> tuple[list[str], pl.DataFrame]:
    """Names and rows of every file that has rows (files without any are skipped)."""
    frames, names = [], None
    for path in files:
        cols, frame = _parquet(path) if table.format == "parquet" else _delimited(path, table)
        if frame.height == 0:
            continue
        if names is not None and cols != names:
            raise ImportFailed(f"{path.name}: columns {cols} differ from the first file's {names}")
        names = cols
        frames.append(frame)
    if names is None:
        return list(table.columns), pl.DataFrame()
    return names, pl.concat(frames, how="vertical_relaxed")


def read_strings(table: SourceTable, files: list[Path]) -> tuple[list[str], pl.DataFrame]:
    """All rows of `files` in the layout above; ImportFailed when no file has a row."""
    names, rows = _read_all(table, files)
    if rows.height == 0:
        raise ImportFailed(f"no rows in {', '.join(str(f) for f in files)} (empty, or a header only)")
    return names, rows


def read_side_table(table: SourceTable, files: list[Path]) -> pl.DataFrame:
    """A side table as string columns; its records with another field count than the header's are left out."""
    names, rows = _read_all(table, files)
    if rows.height == 0:
        return pl.DataFrame(schema=dict.fromkeys(names, pl.String))
    return rows.filter(pl.col(FIELDS) == len(names)).select(names)
