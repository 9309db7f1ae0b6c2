"""URIs -> pyarrow filesystems: s3:// (and S3-compatible), gs://, local paths.

pyarrow.fs rather than fsspec: Ray Data takes pyarrow filesystems natively, its S3 and GCS
clients are C++ (multi-threaded, no GIL), it ships with pyarrow (already required), and it is
picklable, so the same object travels to every Ray task. Whole-object S3 reads are the exception:
obstore, one GET each where pyarrow sends a HEAD first (`pipeline.objectstore`). Credentials come only from the
standard AWS/GCP chains; this module hands them to the client and never prints or writes them.
"""

from __future__ import annotations

import copyreg
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, TypeVar

import pyarrow.fs as pafs

from pipeline.config import StorageConfig

log = logging.getLogger("imgpipe")
T = TypeVar("T")

# The errors that go away by themselves: connection refused or reset, 5xx, throttling, timeouts.
TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|Connection (refused|reset)|SLOW_DOWN|THROTTL|Throttl|SERVICE_UNAVAILABLE"
    r"|INTERNAL_FAILURE|REQUEST_TIME_?OUT|HTTP status (5\d\d|429)"
)


class StorageError(OSError):
    """A URI that cannot be used; the message names the URI and what to do."""


class Transient(OSError):
    """A failure that goes away by itself (no answer, 429, 5xx), its message the short reason: `retrying`
    retries it within the budget. pyarrow's errors are strings, matched by `TRANSIENT` instead."""


class StorageUnavailable(StorageError):
    """The store kept failing with transient errors past the retry budget: the job's problem, never
    one input's (callers that turn a read error into a reject must let this one through)."""


class StorageRefused(StorageUnavailable):
    """The store refused the caller (credentials, role, bucket policy): the job's problem too, so the
    job ends at the first refusal, in one line naming the URI, instead of rejecting every input."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI the user wrote."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        """A child location (`loc.join("train-000000.tar")`)."""
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    def uri_of(self, path: str) -> str:
        """The user-facing URI of a path inside this location's filesystem."""
        return _uri_for(self.uri, self.path, path)


def resolve(uri: str, cfg: StorageConfig | None = None) -> Location:
    """Parse a URI into a `Location`; local paths become absolute."""
    cfg = cfg or StorageConfig()
    if uri.startswith("s3://"):
        fs = _s3(_endpoint(cfg), _region(cfg), cfg.anonymous, cfg.max_attempts, cfg.retry_seconds)
        return Location(fs, uri[5:].rstrip("/"), uri.rstrip("/"))
    if uri.startswith(("gs://", "gcs://")):
        path = uri.split("://", 1)[1].rstrip("/")
        return Location(_gcs(cfg.anonymous), path, uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme; use s3://, gs://, file:// or a local path")
    path = str(Path(uri.removeprefix("file://")).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def is_local(loc: Location) -> bool:
    """True when the location is on this machine's disk."""
    return isinstance(loc.fs, pafs.LocalFileSystem)


def list_files(loc: Location, missing_ok: bool = False) -> list[pafs.FileInfo]:
    """Every file under a prefix, recursively, sorted by path; a missing or empty prefix is an
    error, or [] with `missing_ok`. Any other failure (access, endpoint) is always an error."""
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=missing_ok)
    infos = retrying(loc, lambda: loc.fs.get_file_info(selector))
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    if not files and not missing_ok:
        raise StorageError(f"{loc.uri}: no files under this prefix; check the path")
    return files


def read_bytes(loc: Location) -> bytes:
    """The whole object, as stored (no decompression by file extension)."""
    made = _MADE.get(id(loc.fs))
    if made:  # pyarrow asks S3 for an object's size (HEAD) before each GET: twice the requests, and the wait
        if any(part in ("", ".", "..") for part in loc.path.partition("/")[2].split("/")):
            # Legal in an S3 key, but neither obstore's paths nor pyarrow's can hold them.
            raise StorageError(f"{loc.uri}: a key with an empty, '.' or '..' segment cannot be read; rename it")
        from pipeline import objectstore  # obstore: imported by the processes that read from S3 only

        data = retrying(loc, partial(objectstore.get, loc, made))
        if data is not None:
            return data  # else a key obstore cannot name (a control character): pyarrow can
    return retrying(loc, partial(_read_stream, loc))


def _read_stream(loc: Location) -> bytes:
    """The whole object through pyarrow (a HEAD, then the GET, on S3)."""
    with loc.fs.open_input_stream(loc.path, compression=None) as f:
        return f.read()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write an object in one go (one PUT on S3, so readers never see half of it)."""

    def write() -> None:
        if is_local(loc):
            loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
            _write_local_atomic(loc.path, data)
        else:  # a retried PUT replaces the object whole; a failed one leaves nothing
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)

    retrying(loc, write)


def exists(loc: Location) -> bool:
    """True when an object (or a local file) is there."""
    return retrying(loc, lambda: loc.fs.get_file_info(loc.path)).type == pafs.FileType.File


def check_writable(loc: Location) -> None:
    """Fail early, before any work, when an output location cannot be written; creates nothing."""
    if is_local(loc):
        there = Path(loc.path)
        while not there.exists() and there != there.parent:  # the folder the output would be made in
            there = there.parent
        if not there.is_dir():
            raise StorageError(f"{loc.uri}: cannot be written: {there} is a file, not a folder")
        if not os.access(there, os.W_OK | os.X_OK):
            raise StorageError(
                f"{loc.uri}: cannot be written: this user may not write in {there}; choose another output"
            )
        return
    bucket = loc.path.split("/", 1)[0]
    info = retrying(loc, lambda: loc.fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{loc.uri}: bucket '{bucket}' does not exist; create it or fix the URI")


def retrying(loc: Location, call: Callable[[], T]) -> T:
    """`call()`, retried with backoff and a log line while it fails with a transient error, for up to
    the location's `storage.retry_seconds`; any other error, or the budget spent, is one `StorageError`."""
    budget = _RETRY_SECONDS.get(id(loc.fs), 0.0)
    deadline, delay, attempt = time.monotonic() + budget, 0.5, 1
    while True:
        try:
            return call()
        except StorageError:
            raise
        except OSError as exc:  # FileNotFoundError included
            if not (isinstance(exc, Transient) or TRANSIENT.search(str(exc))):
                raise explain(exc, loc.uri) from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"{loc.uri}: cannot reach the storage endpoint ({_reason(exc)}), still failing after "
                    f"{budget:.0f} s of retries; check that the store is up and AWS_ENDPOINT_URL / "
                    "storage.endpoint_url, or allow longer outages with storage.retry_seconds"
                ) from None
            wait = min(delay, left)
            log.warning("%s: transient storage error (%s); retry %d in %.1f s", loc.uri, _reason(exc), attempt, wait)
            time.sleep(wait)
            delay, attempt = min(delay * 2, 10.0), attempt + 1


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, Transient):
        return text
    found = re.search(r"Could not connect to server|Connection reset by peer|Recv failure[^;\n]*|HTTP status \d+", text)
    found = found or TRANSIENT.search(text)
    return found.group(0) if found else type(exc).__name__


