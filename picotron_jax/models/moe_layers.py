"""Where the MoE layers sit in the stack, their parameters, and the scan over a mixed stack.

Layer i is MoE when i >= moe.first_dense_layers and (i - first_dense_layers) % moe.every_n_layers
== 0 (DeepSeek's first_k_dense_replace and moe_layer_freq). So the stack is a dense prefix, then
G groups of n = every_n_layers layers, each [MoE, dense x (n-1)]. Both parts are `lax.scan`s
(compile time stays flat in depth): the prefix over its layers, the groups over G with an inner
scan over the group's dense layers.

Parameters of an MoE model: `layers` keeps attention and norms for all L layers [L, ...] and the
dense MLP weights only for the L_dense dense layers [L_dense, ...] (in layer order); `moe` holds
the L_moe = G MoE layers' router and experts [G, ...]. A dense model's tree is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from picotron_jax.config import ModelConfig, MoEConfig

DENSE_MLP_PARAMS = ("w_gate", "w_up", "w_down")

# name -> (logical axes, shape from (G, D, E, F, S)); experts split over `expert`, their MLP over `tensor`.
MOE_PARAMS = {
    "router": (("layers", "embed", None), lambda G, D, E, F, S: (G, D, E)),
    "router_bias": (("layers", None), lambda G, D, E, F, S: (G, E)),
    "w_gate": (("layers", "experts", "embed", "mlp"), lambda G, D, E, F, S: (G, E, D, F)),
    "w_up": (("layers", "experts", "embed", "mlp"), lambda G, D, E, F, S: (G, E, D, F)),
    "w_down": (("layers", "experts", "mlp", "embed"), lambda G, D, E, F, S: (G, E, F, D)),
    "shared_gate": (("layers", "embed", "mlp"), lambda G, D, E, F, S: (G, D, S)),
    "shared_up": (("layers", "embed", "mlp"), lambda G, D, E, F, S: (G, D, S)),
    "shared_down": (("layers", "mlp", "embed"), lambda G, D, E, F, S: (G, S, D)),
}


@dataclass(frozen=True)
class MoEPlan:
    num_layers: int
    first_dense: int
    every_n: int

    @property
    def num_moe(self) -> int:
        return (self.num_layers - self.first_dense) // self.every_n

    @property
    def num_dense(self) -> int:
        return self.num_layers - self.num_moe

    @property
    def moe_layers(self) -> list[int]:
        """Indices (0-based, in the whole stack) of the MoE layers, in the order of the `moe` params."""
        return [self.first_dense + g * self.every_n for g in range(self.num_moe)]


def moe_plan(model: ModelConfig, moe: MoEConfig | None) -> MoEPlan | None:
    if moe is None or not moe.enabled:
        return None
    return MoEPlan(model.num_layers, moe.first_dense_layers, moe.every_n_layers)


def init_moe_params(model: ModelConfig, moe: MoEConfig, plan: MoEPlan, rngs: nnx.Rngs, param_dtype) -> dict:
    """The `moe` parameter dict: normal(init_std), output projections scaled by 1/sqrt(2L) like the
    dense ones; router bias zeros (it only exists when bias balancing is on)."""
    G, D, E = plan.num_moe, model.hidden_size, moe.num_experts
    F = moe.expert_size or model.intermediate_size
    S = moe.shared_experts * F
    params = {}
    for name, (axes, shape_fn) in MOE_PARAMS.items():
        if name == "router_bias" and moe.bias_update_rate == 0 or name.startswith("shared") and S == 0:
            continue
        shape = shape_fn(G, D, E, F, S)
        if name == "router_bias":
            value = jnp.zeros(shape, jnp.float32)
        else:
            down = name in ("w_down", "shared_down")
            std = model.init_std / (2 * model.num_layers) ** 0.5 if down else model.init_std
            dtype = jnp.float32 if name == "router" else param_dtype
            value = std * jax.random.normal(rngs.params(), shape, dtype)
        params[name] = nnx.Param(value, logical_axes=axes)
    return params


def run_mixed_stack(
    layers: dict,
    moe: dict,
    x_BTD: jax.Array,
    plan: MoEPlan,
    dense_block: Callable[[dict, jax.Array], jax.Array],
    moe_block: Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]],
    unroll: int = 1,
) -> tuple[jax.Array, dict]:
    """Run [dense x first_dense] then G x [MoE, dense x (n-1)]; returns x and the MoE stats [G, ...].

    `layers`: attention/norm params [L, ...] and dense MLP params [L_dense, ...]; `moe`: [G, ...].
    `dense_block(p, x)`: one dense decoder layer; `moe_block(p, p_moe, x)`: one MoE decoder layer. `x` is the
    scan's carry, passed through untouched: [B, T, D], or with the monitor's layer probe (models/llama.py) a pair."""
    d, n, G = plan.first_dense, plan.every_n, plan.num_moe
    attn = {k: v for k, v in layers.items() if k not in DENSE_MLP_PARAMS}
    mlp = {k: v for k, v in layers.items() if k in DENSE_MLP_PARAMS}

    def dense_step(x, p):
        return dense_block(p, x), None

    if d:
        prefix = {**{k: v[:d] for k, v in attn.items()}, **{k: v[:d] for k, v in mlp.items()}}
        x_BTD, _ = jax.lax.scan(dense_step, x_BTD, prefix, unroll=min(unroll, d))
    groups = {
        "attn": {k: v[d:].reshape(G, n, *v.shape[1:]) for k, v in attn.items()},
        "mlp": {k: v[d:].reshape(G, n - 1, *v.shape[1:]) for k, v in mlp.items()} if n > 1 else {},
        "moe": moe,
    }

    def group_step(x, g):
        x, stats = moe_block({k: v[0] for k, v in g["attn"].items()}, g["moe"], x)
        if n > 1:
            rest = {**{k: v[1:] for k, v in g["attn"].items()}, **g["mlp"]}
            x, _ = jax.lax.scan(dense_step, x, rest, unroll=min(unroll, n - 1))
        return x, stats

    return jax.lax.scan(group_step, x_BTD, groups, unroll=min(unroll, G))
