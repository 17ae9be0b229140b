"""Start-up agreement: every process of a run must have the same config, code and package versions.

Before the first collective (the train state's initialisation), each process publishes its
flattened config, a hash of the picotron_jax sources and the versions of the packages that shape
the program through the coordination service; every process compares them with process 0's and
refuses to start (UserError, exit code 2) naming the first differing field and the processes. The
compiled programs are compared later, once compiled (debug/recorder.py).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import jax

from picotron_jax.errors import UserError

PER_PROCESS = {"distributed.process_id", "distributed.local_device_ids"}  # legitimately differ
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint")


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def code_hash() -> str:
    """sha256 over the package's Python sources (path and contents), 16 hex digits."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def identity(cfg) -> dict:
    config = {k: v for k, v in _flat(cfg.to_dict()).items() if k not in PER_PROCESS}
    return {"config": config, "code": code_hash(), "versions": versions()}


def first_difference(mine: dict, ref: dict) -> str | None:
    """What differs between two identities (fields in order: config, code, versions), or None."""
    for key in sorted(set(mine["config"]) | set(ref["config"])):
        a, b = ref["config"].get(key, "<absent>"), mine["config"].get(key, "<absent>")
        if a != b:
            return f"config field '{key}' is {a!r} on process 0 and {b!r} on process {{p}}"
    if mine["code"] != ref["code"]:
        return (f"the picotron_jax sources differ (hash {ref['code']} on process 0, {mine['code']} on process {{p}}): "
                f"run every process from the same checkout")
    for key in sorted(set(mine["versions"]) | set(ref["versions"])):
        a, b = ref["versions"].get(key), mine["versions"].get(key)
        if a != b:
            return f"package {key} is {a} on process 0 and {b} on process {{p}}"
    return None


def check_same_run(cfg, timeout_s: float | None = None) -> None:
    """Publish this process's identity and compare everyone's with process 0's; UserError on a difference."""
    if jax.process_count() == 1:
        return
    from picotron_jax import compat

    client = compat.distributed_client()
    timeout_ms = int((timeout_s or cfg.distributed.init_timeout_s) * 1000)
    client.key_value_set(f"picotron_debug/identity/{jax.process_index()}", json.dumps(identity(cfg), default=str),
                         allow_overwrite=True)
    everyone = {p: json.loads(client.blocking_key_value_get(f"picotron_debug/identity/{p}", timeout_ms))
                for p in range(jax.process_count())}
    problems = [(p, diff.format(p=p)) for p in sorted(everyone) if p
                and (diff := first_difference(everyone[p], everyone[0])) is not None]
    if problems:
        shown = "; ".join(text for _, text in problems[:3])
        raise UserError(f"the processes of this run disagree at start ({shown}); debug.check_start refuses to run "
                        f"them: give every process the same config (and code, and packages)")
