"""The small JSON saved beside each checkpoint's arrays, and what it is checked for on restore."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax

from picotron_jax.checkpoint.codecs import array_kind, chunk_bytes_by_array
from picotron_jax.config import Config
from picotron_jax.observe import metrics as observe_metrics

PACKAGES = ("picotron-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "numpy")
# model fields that do not change the saved arrays or the math (free to differ on resume)
NON_ARCHITECTURE_FIELDS = ("scan_unroll", "init_std")
# moe fields that decide which layer each saved array belongs to (models/moe_layers.py)
MOE_LAYOUT_FIELDS = ("num_experts", "expert_size", "shared_experts", "first_dense_layers", "every_n_layers")


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


def build(step: int, cfg: Config, tree: Any, extra: dict, stored: Any = None,
          compression: dict | None = None, quantization: dict | None = None) -> dict[str, Any]:
    """The step's metadata. `tree`: the train state as {field: subtree}; `stored`: the form written (lossy leaves
    quantised, quantize.py; default `tree`); `compression`: codecs chosen (compression_entry);
    `quantization`: quantize.describe."""
    if not _STATIC:
        _STATIC.update(git_revision=_git_revision(), versions=_versions())
    stored = tree if stored is None else stored
    level = cfg.checkpoint.compression_level
    return {
        "step": step,
        "data_position": step,  # batch i is a pure function of (seed, data, i): the next batch is `step`
        **extra,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_count": jax.process_count(),
        **_STATIC,
        "raw_bytes": raw_bytes(tree),
        "stored_raw_bytes": raw_bytes(stored),
        "compression": compression or ({"codec": "zstd", "level": level} if level > 0 else {"codec": "none"}),
        "quantization": quantization or {"lossy": False},
        "lossy": bool(quantization and quantization.get("lossy")),
        "checksum": "crc32c per chunk",
        "fields": sorted(tree),
        "arrays": leaf_names(stored),
        "config": cfg.to_dict(),
    }


def compression_entry(codec: str, plan: Any, stored: Any, selection: dict | None) -> dict[str, Any]:
    """`compression` of the metadata: the configured codec, its level, the codec of each kind and of each array
    (with its raw bytes; its bytes on disk are added once written: record_array_bytes), what `auto` measured."""
    arrays = {}
    for name, x in zip(leaf_names(stored), jax.tree.leaves(stored)):
        kind = array_kind(name)
        arrays[name] = {"kind": kind, "codec": plan.by_kind[kind] if plan.level > 0 else "none",
                        "raw_bytes": math.prod(x.shape) * x.dtype.itemsize}
    entry = {"codec": codec if plan.level > 0 else "none", "level": plan.level, "kinds": dict(plan.by_kind),
             "arrays": arrays}
    if selection is not None:
        entry["selection"] = selection
    return entry


def record_array_bytes(step_dir: Path) -> dict | None:
    """Once a step is written: each array's bytes on disk and ratio into its metadata (replaced atomically; a
    process killed before this leaves the metadata as it was). Returns bytes and raw bytes per kind."""
    meta_file = step_dir / "meta" / "metadata"
    if not meta_file.is_file():  # already pruned by the keep policy
        return None
    meta = json.loads(meta_file.read_text())
    arrays = meta.get("compression", {}).get("arrays")
    if not arrays:
        return None
    on_disk = chunk_bytes_by_array(step_dir / "state")
    kinds: dict[str, dict[str, int]] = {}
    for name, entry in arrays.items():
        n = on_disk.get(name.replace("/", "."), 0)
        entry["bytes"] = n
        entry["ratio"] = round(n / entry["raw_bytes"], 4) if entry["raw_bytes"] else None
        k = kinds.setdefault(entry["kind"], {"bytes": 0, "raw_bytes": 0})
        k["bytes"] += n
        k["raw_bytes"] += entry["raw_bytes"]
    meta["compression"]["by_kind_bytes"] = kinds
    tmp = meta_file.with_name(meta_file.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_file)
    return kinds


def model_differences(saved: dict, cfg: Config) -> list[str]:
    """'model.hidden_size: 64 in the checkpoint, 128 in this run' for each architecture field that differs
    (the model section, and the MoE fields that place arrays in layers)."""
    saved_cfg, current = saved.get("config", {}), cfg.to_dict()
    fields = [("model", k) for k in current["model"] if k not in NON_ARCHITECTURE_FIELDS]
    if saved_cfg.get("moe", {}).get("num_experts", 0) or current["moe"]["num_experts"]:
        fields += [("moe", k) for k in MOE_LAYOUT_FIELDS]
    out = []
    for section, k in fields:
        default = 0 if section == "moe" else None  # checkpoints from before MoE existed: a dense model
        was, now = saved_cfg.get(section, {}).get(k, default), current[section][k]
        if was is not None and was != now:
            out.append(f"{section}.{k}: {was!r} in the checkpoint, {now!r} in this run")
    return out


def array_differences(saved: dict, target_names: list[str]) -> list[str]:
    """Arrays the checkpoint has that this run's state lacks, and the reverse (names as in `arrays`)."""
    if "arrays" not in saved:
        return []
    was, now = set(saved["arrays"]), set(target_names)
    out = []
    if was - now:
        out.append(f"only in the checkpoint: {', '.join(sorted(was - now)[:6])}")
    if now - was:
        out.append(f"only in this run: {', '.join(sorted(now - was)[:6])}")
    return out


def human_bytes(n: int | None) -> str:
    """Sizes in checkpoint messages and listings: '8.4 MiB'."""
    return observe_metrics.human_bytes(n, sep=" ")
