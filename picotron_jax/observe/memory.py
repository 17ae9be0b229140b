"""Runtime memory readings for the log: device allocator statistics and live arrays; allocator settings.

GPU allocators report bytes in use, their peak and the largest free block: when the largest free
block is much smaller than the free memory, the heap is fragmented and a large allocation can fail
although enough bytes are free. `jax.live_arrays()` lists every array this process still holds: a
count that grows from one logging interval to the next is a leak (a reference kept to old states).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from picotron_jax.config import MemoryConfig


def device_memory_stats(devices: list) -> dict[str, Any]:
    """Device 0's allocator statistics (GPU/TPU); {} where the backend has none (CPU)."""
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        return {}
    if "bytes_in_use" not in stats:
        return {}
    row = {"mem_in_use": int(stats["bytes_in_use"]), "mem_peak": int(stats.get("peak_bytes_in_use", 0))}
    limit = stats.get("bytes_limit")
    largest = stats.get("largest_free_block_bytes")
    if limit:
        row["mem_limit"] = int(limit)
    if largest is not None and limit:
        free = max(int(limit) - int(stats["bytes_in_use"]), 1)
        row["mem_largest_free"] = int(largest)
        row["mem_fragmentation"] = round(1.0 - min(int(largest) / free, 1.0), 4)  # 0 = one contiguous free block
    return row


def live_arrays_stats() -> dict[str, int]:
    """Count and bytes (this process's shards) of every live jax.Array."""
    arrays = jax.live_arrays()
    nbytes = sum(s.data.nbytes for a in arrays if not a.is_deleted() for s in a.addressable_shards)
    return {"live_arrays": len(arrays), "live_bytes": int(nbytes)}


def apply_allocator_settings(m: MemoryConfig) -> str:
    """memory.preallocate / memory.fraction -> XLA_PYTHON_CLIENT_* (read by JAX when the GPU backend
    starts). Returns a warning if the backend has started already, so they cannot take effect."""
    wanted = {}
    if not m.preallocate:
        wanted["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if m.fraction > 0:
        wanted["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{m.fraction:.3f}"
    if not wanted:
        return ""
    from picotron_jax import compat

    if compat.backends_are_initialized() and any(os.environ.get(k) != v for k, v in wanted.items()):
        return (f"memory.preallocate/memory.fraction not applied: JAX's backend started before the config was read "
                f"(set {' '.join(f'{k}={v}' for k, v in wanted.items())} in the environment instead)")
    os.environ.update(wanted)
    return ""
