"""The jitted train step: causal-LM loss, gradient accumulation (a scan), clipping, AdamW.

Loss normalisation: the loss is the mean over *all* unmasked tokens of the global batch, so a
step with gradient accumulation over m microbatches equals the step on the whole batch. Each
microbatch contributes sums (of nll and of log(Z)^2) that are divided once at the end.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from picotron_jax.config import Config
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.parallel.vocab import vocab_parallel_cross_entropy
from picotron_jax.train.state import StateSetup, TrainState

Batch = dict[str, jax.Array]  # inputs, targets: int32 [B, T]; mask: float32 [B, T]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_loss_sums(cfg: Config, rules: MeshRules, graphdef: Any) -> Callable[[Any, Batch], tuple[jax.Array, Any]]:
    """params, batch -> (objective sum, (nll sum, z sum)); sums over the batch's unmasked tokens."""
    compute_dtype = COMPUTE_DTYPES[cfg.train.dtype]
    z_coef = cfg.train.z_loss

    def loss_sums(params, batch):
        model = nnx.merge(graphdef, nnx.State(params))
        batch, positions_T = to_sequence_layout(batch, rules)
        h_BTD = model.hidden_states(batch["inputs"], rules, compute_dtype, positions_T)
        head = model.head_weight().astype(compute_dtype)
        nll, z = vocab_parallel_cross_entropy(
            rules, h_BTD, head, batch["targets"], batch["mask"], vocab_first=model.head_is_vocab_first
        )
        return nll + z_coef * z, (nll, z)

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
    """params, batch -> (metrics dict, mean-token gradients), accumulated over train.grad_accum."""
    loss_sums = make_loss_sums(cfg, rules, setup.spec.graphdef)
    grad_of_sums = jax.value_and_grad(loss_sums, has_aux=True)
    m = cfg.train.grad_accum
    param_shardings = setup.shardings.params
    pipelined = None
    if rules.mesh.shape["pipe"] > 1:  # parallel/pipeline.py: the microbatches flow through the pipe stages
        from picotron_jax.parallel.pipeline import pipeline_loss_and_grads

        pipelined = pipeline_loss_and_grads(cfg, rules, setup.spec)

    def grads_and_metrics(params, batch):
        tokens = jnp.sum(batch["mask"].astype(jnp.float32))
        if pipelined is not None:
            nll, z, grads = pipelined(params, split_microbatches(batch, cfg.pipeline.microbatches, rules))
        elif m == 1:
            (_, (nll, z)), grads = grad_of_sums(params, batch)
        else:
            micro = split_microbatches(batch, m, rules)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)

            def accumulate(carry, mb):
                g_acc, nll_acc, z_acc = carry
                (_, (nll, z)), g = grad_of_sums(params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, nll_acc + nll, z_acc + z), None

            (grads, nll, z), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
        metrics = {"loss": nll / denom, "z_loss": z / denom, "tokens": tokens}
        return metrics, grads

    return grads_and_metrics


def build_train_step(cfg: Config, rules: MeshRules, setup: StateSetup):
    """Returns jitted (state, batch) -> (state, metrics); the state is donated."""
    grads_and_metrics = make_grad_fn(cfg, rules, setup)

    def train_step(state: TrainState, batch: Batch):
        metrics, grads = grads_and_metrics(state.params, batch)
        grads = jax.lax.with_sharding_constraint(grads, setup.shardings.params)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": setup.schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = rules.named(P())
    batch_shardings = {k: rules.batch_sharding() for k in ("inputs", "targets", "mask")}
    return jax.jit(
        train_step,
        in_shardings=(setup.shardings, batch_shardings),
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
