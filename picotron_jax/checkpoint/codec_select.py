"""`checkpoint.codec=auto`: each array kind's codec, chosen by compressing a sample of the first save.

No codec wins everywhere: byte-shuffled blosc+zstd keeps ~0.80 of trained second moments but a counter
of 4 bytes grows under any compressor, and lz4 trades size for speed (benchmarks/README.md). So the first
save of a run measures every candidate on a sample of each kind, with TensorStore's own codecs in memory
(the chains `codecs.chain` gives the real write), and keeps the smallest that fits the time budget.

- Sample: from each array of a kind, evenly spaced contiguous pieces of SAMPLE_PIECE_BYTES (a blosc block)
  of its first local replica-0 shard, as many as its share of SAMPLE_BYTES per kind; the whole kind when it
  is smaller. Each piece is encoded as its own chunk, as a shard is on disk.
- Choice: the smallest encoded size; ties go to the earlier of CANDIDATES (the faster). Sizes are
  deterministic, so the choice is the same for the same data. With `checkpoint.codec_time_budget` > 0
  a compressor must also fit: its measured encode time (one thread), scaled from the sample to the kind's
  bytes, within the kind's share (by bytes) of the budget; `none` always fits. Timings vary, so a budget
  makes the choice depend on the machine's load near its edge.
- Several processes: every process must write the codec chain that process 0's zarr.json records, so
  process 0's choice is broadcast to all.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from picotron_jax.checkpoint.codecs import KINDS, CodecPlan, array_kind, chain
from picotron_jax.checkpoint.metadata import leaf_names

CANDIDATES = ("none", "lz4", "blosc-lz4", "zstd", "blosc-zstd")  # fastest first: ties go to the faster
SAMPLE_BYTES = 8 << 20  # per kind
SAMPLE_PIECE_BYTES = 1 << 20


def plain(x: Any) -> Any:
    """A typed PRNG key array as its key data (what Orbax writes for it); anything else as it is."""
    dtype = getattr(x, "dtype", None)
    return jax.random.key_data(x) if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else x


def local_flat(x: Any) -> np.ndarray:
    """The first replica-0 shard this process holds (all of a host array), flattened on the host."""
    shards = getattr(x, "addressable_shards", None)
    if shards:
        x = next((s for s in shards if s.replica_id == 0), shards[0]).data
    return np.asarray(x).reshape(-1)


def pieces(flat: np.ndarray, count: int | None) -> list[np.ndarray]:
    """`count` evenly spaced contiguous pieces of SAMPLE_PIECE_BYTES, or all of `flat` cut into such pieces
    (count None, or the array is no larger than the count asked for)."""
    n = max(1, SAMPLE_PIECE_BYTES // flat.dtype.itemsize)
    if count is None or count * n >= flat.size:
        return [flat[i:i + n] for i in range(0, flat.size, n)]
    starts = [(flat.size - n) // 2] if count == 1 else [i * (flat.size - n) // (count - 1) for i in range(count)]
    return [flat[s:s + n] for s in starts]


def sample_by_kind(tree: Any) -> dict[str, list[np.ndarray]]:
    """The sample of each kind present in `tree`, deterministic for the same shapes and values."""
    arrays: dict[str, list[tuple[str, Any]]] = {}
    for name, x in zip(leaf_names(tree), jax.tree.leaves(tree)):
        arrays.setdefault(array_kind(name), []).append((name, plain(x)))
    out: dict[str, list[np.ndarray]] = {}
    for kind, items in arrays.items():
        sizes = [local_flat_nbytes(x) for _, x in items]
        total = sum(sizes)
        got: list[np.ndarray] = []
        for (_, x), size in zip(items, sizes):
            count = None if total <= SAMPLE_BYTES else round(size / total * SAMPLE_BYTES / SAMPLE_PIECE_BYTES)
            if size > 0 and count != 0:
                got += pieces(local_flat(x), count)
        if not got:  # a kind of many small arrays: a piece of the largest one
            got = pieces(local_flat(items[int(np.argmax(sizes))][1]), 1)
        out[kind] = got
    return out


def local_flat_nbytes(x: Any) -> int:
    shards = getattr(x, "addressable_shards", None)
    if shards:
        shape = shards[0].data.shape
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return int(np.asarray(x).nbytes)


def encoded_size(pieces_: list[np.ndarray], codec: str, level: int) -> tuple[int, float]:
    """(bytes, seconds) of TensorStore encoding each piece as one zarr3 chunk with `codec`, in memory."""
    stores = []
    for p in pieces_:
        spec = {"driver": "zarr3", "kvstore": "memory://", "create": True, "store_data_equal_to_fill_value": True,
                "metadata": {"shape": [p.size], "data_type": str(p.dtype),
                             "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [p.size]}},
                             "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *chain(codec, level)]}}
        stores.append(ts.open(spec).result())  # a fresh in-memory store each (its own context)
    t0 = time.perf_counter()
    for store, p in zip(stores, pieces_):
        store.write(p).result()
    seconds = time.perf_counter() - t0
    total = 0
    for store in stores:
        kv = store.kvstore
        total += sum(len(kv.read(k).result().value) for k in kv.list().result() if not k.endswith(b"zarr.json"))
    return total, seconds


def choose(tree: Any, level: int, time_budget: float) -> tuple[CodecPlan, dict[str, Any]]:
    """The plan for `tree` (the stored form of a train state) and what was measured, for the metadata."""
    t0 = time.perf_counter()
    samples = sample_by_kind(tree)
    kind_bytes = {k: 0 for k in KINDS}
    for name, x in zip(leaf_names(tree), jax.tree.leaves(tree)):
        kind_bytes[array_kind(name)] += local_flat_nbytes(plain(x))
    total = sum(kind_bytes.values()) or 1
    report: dict[str, Any] = {}
    by_kind: dict[str, str] = {}
    for kind in KINDS:
        raw = sum(p.nbytes for p in samples.get(kind, []))
        if raw == 0:
            by_kind[kind] = "none"
            continue
        measured = {c: encoded_size(samples[kind], c, level) for c in CANDIDATES}
        scale = kind_bytes[kind] / raw
        allowed = time_budget * kind_bytes[kind] / total

        def fits(c: str) -> bool:
            return time_budget <= 0 or c == "none" or measured[c][1] * scale <= allowed

        by_kind[kind] = min((c for c in CANDIDATES if fits(c)), key=lambda c: (measured[c][0], CANDIDATES.index(c)))
        report[kind] = {"codec": by_kind[kind], "sample_bytes": raw,
                        "sample_ratio": {c: round(b / raw, 4) for c, (b, _) in measured.items()},
                        "sample_mb_per_s": {c: round(raw / max(s, 1e-9) / 1e6, 1) for c, (_, s) in measured.items()}}
    by_kind = broadcast_choice(by_kind)
    for kind, entry in report.items():
        entry["codec"] = by_kind[kind]
    return CodecPlan(level, by_kind), {"kinds": report, "seconds": round(time.perf_counter() - t0, 3),
                                       "time_budget_s": time_budget}


def broadcast_choice(by_kind: dict[str, str]) -> dict[str, str]:
    """Process 0's choice on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return by_kind
    from jax.experimental import multihost_utils

    codes = np.array([CANDIDATES.index(by_kind[k]) for k in KINDS], np.int32)
    codes = np.asarray(multihost_utils.broadcast_one_to_all(codes))
    return {k: CANDIDATES[int(i)] for k, i in zip(KINDS, codes)}
