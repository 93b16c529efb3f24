"""The data lake: Hive-partitioned Parquet under one root URI, one file per partition.

Layout: ``ROOT/<table>/<key>=<value>/.../data.parquet`` with the keys of `schemas.TABLES[table]`.
The root is a local folder or any URI pyarrow understands (``s3://``, ``gs://``, ``hdfs://``);
other fsspec protocols go through fsspec.

Contracts:
- `write` casts to the declared schema (extra columns dropped), rejects missing columns, nulls in
  non-null columns and rows whose partition-key column disagrees with the partition, then, holding
  the partition's lease (`lease`), writes a temporary file beside the target and renames it into
  place. A re-run replaces the partition exactly; a process killed mid-write leaves the previous file
  untouched (the stray temporary file is ignored by readers and removed by a later write, see below).
- `read` / `scan` check the file's schema against the declared one and fail with `SchemaError`
  naming table, partition and column.

Trust model (the lake is input, not code; see also `check_lake_uri`):
- URIs: a local path or one of `ALLOWED_SCHEMES`, checked once, here, before any I/O (the CLI, the
  DAG Params and `Lake.__init__` all call `check_lake_uri`); an ``endpoint_override`` query option
  must name a host:port the operator listed in ``$FMX_LAKE_ENDPOINTS`` (or the one of ``$FMX_LAKE``).
- Paths: partition values and relative paths are validated (`check_partition_value`,
  `safe_relpath`): no ``/`` in a value, no ``..``, no absolute paths or schemes, no control characters.
- Integrity: every Parquet file is written with page CRC32 checksums and read with verification
  (pyarrow; polars does not verify, so `scan` reads through pyarrow); a corrupt or truncated file
  fails with `CorruptFile` naming table, partition and file.
- Writers: temporary files are named ``.tmp-<host>-<pid>-<random>``; a writer removes only its own,
  or those of a dead PID on the same host, or those older than `STALE_TMP_S`. A write holds a lease
  (``_locks/...``: owner host/pid, expiry) so a second writer of the same partition waits, then fails
  with `LakeBusy`. Leases are created atomically on local/POSIX filesystems (hard link); on object
  stores (s3, gs, abfs) pyarrow has no create-if-absent, so the lease is write-then-read-back (best
  effort: two writers starting within the same few milliseconds can both proceed; the rename keeps
  each partition whole either way).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.home import fmx_home
from features.schemas import TABLES, TableSpec, Vector, describe, type_matches
from features.windows import Window

DATA_FILE = "data.parquet"
# rows per Parquet row group of every partition written: a reader (Lake.iter_batches) decodes a row group at a
# time, so this, not the partition's size, bounds a streamed read (pyarrow's default is 1Mi rows)
ROW_GROUP_ROWS = 65_536
META_FILE = "_lake.json"
TMP_PREFIX = ".tmp-"
LOCKS_DIR = "_locks"
# Allowed lake URI schemes besides a plain local path. hdfs/az/abfs name their host in the URI.
ALLOWED_SCHEMES = ("file", "s3", "gs", "abfs", "abfss", "az", "hdfs")
# Query options a lake URI may carry (pyarrow's S3/HDFS options); endpoint_override is checked further.
ALLOWED_OPTIONS = ("region", "scheme", "endpoint_override", "allow_bucket_creation", "anonymous",
                   "force_virtual_addressing", "user", "replication")
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a dead writer, whoever it was
LEASE_TTL_S = 600.0  # a lease not released after this long (its holder died on another host) is free
LEASE_WAIT_S = 300.0  # how long a second writer waits for a partition before LakeBusy


class SchemaError(ValueError):
    """A table's data does not match its declared schema."""


class PartitionNotFound(FileNotFoundError):
    """A partition that a stage needs does not exist."""


class LakeError(ValueError):
    """A lake URI, path or file that fmx refuses to use (the message says which and why)."""


class UnsafeLake(LakeError):
    """A lake URI with a scheme, host or option outside the allow-list, or a path escaping the lake."""


class CorruptFile(LakeError):
    """A file in the lake is truncated or fails its checksums."""


class LakeBusy(RuntimeError):
    """Another writer holds the lease of a partition or file for longer than we wait (a retry may succeed)."""


