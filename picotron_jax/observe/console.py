"""What a run prints: the banner, the log line, evaluation lines, the summary, and the progress bar.

Printing goes through the trainer's rich Console (`trainer.say`), so lines render in a terminal,
in a pipe (plain text) and in Jupyter alike, and appear above a live progress bar.
"""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from picotron_jax.callback import Callback
from picotron_jax.mesh import describe
from picotron_jax.observe.metrics import format_eval_line, format_log_line


def banner(run, peak: float, peak_source: str) -> list[str]:
    """The lines a run starts with: layout, size, data, peak; precision and remat; the pipeline."""
    cfg, spec = run.cfg, run.setup.spec
    ds = run.dataset
    data = f"data {ds.num_tokens:,} tokens ({cfg.data.source})" if ds is not None else "no data"
    if ds is not None and ds.num_held_out:
        data += f", {ds.num_held_out * ds.seq_len:,} held out for eval"
    lines = [
        f"[bold]picotron-jax[/] mesh {describe(run.mesh)} on {len(run.devices)} {run.devices[0].platform} "
        f"device(s) | {spec.num_params() / 1e6:.2f}M params | ZeRO-{cfg.train.zero_stage} | {data} | "
        f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})",
        f"{run.setup.policy.describe()} | remat {cfg.memory.remat}",
    ]
    unsplit = run.rules.unsplit_params(spec.logical_axes, spec.shapes)
    if unsplit:
        lines.append(f"replicated ({len(unsplit)}): " + "; ".join(unsplit[:4]) + ("; ..." if len(unsplit) > 4 else ""))
    if run.mesh.shape["pipe"] > 1:
        from picotron_jax.parallel.pipeline_schedule import backward_cost, schedule_of_config, schedule_report

        pr = schedule_report(schedule_of_config(cfg, run.mesh.shape["pipe"]), backward_cost(cfg.memory.remat))
        lines.append(
            f"pipeline {pr['schedule']}: {pr['pipe']} ranks x {pr['virtual_stages']} chunk(s), "
            f"{pr['microbatches']} microbatches, {pr['slots']} slots | bubble {pr['bubble_counted']:.3f} "
            f"counted, {pr['bubble_analytic']:.3f} analytic, time-weighted (B = {pr['idle_cost_b']:g}F) {pr['idle_lockstep']:.3f} "
            f"lockstep / {pr['idle_dataflow']:.3f} dataflow | at most {pr['max_in_flight']} microbatch(-chunk)s "
            f"in flight per rank"
        )
    return lines


def summary_line(s, run_dir) -> str:
    stopped = f" (stopped early by {s.stopped_early})" if s.stopped_early else ""
    mfu = f"{100 * s.mfu:.1f}%" if math.isfinite(s.mfu) else "n/a"
    tps = f"{s.tokens_per_s:,.0f}" if math.isfinite(s.tokens_per_s) else "n/a"
    evaluation = f" | eval loss {s.eval_loss:.4f} (ppl {s.eval_ppl:.2f})" if math.isfinite(s.eval_loss) else ""
    compiled = f" (compile {s.compile_s:.1f}s)" if math.isfinite(s.compile_s) else ""
    return (f"[bold]done[/]{stopped}: {s.steps} steps in {s.wall_s:.1f}s{compiled} | loss "
            f"{s.first_loss:.4f} -> {s.final_loss:.4f}{evaluation} | median {tps} tok/s | MFU {mfu} | "
            f"run dir {run_dir if run_dir is not None else '(none)'}")


class ConsoleLog(Callback):
    """The log line of every logged step, evaluation lines, and the summary at the end of a run."""

    def on_log(self, trainer, row):
        trainer.say(format_log_line(row, trainer.cfg.train.steps))

    def on_eval(self, trainer, row):
        trainer.say(format_eval_line(row, trainer.cfg.train.steps))

    def on_run_end(self, trainer, summary):
        if not summary.error:
            trainer.say(summary_line(summary, trainer.run_dir))


class ProgressBar(Callback):
    """A rich progress bar over train.steps, on a terminal or in Jupyter (needs ipywidgets there)."""

    def __init__(self):
        self._progress: Progress | None = None
        self._task = None

    def on_run_start(self, trainer):
        console = trainer.console
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, transient=True,
            disable=not (console.is_terminal or console.is_jupyter),
        )
        self._progress.start()
        self._task = self._progress.add_task("training", total=trainer.cfg.train.steps, completed=trainer.step_count)

    def on_step_end(self, trainer, step, outputs):
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def on_run_end(self, trainer, summary):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
