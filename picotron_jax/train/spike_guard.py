"""Loss and grad-norm spikes judged inside the jitted step, so a spiky update is never applied
(`monitor.on_spike=skip`; MaxText's `skip_step_on_spikes`, with the monitor's robust rule).

The rule is observe/monitor.py's `RobustWindow`, on device: a value is a spike when it exceeds both
median + `monitor.spike_mads` x 1.4826 x MAD of the window and (1 + `spike_min_rel`) x median
(`grad_spike_min_rel` for the grad norm); nothing is judged before the window holds 8 values nor in the
first `monitor.warmup` optimizer steps. Each window holds the last `monitor.window` finite values that
were not spikes (a ring buffer). The windows live in the train state (`TrainState.spike`), so they are
checkpointed: a resumed run judges every step exactly as the uninterrupted run did.

A spiky step keeps the parameters and the optimizer state it started from (bitwise); the step counter
(and so the learning-rate schedule) moves on, as for a skipped fp16 overflow.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

MAD_TO_SIGMA = 1.4826  # as observe/monitor.py
MIN_VALUES = 8  # values in a window before it judges (as RobustWindow)


@flax.struct.dataclass
class Window:
    values_W: jax.Array  # float32 [monitor.window]: a ring buffer
    count: jax.Array  # int32 []: values pushed so far (slot count % W is the next one)


@flax.struct.dataclass
class SpikeState:
    loss: Window
    grad_norm: Window
    skipped: jax.Array  # int32 []: updates skipped as spikes so far


def wanted(cfg) -> bool:
    return cfg.monitor.enabled and cfg.monitor.on_spike == "skip"


def init_spike_state(size: int) -> SpikeState:
    def window():
        return Window(values_W=jnp.zeros((size,), jnp.float32), count=jnp.zeros((), jnp.int32))

    return SpikeState(loss=window(), grad_norm=window(), skipped=jnp.zeros((), jnp.int32))


def limit(w: Window, mads: float, min_rel: float) -> jax.Array:
    """The value above which a new one is a spike: inf until the window holds MIN_VALUES values."""
    size = w.values_W.shape[0]
    held = jnp.arange(size) < jnp.minimum(w.count, size)
    v_W = jnp.where(held, w.values_W, jnp.nan)
    med = jnp.nanmedian(v_W)
    mad = jnp.nanmedian(jnp.abs(v_W - med))
    bound = jnp.maximum(med + mads * MAD_TO_SIGMA * mad, (1.0 + min_rel) * med)
    return jnp.where(w.count >= min(MIN_VALUES, size), bound, jnp.inf)


def push(w: Window, value: jax.Array, keep: jax.Array) -> Window:
    """`w` with `value` appended where `keep` (the oldest value dropped once full)."""
    size = w.values_W.shape[0]
    appended = w.values_W.at[w.count % size].set(value.astype(jnp.float32))
    return Window(values_W=jnp.where(keep, appended, w.values_W), count=w.count + keep.astype(jnp.int32))


def judge(m, state: SpikeState, steps_taken: jax.Array, loss: jax.Array, grad_norm: jax.Array):
    """(new state, skip this update?, metrics) for the step after `steps_taken` optimizer steps."""
    judged = steps_taken + 1 > m.warmup
    loss_limit = limit(state.loss, m.spike_mads, m.spike_min_rel)
    grad_limit = limit(state.grad_norm, m.spike_mads, m.grad_spike_min_rel)
    loss_spike = judged & (loss > loss_limit)
    grad_spike = judged & (grad_norm > grad_limit)
    spike = loss_spike | grad_spike
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = SpikeState(loss=push(state.loss, loss, ~loss_spike & finite),
                     grad_norm=push(state.grad_norm, grad_norm, ~grad_spike & finite),
                     skipped=state.skipped + spike.astype(jnp.int32))
    metrics = {"loss_spike": loss_spike, "grad_spike": grad_spike, "spike_loss_limit": loss_limit,
               "spike_grad_limit": grad_limit, "spike_skips": new.skipped}
    return new, spike, metrics
