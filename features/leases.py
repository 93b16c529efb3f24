"""Writers of the lake: temporary-file names and their clean-up, and leases (one writer per partition or file).

- Temporary files are named ``.tmp-<host>-<pid>-<random>`` (`tmp_name`); a writer removes only its own, or
  those of a dead PID on the same host, or those older than `STALE_TMP_S` (`remove_stale_tmp`).
- A lease (`hold`, a file ``_locks/<name>.lock``: owner host/pid, token, expiry) makes a second writer of
  the same partition wait, then fail with `LakeBusy`. Leases are created atomically on local/POSIX
  filesystems (hard link); on object stores (s3, gs, abfs) pyarrow has no create-if-absent, so the lease
  is write-then-read-back (best effort: two writers starting within the same few milliseconds can both
  proceed; the rename keeps each partition whole either way).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

from features.lake_trust import LakeBusy

TMP_PREFIX = ".tmp-"
LOCKS_DIR = "_locks"
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a dead writer, whoever it was
LEASE_TTL_S = 600.0  # a lease not released after this long (its holder died on another host) is free
LEASE_WAIT_S = 300.0  # how long a second writer waits for a partition before LakeBusy


@contextmanager
def hold(fs: pafs.FileSystem, path: str, what: str, ttl_s: float, wait_s: float) -> Iterator[str]:
    """Hold the lease file `path` for the block (see `features.lake.Lake.lease`); `what` names it in LakeBusy."""
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
             "expires": time.time() + ttl_s}
    deadline = time.monotonic() + wait_s
    while not _try_lock(fs, path, owner):
        if time.monotonic() > deadline:
            holder = _lock_owner(fs, path) or {}
            raise LakeBusy(f"{what} is being written by pid {holder.get('pid')} on host "
                           f"{holder.get('host')!r} (lease {path}, expires in "
                           f"{float(holder.get('expires', 0)) - time.time():.0f} s); waited {wait_s:.0f} s")
        time.sleep(0.05)
    try:
        yield path
    finally:
        if (_lock_owner(fs, path) or {}).get("token") == owner["token"]:
            fs.delete_file(path)


def _try_lock(fs: pafs.FileSystem, path: str, owner: dict[str, Any]) -> bool:
    holder = _lock_owner(fs, path)
    if holder is not None and _holds(holder):
        return False
    if holder is not None:  # dead or expired: take it over
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    payload = json.dumps(owner).encode()
    if isinstance(fs, pafs.LocalFileSystem):  # atomic create-if-absent: write a private file, hard-link it
        tmp = f"{parent}/{tmp_name()}"
        with open(tmp, "wb") as f:
            f.write(payload)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    with fs.open_output_stream(path) as f:  # object stores: write, then read back (best effort)
        f.write(payload)
    return (_lock_owner(fs, path) or {}).get("token") == owner["token"]


def _lock_owner(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None
    except ValueError:  # unreadable lease: treat as expired
        return {"expires": 0}


def remove_stale_tmp(fs: pafs.FileSystem, directory: str) -> None:
    """Remove temporary files of dead writers: a dead PID on this host, or older than STALE_TMP_S."""
    now = time.time()
    for info in fs.get_file_info(pafs.FileSelector(directory)):
        if not info.base_name.startswith(TMP_PREFIX) or info.type != pafs.FileType.File:
            continue
        host, pid = _tmp_owner(info.base_name)
        age = now - (info.mtime.timestamp() if info.mtime else now)
        if age > STALE_TMP_S or (host == socket.gethostname() and pid is not None and not _pid_alive(pid)):
            try:
                fs.delete_file(info.path)
            except FileNotFoundError:
                pass  # another writer cleaned it first


def tmp_name() -> str:
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
