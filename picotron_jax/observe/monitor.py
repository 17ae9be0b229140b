"""Anomaly detectors and their actions (config `monitor`): a loop callback.

Detectors (each anomaly becomes a row of RUN_DIR/alerts.jsonl through observe/alerts.py):

* `nan`: a non-finite loss or gradient norm. The row names where the gradient turned non-finite: the
  deepest decoder layer whose gradient is non-finite (the backward pass runs from the output down, so a
  NaN that enters at layer l poisons layers l, l-1, ..., 0 and not l+1), or the top-level module
  (embed, lm_head, ...) when every layer is finite. Read every `monitor.check_every` steps.
* `loss_spike`, `grad_spike`: the value exceeds median + `spike_mads` x 1.4826 x MAD of the last
  `monitor.window` values *and* (1 + `spike_min_rel`) x median: robust rolling statistics, so a late
  spike from 2 to 8 is flagged (Megatron's 10x-the-first-100-losses rule never would); for the grad
  norm, which is heavy-tailed, `grad_spike_min_rel` replaces `spike_min_rel`. The first
  `monitor.warmup` steps of each `run()` are not judged; an anomalous value does not enter the window.
* `throughput`: the logged tokens/s stays below `throughput_drop` x the run's median for two logged rows
  in a row, once 5 rows after the warm-up are known (a row whose interval held a checkpoint save, a
  restore or an evaluation is not judged, nor a row of the warm-up steps).
* `memory`: device memory in use above `memory_fraction` of its limit (GPU/TPU), host RAM above
  `host_memory_fraction`; `disk`: before a checkpoint step, less than `disk_min_free_gb` free in the run
  directory. Each is reported when it starts, again only after it has cleared.
* `straggler` (multi-process runs): one process's data wait plus callback time of a logged interval above
  `straggler_factor` x the other processes' median (observe/stragglers.py); `where` names the process. Reported
  when it starts, again only after it has cleared; the first step of each `run()` is not judged.

Actions (`monitor.on_nan`, `on_spike`, `on_throughput`, `on_memory`, `on_straggler`): `log` (one line), `alert` (banner and
webhook), `skip` (NaN and spikes: the step itself did not apply the update, decided inside the jitted step,
train/step.py; for spikes from the windows kept in the train state, train/spike_guard.py, which replace
this callback's windows; a skip on a step the host did not check, with `check_every` > 1, is reported at
the next check), `rewind` (restore the newest checkpoint and skip the batches from it up to the bad step;
at most `monitor.max_rewinds` per run, then stop; without a checkpoint: stop), `stop` (save a checkpoint
unless the state is non-finite, then end the run with RunAborted: exit code 4, its message says why).
"""

from __future__ import annotations

import math
import shutil
from collections import deque
from pathlib import Path

import jax
import numpy as np
import psutil

from picotron_jax.callback import Callback
from picotron_jax.errors import RunAborted
from picotron_jax.observe.alerts import Alerts
from picotron_jax.observe.memory import device_memory_stats
from picotron_jax.observe.rerun import PendingRerun, verdict
from picotron_jax.observe.stragglers import find_straggler
from picotron_jax.train.monitor_stats import modules

MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution


class RobustWindow:
    """The last `size` values; `is_spike(x)` against their median and MAD."""

    def __init__(self, size: int, mads: float, min_rel: float):
        self.values: deque[float] = deque(maxlen=size)
        self.mads, self.min_rel = mads, min_rel

    def limit(self) -> float:
        """The value above which a new one is a spike (inf until the window holds 8 values)."""
        if len(self.values) < min(8, self.values.maxlen):
            return math.inf
        v = np.asarray(self.values)
        med = float(np.median(v))
        mad = float(np.median(np.abs(v - med)))
        return max(med + self.mads * MAD_TO_SIGMA * mad, (1.0 + self.min_rel) * med)

    def describe(self) -> str:
        v = np.asarray(self.values)
        med = float(np.median(v))
        return (f"median {med:.4g} + {self.mads:g} x 1.4826 x MAD {float(np.median(np.abs(v - med))):.3g} and "
                f"{1 + self.min_rel:g} x median over the last {len(v)} steps = {self.limit():.4g}")


