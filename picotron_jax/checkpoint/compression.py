"""The zstd level of checkpoint array chunks.

Orbax (0.12) writes every array as a zarr3 array inside an OCDBT database and, with compression on,
appends a `zstd` codec at a fixed level 3 to each chunk's codec chain; it has no option for the
level. `use_zstd_level(n)` wraps the one Orbax function that builds that codec chain so the level
comes from `checkpoint.compression_level`. The level is recorded in each array's zarr.json (the
codec's `configuration.level`) and in Orbax's array metadata, so a plain `orbax.checkpoint` reader
needs nothing from here: zstd frames decode the same at any level.

The level is process-wide (the wrapped function has no access to the checkpoint it writes);
one run writes one kind of checkpoint, and tests/benchmarks set it before each save.
"""

from __future__ import annotations

import functools

from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils

MAX_ZSTD_LEVEL = 22
_DEFAULT_LEVEL = 3  # Orbax's own (and zstd's default)
_state = {"level": _DEFAULT_LEVEL}


def _with_level(build):
    @functools.wraps(build)
    def build_with_level(*args, **kwargs):
        metadata, algo, level = build(*args, **kwargs)
        if algo != "zstd" or not kwargs.get("use_zarr3", False):
            return metadata, algo, level
        for codec in metadata["codecs"][0]["configuration"]["codecs"]:  # sharding_indexed's inner chain
            if codec["name"] == "zstd":
                codec["configuration"]["level"] = _state["level"]
        return metadata, algo, _state["level"]

    build_with_level.__wrapped_by_picotron__ = True
    return build_with_level


def use_zstd_level(level: int) -> None:
    """Chunks written from now on (level >= 1) use zstd at `level`; level 0 is handled by the caller
    (Orbax's `use_compression=False`)."""
    if not getattr(_ts_utils._build_zarr_shard_and_chunk_metadata, "__wrapped_by_picotron__", False):
        _ts_utils._build_zarr_shard_and_chunk_metadata = _with_level(_ts_utils._build_zarr_shard_and_chunk_metadata)
    _state["level"] = level if level > 0 else _DEFAULT_LEVEL
