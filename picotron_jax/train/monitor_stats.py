"""In-step statistics for the monitor (config `monitor`, picotron_jax/observe/monitor.py): extra step outputs.

Every step: the parameter norm and the update/parameter norm ratio (two reductions over the tree the
optimizer already reads). Per layer (`monitor.layer_stats`), on every `monitor.layer_every`-th step and
on any step whose gradient is non-finite (under a `lax.cond`, so the other steps pay nothing):

* `layer_grad_norm` f32[L], `layer_param_norm` f32[L], `layer_update_ratio` f32[L]: over the decoder
  layers' stacked parameters (`params["layers"]`, leading axis L; an MoE model's dense-MLP and expert
  stacks, whose leading axis counts only their own layers, are left out);
* `layer_grad_finite` bool[L] and `module_grad_finite` bool[M] (M = the top-level modules, in sorted order
  of `MODULES(params)`), so the monitor can name where a non-finite gradient sits;
* `layer_stats_step` bool: whether this step's per-layer fields were computed (zeros otherwise);
* `layer_act_rms` f32[L] (root mean square of each decoder layer's output over the batch, sequence and
  width) and `layer_attn_logit_max` f32[L] (its largest causal attention logit q.k/sqrt(K)), recorded by
  the layers themselves during the forward pass (models/llama.py `LayerProbe`, no extra pass), on every
  `monitor.layer_every`-th step only (`layer_act_step`; a non-finite gradient is known after the forward).

Shapes: L decoder layers, M top-level parameter groups other than the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from picotron_jax.models.llama import PROBE_COMBINE


def modules(params: dict) -> list[str]:
    """The top-level parameter groups other than `layers` (embed, final_norm, lm_head, moe), sorted."""
    return sorted(k for k in params if k != "layers")


def _stacked(tree: dict, num_layers: int) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if x.ndim >= 1 and x.shape[0] == num_layers]


def _after_layer(x: jax.Array) -> tuple[int, ...]:
    """Reduce over every axis after the layer axis, without a reshape: a reshape of a ZeRO-sharded
    gradient made GSPMD all-gather it first."""
    return tuple(range(1, x.ndim))


def _per_layer_sq(leaves: list[jax.Array], num_layers: int) -> jax.Array:
    out_L = jnp.zeros((num_layers,), jnp.float32)
    for x in leaves:
        out_L = out_L + jnp.sum(jnp.square(x.astype(jnp.float32)), axis=_after_layer(x))
    return out_L


def _per_layer_finite(leaves: list[jax.Array], num_layers: int) -> jax.Array:
    out_L = jnp.ones((num_layers,), bool)
    for x in leaves:
        out_L = out_L & jnp.all(jnp.isfinite(x), axis=_after_layer(x))
    return out_L


def layer_fields(params: dict, grads: dict, updates: dict, num_layers: int) -> dict[str, jax.Array]:
    """The per-layer fields of one step (see the module docstring)."""
    g, p, u = (_stacked(t["layers"], num_layers) for t in (grads, params, updates))
    grad_L, param_L, update_L = (jnp.sqrt(_per_layer_sq(x, num_layers)) for x in (g, p, u))
    return {
        "layer_grad_norm": grad_L,
        "layer_param_norm": param_L,
        "layer_update_ratio": update_L / jnp.maximum(param_L, 1e-12),
        "layer_grad_finite": _per_layer_finite(g, num_layers),
        "module_grad_finite": jnp.stack([jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                                             for x in jax.tree.leaves(grads[m])]))
                                         for m in modules(grads)]),
    }


def probe_on(cfg, step: jax.Array) -> jax.Array | None:
    """Whether the layers record their activation statistics in this step (None: the monitor never asks)."""
    if not (cfg.monitor.enabled and cfg.monitor.layer_stats and cfg.monitor.layer_activations):
        return None
    return (step + 1) % cfg.monitor.layer_every == 0


def combine_probes(a: dict | None, b: dict | None) -> dict | None:
    """Two microbatches' probe sums: mean squares add (divided once by `probe_fields`), maxima take the max
    (None: the step has no probe)."""
    if a is None:
        return None
    pair = {"sum": jnp.add, "max": jnp.maximum}
    return {k: pair[rule](a[k], b[k]) for k, rule in PROBE_COMBINE.items()}


def combine_groups(probed_G: dict | None) -> dict | None:
    """Probe sums over ZeRO's data groups [G, L] (parallel/zero.py; None: the step has no probe)."""
    if probed_G is None:
        return None
    over = {"sum": jnp.sum, "max": jnp.max}
    return {k: over[rule](probed_G[k], axis=0) for k, rule in PROBE_COMBINE.items()}


def probe_fields(probed: dict, count: int, on: jax.Array) -> dict[str, jax.Array]:
    """The step outputs of the probe sums over `count` equal parts of the batch."""
    return {"layer_act_rms": jnp.sqrt(probed["act_ms"] / count), "layer_attn_logit_max": probed["attn_logit_max"],
            "layer_act_step": on}


def step_stats(cfg, step: jax.Array, params: dict, grads: dict, updates: dict,
               grad_norm: jax.Array) -> dict[str, jax.Array]:
    """The monitor's step outputs; `step` is the step counter before this update (0-based)."""
    param_norm = optax.tree.norm(params)
    out = {"param_norm": param_norm, "update_ratio": optax.tree.norm(updates) / jnp.maximum(param_norm, 1e-12)}
    if not cfg.monitor.layer_stats:
        return out
    num_layers = cfg.model.num_layers
    compute = lambda: layer_fields(params, grads, updates, num_layers)  # noqa: E731
    shapes = jax.eval_shape(compute)
    on = ((step + 1) % cfg.monitor.layer_every == 0) | ~jnp.isfinite(grad_norm)
    fields = jax.lax.cond(on, compute,
                          lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    return {**out, **fields, "layer_stats_step": on}