def nan_location(outputs: dict, module_names: list[str]) -> str:
    """Where the gradient turned non-finite, from the step's per-layer finiteness flags ("" if unknown)."""
    if "layer_grad_finite" not in outputs or not bool(outputs.get("layer_stats_step", False)):
        return ""
    layer_ok = np.asarray(outputs["layer_grad_finite"])
    bad = np.flatnonzero(~layer_ok)
    if bad.size:
        return f"layer {int(bad.max())}"
    module_ok = np.asarray(outputs["module_grad_finite"])
    bad_modules = [m for m, ok in zip(module_names, module_ok) if not ok]
    return f"module {bad_modules[-1]}" if bad_modules else ""


class Monitor(Callback):
    """The detectors; `alerts.rows` holds this trainer's anomaly rows (also written to alerts.jsonl)."""

    def __init__(self, cfg, run_dir: Path | None):
        self.cfg, self.m, self.run_dir = cfg, cfg.monitor, run_dir
        self.alerts: Alerts | None = None
        self.trainer = None
        m = self.m
        self.loss_window = RobustWindow(m.window, m.spike_mads, m.spike_min_rel)
        self.grad_window = RobustWindow(m.window, m.spike_mads, m.grad_spike_min_rel)
        self.throughputs: list[float] = []
        self._slow_rows = 0
        self._dirty = False  # a checkpoint save, restore or evaluation fell in the current throughput window
        self._active: set[str] = set()  # memory / disk conditions currently reported
        self._checked = 0  # the newest step the detectors have seen
        self._judge_from = 0
        self._offset = 0  # batches skipped by rewinds so far
        self._skip_to: int | None = None  # a rewind is pending: the batch index to continue from
        self._straggler_step = 0  # the newest step the straggler detector has judged
        self.rewinds = 0
        self._spike_skips = 0  # in-step spike skips reported so far (train/spike_guard.py)
        self._spike_checked = 0
        self._pending: PendingRerun | None = None  # a rerun under way (observe/rerun.py)
        self._values = (math.nan, math.nan)  # the loss and grad norm being judged

    # -- events ------------------------------------------------------------------------------
    def on_run_start(self, trainer):
        self.trainer = trainer
        self._open_alerts(trainer)
        self._judge_from = trainer.step_count + self.m.warmup
        self.rewinds = 0
        self._straggler_step = trainer.step_count + 1  # the first step's interval holds each process's first read
        spike = getattr(trainer.state, "spike", None)  # skips already counted in a restored state
        self._spike_skips = int(jax.device_get(spike.skipped)) if spike is not None else 0
        self._spike_checked = trainer.step_count

    def _open_alerts(self, trainer) -> Alerts:
        if self.alerts is None:
            self.alerts = Alerts(self.m, self.run_dir, trainer.say, trainer.console)
        return self.alerts

    def wrap_batches(self, read):
        trainer = self.trainer
        if self._skip_to is not None and trainer is not None and trainer.step_count < self._skip_to:
            self._offset += self._skip_to - trainer.step_count
            self._skip_to = None
            self._checked = trainer.step_count  # the steps from the checkpoint on are judged again
        if self._pending is not None and trainer is not None and trainer.step_count < self._pending.step:
            self._checked = trainer.step_count  # restored for a rerun: the steps up to the suspicious one run again
        offset = self._offset
        return read if offset == 0 else (lambda index: read(index + offset))

    def on_log(self, trainer, row):
        self.trainer = trainer
        self._check_step(trainer, row["step"], row["loss"], row["grad_norm"], trainer.last_outputs)
        self._check_throughput(trainer, row)
        self._check_memory(trainer, row)
        self._check_stragglers(trainer, row["step"])

    def _check_stragglers(self, trainer, step: int) -> None:
        if jax.process_count() == 1 or jax.process_index() != 0 or self.run_dir is None or self.m.straggler_factor <= 0:
            return
        found = find_straggler(self.run_dir, jax.process_count(), self.m.straggler_factor, self.m.straggler_min_s,
                               self._straggler_step, upto=step)
        if found is None:
            return
        step, process, own, median = found
        self._straggler_step = step
        self._condition(trainer, step, "straggler", process is not None, f"process {process}",
                        f"{own:.3f}s waiting for data and in callbacks in the interval ending at step {step}",
                        f"{self.m.straggler_factor:g} x the other processes' median {median:.3f}s and "
                        f"{self.m.straggler_min_s:g}s", self.m.on_straggler)

    def on_step_end(self, trainer, step, outputs):
        if step != self._checked and step % self.m.check_every == 0:
            small = jax.device_get({"loss": outputs["loss"], "grad_norm": outputs["grad_norm"]})
            self._check_step(trainer, step, float(small["loss"]), float(small["grad_norm"]), outputs)
        every = trainer.cfg.checkpoint.every
        if self.m.disk_min_free_gb > 0 and every > 0 and step % every == 0 and trainer.checkpointer is not None \
                and self.run_dir is not None:
            free_gb = shutil.disk_usage(self.run_dir).free / 2**30
            self._condition(trainer, step, "disk", free_gb < self.m.disk_min_free_gb, str(self.run_dir),
                            f"{free_gb:.2f} GiB free before the checkpoint of step {step}",
                            f"{self.m.disk_min_free_gb:g} GiB free")

    def on_checkpoint(self, trainer, step, path):
        self._dirty = True

    def on_eval(self, trainer, row):
        self._dirty = True

    def on_close(self, trainer):
        if self.alerts is not None:
            self.alerts.close()

    def state_dict(self) -> dict:
        """The host windows, checkpointed (callback.py) so that a resumed run judges spikes as it would have."""
        return {"loss_window": list(self.loss_window.values), "grad_window": list(self.grad_window.values)}

    def load_state_dict(self, state: dict) -> None:
        self.loss_window.values.clear()
        self.loss_window.values.extend(state.get("loss_window", []))
        self.grad_window.values.clear()
        self.grad_window.values.extend(state.get("grad_window", []))

    # -- detectors ---------------------------------------------------------------------------
    def _check_step(self, trainer, step: int, loss: float, grad_norm: float, outputs: dict) -> None:
        self._checked, self._values = step, (loss, grad_norm)
        if self._pending is not None and step == self._pending.step and self._rerun_done(trainer, loss, grad_norm):
            return
        if self.cfg.precision.mode == "fp16" and math.isfinite(loss) and not math.isfinite(grad_norm):
            return  # the loss scaler's overflow: a skipped step (counted in skipped_steps), not a divergence
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            where = nan_location(jax.device_get({k: outputs[k] for k in ("layer_grad_finite", "module_grad_finite",
                                                                           "layer_stats_step") if k in outputs}),
                                 modules(trainer.state.params))
            what = "loss" if not math.isfinite(loss) else "gradient"
            detail = f"{what} became {loss if what == 'loss' else grad_norm} (loss {loss:.5g}, grad norm {grad_norm:.5g})"
            self._act(trainer, step, "nan", detail, where, "finite", self.m.on_nan, finite_state=False,
                      message=f"{what} became {loss if what == 'loss' else grad_norm} at step {step}"
                              f"{f' ({where})' if where else ''}: the run diverged; resume from the last checkpoint "
                              f"with a lower optimizer.lr or stronger optimizer.grad_clip")
            return
        if "spike_skips" in outputs:  # monitor.on_spike=skip: judged inside the step (train/spike_guard.py)
            self._report_skipped_spikes(trainer, step, outputs)
            return
        judged = step > self._judge_from
        for kind, value, window in (("loss_spike", loss, self.loss_window), ("grad_spike", grad_norm,
                                                                             self.grad_window)):
            limit = window.limit()
            if judged and value > limit:
                name = "loss" if kind == "loss_spike" else "grad norm"
                self._act(trainer, step, kind, f"{name} {value:.4g}", "", window.describe(), self.m.on_spike)
            else:
                window.values.append(value)

    def _rerun_done(self, trainer, loss: float, grad_norm: float) -> bool:
        """The suspicious step has run again: its verdict row; True if the detectors should not judge it."""
        pending, self._pending = self._pending, None
        reproducible, detail = verdict(pending, loss, grad_norm)
        if not reproducible:  # transient: the new values are judged as usual
            self._open_alerts(trainer).record(pending.step, "rerun", detail, "", "the first run's bits", "log")
            return False
        nan = pending.kind == "nan"
        self._act(trainer, pending.step, "rerun", detail, "", "the first run's bits", "stop" if nan else "alert",
                  finite_state=not nan, message=f"step {pending.step}'s {pending.kind} is reproducible (the same bits "
                                                f"when run again): {detail}")
        return True

    def _report_skipped_spikes(self, trainer, step: int, outputs: dict) -> None:
        got = jax.device_get({k: outputs[k] for k in ("loss", "grad_norm", "loss_spike", "grad_spike",
                                                      "spike_loss_limit", "spike_grad_limit", "spike_skips")})
        total, here = int(got["spike_skips"]), int(bool(got["loss_spike"]) or bool(got["grad_spike"]))
        if total - here > self._spike_skips:  # skipped on steps the host did not read (check_every > 1)
            self._act(trainer, step, "loss_spike", f"{total - here - self._spike_skips} earlier update(s) skipped "
                      f"as spikes since step {self._spike_checked}", "", "in-step windows", "skip")
        self._spike_skips, self._spike_checked = total, step
        for kind, name, value, bound in (("loss_spike", "loss", got["loss"], got["spike_loss_limit"]),
                                         ("grad_spike", "grad norm", got["grad_norm"], got["spike_grad_limit"])):
            if bool(got[kind]):
                self._act(trainer, step, kind, f"{name} {float(value):.4g}", "",
                          f"{float(bound):.4g} (median + {self.m.spike_mads:g} x 1.4826 x MAD of the last "
                          f"{self.m.window} values in the train state)", "skip")

    def _check_throughput(self, trainer, row: dict) -> None:
        tps = row.get("tokens_per_s", math.nan)
        dirty, self._dirty = self._dirty, False
        if self.m.throughput_drop <= 0 or not math.isfinite(tps) or dirty:
            return
        if row["step"] <= self._judge_from:  # the first steps of a run are slower (allocation, caches)
            return
        median = float(np.median(self.throughputs)) if len(self.throughputs) >= 5 else math.nan
        if math.isfinite(median) and tps < self.m.throughput_drop * median:
            self._slow_rows += 1
            if self._slow_rows == 2:
                self._act(trainer, row["step"], "throughput", f"{tps:,.0f} tokens/s for two logged rows", "",
                          f"{self.m.throughput_drop:g} x the run's median {median:,.0f} tokens/s",
                          self.m.on_throughput)
            return
        self._slow_rows = 0
        self.throughputs.append(tps)

    def _check_memory(self, trainer, row: dict) -> None:
        step = row["step"]
        if self.m.memory_fraction > 0:
            for device in trainer.built.devices[:1]:
                stats = device_memory_stats([device])
                if stats.get("mem_limit"):
                    used = stats["mem_in_use"] / stats["mem_limit"]
                    self._condition(trainer, step, "memory", used > self.m.memory_fraction, f"device {device.id}",
                                    f"device memory {100 * used:.1f}% of its limit in use",
                                    f"{100 * self.m.memory_fraction:g}%")
        if self.m.host_memory_fraction > 0:
            used = psutil.virtual_memory().percent / 100
            self._condition(trainer, step, "host_memory", used > self.m.host_memory_fraction, "host",
                            f"host RAM {100 * used:.1f}% in use", f"{100 * self.m.host_memory_fraction:g}%")

    def _condition(self, trainer, step, kind, on: bool, where, detail, threshold, action=None) -> None:
        if on and kind not in self._active:
            self._active.add(kind)
            action = action or self.m.on_memory
            self._act(trainer, step, "memory" if kind == "host_memory" else kind, detail, where, threshold, action)
        elif not on:
            self._active.discard(kind)

    # -- actions -----------------------------------------------------------------------------
    def _act(self, trainer, step, kind, detail, where, threshold, action, finite_state=True, message=""):
        message = message or f"{kind} at step {step}{f' ({where})' if where else ''}: {detail}"
        if action in ("rewind", "rerun"):  # both restore the newest checkpoint, within monitor.max_rewinds
            steps = trainer.checkpointer.all_steps() if trainer.checkpointer is not None else []
            if not steps:
                fallback = "stop" if action == "rewind" or kind == "nan" else "alert"
                goal = "rewind to" if action == "rewind" else "run the step again from"
                action, message = fallback, f"{message} (monitor.on_* = {action}, but there is no checkpoint to {goal})"
            elif self.rewinds >= self.m.max_rewinds:
                action, message = "stop", f"{message} (monitor.max_rewinds = {self.m.max_rewinds} rewinds used)"
        if action == "skip":
            action = "skip" if "update_skipped" in trainer.last_outputs else "alert"
        self._open_alerts(trainer).record(step, kind, detail, where, threshold, action)
        if action in ("rewind", "rerun"):
            self.rewinds += 1
            self._dirty = True
            if action == "rerun":  # the same batches again, up to the suspicious step (observe/rerun.py)
                self._pending = PendingRerun(step, kind, *self._values, from_step=max(steps))
            else:
                self._skip_to = step  # wrap_batches: the data continues after the bad step's batch
            trainer.control.restore()
        elif action == "stop":
            if finite_state and trainer.checkpointer is not None:
                trainer.save()
            raise RunAborted(message)
