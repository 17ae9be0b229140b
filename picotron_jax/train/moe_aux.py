"""The MoE terms of a train step: balancing losses in the objective, per-layer metrics, and the
aux-loss-free bias update.

The step's objective is a sum over tokens divided once by the global token count (train/step.py).
The balancing losses are means over a microbatch, so each microbatch adds them times its token
count: with one microbatch that is exactly coef * loss, with several a token-weighted mean.
They are summed over the MoE layers (Megatron-Core adds each layer's loss the same way).

Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"):
after each step, b_e += rate * sign(mean load - load_e) with the loads counted over the step's
whole batch. The bias lives in the parameters (so it is checkpointed and sharded like them) but
gets no gradient; the optimizer's update of it is replaced by this rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import Config, MoEConfig
from picotron_jax.models.moe_layers import moe_plan


def token_weighted(stats: dict | None, n_tokens: jax.Array) -> dict | None:
    """One microbatch's per-layer stats with the losses scaled by its token count (sums add up)."""
    if stats is None:
        return None
    return {**stats, "aux": stats["aux"] * n_tokens, "z": stats["z"] * n_tokens}


def balancing_objective(cfg: MoEConfig, weighted: dict | None) -> jax.Array:
    """aux_loss * sum over layers of the Switch loss + router_z_loss * sum of the z-losses (token-weighted)."""
    if weighted is None:
        return jnp.zeros((), jnp.float32)
    return cfg.aux_loss * jnp.sum(weighted["aux"]) + cfg.router_z_loss * jnp.sum(weighted["z"])


def step_metrics(sums: dict | None, tokens: jax.Array) -> dict[str, jax.Array]:
    """Per-layer arrays for the step's metrics: load [L_moe, E] (token copies per expert), dropped
    fraction, aux and z-loss [L_moe]."""
    if sums is None:
        return {}
    load = sums["load"]
    return {
        "moe_load": load,
        "moe_dropped": sums["dropped"] / jnp.maximum(jnp.sum(load, axis=-1), 1.0),
        "moe_aux": sums["aux"] / tokens,
        "moe_z": sums["z"] / tokens,
    }


def update_router_bias(cfg: MoEConfig, old_params: Any, new_params: Any, metrics: dict) -> Any:
    """Replace the optimizer's router-bias update by the sign rule (no-op unless bias balancing is on)."""
    if not cfg.enabled or cfg.bias_update_rate == 0:
        return new_params
    load = metrics["moe_load"]
    step = cfg.bias_update_rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    bias = old_params["moe"]["router_bias"] + step.astype(old_params["moe"]["router_bias"].dtype)
    return {**new_params, "moe": {**new_params["moe"], "router_bias": bias}}


def log_fields(cfg: Config, metrics: dict) -> dict[str, float]:
    """metrics.jsonl fields per MoE layer i (its index in the whole stack):
    moe_l{i}_tokens_min / _max / _mean (token copies per expert this step), moe_l{i}_dropped
    (fraction of copies dropped), moe_l{i}_aux, moe_l{i}_z; plus their means over layers
    moe_aux, moe_z, moe_dropped and moe_load_max_over_mean (1.0 = perfectly balanced)."""
    plan = moe_plan(cfg.model, cfg.moe)
    if plan is None or "moe_load" not in metrics:
        return {}
    load = np.asarray(metrics["moe_load"], np.float64)
    row: dict[str, float] = {}
    for g, layer in enumerate(plan.moe_layers):
        row[f"moe_l{layer}_tokens_min"] = float(load[g].min())
        row[f"moe_l{layer}_tokens_max"] = float(load[g].max())
        row[f"moe_l{layer}_tokens_mean"] = float(load[g].mean())
        for name in ("dropped", "aux", "z"):
            row[f"moe_l{layer}_{name}"] = float(metrics[f"moe_{name}"][g])
    for name in ("aux", "z", "dropped"):
        row[f"moe_{name}"] = float(np.mean(metrics[f"moe_{name}"]))
    row["moe_load_max_over_mean"] = float(np.mean(load.max(-1) / np.maximum(load.mean(-1), 1e-9)))
    return row


def log_suffix(row: dict) -> str:
    """' | moe aux 1.012 drop 0.4% max/mean 1.31' for the log line (empty for dense models)."""
    if "moe_aux" not in row:
        return ""
    return (f" | moe aux {row['moe_aux']:.3f} drop {100 * row['moe_dropped']:.1f}% "
            f"max/mean {row['moe_load_max_over_mean']:.2f}")
