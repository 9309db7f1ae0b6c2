"""Storage over real HTTP (moto's S3 server) and local disk; errors name the URI and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import storage
from pipeline.config import StorageConfig
from processes import free_port, wait_for_port


def test_s3_round_trip_and_listing(s3, bucket):
    loc = storage.resolve(f"s3://{bucket}/data/")
    assert loc.path == f"{bucket}/data" and loc.uri == f"s3://{bucket}/data"
    storage.write_bytes(loc.join("a", "x.bin"), b"hello")
    storage.write_bytes(loc.join("b.bin"), b"")
    files = storage.list_files(loc)
    assert [(loc.uri_of(f.path), f.size) for f in files] == [(f"s3://{bucket}/data/a/x.bin", 5), (f"s3://{bucket}/data/b.bin", 0)]
    assert storage.read_bytes(loc.join("a", "x.bin")) == b"hello"
    assert s3.get_object(Bucket=bucket, Key="data/a/x.bin")["Body"].read() == b"hello"
    assert storage.exists(loc.join("b.bin")) and not storage.exists(loc.join("nope"))


def test_gzip_objects_are_not_decompressed(tmp_path):
    import gzip

    (tmp_path / "f.gz").write_bytes(gzip.compress(b"abc"))
    assert storage.read_bytes(storage.resolve(str(tmp_path / "f.gz"))) == gzip.compress(b"abc")


def test_missing_bucket_and_prefix(s3, bucket):
    with pytest.raises(storage.StorageError, match=r"^s3://no-such-bucket-x/p: bucket 'no-such-bucket-x' does not exist"):
        storage.list_files(storage.resolve("s3://no-such-bucket-x/p"))
    with pytest.raises(storage.StorageError, match=rf"^s3://{bucket}/missing: no such file or prefix"):
        storage.list_files(storage.resolve(f"s3://{bucket}/missing"))
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_writable(storage.resolve("s3://no-such-bucket-x/out"))
    with pytest.raises(storage.StorageError, match=rf"s3://{bucket}/nokey: no such file"):
        storage.read_bytes(storage.resolve(f"s3://{bucket}/nokey"))


def test_local_errors(tmp_path):
    with pytest.raises(storage.StorageError, match="no such file or prefix"):
        storage.list_files(storage.resolve(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.StorageError, match="no files under this prefix"):
        storage.list_files(storage.resolve(str(tmp_path / "empty")))
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.resolve("ftp://host/x")


def test_explicit_endpoint_from_config(s3_endpoint, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k/obj", Body=b"1")
    cfg = StorageConfig(endpoint_url=s3_endpoint, region="us-east-1")
    assert storage.read_bytes(storage.resolve(f"s3://{bucket}/k/obj", cfg)) == b"1"


def test_refused_credentials_are_named_not_printed(tmp_path):
    """A second S3 server that checks credentials: a wrong key is refused, and the message
    points at the AWS chain without echoing the secret."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, "moto server")
        script = (
            "import os\n"
            "os.environ.update(AWS_ACCESS_KEY_ID='AKIAWRONG', AWS_SECRET_ACCESS_KEY='s3cr3t-value')\n"
            "from pipeline import storage\n"
            "from pipeline.config import StorageConfig\n"
            f"cfg = StorageConfig(endpoint_url='http://127.0.0.1:{port}')\n"
            "try:\n"
            "    storage.list_files(storage.resolve('s3://some-bucket/raw', cfg))\n"
            "except storage.StorageError as exc:\n"
            "    print(exc)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    finally:
        server.terminate()
        server.wait(10)
    assert out.startswith("s3://some-bucket/raw: access refused; check the credentials of the standard AWS chain")
    assert "s3cr3t-value" not in out
