"""Storage over real HTTP (moto's S3 server) and local disk; errors name the URI and the fix."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from images import prepare_without_ray, upload_tree, write_imagefolder
from processes import Proxy, free_port, wait_for_port

from pipeline import objectstore, parts, storage
from pipeline.config import StorageConfig
from pipeline.storage import StorageRefused as Refused
from pipeline.storage import Transient

ROOT = Path(__file__).parent.parent


def test_s3_round_trip_and_listing(s3, bucket):
    loc = storage.resolve(f"s3://{bucket}/data/")
    assert loc.path == f"{bucket}/data" and loc.uri == f"s3://{bucket}/data"
    storage.write_bytes(loc.join("a", "x.bin"), b"hello")
    storage.write_bytes(loc.join("b.bin"), b"")
    files = storage.list_files(loc)
    assert [(loc.uri_of(f.path), f.size) for f in files] == [
        (f"s3://{bucket}/data/a/x.bin", 5),
        (f"s3://{bucket}/data/b.bin", 0),
    ]
    assert storage.read_bytes(loc.join("a", "x.bin")) == b"hello"
    assert s3.get_object(Bucket=bucket, Key="data/a/x.bin")["Body"].read() == b"hello"
    assert storage.exists(loc.join("b.bin")) and not storage.exists(loc.join("nope"))


def test_keys_obstore_and_pyarrow_cannot_name_are_a_clear_error(s3, bucket):
    """S3 keys may hold empty, "." and ".." segments, which obstore and pyarrow cannot name: one line naming the
    object (a reject in a batch job), not obstore's or pyarrow's ValueError."""
    for key in ("odd//double.jpg", "odd/./dot.jpg", "odd/../dots.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        with pytest.raises(storage.StorageError, match=rf"^s3://{bucket}/{re.escape(key)}: a key with an empty"):
            storage.read_bytes(storage.resolve(f"s3://{bucket}/{key}"))


def test_a_key_with_a_control_character_is_read(s3, bucket):
    """obstore's paths cannot hold a control character; pyarrow's can, so such a key is read through it."""
    s3.put_object(Bucket=bucket, Key="odd/tab\there.jpg", Body=b"tab")
    assert storage.read_bytes(storage.resolve(f"s3://{bucket}/odd/tab\there.jpg")) == b"tab"


def test_an_endpoint_without_a_scheme_and_a_missing_profile_are_one_line_errors(s3, bucket, monkeypatch):
    """No scheme means https (as pyarrow reads it): against the plain-HTTP server that is a connection error,
    not a panic in obstore's Rust. A profile that is not there is a refusal, not botocore's traceback."""
    port = s3.meta.endpoint_url.rsplit(":", 1)[1]
    cfg = StorageConfig(endpoint_url=f"127.0.0.1:{port}", retry_seconds=0, max_attempts=1)
    with pytest.raises(storage.StorageUnavailable, match=rf"^s3://{bucket}/k: cannot reach the storage endpoint"):
        storage.read_bytes(storage.resolve(f"s3://{bucket}/k", cfg))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    objectstore.store.cache_clear()
    try:
        with pytest.raises(storage.StorageRefused, match=rf"^s3://{bucket}/k: access refused; check the credentials"):
            storage.read_bytes(storage.resolve(f"s3://{bucket}/k", StorageConfig(retry_seconds=0)))
    finally:
        objectstore.store.cache_clear()


def test_obstore_errors_are_sorted_transient_refused_or_named():
    """pyarrow's errors are strings matched by `TRANSIENT`; obstore's are sorted by `objectstore.answered`,
    with the status read from the first line (a key quoted in the text does not count)."""
    assert storage.TRANSIENT.search("HTTP status 429: SlowDown") and storage.TRANSIENT.search("HTTP status 503: x")
    assert not storage.TRANSIENT.search("HTTP status 400: ExpiredToken")
    uri = "s3://b/k"

    def said(status: str, key: str = "k", body: str = "<Error>...</Error>") -> OSError:
        text = f"Generic S3 error: Error performing GET http://h/b/{key} in 1s - Server returned non-2xx status code: "
        return objectstore.answered(uri, f"{text}{status}: {body}\n\nDebug source: ... for path {key}")

    for status, kind in (("429 Too Many", Transient), ("503 Unavailable", Transient), ("403 Forbidden", Refused)):
        assert type(said(status)) is kind, status
    assert type(said("400 Bad Request", body="<Error>\n<Code>ExpiredToken</Code>\n</Error>")) is Refused
    other = said("400 Bad Request", key="ExpiredToken-status 503.jpg")
    assert type(other) is storage.StorageError and str(other).startswith("s3://b/k: HTTP status 400: ")
    refused = objectstore.answered(uri, "Generic S3 error: error sending request: Connection refused (os error 111)")
    assert type(refused) is Transient and str(refused) == "Connection refused"
    region = objectstore.answered(uri, "Generic S3 error: Received redirect without LOCATION, this normally ...")
    assert str(region) == "s3://b/k: the store redirected the request; check storage.region / AWS_REGION"
    with pytest.raises(storage.StorageError, match=r"^storage endpoint 'http://h:99999': Port out of range"):
        objectstore.store("b", "http://h:99999", "us-east-1", False, 1)


def test_gzip_objects_are_not_decompressed(tmp_path):
    import gzip

    (tmp_path / "f.gz").write_bytes(gzip.compress(b"abc"))
    assert storage.read_bytes(storage.resolve(str(tmp_path / "f.gz"))) == gzip.compress(b"abc")


def test_missing_bucket_and_prefix(s3, bucket):
    with pytest.raises(
        storage.StorageError, match=r"^s3://no-such-bucket-x/p: bucket 'no-such-bucket-x' does not exist"
    ):
        storage.list_files(storage.resolve("s3://no-such-bucket-x/p"))
    with pytest.raises(storage.StorageError, match=rf"^s3://{bucket}/missing: no such file or prefix"):
        storage.list_files(storage.resolve(f"s3://{bucket}/missing"))
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_writable(storage.resolve("s3://no-such-bucket-x/out"))
    with pytest.raises(storage.StorageError, match=rf"s3://{bucket}/nokey: no such file"):
        storage.read_bytes(storage.resolve(f"s3://{bucket}/nokey"))
    with pytest.raises(storage.StorageError, match=r"^s3://no-such-bucket-x/k: bucket 'no-such-bucket-x' does not"):
        storage.read_bytes(storage.resolve("s3://no-such-bucket-x/k"))


def test_local_errors(tmp_path):
    with pytest.raises(storage.StorageError, match="no such file or prefix"):
        storage.list_files(storage.resolve(str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.StorageError, match="no files under this prefix"):
        storage.list_files(storage.resolve(str(tmp_path / "empty")))
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.resolve("ftp://host/x")


def test_explicit_endpoint_and_region_from_config_win_over_the_environment(s3_endpoint, s3, bucket, monkeypatch):
    """The environment points elsewhere (a closed port, another region): only the settings can make
    the read work and set the region, so a setting that is ignored fails here."""
    s3.put_object(Bucket=bucket, Key="k/obj", Body=b"1")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    cfg = StorageConfig(endpoint_url=s3_endpoint, region="eu-west-3", retry_seconds=0)
    loc = storage.resolve(f"s3://{bucket}/k/obj", cfg)
    assert storage.read_bytes(loc) == b"1" and loc.fs.region == "eu-west-3"
    ignored = storage.resolve(f"s3://{bucket}/k/obj", StorageConfig(retry_seconds=0))  # the environment's
    assert ignored.fs.region == "ap-south-1"
    with pytest.raises(storage.StorageError, match="cannot reach the storage endpoint"):
        storage.read_bytes(ignored)
    monkeypatch.delenv("AWS_REGION")
    assert storage.resolve(f"s3://{bucket}/k", StorageConfig(endpoint_url=s3_endpoint)).fs.region == "us-east-1"


@contextlib.contextmanager
def checking_moto(unchecked_calls: int):
    """A second moto S3 server, in its own process, that checks credentials (and IAM policies) after
    its first `unchecked_calls` requests; yields its port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(unchecked_calls)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, "moto server")
        yield port
    finally:
        server.terminate()
        server.wait(10)


