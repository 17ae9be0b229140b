"""Replica consistency: arrays that should be identical on several devices are compared by fingerprint.

Every `debug.check_every` steps each device computes, on device, a fingerprint of its shard of every
parameter and optimizer-state array: two 32-bit sums of the shard's bits, one plain and one weighted
by position (so a changed element, a swapped pair or a one-ulp change all show). Shards that cover
the same slice of an array (data-parallel copies, norms replicated under tensor parallelism, ...) must
have equal fingerprints; the first array in path order whose copies differ is named, with the
devices (and processes) that disagree with the majority. Only fingerprints leave the devices: with
several processes they are exchanged through the coordination service's key-value store
(Megatron's `check_param_hashes_across_dp_replicas`, for any layout).

A divergence stops the run (RunAborted, exit code 4) on every process, with the same message.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.errors import RunAborted

_GOLDEN = np.uint32(2654435761)


def _as_u32(x: jax.Array) -> jax.Array:
    """The bits of `x`, flattened to uint32 words."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width)
    return bits.reshape(-1).astype(jnp.uint32)


@jax.jit
def _fingerprints(shards: list) -> jax.Array:
    """uint32[n, 2]: (sum of words, position-weighted sum of words) of each shard, wrapping mod 2^32."""
    rows = []
    for x in shards:
        u = _as_u32(x)
        weights = jnp.arange(u.shape[0], dtype=jnp.uint32) * _GOLDEN + jnp.uint32(1)
        rows.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def named_arrays(state) -> dict[str, jax.Array]:
    """Parameters and optimizer state by path ("params.layers.wq", "opt_state.0.mu.layers.wq", ...)."""
    out = {}
    for part in ("params", "opt_state"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]:
            if isinstance(leaf, jax.Array):
                out[f"{part}.{jax.tree_util.keystr(path, simple=True, separator='.')}"] = leaf
    return out


def local_fingerprints(state) -> list[dict]:
    """This process's fingerprints: {"array", "index" (the shard's slice), "device", "process", "fp"}."""
    per_device: dict = defaultdict(list)
    for name, arr in named_arrays(state).items():
        for shard in arr.addressable_shards:
            index = [(s.start, s.stop) for s in shard.index]
            per_device[shard.device].append((name, index, shard.data))
    launched = {device: _fingerprints([data for _, _, data in items]) for device, items in per_device.items()}
    rows = []  # every device's program is dispatched before any result is read: the devices work in parallel
    for device, items in per_device.items():
        fps = np.asarray(launched[device])
        rows += [{"array": name, "index": index, "device": device.id, "process": device.process_index,
                  "fp": [int(a), int(b)]} for (name, index, _), (a, b) in zip(items, fps)]
    return rows


def first_divergence(rows: list[dict]) -> str | None:
    """The message naming the first array (in path order) whose copies disagree, or None."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["array"], json.dumps(r["index"]))].append(r)
    for (name, index), copies in sorted(groups.items()):
        votes = Counter(tuple(r["fp"]) for r in copies)
        if len(votes) == 1:
            continue
        majority, count = votes.most_common(1)[0]
        odd = sorted((r["device"], r["process"]) for r in copies if tuple(r["fp"]) != majority)
        same = sorted(r["device"] for r in copies if tuple(r["fp"]) == majority)
        where = ", ".join(f"device {d} (process {p})" for d, p in odd)
        tie = " (no majority: which copy is right is unknown)" if count * 2 <= len(copies) else ""
        return (f"replicas diverged: {name} (slice {json.loads(index)}) differs on {where} from its "
                f"{len(same)} other cop{'y' if len(same) == 1 else 'ies'} on device(s) {same}{tie}")
    return None


def _exchange(rows: list[dict], key: str, timeout_s: float) -> list[dict]:
    """Everyone's rows (several processes: through the coordination service's key-value store)."""
    if jax.process_count() == 1:
        return rows
    from picotron_jax import compat

    client = compat.distributed_client()
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(rows), allow_overwrite=True)
    out = []
    for p in range(jax.process_count()):
        out += json.loads(client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)))
    return out


class ReplicaCheck(Callback):
    """Compare replica fingerprints after every `every`-th step; stop the run on a divergence."""

    def __init__(self, every: int, timeout_s: float = 300.0):
        self.every, self.timeout_s = every, timeout_s
        self.checked: list[int] = []

    def check(self, state, step: int) -> str | None:
        rows = _exchange(local_fingerprints(state), f"picotron_debug/fingerprints/{step}", self.timeout_s)
        self.checked.append(step)
        return first_divergence(rows)

    def on_step_end(self, trainer, step, outputs):
        if step % self.every:
            return
        state = trainer.control.new_state if trainer.control.new_state is not None else trainer.state
        problem = self.check(state, step)
        if problem:
            trainer.say(f"debug: {problem} (checked after step {step})", everywhere=True)
            raise RunAborted(f"{problem} (checked after step {step}, debug.check_every = {self.every})")
