"""Where a token store lives: a local folder, s3://bucket/prefix or gs://bucket/prefix, one byte-level API.

Every location is opened as a TensorStore key-value store (`file`, `s3` or `gcs` driver), so writing
shards, the index and the ledger, and reading them back while training, are the same code whatever
the location. For s3:// the endpoint and region come from the usual AWS environment variables
(`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`), as for checkpoints, so a local S3-compatible server (moto,
MinIO) works in tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from picotron_jax.errors import UserError

REMOTE_SCHEMES = ("s3://", "gs://")


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def kvstore_spec(location: str) -> dict[str, Any]:
    """TensorStore kvstore spec of a local path, s3://bucket/prefix or gs://bucket/prefix (prefix ends in '/')."""
    for scheme, driver in (("s3://", "s3"), ("gs://", "gcs")):
        if location.startswith(scheme):
            bucket, _, prefix = location[len(scheme):].partition("/")
            if not bucket:
                raise UserError(f"data store {location!r}: a bucket path must look like {scheme}bucket/prefix")
            spec: dict[str, Any] = {"driver": driver, "bucket": bucket,
                                    "path": prefix.strip("/") + "/" if prefix.strip("/") else ""}
            if driver == "s3":
                from picotron_jax.checkpoint.storage import aws_environment

                spec.update(aws_environment())
            return spec
    if "://" in location and not location.startswith("file://"):
        raise UserError(f"data store {location!r}: unknown scheme; use a local folder, s3://bucket/prefix or "
                        f"gs://bucket/prefix")
    path = Path(location.removeprefix("file://")).expanduser().absolute()
    return {"driver": "file", "path": str(path) + "/"}


class KvLocation:
    """Read, write and list byte values under one store location (thread-safe; TensorStore is)."""

    def __init__(self, location: str, *, latency_s: float = 0.0, retries: int = 8):
        import tensorstore as ts

        self.location = location.rstrip("/") or location
        self.latency_s = float(latency_s)  # injected per read (benchmarks of a slow store)
        # bounded retries with backoff (TensorStore's default retries a dead endpoint for minutes)
        backoff = {"max_retries": int(retries), "initial_delay": "0.2s", "max_delay": "4s"}
        context = ts.Context({"s3_request_retries": backoff, "gcs_request_retries": backoff})
        try:
            self._kv = ts.KvStore.open(kvstore_spec(self.location), context=context).result()
        except ValueError as exc:
            raise UserError(f"data store {location!r}: cannot open it ({exc}); check the path and credentials") from None

    def read(self, key: str) -> bytes | None:
        """The value at `key`, or None when there is none. Unreachable store -> UserError."""
        if self.latency_s:
            time.sleep(self.latency_s)
        try:
            result = self._kv.read(key).result()
        except Exception as exc:  # TensorStore raises ValueError / OSError subclasses for network failures
            raise UserError(f"data store {self.location!r}: cannot read {key!r} ({_short(exc)}); check that the "
                            f"store is reachable (endpoint, network, credentials)") from None
        return bytes(result.value) if result.state == "value" else None

    def write(self, key: str, value: bytes) -> None:
        try:
            self._kv.write(key, value).result()
        except Exception as exc:
            raise UserError(f"data store {self.location!r}: cannot write {key!r} ({_short(exc)}); check that the "
                            f"location is writable and reachable") from None

    def delete(self, key: str) -> None:
        try:
            self._kv.write(key, None).result()  # writing None deletes the key
        except Exception as exc:
            raise UserError(f"data store {self.location!r}: cannot delete {key!r} ({_short(exc)})") from None

    def __repr__(self) -> str:
        return f"KvLocation({self.location!r})"


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