def check_lake_uri(uri: str) -> str:
    """`uri` unchanged if it is a local path or an allowed URI (see module docstring); UnsafeLake otherwise.

    Pure string check: called before any filesystem is built, so a refused URI sends no request.
    """
    if not uri or _has_control(uri):
        raise UnsafeLake(f"lake URI {uri!r} is empty or holds control characters")
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UnsafeLake(f"lake URI {uri!r}: scheme {parts.scheme!r} is not allowed; use a local path or one of "
                         f"{', '.join(s + '://' for s in ALLOWED_SCHEMES)}")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in ALLOWED_OPTIONS:
            raise UnsafeLake(f"lake URI option {key!r} is not allowed (allowed: {', '.join(ALLOWED_OPTIONS)})")
        if key == "endpoint_override" and _endpoint(value) not in _trusted_endpoints():
            raise UnsafeLake(f"lake URI endpoint_override {value!r} is not a trusted endpoint: list its host:port in "
                             "$FMX_LAKE_ENDPOINTS (comma-separated) to allow it")
    return uri


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _endpoint(value: str) -> str:
    """host:port of an endpoint given as ``host:port`` or ``scheme://host:port``."""
    return (urlsplit(value).netloc if "://" in value else value).lower().strip("/")


def _trusted_endpoints() -> set[str]:
    listed = {_endpoint(e) for e in os.environ.get("FMX_LAKE_ENDPOINTS", "").split(",") if e.strip()}
    configured = os.environ.get("FMX_LAKE", "")
    for key, value in parse_qsl(urlsplit(configured).query) if "://" in configured else []:
        if key == "endpoint_override":
            listed.add(_endpoint(value))  # the operator's own lake
    return listed


