"""Where the wall time goes: the step-time split of every logged row and the goodput ledger of the run.

The training loop's host thread is always doing one thing; `StepClock` stamps the loop's events and
charges the time since the previous stamp to what happened in between (Pathways/MaxText goodput:
productive step time over wall time, without a cloud logging service). Its two callbacks fire first
and last of the run's callbacks (callbacks.py), so the other callbacks' time is measured between them.

Classes (seconds of the host thread's wall time):

* `data`: waiting for the next batch (the prefetch thread had not read it yet);
* `device`: dispatching the step and waiting for the device (the clock waits for each step's outputs at its
  end, as the monitor's detectors do every `monitor.check_every` steps anyway) — the productive class;
* `host`: the callbacks (log line, sinks, detectors, the fault injector's sleeps, ...);
* `checkpoint`: training blocked by a checkpoint save, a restore (rewinds), and the end of a run (its
  final save and the wait for asynchronous saves);
* `compile`: the first step after the step was built (its compilation and its one step);
* `eval`: evaluations; `init` (ledger only): building the trainer up to the first `run()`;
* `wasted` (ledger only): the time of steps whose work was thrown away: steps redone after a rewind,
  steps whose update was skipped (`update_skipped`, fp16's `skipped_steps`), and steps past the newest
  checkpoint of an earlier session of the run directory that ended without saving them (a kill): that
  session's `device`, `data` and `host` time of those steps moves to `wasted` when the run resumes.

Every logged row gets `time_data_s`, `time_device_s`, `time_host_s`, `time_checkpoint_s`,
`time_compile_s`, `time_eval_s` (the split of the time since the previous row; the first row counts
from the start of `run()`) and `goodput` (productive `device` time over the ledger's total so far, over
every session of the run directory). In a multi-process run each process also appends its own split
(`step`, `data_s`, `device_s`, `host_s`) to RUN_DIR/processes/P.jsonl, which the monitor's straggler
detector reads on process 0 (observe/stragglers.py). The ledger is kept in RUN_DIR/goodput.json (rewritten at every
logged row and at the end of a run; main process) and printed as one line at the end of a run. Time a
killed session spent after its last logged row is not in the ledger.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import jax

from picotron_jax.callback import Callback

ROW_CLASSES = ("data", "device", "host", "checkpoint", "compile", "eval")
LEDGER_CLASSES = ("init", *ROW_CLASSES, "wasted")
OWNED = ("data", "device", "host")  # the classes a step's time is charged to (and moved to `wasted` from)


class StepClock:
    """The stamps of one trainer; `first` and `last` are its callbacks, `ledger` the seconds per class."""

    def __init__(self, run_dir: Path | None):
        self.path = run_dir / "goodput.json" if run_dir is not None and jax.process_index() == 0 else None
        self.process_log = (run_dir / "processes" / f"{jax.process_index()}.jsonl"
                            if run_dir is not None and jax.process_count() > 1 else None)
        self.ledger = dict.fromkeys(LEDGER_CLASSES, 0.0)
        self.interval = dict.fromkeys(ROW_CLASSES, 0.0)
        self.owned: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(OWNED, 0.0))
        self.earlier = dict.fromkeys(LEDGER_CLASSES, 0.0)  # earlier sessions of the run directory
        self.mark: float | None = None
        self.step: int | None = None  # the step whose events are being stamped
        self.last_step = 0  # the newest step that ended
        self.compiling = False
        self.skipped: set[int] = set()
        self.fp16_skipped: int | None = None
        self.started = False
        self.first, self.last = ClockStart(self), ClockEnd(self)

    # -- accounting ------------------------------------------------------------------------
    def charge(self, cls: str) -> None:
        """The time since the previous stamp goes to `cls`."""
        now = time.perf_counter()
        if self.mark is None:
            self.mark = now
            return
        dt, self.mark = now - self.mark, now
        if cls == "device" and self.compiling:
            cls = "compile"
        self.ledger[cls] += dt
        if cls in self.interval:
            self.interval[cls] += dt
        if cls in OWNED and self.step is not None:
            self.owned[self.step][cls] += dt

    def waste(self, steps) -> float:
        """Move the time charged to `steps` into `wasted`; returns the seconds moved."""
        moved = 0.0
        for s in list(steps):
            for cls, dt in self.owned.pop(s, {}).items():
                self.ledger[cls] -= dt
                moved += dt
        self.ledger["wasted"] += moved
        return moved

    def total(self) -> dict[str, float]:
        """The ledger over every session of the run directory."""
        return {k: self.earlier[k] + self.ledger[k] for k in LEDGER_CLASSES}

    def goodput(self) -> float:
        t = self.total()
        wall = sum(t.values())
        return t["device"] / wall if wall > 0 else 0.0

    # -- the run directory's ledger ---------------------------------------------------------
    def load_earlier(self, resumed_step: int) -> None:
        """Earlier sessions' ledger; the steps they took past `resumed_step` (lost with a kill) are wasted."""
        if self.path is None or not self.path.is_file():
            return
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError:
            return
        earlier = {k: float(saved.get("ledger", {}).get(k, 0.0)) for k in LEDGER_CLASSES}
        for step, owned in saved.get("owned", {}).items():
            if int(step) > resumed_step:
                for cls, dt in owned.items():
                    earlier[cls] -= dt
                    earlier["wasted"] += dt
        self.earlier = earlier

    def save(self) -> None:
        if self.path is None:
            return
        body = {"ledger": self.total(), "goodput": self.goodput(),
                "owned": {str(s): v for s, v in self.owned.items()}}
        tmp = self.path.with_name("goodput.json.tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, self.path)

    def forget_before(self, step: int) -> None:
        """Steps up to a saved checkpoint can no longer be lost to a kill (a rewind restores the newest one)."""
        for s in [s for s in self.owned if s <= step]:
            del self.owned[s]


def ledger_line(total: dict[str, float]) -> str:
    """goodput 81.2% of 12.3s: device 10.0s | compile 1.5s | data 0.2s | ..."""
    wall = sum(total.values())
    share = total["device"] / wall if wall > 0 else 0.0
    parts = " | ".join(f"{k} {v:.2f}s" for k, v in total.items() if k != "device" and v > 0.0005)
    return f"goodput {100 * share:.1f}% of {wall:.1f}s: device (productive) {total['device']:.2f}s" + (
        f" | {parts}" if parts else "")


class ClockStart(Callback):
    """Fires before every other callback: the stamp at the start of each event."""

    def __init__(self, clock: StepClock):
        self.c = clock

    def on_run_start(self, trainer):
        c = self.c
        now = time.perf_counter()
        if not c.started:  # the trainer's construction (build, restore) is the ledger's `init`
            c.started = True
            c.ledger["init"] += now - getattr(trainer, "_t_start", now)
            c.load_earlier(trainer.step_count)
        c.mark, c.step, c.last_step = now, None, trainer.step_count
        c.interval = dict.fromkeys(ROW_CLASSES, 0.0)

    def on_step_start(self, trainer, step):
        c = self.c
        restored = step <= c.last_step  # the state went back to a checkpoint (a rewind)
        c.step = None
        c.charge("checkpoint" if restored else "data")
        if restored:
            c.waste(s for s in list(c.owned) if s >= step)
        c.step = step

    def on_log(self, trainer, row):
        c = self.c
        c.charge("device")
        c.compiling = False  # the compiling step ends at its row's sync
        row.update({f"time_{k}_s": v for k, v in c.interval.items()}, goodput=c.goodput())
        if c.process_log is not None:  # each process's own split, for the straggler detector (a file, no collective)
            c.process_log.parent.mkdir(parents=True, exist_ok=True)
            with open(c.process_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": row["step"], **{f"{k}_s": c.interval[k] for k in OWNED}}) + "\n")
        c.interval = dict.fromkeys(ROW_CLASSES, 0.0)
        if row.get("update_skipped"):
            c.skipped.add(row["step"])
        if "skipped_steps" in row:  # fp16: steps skipped by the loss scaler since the previous row
            new = row["skipped_steps"] - (c.fp16_skipped if c.fp16_skipped is not None else row["skipped_steps"])
            c.fp16_skipped = row["skipped_steps"]
            if new > 0:
                c.skipped.add(row["step"])

    def on_eval(self, trainer, row):
        self.c.charge("eval")

    def on_step_end(self, trainer, step, outputs):
        # wait for the step here: a callback that reads its outputs (the monitor's detectors, every
        # monitor.check_every steps) would otherwise have the device's time charged to `host`
        jax.block_until_ready(outputs)
        self.c.charge("device")

    def on_checkpoint(self, trainer, step, path):
        c = self.c
        c.charge("checkpoint")
        c.forget_before(step)

    def on_run_end(self, trainer, summary):
        self.c.charge("device")  # the loop's final wait for the state


class ClockEnd(Callback):
    """Fires after every other callback: what they took is `host` time."""

    def __init__(self, clock: StepClock):
        self.c = clock

    def on_step_start(self, trainer, step):
        c = self.c
        c.charge("host")
        c.compiling = not getattr(trainer, "_compiled", True)

    def on_log(self, trainer, row):
        self.c.charge("host")

    def on_eval(self, trainer, row):
        self.c.charge("host")

    def on_step_end(self, trainer, step, outputs):
        c = self.c
        c.charge("host")
        c.compiling = False
        c.last_step, c.step = step, None
        if step in c.skipped:
            c.skipped.discard(step)
            c.waste([step])
        if trainer.history and trainer.history[-1].get("step") == step and trainer.history[-1]["kind"] == "train":
            c.save()

    def on_run_end(self, trainer, summary):
        c = self.c
        c.charge("checkpoint" if trainer.checkpointer is not None else "host")  # the final save, async waits
        c.save()
        if not summary.error:
            trainer.say(ledger_line(c.total()))