def test_refused_credentials_are_named_not_printed(tmp_path):
    """A second S3 server that checks credentials: a wrong key is refused, and the message
    points at the AWS chain without echoing the secret."""
    with checking_moto(0) as port:
        script = (
            "import os\n"
            "os.environ.update(AWS_ACCESS_KEY_ID='AKIAWRONG', AWS_SECRET_ACCESS_KEY='s3cr3t-value')\n"
            "from pipeline import storage\n"
            "from pipeline.config import StorageConfig\n"
            f"cfg = StorageConfig(endpoint_url='http://127.0.0.1:{port}')\n"
            "calls = ((storage.list_files, 's3://some-bucket/raw'), (storage.read_bytes, 's3://some-bucket/k'))\n"
            "for call, uri in calls:\n"
            "    try:\n"
            "        call(storage.resolve(uri, cfg))\n"
            "    except storage.StorageRefused as exc:\n"
            "        print(exc)\n"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    listing, read = out.splitlines()
    assert listing.startswith("s3://some-bucket/raw: access refused; check the credentials of the standard AWS chain")
    assert read.startswith("s3://some-bucket/k: access refused; check the credentials of the standard AWS chain")
    assert "s3cr3t-value" not in out


def _job_through(proxy: Proxy, ray_address: str, job: str, *settings: str) -> subprocess.Popen:
    """`imgpipe <job> --set ...` joining the session's Ray, its S3 traffic (the driver's and, through the
    runtime env the job sends, its workers') through the proxy."""
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "TQDM_DISABLE": "1"}
    env["RAY_ADDRESS"] = ray_address
    cmd = [sys.executable, "-m", f"jobs.{job}", "--set=storage.max_attempts=2", *(f"--set={s}" for s in settings)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _prepare_through(proxy: Proxy, ray_address: str, bucket: str, *settings: str) -> subprocess.Popen:
    """`imgpipe prepare` of s3://bucket/raw into s3://bucket/out, through the proxy."""
    return _job_through(
        proxy,
        ray_address,
        "prepare",
        f"prepare.source=s3://{bucket}/raw",
        f"prepare.output=s3://{bucket}/out",
        "prepare.shard_max_samples=3",
        *settings,
    )


def _when_first_shard_lands(
    s3, bucket: str, job: subprocess.Popen, suffix: str = ".tar", unfinished: str = "out/manifest.json"
) -> None:
    """Wait, looking at the server directly (not through the proxy), until the job has written a shard
    (or a part: `suffix`) under out/, while the file that marks a finished run (`unfinished`) is not there."""
    deadline = time.time() + 120

    def shards() -> list:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
        return [o for o in listing if o["Key"].endswith(suffix)]

    while not shards():
        assert job.poll() is None and time.time() < deadline, "the job ended before writing a shard"
        time.sleep(0.1)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=unfinished)  # mid-run