def check_partition_value(key: str, value: str) -> str:
    """`value` if it is a safe partition value: not empty, no ``/`` or ``\\``, not ``.``/``..``, no control chars."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
            or _has_control(value)):
        raise UnsafeLake(f"partition value {key}={value!r} is not allowed (empty, '.', '..', a '/' or '\\', or a "
                         "control character)")
    return value


def safe_relpath(relpath: str) -> str:
    """`relpath` normalised if it stays inside the lake: relative, no ``..``, no scheme, no control chars."""
    if not relpath or _has_control(relpath) or "://" in relpath or "\\" in relpath or relpath.startswith("/"):
        raise UnsafeLake(f"path {relpath!r} is not a relative path inside the lake")
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafeLake(f"path {relpath!r} is not a relative path inside the lake ('..' is refused)")
    return "/".join(parts)


def default_lake_uri() -> str:
    """``$FMX_LAKE`` (e.g. an s3:// URI shared by every worker), else ``$FMX_HOME/lake`` (FMX_HOME: ``./.fmx``)."""
    return os.environ.get("FMX_LAKE") or str(fmx_home() / "lake")


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    check_lake_uri(uri)
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
        self.uri = check_lake_uri(uri or default_lake_uri())
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
        parts = [f"{k}={check_partition_value(k, keys[k])}" for k in spec.partition_by]
        return "/".join([self.root, table, *parts])

    def path(self, *parts: str) -> str:
        """A path under the root for non-table artifacts (checkpoints, reports); UnsafeLake if it leaves the lake."""
        return "/".join([self.root, safe_relpath("/".join(parts))])

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
        with self.lease(_lock_name(table, keys)):
            self.fs.create_dir(directory, recursive=True)
            self._remove_stale_tmp(directory)
            tmp = f"{directory}/{_tmp_name()}"
            pq.write_table(arrow, tmp, filesystem=self.fs, write_page_checksum=True, row_group_size=ROW_GROUP_ROWS)
            self.fs.move(tmp, f"{directory}/{DATA_FILE}")
        return f"{directory}/{DATA_FILE}"

    def exists(self, table: str, **keys: str) -> bool:
        info = self.fs.get_file_info(f"{self.partition_dir(table, **keys)}/{DATA_FILE}")
        return info.type == pafs.FileType.File

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
            self.fs.create_dir(directory, recursive=True)
            self._remove_stale_tmp(directory)
            tmp = f"{directory}/{_tmp_name()}"
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
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        self._remove_stale_tmp(parent)
        tmp = f"{parent}/{_tmp_name()}"
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
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                 "expires": time.time() + ttl_s}
        deadline = time.monotonic() + wait_s
        while not self._try_lock(path, owner):
            if time.monotonic() > deadline:
                holder = self._lock_owner(path) or {}
                raise LakeBusy(f"lake {self.uri}: {name} is being written by pid {holder.get('pid')} on host "
                               f"{holder.get('host')!r} (lease {path}, expires in "
                               f"{float(holder.get('expires', 0)) - time.time():.0f} s); waited {wait_s:.0f} s")
            time.sleep(0.05)
        try:
            yield path
        finally:
            if (self._lock_owner(path) or {}).get("token") == owner["token"]:
                self.fs.delete_file(path)

    def _try_lock(self, path: str, owner: dict[str, Any]) -> bool:
        holder = self._lock_owner(path)
        if holder is not None and _holds(holder):
            return False
        if holder is not None:  # dead or expired: take it over
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        payload = json.dumps(owner).encode()
        if self.is_local:  # atomic create-if-absent: write a private file, hard-link it into place
            tmp = f"{parent}/{_tmp_name()}"
            with open(tmp, "wb") as f:
                f.write(payload)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        with self.fs.open_output_stream(path) as f:  # object stores: write, then read back (best effort)
            f.write(payload)
        return (self._lock_owner(path) or {}).get("token") == owner["token"]

    def _lock_owner(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None
        except ValueError:  # unreadable lease: treat as expired
            return {"expires": 0}

    # ---- internals -----------------------------------------------------------------------------
    def _checked_file(self, table: str, keys: Mapping[str, str]) -> str:
        spec = _spec(table)
        path = f"{self.partition_dir(table, **keys)}/{DATA_FILE}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise PartitionNotFound(f"{_where(table, keys)} does not exist in lake {self.uri}")
        with _named(table, keys, path):
            schema = pq.read_schema(path, filesystem=self.fs)
        check_schema(spec, schema, _where(table, keys))
        return path

    def _remove_stale_tmp(self, directory: str) -> None:
        """Remove temporary files of dead writers: a dead PID on this host, or older than STALE_TMP_S."""
        now = time.time()
        for info in self.fs.get_file_info(pafs.FileSelector(directory)):
            if not info.base_name.startswith(TMP_PREFIX) or info.type != pafs.FileType.File:
                continue
            host, pid = _tmp_owner(info.base_name)
            age = now - (info.mtime.timestamp() if info.mtime else now)
            if age > STALE_TMP_S or (host == socket.gethostname() and pid is not None and not _pid_alive(pid)):
                try:
                    self.fs.delete_file(info.path)
                except FileNotFoundError:
                    pass  # another writer cleaned it first


class ChunkWriter:
    """Appends conformed chunks to one temporary Parquet file (see `Lake.chunked_writer`)."""

    def __init__(self, fs: pafs.FileSystem, tmp: str, spec: TableSpec, where: str, keys: Mapping[str, str]) -> None:
        self.fs, self.tmp, self.spec, self.where, self.keys = fs, tmp, spec, where, dict(keys)
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, data: pa.Table | pl.DataFrame) -> None:
        arrow = conform(self.spec, data.to_arrow() if isinstance(data, pl.DataFrame) else data, self.where)
        for key, value in self.keys.items():
            if key in arrow.column_names and arrow.num_rows:
                distinct = pc.unique(arrow[key]).to_pylist()
                if distinct != [value]:
                    raise SchemaError(f"{self.where}: column {key!r} holds {distinct[:5]}, expected only {value!r}")
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


def _tmp_name() -> str:
    """``.tmp-<host>-<pid>-<random>``: unique per writer, and says who may clean it up."""
    return f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"


def _tmp_owner(name: str) -> tuple[str | None, int | None]:
    parts = name[len(TMP_PREFIX):].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None  # an older name (.tmp-<hex>): only the age rule applies
    return parts[0], int(parts[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holds(holder: Mapping[str, Any]) -> bool:
    """A lease is held while it has not expired and, on this host, its PID lives."""
    if float(holder.get("expires", 0)) < time.time():
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return _pid_alive(holder["pid"])
    return True


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
