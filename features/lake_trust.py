"""What the lake refuses before any I/O (its trust model: the lake is input, not code), and its errors.

- URIs: a local path or one of `ALLOWED_SCHEMES`, checked once, here, before any I/O (the CLI, the
  DAG Params and `Lake.__init__` all call `check_lake_uri`); an ``endpoint_override`` query option
  must name a host:port the operator listed in ``$FMX_LAKE_ENDPOINTS`` (or the one of ``$FMX_LAKE``).
- Paths: partition values and relative paths are validated (`check_partition_value`,
  `safe_relpath`): no ``/`` in a value, no ``..``, no absolute paths or schemes, no control characters.
- `filesystem(uri)`: the pyarrow filesystem of a checked URI (fsspec for protocols pyarrow lacks).
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from common.home import fmx_home

# Allowed lake URI schemes besides a plain local path. hdfs/az/abfs name their host in the URI.
ALLOWED_SCHEMES = ("file", "s3", "gs", "abfs", "abfss", "az", "hdfs")
# Query options a lake URI may carry (pyarrow's S3/HDFS options); endpoint_override is checked further.
ALLOWED_OPTIONS = ("region", "scheme", "endpoint_override", "allow_bucket_creation", "anonymous",
                   "force_virtual_addressing", "user", "replication")


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of `uri` (checked first: a refused URI sends no request)."""
    check_lake_uri(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
