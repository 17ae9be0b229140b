"""The `rerun` action (`monitor.on_nan` / `monitor.on_spike`): tell a transient machine fault from a
real problem of the data or the model, as Megatron-LM's rerun state machine does.

A suspicious step K (a non-finite or spiky loss or grad norm) is run again: the loop restores the newest
checkpoint (step C < K) and trains C+1 .. K again on the same batches (a step is a pure function of the
state before it and its batch, debug/replay.py). At step K the detectors compare the new loss and grad
norm with the first run's, bit for bit:

* the same bits: *reproducible*, the batch or the model produce it. A NaN then stops the run (exit 4,
  nothing non-finite saved); a spike is reported as an alert and training goes on.
* other bits: *transient*, the first result came from the machine (a bit flip, a bad device). The
  rerun's values stand and are judged as usual; the run goes on.

Each rerun is one row of alerts.jsonl (`kind` = the anomaly, `action` = `rerun`) when it starts and one
row (`kind` = `rerun`, `detail` = the verdict and both values) when step K has run again. Reruns and
rewinds share `monitor.max_rewinds`; without a checkpoint, a NaN stops and a spike is only alerted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingRerun:
    step: int  # the suspicious step, run again
    kind: str  # nan | loss_spike | grad_spike
    loss: float  # the first run's values
    grad_norm: float
    from_step: int  # the checkpoint it runs again from


def same_bits(a: float, b: float) -> bool:
    """Equal float32 values read back as Python floats (NaN equals NaN: both runs diverged alike)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def verdict(pending: PendingRerun, loss: float, grad_norm: float) -> tuple[bool, str]:
    """(reproducible?, the row's detail) for step `pending.step` run again with these values."""
    reproducible = same_bits(loss, pending.loss) and same_bits(grad_norm, pending.grad_norm)
    what = ("reproducible: the same bits again, so the batch or the model causes it" if reproducible else
            "transient: other values on the same batch and state, so the first run's came from the machine")
    return reproducible, (f"step {pending.step} run again from the checkpoint of step {pending.from_step}: loss "
                          f"{pending.loss:.9g} -> {loss:.9g}, grad norm {pending.grad_norm:.9g} -> {grad_norm:.9g}; "
                          f"{what}")
