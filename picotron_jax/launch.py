"""`picotron-jax launch -n N -- train ...`: N local processes that form one multi-process JAX run.

The launcher is a thin process manager for one machine (a laptop, one GPU box, CI). Each process gets
`distributed.coordinator=127.0.0.1:<free port>`, `distributed.num_processes=N` and its
`distributed.process_id`, and with `--devices-per-process D` its own
`XLA_FLAGS=--xla_force_host_platform_device_count=D` (D virtual CPU devices). Process 0 writes to this
terminal; process i > 0 to RUN_DIR/process-i.log.

Failures are detected inside the run, exactly as on a cluster (see distributed.py): when a process dies,
the others stop by themselves within distributed.heartbeat_timeout_s, with a message naming it. The
launcher reports each exit, returns the first non-zero exit code, and kills whatever still runs
`grace` seconds after the first failure. Ctrl-C (or SIGTERM) asks every process to stop after the same
step (SIGTERM: JAX's preemption sync point); a second Ctrl-C kills them. Children die with the launcher
(PR_SET_PDEATHSIG on Linux), so no process is ever left behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence

from picotron_jax.errors import UserError

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], devices_per_process: int) -> dict[str, str]:
    """The environment of each process: unbuffered output, and its own virtual CPU device count."""
    env = dict(base, PYTHONUNBUFFERED="1")
    if devices_per_process > 0:
        flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the launcher dies, whatever kills it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: best effort
        pass


def _code(returncode: int) -> int:
    """Shell convention: a process killed by signal S exits with 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def launch(
    num_processes: int,
    command: Sequence[str],
    log_dir: Path,
    devices_per_process: int = 0,
    grace_s: float = 70.0,
    program: Sequence[str] | None = None,
    port: int = 0,
    out: IO[str] | None = None,
) -> int:
    """Run `program + command + distributed overrides` N times; returns the run's exit code.

    `program` defaults to this Python running picotron_jax; tests pass a small script instead.
    """
    out = out or sys.stderr
    if num_processes < 1:
        raise UserError(f"launch -n {num_processes}: the number of processes must be at least 1")
    if devices_per_process < 0:
        raise UserError(f"launch --devices-per-process {devices_per_process}: must be >= 1 (or 0: keep XLA_FLAGS)")
    program = list(program) if program is not None else [sys.executable, "-m", "picotron_jax"]
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{port or free_port()}"
    env = child_env(dict(os.environ), devices_per_process)

    def say(text: str) -> None:
        print(f"launch: {text}", file=out, flush=True)

    procs: list[subprocess.Popen] = []
    logs: list[IO | None] = []
    interrupted = 0
    kill_deadline: float | None = None

    def on_signal(signum, _frame) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1 or signum == signal.SIGTERM:
            say(f"{signal.Signals(signum).name}: asking every process to stop after the same step "
                f"(Ctrl-C again kills them)")
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        else:
            say("killing every process")
            for p in procs:
                if p.poll() is None:
                    p.kill()

    previous = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
    except ValueError:  # not the main thread: no signal forwarding
        pass
    t0 = time.monotonic()
    first_failure: tuple[int, int] | None = None
    exit_codes: dict[int, int] = {}
    try:
        say(f"{num_processes} process(es)"
            + (f" x {devices_per_process} CPU device(s)" if devices_per_process else "")
            + f", coordinator {coordinator}; logs of processes 1.. in {log_dir}/process-<i>.log")
        for i in range(num_processes):
            argv = [*program, *command, f"distributed.coordinator={coordinator}",
                    f"distributed.num_processes={num_processes}", f"distributed.process_id={i}",
                    "distributed.cluster=auto"]
            log = None if i == 0 else open(log_dir / f"process-{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT if log else None, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal Ctrl-C reaches the launcher only; it forwards SIGTERM
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            ))
            say(f"process {i} (pid {procs[-1].pid})" + (f" -> {log.name}" if log else " -> this terminal"))
        while len(exit_codes) < num_processes:
            for i, p in enumerate(procs):
                if i in exit_codes or p.poll() is None:
                    continue
                exit_codes[i] = p.returncode
                say(f"process {i} {_describe(p.returncode)} after {time.monotonic() - t0:.1f} s"
                    + (f" (log: {logs[i].name})" if logs[i] and p.returncode else ""))
                if p.returncode != 0 and first_failure is None:
                    first_failure = (i, p.returncode)
                    if len(exit_codes) < num_processes:
                        kill_deadline = time.monotonic() + grace_s
                        say(f"the others stop by themselves once they notice (distributed.heartbeat_timeout_s); "
                            f"whatever still runs in {grace_s:.0f} s is killed")
            if kill_deadline is not None and time.monotonic() > kill_deadline:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        say(f"killing process {i} (still running {grace_s:.0f} s after the first failure)")
                        p.kill()
                kill_deadline = None
            time.sleep(0.05)
    finally:
        for p in procs:  # an exception in the launcher itself: leave nothing behind
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL never takes this long
                pass
        for log in logs:
            if log:
                log.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if interrupted > 1:  # the user killed the run
        return 130
    if first_failure is not None:
        i, rc = first_failure
        say(f"failed: process {i} {_describe(rc)} first" + (f"; its log: {logs[i].name}" if logs[i] else ""))
        from picotron_jax.debug.hang import write_report_if_missing  # process 0 could not write it

        if (written := write_report_if_missing(log_dir, num_processes)) is not None:
            say(f"hang report written to {written}")
        return _code(rc)
    return 130 if interrupted else 0
