"""The codecs of checkpoint array chunks: zstd at a chosen level, then a CRC32C checksum.

Orbax (0.12) writes every array as a zarr3 array inside an OCDBT database; each chunk goes through a
codec chain that is `bytes` (+ `zstd` at a fixed level 3 when compression is on). Orbax has no option
for the level nor for chunk checksums, so `use_chunk_codecs(level)` wraps the one Orbax function that
builds that chain: zstd gets `checkpoint.compression_level`, and a `crc32c` codec is appended, so
TensorStore verifies every chunk it reads and a damaged byte anywhere in a checkpoint is an error
rather than a silently different weight. The checksums are computed by TensorStore's writer threads,
in the background of an async save. Both codecs are standard zarr3, recorded in each array's
zarr.json: a plain `orbax.checkpoint` or TensorStore reader needs nothing from here.

The setting is process-wide (the wrapped function does not know which checkpoint it writes); one run
writes one kind of checkpoint, and tests and benchmarks set it before each save.
"""

from __future__ import annotations

import functools

from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils

_DEFAULT_LEVEL = 3  # Orbax's own (and zstd's default)
_state = {"level": _DEFAULT_LEVEL}


def _with_codecs(build):
    @functools.wraps(build)
    def build_with_codecs(*args, **kwargs):
        metadata, algo, level = build(*args, **kwargs)
        if not kwargs.get("use_zarr3", False):
            return metadata, algo, level
        chain = metadata["codecs"][0]["configuration"]["codecs"]  # sharding_indexed's per-chunk chain
        for codec in chain:
            if codec["name"] == "zstd":
                codec["configuration"]["level"] = level = _state["level"]
        if chain[-1]["name"] != "crc32c":
            chain.append({"name": "crc32c"})
        return metadata, algo, level

    build_with_codecs.__wrapped_by_picotron__ = True
    return build_with_codecs


def use_chunk_codecs(level: int) -> None:
    """Chunks written from now on get zstd at `level` (when compressing; level 0 means Orbax's
    `use_compression=False`, set by the caller) and a CRC32C checksum."""
    if not getattr(_ts_utils._build_zarr_shard_and_chunk_metadata, "__wrapped_by_picotron__", False):
        _ts_utils._build_zarr_shard_and_chunk_metadata = _with_codecs(_ts_utils._build_zarr_shard_and_chunk_metadata)
    _state["level"] = level if level > 0 else _DEFAULT_LEVEL
