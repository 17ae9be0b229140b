"""No non-finite state is ever checkpointed or resumed.

Three guards:

* every step's loss and gradient norm are checked on the device: `NonFiniteGuard` folds each step's
  outputs into a device scalar holding the first step whose loss or gradient norm was NaN or
  infinite (an asynchronous dispatch, no sync); logging steps (which sync anyway) read it, and a
  diverged run ends with one line (RunAborted, exit code 4) naming that first step. With
  precision.mode=fp16 an infinite gradient norm is a skipped step (the loss scale's overflow), so only
  the loss counts there;
* before every save the whole train state (parameters, optimizer moments, loss scale) is checked on
  the device (`state_is_finite`): a non-finite state is never written, the run ends instead;
* a checkpoint whose restored state is not finite (one written by an older version, or by hand) is
  unusable: `--resume` says so and falls back to the next older step (restore.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.errors import RunAborted


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _float_arrays(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)]


def state_is_finite(state) -> bool:
    """True when every floating-point array of the train state is finite (one reduction on the device)."""
    return bool(jax.device_get(_all_finite(_float_arrays(state))))


@jax.jit
def _fold(first_bad: jax.Array, step: jax.Array, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return jnp.where((first_bad == 0) & bad, step, first_bad)


def diverged_message(step: int, what: str) -> str:
    return (f"{what} became non-finite at step {step}: the run diverged; nothing non-finite was checkpointed. "
            f"Resume from the last checkpoint (--resume) with a lower optimizer.lr or a stronger optimizer.grad_clip")


class NonFiniteGuard(Callback):
    """Folds every step's loss and gradient norm into a device flag; a logged step reads it (module doc)."""

    def __init__(self, per_step: bool = True):
        self.per_step = per_step  # False: the monitor's on_nan action owns non-finite steps; saves are still checked
        self._first_bad = None  # device int32 scalar: 0 = every step so far was finite

    def on_run_start(self, trainer):
        if not self.per_step:
            return
        self._first_bad = np.zeros((), np.int32)  # a host value: fine for every layout and process count
        self._fp16 = trainer.cfg.precision.mode == "fp16"

    def on_step_end(self, trainer, step, outputs):
        if self._first_bad is None or "loss" not in outputs:
            return
        grad_norm = outputs["loss"] if self._fp16 or "grad_norm" not in outputs else outputs["grad_norm"]
        self._first_bad = _fold(self._first_bad, np.int32(step), outputs["loss"], grad_norm)

    def on_log(self, trainer, row):
        self.check()

    def first_bad_step(self) -> int:
        """The first step of this run whose loss or gradient norm was not finite; 0 if none (a sync)."""
        return 0 if self._first_bad is None else int(jax.device_get(self._first_bad))

    def check(self) -> None:
        bad = self.first_bad_step()
        if bad:
            raise RunAborted(diverged_message(bad, "the loss or gradient norm"))


def guard_of(trainer) -> NonFiniteGuard | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)


def check_before_save(trainer) -> None:
    """Raise RunAborted (nothing written) when the state about to be saved is not finite."""
    guard = guard_of(trainer)
    if guard is not None:
        guard.check()
    if not state_is_finite(trainer.state):
        raise RunAborted(diverged_message(trainer.step_count, "the train state"))
