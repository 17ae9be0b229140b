"""In-step faults of the fault injector (config `faults`): inside the jitted step, chosen by the config.

Three faults, each at one step k (1-based):

* a NaN added to decoder layer l's output in the forward pass (`faults.nan_site=forward`), or to
  the gradient that reaches that output in the backward pass (`gradient`: the forward is clean,
  layer l's parameter gradients and everything below it turn non-finite);
* a loss spike: the step's tokens replaced by uniform noise (`faults.spike_kind=noise`), or the
  step's update multiplied by `faults.spike_lr_scale` (`lr`).

Whether a fault fires is an int32[2] input of the step (`InStepFaults.flags`), computed on the
host: arming one never recompiles, and a `faults.transient` fault fires only the first time the
loop runs its step (a machine fault that a replay does not reproduce). Without in-step faults
configured the step is built without that input and its program is unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import FaultsConfig

NAN, SPIKE = 0, 1  # positions in the flags vector


class InStepFaults:
    """Host side: which in-step faults fire at each step, and what was fired (for the log)."""

    def __init__(self, cfg: FaultsConfig):
        self.cfg = cfg
        self.fired: set[tuple[int, int]] = set()  # (step, fault) already fired (transient faults fire once)

    def due(self, step: int) -> list[tuple[int, str]]:
        """(flag index, description) of the faults the step numbered `step` will fire (nothing changes)."""
        c = self.cfg
        faults = ((NAN, c.nan_step, self._nan_text()), (SPIKE, c.spike_step, self._spike_text()))
        return [(i, what) for i, at, what in faults if at == step and not (c.transient and (step, i) in self.fired)]

    def flags(self, step: int) -> np.ndarray:
        """int32[2] for the step numbered `step` (the one about to run); records what fired."""
        out = np.zeros((2,), np.int32)
        for index, _ in self.due(step):
            out[index] = 1
            self.fired.add((step, index))
        return out

    def _nan_text(self) -> str:
        where = "output" if self.cfg.nan_site == "forward" else "output's gradient"
        return f"NaN in decoder layer {self.cfg.nan_layer}'s {where}"

    def _spike_text(self) -> str:
        if self.cfg.spike_kind == "noise":
            return "loss spike: the batch's tokens replaced by uniform noise"
        return f"loss spike: the update scaled by {self.cfg.spike_lr_scale:g}"


# ---------------------------------------------------------------------------------- in the step


@jax.custom_vjp
def _poison_gradient(x: jax.Array, on: jax.Array) -> jax.Array:
    return x


def _poison_fwd(x, on):
    return x, on


def _poison_bwd(on, g):
    return g + jnp.where(on, jnp.nan, 0.0).astype(g.dtype), None


_poison_gradient.defvjp(_poison_fwd, _poison_bwd)


def layer_tap(cfg: FaultsConfig, flags: jax.Array):
    """The model's `layer_tap(x_BTD, layer)`: NaN into layer `nan_layer` when the NaN flag is set."""

    def tap(x_BTD, layer):
        on = (flags[NAN] > 0) & (layer == cfg.nan_layer)
        if cfg.nan_site == "forward":
            return x_BTD + jnp.where(on, jnp.nan, 0.0).astype(x_BTD.dtype)
        return _poison_gradient(x_BTD, on)

    return tap if cfg.nan_step > 0 else None


def noisy_tokens(cfg: FaultsConfig, flags: jax.Array, batch: dict, vocab_size: int, seed: int) -> dict:
    """The batch, with inputs and targets replaced by uniform noise when the noise-spike flag is set."""
    if cfg.spike_step == 0 or cfg.spike_kind != "noise":
        return batch
    key = jax.random.fold_in(jax.random.key(seed), cfg.spike_step)
    noise = functools.partial(jax.random.randint, shape=batch["inputs"].shape, minval=0, maxval=vocab_size,
                              dtype=batch["inputs"].dtype)
    k_in, k_out = jax.random.split(key)
    on = flags[SPIKE] > 0
    return {**batch, "inputs": jnp.where(on, noise(k_in), batch["inputs"]),
            "targets": jnp.where(on, noise(k_out), batch["targets"])}


def update_scale(cfg: FaultsConfig, flags: jax.Array) -> jax.Array | None:
    """Factor on the step's update (the `lr` spike), or None when that fault is not configured."""
    if cfg.spike_step == 0 or cfg.spike_kind != "lr":
        return None
    return jnp.where(flags[SPIKE] > 0, jnp.float32(cfg.spike_lr_scale), jnp.float32(1.0))
