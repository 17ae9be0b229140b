"""A profiling window in a training run: `jax.profiler` traces steps start_step .. start_step+steps-1.

The window is a loop callback (callback.py). At its first step it waits for the device (so the
window holds only its own steps), starts the trace and times the window with the host clock; every
step in it is a `StepTraceAnnotation` (TensorBoard/XProf's step marker) on the loop's thread, and
every batch read a `picotron/read_batch` annotation on the loader's thread. After its last step it
waits for the device again, stops the trace and writes, next to the trace, what the analysis needs
and could not get from the trace: the compiled program (HLO text, cost and memory analysis), the
mesh, the measured wall time of the window, and the step outputs it kept (MoE expert loads).

The trace lands in DIR/trace/plugins/profile/<timestamp>/<host>.xplane.pb (+ .trace.json.gz), the
layout `xprof --logdir DIR/trace` and `tensorboard --logdir DIR/trace` read; Perfetto opens the
.trace.json.gz.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.mesh import describe

READ_BATCH = "picotron/read_batch"
STEP = "picotron_step"  # StepTraceAnnotation name (the step number is its step_num argument)


class ProfileWindow(Callback):
    """Trace `steps` steps from `start_step` (1-based) into `out_dir`; `done` once written."""

    def __init__(self, start_step: int, steps: int, out_dir: str | Path):
        self.start, self.steps = start_step, steps
        self.last = start_step + steps - 1
        self.out = Path(out_dir)
        self.done = False
        self.active = False
        self._step_ann = None
        self._t0 = 0.0
        self._last_batch = None
        self._loads: list[Any] = []
        self._host: list[tuple[int, float, float]] = []  # (step, start, end) perf_counter of each step's host part

    def _in_window(self, step: int) -> bool:
        return self.start <= step <= self.last and not self.done

    def on_step_start(self, trainer, step):
        if not self._in_window(step):
            return
        if step == self.start:
            jax.block_until_ready(trainer.state)  # the window starts with an idle device
            (self.out / "trace").mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out / "trace"))
            self.active = True
            self._t0 = time.perf_counter()
        self._step_ann = jax.profiler.StepTraceAnnotation(STEP, step_num=step)
        self._step_ann.__enter__()
        self._host.append((step, time.perf_counter(), 0.0))

    def on_step_end(self, trainer, step, outputs):
        if not self._in_window(step) or self._step_ann is None:
            return
        if "moe_load" in outputs:
            self._loads.append(outputs["moe_load"])  # fetched after the window: no sync inside it
        if step == self.last:
            jax.block_until_ready((trainer.state, outputs))
        s, t_start, _ = self._host[-1]
        self._host[-1] = (s, t_start, time.perf_counter())
        self._step_ann.__exit__(None, None, None)
        self._step_ann = None
        if step == self.last:
            wall = time.perf_counter() - self._t0
            jax.profiler.stop_trace()
            self.active = False
            self._write(trainer, wall)
            self.done = True

    def wrap_batches(self, read):
        def annotated(index: int):
            with jax.profiler.TraceAnnotation(READ_BATCH, step=index + 1):
                batch = read(index)
            self._last_batch = batch
            return batch

        return annotated

    def on_run_end(self, trainer, summary):
        if self.active:  # the run stopped inside the window: keep the trace, say it is incomplete
            if self._step_ann is not None:
                self._step_ann.__exit__(None, None, None)
            jax.profiler.stop_trace()
            self.active = False
            trainer.say(f"profile: the run ended inside the profiling window (step {trainer.step_count}); "
                        f"the trace in {self.out / 'trace'} is incomplete and was not analysed")

    def _write(self, trainer, wall: float) -> None:
        built = trainer.built
        batch = self._last_batch if self._last_batch is not None else built.batch(0)
        args = (trainer.state, batch) if built.faults is None else (trainer.state, batch, np.zeros((2,), np.int32))
        compiled = built.train_step.lower(*args).compile()  # cached: the executable the window ran
        (self.out / "program.hlo.txt").write_text(compiled.as_text())
        cost = compiled.cost_analysis() or {}
        if isinstance(cost, list):
            cost = cost[0] if cost else {}
        from picotron_jax.memory.estimate import estimate_from_compiled

        memory = estimate_from_compiled(built.cfg, compiled, built.rules, built.setup).as_dict()
        loads = [np.asarray(jax.device_get(x), np.float64).tolist() for x in self._loads]
        mesh = built.mesh
        meta = {
            "start_step": self.start, "steps": self.steps, "wall_s": wall, "step_s": wall / self.steps,
            "host_steps": [{"step": s, "host_s": b - a} for s, a, b in self._host],
            "mesh": describe(mesh), "mesh_shape": list(mesh.devices.shape),
            "mesh_device_ids": [int(d.id) for d in mesh.devices.flat],
            "platform": mesh.devices.flat[0].platform, "device_kind": mesh.devices.flat[0].device_kind,
            "num_devices": int(mesh.size), "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "process_index": jax.process_index(), "process_count": jax.process_count(),
            "tokens_per_step": built.tokens_per_step,
            "cost_flops": float(cost.get("flops", float("nan"))), "memory": memory, "moe_loads": loads,
            "device_memory_stats": _memory_stats(mesh.devices.flat[0]),
            "peak_flops_total": _peak(built), "host_memory_per_device": _host_memory(mesh),
        }
        (self.out / "window.json").write_text(json.dumps(meta, indent=1) + "\n")


def _memory_stats(device) -> dict:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without allocator statistics (CPU)
        return {}
    keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_free_block_bytes", "bytes_reserved")
    return {k: int(v) for k, v in stats.items() if k in keep}


def _peak(built) -> float:
    from picotron_jax.observe.flops import run_peak_flops

    try:
        return float(run_peak_flops(list(built.mesh.devices.flat), built.cfg.logging.peak_flops)[0])
    except Exception:  # noqa: BLE001 - an unknown accelerator without logging.peak_flops
        return float("nan")


def _host_memory(mesh) -> int | None:
    """CPU devices share the host's memory: its total, split evenly (None on accelerators)."""
    if mesh.devices.flat[0].platform != "cpu":
        return None
    import psutil

    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    return int(psutil.virtual_memory().total // max(local, 1))
