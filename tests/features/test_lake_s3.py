"""The lake on object storage: the same Lake API over s3:// against moto's S3 server (real HTTP, real
pyarrow S3FileSystem), so the scale-out path (Parquet on MinIO / S3) is exercised without a cloud."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date

import polars as pl
import pyarrow as pa
import pytest

from features.lake import DATA_FILE, Lake, PartitionNotFound, SchemaError
from fmx.servers import free_port

BUCKET = "fmx-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback with one bucket; yields its http endpoint."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **creds).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_lake(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Lake:
    # pyarrow's S3FileSystem reads credentials from the standard AWS environment variables.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FMX_LAKE_ENDPOINTS", s3_endpoint)  # the operator trusts this endpoint (features.lake)
    root = f"lake-{request.node.name}"
    return Lake(f"s3://{BUCKET}/{root}?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1")


def _users(ds: str, n: int = 5) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": list(range(n)),
            "segment": [i % 3 for i in range(n)],
            "region": [i % 2 for i in range(n)],
            "first_ds": [date(2026, 1, 1)] * n,
        }
    )


def test_s3_uri_gives_a_remote_filesystem(s3_lake: Lake) -> None:
    assert not s3_lake.is_local
    assert s3_lake.root.startswith(f"{BUCKET}/")  # query string (endpoint) is not part of object keys


def test_write_read_partitions_on_s3(s3_lake: Lake) -> None:
    for ds in ("2026-01-02", "2026-01-01"):
        path = s3_lake.write("users", _users(ds), ds=ds)
        assert path.endswith(f"users/ds={ds}/{DATA_FILE}")
    assert s3_lake.partitions("users") == [{"ds": "2026-01-01"}, {"ds": "2026-01-02"}]
    assert s3_lake.exists("users", ds="2026-01-01")
    got = s3_lake.read("users", ds="2026-01-01")
    assert got.schema.field("user_id").type == pa.int64()
    assert got.column("segment").to_pylist() == [0, 1, 2, 0, 1]
    scanned = s3_lake.scan_many("users", s3_lake.partitions("users")).collect()
    assert scanned.height == 10


def test_rewrite_replaces_partition_and_leaves_no_temp_file(s3_lake: Lake) -> None:
    s3_lake.write("users", _users("2026-01-01", n=5), ds="2026-01-01")
    s3_lake.write("users", _users("2026-01-01", n=3), ds="2026-01-01")
    assert s3_lake.read("users", ds="2026-01-01").num_rows == 3
    directory = s3_lake.partition_dir("users", ds="2026-01-01")
    import pyarrow.fs as pafs

    names = [i.base_name for i in s3_lake.fs.get_file_info(pafs.FileSelector(directory))]
    assert names == [DATA_FILE]


def test_vectors_round_trip_as_fixed_size_lists(s3_lake: Lake) -> None:
    frame = pl.DataFrame({"user_id": [1, 2], "fm_version": ["v1", "v1"], "vector": [[0.5, 1.0], [2.0, -1.0]]})
    s3_lake.write("user_embeddings", frame, fm="small", ds="2026-01-01")
    got = s3_lake.read("user_embeddings", fm="small", ds="2026-01-01")
    assert got.schema.field("vector").type == pa.list_(pa.float32(), 2)
    assert got.column("vector").to_pylist() == [[0.5, 1.0], [2.0, -1.0]]


def test_meta_update_merges_on_s3(s3_lake: Lake) -> None:
    assert s3_lake.meta() == {}
    s3_lake.update_meta(window_days=1, surfaces=["feed"])
    assert s3_lake.update_meta(source="generator") == {
        "window_days": 1,
        "surfaces": ["feed"],
        "source": "generator",
    }
    assert Lake(s3_lake.uri).meta()["source"] == "generator"  # a fresh handle sees the stored file


def test_errors_name_the_partition_on_s3(s3_lake: Lake) -> None:
    with pytest.raises(PartitionNotFound, match="ds=2030-01-01"):
        s3_lake.read("users", ds="2030-01-01")
    with pytest.raises(SchemaError, match="'segment' is missing"):
        s3_lake.write("users", _users("2026-01-01").drop("segment"), ds="2026-01-01")


def test_fmx_lake_env_points_the_default_lake_at_s3(s3_lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of a scaled-out deployment share one lake by setting FMX_LAKE (no per-task lake Param)."""
    s3_lake.write("users", _users("2026-01-01"), ds="2026-01-01")
    monkeypatch.setenv("FMX_LAKE", s3_lake.uri)
    default = Lake()
    assert default.uri == s3_lake.uri and not default.is_local
    assert default.partitions("users") == [{"ds": "2026-01-01"}]
