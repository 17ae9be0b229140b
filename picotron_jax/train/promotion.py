"""Promote modules that keep overflowing in fp16 to fp32 and rebuild the train step.

The per-module overflow counts live in the TrainState's loss-scale state (train/precision.py), so a
resumed run re-derives the same promotions from its checkpoint. Promotion changes dtypes only:
parameters, optimizer state and their shardings stay as they are; the step is recompiled once.
"""

from __future__ import annotations

from typing import Any

from picotron_jax.train.precision import MODULES, modules_to_promote
from picotron_jax.train.state import setup_state
from picotron_jax.train.step import build_train_step


def promote_overflowing_modules(run: Any, counts: Any) -> str:
    """Rebuild `run.setup` / `run.train_step` if some module reached precision.promote_after overflows.
    Returns the log message ("" when nothing changed)."""
    cfg = run.cfg
    new = modules_to_promote(run.setup.policy, counts, cfg.precision.promote_after)
    if not new:
        return ""
    promoted = tuple(run.setup.policy.promoted) + new
    run.setup = setup_state(cfg, run.rules, promoted)
    run.train_step = build_train_step(cfg, run.rules, run.setup)
    seen = ", ".join(f"{m} ({int(counts[MODULES.index(m)])})" for m in new)
    return (f"precision: promoted to fp32 after {cfg.precision.promote_after}+ fp16 overflows: {seen}; "
            f"{run.setup.policy.describe()}")
