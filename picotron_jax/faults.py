"""The fault injector (config `faults`): deliberate trouble, to rehearse detectors, alerts and debuggers.

In-step faults (a NaN in one layer's forward output or gradient, a loss spike) are built into the
jitted step (train/faults.py); this callback does the host-side ones and logs every injection:

* sleep `faults.sleep_s` seconds in one process, in its step phase (before the step is dispatched)
  or in its data loader (on the prefetch thread), for `faults.sleep_steps` steps;
* hang one process before `faults.hang_step` (it never continues: the watchdog's case);
* change one element of one array by one ulp on one device of data-parallel replica
  `faults.flip_replica` after `faults.flip_step` (replicas that should agree no longer do);
* slow reads of the data source (`faults.slow_read_s` per batch);
* one late device (`faults.sleep_phase=device`, `faults.device`): after each step its copy of the
  step counter passes through a host callback that sleeps `faults.sleep_s` on that device, so its
  next step starts late and the others wait for it at their first collective (a straggler; the
  other devices and the program are untouched);
* a collapsed MoE router (`faults.moe_collapse_step`): the routers' weights are zeroed before every
  step of the fault, so all router scores tie and every token picks experts 0..top_k-1.

Each injection prints one line "fault injected at step K: ..." and appends a row to
RUN_DIR/faults.jsonl ({"step", "fault", "process"}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.config import MESH_AXES, FaultsConfig


def _leaf(params: dict, path: str) -> tuple[str, Any]:
    """The parameter at dotted `path` ("layers.wq"); "" = the first one in path order."""
    flat = {jax.tree_util.keystr(k, simple=True, separator="."): v
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    name = path or sorted(flat)[0]
    if name not in flat:
        raise KeyError(name)
    return name, flat[name]


def flip_one_ulp(params: dict, path: str, replica: int, mesh) -> tuple[dict, str]:
    """`params` with element 0 of this device's shard of `path` moved by one ulp on the first device of
    data-parallel replica `replica` (only where that device is this process's)."""
    name, array = _leaf(params, path)
    target = np.take(mesh.devices, replica, axis=MESH_AXES.index("data")).flat[0]
    shards = []
    for shard in array.addressable_shards:
        data = np.array(shard.data)
        if shard.device == target:
            flat = data.reshape(-1)
            flat[0] = np.nextafter(flat[0], np.inf if flat[0] <= 0 else -np.inf).astype(data.dtype)
        shards.append(jax.device_put(data, shard.device))
    changed = jax.make_array_from_single_device_arrays(array.shape, array.sharding, shards)
    keys = name.split(".")
    out = dict(params)
    node = out
    for key in keys[:-1]:
        node[key] = dict(node[key])
        node = node[key]
    node[keys[-1]] = changed
    return out, f"one ulp changed in {name}[0] on device {target.id} (data replica {replica})"


_LATE: dict[tuple, Any] = {}


def _late_copy_program(x: jax.Array, seconds: float):
    """The compiled copy of `x` (one device's shard) that is ready `seconds` later: a host callback sleeps first."""
    key = (x.shape, str(x.dtype), seconds, x.devices().pop().id)
    if key not in _LATE:
        def sleep_then_return(value):
            time.sleep(seconds)
            return np.asarray(value)

        late = jax.jit(lambda v: jax.pure_callback(sleep_then_return, jax.ShapeDtypeStruct(v.shape, v.dtype), v))
        _LATE[key] = late.lower(x).compile()
    return _LATE[key]


def late_on_device(arr: jax.Array, device, seconds: float) -> jax.Array:
    """`arr` with its shard on `device` made ready `seconds` late (the other shards as they are)."""
    return jax.make_array_from_single_device_arrays(arr.shape, arr.sharding, [
        _late_copy_program(s.data, seconds)(s.data) if s.device == device else s.data
        for s in arr.addressable_shards])


def compile_late_copy(arr: jax.Array, device, seconds: float) -> None:
    """Compile `late_on_device`'s program ahead (at run start): compiling between a step's dispatch and the
    copy's would let a short step finish first, and XLA:CPU runs a host callback whose input is ready
    inline, stalling the host instead of the device."""
    for s in arr.addressable_shards:
        if s.device == device:
            _late_copy_program(s.data, seconds)


def _replace(trainer, change) -> None:
    """Ask the loop for `change(state)`, composing with a replacement another fault asked for this step."""
    state = trainer.control.new_state if trainer.control.new_state is not None else trainer.state
    trainer.control.replace_state(change(state))


def collapse_routers(params: dict) -> dict:
    """`params` with every MoE router weight zeroed (scores tie: top_k picks the lowest expert indices)."""
    moe = params["moe"]
    return {**params, "moe": {k: (jax.numpy.zeros_like(v) if k.startswith("router") and not k.endswith("bias")
                                  else v) for k, v in moe.items()}}


class FaultInjector(Callback):
    def __init__(self, cfg: FaultsConfig, run_dir: Path | None):
        self.cfg = cfg
        self.path = run_dir / "faults.jsonl" if run_dir is not None else None
        self.here = jax.process_index() == cfg.process
        self._late_device = None

    def _sleeping(self, step: int, phase: str) -> bool:
        c = self.cfg
        if not (self.here and c.sleep_step and c.sleep_s > 0 and c.sleep_phase == phase):
            return False
        return step >= c.sleep_step and (c.sleep_steps == 0 or step < c.sleep_step + c.sleep_steps)

    def _log(self, trainer, step: int, what: str) -> None:
        trainer.say(f"fault injected at step {step}: {what}", everywhere=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "fault": what, "process": jax.process_index()}) + "\n")

    def on_step_start(self, trainer, step):
        c = self.cfg
        if trainer.built.faults is not None:  # in-step faults: logged before the step that fires them
            for _, what in trainer.built.faults.due(step):
                self._log(trainer, step, what)
        if self.here and c.hang_step == step:
            self._log(trainer, step, f"process {jax.process_index()} hangs")
            while True:
                time.sleep(3600)
        if self._sleeping(step, "step"):
            self._log(trainer, step, f"process {jax.process_index()} sleeps {c.sleep_s:g}s before the step")
            time.sleep(c.sleep_s)

    def wrap_batches(self, read):
        c = self.cfg
        if not (c.slow_read_s > 0 or (c.sleep_step and c.sleep_phase == "data")):
            return read

        def slow_read(index: int):
            step = index + 1
            if self._sleeping(step, "data"):
                time.sleep(c.sleep_s)
            if c.slow_read_s > 0:
                time.sleep(c.slow_read_s)
            return read(index)

        return slow_read

    def _collapsing(self, step: int) -> bool:
        c = self.cfg
        return c.moe_collapse_step > 0 and step >= c.moe_collapse_step and (
            c.moe_collapse_steps == 0 or step < c.moe_collapse_step + c.moe_collapse_steps)

    def on_run_start(self, trainer):
        c = self.cfg
        if self._sleeping_anywhere("device"):
            self._late_device = trainer.built.devices[c.device]
            compile_late_copy(trainer.state.step, self._late_device, c.sleep_s)
            self._log(trainer, c.sleep_step, f"device {self._late_device.id} starts its step {c.sleep_s:g}s late "
                                             f"for {c.sleep_steps or 'all'} step(s)")
        if self._sleeping_anywhere("data"):
            self._log(trainer, c.sleep_step, f"process {c.process}'s data loader sleeps {c.sleep_s:g}s per batch "
                                             f"for {c.sleep_steps or 'all'} step(s)")
        if c.slow_read_s > 0:
            self._log(trainer, trainer.step_count + 1, f"every batch read takes {c.slow_read_s:g}s longer")

    def _sleeping_anywhere(self, phase: str) -> bool:
        c = self.cfg
        return self.here and c.sleep_step > 0 and c.sleep_s > 0 and c.sleep_phase == phase

    def on_step_dispatched(self, trainer, step, outputs):
        # queued behind the running step: XLA:CPU runs a host callback whose inputs are ready inline, in
        # the dispatching thread, so after any wait for the step the sleep would stall the host instead
        if self._late_device is not None and self._sleeping(step + 1, "device"):  # the next step starts late there
            _replace(trainer, lambda st: st.replace(step=late_on_device(st.step, self._late_device, self.cfg.sleep_s)))

    def on_step_end(self, trainer, step, outputs):
        if self._collapsing(step + 1):  # replaced after this step's events: the next step runs collapsed
            _replace(trainer, lambda st: st.replace(params=collapse_routers(st.params)))
            if step + 1 == self.cfg.moe_collapse_step:
                self._log(trainer, step + 1, "the MoE routers' weights are zeroed before every step (a collapsed "
                                             "router: every token picks experts 0..top_k-1)")
        if self.cfg.flip_step == step:
            params, what = flip_one_ulp(trainer.state.params, self.cfg.flip_array, self.cfg.flip_replica,
                                        trainer.mesh)
            _replace(trainer, lambda st: st.replace(params=params))
            self._log(trainer, step, what)
