"""A run directory belongs to one run: claimed, locked, and its files kept to that run's steps.

* A new run (no resume) into a directory that already holds a run (config.yaml, metrics.jsonl or
  checkpoints) is refused before anything is written; `overwrite` moves the old contents aside into
  `<dir>.replaced-<time>` first, so nothing is lost and nothing mixes.
* `RUN_DIR/.lock` (JSON: pid, host, start time) is taken before the first file is written and released
  at close: a second training in the same directory at the same time is refused in one line. A lock
  whose process is gone (same host, pid not alive) is stale and taken over, with a line saying so.
* A resumed run drops the rows of metrics.jsonl (and the other per-step JSON-lines files) past the
  resumed step, so every step appears once however often a run is resumed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from picotron_jax.errors import UserError

LOCK = ".lock"
STEP_FILES = ("metrics.jsonl", "alerts.jsonl", "faults.jsonl")  # JSON lines with a "step" field


def holds_a_run(run_dir: Path, checkpoint_location: str | None) -> list[str]:
    """What in `run_dir` belongs to an earlier run (empty: the directory is free)."""
    found = [name for name in ("config.yaml", "metrics.jsonl") if (run_dir / name).exists()]
    if checkpoint_location and "://" not in checkpoint_location:
        folder = Path(checkpoint_location)
        if folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
            found.append(f"checkpoints in {folder}")
    return found


def check_run_dir(run_dir: Path, new_run: bool, overwrite: bool, checkpoint_location: str | None) -> None:
    """Refuse (UserError, nothing written) a run directory that is a file, in use, or (for a new run without
    `overwrite`) holds another run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory: give a directory (new or one of this run)")
    holder = live_holder(run_dir)
    if holder:
        raise UserError(f"run directory {run_dir} is in use by {holder}: wait for that run to end, or train into "
                        f"another --run-dir")
    if new_run and not overwrite:
        used = holds_a_run(run_dir, checkpoint_location)
        if used:
            raise UserError(f"run directory {run_dir} already holds a run ({', '.join(used)}): continue it with "
                            f"--resume, train into a new --run-dir, or pass --overwrite to move the old run aside")


def move_aside(run_dir: Path, checkpoint_location: str | None, say: Callable[[str], None]) -> None:
    """`--overwrite`: the old contents go to `<run_dir>.replaced-<time>` (and an old checkpoint.dir outside
    the run directory to `<dir>.replaced-<time>`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in [run_dir] + ([Path(checkpoint_location)] if checkpoint_location and "://" not in checkpoint_location
                               and not Path(checkpoint_location).resolve().is_relative_to(run_dir.resolve()) else []):
        if folder.is_dir() and any(folder.iterdir()):
            target = folder.with_name(f"{folder.name}.replaced-{stamp}")
            folder.rename(target)
            say(f"--overwrite: moved the old contents of {folder} to {target}")


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_holder(run_dir: Path) -> str:
    """'pid 123 on host h (since ...)' when a live process holds the directory's lock, else ''."""
    info = _read_lock(run_dir / LOCK)
    if not info:
        return ""
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", 0))):
        return ""
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return ""
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')})"


class RunLock:
    """RUN_DIR/.lock held while a trainer writes into the directory."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]):
        self.path = run_dir / LOCK
        self.held = False
        run_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = live_holder(run_dir)
                if holder:
                    raise UserError(f"run directory {run_dir} is in use by {holder}: wait for that run to end, or "
                                    f"train into another --run-dir") from None
                old = _read_lock(self.path) or {}
                if old.get("pid") != os.getpid():
                    say(f"run directory {run_dir}: taking over the stale lock of pid {old.get('pid')} "
                        f"(that process is gone)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(body)
            self.held = True
            return
        raise UserError(f"run directory {run_dir}: cannot take its lock {self.path}; another run keeps taking it")

    def release(self) -> None:
        if self.held:
            info = _read_lock(self.path) or {}
            if info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def truncate_to_step(run_dir: Path, step: int) -> list[str]:
    """Drop rows with "step" > `step` from the run's per-step JSON-lines files; returns the files changed."""
    changed = []
    for name in STEP_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row_step = json.loads(line).get("step", 0)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(row_step, int) and row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
            changed.append(name)
    return changed


DEFAULT = "runs/latest"  # logging.run_dir's default: each run gets its own folder, runs/latest links the newest


def default_run_dir(config_arg: str | None, resume: bool, root: Path = Path("runs"), shared: bool = False) -> Path:
    """The run directory of a `train` without --run-dir and logging.run_dir: `runs/<preset>-<time>` for a new
    run (unique: a suffix -2, -3, ... if taken), the run `runs/latest` points at for --resume. `shared` (several
    processes): process 0 picks the time and suffix and every process gets the same folder."""
    latest = root / "latest"
    if resume:
        return latest.resolve() if latest.is_symlink() else latest
    name = Path(config_arg).stem if config_arg else "default"
    stamp, n = int(time.time()), 1

    def candidate() -> Path:
        base = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
        return root / (base if n == 1 else f"{base}-{n}")

    while candidate().exists() or candidate().is_symlink():
        n += 1
    if shared:
        import numpy as np
        from jax.experimental import multihost_utils

        stamp, n = (int(v) for v in multihost_utils.broadcast_one_to_all(np.array([stamp, n], np.int64)))
    return candidate()


def point_latest(run_dir: Path, root: Path = Path("runs")) -> str:
    """Make `runs/latest` a link to `run_dir` (atomically); returns a line to print when it cannot."""
    latest = root / "latest"
    if latest.exists() and not latest.is_symlink():
        return f"note: {latest} is a directory (an older layout), so it does not point at {run_dir}"
    tmp = root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(run_dir.resolve(), root.resolve()), tmp)
    os.replace(tmp, latest)
    return ""
