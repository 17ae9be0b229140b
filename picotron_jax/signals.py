"""Stopping a run cleanly on Ctrl-C / SIGTERM (and the Jupyter stop button, which sends SIGINT).

The first SIGINT or SIGTERM asks the loop to stop after the current step. A second SIGINT aborts:
at once when no step is in flight, else as soon as the step's new state is stored, so the trainer
stays usable (no half-applied step). With several processes, a signal to any of them stops all
of them after the same step (JAX's preemption sync point): processes stopping at different steps
would leave one of them waiting forever in a collective.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class StopFlag:
    requested: bool = False
    reason: str = ""
    # several processes: a signal only asks; all stop at the step JAX's preemption sync agrees on
    coordinated: bool = False
    in_step: bool = False  # a step is being dispatched and its new state not yet stored
    abort_pending: bool = False  # a second Ctrl-C arrived during a step: raise once the state is stored

    def step_stored(self) -> None:
        """Called by the loop once the step's new state is in place."""
        self.in_step = False
        if self.abort_pending:
            self.abort_pending = False
            raise KeyboardInterrupt


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the current step, then stop. Second SIGINT: abort (see module doc).

    Coordinated (several processes): SIGTERM stays with JAX's preemption notifier, which tells every
    process; Ctrl-C becomes a SIGTERM to this process."""

    def handler(signum, _frame):
        if (flag.requested or flag.reason) and signum == signal.SIGINT:
            if flag.in_step:
                flag.abort_pending = True
                return
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


def reached_stop_point(step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (a preemption notice)."""
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service off: no coordinated stop
        return False