def _fails_in_one_line_while_down(proxy: Proxy, job: subprocess.Popen, name: str, bucket: str) -> str:
    """Take the store away until the job ends: it must fail in one line that names the URI and the budget.
    Returns its stderr."""
    proxy.down()
    try:
        _, err = job.communicate(timeout=240)
    finally:
        proxy.up()
    # Ray's own log lines (worker warnings) may follow; the job says what went wrong in one line.
    (line,) = [line for line in err.splitlines() if line.startswith("imgpipe ")]
    assert job.returncode == 1 and "Traceback" not in err
    assert re.fullmatch(
        rf"imgpipe {name}: s3://{bucket}/\S+: cannot reach the storage endpoint \(.+\), still "
        r"failing after 3 s of retries; check that the store is up .+storage\.retry_seconds",
        line,
    ), line
    return err


def _completes_through_an_outage(proxy: Proxy, job: subprocess.Popen, seconds: float) -> str:
    """Take the store away until the job has met the outage (a retry logged), then `seconds` more, then bring it
    back: the job must retry, say so, and succeed; returns its stdout."""
    lines: dict[str, list[str]] = {"out": [], "err": []}
    readers = [
        threading.Thread(target=lambda pipe=pipe, got=got: got.extend(pipe), daemon=True)
        for pipe, got in ((job.stdout, lines["out"]), (job.stderr, lines["err"]))
    ]
    for reader in readers:
        reader.start()
    proxy.down()
    deadline = time.time() + 60
    while not any("transient storage error (" in line for line in lines["err"]) and job.poll() is None:
        assert time.time() < deadline, "the job never met the outage"
        time.sleep(0.1)
    time.sleep(seconds)
    proxy.up()
    job.wait(240)
    for reader in readers:
        reader.join(10)
    err = "".join(lines["err"])
    assert job.returncode == 0, err[-3000:]
    assert "transient storage error (" in err and "; retry 1 in 0.5 s" in err  # retried, and said so
    return "".join(lines["out"])


