"""The codec of each checkpoint array's chunks (zstd, lz4, byte-shuffled blosc or none), then a CRC32C.

Why per array kind: trained fp32 weights and Adam moments compress badly byte by byte (zstd alone keeps
0.84-0.92 of a trained state, benchmarks/README.md), because the mantissa bytes are noise and the bytes
that repeat (sign and exponent) sit 4 bytes apart. Blosc's byte shuffle regroups each block as all first
bytes, then all second bytes, ..., so zstd or lz4 then see long runs of similar exponents; second moments
(positive, narrow exponent range) gain most. Which codec wins depends on the data, so `checkpoint.codec=auto`
measures (codec_select.py); a fixed name uses that codec for every array. The four kinds come from the
tree paths (`array_kind`): parameters, first moments (`mu`), second moments (`nu`), counters (the rest:
step, Adam's count, a loss scale).

Layout: Orbax writes each array as one zarr3 array (a `sharding_indexed` shard per written slice) in an
OCDBT database. Each process writes the slices of its devices that are replica 0 (a replicated array is
written once), and each slice is one chunk: Orbax's chunk shape is the per-device shard shape, split
further only beyond the OCDBT target file size. Each chunk goes through `bytes` -> codec -> `crc32c`
independently, so a codec sees one shard at a time: tensor parallelism or ZeRO makes chunks smaller, and
blosc works in blocks of BLOSC_BLOCK_BYTES inside a chunk (a larger block helps the shuffle, and small
chunks compress worse: both measured in benchmarks/README.md).
Every codec is a standard zarr3 codec recorded in each array's zarr.json, so plain Orbax or TensorStore
reads any checkpoint without picotron_jax; TensorStore verifies each chunk's CRC32C on read.

How the chain reaches Orbax: Orbax 0.12 has no option for it (only zstd at level 3, on or off), so
`install_orbax_hook` wraps the private `orbax.checkpoint._src.serialization.tensorstore_utils.
build_array_write_spec` (the one function that builds every array's write spec, called through the module)
and replaces the per-chunk codec list of the spec it returns with `chunk_codecs(name, directory)`.
That is the one function a compatibility layer needs: the chain for one array written under one folder,
or None when no Checkpointer writes there (then Orbax's own chain stays). Plans are registered per
checkpoint folder, so two Checkpointers in one process may use different codecs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

from picotron_jax.config import CHECKPOINT_CODECS, CheckpointConfig

CODECS = tuple(c for c in CHECKPOINT_CODECS if c != "auto")
KINDS = ("params", "first_moment", "second_moment", "counters")
BLOSC_BLOCK_BYTES = 1 << 20  # blosc's block inside a chunk: 1 MiB shuffles better than its default (benchmarks/README.md)


def array_kind(name: str) -> str:
    """'params/layers/wq' or Orbax's 'opt_state.1.0.nu.layers.wq' -> 'params' | 'first_moment' | 'second_moment' |
    'counters' (optax's Adam state names its moments `mu` and `nu`)."""
    parts = re.split(r"[./]", name)
    if parts[0] == "params":
        return "params"
    if "mu" in parts:
        return "first_moment"
    if "nu" in parts:
        return "second_moment"
    return "counters"


def blosc_level(level: int) -> int:
    """Blosc's clevel (1-9) whose internal zstd level (2 * clevel - 1, c-blosc 1.x) matches zstd `level`."""
    return min(9, max(1, (level + 1) // 2))


def chain(codec: str, level: int) -> list[dict[str, Any]]:
    """The zarr3 codecs after `bytes` for one chunk: the compressor (if any), then the CRC32C."""
    def blosc(cname: str, shuffle: str) -> dict[str, Any]:
        return {"name": "blosc", "configuration": {"cname": cname, "clevel": blosc_level(level), "shuffle": shuffle,
                                                    "blocksize": BLOSC_BLOCK_BYTES}}  # typesize: from the dtype

    compressors = {
        "none": [],
        "zstd": [{"name": "zstd", "configuration": {"level": level}}],
        "lz4": [blosc("lz4", "noshuffle")],  # TensorStore's zarr3 has lz4 only inside blosc
        "blosc-zstd": [blosc("zstd", "shuffle")],
        "blosc-lz4": [blosc("lz4", "shuffle")],
    }
    if codec not in compressors:
        raise ValueError(f"unknown checkpoint codec {codec!r} (known: {', '.join(compressors)})")
    return [*(compressors[codec] if level > 0 else []), {"name": "crc32c"}]


@dataclasses.dataclass(frozen=True)
class CodecPlan:
    """Which codec each array kind gets, at which level (level 0: everything uncompressed)."""

    level: int
    by_kind: dict[str, str]

    @classmethod
    def fixed(cls, codec: str, level: int) -> "CodecPlan":
        return cls(level, {k: codec if level > 0 else "none" for k in KINDS})

    def codec_for(self, name: str) -> str:
        return self.by_kind[array_kind(name)] if self.level > 0 else "none"

    def chain_for(self, name: str) -> list[dict[str, Any]]:
        return chain(self.codec_for(name), self.level)


def fixed_plan(c: CheckpointConfig) -> CodecPlan | None:
    """The plan a config names, or None for `auto` (chosen at the first save; level 0 needs no measuring)."""
    if c.codec == "auto" and c.compression_level > 0:
        return None
    return CodecPlan.fixed("none" if c.codec == "auto" else c.codec, c.compression_level)


# ------------------------------------------------------------------ the hook into Orbax's write specs

_PLANS: dict[str, CodecPlan] = {}  # checkpoint folder -> its plan (read from Orbax's writer threads)


def _key(directory: Any) -> str:
    return str(directory).rstrip("/")


def register(directory: Any, plan: CodecPlan) -> None:
    """Arrays written under `directory` from now on get `plan`'s codecs."""
    install_orbax_hook()
    _PLANS[_key(directory)] = plan


def unregister(directory: Any, plan: CodecPlan) -> None:
    if _PLANS.get(_key(directory)) is plan:
        del _PLANS[_key(directory)]


def chunk_codecs(array_name: str, directory: Any) -> list[dict[str, Any]] | None:
    """The per-chunk codecs after `bytes` for array `array_name` (Orbax's name, 'params.layers.wq') written under
    `directory` (a step's tmp folder inside a registered checkpoint folder); None if no plan covers it."""
    where = _key(directory)
    for root, plan in list(_PLANS.items()):
        if where == root or where.startswith(root + "/"):
            return plan.chain_for(array_name)
    return None


def set_chunk_codecs(tspec: dict[str, Any], codecs: list[dict[str, Any]]) -> None:
    """Replace the per-chunk codecs of an Orbax zarr3 write spec (inside a `cast` wrapper, if any); anything
    else than the layout Orbax 0.12 builds is an error, never a checkpoint silently without checksums."""
    while "metadata" not in tspec and "base" in tspec:
        tspec = tspec["base"]
    try:
        sharding = tspec["metadata"]["codecs"][0]
        inner = sharding["configuration"]["codecs"]
        assert sharding["name"] == "sharding_indexed" and inner[0]["name"] == "bytes"
    except (KeyError, IndexError, TypeError, AssertionError):
        raise RuntimeError("checkpoint codecs: Orbax's zarr3 write spec no longer has the layout this code sets "
                           f"codecs in (a sharding_indexed codec whose chain starts with bytes): {tspec!r:.400}") from None
    sharding["configuration"]["codecs"] = [inner[0], *codecs]


def install_orbax_hook() -> None:
    """Wrap Orbax's `build_array_write_spec` once per process (see the module docstring)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    original = ts_utils.build_array_write_spec
    if getattr(original, "__picotron_codecs__", False):
        return

    @functools.wraps(original)
    def build_array_write_spec(info, *args, **kwargs):
        spec = original(info, *args, **kwargs)
        codecs = chunk_codecs(info.name, info.parent_dir) if getattr(info, "use_zarr3", False) else None
        if codecs is not None:
            set_chunk_codecs(spec.json, codecs)
        return spec

    build_array_write_spec.__picotron_codecs__ = True
    ts_utils.build_array_write_spec = build_array_write_spec


# ------------------------------------------------------------------ what the codecs achieved, per array


def chunk_bytes_by_array(state_dir: Path) -> dict[str, int]:
    """Encoded bytes of each array's chunks in a written step (`<step>/state`), keyed by Orbax's array name.

    Read from the OCDBT B-tree (`tensorstore.ocdbt.dump`: each entry holds its value's length), so no array
    data is read; if that layout is not understood, every value is read instead."""
    import tensorstore as ts

    base = ts.KvStore.open({"driver": "file", "path": str(state_dir).rstrip("/") + "/"}).result()
    sizes: dict[str, int] = {}

    def add(key: bytes, n: int) -> None:
        name, _, rest = key.decode().partition("/")
        if rest.startswith("c"):  # chunk data ('c/0/0'), not zarr.json
            sizes[name] = sizes.get(name, 0) + n

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "key" in node and ("indirect_value" in node or "inline_value" in node):
                value = node.get("indirect_value")
                add(node["key"], int(value.rsplit(":", 1)[1]) if value else len(node["inline_value"]))
                return
            for v in node.values():
                if isinstance(v, str) and v.startswith("btreenode::"):
                    walk(ts.ocdbt.dump(base, v).result())
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    try:
        manifest = ts.ocdbt.dump(base).result()
        walk(manifest["versions"][-1]["root"])
        if sizes:
            return sizes
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        sizes.clear()
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base.spec().to_json()}).result()
    for key in kv.list().result():
        add(key, len(kv.read(key).result().value))
    return sizes
