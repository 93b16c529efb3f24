"""The lake as untrusted input (issue 11): URI allow-list before any I/O (no SSRF), partition values and
relative paths that cannot leave the lake, checksummed Parquet with corrupt files named, and concurrent
writers that neither delete each other's temporary files nor interleave (leases)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from features.lake import (
    ALLOWED_SCHEMES,
    DATA_FILE,
    LOCKS_DIR,
    TMP_PREFIX,
    CorruptFile,
    Lake,
    LakeBusy,
    UnsafeLake,
    check_lake_uri,
    check_partition_value,
    safe_relpath,
)

REPO = Path(__file__).resolve().parents[2]
DS = "2026-01-01"


def _users(n: int = 50) -> pl.DataFrame:
    from datetime import date

    return pl.DataFrame({"user_id": list(range(n)), "segment": [i % 3 for i in range(n)],
                         "region": [i % 2 for i in range(n)], "first_ds": [date(2026, 1, 1)] * n})


def _events(n: int) -> pl.DataFrame:
    return pl.DataFrame({
        "event_id": list(range(n)),
        "ts": pl.Series([1_767_225_600_000_000 + i for i in range(n)]).cast(pl.Datetime("us", "UTC")),
        "user_id": [i % 97 for i in range(n)], "item_id": [i % 1013 for i in range(n)], "surface": ["feed"] * n,
        "click": [i % 7 == 0 for i in range(n)], "like": [None] * n, "position": [i % 10 for i in range(n)], "device": [1] * n,
        "p_click": [(i % 1000) / 1000 for i in range(n)],
    })


# ---- URIs: allow-list before any request ---------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A local listening socket: a lake URI pointing at it must not make anyone connect."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.5)
    yield sock, sock.getsockname()[1]
    sock.close()


def _nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{port}/x", "https://127.0.0.1:{port}/x", "ftp://127.0.0.1:{port}/x",
    "s3://bucket/lake?endpoint_override=http://127.0.0.1:{port}&scheme=http",
    "s3://bucket/lake?proxy_options=http://127.0.0.1:{port}",
], ids=["http", "https", "ftp", "s3-endpoint", "s3-proxy"])
def test_a_lake_uri_outside_the_allow_list_is_refused_before_any_request(
    listener: tuple[socket.socket, int], template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmx import dagkit
    from fmx.cli import cli

    sock, port = listener
    uri = template.format(port=port)
    with pytest.raises(UnsafeLake):
        Lake(uri)  # the stages
    with pytest.raises(UnsafeLake):
        dagkit.lake_uri({"lake_uri": uri})  # the Airflow Param
    out = CliRunner().invoke(cli, ["ingest", "--ds", DS, "--lake", uri])  # the CLI
    assert out.exit_code != 0, out.output
    assert "not allowed" in out.output or "not a trusted endpoint" in out.output, out.output
    assert "Traceback" not in out.output
    assert _nobody_connected(sock), f"{uri}: something connected to the listening socket"


def test_allowed_schemes_and_trusted_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ALLOWED_SCHEMES == ("file", "s3", "gs", "abfs", "abfss", "az", "hdfs")
    for uri in ("/data/lake", "rel/lake", "file:///data/lake", "s3://b/lake", "gs://b/lake", "abfs://c@acct/lake",
                "az://c/lake", "hdfs://namenode:8020/lake", "s3://b/lake?region=eu-west-1"):
        assert check_lake_uri(uri) == uri
    endpoint = "s3://b/l?endpoint_override=http://minio:9000&scheme=http"
    with pytest.raises(UnsafeLake, match="FMX_LAKE_ENDPOINTS"):
        check_lake_uri(endpoint)
    monkeypatch.setenv("FMX_LAKE_ENDPOINTS", "minio:9000")  # the operator's list
    assert check_lake_uri(endpoint) == endpoint
    monkeypatch.delenv("FMX_LAKE_ENDPOINTS")
    monkeypatch.setenv("FMX_LAKE", endpoint)  # the operator's own lake carries its endpoint
    assert check_lake_uri(endpoint) == endpoint
    for bad in ("", "memory://x", "lake\n", "gcs://b/l"):
        with pytest.raises(UnsafeLake):
            check_lake_uri(bad)


# ---- paths that cannot leave the lake ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["../x", "..", ".", "a/b", "a\\b", "", "x\x00", "x\ny"])
def test_partition_values_are_validated_on_every_access(lake_uri: str, value: str) -> None:
    lake = Lake(lake_uri)
    with pytest.raises(UnsafeLake):
        check_partition_value("ds", value)
    for call in (lambda: lake.write("users", _users(), ds=value), lambda: lake.read("users", ds=value),
                 lambda: lake.exists("users", ds=value), lambda: lake.delete("users", ds=value)):
        with pytest.raises(UnsafeLake):
            call()
    assert not any(p.name != "lake" for p in Path(lake_uri).parent.iterdir() if p.name.startswith("x"))


@pytest.mark.parametrize("rel", ["../escape", "a/../../escape", "/etc/passwd", "s3://b/k", "a\\..\\b", "", "a\x00"])
def test_relative_paths_cannot_leave_the_lake(lake_uri: str, tmp_path: Path, rel: str) -> None:
    lake = Lake(lake_uri)
    with pytest.raises(UnsafeLake):
        safe_relpath(rel)
    for call in (lambda: lake.write_bytes(rel, b"x"), lambda: lake.read_bytes(rel), lambda: lake.file_exists(rel)):
        with pytest.raises(UnsafeLake):
            call()
    assert not (tmp_path / "escape").exists()
    assert safe_relpath("models//experts/./x.pt") == "models/experts/x.pt"


def test_a_mapping_name_with_dotdot_writes_nothing_outside_the_lake(tmp_path: Path) -> None:
    from features.importers import import_source

    src = tmp_path / "src"
    src.mkdir()
    (src / "log.csv").write_text("who,what,when\n1,10,2026-03-01 10:00:00\n2,11,2026-03-01 11:00:00\n")
    mapping = tmp_path / "evil.toml"
    mapping.write_text(
        'name = "../../../pwned"\nwindow = "1d"\n[events]\nfiles = ["*.csv"]\n'
        '[fields]\nuser_id = "who"\nitem_id = "what"\nts = "when"\nts_format = "%Y-%m-%d %H:%M:%S"\n'
        'click = "1"\n[surface]\nconstant = "feed"\n'
    )
    lake_uri = str(tmp_path / "deep" / "er" / "lake")
    with pytest.raises(UnsafeLake, match="partition value"):
        import_source("custom", str(src), lake_uri, str(mapping), window="1d")
    escaped = [p for p in tmp_path.rglob("*pwned*")]
    assert escaped == [], f"written outside the lake: {escaped}"


# ---- checksummed Parquet -----------------------------------------------------------------------------


def test_parquet_pages_carry_checksums_and_a_flipped_bit_is_named(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    path = Path(lake.write("events", _events(20_000), ds=DS, surface="feed"))
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(meta.schema.names.index("p_click"))
    raw = bytearray(path.read_bytes())
    # a byte in the middle of p_click's first data page (after its page header): values, not structure
    raw[col.data_page_offset + 64] ^= 0x10
    path.write_bytes(bytes(raw))
    assert b"PAR1" == raw[:4]
    for read in (lambda: lake.read("events", ds=DS, surface="feed"),
                 lambda: lake.scan("events", ds=DS, surface="feed").collect()):
        with pytest.raises(CorruptFile) as err:
            read()
        msg = str(err.value)
        assert "'events'" in msg and "ds=2026-01-01/surface=feed" in msg and str(path) in msg, msg
        assert "\n" not in msg


def test_a_truncated_partition_fails_in_one_line_from_the_cli(lake_uri: str) -> None:
    from fmx.cli import cli

    lake = Lake(lake_uri)
    lake.update_meta(source="generator", window_days=1, origin=DS, surfaces=["feed"])
    path = Path(lake.write("events", _events(1000), ds=DS, surface="feed"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFile, match="truncated"):
        lake.read("events", ds=DS, surface="feed")
    out = CliRunner().invoke(cli, ["ingest", "--ds", DS, "--source", "lake", "--lake", lake_uri])
    assert out.exit_code == 1, out.output
    assert "corrupt or truncated" in out.output and str(path) in out.output, out.output
    assert "Traceback" not in out.output


# ---- concurrent writers ------------------------------------------------------------------------------


_WRITER = textwrap.dedent("""
    import sys, polars as pl
    from datetime import date
    from features.lake import Lake
    lake = Lake(sys.argv[1])
    n = int(sys.argv[2])
    for i in range(12):
        lake.write("users", pl.DataFrame({"user_id": list(range(n)), "segment": [0] * n, "region": [0] * n,
                                          "first_ds": [date(2026, 1, 1)] * n}), ds="2026-01-01")
        lake.write_bytes("models/x/state.json", b"%d" % n)
    print("done")
