"""Per-array fingerprints that tell a restored state from a silently damaged one.

A truncated file makes TensorStore fail loudly, but a flipped byte in an uncompressed chunk would
restore without complaint. Each checkpoint's metadata records, for every array, the sum of its bit
patterns modulo 2^32; after a restore the same sum is computed on the restored arrays. Integer
addition is exact and order-free, so the sum is the same on every mesh the state is restored onto.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """Sum of the array's bit patterns as uint32 (wrapping)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])  # 8-byte types: trailing axis of 2
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def leaf_names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def _fingerprints(tree: Any) -> list[jax.Array]:
    return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprints(tree: Any) -> dict[str, int]:
    """{"params/embed": 123456789, ...} for every array leaf of `tree` (a global computation on a mesh)."""
    sums = jax.device_get(_fingerprints(tree))
    return {name: int(np.asarray(s)) for name, s in zip(leaf_names(tree), sums)}


def mismatched(saved: dict[str, int], restored: dict[str, int]) -> list[str]:
    """Names of arrays whose restored fingerprint differs from the saved one."""
    return [name for name, value in saved.items() if restored.get(name, value) != value]


def host_fingerprint(x: np.ndarray) -> int:
    """`_leaf_fingerprint` of a host array (for the inspector, which restores without a mesh)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint32)
    else:
        bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize])
    return int(np.sum(bits.astype(np.uint32), dtype=np.uint32))
