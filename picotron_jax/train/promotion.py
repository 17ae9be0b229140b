"""Promote modules that keep overflowing in fp16 to fp32 and rebuild the train step.

The per-module overflow counts live in the TrainState's loss-scale state (train/precision.py), so a
resumed run re-derives the same promotions from its checkpoint. Promotion changes dtypes only:
parameters, optimizer state and their shardings stay as they are; the step is recompiled once.
`promoted_setup` is pure (a new StateSetup, nothing mutated); `PrecisionPromotion` is the loop's
callback that reads the counts on logged steps and hands the new setup to the loop.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.config import Config
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train.precision import MODULES, modules_to_promote
from picotron_jax.train.state import StateSetup, setup_state


def promoted_setup(cfg: Config, rules: MeshRules, setup: StateSetup, counts: Any) -> tuple[StateSetup, str] | None:
    """A new setup with every module that reached precision.promote_after overflows in fp32, and the
    log message; None when nothing changes."""
    counts = np.asarray(counts)
    new = modules_to_promote(setup.policy, counts, cfg.precision.promote_after)
    if not new:
        return None
    promoted = setup_state(cfg, rules, tuple(setup.policy.promoted) + new)
    seen = ", ".join(f"{m} ({int(counts[MODULES.index(m)])})" for m in new)
    return promoted, (f"precision: promoted to fp32 after {cfg.precision.promote_after}+ fp16 overflows: {seen}; "
                      f"{promoted.policy.describe()}")


class PrecisionPromotion(Callback):
    """fp16 runs: after each logged step, promote the modules that overflowed too often."""

    def on_log(self, trainer, row):
        outputs = trainer.last_outputs
        if "module_overflows" not in outputs:
            return
        run = trainer.built
        change = promoted_setup(run.cfg, run.rules, run.setup, jax.device_get(outputs["module_overflows"]))
        if change is not None:
            trainer.control.replace_setup(change[0])
            trainer.say(change[1])
