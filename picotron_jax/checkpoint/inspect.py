"""`picotron-jax ckpt ls|info PATH`: what a checkpoint folder holds, and whether each step is usable.

`ls` reads only the small metadata of every step (cheap, also on remote stores); `info` reads one
step's arrays to host memory (TensorStore verifies every chunk's CRC32C) and checks that every float array
is finite, so it proves the step restores and that `--resume` would use it,
and shows each array kind's codec and ratio, each array's, and whether anything is stored lossy.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from picotron_jax.checkpoint.codecs import KINDS, array_kind, chunk_bytes_by_array
from picotron_jax.checkpoint.metadata import human_bytes, leaf_names
from picotron_jax.checkpoint.restore import (UnreadableCheckpoint, lossy_summary, silence_closed_loop_callbacks,
                                             read_meta, short_error, split_location)
from picotron_jax.checkpoint.storage import open_store
from picotron_jax.errors import UserError


def _ratio(on_disk: int | None, raw: int | None) -> str:
    return f"{on_disk / raw:.2f}" if on_disk and raw else "?"


def codec_label(comp: dict) -> str:
    """'auto:3', 'zstd:3', 'none' for the listing."""
    codec = comp.get("codec", "none")
    return codec if codec == "none" else f"{codec}:{comp.get('level')}"


def list_steps(path: str) -> list[dict[str, Any]]:
    """One row per step: step, tokens, on-disk and raw bytes, compression, mesh, validity (from metadata)."""
    root, _ = split_location(path)
    store = open_store(root)
    steps = store.steps()
    if not steps:
        raise UserError(f"no checkpoint in {root} (a checkpoint folder holds one folder per saved step)")
    rows = []
    for step in steps:
        row: dict[str, Any] = {"step": step, "where": store.describe(step)}
        try:
            meta = read_meta(store.fetch(step))
            comp = meta.get("compression", {})
            row.update(tokens=meta.get("tokens_seen"), raw_bytes=meta.get("raw_bytes"), mesh=meta.get("mesh"),
                       saved_at=meta.get("saved_at"),
                       compression=codec_label(comp), lossy=bool(meta.get("lossy")),
                       bytes_on_disk=store.bytes_on_disk(step), valid="metadata ok")
            if row["lossy"]:
                row["valid"] += f", LOSSY: {lossy_summary(meta['quantization'])}"
        except UnreadableCheckpoint as exc:
            row.update(valid=f"UNUSABLE: {exc}")
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'step':>8}  {'tokens':>12}  {'on disk':>10}  {'raw':>10}  {'ratio':>5}  {'codec':>12}  mesh / status"
    lines = [header]
    for r in rows:
        if "raw_bytes" not in r:
            lines.append(f"{r['step']:>8}  {'':>12}  {'':>10}  {'':>10}  {'':>5}  {'':>12}  {r['valid']}")
            continue
        lines.append(f"{r['step']:>8}  {r['tokens'] or 0:>12,}  {human_bytes(r['bytes_on_disk']):>10}  "
                     f"{human_bytes(r['raw_bytes']):>10}  {_ratio(r['bytes_on_disk'], r['raw_bytes']):>5}  "
                     f"{r['compression']:>12}  {r['mesh']}  ({r['valid']})")
    return "\n".join(lines)


def step_info(path: str) -> dict[str, Any]:
    """Full description of one step (PATH/<step>, or the newest step of PATH), arrays read and verified."""
    root, step = split_location(path)
    store = open_store(root)
    steps = store.steps()
    if step is None:
        if not steps:
            raise UserError(f"no checkpoint in {root}")
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"no checkpoint at step {step} in {root} (steps there: {', '.join(map(str, steps)) or 'none'})")
    folder = store.fetch(step)
    info: dict[str, Any] = {"where": store.describe(step), "bytes_on_disk": store.bytes_on_disk(step)}
    try:
        meta = read_meta(folder)
    except UnreadableCheckpoint as exc:
        return {**info, "step": step, "valid": False, "problem": str(exc)}
    info.update({k: meta.get(k) for k in ("step", "tokens_seen", "data_position", "mesh", "saved_at", "git_revision",
                                          "versions", "raw_bytes", "compression", "process_count", "quantization")})
    info["lossy"] = bool(meta.get("lossy"))
    try:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        tree = checkpointer.metadata(folder / "state").item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        arrays = checkpointer.restore(folder / "state", args=ocp.args.PyTreeRestore(item=jax.tree.map(
            lambda _: 0, tree), restore_args=restore_args))
    except Exception as exc:  # noqa: BLE001 - damaged files raise many types
        silence_closed_loop_callbacks()
        return {**info, "valid": False, "problem": f"its arrays cannot be read ({short_error(exc)})"}
    names = leaf_names(arrays)
    leaves = jax.tree.leaves(arrays)
    recorded = (meta.get("compression") or {}).get("arrays") or {}
    on_disk = {}
    if store.is_local and not all("bytes" in recorded.get(n, {}) for n in names):
        on_disk = chunk_bytes_by_array(folder / "state")  # metadata from before the write completed, or older
    info["arrays"] = []
    for n, x in zip(names, leaves):
        x = np.asarray(x)
        entry = recorded.get(n, {})
        n_bytes = entry.get("bytes", on_disk.get(n.replace("/", ".")))
        info["arrays"].append({"name": n, "shape": list(x.shape), "dtype": str(x.dtype), "kind": array_kind(n),
                               "codec": entry.get("codec"), "bytes": n_bytes,
                               "ratio": round(n_bytes / x.nbytes, 4) if n_bytes is not None and x.nbytes else None})
    info["by_kind"] = {}
    for a in sorted(info["arrays"], key=lambda a: KINDS.index(a["kind"])):
        k = info["by_kind"].setdefault(a["kind"], {"codec": a["codec"], "bytes": 0, "raw_bytes": 0})
        k["bytes"] += a["bytes"] or 0
        k["raw_bytes"] += int(np.prod(a["shape"], dtype=np.int64)) * np.dtype(a["dtype"]).itemsize
    missing = sorted(set(meta.get("arrays", names)) - set(names))
    non_finite = [n for n, x in zip(names, leaves)
                  if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all()]
    info["valid"] = not missing and not non_finite
    if missing:
        info["problem"] = f"{len(missing)} array(s) listed in its metadata are absent ({', '.join(missing[:3])})"
    elif non_finite:  # the same rule as --resume (restore.py): a diverged state is not usable
        info["problem"] = (f"{len(non_finite)} array(s) hold NaN or infinite values ({', '.join(non_finite[:3])}): "
                           f"a diverged state, which --resume skips; use an older step")
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [f"checkpoint {info['where']}"]
    if "step" in info and info.get("raw_bytes") is not None:
        comp = info.get("compression") or {}
        codec = f"codec {comp['codec']} level {comp['level']}" if comp.get("codec", "none") != "none" else "uncompressed"
        lines += [f"  step {info['step']} | {info.get('tokens_seen') or 0:,} tokens | mesh {info.get('mesh')} | "
                  f"saved {info.get('saved_at')} by {info.get('process_count')} process(es)",
                  f"  {human_bytes(info['bytes_on_disk'])} on disk, {human_bytes(info['raw_bytes'])} raw "
                  f"(ratio {_ratio(info['bytes_on_disk'], info['raw_bytes'])}, {codec})",
                  f"  git {info.get('git_revision') or 'unknown'} | "
                  + ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())]
        kinds = [f"{k} {v['codec'] or '?'} {_ratio(v['bytes'], v['raw_bytes'])}" for k, v in info.get("by_kind", {}).items()]
        if kinds:
            lines.append("  per kind (codec, on disk / stored raw): " + "; ".join(kinds))
        lines.append(f"  LOSSY: {lossy_summary(info['quantization'])} (quantised; a resume restores the original "
                     f"dtypes, not the original values)" if info.get("lossy") else "  lossless: every array bit-exact")
    for a in info.get("arrays", []):
        ratio = f"{a['ratio']:.3f}" if a.get("ratio") is not None else "?"
        lines.append(f"  {a['name']:<40} {a['dtype']:<9} {str(a['shape']):<18} {a.get('codec') or '?':<10} {ratio}")
    lines.append("  valid: yes (every array read, every chunk's CRC32C verified, every float finite)" if info["valid"]
                 else f"  valid: NO, {info['problem']}")
    return "\n".join(lines)
