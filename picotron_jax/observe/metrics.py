"""Metrics rows (JSON lines in the run directory), the one-line log format, and memory readings.

`StepRows` turns a logged step's device metrics into the row every sink shows (metrics.jsonl, the
log line, `Trainer.step()`'s return value); `MetricsFile` is the callback that appends rows to
RUN_DIR/metrics.jsonl, training rows (`"kind": "train"`) and evaluation rows (`"kind": "eval"`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil

from picotron_jax.callback import Callback
from picotron_jax.errors import RunAborted
from picotron_jax.observe.flops import flops_per_token
from picotron_jax.observe.memory import device_memory_stats, live_arrays_stats
from picotron_jax.observe.step_fields import row_fields
from picotron_jax.train import moe_aux


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (flushed every row); the file is
    opened at the first row, so a run that fails before its first step leaves none."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._file = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as exc:  # a file object's error names no file: name it (a full disk's one line, cli.py)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()  # flushes what a failed write left buffered: may fail on a full disk too
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None


class MetricsFile(Callback):
    """RUN_DIR/metrics.jsonl: one row per logged step and per evaluation (main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.writer = MetricsWriter(path, enabled)

    def on_log(self, trainer, row):
        self.writer.write(row)

    def on_eval(self, trainer, row):
        self.writer.write(row)

    def on_close(self, trainer):
        self.writer.close()


class StopOnNonFiniteLoss(Callback):
    """A logged loss that is NaN or infinite ends the run (RunAborted, exit code 4) before it is saved."""

    def on_log(self, trainer, row):
        if not math.isfinite(row["loss"]):
            raise RunAborted(f"loss became {row['loss']} at step {row['step']}: the run diverged; resume from the "
                             f"last checkpoint with a lower optimizer.lr or stronger optimizer.grad_clip")


class StepRows:
    """Builds logged rows: the step's metrics fetched from the device, tokens/s over the steps since the
    previous row (a step that compiled is excluded), MFU against the run's peak, memory readings."""

    def __init__(self, cfg, devices: list, peak: float, t_start: float):
        self.cfg, self.devices, self.peak, self.t_start = cfg, devices, peak, t_start
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len, cfg.moe)
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        self.restart()

    def restart(self) -> None:
        """Start a new throughput window now (after a compiling step, a pause, a checkpoint restore)."""
        self._t_window, self._window_steps = time.perf_counter(), 0

    def count_step(self) -> None:
        self._window_steps += 1

    def row(self, step: int, outputs: dict) -> dict[str, Any]:
        metrics = jax.device_get(outputs)
        elapsed = time.perf_counter() - self._t_window
        steps = self._window_steps
        tps = steps * self.tokens_per_step / elapsed if steps and elapsed > 0 else math.nan
        memory_stats = device_memory_stats(self.devices)  # {} on CPU
        row = {
            "kind": "train",
            "step": step,
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "z_loss": float(metrics["z_loss"]),
            "tokens": int(metrics["tokens"]),
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak if self.peak and math.isfinite(tps) else math.nan,
            "memory_bytes": device_memory_bytes(self.devices, memory_stats),
            "time_s": time.perf_counter() - self.t_start,
            **moe_aux.log_fields(self.cfg, metrics),
        }
        row.update(row_fields(metrics))  # the monitor's in-step statistics (observe/step_fields.py)
        if "loss_scale" in metrics:  # fp16 (train/precision.py)
            row.update(loss_scale=float(metrics["loss_scale"]), skipped_steps=int(metrics["skipped_steps"]))
        row.update(memory_stats)
        if self.cfg.memory.live_arrays:
            row.update(live_arrays_stats())
        self.restart()
        return row

    def eval_row(self, step: int, result: dict[str, float]) -> dict[str, Any]:
        return {"kind": "eval", "step": step, **result, "time_s": time.perf_counter() - self.t_start}


def median(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def device_memory_bytes(devices: list[jax.Device], stats: dict[str, Any] | None = None) -> int:
    """Peak bytes in use on the first device (accelerators), or this process's RSS on CPU. `stats`: the
    row `observe/memory.device_memory_stats` already read this interval (read here when None)."""
    stats = device_memory_stats(devices) if stats is None else stats
    return stats.get("mem_peak") or stats.get("mem_in_use") or int(psutil.Process().memory_info().rss)


def human_bytes(n: float | None, sep: str = "") -> str:
    """1288490188 -> '1.2GiB' (sep=' ': '1.2 GiB'); None -> '?'."""
    if n is None:
        return f"?{sep}B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{sep}{unit}" if unit != "B" else f"{int(n)}{sep}B"
        n /= 1024
    return f"{n:.1f}{sep}TiB"


def format_log_line(row: dict[str, Any], total_steps: int) -> str:
    """step 40/300 | loss 2.8812 | lr 2.95e-03 | gnorm 0.412 | 1,234 tok/s | MFU 41.2% | mem 1.2GiB

    A row with no timed step since the previous one (the first row: its only step compiled, and throughput
    excludes a compiling step) says so instead of showing a throughput it did not measure."""
    width = len(str(total_steps))
    mfu = row.get("mfu")
    mfu_text = f"{100 * mfu:5.1f}%" if isinstance(mfu, float) and math.isfinite(mfu) else "  n/a"
    tps = row["tokens_per_s"]
    speed = (f"{tps:>9,.0f} tok/s | MFU {mfu_text}" if isinstance(tps, float) and math.isfinite(tps)
             else "compiling step, not timed (tok/s from the next row)")
    scale = f" | scale {row['loss_scale']:g} skipped {row['skipped_steps']}" if "loss_scale" in row else ""
    return (
        f"step {row['step']:>{width}}/{total_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"gnorm {row['grad_norm']:.3f} | {speed} | "
        f"mem {human_bytes(row['memory_bytes'])}{scale}{moe_aux.log_suffix(row)}"
    )


def format_eval_line(row: dict[str, Any], total_steps: int) -> str:
    """eval step 40/300 | loss 2.9104 | ppl 18.4 | 16,384 tokens"""
    width = len(str(total_steps))
    return (f"eval step {row['step']:>{width}}/{total_steps} | loss {row['eval_loss']:.4f} | "
            f"ppl {row['eval_ppl']:.2f} | {row['eval_tokens']:,} tokens")
