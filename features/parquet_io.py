"""Parquet below the Lake: casting to a declared schema, the chunked writer, the checked streaming reader, the
k-way time merge of streamed partitions.

- `conform` casts a table to its `TableSpec` (extra columns dropped; a missing column, a null in a non-null
  column or a bad cast raise `SchemaError` naming the column); `check_schema` checks a file's schema.
- `ChunkWriter` appends conformed chunks to one temporary file as row groups of `ROW_GROUP_ROWS`.
- `parquet_reader` opens a file for a streamed read, page checksums verified, without pre-buffering.
- `merge_by_time` merges time-ordered frame streams (one per partition) into one, whole ts tie groups per frame.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from features.lake_trust import SchemaError
from features.schemas import TableSpec, Vector, describe, type_matches

# rows per Parquet row group of every partition written: a reader (Lake.iter_batches) decodes a row group at a
# time, so this, not the partition's size, bounds a streamed read (pyarrow's default is 1Mi rows)
ROW_GROUP_ROWS = 65_536


def check_partition_column(arrow: pa.Table, keys: Mapping[str, str], where: str) -> None:
    """SchemaError unless every partition-key column in `arrow` holds only its partition's value."""
    for key, value in keys.items():
        if key in arrow.column_names and arrow.num_rows:
            distinct = pc.unique(arrow[key]).to_pylist()
            if distinct != [value]:
                raise SchemaError(f"{where}: column {key!r} holds {distinct[:5]}, expected only {value!r}")


class ChunkWriter:
    """Appends conformed chunks to one temporary Parquet file (see `Lake.chunked_writer`)."""

    def __init__(self, fs: pafs.FileSystem, tmp: str, spec: TableSpec, where: str, keys: Mapping[str, str]) -> None:
        self.fs, self.tmp, self.spec, self.where, self.keys = fs, tmp, spec, where, dict(keys)
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, data: pa.Table | pl.DataFrame) -> None:
        arrow = conform(self.spec, data.to_arrow() if isinstance(data, pl.DataFrame) else data, self.where)
        check_partition_column(arrow, self.keys, self.where)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, arrow.schema, filesystem=self.fs, write_page_checksum=True)
        elif arrow.schema != self.writer.schema:
            arrow = arrow.cast(self.writer.schema)
        self.writer.write_table(arrow, row_group_size=ROW_GROUP_ROWS)
        self.rows += arrow.num_rows

    def close(self) -> None:
        if self.writer is None:
            raise SchemaError(f"{self.where}: a chunked write got no chunk (write an empty frame for an empty partition)")
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        try:
            self.fs.delete_file(self.tmp)
        except (FileNotFoundError, OSError):
            pass


class UnsortedSource(ValueError):
    """A source of `merge_by_time` is not in time order."""


def merge_by_time(sources: list[Iterator[pl.DataFrame]], ts: str, tiebreak: str,
                  what: str) -> Iterator[pl.DataFrame]:
    """K-way merge of frame streams, each sorted by (`ts`, `tiebreak`), into one stream in that order.

    Every yielded frame holds only whole `ts` tie groups (no ts value is split across two frames) and at
    most the sources' buffered rows (about two batches per source, plus one tie group). A source out of
    order raises ValueError naming `what`."""
    buffers: list[pl.DataFrame | None] = [None] * len(sources)
    last: list[Any] = [None] * len(sources)
    live = list(range(len(sources)))

    def pull(i: int) -> None:
        got = next(sources[i], None)
        if got is None:
            live.remove(i)
            return
        if got.height == 0:
            return
        if not got[ts].is_sorted() or (last[i] is not None and got[ts][0] < last[i]):
            raise UnsortedSource(f"{what}: source {i} is not sorted by {ts}; streaming reads need time-ordered "
                             "partitions (the generator and the importers write them so)")
        last[i] = got[ts][-1]
        held = buffers[i]
        buffers[i] = got if held is None else pl.concat([held, got], how="diagonal_relaxed")

    for i in list(live):
        pull(i)
    while True:
        for i in list(live):
            while i in live and _empty(buffers[i]):
                pull(i)
        if not live and all(_empty(b) for b in buffers):
            return
        watermark = min((buffers[i][ts][-1] for i in live), default=None)  # type: ignore[index]
        taken, keep = [], []
        for buf in buffers:
            if buf is None or buf.height == 0:
                keep.append(buf)
                continue
            cut = buf.height if watermark is None else int(buf[ts].search_sorted(watermark, side="left"))
            taken.append(buf.slice(0, cut))
            keep.append(buf.slice(cut))
        buffers = keep
        out = [t for t in taken if t.height]
        if out:
            yield pl.concat(out, how="diagonal_relaxed").sort(ts, tiebreak)
        else:  # every live buffer ends at the watermark: read on where it is set
            for i in list(live):
                held = buffers[i]
                if held is not None and held.height and held[ts][-1] == watermark:
                    pull(i)


