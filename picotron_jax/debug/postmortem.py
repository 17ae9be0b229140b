"""Post-mortem: on an unexpected exception the run writes RUN_DIR/debug/crash-<step>.json.

The report holds the config, the step reached, the last logged metrics, the exception with its
traceback, the Python stack of every thread, and the batch index the failing step read (batch
index k is what step k + 1 trains on; `Trainer.batch(k)` reads it again). With `debug.save_on_crash`
a checkpoint of the last completed step is written too (when its arrays are still intact: a step
that failed inside the device program may have consumed its donated input).

User errors (UserError, exit code 2) and Ctrl-C are not crashes and write nothing.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from pathlib import Path

import jax

from picotron_jax.callback import Callback
from picotron_jax.errors import RunAborted, UserError


def thread_stacks() -> dict[str, list[str]]:
    """Every Python thread's current stack, formatted (what faulthandler prints, as data)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return {f"{names.get(ident, 'thread')} ({ident})": traceback.format_stack(frame)
            for ident, frame in sys._current_frames().items()}


def _intact(state) -> bool:
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


class CrashReport(Callback):
    def __init__(self, cfg, run_dir: Path | None):
        self.cfg, self.dir = cfg, None if run_dir is None else Path(run_dir) / "debug"
        self.last_row: dict = {}

    def on_log(self, trainer, row):
        self.last_row = dict(row)

    def on_run_end(self, trainer, summary):
        typ, exc, tb = sys.exc_info()
        if exc is None or self.dir is None or isinstance(exc, (UserError, RunAborted, KeyboardInterrupt, SystemExit)):
            return
        step = trainer.step_count
        report = {
            "step": step,
            "failed_step": step + 1,
            "batch_index": step,
            "process": jax.process_index(),
            "exception": f"{typ.__name__}: {exc}",
            "traceback": traceback.format_exception(typ, exc, tb),
            "stacks": thread_stacks(),
            "last_metrics": self.last_row,
            "config": self.cfg.to_dict(),
            "checkpoint": None,
        }
        if self.cfg.debug.save_on_crash and trainer.checkpointer is not None and _intact(trainer.state):
            try:
                report["checkpoint"] = trainer.save()
                trainer.checkpointer.close()
                trainer.checkpointer = None
            except Exception as save_exc:  # noqa: BLE001 - the report is written regardless
                report["checkpoint"] = f"not saved: {type(save_exc).__name__}: {save_exc}"
        self.dir.mkdir(parents=True, exist_ok=True)
        suffix = f"-p{jax.process_index()}" if jax.process_count() > 1 else ""
        path = self.dir / f"crash-{step}{suffix}.json"
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        trainer.say(f"crash report: {path}", everywhere=True)
