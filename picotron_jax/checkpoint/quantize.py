"""Lossy storage of checkpoint arrays, opt-in: bf16, or 8 bits with one absmax scale per block.

Why: Adam's two moments are two thirds of an fp32 train state and the part a resumed run needs least
exactly: they are running averages that the next steps overwrite (nu forgets with time constant
1/(1 - b2) steps). Mixed-precision trainers keep optimizer state in 16 bits (DeepSpeed's and Megatron's
bf16 optimizer states); 8-bit Adam (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
ICLR 2022) shows block-wise quantised moments train like fp32 ones, and Check-N-Run (Eisenman et al.,
NSDI 2022) quantises checkpoints themselves. Losslessly, the moments barely compress (codecs.py).
`checkpoint.quantize_optimizer` stores the moments so, `checkpoint.quantize_params` the parameters (never
unless asked); the metadata says what was stored lossy, and a resume restores the original dtypes.

- bf16: round to nearest even (relative error <= 2^-9); fp32's exponent range stays, so tiny second
  moments survive.
- int8: a row is the trailing axes whose product first reaches ROW_MIN elements (a [L, D, H, K] projection's
  H*K), cut into ceil(row / BLOCK) equal blocks; each block stores an fp32 scale (its absmax / levels) and
  one byte per element. Signed arrays: q = round(x / scale) in int8 [-127, 127]. Second moments (>= 0)
  are stored as sqrt(nu), whose dynamic range is half as wide, in uint8 [0, 255] rounded *up*: a restored
  nu is never smaller than the saved one (up to float rounding), so no Adam update mu / (sqrt(nu) + eps)
  grows on resume; rounded to nearest, a small nu in a block with a large one would become 0 and its
  update mu / eps.
Scalars, integer arrays and arrays already in 16 bits (for bf16) are stored as they are.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from picotron_jax.checkpoint.codecs import array_kind
from picotron_jax.config import CheckpointConfig

BLOCK = 256  # elements per scale, at most
ROW_MIN = 64  # elements a block's row spans, at least (when the array has that many)


def describe(c: CheckpointConfig) -> dict[str, Any]:
    """The `quantization` entry of a step's metadata: the stored form of each kind, and whether any is lossy."""
    modes = {"params": c.quantize_params, "first_moment": c.quantize_optimizer,
             "second_moment": c.quantize_optimizer, "counters": "none"}
    return {**modes, "block": BLOCK, "row_min": ROW_MIN, "lossy": any(m != "none" for m in modes.values())}


def is_lossy(quant: dict | None) -> bool:
    return bool(quant and quant.get("lossy"))


def mode_for(name: str, shape: tuple[int, ...], dtype: Any, quant: dict | None) -> str:
    """'none' | 'bf16' | 'int8' for one array of the train state."""
    mode = (quant or {}).get(array_kind(name), "none")
    if mode == "none" or not jnp.issubdtype(dtype, jnp.floating) or len(shape) == 0 or math.prod(shape) == 0:
        return "none"
    if mode == "bf16" and jnp.dtype(dtype).itemsize <= 2:
        return "none"
    return mode


def layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading axes kept, blocks per row, block length) of an array's int8 form."""
    row, k = 1, 0
    while k < len(shape) and row < ROW_MIN:
        k += 1
        row *= shape[-k]
    blocks = -(-row // BLOCK)
    return len(shape) - k, blocks, -(-row // blocks)


def _nonneg(name: str) -> bool:
    return array_kind(name) == "second_moment"


def _int8_encode(x: jax.Array, nonneg: bool) -> dict[str, jax.Array]:
    lead, nb, b = layout(x.shape)
    row = math.prod(x.shape[lead:])
    v = x.reshape(*x.shape[:lead], row).astype(jnp.float32)
    v = jnp.sqrt(jnp.maximum(v, 0.0)) if nonneg else v
    v = jnp.pad(v, [(0, 0)] * lead + [(0, nb * b - row)]).reshape(*x.shape[:lead], nb, b)
    levels = 255.0 if nonneg else 127.0
    scale = jnp.max(jnp.abs(v), axis=-1) / levels  # [*lead, nb]
    r = v / jnp.where(scale > 0, scale, 1.0)[..., None]
    q = jnp.clip(jnp.ceil(r), 0, 255).astype(jnp.uint8) if nonneg else jnp.clip(jnp.round(r), -127, 127).astype(jnp.int8)
    return {"q": q.reshape(*x.shape[:lead], nb * b)[..., :row].reshape(x.shape), "scale": scale}


def _int8_decode(q: jax.Array, scale: jax.Array, nonneg: bool, dtype: Any) -> jax.Array:
    lead, nb, b = layout(q.shape)
    row = math.prod(q.shape[lead:])
    v = q.reshape(*q.shape[:lead], row).astype(jnp.float32)
    v = jnp.pad(v, [(0, 0)] * lead + [(0, nb * b - row)]).reshape(*q.shape[:lead], nb, b) * scale[..., None]
    v = v.reshape(*q.shape[:lead], nb * b)[..., :row].reshape(q.shape)
    return (v * v if nonneg else v).astype(dtype)


@functools.partial(jax.jit, static_argnames=("how",))
def _encode_all(xs: list, how: tuple) -> list:
    """One program for every lossy leaf (one compilation per state layout); how[i] = (mode, nonneg)."""
    return [x.astype(jnp.bfloat16) if mode == "bf16" else _int8_encode(x, nonneg) for x, (mode, nonneg) in zip(xs, how)]


@functools.partial(jax.jit, static_argnames=("how",))
def _decode_all(stored: list, how: tuple) -> list:
    """how[i] = (mode, nonneg, dtype name)."""
    return [s.astype(dtype) if mode == "bf16" else _int8_decode(s["q"], s["scale"], nonneg, jnp.dtype(dtype))
            for s, (mode, nonneg, dtype) in zip(stored, how)]


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _lossy_leaves(tree: Any, quant: dict | None) -> tuple[list, list, Any]:
    """(paths, modes) of the leaves stored lossy, and the tree's flattening."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    picked = [(i, mode_for(_name(p), x.shape, x.dtype, quant)) for i, (p, x) in enumerate(flat)]
    return [(i, m) for i, m in picked if m != "none"], flat, treedef


def encode(tree: Any, quant: dict | None) -> Any:
    """The stored form of a train-state tree: lossy leaves become bf16 arrays or {'q', 'scale'} pairs."""
    if not is_lossy(quant):
        return tree
    picked, flat, treedef = _lossy_leaves(tree, quant)
    how = tuple((m, _nonneg(_name(flat[i][0]))) for i, m in picked)
    encoded = _encode_all([flat[i][1] for i, _ in picked], how)
    leaves = [x for _, x in flat]
    for (i, _), e in zip(picked, encoded):
        leaves[i] = e
    return jax.tree_util.tree_unflatten(treedef, leaves)


def scale_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
    """The scales' layout: the array's partition of the leading axes, the blocks' axis unsplit."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    lead = layout(shape)[0]
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:lead], None))


def stored_target(target: Any, quant: dict | None) -> Any:
    """The restore target of the stored form, from the state's target (ShapeDtypeStructs with shardings)."""
    if not is_lossy(quant):
        return target

    def one(path, t):
        name = _name(path)
        mode = mode_for(name, t.shape, t.dtype, quant)
        if mode == "bf16":
            return jax.ShapeDtypeStruct(t.shape, jnp.bfloat16, sharding=t.sharding)
        if mode == "int8":
            lead, nb, _ = layout(t.shape)
            return {"q": jax.ShapeDtypeStruct(t.shape, jnp.uint8 if _nonneg(name) else jnp.int8, sharding=t.sharding),
                    "scale": jax.ShapeDtypeStruct((*t.shape[:lead], nb), jnp.float32,
                                                  sharding=scale_sharding(t.sharding, t.shape))}
        return t

    return jax.tree_util.tree_map_with_path(one, target)


def decode(stored: Any, target: Any, quant: dict | None) -> Any:
    """The train-state tree back from its stored form, in `target`'s dtypes and shardings."""
    if not is_lossy(quant):
        return stored
    picked, flat, treedef = _lossy_leaves(target, quant)
    parts = treedef.flatten_up_to(stored)  # per target leaf: the stored array, or its {'q', 'scale'}
    how = tuple((m, _nonneg(_name(flat[i][0])), jnp.dtype(flat[i][1].dtype).name) for i, m in picked)
    decoded = _decode_all([parts[i] for i, _ in picked], how)
    for (i, _), x in zip(picked, decoded):
        sharding = getattr(flat[i][1], "sharding", None)
        parts[i] = jax.device_put(x, sharding) if sharding is not None else x
    return jax.tree_util.tree_unflatten(treedef, parts)


def decode_host(tree: Any, quant: dict | None, prefix: str) -> Any:
    """A stored subtree read as host arrays (Orbax's own metadata as the target) back to float32 arrays;
    `prefix` is the subtree's path in the state ('params'), which decides its kind."""
    if not is_lossy(quant):
        return tree
    pair = lambda v: isinstance(v, dict) and set(v) == {"q", "scale"}  # noqa: E731

    def one(path, v):
        name = f"{prefix}/{_name(path)}"
        if pair(v):
            return jax.device_get(_decode_all([v], (("int8", _nonneg(name), "float32"),))[0])
        if quant.get(array_kind(name)) == "bf16" and getattr(v, "dtype", None) == jnp.bfloat16:
            return np.asarray(v, np.float32)
        return v

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=pair)
