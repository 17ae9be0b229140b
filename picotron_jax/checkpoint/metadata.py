"""The small JSON saved beside each checkpoint's arrays, and what it is checked for on restore."""

from __future__ import annotations

import datetime
import math
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax

from picotron_jax.config import Config

PACKAGES = ("picotron-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "numpy")
# model fields that do not change the saved arrays or the math (free to differ on resume)
NON_ARCHITECTURE_FIELDS = ("scan_unroll", "init_std")


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


_STATIC: dict[str, Any] = {}


def leaf_names(tree: Any) -> list[str]:
    """'params/layers/wq', ... for every array of a tree."""
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


def raw_bytes(tree: Any) -> int:
    """Bytes of every array once (global shapes: replicas are written once)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def build(step: int, cfg: Config, tree: Any, extra: dict) -> dict[str, Any]:
    if not _STATIC:
        _STATIC.update(git_revision=_git_revision(), versions=_versions())
    level = cfg.checkpoint.compression_level
    return {
        "step": step,
        "data_position": step,  # batch i is a pure function of (seed, data, i): the next batch is `step`
        **extra,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_count": jax.process_count(),
        **_STATIC,
        "raw_bytes": raw_bytes(tree),
        "compression": {"codec": "zstd", "level": level} if level > 0 else {"codec": "none"},
        "checksum": "crc32c per chunk",
        "fields": sorted(tree),
        "arrays": leaf_names(tree),
        "config": cfg.to_dict(),
    }


def model_differences(saved: dict, cfg: Config) -> list[str]:
    """'model.hidden_size: 64 in the checkpoint, 128 in this run' for each architecture field that differs."""
    saved_model = saved.get("config", {}).get("model", {})
    current = cfg.to_dict()["model"]
    return [f"model.{k}: {saved_model[k]!r} in the checkpoint, {v!r} in this run" for k, v in current.items()
            if k in saved_model and k not in NON_ARCHITECTURE_FIELDS and saved_model[k] != v]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
