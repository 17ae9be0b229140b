"""Putting a batch on the mesh, process-locally: each process reads only the rows its devices hold.

`jax.make_array_from_process_local_data(sharding, local, global_shape)` takes, in every
dimension that is split across processes, the *union* of the index ranges this process's devices
hold, in increasing order, packed together (JAX maps the k-th distinct shard start of a dimension
to local slice k). So the local array is `full[np.ix_(idx_0, idx_1, ...)]` with `idx_d` the
sorted distinct indices this process holds in dimension d: `addressable_indices` computes
exactly those, and a row replicated on several devices of one process (tensor axis) is read once.
On a single process this is the whole batch, and JAX simply device_puts it.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import jax
import numpy as np

from picotron_jax.data.dataset import TokenDataset
from picotron_jax.errors import UserError

T = TypeVar("T")


def _held(index_map: Mapping, devices: Iterable, global_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per dimension: sorted distinct indices held by any of `devices` under `index_map` (device -> slices)."""
    held: list[set[int]] = [set() for _ in global_shape]
    for device in devices:
        index = index_map[device]
        for d, size in enumerate(global_shape):
            slc = index[d] if d < len(index) else slice(None)
            held[d].update(range(*slc.indices(size)))
    return tuple(np.array(sorted(s), dtype=np.int64) for s in held)


def addressable_indices(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per dimension, the sorted global indices that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    return _held(index_map, index_map.keys(), tuple(global_shape))


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Sorted global row indices (axis 0) that the devices of this process hold."""
    return addressable_indices(sharding, global_shape)[0]


def rows_by_process(
    index_map: Mapping, process_of: Callable[[object], int], global_shape: tuple[int, ...], dim: int = 0
) -> dict[int, np.ndarray]:
    """Indices along `dim` held by every process, from a full `sharding.devices_indices_map(shape)`.

    Pure (no JAX runtime), so tests can simulate 2 or 4 hosts on one machine with any
    device -> process function, e.g. `lambda d: d.id // 4`.
    """
    groups: dict[int, list] = {}
    for device in index_map:
        groups.setdefault(process_of(device), []).append(device)
    return {p: _held(index_map, devs, tuple(global_shape))[dim] for p, devs in sorted(groups.items())}


def global_batch(
    ds: TokenDataset, step: int, global_batch_size: int, sharding: jax.sharding.Sharding, grad_accum: int = 1
) -> dict[str, jax.Array]:
    """Batch `step` as global jax.Arrays laid out by `sharding`; this process reads only its own rows.

    Shapes: [global_batch, seq_len], or [grad_accum, global_batch // grad_accum, seq_len] when
    grad_accum > 1 (microbatch a = samples a*micro .. a*micro + micro - 1; shard its second axis
    over the batch mesh axes, e.g. P(None, ('data', 'expert'))). The sequence axis may be sharded
    too (context parallelism): each process then keeps only its columns.
    """
    if global_batch_size <= 0 or grad_accum <= 0 or global_batch_size % grad_accum:
        raise UserError(
            f"train.global_batch = {global_batch_size} must be a positive multiple of train.grad_accum = {grad_accum}"
        )
    return place_rows(lambda rows: ds.batch_rows(step, global_batch_size, rows), global_batch_size, ds.seq_len,
                      sharding, grad_accum)


def eval_batch(ds: TokenDataset, index: int, batch: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Held-out batch `index` ([batch, seq_len], padding rows masked), placed like a training batch."""
    return place_rows(lambda rows: ds.eval_rows(index, batch, rows), batch, ds.seq_len, sharding)


def place_rows(read: Callable[[np.ndarray], dict[str, np.ndarray]], batch: int, seq_len: int,
               sharding: jax.sharding.Sharding, grad_accum: int = 1) -> dict[str, jax.Array]:
    """`read(rows)` -> host arrays [len(rows), seq_len] for the rows this process holds -> global arrays."""
    micro = batch // grad_accum
    shape = (batch, seq_len) if grad_accum == 1 else (grad_accum, micro, seq_len)
    idx = addressable_indices(sharding, shape)
    if grad_accum == 1:
        rows, lead = idx[0], (idx[0].size,)
    else:
        rows, lead = (idx[0][:, None] * micro + idx[1][None, :]).reshape(-1), (idx[0].size, idx[1].size)
    cols = idx[-1]
    out = {}
    for name, value in read(rows).items():
        local = value.reshape(*lead, seq_len)
        if cols.size != seq_len:  # sequence axis split across processes: keep this process's columns
            local = local[..., cols]
        out[name] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


PREFETCH_BATCHES = 2  # the training loop's prefetch depth (trainer.py)
READ_AHEAD_STEPS = PREFETCH_BATCHES + 1  # during step s's events, batches up to step s + this may have been read
# (PREFETCH_BATCHES queued, one more held by the thread waiting to queue it); step s + READ_AHEAD_STEPS + 1 not yet


def prefetch(iterator: Iterable[T], size: int = PREFETCH_BATCHES) -> Iterator[T]:
    """Yield the items of `iterator`, computing up to `size` ahead on a background thread.

    Reading and device-putting batch i+1 then overlaps step i. Exceptions from the producer are
    raised in the consumer; closing the generator (or breaking out of the loop) stops the thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((False, exc))

    thread = threading.Thread(target=produce, name="picotron-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
