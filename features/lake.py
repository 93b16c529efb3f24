"""The data lake: Hive-partitioned Parquet under one root URI, one file per partition.

Layout: ``ROOT/<table>/<key>=<value>/.../data.parquet`` with the keys of `schemas.TABLES[table]`.
The root is a local folder or any URI pyarrow understands (``s3://``, ``gs://``, ``hdfs://``);
other fsspec protocols go through fsspec.

Contracts:
- `write` casts to the declared schema (extra columns dropped), rejects missing columns, nulls in
  non-null columns and rows whose partition-key column disagrees with the partition, then, holding
  the partition's lease (`lease`), writes a temporary file beside the target and renames it into
  place. A re-run replaces the partition exactly; a process killed mid-write leaves the previous file
  untouched (the stray temporary file is ignored by readers and removed by a later write). A writer may
  store a few key-value pairs in the file's metadata (`write(..., metadata=)`, read back by `file_metadata`):
  they are replaced with the rows, atomically.
- `read` / `scan` check the file's schema against the declared one and fail with `SchemaError`
  naming table, partition and column.
- Integrity: every Parquet file is written with page CRC32 checksums and read with verification
  (pyarrow; polars does not verify, so `scan` reads through pyarrow); a corrupt or truncated file
  fails with `CorruptFile` naming table, partition and file.

Beside this module: features.lake_trust (the URI and path checks made before any I/O, the lake's errors),
features.leases (temporary files and leases: one writer per partition), features.parquet_io (schema
casting, the chunked writer, the streaming reader and time merge). Their public names are re-exported
here, where every caller imports them from.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from features import leases
from features.lake_trust import (
    ALLOWED_OPTIONS,
    ALLOWED_SCHEMES,
    CorruptFile,
    LakeBusy,
    LakeError,
    PartitionNotFound,
    SchemaError,
    UnsafeLake,
    check_lake_uri,
    check_partition_value,
    default_lake_uri,
    filesystem,
    safe_relpath,
)
from features.leases import LEASE_TTL_S, LEASE_WAIT_S, LOCKS_DIR, TMP_PREFIX, remove_stale_tmp, tmp_name
from features.parquet_io import (
    ROW_GROUP_ROWS,
    ChunkWriter,
    UnsortedSource,
    check_partition_column,
    check_schema,
    conform,
    merge_by_time,
    parquet_reader,
)
from features.schemas import TABLES, TableSpec
from features.windows import Window

__all__ = [
    "ALLOWED_OPTIONS", "ALLOWED_SCHEMES", "DATA_FILE", "LOCKS_DIR", "META_FILE", "ROW_GROUP_ROWS", "TMP_PREFIX",
    "ChunkWriter", "CorruptFile", "Lake", "LakeBusy", "LakeError", "PartitionNotFound", "SchemaError",
    "UnsafeLake", "UnsortedSource", "check_lake_uri", "check_partition_value", "check_schema", "conform",
    "default_lake_uri", "merge_by_time", "parquet_reader", "safe_relpath",
]

DATA_FILE = "data.parquet"
META_FILE = "_lake.json"

class Lake:
    """Typed, atomic access to the lake's tables under one root URI."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = check_lake_uri(uri or default_lake_uri())
        self.fs, self.root = filesystem(self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    # ---- paths -------------------------------------------------------------------------------
    def partition_dir(self, table: str, **keys: str) -> str:
        spec = _spec(table)
        missing = [k for k in spec.partition_by if k not in keys]
        if missing or set(keys) - set(spec.partition_by):
            raise ValueError(f"table {table!r} is partitioned by {spec.partition_by}, got keys {sorted(keys)}")
        parts = [f"{k}={check_partition_value(k, keys[k])}" for k in spec.partition_by]
        return "/".join([self.root, table, *parts])

    def path(self, *parts: str) -> str:
        """A path under the root for non-table artifacts (checkpoints, reports); UnsafeLake if it leaves the lake."""
        return "/".join([self.root, safe_relpath("/".join(parts))])

    # ---- tables ------------------------------------------------------------------------------
    def write(self, table: str, data: pa.Table | pl.DataFrame, metadata: Mapping[str, str] | None = None,
              **keys: str) -> str:
        """Cast `data` to the table's schema and atomically replace partition `keys`; return its path.

        `metadata`: key-value pairs stored in the file's schema metadata (`file_metadata` reads them)."""
        spec = _spec(table)
        where = _where(table, keys)
        arrow = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        arrow = conform(spec, arrow, where)
        check_partition_column(arrow, keys, where)
        if metadata:
            arrow = arrow.replace_schema_metadata(dict(metadata))
        directory = self.partition_dir(table, **keys)
        with self.lease(_lock_name(table, keys)):
            tmp = self._tmp_in(directory)
            pq.write_table(arrow, tmp, filesystem=self.fs, write_page_checksum=True, row_group_size=ROW_GROUP_ROWS)
            self.fs.move(tmp, f"{directory}/{DATA_FILE}")
        return f"{directory}/{DATA_FILE}"

    def exists(self, table: str, **keys: str) -> bool:
        info = self.fs.get_file_info(f"{self.partition_dir(table, **keys)}/{DATA_FILE}")
        return info.type == pafs.FileType.File

    def file_metadata(self, table: str, **keys: str) -> dict[str, str]:
        """The key-value metadata its writer stored with partition `keys` (`write(..., metadata=)`); {} if none."""
        path = self._checked_file(table, keys)
        with _named(table, keys, path):
            stored = pq.read_schema(path, filesystem=self.fs).metadata or {}
        return {k.decode(): v.decode() for k, v in stored.items() if not k.startswith(b"ARROW:")}

    def read(self, table: str, columns: list[str] | None = None, **keys: str) -> pa.Table:
        """Read one partition, checking its schema and the page checksums of the columns read."""
        path = self._checked_file(table, keys)
        with _named(table, keys, path):
            return pq.read_table(path, filesystem=self.fs, columns=columns, page_checksum_verification=True)

    def scan(self, table: str, **keys: str) -> pl.LazyFrame:
        """A lazy polars frame over one partition, schema and page checksums checked.

        Polars' own reader does not verify page checksums, so the frame is a polars IO source fed by
        pyarrow's verifying reader, batch by batch, with polars' column projection pushed down to it.
        """
        from polars.io.plugins import register_io_source

        path = self._checked_file(table, keys)
        with _named(table, keys, path):
            schema = pq.read_schema(path, filesystem=self.fs)
        lake = self

        def batches(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                    batch_size: int | None) -> Iterator[pl.DataFrame]:
            left = n_rows
            with _named(table, keys, path), lake.fs.open_input_file(path) as f:
                reader = parquet_reader(f)
                for batch in reader.iter_batches(batch_size=batch_size or 1 << 20, columns=with_columns):
                    frame = pl.DataFrame(pl.from_arrow(batch))
                    if predicate is not None:
                        frame = frame.filter(predicate)
                    if left is not None:
                        frame, left = frame.head(left), left - min(left, frame.height)
                    yield frame
                    if left == 0:
                        return

        return register_io_source(batches, schema=pl.from_arrow(schema.empty_table()).schema)  # type: ignore[union-attr]

    def iter_batches(self, table: str, columns: list[str] | None = None, batch_rows: int = 65_536,
                     **keys: str) -> Iterator[pl.DataFrame]:
        """One partition as polars frames of at most `batch_rows` rows, in file order (schema and page
        checksums checked, as `read`): the streaming read of a partition larger than memory."""
        path = self._checked_file(table, keys)
        with _named(table, keys, path), self.fs.open_input_file(path) as f:
            reader = parquet_reader(f)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                yield pl.DataFrame(pl.from_arrow(batch))

    @contextmanager
    def chunked_writer(self, table: str, **keys: str) -> Iterator[ChunkWriter]:
        """Write partition `keys` of `table` chunk by chunk (`ChunkWriter.write`), then replace it atomically.

        Each chunk is cast and checked as in `write` and appended to a temporary file as its own row
        group(s); the rename happens when the block exits without an error (an error or a kill leaves the
        previous partition untouched). Holds the partition's lease throughout. A writer that got no rows
        writes an empty partition with the table's schema."""
        spec, where = _spec(table), _where(table, keys)
        directory = self.partition_dir(table, **keys)
        with self.lease(_lock_name(table, keys)):
            tmp = self._tmp_in(directory)
            writer = ChunkWriter(self.fs, tmp, spec, where, keys)
            try:
                yield writer
                writer.close()
            except BaseException:
                writer.abort()
                raise
            self.fs.move(tmp, f"{directory}/{DATA_FILE}")

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
        with self.lease(_lock_name(table, keys)):
            if self.fs.get_file_info(directory).type == pafs.FileType.Directory:
                self.fs.delete_dir(directory)

    # ---- lake metadata and small files -----------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The lake's metadata (window length in days, surfaces, source); {} for a new lake."""
        path = self.path(META_FILE)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return {}
        with self.fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            return json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFile(f"lake metadata {path} is not valid JSON ({exc})") from None

    def window(self, ds: str) -> Window:
        """The window starting `ds`, with this lake's window length (meta window_days, default 1)."""
        return Window.parse(ds, int(self.meta().get("window_days", 1)))

    def step(self, window: Window) -> int:
        """`window`'s index since the lake's origin (meta origin; 0 without one): the MLflow step of its metrics."""
        origin = self.meta().get("origin")
        return window.index(date.fromisoformat(origin)) if origin else 0

    def steps(self) -> Callable[[str], int]:
        """ds -> `step` of its window, with the metadata read once (a lineage sync maps every day it has)."""
        frozen, meta = copy.copy(self), self.meta()
        frozen.meta = lambda: meta  # type: ignore[method-assign]
        return lambda ds: frozen.step(frozen.window(ds))

    def update_meta(self, **values: Any) -> dict[str, Any]:
        """Merge `values` into the metadata (read-modify-write under the metadata's lease)."""
        with self.lease("meta"):
            meta = {**self.meta(), **values}
            self._put(META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
        return meta

    def write_bytes(self, relpath: str, payload: bytes) -> str:
        """Atomically write a small file under the root (temporary name, then rename), holding its lease."""
        with self.lease("files/" + safe_relpath(relpath)):
            return self._put(relpath, payload)

    def _put(self, relpath: str, payload: bytes) -> str:
        target = self.path(relpath)
        tmp = self._tmp_in(target.rsplit("/", 1)[0])
        with self.fs.open_output_stream(tmp) as f:
            f.write(payload)
        self.fs.move(tmp, target)
        return target

    def read_bytes(self, relpath: str) -> bytes:
        with self.fs.open_input_stream(self.path(relpath)) as f:
            return f.read()

    def file_exists(self, relpath: str) -> bool:
        return self.fs.get_file_info(self.path(relpath)).type == pafs.FileType.File

    # ---- leases --------------------------------------------------------------------------------
    @contextmanager
    def lease(self, name: str, ttl_s: float = LEASE_TTL_S, wait_s: float = LEASE_WAIT_S) -> Iterator[str]:
        """Hold the lease ``_locks/<name>`` (owner host/pid, expiry) for the block; yields the lock's path.

        A lease held by a live writer is waited for up to `wait_s`, then LakeBusy names the holder. A lease
        whose holder is a dead PID on this host, or whose expiry passed, is taken over. Stages that write
        a partition for a long time take their own lease around the work (e.g. ``stage/fm_train/<ds>``).
        """
        path = self.path(LOCKS_DIR, safe_relpath(name) + ".lock")
        with leases.hold(self.fs, path, f"lake {self.uri}: {name}", ttl_s, wait_s) as held:
            yield held

    # ---- internals -----------------------------------------------------------------------------
    def _tmp_in(self, directory: str) -> str:
        """A fresh temporary file name in `directory` (created), after removing dead writers' leftovers."""
        self.fs.create_dir(directory, recursive=True)
        remove_stale_tmp(self.fs, directory)
        return f"{directory}/{tmp_name()}"

    def _checked_file(self, table: str, keys: Mapping[str, str]) -> str:
        spec = _spec(table)
        path = f"{self.partition_dir(table, **keys)}/{DATA_FILE}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise PartitionNotFound(f"{_where(table, keys)} does not exist in lake {self.uri}")
        with _named(table, keys, path):
            schema = pq.read_schema(path, filesystem=self.fs)
        check_schema(spec, schema, _where(table, keys))
        return path


def _lock_name(table: str, keys: Mapping[str, str]) -> str:
    return "/".join([table, *(f"{k}={check_partition_value(k, keys[k])}" for k in _spec(table).partition_by)])


@contextmanager
def _named(table: str, keys: Mapping[str, str], path: str) -> Iterator[None]:
    """Turn pyarrow's errors on a damaged file into one CorruptFile line naming table, partition and file."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{_where(table, keys)}: file {path} is corrupt or truncated ({reason}); re-run the "
                          "stage that writes it") from None


def _spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None


def _where(table: str, keys: Mapping[str, str]) -> str:
    return f"table {table!r} partition " + ("/".join(f"{k}={v}" for k, v in keys.items()) or "(root)")