""")


def test_two_writers_of_one_partition_never_crash(lake_uri: str, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), lake_uri, str(n)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (3000, 5000)]
    outs = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0 and "done" in out, err[-3000:]
    lake = Lake(lake_uri)
    assert lake.read("users", ds="2026-01-01").num_rows in (3000, 5000)  # one writer's whole partition
    assert sorted(os.listdir(lake.partition_dir("users", ds="2026-01-01"))) == [DATA_FILE]
    assert not list(Path(lake_uri, LOCKS_DIR).rglob("*.lock"))  # every lease released


def test_only_dead_or_old_temporary_files_are_removed(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    lake.write("users", _users(), ds=DS)
    directory = Path(lake.partition_dir("users", ds=DS))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    live = directory / f"{TMP_PREFIX}{host}-{sleeper.pid}-aaaa"  # another writer, in flight
    gone = directory / f"{TMP_PREFIX}{host}-{dead.pid}-bbbb"  # a writer killed mid-write
    old = directory / f"{TMP_PREFIX}otherhost-123-cccc"  # another host's, hours old
    young = directory / f"{TMP_PREFIX}otherhost-123-dddd"  # another host's, just written
    for f in (live, gone, old, young):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    try:
        lake.write("users", _users(5), ds=DS)
        left = sorted(p.name for p in directory.iterdir())
        assert left == sorted([DATA_FILE, live.name, young.name]), left
        lake.write_bytes("models/m.pt", b"1")  # write_bytes cleans its folder the same way
        stray = Path(lake.path("models")) / f"{TMP_PREFIX}{host}-{dead.pid}-eeee"
        stray.write_bytes(b"partial")
        lake.write_bytes("models/m.pt", b"2")
        assert sorted(p.name for p in Path(lake.path("models")).iterdir()) == ["m.pt"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_live_lease_makes_a_second_writer_wait_then_fail_clearly(lake_uri: str, tmp_path: Path) -> None:
    lake = Lake(lake_uri)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from features.lake import Lake\n"
         "with Lake(sys.argv[1]).lease('users/ds=2026-01-01'):\n print('held', flush=True); time.sleep(60)", lake_uri],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LakeBusy, match=f"pid {holder.pid}"):
            with lake.lease("users/ds=2026-01-01", wait_s=0.3):
                pass
        holder.kill()  # the holder dies without releasing: its lease is taken over at once
        holder.wait()
        start = time.monotonic()
        lake.write("users", _users(), ds=DS)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()


def test_an_expired_lease_from_another_host_is_taken_over(lake_uri: str) -> None:
    lake = Lake(lake_uri)
    lock = Path(lake.path(LOCKS_DIR, "users/ds=2026-01-01.lock"))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "expires": time.time() + 60}))
    with pytest.raises(LakeBusy, match="'elsewhere'"):
        with lake.lease("users/ds=2026-01-01", wait_s=0.2):
            pass
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "expires": time.time() - 1}))
    lake.write("users", _users(), ds=DS)
    assert not lock.exists()
