"""Validation loss: the same forward the train step runs, over the held-out windows of the corpus.

The loss is the mean over every held-out token (the last batch's padding rows are masked), so it
does not depend on the eval batch size or the layout; perplexity is exp(loss). Pipelined runs use
the pipeline's own forward (parallel/pipeline.py, forward-only), MoE models their routing and
experts, both exactly as in training.
"""

from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picotron_jax.config import Config
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train.state import StateSetup
from picotron_jax.train.step import Batch, make_loss_sums, split_microbatches


def build_eval_step(cfg: Config, rules: MeshRules, setup: StateSetup):
    """Jitted (params, batch) -> (nll sum, token count) over the batch's unmasked tokens."""
    if rules.mesh.shape["pipe"] > 1:
        from picotron_jax.parallel.pipeline import pipeline_loss_and_grads

        forward = pipeline_loss_and_grads(cfg, rules, setup.spec, jnp.dtype(setup.policy.compute_dtype),
                                          forward_only=True, module_dtypes=setup.policy.model_dtypes(),
                                          head_dtype=setup.policy.dtype_of("head"))

        def nll_sum(params, batch):
            return forward(params, split_microbatches(batch, cfg.pipeline.microbatches, rules))[0]
    else:
        loss_sums = make_loss_sums(cfg, rules, setup.spec.graphdef, setup.policy)

        def nll_sum(params, batch):
            return loss_sums(params, batch)[1][0]

    def eval_sums(params, batch):
        return nll_sum(params, batch), jnp.sum(batch["mask"].astype(jnp.float32))

    batch_shardings = {k: rules.batch_sharding() for k in ("inputs", "targets", "mask")}
    replicated = rules.named(P())
    return jax.jit(eval_sums, in_shardings=(setup.shardings.params, batch_shardings),
                   out_shardings=(replicated, replicated))


def evaluate(eval_step, params, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean held-out loss, perplexity and token count.

    One batch at a time: the eval programs do not depend on each other, and on XLA:CPU many of them in
    flight at once can deadlock in their collectives (each device's program blocks a pool thread in a
    rendezvous: seen in `make train`, 32 batches on data=4 x tensor=2 with ZeRO-3, a train step just before)."""
    nll, tokens = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for batch in batches:
        batch_nll, batch_tokens = jax.block_until_ready(eval_step(params, batch))
        nll, tokens = nll + batch_nll, tokens + batch_tokens
    nll, tokens = (float(x) for x in jax.device_get((nll, tokens)))
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(tokens)}
