"""Where checkpoints live, chosen by the path's scheme: a local folder, gs:// or s3://.

- Local paths and `gs://bucket/prefix`: Orbax reads and writes them directly (gs:// through
  TensorStore's native GCS driver; Orbax lists the steps through etils.epath, which needs `gcsfs`).
- `s3://bucket/prefix`: Orbax 0.12 builds its TensorStore specs with the `file` or `gcs` driver
  only, so a checkpoint is written to a local staging folder first (async, as usual) and, once
  complete, copied file by file through TensorStore's `s3` key-value driver; an `_UPLOADED` marker
  written last makes it visible. Restoring downloads one step into the staging folder. The
  endpoint, region and credentials come from the usual AWS environment (AWS_ENDPOINT_URL[_S3],
  AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from picotron_jax.errors import UserError

TMP_MARKER = ".orbax-checkpoint-tmp"
UPLOADED = "_UPLOADED"


def _digit_steps(names) -> list[int]:
    return sorted(int(n) for n in names if n.isdigit())


class CheckpointStore:
    """A local (or gs://) checkpoint folder that Orbax reads and writes in place."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("gs://"):
            from etils import epath

            self.local_root: Any = epath.Path(url)
        else:
            self.local_root = Path(url).expanduser().absolute()

    @property
    def is_local(self) -> bool:
        return isinstance(self.local_root, Path)

    def steps(self) -> list[int]:
        """Completed steps (Orbax's temporary folders have non-numeric names)."""
        if not self.local_root.exists():
            return []
        return _digit_steps(p.name for p in self.local_root.iterdir() if p.is_dir())

    def unfinished(self) -> list[str]:
        if not self.is_local or not self.local_root.exists():
            return []
        return sorted(str(p) for p in self.local_root.iterdir() if TMP_MARKER in p.name)

    def fetch(self, step: int) -> Any:
        """The step's folder, readable by Orbax."""
        return self.local_root / str(step)

    def publish(self, step: int, kept: list[int]) -> None:
        """Called once a save is complete (Orbax already pruned old steps here)."""

    def bytes_on_disk(self, step: int) -> int | None:
        if not self.is_local:
            return None
        folder = self.local_root / str(step)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else None

    def describe(self, step: int) -> str:
        return str(self.local_root / str(step))

    def set_aside(self, step: int) -> str | None:
        """Move an unusable step out of the way (`<step>.corrupt`, `.corrupt-2`, ...): it no longer counts as a
        step (nor toward `keep`) and the step is saved again when training reaches it. Local folders only."""
        folder = self.local_root / str(step)
        if not self.is_local or not folder.is_dir():
            return None
        target, n = folder.with_name(f"{step}.corrupt"), 1
        while target.exists():
            n += 1
            target = folder.with_name(f"{step}.corrupt-{n}")
        folder.rename(target)
        return str(target)


def s3_kvstore_spec(url: str) -> dict:
    """TensorStore `s3` kvstore spec for s3://bucket/prefix, endpoint and region from the AWS environment."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserError(f"checkpoint path {url!r}: an S3 path must look like s3://bucket/prefix")
    return {"driver": "s3", "bucket": bucket, "path": prefix.strip("/") + "/" if prefix else "", **aws_environment()}


def aws_environment() -> dict[str, str]:
    """The s3 kvstore's `endpoint` and `aws_region` from the AWS environment variables, where they are set."""
    spec = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


class S3Store(CheckpointStore):
    """s3://bucket/prefix through TensorStore's s3 driver, staged in a local folder."""

    def __init__(self, url: str, keep: int = 0, keep_every: int = 0, staging: Path | None = None):
        import jax
        import tensorstore as ts

        if jax.process_count() > 1:
            raise UserError(f"checkpoint path {url!r}: s3:// checkpoints are staged in a local folder, which works "
                            f"for single-process runs only; with {jax.process_count()} processes use gs:// or a "
                            f"file system all hosts share (an S3 bucket mounted with s3fs/mountpoint-s3 works)")
        self.url = url.rstrip("/")
        self.keep, self.keep_every = keep, keep_every
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "picotron_jax" / "s3-staging"
        self.local_root = (staging or cache / digest).absolute()
        self.local_root.mkdir(parents=True, exist_ok=True)
        try:
            self._kv = ts.KvStore.open(s3_kvstore_spec(self.url)).result()
        except ValueError as exc:
            raise UserError(f"checkpoint path {url!r}: cannot open it through TensorStore's s3 driver: {exc}") from None

    @property
    def is_local(self) -> bool:
        return True  # the staging folder

    def _keys(self, prefix: str = "") -> list[str]:
        import tensorstore as ts

        if prefix:
            rng = ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
            keys = self._kv.list(rng).result()
        else:
            keys = self._kv.list().result()
        return [k.decode() for k in keys]

    def steps(self) -> list[int]:
        try:
            keys = self._keys()
        except ValueError as exc:
            raise UserError(f"cannot list {self.url}: {exc}") from None
        return _digit_steps(k.split("/")[0] for k in keys if k.endswith("/" + UPLOADED))

    def publish(self, step: int, kept: list[int]) -> None:
        """Upload a complete step (its marker last), then delete remote steps the keep policy drops."""
        folder = self.local_root / str(step)
        writes = [self._kv.write(f"{step}/{f.relative_to(folder).as_posix()}", f.read_bytes())
                  for f in sorted(folder.rglob("*")) if f.is_file()]
        for w in writes:
            w.result()
        self._kv.write(f"{step}/{UPLOADED}", b"").result()
        remote = self.steps()
        for old in remote:
            if old not in retained(remote, self.keep, self.keep_every):
                self._delete_step(old)

    def _delete_step(self, step: int) -> None:
        import tensorstore as ts

        self._kv.delete_range(ts.KvStore.KeyRange(f"{step}/", f"{step}0")).result()  # "0" follows "/"

    def fetch(self, step: int) -> Path:
        """Download the step into the staging folder (a fresh copy: the remote one is the truth)."""
        folder = self.local_root / str(step)
        shutil.rmtree(folder, ignore_errors=True)
        tmp = self.local_root / f"{step}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        keys = [k for k in self._keys(f"{step}/") if k != f"{step}/{UPLOADED}"]
        reads = [(k, self._kv.read(k)) for k in keys]
        for key, read in reads:
            target = tmp / key[len(f"{step}/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read.result().value)
        tmp.rename(folder)
        return folder

    def bytes_on_disk(self, step: int) -> int | None:
        return super().bytes_on_disk(step)

    def describe(self, step: int) -> str:
        return f"{self.url}/{step}"


def retained(steps: list[int], keep: int, keep_every: int) -> set[int]:
    """The steps a keep policy keeps: the newest `keep` (0 = all) and multiples of `keep_every`."""
    newest = sorted(steps)[-keep:] if keep > 0 else list(steps)
    return set(newest) | {s for s in steps if keep_every > 0 and s % keep_every == 0}


def check_location(url: str) -> None:
    """UserError for a checkpoint location of an unsupported scheme (checked before anything is written)."""
    if "://" in url and not url.startswith(("gs://", "s3://")):
        scheme = url.split("://")[0]
        raise UserError(f"checkpoint path {url!r}: scheme {scheme}:// is not supported; use a local path, gs:// or "
                        f"s3:// (HDFS: mount it, e.g. with HDFS NFS Gateway or fuse-dfs, and give the mounted path)")


def open_store(url: str, keep: int = 0, keep_every: int = 0) -> CheckpointStore:
    check_location(url)
    if url.startswith("s3://"):
        return S3Store(url, keep, keep_every)
    return CheckpointStore(url)