def explain(exc: BaseException, uri: str) -> StorageError:
    """Rewrite a filesystem error into one line that names the URI and the fix."""
    text = str(exc)
    bucket = re.search(r"bucket '([^']+)'", text)
    if "NO_SUCH_BUCKET" in text:
        return missing_bucket(uri, bucket.group(1) if bucket else uri)
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "Forbidden")):
        return refused(uri)
    if isinstance(exc, FileNotFoundError) or "does not exist" in text or "NotFound" in text:
        return missing_object(uri)
    if "NETWORK_CONNECTION" in text or "Connection refused" in text or "curlCode" in text:
        return StorageError(f"{uri}: cannot reach the storage endpoint; check AWS_ENDPOINT_URL / storage.endpoint_url")
    first = text.splitlines()[0] if text else type(exc).__name__
    return StorageError(f"{uri}: {first}")


def missing_bucket(uri: str, bucket: str) -> StorageError:
    return StorageError(f"{uri}: bucket '{bucket}' does not exist; check the bucket name and the endpoint")


def missing_object(uri: str) -> StorageError:
    return StorageError(f"{uri}: no such file or prefix; check the path")


def refused(uri: str) -> StorageRefused:
    return StorageRefused(
        f"{uri}: access refused; check the credentials of the standard AWS chain "
        "(AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, instance role) and the bucket policy"
    )


def _endpoint(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: StorageConfig) -> str:
    return cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@lru_cache(maxsize=None)
def _s3(
    endpoint: str | None, region: str, anonymous: bool, max_attempts: int = 5, retry_seconds: float = 60.0
) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "anonymous": anonymous,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    }
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
        # S3-compatible stores (MinIO, Ceph, moto) serve path-style requests on one host.
        kwargs["force_virtual_addressing"] = False
    fs = pafs.S3FileSystem(**kwargs)
    _MADE[id(fs)] = (endpoint, region, anonymous, max_attempts, retry_seconds)
    _RETRY_SECONDS[id(fs)] = retry_seconds
    return fs


# pyarrow pickles an S3FileSystem without its retry strategy, so the copy a Ray task gets would retry
# three times only. One of ours pickles as the call that made it (cached: one object per process).
_MADE: dict[int, tuple] = {}
_RETRY_SECONDS: dict[int, float] = {}


def _reduce_s3(fs: pafs.S3FileSystem):
    made = _MADE.get(id(fs))
    return (_s3, made) if made else fs.__reduce__()


copyreg.pickle(pafs.S3FileSystem, _reduce_s3)


@lru_cache(maxsize=None)
def _gcs(anonymous: bool) -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem(anonymous=anonymous)


def _uri_for(base_uri: str, base_path: str, path: str) -> str:
    if not path.startswith(base_path):
        return path
    return base_uri + path[len(base_path) :]


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
