"""The automatic NaN-origin mode (`debug.nan_origin=true`): the run traces its own first non-finite step.

When a step's loss or gradient norm is first NaN/inf (the gradient norm is not checked under fp16, whose
loss scaler skips such steps by design), the callback waits for the checkpoint being written, replays
that step from the newest checkpoint before it exactly as `picotron-jax debug nan RUN_DIR --step K`
does (nan.py), prints where the first non-finite value appeared and writes RUN_DIR/debug/nan-<K>.json
({"step", "checkpoint", "origin", "report"}; "origin" is null when the replay is finite: the fault
did not reproduce). It fires before the built-in callbacks, so a run that stops or rewinds on the NaN
(`monitor.on_nan`) is traced first. Checking steps that are not logged reads their loss and gradient norm
from the device (a sync per step: a debugging mode). One process only: the replay runs on one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax

from picotron_jax.callback import Callback
from picotron_jax.errors import UserError


class NanOrigin(Callback):
    def __init__(self, cfg, run_dir: Path | None):
        if jax.process_count() > 1:
            raise UserError(f"config field 'debug.nan_origin' = true: the automatic replay runs on one process, this "
                            f"run has {jax.process_count()}; turn it off and run `picotron-jax debug nan RUN_DIR "
                            f"--step K` after the run")
        self.cfg, self.run_dir = cfg, None if run_dir is None else Path(run_dir)
        self.traced: int | None = None  # the step traced (only the first non-finite one is)
        self.report: dict | None = None

    def _bad(self, loss: float, grad_norm: float) -> bool:
        fp16 = self.cfg.precision.mode == "fp16"
        return not math.isfinite(loss) or (not fp16 and not math.isfinite(grad_norm))

    def on_log(self, trainer, row):
        if self.traced is None and row.get("kind") == "train" and self._bad(row["loss"], row["grad_norm"]):
            self._trace(trainer, row["step"])

    def on_step_end(self, trainer, step, outputs):
        if self.traced is None and "loss" in outputs:
            m = jax.device_get({k: outputs[k] for k in ("loss", "grad_norm") if k in outputs})
            if self._bad(float(m["loss"]), float(m.get("grad_norm", 0.0))):
                self._trace(trainer, step)

    def _trace(self, trainer, step: int) -> None:
        from picotron_jax.checkpoint.restore import default_location
        from picotron_jax.debug.nan import replay_and_trace_at

        self.traced = step
        if self.run_dir is None and not self.cfg.checkpoint.dir:
            trainer.say(f"debug.nan_origin: step {step} is not finite, but this run has no checkpoint folder to "
                        f"replay it from (give it a run directory or checkpoint.dir)")
            return
        if trainer.checkpointer is not None:
            trainer.checkpointer.wait()  # the newest checkpoint may still be being written
        location = default_location(self.cfg, self.run_dir or Path("."))
        trainer.say(f"debug.nan_origin: step {step} is not finite; tracing it")
        try:
            origin = replay_and_trace_at(self.cfg, location, step, trainer.say)
        except UserError as exc:  # no checkpoint before the step: say so, the run goes on to its on_nan action
            trainer.say(f"debug.nan_origin: {exc}")
            return
        text = origin.describe() if origin is not None else (
            f"step {step} is finite when replayed: the fault does not reproduce (transient: hardware, or a race), "
            f"or it lies outside the step (data, host code)")
        trainer.say(text)
        from picotron_jax.debug.replay import saved_steps

        self.report = {"step": step, "checkpoint": max(s for s in saved_steps(location) if s < step),
                       "origin": None if origin is None else dataclasses.asdict(origin), "report": text}
        if self.run_dir is not None:
            out = self.run_dir / "debug" / f"nan-{step}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.report, indent=1) + "\n")
            trainer.say(f"NaN report: {out}")
