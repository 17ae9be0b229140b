"""AdamW (Loshchilov & Hutter 2019) with linear warmup + cosine decay and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from picotron_jax.config import Config

NO_DECAY_MARKERS = ("norm", "bias")  # norms and biases are not decayed (as in GPT-3 / Llama)


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 to `optimizer.lr`, then cosine decay to `lr * min_lr_ratio`."""
    o = cfg.optimizer
    warmup = min(o.warmup_steps, cfg.train.steps)
    decay = o.decay_steps or max(cfg.train.steps - warmup, 1)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=warmup + decay,
        end_value=o.lr * o.min_lr_ratio,
    )
    # step s (0-based) uses the rate of s+1, so the first update is not wasted at lr = 0
    return lambda step: base(step + 1)


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norms and biases."""

    def decays(path, _):
        names = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(marker in names for marker in NO_DECAY_MARKERS)

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optimizer
    schedule = lr_schedule(cfg)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask)
    )
    return optax.chain(*parts), schedule