def parquet_reader(source: Any) -> pq.ParquetFile:
    """A checked Parquet reader for a streamed read: page checksums verified, no pre-buffering (pyarrow's
    default pre-buffering kept every row group's column chunks cached until the file closed: measured,
    Arrow memory grew by ~80 MB over one pass of a 591k-row fm_outputs partition, 0 without it)."""
    return pq.ParquetFile(source, page_checksum_verification=True, pre_buffer=False)


def _empty(frame: pl.DataFrame | None) -> bool:
    return frame is None or frame.height == 0


def check_schema(spec: TableSpec, schema: pa.Schema, where: str) -> None:
    """Raise SchemaError unless every declared column exists with a matching type."""
    for name, declared, _ in spec.fields:
        idx = schema.get_field_index(name)
        if idx < 0:
            raise SchemaError(f"{where}: column {name!r} is missing (expected {describe(declared)})")
        actual = schema.field(idx).type
        if not type_matches(actual, declared):
            raise SchemaError(f"{where}: column {name!r} has type {actual}, expected {describe(declared)}")


def conform(spec: TableSpec, table: pa.Table, where: str) -> pa.Table:
    """Cast `table` to `spec` (column order, types, nullability); raise SchemaError naming the column."""
    arrays, fields = [], []
    for name, declared, nullable in spec.fields:
        if name not in table.column_names:
            raise SchemaError(f"{where}: column {name!r} is missing (expected {describe(declared)})")
        column = table[name].combine_chunks() if table[name].num_chunks != 1 else table[name].chunk(0)
        target = _concrete_type(declared, column, f"{where}: column {name!r}")
        try:
            column = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise SchemaError(f"{where}: column {name!r} cannot be cast from {column.type} to {target}: {exc}") from None
        if not nullable and column.null_count:
            raise SchemaError(f"{where}: column {name!r} has {column.null_count} null values but is declared non-null")
        arrays.append(column)
        fields.append(pa.field(name, target, nullable=nullable))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _concrete_type(declared: pa.DataType | Vector | tuple, column: pa.Array, where: str) -> pa.DataType:
    """The declared type with vector widths taken from the data."""
    if isinstance(declared, Vector):
        if pa.types.is_fixed_size_list(column.type):
            return pa.list_(declared.value_type, column.type.list_size)
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            raise SchemaError(f"{where} has type {column.type}, expected {describe(declared)}")
        widths = pc.unique(pc.drop_null(pc.list_value_length(column))).to_pylist()
        if len(widths) > 1:
            raise SchemaError(f"{where} holds vectors of several widths {sorted(widths)[:5]}")
        return pa.list_(declared.value_type, widths[0] if widths else 0)
    if isinstance(declared, tuple):
        if not (
            pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_list_view(column.type)
        ):
            raise SchemaError(f"{where} has type {column.type}, expected {describe(declared)}")
        return pa.list_(_concrete_type(declared[1], column.flatten(), where))
    return declared
