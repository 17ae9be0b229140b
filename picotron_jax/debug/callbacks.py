"""The debugger's loop callbacks for a config (called by callbacks.build_callbacks)."""

from __future__ import annotations

from pathlib import Path


def debug_callbacks(cfg, run_dir: Path | None) -> list:
    out: list = []
    d = cfg.debug
    if run_dir is not None:
        from picotron_jax.debug.postmortem import CrashReport

        out.append(CrashReport(cfg, run_dir))
    if d.break_when:
        from picotron_jax.debug.breakpoint import Breakpoint

        out.append(Breakpoint(d.break_when, cfg))
    if d.check_every:
        from picotron_jax.debug.consistency import ReplicaCheck

        out.append(ReplicaCheck(d.check_every))
    return out
