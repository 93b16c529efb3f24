"""The data lake: Hive-partitioned Parquet under one root URI, one file per partition.

Layout: ``ROOT/<table>/<key>=<value>/.../data.parquet`` with the keys of `schemas.TABLES[table]`.
The root is a local folder or any URI pyarrow understands (``s3://``, ``gs://``, ``hdfs://``);
other fsspec protocols go through fsspec.

Contracts:
- `write` casts to the declared schema (extra columns dropped), rejects missing columns, nulls in
  non-null columns and rows whose partition-key column disagrees with the partition, then writes a
  temporary file beside the target and renames it into place. A re-run replaces the partition
  exactly; a process killed mid-write leaves the previous file untouched (the stray temporary file is
  ignored by readers and removed by the next write of that partition).
- `read` / `scan` check the file's schema against the declared one and fail with `SchemaError`
  naming table, partition and column.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from features.schemas import TABLES, TableSpec, Vector, describe, type_matches
from features.windows import Window

DATA_FILE = "data.parquet"
META_FILE = "_lake.json"
TMP_PREFIX = ".tmp-"


class SchemaError(ValueError):
    """A table's data does not match its declared schema."""


class PartitionNotFound(FileNotFoundError):
    """A partition that a stage needs does not exist."""


def default_lake_uri() -> str:
    """``$FMX_LAKE`` (e.g. an s3:// URI shared by every worker), else ``$FMX_HOME/lake`` (FMX_HOME: ``./.fmx``)."""
    return os.environ.get("FMX_LAKE") or os.path.join(os.environ.get("FMX_HOME", ".fmx"), "lake")


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class Lake:
    """Typed, atomic access to the lake's tables under one root URI."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_lake_uri()
        self.fs, self.root = _filesystem(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    # ---- paths -------------------------------------------------------------------------------
    def partition_dir(self, table: str, **keys: str) -> str:
        spec = _spec(table)
        missing = [k for k in spec.partition_by if k not in keys]
        if missing or set(keys) - set(spec.partition_by):
            raise ValueError(f"table {table!r} is partitioned by {spec.partition_by}, got keys {sorted(keys)}")
        parts = [f"{k}={keys[k]}" for k in spec.partition_by]
        return "/".join([self.root, table, *parts])

    def path(self, *parts: str) -> str:
        """A path under the root for non-table artifacts (checkpoints, reports)."""
        return "/".join([self.root, *parts])

    # ---- tables ------------------------------------------------------------------------------
    def write(self, table: str, data: pa.Table | pl.DataFrame, **keys: str) -> str:
        """Cast `data` to the table's schema and atomically replace partition `keys`; return its path."""
        spec = _spec(table)
        where = _where(table, keys)
        arrow = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        arrow = conform(spec, arrow, where)
        for key, value in keys.items():
            if key in arrow.column_names and arrow.num_rows:
                distinct = pc.unique(arrow[key]).to_pylist()
                if distinct != [value]:
                    raise SchemaError(f"{where}: column {key!r} holds {distinct[:5]}, expected only {value!r}")
        directory = self.partition_dir(table, **keys)
        self.fs.create_dir(directory, recursive=True)
        self._remove_stale_tmp(directory)
        tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex}"
        pq.write_table(arrow, tmp, filesystem=self.fs)
        self.fs.move(tmp, f"{directory}/{DATA_FILE}")
        return f"{directory}/{DATA_FILE}"

    def exists(self, table: str, **keys: str) -> bool:
        info = self.fs.get_file_info(f"{self.partition_dir(table, **keys)}/{DATA_FILE}")
        return info.type == pafs.FileType.File

    def read(self, table: str, columns: list[str] | None = None, **keys: str) -> pa.Table:
        """Read one partition, checking its schema."""
        path = self._checked_file(table, keys)
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def scan(self, table: str, **keys: str) -> pl.LazyFrame:
        """A lazy polars frame over one partition, schema checked."""
        path = self._checked_file(table, keys)
        if self.is_local:
            return pl.scan_parquet(path)
        return pl.from_arrow(pq.read_table(path, filesystem=self.fs)).lazy()  # type: ignore[union-attr]

    def scan_many(self, table: str, partitions: Iterable[Mapping[str, str]]) -> pl.LazyFrame:
        """Concatenate several partitions lazily (each schema checked)."""
        frames = [self.scan(table, **dict(p)) for p in partitions]
        if not frames:
            raise PartitionNotFound(f"table {table!r}: no partitions given")
        return pl.concat(frames, how="vertical_relaxed")

    def partitions(self, table: str, **fixed: str) -> list[dict[str, str]]:
        """Every existing partition of `table` (sorted), optionally filtered by some keys."""
        spec = _spec(table)
        base = f"{self.root}/{table}"
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File or info.base_name != DATA_FILE:
                continue
            rel = info.path[len(base) :].strip("/").split("/")[:-1]
            keys = dict(part.split("=", 1) for part in rel)
            if list(keys) == list(spec.partition_by) and all(keys[k] == v for k, v in fixed.items()):
                found.append(keys)
        return sorted(found, key=lambda k: [k[p] for p in spec.partition_by])

    def delete(self, table: str, **keys: str) -> None:
        directory = self.partition_dir(table, **keys)
        if self.fs.get_file_info(directory).type == pafs.FileType.Directory:
            self.fs.delete_dir(directory)

    # ---- lake metadata and small files -----------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The lake's metadata (window length in days, surfaces, source); {} for a new lake."""
        path = self.path(META_FILE)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return {}
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def window(self, ds: str) -> Window:
        """The window starting `ds`, with this lake's window length (meta window_days, default 1)."""
        return Window.parse(ds, int(self.meta().get("window_days", 1)))

    def update_meta(self, **values: Any) -> dict[str, Any]:
        meta = {**self.meta(), **values}
        self.write_bytes(META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
        return meta

    def write_bytes(self, relpath: str, payload: bytes) -> str:
        """Atomically write a small file under the root (temporary name, then rename)."""
        target = self.path(relpath)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(payload)
        self.fs.move(tmp, target)
        return target

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open_input_stream(self.path(relpath)) as f:
            return f.read()

    def file_exists(self, relpath: str) -> bool:
        return self.fs.get_file_info(self.path(relpath)).type == pafs.FileType.File

    # ---- internals -----------------------------------------------------------------------------
    def _checked_file(self, table: str, keys: Mapping[str, str]) -> str:
        spec = _spec(table)
        path = f"{self.partition_dir(table, **keys)}/{DATA_FILE}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise PartitionNotFound(f"{_where(table, keys)} does not exist in lake {self.uri}")
        check_schema(spec, pq.read_schema(path, filesystem=self.fs), _where(table, keys))
        return path

    def _remove_stale_tmp(self, directory: str) -> None:
        for info in self.fs.get_file_info(pafs.FileSelector(directory)):
            if info.base_name.startswith(TMP_PREFIX):
                self.fs.delete_file(info.path)


def _spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None


def _where(table: str, keys: Mapping[str, str]) -> str:
    return f"table {table!r} partition " + ("/".join(f"{k}={v}" for k, v in keys.items()) or "(root)")


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
