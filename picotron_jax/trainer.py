"""The training loop: set up mesh, data and state, run jitted steps, log, and summarise.

Ctrl-C (SIGINT) or SIGTERM stops cleanly after the current step; a second Ctrl-C aborts. With several
processes, a signal to any of them stops all of them after the same step (JAX's preemption sync point).
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from picotron_jax.checkpoint.manager import Checkpointer
from picotron_jax.checkpoint.restore import default_location, restore_train_state
from picotron_jax.config import Config, save_config
from picotron_jax.config_checks import validate
from picotron_jax.data import TokenDataset, global_batch, prefetch
from picotron_jax.errors import UserError
from picotron_jax.mesh import build_mesh, describe, run_devices
from picotron_jax.observe.flops import flops_per_token, run_peak_flops
from picotron_jax.observe.memory import device_memory_stats, live_arrays_stats
from picotron_jax.observe.metrics import MetricsWriter, device_memory_bytes, format_log_line
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train import moe_aux
from picotron_jax.train.promotion import promote_overflowing_modules
from picotron_jax.train.state import StateSetup, TrainState, init_train_state, setup_state
from picotron_jax.train.step import build_train_step


@dataclass
class Run:
    """Everything a run builds before its first step (shared by `train` and `bench`)."""

    cfg: Config
    devices: list
    mesh: Any
    rules: MeshRules
    dataset: TokenDataset
    setup: StateSetup
    train_step: Any

    def batch(self, step: int) -> dict[str, jax.Array]:
        return global_batch(self.dataset, step, self.cfg.train.global_batch, self.rules.batch_sharding())


def prepare_run(cfg: Config) -> Run:
    """Validate everything, then build mesh, data and the jitted step (no compilation yet)."""
    devices = run_devices(cfg.mesh)
    validate(cfg, len(devices))
    mesh = build_mesh(cfg.mesh, devices)
    rules = MeshRules.from_config(mesh, cfg)
    dataset = TokenDataset.build(cfg.data, cfg.train.seq_len, cfg.train.seed)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"config field 'model.vocab_size' = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({dataset.vocab_size} tokens, data.tokenizer = {cfg.data.tokenizer!r}); set model.vocab_size to at "
            f"least {dataset.vocab_size} (rounded up to a multiple of mesh.tensor)"
        )
    setup = setup_state(cfg, rules)
    return Run(cfg, devices, mesh, rules, dataset, setup, build_train_step(cfg, rules, setup))


@dataclass
class StopFlag:
    requested: bool = False
    reason: str = ""
    # several processes: a signal only asks; all stop at the step JAX's preemption sync agrees on
    coordinated: bool = False


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the current step, then stop. Second SIGINT: abort now.

    Coordinated (several processes): SIGTERM stays with JAX's preemption notifier, which tells every
    process; Ctrl-C becomes a SIGTERM to this process. Processes stopping at different steps would leave
    one of them waiting forever in a collective.
    """

    def handler(signum, _frame):
        if (flag.requested or flag.reason) and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.reason = signal.Signals(signum).name
        if flag.coordinated:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            flag.requested = True

    signals = (signal.SIGINT,) if flag.coordinated else (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: no signal handling
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Summary:
    steps: int = 0
    first_loss: float = math.nan
    final_loss: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    compile_s: float = math.nan
    wall_s: float = 0.0
    stopped_early: str = ""
    rows: list[dict] = field(default_factory=list)


def _reached_stop_point(step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (a preemption notice)."""
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service off: no coordinated stop
        return False


def train(cfg: Config, run_dir: Path, console: Console | None = None, resume: bool = False,
          on_step: Callable[[int], None] | None = None, resume_from: str | None = None,
          init_from_hf: str | None = None) -> Summary:
    """Run (or with `resume`, continue from the newest good checkpoint) up to `train.steps` steps.

    `resume_from`: a checkpoint folder (newest good step) or one step's folder; `init_from_hf`: a
    Hugging Face Llama folder whose weights start the run (checkpoint/hf.py).

    `on_step(step)` is called after every finished step (the multi-process watchdog's progress).
    """
    console = console or Console(soft_wrap=True)
    is_main = jax.process_index() == 0
    multiprocess = jax.process_count() > 1
    t_start = time.perf_counter()
    run = prepare_run(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    peak, peak_source = run_peak_flops(run.devices, cfg.logging.peak_flops)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len, cfg.moe)
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    spec = run.setup.spec
    if is_main:
        console.print(
            f"[bold]picotron-jax[/] mesh {describe(run.mesh)} on {len(run.devices)} {run.devices[0].platform} "
            f"device(s) | {spec.num_params() / 1e6:.2f}M params | ZeRO-{cfg.train.zero_stage} | "
            f"data {run.dataset.num_tokens:,} tokens ({cfg.data.source}) | peak {peak / 1e9:.1f} GFLOP/s "
            f"({peak_source})"
        )
        console.print(f"{run.setup.policy.describe()} | remat {cfg.memory.remat}")
        if run.mesh.shape["pipe"] > 1:
            from picotron_jax.parallel.pipeline_schedule import schedule_of_config, schedule_report

            pr = schedule_report(schedule_of_config(cfg, run.mesh.shape["pipe"]))
            console.print(
                f"pipeline {pr['schedule']}: {pr['pipe']} ranks x {pr['virtual_stages']} chunk(s), "
                f"{pr['microbatches']} microbatches, {pr['slots']} slots | bubble {pr['bubble_counted']:.3f} "
                f"counted, {pr['bubble_analytic']:.3f} analytic | at most {pr['max_in_flight']} microbatch(-chunk)s "
                f"in flight per rank"
            )

    say = console.print if is_main else (lambda _message: None)
    ckpt = Checkpointer(default_location(cfg, run_dir), cfg, say=say, log_path=run_dir / "checkpoints.jsonl")
    state: TrainState
    if resume or resume_from:
        state, _, where = restore_train_state(resume_from or default_location(cfg, run_dir), run.setup.abstract,
                                              run.setup.shardings, cfg, say, None if resume_from else ckpt.store)
        say(f"resumed from {where} at step {int(state.step)}")
        if state.loss_scale is not None and (message := promote_overflowing_modules(
                run, np.asarray(state.loss_scale.module_overflows))):
            say(message)
    elif init_from_hf:
        from picotron_jax.checkpoint.hf import train_state_from_hf

        state = train_state_from_hf(init_from_hf, cfg, run.setup)
        say(f"initialised from the Hugging Face model in {init_from_hf}")
    else:
        state = init_train_state(cfg, run.setup)
    metrics_file = MetricsWriter(run_dir / "metrics.jsonl", enabled=is_main)
    summary = Summary()
    flag = StopFlag(coordinated=multiprocess)
    # gloo collectives of many in-flight steps can deadlock across CPU processes: one step at a time
    sync_every_step = multiprocess and run.devices[0].platform == "cpu"
    total = cfg.train.steps
    start_step = int(state.step)
    # train.stop_at_step: stop early as if time ran out; the schedule still spans train.steps
    end = min(total, cfg.train.stop_at_step) if cfg.train.stop_at_step else total
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=console, disable=not (is_main and cfg.logging.progress and console.is_terminal),
        transient=True,
    )
    batches = prefetch((run.batch(s) for s in range(start_step, total)), size=2)
    try:
        with stop_on_signals(flag), progress:
            task = progress.add_task("training", total=total, completed=start_step)
            t_window, window_steps = time.perf_counter(), 0
            for step in range(start_step, end):
                batch = next(batches)
                t0 = time.perf_counter()
                state, metrics = run.train_step(state, batch)
                if sync_every_step:
                    jax.block_until_ready(metrics)
                if flag.coordinated and _reached_stop_point(step):
                    flag.requested, flag.reason = True, flag.reason or "SIGTERM"
                if step == start_step:
                    jax.block_until_ready(metrics)
                    summary.compile_s = time.perf_counter() - t0
                    t_window = time.perf_counter()  # throughput excludes the compiling step
                else:
                    window_steps += 1
                progress.advance(task)
                last = step + 1 == end or flag.requested
                if (step + 1) % cfg.logging.every == 0 or last or step == start_step:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t_window
                    tps = window_steps * tokens_per_step / elapsed if window_steps and elapsed > 0 else math.nan
                    memory_stats = device_memory_stats(run.devices)  # {} on CPU
                    row = {
                        "step": step + 1,
                        "loss": float(metrics["loss"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(metrics["lr"]),
                        "z_loss": float(metrics["z_loss"]),
                        "tokens": int(metrics["tokens"]),
                        "tokens_per_s": tps,
                        "mfu": tps * fpt / peak if peak and math.isfinite(tps) else math.nan,
                        "memory_bytes": device_memory_bytes(run.devices, memory_stats),
                        "time_s": time.perf_counter() - t_start,
                        **moe_aux.log_fields(cfg, metrics),
                    }
                    if "loss_scale" in metrics:  # fp16 (train/precision.py)
                        row.update(loss_scale=float(metrics["loss_scale"]), skipped_steps=int(metrics["skipped_steps"]))
                    row.update(memory_stats)
                    if cfg.memory.live_arrays:
                        row.update(live_arrays_stats())
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"loss became {row['loss']} at step {step + 1}")
                    metrics_file.write(row)
                    summary.rows.append(row)
                    if is_main:
                        progress.console.print(format_log_line(row, total) + moe_aux.log_suffix(row))
                    t_window, window_steps = time.perf_counter(), 0
                    if "module_overflows" in metrics and (message := promote_overflowing_modules(
                            run, metrics["module_overflows"])) and is_main:
                        progress.console.print(message)
                summary.steps = step + 1
                if ckpt.should_save(step + 1, last, force=step + 1 == end < total):
                    blocked = ckpt.save(state, {"tokens_seen": (step + 1) * tokens_per_step,
                                                "mesh": describe(run.mesh)})
                    if blocked is not None and is_main:
                        progress.console.print(f"checkpoint {step + 1}: training blocked {blocked:.3f}s "
                                               f"({'async' if cfg.checkpoint.async_save else 'sync'} save)")
                if on_step is not None:
                    on_step(step + 1)
                if flag.requested:
                    summary.stopped_early = flag.reason
                    break
            if end < total and summary.steps == end and not summary.stopped_early:
                summary.stopped_early = "train.stop_at_step"
    finally:
        batches.close()
        metrics_file.close()
        ckpt.close()
    jax.block_until_ready(state)
    summary.wall_s = time.perf_counter() - t_start
    _fill_summary(summary)
    if is_main:
        _print_summary(console, summary, run_dir)
    return summary


def _fill_summary(summary: Summary) -> None:
    rows = summary.rows
    if not rows:
        return
    summary.first_loss, summary.final_loss = rows[0]["loss"], rows[-1]["loss"]
    timed = [r for r in rows if math.isfinite(r["tokens_per_s"])]
    if timed:
        summary.tokens_per_s = float(np.median([r["tokens_per_s"] for r in timed]))
        mfus = [r["mfu"] for r in timed if math.isfinite(r["mfu"])]
        summary.mfu = float(np.median(mfus)) if mfus else math.nan


def _print_summary(console: Console, s: Summary, run_dir: Path) -> None:
    stopped = f" (stopped early by {s.stopped_early})" if s.stopped_early else ""
    mfu = f"{100 * s.mfu:.1f}%" if math.isfinite(s.mfu) else "n/a"
    console.print(
        f"[bold]done[/]{stopped}: {s.steps} steps in {s.wall_s:.1f}s (compile {s.compile_s:.1f}s) | loss "
        f"{s.first_loss:.4f} -> {s.final_loss:.4f} | median {s.tokens_per_s:,.0f} tok/s | MFU {mfu} | "
        f"run dir {run_dir}"
    )
