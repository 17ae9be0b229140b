"""A training process killed with SIGKILL at random moments (one of them while an async save is being
written) and restarted with --resume ends with the same parameters as a run that was never killed.

The kill points are random; the seed is printed (and can be fixed with KILL_SEED=...) so a failure
can be replayed. The default test kills twice; `-m slow` runs a variant with many kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import MESHES, ROOT
from picotron_jax.checkpoint.hf import load_checkpoint_params

STEPS = 12
TINY = ["--config", str(MESHES / "single.yaml"), "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=4",
        f"train.steps={STEPS}", "optimizer.warmup_steps=2", "logging.every=1", "logging.progress=false",
        "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.require_lossless=true"]
# The training processes these tests start share JAX's persistent compilation cache: each compiles the same
# tiny program, so all but the first read it (about 20 s less per process on the loaded 2-core CI machine).
XLA_CACHE = Path(tempfile.gettempdir()) / f"picotron-jax-tests-xla-cache-{os.getuid()}"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_COMPILATION_CACHE_DIR": str(XLA_CACHE),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def complete_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def run_once(run: Path, kill_on_line: str | None = None, delay_s: float = 0.0,
             sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Train (resuming when a checkpoint exists); send `sig` `delay_s` seconds after the first output line
    that starts with `kill_on_line` (blanks collapsed: log lines pad the step number). Returns (exit code, output)."""
    args = [sys.executable, "-m", "picotron_jax", "train", "--run-dir", str(run), *TINY]
    if complete_steps(run):
        args.append("--resume")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    watchdog = threading.Timer(300, proc.kill)  # never hang the suite
    watchdog.start()
    lines, timer = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_on_line is not None and timer is None and " ".join(line.split()).startswith(kill_on_line):
                timer = threading.Timer(delay_s, proc.send_signal, (sig,))
                timer.start()
        code = proc.wait()
    finally:
        watchdog.cancel()
        if timer is not None:
            timer.cancel()
        proc.stdout.close()
    return code, "".join(lines)


def last_step_done(out: str) -> bool:
    return f"step {STEPS}/{STEPS}" in out and "done" in out


def final_params(run: Path) -> list[np.ndarray]:
    params, _ = load_checkpoint_params(run / "checkpoints" / str(STEPS))
    return jax.tree.leaves(params)


def killed_and_resumed(run: Path, rng: random.Random, kills: int) -> list[str]:
    """One kill during an async save (an older checkpoint exists), then `kills - 1` interruptions at random
    moments (SIGKILL; every third one a SIGTERM, which must stop cleanly with a checkpoint): a random time
    after a random step's log line. Then run to the end."""
    notes = []
    save_step = rng.choice(range(4, STEPS, 2))
    code, _ = run_once(run, kill_on_line=f"checkpoint {save_step}: training blocked")  # at once
    tmp_left = sorted(p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name)
    notes.append(f"killed (exit {code}) right after save {save_step} started; unfinished folders {tmp_left}")
    assert code == -signal.SIGKILL
    # keep=1, yet the previous checkpoint is still there unless the new one completed first
    assert complete_steps(run) in ([save_step - 2], [save_step]), complete_steps(run)
    for i in range(1, kills):
        if complete_steps(run)[-1] == STEPS:
            break
        if complete_steps(run)[-1] >= STEPS - 1:
            break
        step = rng.randint(complete_steps(run)[-1] + 1, STEPS - 1)
        delay = rng.uniform(0.0, 0.02)  # a step of the tiny model takes a few ms, a save tens of ms
        sig = signal.SIGTERM if i % 3 == 2 else signal.SIGKILL
        code, out = run_once(run, kill_on_line=f"step {step}/", delay_s=delay, sig=sig)
        notes.append(f"{sig.name} {delay:.2f}s after step {step} (exit {code}); complete steps {complete_steps(run)}")
        if sig == signal.SIGTERM and code == 0:  # a clean stop, with a checkpoint of the step it stopped after
            last = max(int(ln.split()[1].split("/")[0]) for ln in out.splitlines() if ln.startswith("step "))
            assert "stopped early by SIGTERM" in out and complete_steps(run)[-1] == last, out
        elif sig == signal.SIGTERM:  # only after the loop (signal handling ends with it) may SIGTERM kill
            assert code == -signal.SIGTERM and f"step {STEPS}/{STEPS}" in out, out
        if last_step_done(out):  # finished before the signal
            break
    code, out = run_once(run)
    assert code == 0 and "resumed from" in out, out
    notes.append("final run: " + next((ln for ln in out.splitlines() if ln.startswith("resumed from")), "fresh start"))
    return notes


def check_against_uninterrupted(tmp_path: Path, kills: int) -> None:
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 1_000_000))
    print(f"KILL_SEED={seed}")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run goes alongside
        straight = pool.submit(run_once, reference)
        for note in killed_and_resumed(killed, random.Random(seed), kills):
            print(note)
        code, out = straight.result()
    assert code == 0, out
    assert complete_steps(killed)[-1] == STEPS
    for a, b in zip(final_params(reference), final_params(killed), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: same mesh, same batches, same schedule


def test_sigkill_during_async_save_and_at_a_random_moment_then_resume_is_bitwise(tmp_path):
    check_against_uninterrupted(tmp_path, kills=2)


@pytest.mark.slow
def test_many_sigkills_then_resume_is_bitwise(tmp_path):
    check_against_uninterrupted(tmp_path, kills=6)