@pytest.mark.timeout(300)
def test_a_store_failing_for_seconds_mid_job_loses_and_duplicates_nothing(
    s3, s3_endpoint, ray_address, bucket, tmp_path
):
    write_imagefolder(tmp_path / "raw", {"a": 12, "b": 12}, size=(32, 32))
    upload_tree(s3, bucket, tmp_path / "raw", "raw")
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    job = _prepare_through(proxy, ray_address, bucket)
    _when_first_shard_lands(s3, bucket, job)
    out = _completes_through_an_outage(proxy, job, 3)
    assert "inputs 24 = samples 24 + rejected 0" in out
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    keys = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = s3.get_object(Bucket=bucket, Key=f"out/{shard['path']}")["Body"].read()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(keys) == len(set(keys)) == 24


@pytest.mark.timeout(300)
def test_a_store_down_past_the_retry_budget_fails_in_one_line_and_claims_nothing(
    s3, s3_endpoint, ray_address, bucket, tmp_path
):
    write_imagefolder(tmp_path / "raw", {"a": 12, "b": 12}, size=(32, 32))
    upload_tree(s3, bucket, tmp_path / "raw", "raw")
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    job = _prepare_through(proxy, ray_address, bucket, "storage.retry_seconds=3")
    _when_first_shard_lands(s3, bucket, job)
    _fails_in_one_line_while_down(proxy, job, "prepare", bucket)
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert "out/manifest.json" not in names and "out/classes.json" not in names


def _features_through(proxy: Proxy, ray_address: str, bucket: str, *settings: str) -> subprocess.Popen:
    """`imgpipe features` of s3://bucket/prepared into s3://bucket/out, through the proxy."""
    return _job_through(
        proxy,
        ray_address,
        "features",
        f"features.source=s3://{bucket}/prepared",
        f"features.output=s3://{bucket}/out",
        "features.batch_size=4",
        "features.decode_batch=4",
        *settings,
    )


def _prepared_in(bucket: str, tmp_path: Path) -> dict:
    """24 small JPEGs prepared straight into s3://bucket/prepared (not through the proxy): 9 shards."""
    write_imagefolder(tmp_path / "raw", {"a": 12, "b": 12}, size=(32, 32))
    return prepare_without_ray(str(tmp_path / "raw"), f"s3://{bucket}/prepared", 3)


def _whole_parts(s3, bucket: str, manifest: dict) -> dict[str, list[str]]:
    """Every part the output holds, read from the server: each a whole Parquet file holding its shard's samples."""
    counts = {
        f"{s['path'].split('-')[0]}/part-{s['path'].split('-')[1][:-4]}.parquet": s["samples"]
        for split in manifest["splits"].values()
        for s in split["shards"]
    }
    keys = {}
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", []):
        if obj["Key"].endswith(".parquet"):
            data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            table = pq.read_table(io.BytesIO(data), columns=["key"])
            name = obj["Key"].removeprefix("out/")
            assert table.num_rows == counts[name], name
            keys[name] = table.column("key").to_pylist()
    return keys


