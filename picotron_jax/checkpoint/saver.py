"""When a run saves: every `checkpoint.every` steps and at the end of each run (always when it stops at
`train.stop_at_step`, as a time-limited job does, and when SIGTERM or Ctrl-C stops it, as a preemption
does, whatever `checkpoint.every` says; the stop is reported in one line naming the saved step). A periodic save is a request to the loop, which
saves once every callback has seen the step (so `on_checkpoint` follows `on_step_end`); the final
save happens in `on_run_end`. The save itself is `Trainer.save()` (manager.py). At the end of a run
the background writes are waited for, so a finished run's checkpoints are complete on disk (and
reported) before the summary line."""

from __future__ import annotations

from picotron_jax.callback import Callback

PREEMPTION_SIGNALS = ("SIGTERM", "SIGINT")  # a stop by signal always saves, whatever checkpoint.every says


class CheckpointSaver(Callback):
    def on_step_end(self, trainer, step, outputs):
        every = trainer.cfg.checkpoint.every
        if every > 0 and step % every == 0 and trainer.checkpointer is not None:
            trainer.control.save()  # the loop saves after every callback has seen the step

    def on_run_start(self, trainer):
        if trainer.cfg.checkpoint.every > 0 and trainer.checkpointer is None:
            trainer.say(f"checkpoint.every = {trainer.cfg.checkpoint.every}, but this trainer has no run directory "
                        f"or checkpoint.dir: no checkpoints are saved")

    def on_run_end(self, trainer, summary):
        every = trainer.cfg.checkpoint.every
        signalled = summary.stopped_early in PREEMPTION_SIGNALS
        final = summary.steps_run > 0 and (every > 0 or signalled or summary.stopped_early == "train.stop_at_step")
        if final and not summary.error and trainer.checkpointer is not None:
            trainer.save()
        if trainer.checkpointer is not None:
            trainer.checkpointer.wait()
            if signalled and not summary.error and trainer.step_count in trainer.checkpointer.all_steps():
                trainer.say(f"{summary.stopped_early}: stopped after step {trainer.step_count}; checkpoint "
                            f"{trainer.step_count} is saved, continue with --resume")
