"""The debugger's loop callbacks for a config (called by callbacks.build_callbacks)."""

from __future__ import annotations

from pathlib import Path

import jax


def debug_callbacks(cfg, run_dir: Path | None) -> tuple[list, list]:
    """(callbacks fired first, callbacks fired after the built-in ones)."""
    first: list = []
    out: list = []
    d = cfg.debug
    if jax.process_count() > 1:
        from picotron_jax.debug.identity import check_same_run
        from picotron_jax.debug.recorder import FlightRecorder

        if d.check_start:
            check_same_run(cfg)  # before the first collective: the state's initialisation
        first.append(FlightRecorder(cfg, run_dir))
    if d.nan_origin:  # first: it traces a non-finite step before a callback stops or rewinds the run
        from picotron_jax.debug.nan_auto import NanOrigin

        first.append(NanOrigin(cfg, run_dir))
    if run_dir is not None:
        from picotron_jax.debug.postmortem import CrashReport

        out.append(CrashReport(cfg, run_dir))
    if d.break_when:
        from picotron_jax.debug.breakpoint import Breakpoint

        out.append(Breakpoint(d.break_when, cfg))
    if d.check_every:
        from picotron_jax.debug.consistency import ReplicaCheck

        out.append(ReplicaCheck(d.check_every))
    return first, out
