"""Grouped matmuls of the dropless MoE: rows sorted by expert, each group through its own expert's SwiGLU.

Two implementations of the same function, chosen per backend by `grouped_swiglu`:

* `ragged_swiglu`: `jax.lax.ragged_dot` (grouped GEMMs on GPU/TPU). On XLA:CPU (jaxlib 0.10) its
  lowering is about 5x slower than plain batched matmuls of the same FLOPs (benchmarks/README.md).
* `block_swiglu`: the MegaBlocks idea (Gale et al. 2023, section 5) with dense ops only. Each expert's
  group is padded to a multiple of a block of rows, so the padded rows form NB = ceil(M / block) + E
  fixed-size blocks (a static bound: sum_e ceil(s_e / block) <= M / block + E), every block belonging to
  one expert. The blocks then run as one batched matmul against their experts' weights gathered per
  block ([NB, block, D] x [NB, D, F]): block-diagonal, no FLOPs spent across experts, only the
  padding (< block rows per expert). The weights' gradients are the per-block gradients summed back
  into their experts by the gather's transpose.

Both take rows [M, D] sorted by expert with group_sizes_E rows per expert; rows past sum(group_sizes_E)
(padding of the expert-parallel exchange) come out as zeros. Shapes: M rows, D model, F expert MLP
width, E experts, N blocks (NB), R rows per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from picotron_jax.models.linear import project

BLOCK_ROWS = 128  # rows per block: padding < 128 rows per expert; measured in benchmarks/README.md (MoE)


def ragged_swiglu(x_MD: jax.Array, group_sizes_E: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """SwiGLU with `jax.lax.ragged_dot` grouped matmuls."""
    gate = jax.lax.ragged_dot(x_MD, w_gate_EDF, group_sizes_E)
    up = jax.lax.ragged_dot(x_MD, w_up_EDF, group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_EFD, group_sizes_E)


def block_layout(group_sizes_E: jax.Array, num_rows: int, block: int) -> tuple[jax.Array, jax.Array, int]:
    """Where each sorted row goes in the padded blocks, and each block's expert.

    Returns (slot_M: padded row of each row, NB * block for rows past the groups; expert_N: expert of
    each block, trailing unused blocks given the last expert (their rows are zeros); NB)."""
    E = group_sizes_E.shape[0]
    NB = -(-num_rows // block) + E
    blocks_E = (group_sizes_E + block - 1) // block
    ends_E = jnp.cumsum(group_sizes_E)
    block_ends_E = jnp.cumsum(blocks_E)
    row_M = jnp.arange(num_rows)
    e_M = jnp.searchsorted(ends_E, row_M, side="right")  # E for rows past the last group
    e_safe_M = jnp.minimum(e_M, E - 1)
    slot_M = block * (block_ends_E - blocks_E)[e_safe_M] + row_M - (ends_E - group_sizes_E)[e_safe_M]
    slot_M = jnp.where(e_M < E, slot_M, NB * block)
    expert_N = jnp.minimum(jnp.searchsorted(block_ends_E, jnp.arange(NB), side="right"), E - 1)
    return slot_M, expert_N, NB


def block_swiglu(x_MD: jax.Array, group_sizes_E: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD,
                 block: int = BLOCK_ROWS) -> jax.Array:
    """SwiGLU of expert-sorted rows as a batched matmul over fixed-size, single-expert row blocks."""
    M, D = x_MD.shape
    block = max(1, min(block, M))
    slot_M, expert_N, NB = block_layout(group_sizes_E, M, block)
    x_NRD = jnp.zeros((NB * block, D), x_MD.dtype).at[slot_M].set(x_MD, mode="drop").reshape(NB, block, D)
    gate_NRF = project("nrd,ndf->nrf", x_NRD, w_gate_EDF[expert_N])
    up_NRF = project("nrd,ndf->nrf", x_NRD, w_up_EDF[expert_N])
    y_NRD = project("nrf,nfd->nrd", jax.nn.silu(gate_NRF) * up_NRF, w_down_EFD[expert_N])
    return jnp.take(y_NRD.reshape(NB * block, D), slot_M, axis=0, mode="fill", fill_value=0)


def grouped_swiglu(x_MD: jax.Array, group_sizes_E: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """The dropless experts' SwiGLU: row blocks on CPU (where ragged_dot is slow), ragged_dot elsewhere."""
    fn = block_swiglu if jax.default_backend() == "cpu" else ragged_swiglu
    return fn(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD)
