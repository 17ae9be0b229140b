"""The flight recorder: what each process last did, dumped to RUN_DIR/debug/ when the watchdog fires.

Each process keeps a ring buffer (`debug.recorder_size` entries) of loop events: batch reads (the
prefetch thread), step started / finished, checkpoints, evaluations, with wall-clock times. At the
start of a run it compiles the train step once (the call then reuses that compilation: no second
compile) and records the program's fingerprint (sha256 of the optimized HLO) and its collective
sequence: every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute in program
order with its replica groups (PyTorch's flight recorder logs the same per collective call).

With several processes, the fingerprints are compared at once through the coordination service:
processes that compiled different programs are refused (UserError, exit code 2) before their first step.

When the watchdog (distributed.py) is about to stop this process, it calls `dump`: the ring buffer,
every thread's Python stack, the watchdog's heartbeat table and the program go to
RUN_DIR/debug/hang-p<process>.json. Process 0 then waits briefly for the others' dumps and writes
RUN_DIR/debug/hang-report.txt (debug/hang.py); `picotron-jax debug hang RUN_DIR` prints it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.debug.postmortem import thread_stacks
from picotron_jax.errors import UserError

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*\S.*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_GROUPS = re.compile(r"(replica_groups=(?:\{[^=]*?\}\}|\[[^\]]*\]<=\[[^\]]*\](?:T\([^)]*\))?|\{\})"
                     r"|source_target_pairs=\{[^=]*?\}\})")
WAIT_FOR_DUMPS_S = 8.0


def collective_sequence(hlo_text: str) -> list[str]:
    """The collectives of an optimized HLO module in text order: "all-reduce replica_groups={{0,1},{2,3}}"."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None or "-done(" in line:
            continue
        groups = _GROUPS.search(line)
        out.append(f"{m.group(1)} {groups.group(1) if groups else ''}".strip())
    return out


def program_info(trainer) -> dict:
    """Fingerprint and collective sequence of the compiled train step (compiled now, reused by the call)."""
    built = trainer.built
    args = [trainer.state, trainer.batch(trainer.step_count)]
    if built.faults is not None:
        args.append(np.zeros((2,), np.int32))
    text = built.train_step.lower(*args).compile().as_text()
    stripped = re.sub(r", metadata=\{[^}]*\}", "", text)  # source lines differ between checkouts, not programs
    return {"fingerprint": hashlib.sha256(stripped.encode()).hexdigest()[:16],
            "collectives": collective_sequence(text)}


class FlightRecorder(Callback):
    def __init__(self, cfg, run_dir: Path | None):
        self.cfg, self.run_dir = cfg, None if run_dir is None else Path(run_dir)
        self.entries: deque = deque(maxlen=max(1, cfg.debug.recorder_size))
        self.program: dict = {}
        self._dumped = threading.Event()

    def record(self, phase: str, step: int | None, **extra) -> None:
        self.entries.append({"t": time.time(), "phase": phase, "step": step, **extra})

    # -- loop events
    def on_run_start(self, trainer):
        from picotron_jax import distributed

        if self._hook not in distributed.DIE_HOOKS:
            distributed.DIE_HOOKS.append(self._hook)
        self.record("compile", trainer.step_count + 1)
        if not self.program:
            self.program = program_info(trainer)
            if jax.process_count() > 1:
                compare_programs(self.program, self.cfg.distributed.init_timeout_s)

    def wrap_batches(self, read):
        def recorded(index: int):
            self.record("data", index + 1, batch=index)
            return read(index)

        return recorded

    def on_step_start(self, trainer, step):
        self.record("step", step)

    def on_step_end(self, trainer, step, outputs):
        self.record("step done", step)

    def on_eval(self, trainer, row):
        self.record("eval done", trainer.step_count)

    def on_checkpoint(self, trainer, step, path):
        self.record("checkpoint", step, path=str(path))

    def on_close(self, trainer):
        from picotron_jax import distributed

        if self._hook in distributed.DIE_HOOKS:
            distributed.DIE_HOOKS.remove(self._hook)

    # -- the dump
    def dump(self, problem: str, heartbeat: dict) -> Path | None:
        """Write RUN_DIR/debug/hang-p<process>.json (once); its path."""
        if self.run_dir is None or self._dumped.is_set():
            return None
        self._dumped.set()
        me = jax.process_index()
        out = {"process": me, "num_processes": jax.process_count(), "host": socket.gethostname(), "pid": os.getpid(),
               "time": time.time(), "problem": problem, "recorder": list(self.entries), "stacks": thread_stacks(),
               "main_stack": _main_stack(), "heartbeat": heartbeat, "program": self.program}
        folder = self.run_dir / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"hang-p{me}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
        tmp.replace(path)
        return path

    def _hook(self, watchdog, problem: str) -> None:
        table = watchdog.table
        heartbeat = {"step": table.step, "peers": {str(p): peer.beat for p, peer in table.peers.items()}}
        path = self.dump(problem, heartbeat)
        print(f"debug: hang dump written to {path}", file=sys.stderr, flush=True)
        if path is None or watchdog.me != 0:
            return
        from picotron_jax.debug.hang import load_dumps, report

        now = watchdog.clock()  # wait only for the processes still sending heartbeats (a lost one writes nothing)
        alive = {watchdog.me} | {p for p, peer in table.peers.items()
                                 if peer.beat is not None and now - peer.changed_at < table.timeout_s}
        deadline = time.monotonic() + WAIT_FOR_DUMPS_S
        while time.monotonic() < deadline and not alive <= set(load_dumps(self.run_dir)):
            time.sleep(0.2)
        text = report(load_dumps(self.run_dir), watchdog.n)
        (self.run_dir / "debug" / "hang-report.txt").write_text(text)
        print(text, file=sys.stderr, flush=True)


def _main_stack() -> list[dict]:
    """The main thread's frames, outermost first: file, line, function."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    frames = []
    while frame is not None:
        frames.append({"file": frame.f_code.co_filename, "line": frame.f_lineno, "function": frame.f_code.co_name})
        frame = frame.f_back
    return frames[::-1]


def compare_programs(program: dict, timeout_s: float) -> None:
    """Refuse to start when the processes compiled different train steps (UserError on every process)."""
    from picotron_jax import compat

    client = compat.distributed_client()
    client.key_value_set(f"picotron_debug/program/{jax.process_index()}", program["fingerprint"], allow_overwrite=True)
    prints = {p: client.blocking_key_value_get(f"picotron_debug/program/{p}", int(timeout_s * 1000))
              for p in range(jax.process_count())}
    if len(set(prints.values())) > 1:
        groups: dict = {}
        for p, fp in prints.items():
            groups.setdefault(fp, []).append(p)
        text = "; ".join(f"processes {ps} compiled {fp}" for fp, ps in groups.items())
        raise UserError(f"the processes compiled different train steps ({text}): their configs, data shapes or code "
                        f"differ; run every process with the same config and checkout")
