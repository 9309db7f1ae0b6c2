"""Whole-object S3 reads through obstore: one GET each, where pyarrow's client sends a HEAD first (twice the
requests, the round trips and the bill). obstore is Rust: no GIL held while it waits, and less CPU per
request than pyarrow's client. Listings, writes and GCS stay on pyarrow (`pipeline.storage`).

obstore's errors are typed; `get` sorts them once into the errors `storage.retrying` acts on: `Transient`
(retried within the budget), `StorageRefused`, and `StorageError` for a missing bucket or object, a wrong
region or endpoint, or any other status, named.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import lru_cache
from urllib.parse import urlsplit

from pipeline.storage import Location, StorageError, Transient, missing_bucket, missing_object, refused


@lru_cache(maxsize=None)
def store(bucket: str, endpoint: str | None, region: str, anonymous: bool, max_attempts: int):
    """An obstore `S3Store` for one bucket of the store that `storage._s3` makes, with its settings (one per
    process). Credentials: the standard AWS chain, as pyarrow's (environment keys, else boto3's chain: profile,
    SSO, instance role, refreshed as they expire); none found or `anonymous`, requests go unsigned, as pyarrow's
    do. A profile that is not there is a `PermissionError`."""
    from obstore.store import S3Store

    # A stalled connection fails after a minute without a byte; a large shard may take as long as it needs
    # (obstore's default ends any request after 30 s, body included: a 1 GB shard on a slow link).
    client = {"read_timeout": "60s", "timeout": "1h", "allow_http": bool(endpoint and endpoint.startswith("http://"))}
    kwargs: dict = {"region": region, "retry_config": {"max_retries": max_attempts - 1}, "client_options": client}
    if endpoint:  # as `_s3`: no scheme is https (obstore would panic on the first request)
        kwargs["endpoint"] = endpoint if "://" in endpoint else f"https://{endpoint}"
        try:  # obstore panics (an exception no `except Exception` catches) on a port or host it cannot parse
            _ = urlsplit(kwargs["endpoint"]).port
        except ValueError as exc:
            raise StorageError(
                f"storage endpoint {endpoint!r}: {exc}; check AWS_ENDPOINT_URL / storage.endpoint_url"
            ) from None
    if anonymous:
        kwargs["skip_signature"] = True
    elif not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        # Keys in the environment obstore reads itself; any other source (profile, SSO, role) through boto3,
        # imported only then (a quarter of a second in every Ray worker that reads).
        import boto3
        import botocore.exceptions
        from obstore.auth.boto3 import Boto3CredentialProvider

        try:
            session = boto3.session.Session()
            found = session.get_credentials()
        except botocore.exceptions.BotoCoreError as exc:  # a profile that is not there, say
            raise PermissionError(f"AWS credentials: {exc}") from None
        if found is None:
            kwargs["skip_signature"] = True
        else:  # botocore hands out credentials with >= 10 min left: kept longer, an expiring role's would lapse
            kwargs["credential_provider"] = Boto3CredentialProvider(session, ttl=timedelta(minutes=10))
    return S3Store(bucket, **kwargs)


def get(loc: Location, made: tuple) -> bytes | None:
    """The object at `loc` in one GET, with `made` the settings `storage._s3` made its filesystem with; None
    for a key obstore's paths cannot hold (a control character), which pyarrow's can: read it there."""
    import obstore
    from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError

    bucket, _, key = loc.path.partition("/")
    try:
        return bytes(obstore.get(store(bucket, *made[:4]), key).bytes())
    except ValueError:  # raised before any request: a key obstore's paths cannot parse
        return None
    except (FileNotFoundError, NotFoundError) as exc:  # obstore raises the builtin one for a 404
        raise missing_bucket(loc.uri, bucket) if "NoSuchBucket" in str(exc) else missing_object(loc.uri) from None
    except (PermissionError, PermissionDeniedError, UnauthenticatedError):
        raise refused(loc.uri) from None
    except BaseError as exc:  # a status the store answered (after obstore's retries), or no answer at all
        raise answered(loc.uri, str(exc) or type(exc).__name__) from None


def answered(uri: str, text: str) -> OSError:
    """The error for obstore's `text` about `uri`: a refusal (401, 403, an expired token), a transient failure
    (429, 5xx, or no HTTP status: the store did not answer), a wrong region or endpoint, or any other status,
    named. The status is read from the first line, before the body, and the token's expiry from S3's XML
    error code: a key (quoted in the text) that reads "status 200" or "ExpiredToken" changes nothing."""
    first = text.splitlines()[0]
    status = re.search(r"non-2xx status code: (\d{3})", first)
    if "<Code>ExpiredToken</Code>" in text or (status and status.group(1) in ("401", "403")):
        return refused(uri)
    if status is None and "redirect" in first:  # S3 redirects a request sent to another region's endpoint
        return StorageError(f"{uri}: the store redirected the request; check storage.region / AWS_REGION")
    if status is None and "builder error" in text:  # an endpoint obstore cannot build a request for
        return StorageError(f"{uri}: the endpoint is not a usable URL; check AWS_ENDPOINT_URL / storage.endpoint_url")
    if status is None:  # no answer: the connection was refused, reset or timed out
        reason = re.search(r"[Cc]onnection (?:refused|reset|closed)|timed out|dns error", text)
        return Transient(reason.group(0) if reason else "no answer")
    code = int(status.group(1))
    if code == 429 or code >= 500:
        return Transient(f"HTTP status {code}")
    return StorageError(f"{uri}: HTTP status {code}: {first}")
