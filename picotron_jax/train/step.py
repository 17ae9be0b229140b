"""The jitted train step: causal-LM loss, gradient accumulation (a scan), clipping, AdamW.

Loss normalisation: the loss is the mean over *all* unmasked tokens of the global batch, so a
step with gradient accumulation over m microbatches equals the step on the whole batch. Each
microbatch contributes sums (of nll and of log(Z)^2) that are divided once at the end.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from picotron_jax.config import Config
from picotron_jax.errors import UserError
from picotron_jax.parallel.ops import MeshOps
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.models import llama
from picotron_jax.parallel import zero
from picotron_jax.train import faults, moe_aux, monitor_stats, spike_guard
from picotron_jax.train import precision as mp
from picotron_jax.train.remat import make_layer_stack, stage_layer_stacks
from picotron_jax.train.state import StateSetup, TrainState

Batch = dict[str, jax.Array]  # inputs, targets: int32 [B, T]; mask: float32 [B, T]


def make_loss_sums(cfg: Config, rules: MeshRules, graphdef: Any, policy: mp.PrecisionPolicy | None = None,
                   layer_stack: Callable | None = None) -> Callable[[Any, Batch], tuple[jax.Array, Any]]:
    """params, batch[, fault flags] -> (objective sum, (nll sum, z sum, MoE stats, probe stats)); sums over the
    batch's unmasked tokens; the fault flags arm the fault injector's in-step faults (train/faults.py);
    `probe_on` (a traced bool) has the layers record the monitor's activation statistics (models/llama.py
    `LayerProbe`: {act_ms, attn_logit_max} f32[L], else None).

    Dtypes follow the precision policy (train/precision.py), the layer scan the remat policy
    (or `layer_stack`, e.g. the probes of train/precision_analysis.py). The third aux output holds
    the MoE stats (None for a dense model), weighted by tokens (train/moe_aux.py)."""
    policy = policy or mp.resolve_policy(cfg, list(rules.mesh.devices.flat))
    compute_dtype = jnp.dtype(policy.compute_dtype)
    module_dtypes = policy.model_dtypes()
    head_dtype = policy.dtype_of("head")
    layer_stack = layer_stack or make_layer_stack(cfg)
    z_coef = cfg.train.z_loss
    ops = MeshOps(rules)

    def loss_sums(params, batch, fault_flags=None, layer_tap=None, probe_on=None):
        model = nnx.merge(graphdef, nnx.State(params))
        tap = layer_tap  # the model's hook on every decoder layer's output (the layout bisect's probes)
        if fault_flags is not None:  # the fault injector's in-step faults (train/faults.py)
            batch = faults.noisy_tokens(cfg.faults, fault_flags, batch, cfg.model.vocab_size, cfg.train.seed)
            tap = faults.layer_tap(cfg.faults, fault_flags)
        batch, positions_T = to_sequence_layout(batch, rules)
        h_BTD, moe_stats, probed = model.hidden_states_and_stats(batch["inputs"], ops, compute_dtype, positions_T,
                                                                 module_dtypes, layer_stack, tap, probe_on)
        nll, z = llama.head_loss(h_BTD, {llama.head_param(cfg.model): model.head_weight()}, batch["targets"],
                                 batch["mask"], cfg.model, ops, head_dtype)
        moe_stats = moe_aux.token_weighted(moe_stats, jnp.sum(batch["mask"].astype(jnp.float32)))
        return nll + z_coef * z + moe_aux.balancing_objective(cfg.moe, moe_stats), (nll, z, moe_stats, probed)

    return loss_sums


def to_sequence_layout(batch: Batch, rules: MeshRules) -> tuple[Batch, jax.Array | None]:
    """Reorder the sequence columns into the context layout (zigzag, parallel/context.py) and
    return the rotary positions to match; the identity (positions None) otherwise.

    Batches keep their natural order everywhere outside the step (loader, tests, bench), so no
    caller needs to know the layout. The loss is a masked sum over tokens: the order does not
    change it. The reorder moves only the int32/float32 [B, T] token arrays (see README)."""
    T = batch["inputs"].shape[-1]
    order = rules.sequence_order(T)
    if np.array_equal(order, np.arange(T)):
        return batch, None

    def reorder(x_BT):
        return rules.constrain(jnp.take(x_BT, order, axis=-1), ("batch", "seq"))

    return jax.tree.map(reorder, batch), jnp.asarray(order, jnp.int32)


def split_microbatches(batch: Batch, m: int, rules: MeshRules) -> Batch:
    """[B, T] -> [m, B/m, T]. Microbatch j takes rows j, m+j, 2m+j, ... so that every device keeps
    its own rows (its contiguous block of B splits evenly into all m microbatches): no traffic."""

    def split(x):
        B = x.shape[0]
        x = x.reshape(B // m, m, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, rules.named(P(None, *rules.activation_spec(("batch", "seq")))))

    return jax.tree.map(split, batch)


def make_grad_fn(cfg: Config, rules: MeshRules, setup: StateSetup):
    """params, batch[, loss scale] -> (metrics dict, mean-token gradients), accumulated over
    train.grad_accum. With a loss scale S the backward pass runs on S x (mean-token loss), so that
    fp16 gradients keep their magnitude, and the gradients are divided by S in fp32."""
    grouped = zero.reduce_scatters(cfg, rules)  # ZeRO: unreduced gradients per data group, then a reduce-scatter
    inner_rules = zero.group_rules(rules) if grouped else rules
    loss_sums = make_loss_sums(cfg, inner_rules, setup.spec.graphdef, setup.policy)

    def scaled_loss_sums(params, batch, scale, fault_flags, probe_on):
        objective, aux = loss_sums(params, batch, fault_flags, probe_on=probe_on)
        return objective if scale is None else objective * scale, aux

    grad_of_sums = jax.value_and_grad(scaled_loss_sums, has_aux=True)
    m = cfg.train.grad_accum
    spec = setup.spec
    param_shardings = jax.tree.map(inner_rules.named, zero.group_param_specs(rules, spec.logical_axes, spec.shapes),
                                   is_leaf=lambda x: isinstance(x, P)) if grouped else setup.shardings.params
    mlp_dtypes = [m for m, _ in setup.policy.module_dtypes if m in ("layers.w_gate", "layers.w_up", "layers.w_down")]
    if cfg.moe.enabled and (setup.policy.loss_scaling or mlp_dtypes):
        raise UserError(f"MoE layers (moe.num_experts = {cfg.moe.num_experts}) run their experts in the compute "
                        f"dtype without loss scaling; {setup.policy.describe()} needs precision.mode fp32 or bf16 "
                        f"without MLP overrides ({', '.join(mlp_dtypes) or 'none here'})")
    pipelined = None
    if rules.mesh.shape["pipe"] > 1:  # parallel/pipeline.py: the microbatches flow through the pipe stages
        from picotron_jax.parallel.pipeline import pipeline_loss_and_grads
        from picotron_jax.parallel.pipeline_schedule import schedule_of_config

        policy, sched = setup.policy, schedule_of_config(cfg, rules.mesh.shape["pipe"])
        pipelined = pipeline_loss_and_grads(cfg, rules, setup.spec, jnp.dtype(policy.compute_dtype),
                                            module_dtypes=policy.model_dtypes(), head_dtype=policy.dtype_of("head"),
                                            stage_stacks=stage_layer_stacks(cfg, sched.num_stages),
                                            layer_tap_of=functools.partial(faults.layer_tap, cfg.faults))

    def gradient_sums(params, batch, sums_scale, fault_flags, probe_on):
        """(gradient sums, nll sum, z sum, MoE sums, probe sums) over the batch, accumulated over m microbatches
        (probe sums: `act_ms` summed, `attn_logit_max` the max; monitor_stats.probe_fields divides)."""
        if m == 1:
            (_, (nll, z, moe, probed)), grads = grad_of_sums(params, batch, sums_scale, fault_flags, probe_on)
            return grads, nll, z, moe, probed
        micro = split_microbatches(batch, m, inner_rules)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)

        def accumulate(carry, mb):
            g_acc, nll_acc, z_acc, moe_acc, probe_acc = carry
            (_, (nll, z, moe, probed)), g = grad_of_sums(params, mb, sums_scale, fault_flags, probe_on)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, nll_acc + nll, z_acc + z, jax.tree.map(jnp.add, moe_acc, moe),
                    monitor_stats.combine_probes(probe_acc, probed)), None

        aux_shapes = jax.eval_shape(grad_of_sums, params, jax.tree.map(lambda x: x[0], micro), sums_scale,
                                    fault_flags, probe_on)[0][1]
        moe0, probe0 = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t) for t in aux_shapes[2:4])
        (grads, nll, z, moe, probed), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, moe0, probe0), micro)
        return grads, nll, z, moe, probed

    def grads_and_metrics(params, batch, scale=None, fault_flags=None, probe_on=None):
        tokens = jnp.sum(batch["mask"].astype(jnp.float32))
        denom = jnp.maximum(tokens, 1.0)
        sums_scale = None if scale is None else scale / denom  # S x (sum / tokens)
        if pipelined is not None:
            if fault_flags is not None:
                batch = faults.noisy_tokens(cfg.faults, fault_flags, batch, cfg.model.vocab_size, cfg.train.seed)
            micro = split_microbatches(batch, cfg.pipeline.microbatches, rules)
            nll, z, grads, probed, moe = pipelined(params, micro, sums_scale, fault_flags, probe_on)
            probe_count = cfg.pipeline.microbatches
        elif grouped:  # parallel/zero.py: each data rank's gradient sums, reduce-scattered over data
            if fault_flags is not None:  # the noise spike on the whole batch, as without groups
                batch = faults.noisy_tokens(cfg.faults, fault_flags, batch, cfg.model.vocab_size, cfg.train.seed)
                fault_flags = fault_flags.at[faults.SPIKE].set(0)
            sums_G = jax.vmap(gradient_sums, in_axes=(None, 0, None, None, None), spmd_axis_name=zero.ZERO_AXIS)
            grads_G, nll_G, z_G, moe, probed_G = sums_G(params, zero.split_data_groups(batch, rules), sums_scale,
                                                        fault_flags, probe_on)
            grads = zero.reduce_scatter_groups(rules, grads_G, spec.logical_axes, spec.shapes)
            nll, z = jnp.sum(nll_G), jnp.sum(z_G)
            probed, probe_count = monitor_stats.combine_groups(probed_G), m * rules.mesh.shape[zero.ZERO_AXIS]
        else:
            grads, nll, z, moe, probed = gradient_sums(params, batch, sums_scale, fault_flags, probe_on)
            probe_count = m
        grad_denom = denom if scale is None else scale
        grads = jax.tree.map(lambda g: (g / grad_denom).astype(jnp.float32), grads)
        metrics = {"loss": nll / denom, "z_loss": z / denom, "tokens": tokens, **moe_aux.step_metrics(moe, denom)}
        if probe_on is not None:  # the monitor's per-layer activation statistics (train/monitor_stats.py)
            metrics = {**metrics, **monitor_stats.probe_fields(probed, probe_count, probe_on)}
        return metrics, grads

    return grads_and_metrics


def build_train_step(cfg: Config, rules: MeshRules, setup: StateSetup):
    """Returns jitted (state, batch) -> (state, metrics); the state is donated. With in-step faults
    configured (`faults.nan_step` / `faults.spike_step`), (state, batch, fault flags int32[2])."""
    grads_and_metrics = make_grad_fn(cfg, rules, setup)
    matmul_precision = mp.matmul_precision(cfg)
    grad_shardings = setup.shardings.params  # reduce-scattered gradients stay in ZeRO's layout for the update
    if zero.reduce_scatters(cfg, rules):
        grad_shardings = rules.opt_param_shardings(setup.spec.logical_axes, setup.spec.shapes)

    def train_step(state: TrainState, batch: Batch, fault_flags=None):
        with jax.default_matmul_precision(matmul_precision):
            return update(state, batch, fault_flags)

    def update(state: TrainState, batch: Batch, fault_flags):
        scaler = state.loss_scale
        metrics, grads = grads_and_metrics(state.params, batch, None if scaler is None else scaler.scale, fault_flags,
                                           monitor_stats.probe_on(cfg, state.step))
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        with jax.named_scope("optimizer"):
            updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
            if fault_flags is not None and (factor := faults.update_scale(cfg.faults, fault_flags)) is not None:
                updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
            params = optax.apply_updates(state.params, updates)
            params = moe_aux.update_router_bias(cfg.moe, state.params, params, metrics)
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": setup.schedule(state.step)}
        if cfg.monitor.enabled:  # the monitor's in-step statistics (train/monitor_stats.py)
            with jax.named_scope("monitor"):
                metrics = {**metrics, **monitor_stats.step_stats(cfg, state.step, state.params, grads, updates,
                                                                 metrics["grad_norm"])}
            if cfg.monitor.on_nan == "skip":  # a non-finite gradient: this step's update is not applied
                finite = jnp.isfinite(metrics["grad_norm"])
                params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (params, opt_state), (state.params, state.opt_state))
                metrics = {**metrics, "update_skipped": ~finite}
        spike = state.spike
        if spike is not None:  # monitor.on_spike=skip: a spiky step's update is not applied (train/spike_guard.py)
            spike, spiky, spike_metrics = spike_guard.judge(cfg.monitor, spike, state.step, metrics["loss"],
                                                            metrics["grad_norm"])
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(spiky, old, new),
                                             (params, opt_state), (state.params, state.opt_state))
            metrics = {**metrics, **spike_metrics, "update_skipped": spiky | metrics.get("update_skipped", False)}
        if scaler is not None:  # fp16: skip the update on non-finite gradients, adjust the scale
            finite = mp.all_finite(grads)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params, opt_state = jax.tree.map(keep, (params, opt_state), (state.params, state.opt_state))
            scaler = mp.update_loss_scale(scaler, finite, mp.overflow_origin(grads),
                                          cfg.precision.loss_scale_growth_interval)
            metrics = {**metrics, "loss_scale": scaler.scale, "skipped_steps": scaler.skipped,
                       "module_overflows": scaler.module_overflows}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=scaler,
                          spike=spike), metrics

    replicated = rules.named(P())
    batch_shardings = {k: rules.batch_sharding() for k in ("inputs", "targets", "mask")}
    in_shardings = (setup.shardings, batch_shardings, replicated) if cfg.faults.in_step else \
        (setup.shardings, batch_shardings)
    return jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(setup.shardings, replicated),
        donate_argnums=(0,),
    )


def build_grad_fn(cfg: Config, rules: MeshRules, setup: StateSetup):
    """Jitted params, batch -> (metrics, grads): for tests and analysis of one step's gradients."""
    batch_shardings = {k: rules.batch_sharding() for k in ("inputs", "targets", "mask")}
    return jax.jit(
        make_grad_fn(cfg, rules, setup),
        in_shardings=(setup.shardings.params, batch_shardings),
        out_shardings=(rules.named(P()), setup.shardings.params),
    )
