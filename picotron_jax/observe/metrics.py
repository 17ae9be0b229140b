"""Metrics rows (JSON lines in the run directory), the one-line log format, and memory readings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import psutil

from picotron_jax.observe.memory import device_memory_stats


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (flushed every row)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
    """step 40/300 | loss 2.8812 | lr 2.95e-03 | gnorm 0.412 | 1,234 tok/s | MFU 41.2% | mem 1.2GiB"""
    width = len(str(total_steps))
    mfu = row.get("mfu")
    mfu_text = f"{100 * mfu:5.1f}%" if isinstance(mfu, float) and math.isfinite(mfu) else "  n/a"
    scale = f" | scale {row['loss_scale']:g} skipped {row['skipped_steps']}" if "loss_scale" in row else ""
    return (
        f"step {row['step']:>{width}}/{total_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"gnorm {row['grad_norm']:.3f} | {row['tokens_per_s']:>9,.0f} tok/s | MFU {mfu_text} | "
        f"mem {human_bytes(row['memory_bytes'])}{scale}"
    )