@pytest.mark.timeout(300)
def test_features_through_a_store_failing_for_seconds_completes_exactly_once(
    s3, s3_endpoint, ray_address, bucket, tmp_path
):
    manifest = _prepared_in(bucket, tmp_path)
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    job = _features_through(proxy, ray_address, bucket)
    _when_first_shard_lands(s3, bucket, job, ".parquet", "out/errors.jsonl")
    out = _completes_through_an_outage(proxy, job, 3)
    assert "inputs 24 = embedded 24 + rejected 0; 9 parts written this run" in out
    keys = _whole_parts(s3, bucket, manifest)
    assert len(keys) == sum(len(split["shards"]) for split in manifest["splits"].values()) == 9
    every = [k for part in keys.values() for k in part]
    assert len(every) == len(set(every)) == 24
    run = json.loads(s3.get_object(Bucket=bucket, Key="out/features.json")["Body"].read())
    assert run["complete"] is True and (run["inputs"], run["rows"], run["written"]) == (24, 24, 9)


@pytest.mark.timeout(300)
def test_features_with_the_store_down_past_the_budget_fails_in_one_line_and_claims_nothing(
    s3, s3_endpoint, ray_address, bucket, tmp_path
):
    manifest = _prepared_in(bucket, tmp_path)
    proxy = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    job = _features_through(proxy, ray_address, bucket, "storage.retry_seconds=3")
    _when_first_shard_lands(s3, bucket, job, ".parquet", "out/errors.jsonl")
    err = _fails_in_one_line_while_down(proxy, job, "features", bucket)
    # No part starts after one has failed: those that met the outage are at most the ones then being written.
    met = set(re.findall(r"out/(\S+\.parquet): transient storage error", err))
    assert 1 <= len(met) <= parts.PartSink.writers, sorted(met)
    keys = _whole_parts(s3, bucket, manifest)  # the parts written before the outage, each whole
    assert 1 <= len(keys) < 9
    run = json.loads(s3.get_object(Bucket=bucket, Key="out/features.json")["Body"].read())
    assert run["complete"] is False and "rows" not in run
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert "out/errors.jsonl" not in names


LIST_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::locked"]}],
}


@pytest.mark.timeout(300)
def test_a_store_that_lists_but_refuses_reads_fails_the_job_in_one_line(tmp_path):
    """A role with s3:ListBucket but not s3:GetObject (moto with IAM checks on): the job ends at the
    first refused read, in one line naming the object, and writes no shard, part or manifest; a
    refusal is the job's error, never 12 rejects."""
    import boto3

    write_imagefolder(tmp_path / "raw", {"a": 6, "b": 6}, size=(16, 16))
    files = sorted(p for p in (tmp_path / "raw").rglob("*.jpg"))
    setup_calls = 1 + len(files) + 4  # bucket, objects, output bucket, user, policy, key: unauthenticated
    with checking_moto(setup_calls) as port:
        endpoint = f"http://127.0.0.1:{port}"
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="a")
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket="locked")
        for path in files:
            s3.put_object(Bucket="locked", Key=f"raw/{path.relative_to(tmp_path / 'raw').as_posix()}", Body=b"x")
        s3.create_bucket(Bucket="out")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="lister")
        iam.put_user_policy(UserName="lister", PolicyName="list", PolicyDocument=json.dumps(LIST_ONLY))
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        job_env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "RAY_AUTH_MODE": "disabled",
        }
        cmd = [
            sys.executable,
            "-m",
            "jobs.prepare",
            "--set",
            "prepare.source=s3://locked/raw",
            "--set",
            f"prepare.output={tmp_path / 'prepared'}",
            "--set",
            "storage.retry_seconds=0",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=job_env, cwd=ROOT)
        embed = [*cmd[:2], "jobs.features", "--set", "features.source=s3://locked/raw", "--set"]
        embed += [f"features.output={tmp_path / 'features'}", "--set", "storage.retry_seconds=0"]
        features = subprocess.run(embed, capture_output=True, text=True, timeout=240, env=job_env, cwd=ROOT)
    for job, run in (("prepare", done), ("features", features)):
        assert run.returncode == 1, run.stderr[-3000:]
        assert re.fullmatch(
            rf"imgpipe {job}: s3://locked/raw/\S+: access refused; check the credentials .*",
            run.stderr.strip().splitlines()[-1],
        ), run.stderr[-3000:]
    prepared = tmp_path / "prepared"
    assert not list(prepared.glob("*.tar")) and not (prepared / "manifest.json").exists()
    assert not list((tmp_path / "features").rglob("*.parquet"))
